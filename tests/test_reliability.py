"""Faults on real processes: the whole `dpoflow run` SIGKILLed mid-DPO, then run again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import PROJECT_ROOT, SMALL, run_pipeline
from tests.test_training import processes_mentioning

pytestmark = pytest.mark.slow


def test_sigkill_of_the_whole_run_then_the_same_command_resumes(tmp_path, cli_env):
    extra = ["dpo.max_steps=40", "dpo.checkpoint_every=4"]
    args = [sys.executable, "-m", "flows.cli", "run", "--workdir", str(tmp_path)]
    for item in [*SMALL, *extra]:
        args += ["--set", item]
    proc = subprocess.Popen(
        args,
        cwd=PROJECT_ROOT,
        env=cli_env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 480
    while not list((tmp_path / "stages" / "dpo").glob("*.partial/checkpoints/latest")):
        assert proc.poll() is None, "the run ended before DPO wrote a checkpoint"
        assert time.monotonic() < deadline, "no DPO checkpoint within the time allowed"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the CLI and everything in its group, no cleanup
    proc.wait()

    # The training job is in a session of its own; it notices its owner is gone and stops.
    deadline = time.monotonic() + 60
    while processes_mentioning(str(tmp_path / "stages")):
        assert time.monotonic() < deadline, "the training job outlived the killed run"
        time.sleep(0.5)
    assert not list((tmp_path / "stages" / "dpo").glob("*/manifest.json"))  # nothing finished

    done, summary = run_pipeline(tmp_path, cli_env, *extra)
    assert done.returncode == 0, done.stderr[-3000:]
    stages = summary["stages"]
    assert stages["validate"]["status"] == stages["sft"]["status"] == "cached"
    assert stages["dpo"]["status"] == "completed"
    assert stages["dpo"]["resumed_from_step"] >= 4
    metrics = [
        json.loads(line)
        for line in next((tmp_path / "stages" / "dpo").glob("*/metrics.jsonl"))
        .read_text()
        .splitlines()
    ]
    assert [m["step"] for m in metrics] == list(range(1, 41))  # every step once, none twice

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{Path(tmp_path) / 'mlflow.db'}")
    versions = client.search_model_versions(f"name='{summary['registered_model']['name']}'")
    assert len(versions) == 1  # no duplicate registration
