"""The first run on a busy machine, and nothing that dpoflow starts outliving it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import SMALL, copy_stages, run_cli, run_pipeline
from tests.servers import command_lines

pytestmark = pytest.mark.slow


def session_members(sid: int) -> list[str]:
    """Command lines of the live processes in session `sid` (what a command started without
    a session of its own)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getsid(int(entry.name)) != sid:
                continue
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            if state != "Z":  # a zombie has ended; only its exit status waits to be read
                found.append((entry / "cmdline").read_bytes().replace(b"\0", b" ").decode())
        except (OSError, ProcessLookupError):
            continue
    return found


def mentioning(text: str) -> list[str]:
    return [cmdline for cmdline in command_lines().values() if text in cmdline]


def test_a_first_run_on_a_busy_machine_starts_prefect_and_runs(tmp_path, ephemeral_env):
    """A fresh PREFECT_HOME (Prefect must create its database) while two other processes keep
    both cores busy: the temporary server is given the time it needs."""
    burn = [sys.executable, "-c", "while True: pass"]
    # Busy from their first instant: a pause here would only raise the printed load average
    # (a one-minute mean), at the cost of two cores burnt for nothing.
    burners = [subprocess.Popen(burn) for _ in range(2)]
    try:
        started = time.monotonic()
        proc, summary = run_pipeline(tmp_path / "work", ephemeral_env, until="validate")
        seconds, load = time.monotonic() - started, os.getloadavg()
    finally:
        for burner in burners:
            burner.kill()
            burner.wait()
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert summary["stages"]["validate"]["status"] == "completed"
    assert (tmp_path / "work" / "prefect-server.log").is_file()
    assert not mentioning(str(Path(ephemeral_env["PREFECT_HOME"])))  # its server is stopped
    print(f"\nfirst run, busy machine: load {load[0]:.2f} {load[1]:.2f}, {seconds:.0f} s, exit 0")


def test_a_server_that_does_not_start_in_time_is_one_sentence(tmp_path, ephemeral_env):
    env = ephemeral_env | {"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "1"}
    proc = run_cli(["run", "--workdir", str(tmp_path / "work"), "--until", "validate"], env)
    assert proc.returncode == 1
    assert "Prefect's temporary server did not start within 1 s" in proc.stderr
    assert "raise PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1


def test_sigkill_of_the_main_process_alone_leaves_nothing_behind(
    tmp_path, ephemeral_env, shared_stages
):
    """What the OOM killer does: SIGKILL to `dpoflow run` only, not to its process group.
    Its temporary Prefect server and its training job must go within 30 s."""
    workdir = copy_stages(shared_stages, tmp_path / "work")
    args = [sys.executable, "-m", "dpoflow.flows.cli", "run", "--workdir", str(workdir)]
    for item in [*SMALL, "dpo.max_steps=200", "dpo.checkpoint_every=2"]:
        args += ["--set", item]
    with open(tmp_path / "run.log", "w") as log:
        proc = subprocess.Popen(
            args, env=ephemeral_env, stdout=log, stderr=log, start_new_session=True
        )
    dpo = workdir / "stages" / "dpo"
    deadline = time.monotonic() + 480
    while not any(dpo.glob("*.partial/checkpoints/latest")):
        assert proc.poll() is None, (tmp_path / "run.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "no DPO checkpoint within 480 s"
        time.sleep(0.2)
    started_by_run = session_members(proc.pid) + mentioning(str(workdir / "stages"))
    assert any("prefect.server.api.server:create_app" in c for c in started_by_run)
    assert any("dpoflow.models.trainer" in c for c in started_by_run)

    os.kill(proc.pid, signal.SIGKILL)  # the main process alone
    proc.wait()
    deadline = time.monotonic() + 30
    left = session_members(proc.pid) + mentioning(str(workdir / "stages"))
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left = session_members(proc.pid) + mentioning(str(workdir / "stages"))
    assert not left, f"still running 30 s after the SIGKILL: {left}"
    print(f"\nSIGKILL of dpoflow run alone: all {len(started_by_run)} processes it started gone")
