"""Shared fixtures: an isolated environment for running the real `dpoflow` command."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from _pytest.nodes import coerce_node_id
from filelock import FileLock

from tests.servers import background, free_port

PROJECT_ROOT = Path(__file__).resolve().parents[1]

# `make test` runs the suite on several pytest-xdist workers: each worker's processes get their
# share of the cores, as the launcher shares them between training processes, instead of every
# worker's torch taking all cores and thrashing.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
THREADS = str(max(1, (os.cpu_count() or 1) // WORKERS))
if WORKERS > 1:  # this worker's own torch too (set before any test module imports torch)
    os.environ.setdefault("OMP_NUM_THREADS", THREADS)

# A few steps of everything: enough to exercise every stage, quick on 2 cores.
SMALL = [
    "sft.max_steps=30",
    "sft.checkpoint_every=10",
    "dpo.max_steps=12",
    "dpo.checkpoint_every=4",
    "eval.num_prompts=24",
    "eval.max_new_tokens=16",
    "eval.temperatures=null",
]


# Short retry delays (the product's default is 5, 20, 60 s): retry tests still see the backoff.
RETRY_DELAYS = [2.0, 3.0]

FAKE_SECRETS = {
    "HF_TOKEN": "hf_FAKEdpoflowSECRET0001",
    "OPENAI_API_KEY": "sk-FAKEdpoflowSECRET0002",
    "DPOFLOW_JUDGE_API_KEY": "FAKEdpoflowSECRET0003",
}


def require_peer(module: str):
    """Import a peer the parity tests compare against (TRL). Missing, it skips the test; with
    DPOFLOW_REQUIRE_PEERS=1 (set by `make test`, so by CI) a missing peer is a failure."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        message = f"the parity test needs {module} (the dev extra: pip install -e '.[dev]'): {exc}"
        if os.environ.get("DPOFLOW_REQUIRE_PEERS") == "1":
            pytest.fail(message + " (DPOFLOW_REQUIRE_PEERS=1 makes this a failure)")
        pytest.skip(message)


def base_env(home: Path) -> dict[str, str]:
    """Environment for child `dpoflow` processes: Prefect home `home`, offline, no telemetry,
    no Prefect server named (each run would start a temporary one)."""
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    # Tools started by name (`mlflow models serve` runs `uvicorn`) come from this venv,
    # activated or not, as `make test` runs it.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.pop("PREFECT_API_URL", None)
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_LOGGING_LEVEL="WARNING",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        DO_NOT_TRACK="1",
        COLUMNS="200",  # rich wraps tables at 80 columns without a terminal
        GX_ANALYTICS_ENABLED="false",
        DPOFLOW_RETRY_DELAYS=",".join(map(str, RETRY_DELAYS)),
        DPOFLOW_THREADS=THREADS,
        OMP_NUM_THREADS=THREADS,
        # Recognisable fake secrets: test_secrets scans every output for them.
        **FAKE_SECRETS,
    )
    return env


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory) -> Iterator[tuple[str, Path]]:
    """One real Prefect server for the whole session, on loopback (API only, SQLite): every
    `dpoflow` the tests start talks to it instead of starting a temporary server of its own.
    Yields (API URL, its PREFECT_HOME); stopped, with its process group, at the end."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    cmd = [str(Path(sys.executable).parent / "prefect"), "server", "start", "--host"]
    cmd += ["127.0.0.1", "--port", str(port), "--no-ui", "--no-services", "--analytics-off"]
    url = f"http://127.0.0.1:{port}/api"
    with background(cmd, home / "server.log", base_env(home), home, f"{url}/health"):
        yield url, home


@pytest.fixture(scope="session")
def cli_env(prefect_api) -> dict[str, str]:
    """Environment for child `dpoflow` processes, on the session's Prefect server."""
    url, home = prefect_api
    return base_env(home) | {"PREFECT_API_URL": url}


@pytest.fixture
def ephemeral_env(tmp_path) -> dict[str, str]:
    """Environment for a `dpoflow` that starts Prefect's temporary server, as a user's does."""
    home = tmp_path / "prefect-home"
    home.mkdir()
    return base_env(home)


