"""Run a training job under the `deepspeed` launcher and watch it.

The Prefect task owns the child process group: it streams the log, hands new
metric lines to a callback as they appear (so MLflow curves are live), and on
a timeout, a cancellation or any exception it ends the whole group, so no
training process outlives its task.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dpoflow.errors import CheckpointError, ConfigError, UserError
from dpoflow.models.node_launcher import world_info

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# The training loop, run by name under the launcher (a string: it is imported in the child only).
TRAINER = "dpoflow.models.trainer"
# DeepSpeed's launcher for the processes of this machine (run by name, like the trainer).
NODE_LAUNCHER = "dpoflow.models.node_launcher"
# What the launcher starts in every process: it imports the job's module, then runs it.
WORKER_ENTRY = "dpoflow.models.worker"
# Beside job.json: why the job refused to run (models/trainer.py's JOB_ERROR).
JOB_ERROR = "error.json"


class TrainingFailed(RuntimeError):
    """The training process exited non-zero (retryable: it resumes from its checkpoint)."""


class TrainingTimedOut(UserError):
    """Training ran past `distributed.timeout_seconds`. The user's limit is final: a retry
    would start a fresh timeout and let the job run up to three times as long."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_batch_layout(train: dict, distributed: dict) -> None:
    """Every process must get an equal, non-empty share of every global batch."""
    world = distributed["num_processes"] * distributed["num_nodes"]
    if train["batch_size"] % (train["grad_accum"] * world):
        raise ConfigError(
            f"batch_size {train['batch_size']} does not split into grad_accum "
            f"{train['grad_accum']} x {world} process(es): choose a batch_size divisible by "
            f"{train['grad_accum'] * world}."
        )


def launcher_command(job_path: Path, distributed: dict, module: str = TRAINER) -> list[str]:
    """DeepSpeed's launcher running `module --job job_path` in every process (through
    models/worker.py, which imports it with the garbage collector paused): on this machine
    its node launcher directly (what the `deepspeed` command would start, one process fewer:
    see models/node_launcher.py); with a hostfile the `deepspeed` command, for its ssh."""
    port = str(distributed.get("master_port") or free_port())
    processes = distributed.get("num_gpus") or distributed["num_processes"]
    if not distributed.get("hostfile"):
        cmd = [sys.executable, "-u", "-m", NODE_LAUNCHER, f"--world_info={world_info(processes)}"]
        cmd += ["--master_addr=127.0.0.1", f"--master_port={port}"]
        return cmd + entry_args(module, job_path)
    deepspeed = shutil.which("deepspeed") or str(Path(sys.executable).with_name("deepspeed"))
    cmd = [deepspeed, "--master_port", port, "--hostfile", distributed["hostfile"]]
    cmd += ["--num_nodes", str(distributed["num_nodes"]), "--num_gpus", str(processes)]
    return cmd + entry_args(module, job_path)


def entry_args(module: str, job_path: Path) -> list[str]:
    """The launcher's arguments that start `module --job job_path` in every process."""
    return ["--module", WORKER_ENTRY, "--worker", module, "--job", str(job_path)]


