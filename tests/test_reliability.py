"""Faults on real processes: kills mid-stage, two runs at once, servers that are down.

Every test runs the real `dpoflow run` command (Prefect engine, deepspeed launcher, MLflow
store) and then checks what the issue asks: the run resumes or ends with one clear error,
nothing finished is lost, nothing half-written is taken for a result, and the registry
holds exactly one version.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import (
    PROJECT_ROOT,
    RETRY_DELAYS,
    SMALL,
    copy_stages,
    run_pipeline,
    worker_fixture,
)
from tests.servers import (
    MLFLOW_SERVER_ENV,
    background,
    free_port,
    mlflow_server_command,
    processes_mentioning,
    stop,
)
from tests.test_llm_judge import ChatServer

pytestmark = pytest.mark.slow


def start_pipeline(workdir: Path, env: dict[str, str], *extra: str, name: str = "summary"):
    """`dpoflow run` on the small config, in the background, in a session of its own."""
    args = [sys.executable, "-m", "dpoflow.flows.cli", "run", "--workdir", str(workdir)]
    args += ["--summary-json", str(workdir / f"{name}.json")]
    for item in [*SMALL, *extra]:
        args += ["--set", item]
    with open(workdir / f"{name}.log", "w") as log:
        return subprocess.Popen(
            args, cwd=PROJECT_ROOT, env=env, start_new_session=True, stdout=log, stderr=log
        )


def wait_for(found: Callable[[], bool], proc: subprocess.Popen, what: str, timeout=480) -> None:
    deadline = time.monotonic() + timeout
    while not found():
        assert proc.poll() is None, f"the run ended before {what}"
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.1)


def kill_whole_run(proc: subprocess.Popen, workdir: Path) -> None:
    """SIGKILL the CLI and everything in its group (no cleanup), then wait until the
    training job, in a session of its own, has noticed and stopped itself."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 60
    while processes_mentioning(str(workdir / "stages")):
        assert time.monotonic() < deadline, "a training job outlived the killed run"
        time.sleep(0.5)


def finished(workdir: Path, stage: str) -> list[Path]:
    return list((workdir / "stages" / stage).glob("*/manifest.json"))


def metric_steps(workdir: Path, stage: str) -> list[int]:
    path = next((workdir / "stages" / stage).glob("*/metrics.jsonl"))
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def mlflow_client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def sqlite_uri(workdir: Path) -> str:
    return f"sqlite:///{workdir / 'mlflow.db'}"


def versions_of(uri: str, summary: dict) -> list:
    name = summary["registered_model"]["name"]
    return mlflow_client(uri).search_model_versions(f"name='{name}'")


def test_sigkill_of_the_whole_run_mid_dpo_then_the_same_command_resumes(
    tmp_path, cli_env, shared_stages
):
    copy_stages(shared_stages, tmp_path)
    extra = ["dpo.max_steps=40", "dpo.checkpoint_every=4"]
    proc = start_pipeline(tmp_path, cli_env, *extra, name="killed")
    dpo = tmp_path / "stages" / "dpo"
    wait_for(lambda: any(dpo.glob("*.partial/checkpoints/latest")), proc, "a DPO checkpoint")
    kill_whole_run(proc, tmp_path)
    assert not finished(tmp_path, "dpo")  # nothing half-done passes for finished

    done, summary = run_pipeline(tmp_path, cli_env, *extra)
    assert done.returncode == 0, done.stderr[-3000:]
    stages = summary["stages"]
    assert stages["validate"]["status"] == stages["sft"]["status"] == "cached"
    assert stages["dpo"]["status"] == "completed"
    assert stages["dpo"]["resumed_from_step"] >= 4
    assert "resumed from step" in done.stdout
    assert metric_steps(tmp_path, "dpo") == list(range(1, 41))  # every step once, none twice
    history = mlflow_client(sqlite_uri(tmp_path)).get_metric_history(
        summary["mlflow_run_id"], "loss"
    )
    assert sorted(m.step for m in history) == list(range(1, 41))  # in MLflow too
    assert len(versions_of(sqlite_uri(tmp_path), summary)) == 1  # no duplicate registration
    print(
        f"\nkilled mid-DPO: re-run resumed DPO from step {stages['dpo']['resumed_from_step']}, "
        f"MLflow holds {len(history)} loss points for 40 steps, 1 model version"
    )


