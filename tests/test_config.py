"""One source of defaults: every entry point resolves a config over configs/default.yaml."""

from __future__ import annotations

import pytest
import yaml

from dpoflow.config import load_config, resolve_config
from dpoflow.errors import ConfigError
from tests.conftest import PROJECT_ROOT


def deployments() -> dict[str, dict]:
    spec = yaml.safe_load((PROJECT_ROOT / "infra" / "prefect.yaml").read_text())
    return {d["name"]: d["parameters"] for d in spec["deployments"]}


@pytest.mark.parametrize("name", ["nightly", "weekly-beta-sweep"])
def test_a_deployment_resolves_to_the_config_dpoflow_run_uses(name):
    """The recipe a scheduled run trains is the one `dpoflow run` trains, not the schema's
    field defaults (those differ: rpo_alpha 0.0, max_steps 200, max_length 96)."""
    resolved = resolve_config(deployments()[name]["config"])
    assert resolved == load_config()
    assert resolved.dpo.rpo_alpha == 0.3 and resolved.dpo.max_steps == 300
    assert resolved.dpo.max_length == 64 and resolved.eval.temperatures == [0.7]


def test_a_partial_config_file_is_laid_over_the_default(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("dpo:\n  beta: 0.3\neval:\n  num_prompts: 32\n")
    cfg = load_config(path, ["dpo.loss_type=ipo"])
    assert (cfg.dpo.beta, cfg.dpo.loss_type, cfg.eval.num_prompts) == (0.3, "ipo", 32)
    default = load_config()
    assert cfg.dpo.rpo_alpha == default.dpo.rpo_alpha == 0.3  # from configs/default.yaml
    assert cfg.sft == default.sft and cfg.model == default.model


def test_a_flow_parameter_that_is_a_whole_config_resolves_to_itself():
    cfg = load_config(None, ["dpo.beta=0.5", "eval.temperatures=null"])
    assert resolve_config(cfg.model_dump(mode="json")) == cfg


def test_a_bad_override_in_a_deployment_is_one_sentence():
    with pytest.raises(ConfigError, match="unknown config key 'dpo.betta'"):
        resolve_config({"dpo": {"betta": 0.1}})
