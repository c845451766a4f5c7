"""Screenshots of what a user sees in the MLflow and Prefect UIs, taken with a real browser.

    .venv/bin/python -m tests.ui_screenshots [--workdir build/ui-screenshots] [--out docs/ui]
        [--betas 0.1,0.5] [--no-build]

Not part of the test suite (it needs Chromium: `apt-get install -y chromium`). It builds a
two-β work directory (`dpoflow sweep --betas 0.1,0.5` on the tests' small settings, into one
MLflow store) while a Prefect server with its UI records the flow runs, then starts `mlflow
server` on that store and takes headless Chromium screenshots of: the MLflow runs table as
the README's link opens it, the compare view of the two β runs, a run's charts, the model
version page, and the Prefect flow runs list, a flow run's artifacts and its win-rate and
samples artifacts.
Every server it starts is stopped when it ends, however it ends. Run again on the same work
directory, it trains only what changed (dpoflow's stage cache), so the pictures follow the
code.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from urllib.parse import quote

from dpoflow.tasks.tracking import ML_VIEW, RUNS_VIEW_PATH
from tests.conftest import PROJECT_ROOT, SMALL
from tests.servers import MLFLOW_SERVER_ENV, background, free_port, mlflow_server_command

BETAS = "0.1,0.5"
# The tests' small settings (quick on a busy machine), with held-out points on the curves.
SETTINGS = [*SMALL, "dpo.eval_every=4"]
WINDOW = "1600,1000"
VENV_BIN = Path(sys.executable).parent


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        sys.exit("error: no chromium on PATH: install it with `apt-get install -y chromium`.")
    return found


def screenshot(browser: str, url: str, out: Path, wait_ms: int = 120000) -> None:
    """One headless Chromium screenshot of `url`: a fresh profile each time, nothing online."""
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic"]
        cmd += ["--no-first-run", "--disable-background-networking", "--disable-sync"]
        cmd += ["--disable-component-update", f"--user-data-dir={profile}"]
        cmd += [f"--window-size={WINDOW}", f"--virtual-time-budget={wait_ms}"]
        # Virtual time runs ahead while the page is idle; the hard stop is for a page that
        # never settles (a poll that never ends).
        cmd += [f"--timeout={2 * wait_ms}", "--hide-scrollbars", f"--screenshot={out}", url]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 or not out.is_file():
        raise RuntimeError(f"chromium failed on {url}: {proc.stderr[-2000:]}")
    print(f"  {out}  <- {url}", flush=True)


def dpoflow_env(prefect_url: str, home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)  # the work directory's own SQLite store
    env.update(
        PREFECT_API_URL=prefect_url,
        PREFECT_HOME=str(home),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        DO_NOT_TRACK="1",
        PATH=os.pathsep.join([str(VENV_BIN), env.get("PATH", "")]),
    )
    return env


def build_workdir(workdir: Path, env: dict[str, str], betas: str) -> dict:
    """`dpoflow sweep` over `betas`; returns its summary."""
    summary = workdir / "sweep.json"
    cmd = [str(VENV_BIN / "dpoflow"), "sweep", "--betas", betas, "--workdir", str(workdir)]
    cmd += ["--summary-json", str(summary)]
    for item in SETTINGS:
        cmd += ["--set", item]
    print(f"building the work directory: {' '.join(cmd)}", flush=True)
    started = time.monotonic()
    proc = subprocess.run(cmd, cwd=PROJECT_ROOT, env=env)
    if proc.returncode != 0:
        sys.exit(f"error: the sweep failed (exit {proc.returncode}); its output is above.")
    print(f"built in {time.monotonic() - started:.0f} s", flush=True)
    return json.loads(summary.read_text())


def mlflow_pages(workdir: Path) -> dict[str, str]:
    """{file name: MLflow UI path} for the pages a user opens first, found in the store: the
    newest DPO run of each β, the newest registered version."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("dpoflow").experiment_id
    found = client.search_runs(
        [experiment], "tags.`dpoflow.stage` = 'dpo'", order_by=["attributes.start_time DESC"]
    )
    newest = {}
    for run in found:
        beta = run.data.params.get("dpo.beta", run.data.params.get("beta"))
        if run.info.status == "FINISHED" and beta is not None:
            newest.setdefault(beta, run.info.run_id)
    runs = list(newest.values())[:2]
    model = client.search_registered_models()[0]
    version = max(int(v.version) for v in client.search_model_versions(f"name='{model.name}'"))
    compare = quote(json.dumps(runs, separators=(",", ":")))
    return {
        # As the README's link opens it. A fresh browser's GenAI/ML switch is on GenAI: every
        # page is opened with the switch on Machine learning, as dpoflow's links set it.
        "mlflow-runs.png": "/" + RUNS_VIEW_PATH.format(id=experiment),
        "mlflow-compare.png": f"/#/compare-runs?runs={compare}&experiments="
        + quote(json.dumps([experiment]))
        + f"&{ML_VIEW}",
        "mlflow-run-charts.png": f"/#/experiments/{experiment}/runs/{runs[0]}/model-metrics"
        f"?{ML_VIEW}",
        "mlflow-model-version.png": f"/#/models/{model.name}/versions/{version}?{ML_VIEW}",
    }


