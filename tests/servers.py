"""Start and stop real server processes for tests: free ports, readiness, process groups."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

# Environment for every `mlflow server` a test starts: without MLflow's background job
# execution (GenAI jobs dpoflow never submits), which would start a job runner and seven
# huey consumers per server, each importing mlflow: about a quarter of the suite's CPU.
MLFLOW_SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def mlflow_server_command(port: int, backend_store_uri: str, artifacts: Path | None) -> list[str]:
    """`mlflow server` on loopback, one worker, over `backend_store_uri`; with `artifacts`,
    serving the artifacts stored there (run it with MLFLOW_SERVER_ENV in its environment)."""
    cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--workers", "1", "--backend-store-uri", backend_store_uri]
    return cmd + (["--artifacts-destination", str(artifacts)] if artifacts else [])


def command_lines() -> dict[int, str]:
    """Every live process's command line, by PID (read from /proc)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                found[int(entry.name)] = (
                    (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                )
            except OSError:
                continue  # it ended while we looked
    return found


def processes_mentioning(text: str) -> list[int]:
    """PIDs whose command line mentions `text`."""
    return [pid for pid, cmdline in command_lines().items() if text in cmdline]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    """Poll `url` until it answers 200; fail with the server's log if it exits or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        time.sleep(1)
    raise TimeoutError(f"{url} not ready after {timeout:.0f}s:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen) -> None:
    """End the process and everything it started (its process group)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@contextlib.contextmanager
def background(
    cmd: list[str], log: Path, env: dict[str, str], cwd: Path, ready_url: str | None = None
) -> Iterator[subprocess.Popen]:
    """Run `cmd` in its own process group, logging to `log`; stop the group on exit."""
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True
        )
    try:
        if ready_url:
            wait_until_ready(ready_url, proc, log)
        yield proc
    finally:
        stop(proc)
