"""dpoflow: align a language model to pairwise preferences with DPO.

The repository keeps the design card's folders at its top level; the build maps
them under this one import name:

    dpoflow              core/          errors and the config schema (the bottom layer)
    dpoflow.models       models/        the ML: loading, training loop, losses, generation, judges
    dpoflow.data_checks  data_checks/   preference-data loading and the Great Expectations suite
    dpoflow.tasks        tasks/         one module per pipeline stage, and the plumbing they share
    dpoflow.flows        flows/         the Prefect flows and the `dpoflow` command line
"""
