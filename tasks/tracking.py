"""MLflow: where runs go, and the small helpers the stage tasks share."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from dpoflow.errors import ServerError

T = TypeVar("T")


def tracking_uri(configured: str | None, workdir: str | Path) -> str:
    """The config's URI, else $MLFLOW_TRACKING_URI, else a SQLite store in the work directory."""
    if configured:
        return configured
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path(workdir).resolve() / 'mlflow.db'}"


def require_server(uri: str, *, timeout: float = 5.0) -> None:
    """Fail fast, with the fix, when an HTTP tracking server does not answer its health check."""
    if not uri.startswith(("http://", "https://")):
        return
    import httpx

    try:
        httpx.get(f"{uri.rstrip('/')}/health", timeout=timeout).raise_for_status()
    except httpx.HTTPError as exc:
        raise ServerError(
            f"MLflow at {uri} cannot be reached ({exc.__class__.__name__}): start the server "
            "or fix MLFLOW_TRACKING_URI / mlflow.tracking_uri."
        ) from exc


# How MLflow's message reads when the server gave no answer at all (refused, dropped, slow),
# as opposed to an answer that is an error (500 after retries, 403): that one is a ServerError
# with MLflow's code (`registry_lookup`).
NO_ANSWER = (
    "failed to establish",
    "connection refused",
    "connection aborted",
    "remotedisconnected",
    "timed out",
    "timeout",
)


def unreachable(exc: Exception) -> bool:
    """An MLflow failure that says the server did not answer (not that it answered badly)."""
    text = str(exc).lower()
    return any(sign in text for sign in NO_ANSWER)


@contextmanager
def server_errors(uri: str, doing: str, keep_note: str = "") -> Iterator[None]:
    """Turn "cannot reach the tracking server" into one clear, retryable ServerError; a
    ServerError raised inside (a registry failure) gets `keep_note` too."""
    import requests
    from mlflow.exceptions import MlflowException

    try:
        yield
    except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
        reason = type(exc).__name__
    except MlflowException as exc:
        if not unreachable(exc):
            raise
        reason = "no answer to its API requests"  # MLflow's own message is a long URL dump
    except ServerError as exc:
        if not keep_note:
            raise
        raise ServerError(f"{str(exc).rstrip('.')}{keep_note}.") from exc
    else:
        return
    raise ServerError(
        f"MLflow at {uri} could not be reached while {doing} ({reason}): start the server or "
        f"fix MLFLOW_TRACKING_URI / mlflow.tracking_uri{keep_note}."
    )


# What MLflow answers when a registry look-up finds nothing, on a SQLite store and over HTTP
# alike (checked against MLflow 3.17): a missing version or model is RESOURCE_DOES_NOT_EXIST,
# a missing alias (and a version that is not a number) INVALID_PARAMETER_VALUE. Anything else
# (INTERNAL_ERROR for a 500 or a dropped connection, PERMISSION_DENIED for a 403, ...) is the
# server failing, never "absent": read as absent it would skip the head-to-head and move
# `champion`, or register a duplicate version.
NOT_FOUND = frozenset({"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"})


def registry_lookup(
    call: Callable[[], T], doing: str, *, absent: frozenset[str] = NOT_FOUND
) -> T | None:
    """`call()`, or None when MLflow answers with one of the `absent` codes; any other MLflow
    failure is a ServerError (retryable), so a server in trouble is never taken for absence."""
    from mlflow.exceptions import MlflowException

    try:
        return call()
    except MlflowException as exc:
        if exc.error_code in absent:
            return None
        if unreachable(exc):
            raise  # no answer at all: `server_errors` names the server and the fix
        # The code, not MLflow's message: that one dumps the URL and the response body.
        raise ServerError(
            f"the MLflow registry failed while {doing} ({exc.error_code}): check that the "
            "tracking server is up and that your credentials may use its model registry, "
            "then run again."
        ) from exc


def client(uri: str):
    """An MlflowClient for `uri`, with the experiment artifact root in the workdir for SQLite."""
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(uri)
    return MlflowClient(tracking_uri=uri)


