"""Prefect's API for one `dpoflow` command: the user's server, or a temporary one of ours.

With `PREFECT_API_URL` set, flows report to that server. Without it, Prefect would start
a temporary server by itself, with 20 s to come up (too little for a first run on a busy
machine, which must create the database) and no way to stop it when the command is
SIGKILLed (the OOM killer's way): it lived on with parent 1. So dpoflow starts the same
temporary server itself:

- tied to this process: the kernel kills it when this process dies, however it dies
  (`PR_SET_PDEATHSIG`), and it is stopped when the command ends;
- given as long as it needs to start (`PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS`,
  default here 600 s), with its log in the work directory, and one sentence naming that
  setting if it still does not answer.

Its URL goes into this process's environment and Prefect's process-wide settings, not only
the calling thread's: Prefect's background threads (logs, events) read those, and would
otherwise start a temporary server of their own.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from dpoflow.errors import ServerError

STARTUP_SETTING = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
DEFAULT_STARTUP_SECONDS = 600.0
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child, between fork and exec
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def startup_seconds() -> float:
    raw = os.environ.get(STARTUP_SETTING)
    if not raw:
        return DEFAULT_STARTUP_SECONDS
    try:
        return float(raw)
    except ValueError:
        raise ServerError(
            f"{STARTUP_SETTING}={raw!r} is not a number of seconds: set it like "
            f"{STARTUP_SETTING}=600."
        ) from None


def start_server(log_path: Path) -> tuple[subprocess.Popen, str]:
    """Start Prefect's temporary API server on a free loopback port; return it and its URL
    once it answers its health check."""
    import httpx

    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    site = Path(importlib.util.find_spec("prefect").origin).parents[1]  # found, not imported
    cmd = [sys.executable, "-m", "uvicorn", "--app-dir", str(site)]
    cmd += ["--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--log-level", "error", "--lifespan", "on"]
    # What Prefect's own temporary server sets: no UI, ephemeral mode.
    env = os.environ | {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1"}
    env.pop("PREFECT_API_URL", None)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            cmd, env=env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent
        )
    limit = startup_seconds()
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerError(
                f"Prefect's temporary server exited with code {proc.returncode} while "
                f"starting (its log: {log_path}): fix what the log names, or point "
                "PREFECT_API_URL at a running Prefect server."
            )
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return proc, url
        time.sleep(0.2)
    stop_server(proc)
    raise ServerError(
        f"Prefect's temporary server did not start within {limit:.0f} s (its log: {log_path}): "
        f"on a slow or busy machine raise {STARTUP_SETTING}, or point PREFECT_API_URL at a "
        "running Prefect server."
    )


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def configured_api_url() -> str | None:
    """The user's Prefect server, as Prefect resolves it (environment, then profile)."""
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or None


@contextlib.contextmanager
def prefect_api(workdir: Path) -> Iterator[str | None]:
    """Run the body against the user's Prefect server, or a temporary one started (and
    always stopped) here; yields the URL of the temporary one, None for the user's."""
    if configured_api_url():
        yield None
        return
    proc, url = start_server(workdir / "prefect-server.log")
    os.environ["PREFECT_API_URL"] = url
    _refresh_prefect_settings()
    try:
        yield url
    finally:
        _drain_prefect_workers()  # the run's last logs and events reach the server first
        os.environ.pop("PREFECT_API_URL", None)
        _refresh_prefect_settings()
        stop_server(proc)


def _drain_prefect_workers(timeout: float = 10.0) -> None:
    """Send what Prefect's log and event threads still hold, while the server is up."""
    if "prefect.logging.handlers" in sys.modules:
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=timeout)
    if "prefect.events.worker" in sys.modules:
        from prefect.events.worker import EventsWorker

        EventsWorker.drain_all(timeout=timeout)


def _refresh_prefect_settings() -> None:
    """Make an already imported Prefect re-read its settings from the environment, in every
    thread (one imported later reads them anyway)."""
    if "prefect.context" in sys.modules:
        from prefect.context import refresh_global_settings_context

        refresh_global_settings_context()
