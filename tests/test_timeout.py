"""The user's training timeout is final: run_training ends the job and the stage's retry
condition does not start it again (fast: a stand-in launcher, no model, no deepspeed)."""

from __future__ import annotations

import asyncio
import sys
import time

import pytest
from prefect.states import exception_to_failed_state

from dpoflow.errors import ServerError
from dpoflow.tasks import launcher
from dpoflow.tasks.common import _retry_unless_user_error
from dpoflow.tasks.launcher import TrainingFailed, TrainingTimedOut, run_training
from tests.servers import processes_mentioning

# A launcher and its worker: two processes of one group that would sleep for two minutes.
STAND_IN = (
    "import subprocess, sys, time; "
    "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)', sys.argv[1]]); "
    "time.sleep(120)"
)


def retried(exc: BaseException) -> bool:
    """What the stage's retry condition decides for a task run that raised `exc`, on the
    Failed state Prefect's task engine builds from it."""
    state = asyncio.run(exception_to_failed_state(exc))
    return _retry_unless_user_error(None, None, state)


def test_a_training_timeout_ends_the_group_and_is_not_retried(tmp_path, monkeypatch):
    monkeypatch.setattr(
        launcher,
        "launcher_command",
        lambda job_path, *_: [sys.executable, "-c", STAND_IN, str(job_path)],
    )
    job = {
        "kind": "dpo",
        "train": {"batch_size": 4, "grad_accum": 1},
        "distributed": {"num_processes": 1, "num_nodes": 1},
        "metrics_path": str(tmp_path / "metrics.jsonl"),
        "output_dir": str(tmp_path / "model"),
    }
    started = time.monotonic()
    with pytest.raises(TrainingTimedOut) as caught:
        run_training(job, tmp_path, log=lambda line: None, on_metrics=print, timeout_seconds=1)
    assert time.monotonic() - started < 30
    assert processes_mentioning(str(tmp_path / "job.json")) == []  # the worker too

    message = str(caught.value)
    assert "distributed.timeout_seconds" in message and "(1 s)" in message
    assert "\n" not in message and message.endswith(".")
    assert not retried(caught.value)  # the limit the user set is final
    # ... while a crash and a server that is down still are retried.
    assert retried(TrainingFailed("exited with code 1")) and retried(ServerError("down"))