@pytest.fixture(scope="session")
def shared_stages(tmp_path_factory, cli_env) -> tuple[Path, dict]:
    """validate, sft and reference on the small config, built once for the whole run (the first
    xdist worker to need them builds them under a lock; the others wait and reuse them): tests
    that need a trained reference start from a copy (`copy_stages`)."""
    root = tmp_path_factory.getbasetemp()
    root = root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root
    workdir, summary = root / "shared-stages", root / "shared-stages" / "shared.json"
    with FileLock(str(root / "shared-stages.lock")):
        if not summary.is_file():
            workdir.mkdir(exist_ok=True)
            proc, _ = run_pipeline(workdir, cli_env, name="shared", until="reference")
            assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return workdir, json.loads(summary.read_text())


def copy_stages(shared: tuple[Path, dict], workdir: Path, only: tuple[str, ...] = ()) -> Path:
    """A new work directory holding the shared stages' outputs (those named in `only`, or all)
    and the embedded default, not their MLflow store or Prefect results: its runs log to a
    store of their own."""
    source, _ = shared
    shutil.copytree(source / "embedded", workdir / "embedded", dirs_exist_ok=True)
    for stage in only or [path.name for path in (source / "stages").iterdir()]:
        shutil.copytree(source / "stages" / stage, workdir / "stages" / stage, dirs_exist_ok=True)
    for lock in workdir.rglob("*.lock"):
        lock.unlink()
    return workdir


def run_cli(
    args: list[str], env: dict[str, str], timeout: int = 600, module: str = "dpoflow.flows.cli"
):
    """Run `dpoflow ARGS` as a user would (or `python -m MODULE ARGS`); returns the
    CompletedProcess."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def python_lines(code: str, timeout: int = 300) -> list[str]:
    """Run `python -c CODE` in a fresh interpreter of this venv; its stdout lines (a non-zero
    exit fails the test with its stderr)."""
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.splitlines()


def run_pipeline(
    workdir: Path, env: dict[str, str], *extra: str, name: str = "summary", until: str = ""
):
    """`dpoflow run` on the small config; returns (process, summary or None)."""
    summary = workdir / f"{name}.json"
    args = ["run", "--workdir", str(workdir), "--summary-json", str(summary)]
    args += ["--until", until] if until else []
    for item in [*SMALL, *extra]:
        args += ["--set", item]
    proc = run_cli(args, env)
    return proc, (json.loads(summary.read_text()) if proc.returncode == 0 else None)


# Module-scoped fixtures costly enough (a pipeline run, a server) that the tests using them
# should share one xdist worker, which builds the fixture once: see `worker_fixture`.
ONE_WORKER: set[str] = set()


def worker_fixture(func):
    """A module-scoped fixture whose tests `make test` sends to one worker together (its
    `--dist loadgroup` keeps a group on one worker), so it is built once, not once per worker
    that happens to draw one of its tests."""
    ONE_WORKER.add(func.__name__)
    return pytest.fixture(scope="module")(func)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Order and group the tests for xdist's scheduler, which hands tests out in this order to
    whichever worker is free: the long tests (marked slow) first, so no worker is left running
    one alone at the end while the others idle; among them, those that need no shared stages
    first, as the first worker builds the shared stages meanwhile (`build_shared_stages_first`).
    """
    for item in items:
        shared = sorted(ONE_WORKER.intersection(item.fixturenames))
        if shared:
            # loadgroup reads a test's group from an "@group" suffix of its id. xdist 3.8 sets it
            # from an `xdist_group` mark by assigning `item._nodeid`, which pytest 9 no longer
            # reads (ids are NodeId objects there), so the id is set here.
            item._id = coerce_node_id(f"{item.nodeid}@{item.module.__name__}:{shared[0]}")
    items.sort(
        key=lambda item: (
            item.get_closest_marker("slow") is None,
            "shared_stages" in item.fixturenames,
        )
    )


@pytest.fixture(scope="session", autouse=True)
def build_shared_stages_first(request) -> None:
    """On xdist, the first worker builds the shared stages before its first test (the other
    workers start on tests that need none), so no worker sits waiting for them later."""
    if os.environ.get("PYTEST_XDIST_WORKER") != "gw0" or WORKERS < 2:
        return
    if any("shared_stages" in item.fixturenames for item in request.session.items):
        request.getfixturevalue("shared_stages")