def prefect_pages(prefect_url: str) -> dict[str, str]:
    """{file name: Prefect UI path}: the runs list, the newest finished β run and three of its
    artifacts."""
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
    from prefect.client.schemas.sorting import FlowRunSort

    with SyncPrefectClient(prefect_url) as client:
        runs = client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=50)
        # The Prefect home is the work directory's own: every run in it is one of ours.
        child = next(r for r in runs if r.name.startswith("dpo β=") and r.state.is_completed())
        where = ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[child.id]))
        artifacts = {a.key: a.id for a in client.read_artifacts(artifact_filter=where)}
    return {
        "prefect-runs.png": "/runs",
        # Prefect 3.9's V1 pages open a flow run on Logs whatever `tab` says; V2's honour it.
        "prefect-flow-run.png": f"/v2/runs/flow-run/{child.id}?tab=Artifacts",
        "prefect-run-summary.png": f"/artifacts/artifact/{artifacts['run-summary']}",
        "prefect-win-rate.png": f"/artifacts/artifact/{artifacts['win-rate']}",
        "prefect-eval-samples.png": f"/artifacts/artifact/{artifacts['eval-samples']}",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=PROJECT_ROOT / "build/ui-screenshots")
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "docs/ui")
    parser.add_argument(
        "--betas", default=BETAS, help="the βs to (re)build; the store keeps the others' runs"
    )
    parser.add_argument(
        "--no-build", action="store_true", help="photograph the work directory as it is"
    )
    args = parser.parse_args()
    browser = chromium()
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    home = workdir / "prefect-home"  # kept: the flow runs of earlier builds stay listed
    home.mkdir(exist_ok=True)
    with ExitStack() as servers:
        port = free_port()
        prefect_url = f"http://127.0.0.1:{port}"
        # The UI asks the server where its API is; without this it answers port 4200.
        env = dpoflow_env(f"{prefect_url}/api", home) | {"PREFECT_UI_API_URL": f"{prefect_url}/api"}
        cmd = [str(VENV_BIN / "prefect"), "server", "start", "--host", "127.0.0.1"]
        cmd += ["--port", str(port), "--analytics-off"]  # with services: task runs are recorded
        print(f"starting the Prefect server and UI at {prefect_url}", flush=True)
        servers.enter_context(
            background(cmd, workdir / "prefect-ui.log", env, workdir, f"{prefect_url}/api/health")
        )
        if not args.no_build:
            build_workdir(workdir, env, args.betas)
        # Port 5000 when it is free: the links in the Prefect artifacts point there.
        mlflow_port = 5000 if port_free(5000) else free_port()
        mlflow_url = f"http://127.0.0.1:{mlflow_port}"
        cmd = mlflow_server_command(mlflow_port, f"sqlite:///{workdir / 'mlflow.db'}", None)
        print(f"starting the MLflow server at {mlflow_url}", flush=True)
        ui_env = env | MLFLOW_SERVER_ENV  # only the UI is needed, not MLflow's job workers
        servers.enter_context(
            background(cmd, workdir / "mlflow-ui.log", ui_env, workdir, f"{mlflow_url}/health")
        )
        print(f"screenshots into {args.out}:", flush=True)
        for name, path in mlflow_pages(workdir).items():
            screenshot(browser, mlflow_url + path, args.out / name)
        for name, path in prefect_pages(f"{prefect_url}/api").items():
            screenshot(browser, prefect_url + path, args.out / name)
    print("servers stopped", flush=True)


def port_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


if __name__ == "__main__":
    main()