# The experiment holds training runs, not GenAI traces. MLflow 3.17's UI does not read this tag
# to pick its pages (the browser's remembered GenAI / Machine learning switch does, GenAI in a
# fresh browser): the runs view's link, RUNS_VIEW_PATH, carries ML_VIEW, which sets the switch.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
ML_VIEW = "workflowType=machine_learning"
# A runs-table view stored on the experiment (what the UI's "Share" button stores): the
# columns a person compares runs by. MLflow keeps no per-experiment default columns, so this
# view opens from RUNS_VIEW_PATH (README); the plain runs page shows MLflow's defaults. The
# UI shows the columns in `columnOrder` first (β, loss type and the results fit a laptop's
# screen beside the run names), and applies widths only to columns listed there.
RUNS_VIEW_KEY = "dpoflow-runs"
RUNS_VIEW_COLUMNS = (
    "params.`dpo.beta`",
    "params.`dpo.loss_type`",
    "metrics.`eval/win_rate`",
    "metrics.`eval/kl`",
    "attributes.`Description`",
    "attributes.`Dataset`",
    "attributes.`Models`",
)
RUNS_VIEW_WIDTHS = {"attributes.`Description`": 240, "attributes.`Dataset`": 160}
RUNS_VIEW_SORT = "metrics.`eval/win_rate`"
RUNS_VIEW_PATH = f"#/experiments/{{id}}/runs?viewStateShareKey={RUNS_VIEW_KEY}&{ML_VIEW}"


def experiment_tags() -> dict[str, str]:
    """The experiment's kind and its stored runs view."""
    import json

    columns = list(RUNS_VIEW_COLUMNS)
    view = {
        "selectedColumns": columns,
        "columnOrder": columns,
        "columnWidths": RUNS_VIEW_WIDTHS,
        # Best first. Sorted by anything but date, MLflow also lists nested runs (a sweep's β
        # runs) beside their parent instead of folded under it; a shared view cannot unfold them.
        "orderByKey": RUNS_VIEW_SORT,
        "orderByAsc": False,
    }
    return EXPERIMENT_KIND | {f"mlflow.sharedViewState.{RUNS_VIEW_KEY}": json.dumps(view)}


def experiment_id(uri: str, name: str, workdir: str | Path) -> str:
    """The id of experiment `name`, created (with its kind and runs view) when missing."""
    import mlflow

    c = client(uri)
    try:
        experiment = c.get_experiment_by_name(name)
    except mlflow.exceptions.MlflowException as exc:
        raise ServerError(
            f"MLflow at {uri} cannot be reached ({str(exc).splitlines()[0][:120]}): start the "
            "server or fix MLFLOW_TRACKING_URI / mlflow.tracking_uri."
        ) from exc
    if experiment is not None:
        # An experiment made before these tags existed gets them once.
        for key, value in experiment_tags().items():
            if experiment.tags.get(key) != value:
                c.set_experiment_tag(experiment.experiment_id, key, value)
        return experiment.experiment_id
    location = None
    if uri.startswith("sqlite:"):  # keep artifacts beside the SQLite store, not in ./mlruns
        location = (Path(workdir).resolve() / "mlartifacts").as_uri()
    return c.create_experiment(name, artifact_location=location, tags=experiment_tags())


def sft_experiment(name: str) -> str:
    """The SFT runs' experiment: their losses (up to ~6) would flatten the DPO curves."""
    return f"{name}-sft"


def start_or_resume_run(
    uri: str, experiment: str, workdir: str | Path, run_file: Path, *, name: str, tags: dict
) -> str:
    """Create a run, or reuse the one an interrupted attempt recorded in `run_file`."""
    c = client(uri)
    if run_file.is_file():
        return run_file.read_text().strip()
    run = c.create_run(experiment_id(uri, experiment, workdir), run_name=name, tags=tags)
    run_file.write_text(run.info.run_id)
    return run.info.run_id


def flatten(prefix: str, section: dict[str, Any]) -> dict[str, str]:
    """{"dpo": {"beta": 0.1}} -> {"dpo.beta": "0.1"} for MLflow params."""
    out: dict[str, str] = {}
    for key, value in section.items():
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict) and value:
            out.update(flatten(name, value))
        else:
            out[name] = str(value)
    return out


def log_params(uri: str, run_id: str, params: dict[str, str]) -> None:
    from mlflow.entities import Param

    c = client(uri)
    existing = c.get_run(run_id).data.params
    fresh = [Param(k, v[:6000]) for k, v in params.items() if k not in existing]
    for i in range(0, len(fresh), 100):
        c.log_batch(run_id, params=fresh[i : i + 100])


def last_logged_step(uri: str, run_id: str, metric: str = "loss") -> int:
    """The highest step of `metric` the run holds (0 for none): where logging goes on from."""
    return max((m.step for m in client(uri).get_metric_history(run_id, metric)), default=0)


def log_metric_rows(uri: str, run_id: str, rows: list[dict], prefix: str = "") -> None:
    """Log training-metric rows ({"step": n, name: value, ...}) as MLflow metrics."""
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [
        Metric(prefix + name, float(value), now, int(row["step"]))
        for row in rows
        for name, value in row.items()
        if name != "step"
    ]
    c = client(uri)
    for i in range(0, len(metrics), 500):
        c.log_batch(run_id, metrics=metrics[i : i + 500])
