"""A one-process job for `benchmarks.process_costs`: it imports what the training worker
imports (the training loop's module at import, DeepSpeed without MLflow in main) and ends."""

import dpoflow.models.trainer  # noqa: F401  # the worker's imports
from dpoflow.models.node_launcher import import_deepspeed
from dpoflow.process_gc import freeze_objects_at_exit


def main() -> None:
    freeze_objects_at_exit()
    import_deepspeed()


if __name__ == "__main__":
    main()
