"""Shared fixtures: an isolated environment for running the real `dpoflow` command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]

# A few steps of everything: enough to exercise every stage, quick on 2 cores.
SMALL = [
    "sft.max_steps=30",
    "sft.checkpoint_every=10",
    "dpo.max_steps=12",
    "dpo.checkpoint_every=4",
    "eval.num_prompts=24",
    "eval.max_new_tokens=16",
]


FAKE_SECRETS = {
    "HF_TOKEN": "hf_FAKEdpoflowSECRET0001",
    "OPENAI_API_KEY": "sk-FAKEdpoflowSECRET0002",
    "DPOFLOW_JUDGE_API_KEY": "FAKEdpoflowSECRET0003",
}


@pytest.fixture(scope="session")
def cli_env(tmp_path_factory) -> dict[str, str]:
    """Environment for child `dpoflow` processes: own Prefect home, offline, no telemetry."""
    home = tmp_path_factory.mktemp("prefect-home")
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    # Tools started by name (`mlflow models serve` runs `uvicorn`) come from this venv,
    # activated or not, as `make test` runs it.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.pop("PREFECT_API_URL", None)
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120",
        PREFECT_LOGGING_LEVEL="WARNING",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        DO_NOT_TRACK="1",
        COLUMNS="200",  # rich wraps tables at 80 columns without a terminal
        GX_ANALYTICS_ENABLED="false",
        # Recognisable fake secrets: test_secrets scans every output for them.
        **FAKE_SECRETS,
    )
    return env


def run_cli(args: list[str], env: dict[str, str], timeout: int = 600):
    """Run `dpoflow ARGS` as a user would; returns the CompletedProcess."""
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


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