def child_env(distributed: dict) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    # The job's output becomes lines of the task's log, never a terminal: there a progress bar
    # (transformers draws one for loading and saving weights) is a line per redraw. The job
    # logs its own progress, with a rate and an ETA (models/progress.py).
    env.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # The working directory never goes on the children's sys.path: in an installed (not
    # editable) dpoflow the job runs in the package's own folder, whose `deepspeed/` (the ZeRO
    # configs, dpoflow.deepspeed) would shadow the real deepspeed. Seen on a GPU machine.
    env["PYTHONSAFEPATH"] = "1"
    if not distributed.get("num_gpus"):
        env.setdefault("DS_ACCELERATOR", "cpu")
        # Share the cores between the processes instead of oversubscribing them.
        per_process = max(1, (os.cpu_count() or 1) // distributed["num_processes"])
        env.setdefault("DPOFLOW_THREADS", str(per_process))
        env.setdefault("OMP_NUM_THREADS", str(per_process))
    return env


class MetricsTail:
    """Reads the lines appended to metrics.jsonl since the last call."""

    def __init__(self, path: Path, on_metrics: Callable[[list[dict]], None]):
        self.path, self.on_metrics, self.offset, self.inode = path, on_metrics, 0, None

    def poll(self) -> None:
        if not self.path.exists():
            return
        inode = self.path.stat().st_ino
        if inode != self.inode:  # a new file: the trainer replaced it when it resumed
            self.inode, self.offset = inode, 0
        with open(self.path) as f:
            f.seek(self.offset)
            chunk = f.read()
        complete = chunk[: chunk.rfind("\n") + 1]
        self.offset += len(complete.encode())
        rows = [json.loads(line) for line in complete.splitlines() if line.strip()]
        if rows:
            self.on_metrics(rows)


def run_training(
    job: dict[str, Any],
    work: Path,
    *,
    log: Callable[[str], None],
    on_metrics: Callable[[list[dict]], None],
    timeout_seconds: float | None = None,
    module: str = TRAINER,
) -> dict:
    """Launch the job, stream it, return its result.json; raise TrainingFailed on failure,
    CheckpointError when the job refused the checkpoint it was to resume from, and
    TrainingTimedOut past `timeout_seconds` (the job's process group is ended either way).
    `module` is the worker the launcher runs in every process: the training loop, or another
    job that shares its launch (the reference log-probs)."""
    check_batch_layout(job["train"], job["distributed"])
    job = {**job, "owner_pid": os.getpid()}  # the job stops itself if this process is killed
    job_path = work / "job.json"
    job_path.write_text(json.dumps(job, indent=2))
    (work / JOB_ERROR).unlink(missing_ok=True)  # an earlier attempt's, not this one's
    cmd = launcher_command(job_path, job["distributed"], module)
    log("launch: " + " ".join(cmd))
    proc = subprocess.Popen(
        cmd,
        cwd=PROJECT_ROOT,
        env=child_env(job["distributed"]),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, ended as a whole
    )
    tail = deque(maxlen=40)

    def pump() -> None:
        for line in proc.stdout:
            line = line.rstrip()
            tail.append(line)  # everything, for the message if the job fails
            if worth_logging(line):
                log(line)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    metrics = MetricsTail(Path(job["metrics_path"]), on_metrics)
    deadline = time.monotonic() + timeout_seconds if timeout_seconds else None
    try:
        while proc.poll() is None:
            metrics.poll()
            if deadline and time.monotonic() > deadline:
                raise TrainingTimedOut(
                    f"{job['kind']} training ran past distributed.timeout_seconds "
                    f"({timeout_seconds:g} s) and was stopped: raise distributed.timeout_seconds, "
                    "or unset it, and run again (training resumes from its last checkpoint)."
                )
            time.sleep(0.2)  # the metrics tail and the exit are seen within a fifth of a second
        reader.join(timeout=5)
        metrics.poll()
    finally:
        end_process_group(proc)
    result_path = Path(job["output_dir"]) / "result.json"
    if proc.returncode != 0 or not result_path.is_file():
        refusal = job_refusal(work / JOB_ERROR)
        if refusal:  # the job's own sentence: a user error, a retry would be refused the same
            raise CheckpointError(refusal)
        raise TrainingFailed(
            f"{job['kind']} training exited with code {proc.returncode}; last lines:\n"
            + "\n".join(tail)
        )
    return json.loads(result_path.read_text())


def worth_logging(line: str) -> bool:
    """Whether a line of the job's output goes to the task's log: not DeepSpeed's warnings (it
    warns on every CPU run that it found no GPU) nor its launcher's bookkeeping (the world
    layout, the command of each process, each clean exit: five lines a job that `launch:`
    already says), which stay in the last lines a failure reports."""
    return bool(line) and "[WARNING]" not in line and "[INFO] [launch.py:" not in line


def job_refusal(path: Path) -> str | None:
    """The sentence a job wrote when it refused to resume from a checkpoint, if it did."""
    try:
        error = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return error.get("message") if error.get("error") == "checkpoint" else None


def end_process_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the job's process group, then SIGKILL whatever is left of it."""
    pgid = proc.pid  # start_new_session made the launcher its group's leader
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        proc.poll()
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return  # nothing left in the group
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            proc.poll()  # reap the launcher so it does not linger as a zombie
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)