def test_sigkill_of_the_sft_training_process_is_retried_and_resumes(
    tmp_path, cli_env, shared_stages
):
    copy_stages(shared_stages, tmp_path, only=("validate",))  # SFT runs anew (40 steps here)
    extra = ["sft.max_steps=40", "sft.checkpoint_every=10"]
    proc = start_pipeline(tmp_path, cli_env, *extra)
    sft = tmp_path / "stages" / "sft"
    wait_for(lambda: any(sft.glob("*.partial/checkpoints/latest")), proc, "an SFT checkpoint")
    killed = processes_mentioning(str(sft))  # the launcher and the training process
    assert killed
    for pid in killed:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)

    # The run itself lives on: Prefect retries the stage, which resumes from the checkpoint.
    assert proc.wait(timeout=600) == 0, (tmp_path / "summary.log").read_text()[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["stages"]["sft"]["status"] == "completed"
    assert summary["stages"]["sft"]["resumed_from_step"] >= 10
    assert metric_steps(tmp_path, "sft") == list(range(1, 41))
    assert len(finished(tmp_path, "sft")) == 1
    assert len(versions_of(sqlite_uri(tmp_path), summary)) == 1
    print(
        f"\nSFT process killed: the run retried SFT from step "
        f"{summary['stages']['sft']['resumed_from_step']} and exited 0, 1 model version"
    )


def test_sigkill_of_the_whole_run_mid_evaluation_resumes_from_the_judged_samples(
    tmp_path, cli_env, shared_stages
):
    copy_stages(shared_stages, tmp_path)
    # 48 prompts in chunks of 8, at one temperature: 6 chunks, each recorded.
    extra = ["eval.num_prompts=48", "eval.batch_size=8", "eval.max_new_tokens=32"]
    proc = start_pipeline(tmp_path, cli_env, *extra, name="killed")
    evaluate = tmp_path / "stages" / "evaluate"

    def two_chunks_judged() -> bool:
        logs = list(evaluate.glob("*.partial/judged.jsonl"))
        return bool(logs) and logs[0].read_text().count("\n") >= 2

    wait_for(two_chunks_judged, proc, "two judged chunks")
    kill_whole_run(proc, tmp_path)
    assert not finished(tmp_path, "evaluate")

    done, summary = run_pipeline(tmp_path, cli_env, *extra)
    assert done.returncode == 0, done.stderr[-3000:]
    stages = summary["stages"]
    assert {stages[s]["status"] for s in ("validate", "sft", "reference", "dpo")} == {"cached"}
    assert stages["evaluate"]["status"] == "completed"
    assert 16 <= stages["evaluate"]["resumed_judged_prompts"] < 48
    output = finished(tmp_path, "evaluate")[0].parent
    assert not (output / "judged.jsonl").exists()
    samples = [json.loads(line) for line in (output / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 48 and len({s["prompt"] for s in samples}) > 1
    # The killed attempt logged nothing to MLflow: the evaluation is there once.
    history = mlflow_client(sqlite_uri(tmp_path)).get_metric_history(
        summary["mlflow_run_id"], "eval/win_rate"
    )
    assert [m.value for m in history] == [summary["win_rate"]]
    assert len(versions_of(sqlite_uri(tmp_path), summary)) == 1
    print(
        f"\nkilled mid-evaluation: re-run took {stages['evaluate']['resumed_judged_prompts']} "
        f"judged prompts from the log, judged the rest of 48, win rate {summary['win_rate']}"
    )


def test_two_runs_at_once_on_one_workdir_both_end_correctly(tmp_path, cli_env, shared_stages):
    copy_stages(shared_stages, tmp_path)  # the two contend for dpo and every stage after it
    first = start_pipeline(tmp_path, cli_env, name="first")
    second = start_pipeline(tmp_path, cli_env, name="second")
    for proc, name in ((first, "first"), (second, "second")):
        assert proc.wait(timeout=900) == 0, (tmp_path / f"{name}.log").read_text()[-3000:]
    a = json.loads((tmp_path / "first.json").read_text())
    b = json.loads((tmp_path / "second.json").read_text())
    # One of them built each stage, the other waited for its lock and took the output.
    for stage in a["stages"]:
        assert {a["stages"][stage]["status"], b["stages"][stage]["status"]} <= {
            "completed",
            "cached",
        }
        assert len(finished(tmp_path, stage)) == 1, stage
    assert "completed" in {a["stages"]["dpo"]["status"], b["stages"]["dpo"]["status"]}
    assert a["mlflow_run_id"] == b["mlflow_run_id"]
    assert a["registered_model"] == b["registered_model"]
    assert a["win_rate"] == b["win_rate"]
    assert len(versions_of(sqlite_uri(tmp_path), a)) == 1
    assert not list((tmp_path / "stages").glob("*/*.partial"))  # nothing left half-built
    print(
        "\ntwo runs at once: "
        + ", ".join(
            f"{stage} {a['stages'][stage]['status']}/{b['stages'][stage]['status']}"
            for stage in a["stages"]
        )
    )


class MlflowServer:
    """A real `mlflow server` on loopback over a SQLite store; stopped and started at will."""

    def __init__(self, root: Path, env: dict[str, str]):
        self.root, self.env, self.port = root, env, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._stack: contextlib.ExitStack | None = None

    def start(self) -> None:
        store = f"sqlite:///{self.root / 'mlflow.db'}"
        cmd = mlflow_server_command(self.port, store, self.root / "artifacts")
        env = self.env | MLFLOW_SERVER_ENV
        self._stack = contextlib.ExitStack()
        self.proc = self._stack.enter_context(
            background(cmd, self.root / "mlflow.log", env, self.root, f"{self.url}/health")
        )

    def stop(self) -> None:
        if self._stack is not None:
            stop(self.proc)
            self._stack.close()
            self._stack = None


@worker_fixture
def trained(tmp_path_factory, cli_env, shared_stages) -> Iterator[tuple]:
    """A work directory trained through DPO against a live MLflow server."""
    workdir = copy_stages(shared_stages, tmp_path_factory.mktemp("served"))
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"), cli_env)
    server.start()
    # MLflow's own HTTP retries would stretch a dead server's error over minutes.
    env = cli_env | {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
    extra = [f"mlflow.tracking_uri={server.url}"]
    try:
        done, summary = run_pipeline(workdir, env, *extra, until="dpo")
        assert done.returncode == 0, done.stderr[-3000:]
        assert summary["stopped_after"] == "dpo" and "evaluate" not in summary["stages"]
        yield workdir, server, extra, env
    finally:
        server.stop()


def test_a_judge_endpoint_answering_500_is_retried_then_named(trained):
    workdir, _, extra, env = trained
    with ChatServer(always_500=True) as judge:
        llm = [
            "eval.judge=llm",
            f"eval.llm.base_url={judge.base_url}",
            "eval.llm.model=judge",
            "eval.llm.max_retries=1",
            "eval.llm.timeout_seconds=2",
        ]
        started = time.monotonic()
        done, _ = run_pipeline(workdir, env, *extra, *llm, until="evaluate")
        elapsed = time.monotonic() - started
        asked = judge.requests
    assert done.returncode == 1
    assert f"{judge.base_url}/chat/completions" in done.stderr
    assert "Traceback" not in done.stderr
    assert elapsed >= sum(RETRY_DELAYS)  # the stage was retried, with backoff
    assert asked >= 3 * 2  # three attempts, each asking at least once and retrying once
    print(
        f"\njudge answering 500: exit 1 after {elapsed:.0f} s and {asked} requests: "
        + done.stderr.strip().splitlines()[-1]
    )
    assert len(finished(workdir, "dpo")) == 1 and not finished(workdir, "evaluate")


def test_mlflow_down_at_registration_keeps_the_model_and_a_later_run_registers_it(trained):
    workdir, server, extra, env = trained
    done, summary = run_pipeline(workdir, env, *extra, until="evaluate")
    assert done.returncode == 0, done.stderr[-3000:]
    assert summary["stages"]["dpo"]["status"] == "cached"

    server.stop()
    started = time.monotonic()
    down, _ = run_pipeline(workdir, env, *extra)
    elapsed = time.monotonic() - started
    assert down.returncode == 1
    assert elapsed >= sum(RETRY_DELAYS)  # retried, with backoff
    print(f"\nMLflow down: exit 1 after {elapsed:.0f} s: " + down.stderr.strip().splitlines()[-1])
    message = down.stderr
    assert f"MLflow at {server.url} could not be reached while registering the policy" in message
    assert "registers it without training again" in message
    assert "Traceback" not in message
    assert len(finished(workdir, "dpo")) == 1 and not finished(workdir, "register")

    server.start()  # the same store: the runs logged before are there
    done, summary = run_pipeline(workdir, env, *extra)
    assert done.returncode == 0, done.stderr[-3000:]
    stages = summary["stages"]
    assert {stages[s]["status"] for s in ("sft", "dpo", "evaluate")} == {"cached"}
    assert stages["register"]["status"] == "completed"
    versions = versions_of(server.url, summary)
    assert [v.version for v in versions] == [summary["registered_model"]["version"]] == ["1"]
