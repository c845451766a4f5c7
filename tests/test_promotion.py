"""The promotion gate: the pure rule, then the registry side on a local MLflow store."""

from __future__ import annotations

import mlflow
import pytest

from flows.errors import ModelError
from models.evaluation import win_rate_from_verdicts
from models.promotion import decide
from models.serving import log_generator
from tasks.registry import CHAMPION, list_versions, promote_version
from tests.test_evaluation import save_tiny_model

MODEL = "gate-test"
EVAL = {
    "judge": "vader",
    "max_new_tokens": 8,
    "temperature": 1.0,
    "top_p": 1.0,
    "batch_size": 32,
    "seed": 0,
}
PROMPTS = [f"review {i}: this movie was" for i in range(24)]


def h2h(wins: int, ties: int, losses: int):
    return win_rate_from_verdicts(["win"] * wins + ["tie"] * ties + ["loss"] * losses)


def test_first_version_is_decided_by_the_reference_check_alone():
    assert decide((0.55, 0.8), None).promote
    refused = decide((0.45, 0.8), None)
    assert not refused.promote and "vs reference" in refused.reason


def test_head_to_head_needs_its_lower_bound_above_one_half():
    # 15 of 24 is a point estimate of 0.625, but its interval reaches below 0.5.
    refused = decide((0.6, 0.9), h2h(15, 0, 9), champion="v1")
    assert not refused.promote
    assert "vs champion v1" in refused.reason and "not above 0.5" in refused.reason
    assert decide((0.6, 0.9), h2h(22, 0, 2), champion="v1").promote


def test_a_weak_candidate_never_reaches_the_head_to_head():
    assert "vs reference" in decide((0.3, 0.6), h2h(24, 0, 0), champion="v1").reason


@pytest.fixture
def registry_uri(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.create_experiment("gate", artifact_location=(tmp_path / "a").as_uri())
    model_dir = save_tiny_model(tmp_path / "policy")

    def register(win_rate_ci: str) -> str:
        with mlflow.start_run(experiment_id=experiment):
            info = log_generator(str(model_dir))
        tags = {"win_rate_ci": win_rate_ci, "win_rate": "0.7"}
        version = mlflow.register_model(info.model_uri, MODEL, tags=tags).version
        mlflow.MlflowClient().set_registered_model_alias(MODEL, "candidate", version)
        return str(version)

    yield uri, register
    mlflow.set_tracking_uri(None)


def aliases(uri: str) -> dict[str, list[str]]:
    return {row["version"]: row["aliases"] for row in list_versions(mlflow.MlflowClient(uri))}


def test_a_copy_of_the_champion_stays_candidate(registry_uri, capsys):
    uri, register = registry_uri
    first = register("[0.6, 0.8]")
    outcome = promote_version(uri, MODEL, first, PROMPTS, EVAL)
    assert outcome["promoted"] and outcome["aliases"] == ["candidate", CHAMPION]

    second = register("[0.6, 0.8]")  # the very same policy, registered again
    before = aliases(uri)
    outcome = promote_version(uri, MODEL, second, PROMPTS, EVAL)
    after = aliases(uri)
    reason = mlflow.MlflowClient(uri).get_model_version(MODEL, second).tags["promotion.reason"]
    with capsys.disabled():
        print(f"\naliases before {before}\naliases after  {after}\nreason: {reason}")

    assert not outcome["promoted"]
    assert before == after == {first: [CHAMPION], second: ["candidate"]}
    assert "head-to-head win rate vs champion v1" in reason and "not above 0.5" in reason


def test_force_skips_the_checks_and_unknown_versions_are_named(registry_uri):
    uri, register = registry_uri
    version = register("[0.1, 0.3]")
    assert not promote_version(uri, MODEL, version, PROMPTS, EVAL)["promoted"]
    assert promote_version(uri, MODEL, version, [], EVAL, force=True)["promoted"]
    with pytest.raises(ModelError, match="no version '9'.*dpoflow models"):
        promote_version(uri, MODEL, "9", PROMPTS, EVAL)
