"""The real flow, end to end, through the CLI: real Prefect, real MLflow, real launcher."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from tests.conftest import copy_stages, run_cli, run_pipeline, worker_fixture

pytestmark = pytest.mark.slow

STAGES = ["validate", "sft", "reference", "dpo", "evaluate", "register", "promote"]
# On top of the small config: enough DPO and enough judged prompts that the policy's win
# rate against the reference has its 95% lower bound above 0.5 (seen: 0.812, 0.700-0.889).
MOVES = ["dpo.max_steps=40", "dpo.learning_rate=2e-3", "eval.num_prompts=64"]


@worker_fixture
def first_run(tmp_path_factory, cli_env, shared_stages):
    """The first full run of a work directory whose validate, sft and reference were built
    by the session's first run (`shared_stages`), on the session's Prefect server."""
    workdir = copy_stages(shared_stages, tmp_path_factory.mktemp("pipeline"))
    # The shared SFT run too, so the DPO run links to it in one store, as in a user's.
    shutil.copy(shared_stages[0] / "mlflow.db", workdir / "mlflow.db")
    proc, summary = run_pipeline(workdir, cli_env, *MOVES, name="first")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (workdir / "console.log").write_text(proc.stdout + proc.stderr)
    return workdir, summary


def test_first_run_completes_every_stage(first_run, shared_stages):
    _, summary = first_run
    _, shared = shared_stages
    assert list(summary["stages"]) == STAGES
    assert list(shared["stages"]) == STAGES[:3] and shared["stopped_after"] == "reference"
    assert {s["status"] for s in shared["stages"].values()} == {"completed"}
    assert shared["stages"]["sft"]["resumed_from_step"] == 0
    status = {name: s["status"] for name, s in summary["stages"].items()}
    # MOVES trains 40 DPO steps where the shared run planned 12: the reference stage scores
    # only the pairs training reads, so it runs again for the longer run; validate and SFT
    # are reused.
    assert status == dict.fromkeys(STAGES[:2], "cached") | dict.fromkeys(STAGES[2:], "completed")
    low, high = summary["win_rate_ci"]
    assert 0.5 < low <= summary["win_rate"] <= high <= 1.0  # DPO moved the policy
    assert math.isfinite(summary["kl"]) and summary["kl"] > 0
    assert summary["reward_policy"] > summary["reward_reference"]
    reg = summary["registered_model"]
    # The promotion gate: with no champion yet, the interval against the reference decides.
    assert reg["promoted"] == (low > 0.5)
    assert reg["aliases"] == (["candidate", "champion"] if low > 0.5 else ["candidate"])
    assert reg["promotion_reason"]


def test_mlflow_says_nothing_at_info_on_the_console(first_run):
    """mlflow's INFO lines (its system-metrics monitor starting and stopping around every
    training stage, its database set-up) stay off the console the stages report on."""
    workdir, _ = first_run
    console = (workdir / "console.log").read_text()
    assert "dpoflow run" in console  # the run's whole output: its summary table is there
    assert not [line for line in console.splitlines() if " INFO mlflow." in line]


def test_mlflow_holds_metrics_params_and_registered_version(first_run):
    import mlflow
    from mlflow.tracking import MlflowClient

    workdir, summary = first_run
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    run = client.get_run(summary["mlflow_run_id"])
    assert run.data.params["dpo.beta"] == "0.1"
    for name in [
        "loss",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "eval/win_rate",
        "eval/kl",
    ]:
        assert name in run.data.metrics, name
    history = client.get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, 41))  # every DPO step (MOVES)
    reg = summary["registered_model"]
    version = client.get_model_version(reg["name"], reg["version"])
    assert version.run_id == run.info.run_id
    assert "candidate" in version.aliases
    assert version.tags["beta"] == "0.1"
    assert version.tags["data_sha256"]
    assert abs(float(version.tags["win_rate"]) - summary["win_rate"]) < 1e-3
    # The served model renders requests as training rendered prompts (data.chat_template).
    mlflow.set_tracking_uri(client.tracking_uri)
    try:
        logged = mlflow.models.get_model_info(f"models:/{reg['name']}/{reg['version']}")
    finally:
        mlflow.set_tracking_uri(None)
    assert logged.flavors["python_function"]["config"] == {"chat_template": "auto"}


def test_mlflow_shows_what_a_user_looks_for(first_run):
    """What a person opening MLflow on the run sees: its kind and columns, one name per
    param, a description with the result, source, datasets, curves, the SFT run linked both
    ways, and a model version that explains itself."""
    import json as _json

    from mlflow.tracking import MlflowClient

    workdir, summary = first_run
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    run = client.get_run(summary["mlflow_run_id"])
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    view = _json.loads(experiment.tags["mlflow.sharedViewState.dpoflow-runs"])
    assert {"params.`dpo.beta`", "metrics.`eval/win_rate`"} <= set(view["selectedColumns"])
    # The UI shows the ordered columns first: β and the loss type lead, where a screen shows them.
    assert view["columnOrder"][:2] == ["params.`dpo.beta`", "params.`dpo.loss_type`"]
    assert (view["orderByKey"], view["orderByAsc"]) == ("metrics.`eval/win_rate`", False)

    params = run.data.params
    assert params["dpo.beta"] == "0.1" and params["dpo.loss_type"] == "sigmoid"
    assert "beta" not in params and "loss_type" not in params  # each value once
    assert run.info.run_name == "dpo-sigmoid-beta0.1"
    note = run.data.tags["mlflow.note.content"]
    assert f"win rate {summary['win_rate']:.3f}" in note and "KL" in note
    assert run.data.tags["mlflow.source.name"] == "dpoflow dpo" and run.data.tags["mlflow.user"]
    assert "eval/win_rate" in run.data.metrics
    assert not [m for m in run.data.metrics if "unparseable" in m]  # VADER always decides

    inputs = {i.dataset.name: i for i in run.inputs.dataset_inputs}
    contexts = {i.tags[0].value: _json.loads(i.dataset.profile) for i in inputs.values()}
    assert contexts["training"]["num_rows"] > 0 and contexts["evaluation"]["num_rows"] > 0
    assert all(i.dataset.digest for i in inputs.values())

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "training_curves.png" in artifacts
    page = {a.path for a in client.list_artifacts(run.info.run_id, "validation")}
    assert "validation/summary.html" in page

    sft = client.get_run(run.data.tags["dpoflow.sft_run_id"])
    assert client.get_experiment(sft.info.experiment_id).name == "dpoflow-sft"
    assert sft.data.tags[f"dpoflow.dpo_run.{run.info.run_id}"].endswith(run.info.run_id)
    assert run.data.tags["dpoflow.sft_run_link"].endswith(sft.info.run_id)
    assert run.info.run_name in sft.data.tags["mlflow.note.content"]

    reg = summary["registered_model"]
    version = client.get_model_version(reg["name"], reg["version"])
    assert "β=0.1" in version.description and "sigmoid" in version.description
    assert version.tags["win_rate"][:4] in version.description
    assert reg["promotion_reason"] in version.description  # the reason in full


def test_second_run_is_entirely_cached(first_run, cli_env):
    workdir, first = first_run
    proc, summary = run_pipeline(workdir, cli_env, *MOVES, name="second")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {s["status"] for s in summary["stages"].values()} == {"cached"}
    assert summary["win_rate"] == first["win_rate"]
    assert summary["registered_model"]["version"] == first["registered_model"]["version"]
    assert summary["mlflow_run_id"] == first["mlflow_run_id"]


def test_changing_beta_reruns_only_what_depends_on_it(first_run, cli_env):
    workdir, first = first_run
    proc, summary = run_pipeline(workdir, cli_env, *MOVES, "dpo.beta=0.2", name="beta")
    assert proc.returncode == 0, proc.stderr[-3000:]
    status = {name: s["status"] for name, s in summary["stages"].items()}
    assert status == {
        "validate": "cached",
        "sft": "cached",
        "reference": "cached",
        "dpo": "completed",
        "evaluate": "completed",
        "register": "completed",
        "promote": "completed",
    }
    assert summary["mlflow_run_id"] != first["mlflow_run_id"]
    assert int(summary["registered_model"]["version"]) > int(first["registered_model"]["version"])


def test_empty_chosen_fails_validation_before_training(tmp_path, cli_env):
    from dpoflow.tasks.sources import ensure_embedded_data

    pairs = (ensure_embedded_data(tmp_path / "src") / "train.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in pairs[:300]]
    rows[7]["chosen"] = ""
    data = tmp_path / "bad.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    workdir = tmp_path / "work"

    proc, _ = run_pipeline(workdir, cli_env, f"data.train={data}")

    assert proc.returncode == 1
    message = proc.stderr
    assert "chosen" in message and "rows 7" in message
    assert "expect_column_value_lengths_to_be_between" in message
    assert "Traceback" not in message  # one sentence, no stack
    assert not list((workdir / "stages").rglob("manifest.json"))  # nothing looks finished
    assert not (workdir / "stages" / "sft").exists()  # no training started
    assert not list(workdir.rglob("MLmodel"))  # nothing logged or registered


def test_models_lists_versions_and_promote_names_unknown_versions(first_run, cli_env):
    workdir, summary = first_run
    proc = run_cli(["models", "--workdir", str(workdir)], cli_env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "dpoflow-policy" in proc.stdout and "candidate" in proc.stdout

    proc = run_cli(["promote", "dpoflow-policy", "99", "--workdir", str(workdir)], cli_env)
    assert proc.returncode == 1
    assert "has no version '99'" in proc.stderr and "Traceback" not in proc.stderr

    proc = run_cli(["models", "--set", "mlflow.tracking_uri=http://127.0.0.1:9"], cli_env)
    assert proc.returncode == 1 and "cannot be reached" in proc.stderr


@pytest.mark.parametrize("sample", ["hh_sample.jsonl", "ultrafeedback_sample.jsonl"])
def test_hh_and_ultrafeedback_shapes_train_through_the_pipeline(tmp_path, cli_env, sample):
    data = Path(__file__).parent / "data" / sample
    proc, summary = run_pipeline(
        tmp_path,
        cli_env,
        f"data.train={data}",
        "data.min_rows=10",
        # UltraFeedback's answers are long for the tiny model's 64-token rows (40% are cut):
        # the truncation check's limit is raised here; its own tests are test_chat_template's.
        "data.max_truncated_share=0.5",
        "sft.max_steps=6",
        "dpo.max_steps=4",
        "sft.batch_size=8",
        "dpo.batch_size=8",
        "eval.num_prompts=8",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {s["status"] for s in summary["stages"].values()} == {"completed"}
    pairs = next((tmp_path / "stages" / "validate").glob("*/pairs.jsonl")).read_text()
    first = json.loads(pairs.splitlines()[0])
    assert first["prompt"] and first["chosen"] and first["rejected"]
    assert first["chosen"] != first["rejected"]


def test_no_secret_reaches_any_output(first_run, cli_env):
    """Fake API keys and hub tokens are in the environment of every run, and the LLM judge
    really reads one (`eval.llm.api_key_env`) and sends it to a loopback endpoint: none may
    appear in MLflow (params, tags, artifacts: all in the work directory), in Prefect's
    database and results, or in the console."""
    from tests.conftest import FAKE_SECRETS
    from tests.test_llm_judge import ChatServer

    workdir, _ = first_run
    with ChatServer() as judge:
        llm = ["eval.judge=llm", f"eval.llm.base_url={judge.base_url}", "eval.llm.model=judge"]
        llm += ["eval.llm.api_key_env=DPOFLOW_JUDGE_API_KEY"]
        proc, summary = run_pipeline(workdir, cli_env, *MOVES, *llm, name="llm", until="evaluate")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert summary["stages"]["evaluate"]["status"] == "completed"  # judged by the LLM judge
    key = FAKE_SECRETS["DPOFLOW_JUDGE_API_KEY"]
    assert judge.requests > 0 and set(judge.auth) == {f"Bearer {key}"}  # read and sent
    places = [workdir, Path(cli_env["PREFECT_HOME"])]
    files = [f for place in places for f in place.rglob("*") if f.is_file()]
    assert any(f.name == "mlflow.db" for f in files) and any(f.suffix == ".db" for f in files)
    outputs = [(file, file.read_bytes()) for file in files]
    outputs.append((Path("console"), (proc.stdout + proc.stderr).encode()))
    for where, content in outputs:
        for name, secret in FAKE_SECRETS.items():
            assert secret.encode() not in content, f"{name} leaked into {where}"
