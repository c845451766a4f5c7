"""The sweep report on a local MLflow store: a Prefect artifact that cannot be published is
skipped with a warning that names it, never silently, and never fails the sweep."""

from __future__ import annotations

import logging
from pathlib import Path

import mlflow
import prefect.artifacts
import pytest

from dpoflow.tasks import sweep_report
from tests.test_sweep import child_summary


@pytest.fixture
def parent_run(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.create_experiment("sweep", artifact_location=(tmp_path / "a").as_uri())
    run_id = mlflow.MlflowClient(uri).create_run(experiment).info.run_id
    yield uri, run_id
    mlflow.set_tracking_uri(None)


def test_a_table_artifact_that_fails_is_skipped_with_a_warning(
    parent_run, tmp_path, monkeypatch, caplog
):
    uri, run_id = parent_run

    def refuse(**_):
        raise RuntimeError("Prefect API answered 503")

    monkeypatch.setattr(sweep_report, "in_prefect_run", lambda: True)
    monkeypatch.setattr(prefect.artifacts, "create_table_artifact", refuse)
    c = mlflow.MlflowClient(uri)
    experiment = c.get_run(run_id).info.experiment_id
    summaries = [
        child_summary(beta, "sigmoid", 1.0 / beta, 0.5)
        | {"mlflow_run_id": c.create_run(experiment).info.run_id}
        for beta in (0.1, 0.5)
    ]
    with caplog.at_level(logging.WARNING, logger="dpoflow"):
        report = sweep_report.report(uri, run_id, summaries, tmp_path / "sweeps")

    assert [row["beta"] for row in report["rows"]] == [0.1, 0.5]  # the sweep goes on
    for child in summaries:  # each β's run carries the frontier too
        logged = c.list_artifacts(child["mlflow_run_id"], "sweep")
        assert [a.path for a in logged] == ["sweep/frontier.png"]
    warnings = [r.getMessage() for r in caplog.records if r.name == "dpoflow"]
    assert warnings == [
        "the beta-sweep table artifact was not published (Prefect API answered 503)"
    ]


def test_the_validation_and_evaluation_artifacts_fail_with_a_warning_too(monkeypatch, caplog):
    """The validate stage and the pipeline's run view publish their artifacts the same way: a
    failure is a warning naming the artifact, and the run goes on."""
    from types import SimpleNamespace

    from dpoflow.config import load_config
    from dpoflow.flows.run_view import publish_run_view
    from dpoflow.tasks import validate

    def refuse(**_):
        raise RuntimeError("Prefect API answered 503")

    monkeypatch.setattr(validate, "in_prefect_run", lambda: True)
    monkeypatch.setattr(prefect.artifacts, "create_table_artifact", refuse)
    monkeypatch.setattr(prefect.artifacts, "create_markdown_artifact", refuse)
    report = SimpleNamespace(outcomes=[], n_rows=3)
    with caplog.at_level(logging.WARNING, logger="dpoflow"):
        validate.publish_report(report, "prefs.jsonl")
        stages = {"validate": {"status": "cached", "seconds": 0.1}}
        publish_run_view(load_config(), Path("."), stages, {}, None, until="validate")
    warnings = [r.getMessage() for r in caplog.records if r.name == "dpoflow"]
    assert warnings == [
        "the data-validation artifact was not published (Prefect API answered 503)",
        "the run-summary artifact was not published (Prefect API answered 503)",
    ]
