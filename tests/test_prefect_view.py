"""What a user sees of a run in Prefect, read back through the Prefect client from the
session's server: the flow run's name and tags, the stages that came from dpoflow's cache,
and the artifacts every run publishes (a fully cached one included)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from prefect import flow

from dpoflow.tasks.common import build_once, stage_task
from tests.conftest import copy_stages, run_pipeline, worker_fixture

pytestmark = pytest.mark.slow

BETA = "0.3"  # a β no other test of the session trains: its flow runs are this test's
NAME = f"dpo β={BETA} sigmoid"
ARTIFACTS = {"run-summary", "win-rate", "eval-samples", "mlflow-run", "model-version"}


def flow_runs(client, workdir: Path) -> list:
    """This work directory's flow runs named NAME, oldest first."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    found = client.read_flow_runs(
        flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[NAME])),
        sort=FlowRunSort.EXPECTED_START_TIME_ASC,
    )
    return [run for run in found if run.parameters.get("workdir") == str(workdir)]


def artifacts(client, flow_run_id) -> dict:
    """The flow run's artifacts by key (the newest of each)."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    found = client.read_artifacts(
        artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
    )
    return {artifact.key: artifact for artifact in found}


@worker_fixture
def two_runs(tmp_path_factory, cli_env, shared_stages):
    """A run on a copy of the shared stages, then the same run again (fully cached)."""
    workdir = copy_stages(shared_stages, tmp_path_factory.mktemp("prefect-view"))
    summaries = []
    for name in ("first", "again"):
        proc, summary = run_pipeline(workdir, cli_env, f"dpo.beta={BETA}", name=name)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        summaries.append(summary)
    return workdir, summaries


@pytest.fixture(scope="module")
def prefect_client(cli_env):
    from prefect.client.orchestration import SyncPrefectClient

    with SyncPrefectClient(cli_env["PREFECT_API_URL"]) as client:
        yield client


def test_a_flow_run_is_named_and_tagged_after_what_it_trains(two_runs, prefect_client):
    workdir, _ = two_runs
    runs = flow_runs(prefect_client, workdir)
    assert len(runs) == 2, [run.name for run in runs]
    for run in runs:
        assert {f"beta:{BETA}", "loss:sigmoid", "model:embedded:tiny-llama"} <= set(run.tags)


def test_every_run_publishes_its_summary_and_links_cached_or_not(two_runs, prefect_client):
    workdir, (first, again) = two_runs
    assert {s["status"] for s in again["stages"].values()} == {"cached"}
    reg = first["registered_model"]
    runs = flow_runs(prefect_client, workdir)
    for run, expected in zip(runs, ("completed", "cached"), strict=True):
        found = artifacts(prefect_client, run.id)
        assert ARTIFACTS <= set(found), (run.name, sorted(found))
        summary = found["run-summary"].data
        assert summary.startswith(f"# {NAME}")
        assert f"win rate **{first['win_rate']:.3f}**" in summary
        assert f"| dpo | {expected} |" in summary and f"v{reg['version']}" in summary
        assert first["mlflow_run_id"] in found["mlflow-run"].data
        assert f"/#/models/{reg['name']}/versions/{reg['version']}" in found["model-version"].data
        title = found["win-rate"].data.splitlines()[0]
        assert title == f"# Win rate of {NAME}, {reg['name']} v{reg['version']}"
        rows = json.loads(found["eval-samples"].data)
        assert list(rows[0]) == [
            "verdict",
            "policy score",
            "reference score",
            "prompt",
            "policy answer",
            "reference answer",
        ]


@stage_task("demo")
def demo_stage(key: str, workdir: str, section: dict, upstream: dict) -> dict:
    return build_once("demo", key, workdir, section, upstream, lambda partial: {"made": 1})


@flow
def build_twice(workdir: str) -> tuple[str, str, bool]:
    """A stage built, then asked for again past Prefect's cache (as a copied work directory
    or another run's output is found): dpoflow's stage folder answers the second time."""
    params = {"key": "a" * 64, "workdir": workdir, "section": {}, "upstream": {}}
    stage = demo_stage.with_options(result_storage=Path(workdir) / "prefect-results")
    first = stage(**params, return_state=True)
    again = stage.with_options(refresh_cache=True)(**params, return_state=True)
    return first.name, again.name, again.result()["reused"]


def test_a_stage_dpoflow_found_built_is_cached_in_prefect(tmp_path, cli_env):
    """Prefect would call a stage that did nothing "Completed": its state says "Cached"."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: cli_env["PREFECT_API_URL"]}):
        first, again, reused = build_twice(str(tmp_path))
    assert (first, again, reused) == ("Completed", "Cached", True)
