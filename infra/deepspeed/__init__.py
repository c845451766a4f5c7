"""DeepSpeed configs, installed as the data package `dpoflow.deepspeed` (see pyproject.toml)."""
