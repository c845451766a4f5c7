"""Real servers on loopback: Prefect and MLflow on PostgreSQL, a deployment, a process worker.

Each run creates fresh PostgreSQL databases and drops them after; the servers and
the worker run in their own process groups and are stopped in teardown. Without
PostgreSQL these tests skip, or fail when DPOFLOW_REQUIRE_SERVERS=1 (as in CI).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from dpoflow.config import apply_overrides, load_config
from dpoflow.tasks.tracking import flatten
from tests.conftest import PROJECT_ROOT, SMALL, copy_stages
from tests.servers import MLFLOW_SERVER_ENV, background, free_port, mlflow_server_command

pytestmark = [pytest.mark.servers, pytest.mark.slow]

PG = {"host": "127.0.0.1", "port": 5432, "user": "postgres", "dbname": "postgres"}
BIN = Path(sys.executable).parent
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def admin_connection():
    """An autocommit connection to PostgreSQL, or a skip (a failure in CI) saying what is needed."""
    import psycopg2

    try:
        conn = psycopg2.connect(connect_timeout=3, **PG)
    except psycopg2.OperationalError as exc:
        message = (
            "needs PostgreSQL at 127.0.0.1:5432 accepting user 'postgres' without a password "
            f"(trust auth) to create test databases; got: {str(exc).strip()[:200]}"
        )
        if os.environ.get("DPOFLOW_REQUIRE_SERVERS") == "1":
            pytest.fail(message + " (DPOFLOW_REQUIRE_SERVERS=1 makes this a failure)")
        pytest.skip(message)
    conn.autocommit = True
    return conn


@contextlib.contextmanager
def fresh_database(purpose: str) -> Iterator[str]:
    """A new, empty database named dpoflow_test_<purpose>_<random>, dropped afterwards."""
    name = f"dpoflow_test_{purpose}_{uuid.uuid4().hex[:8]}"
    conn = admin_connection()
    try:
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
        yield name
    finally:
        with conn.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.close()


def run(cmd: list[str], env: dict[str, str]) -> str:
    proc = subprocess.run(
        cmd, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, f"{cmd}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    return proc.stdout


@pytest.fixture
def servers(tmp_path, cli_env) -> Iterator[dict[str, str]]:
    """Prefect and MLflow servers, each on its own fresh PostgreSQL database."""
    admin_connection().close()  # skip early, before anything starts
    prefect_port, mlflow_port = free_port(), free_port()
    api = f"http://127.0.0.1:{prefect_port}/api"
    mlflow_url = f"http://127.0.0.1:{mlflow_port}"
    env = cli_env | {
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_API_URL": api,
        "MLFLOW_TRACKING_URI": mlflow_url,
        "PREFECT_WORKER_QUERY_SECONDS": "2",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "INFO",
    }
    with contextlib.ExitStack() as stack:
        prefect_db = stack.enter_context(fresh_database("prefect"))
        mlflow_db = stack.enter_context(fresh_database("mlflow"))
        prefect_env = env | {
            "PREFECT_API_DATABASE_CONNECTION_URL": (
                f"postgresql+asyncpg://postgres@127.0.0.1:5432/{prefect_db}"
            ),
        }
        prefect_cmd = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1"]
        prefect_cmd += ["--port", str(prefect_port)]
        backend = f"postgresql+psycopg2://postgres@127.0.0.1:5432/{mlflow_db}"
        mlflow_cmd = mlflow_server_command(mlflow_port, backend, tmp_path / "mlflow-artifacts")
        for cmd, name, cmd_env, ready in [
            (prefect_cmd, "prefect.log", prefect_env, f"{api}/health"),
            (mlflow_cmd, "mlflow.log", env | MLFLOW_SERVER_ENV, f"{mlflow_url}/health"),
        ]:
            stack.enter_context(background(cmd, tmp_path / name, cmd_env, tmp_path, ready))
        yield env


def wait_for_flow_run(api: str, flow_run_id: str, timeout: float = 1200) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        flow_run = httpx.get(f"{api}/flow_runs/{flow_run_id}", timeout=10).json()
        if flow_run["state"]["type"] in TERMINAL:
            return flow_run
        time.sleep(3)
    raise TimeoutError(f"flow run {flow_run_id} did not finish in {timeout:.0f}s")


def test_scheduled_deployment_runs_on_a_worker_and_registers(servers, tmp_path, shared_stages):
    # The session's validate/SFT/reference are the same recipe: the worker reuses them and
    # trains DPO, evaluates and registers on the team's servers.
    copy_stages(shared_stages, tmp_path / "work")
    env, api = servers, servers["PREFECT_API_URL"]
    prefect = str(BIN / "prefect")
    run([prefect, "work-pool", "create", "dpoflow", "--type", "process"], env)
    run([prefect, "--no-prompt", "deploy", "--all", "--prefect-file", "infra/prefect.yaml"], env)

    deployment = httpx.get(f"{api}/deployments/name/dpo-pipeline/nightly", timeout=10).json()
    assert deployment["work_pool_name"] == "dpoflow"
    assert [s["schedule"]["cron"] for s in deployment["schedules"]] == ["0 2 * * *"]
    sweep = httpx.get(f"{api}/deployments/name/dpo-beta-sweep/weekly-beta-sweep", timeout=10)
    assert sweep.status_code == 200 and sweep.json()["schedules"]

    parameters = {"config": apply_overrides({}, SMALL), "workdir": str(tmp_path / "work")}
    flow_run = httpx.post(
        f"{api}/deployments/{deployment['id']}/create_flow_run",
        json={"parameters": parameters},
        timeout=10,
    ).json()
    worker = [prefect, "worker", "start", "--pool", "dpoflow", "--type", "process"]
    with background(worker, tmp_path / "worker.log", env, PROJECT_ROOT):
        finished = wait_for_flow_run(api, flow_run["id"])
    assert finished["state"]["type"] == "COMPLETED", (tmp_path / "worker.log").read_text()[-4000:]

    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    runs = c.search_runs([c.get_experiment_by_name("dpoflow").experiment_id])
    dpo_runs = [r for r in runs if "eval/win_rate" in r.data.metrics]
    assert len(dpo_runs) == 1
    # The deployment trained the recipe `dpoflow run --set SMALL...` trains: its overrides
    # were laid over configs/default.yaml, not over the schema's field defaults.
    expected = flatten("", load_config(None, SMALL).model_dump(mode="json", exclude={"mlflow"}))
    logged = dpo_runs[0].data.params
    assert {k: logged.get(k) for k in expected} == expected
    versions = c.search_model_versions("name='dpoflow-policy'")
    assert [v.run_id for v in versions] == [dpo_runs[0].info.run_id]
    print(
        f"\nflow run {finished['id']} ({finished['name']}): {finished['state']['type']}\n"
        f"MLflow run {dpo_runs[0].info.run_id} on {env['MLFLOW_TRACKING_URI']}: "
        f"win rate {dpo_runs[0].data.metrics['eval/win_rate']:.3f}; "
        f"model dpoflow-policy v{versions[0].version}"
    )
