"""What MLflow records when the same weights are evaluated again, and what a run's summary says
of the registry (which a cached run must read, not replay), on a real MLflow store (SQLite)."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from dpoflow.flows.pipeline import headline

NAME = "dpoflow-policy"


def test_the_flow_log_rounds_the_interval():
    summary = {"win_rate": 0.86381, "win_rate_ci": [0.8223153612699274, 0.9050508495292673]}
    line = headline(summary | {"kl": 2.22812})
    assert line == "win rate 0.864 [0.822, 0.905], KL 2.228"


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A real MLflow store (SQLite) with a DPO run, and a model folder to register."""
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("e", artifact_location=(tmp_path / "a").as_uri())
    dpo_run = client.create_run(experiment, run_name="dpo-sigmoid-beta0.1").info.run_id
    (tmp_path / "weights").mkdir()
    yield uri, client, dpo_run, tmp_path
    mlflow.set_tracking_uri(None)


def test_a_second_evaluation_gets_a_nested_run_and_finds_the_same_version(store):
    from dpoflow.tasks.evaluate import evaluation_run
    from dpoflow.tasks.register import find_version

    uri, client, dpo_run, tmp = store
    first, second = tmp / "first.partial", tmp / "second.partial"
    first.mkdir()
    second.mkdir()
    assert evaluation_run(uri, dpo_run, {"num_prompts": 24}, first) == dpo_run
    assert evaluation_run(uri, dpo_run, {"num_prompts": 24}, first) == dpo_run  # a retry: same
    child = evaluation_run(uri, dpo_run, {"num_prompts": 16}, second)
    assert child != dpo_run
    run = client.get_run(child)
    assert run.data.tags["mlflow.parentRunId"] == dpo_run
    assert run.data.params["eval.num_prompts"] == "16"
    assert run.info.run_name == "dpo-sigmoid-beta0.1 eval 2"
    assert client.get_run(dpo_run).data.tags["dpoflow.evaluations"] == "2"

    client.create_registered_model(NAME)
    source = str(tmp / "weights")
    v1 = client.create_model_version(NAME, source, run_id=dpo_run, tags={"weights": "full"})
    other = client.create_run(run.info.experiment_id).info.run_id
    client.create_model_version(NAME, source, run_id=other)
    assert find_version(client, NAME, dpo_run).version == v1.version
    assert find_version(client, NAME, dpo_run, "lora_adapter") is None  # another form: its own
    assert find_version(client, NAME, "no-such-run") is None


def test_the_summary_describes_the_version_as_the_registry_has_it_now(store):
    from dpoflow.config import PipelineConfig
    from dpoflow.flows.pipeline import run_summary

    uri, client, dpo_run, tmp = store
    client.create_registered_model(NAME)
    for _ in range(2):
        client.create_model_version(NAME, str(tmp / "weights"), run_id=dpo_run)
    client.set_registered_model_alias(NAME, "champion", "1")
    client.set_registered_model_alias(NAME, "candidate", "2")  # moved on since v1 was gated
    client.set_model_version_tag(NAME, "1", "promotion.reason", "promoted by hand with --force")
    cached_promote = {  # what the promote stage recorded when it gated v1, first of all
        "name": NAME,
        "version": "1",
        "aliases": ["candidate", "champion"],
        "promoted": True,
        "reason": "win rate vs reference (95% CI 0.6-0.8) and no champion yet",
    }
    manifests = {
        "evaluate": {
            "win_rate": 0.7,
            "win_rate_ci": [0.6, 0.8],
            "reward_policy": 1.0,
            "reward_reference": 0.5,
            "kl": 2.0,
        },
        "dpo": {"mlflow_run_id": dpo_run},
        "promote": cached_promote,
    }
    cfg = PipelineConfig.model_validate({"mlflow": {"tracking_uri": uri}})
    reg = run_summary(cfg, {}, manifests, tmp)["registered_model"]
    assert reg["aliases"] == ["champion"]
    assert reg["champion"] == "1"
    assert reg["promotion_reason"] == "promoted by hand with --force"
    assert reg["promoted"] is True and reg["version"] == "1"
