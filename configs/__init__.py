"""Pipeline configs, installed as the data package `dpoflow.configs` (see pyproject.toml)."""
