"""How a training job is launched: DeepSpeed's node launcher on one machine, the `deepspeed`
command with a hostfile, DeepSpeed imported without MLflow."""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path

from dpoflow.tasks.launcher import NODE_LAUNCHER, launcher_command
from tests.conftest import python_lines

ONE_MACHINE = {"num_processes": 2, "num_nodes": 1, "master_port": 29611}
# Every process the launcher starts runs the worker entry, which imports the job's module.
ENTRY = ["--module", "dpoflow.models.worker"]


def test_one_machine_starts_deepspeeds_node_launcher_with_the_runners_world_info():
    from deepspeed.launcher.runner import apply_num_nodes_and_gpus, encode_world_info

    cmd = launcher_command(Path("job.json"), ONE_MACHINE)
    assert cmd[:4] == [sys.executable, "-u", "-m", NODE_LAUNCHER]
    assert cmd[-6:] == ENTRY + ["--worker", "dpoflow.models.trainer", "--job", "job.json"]
    assert "--master_addr=127.0.0.1" in cmd and "--master_port=29611" in cmd
    # What the `deepspeed` command hands its node launcher for `--num_gpus 2` on one machine.
    runners = encode_world_info(apply_num_nodes_and_gpus({"localhost": 1}, -1, 2))
    ours = next(arg.split("=", 1)[1] for arg in cmd if arg.startswith("--world_info="))
    assert ours == runners
    assert json.loads(base64.urlsafe_b64decode(ours)) == {"localhost": [0, 1]}


def test_a_cluster_goes_through_the_deepspeed_command_and_its_hostfile():
    cluster = ONE_MACHINE | {"hostfile": "infra/hostfile", "num_nodes": 2, "num_gpus": 8}
    cmd = launcher_command(Path("job.json"), cluster, module="dpoflow.models.reference_worker")
    assert Path(cmd[0]).name == "deepspeed"
    flags = dict(zip(cmd[1:-6:2], cmd[2:-6:2], strict=True))
    assert flags == {
        "--master_port": "29611",
        "--hostfile": "infra/hostfile",
        "--num_nodes": "2",
        "--num_gpus": "8",
    }
    assert cmd[-6:] == ENTRY + ["--worker", "dpoflow.models.reference_worker", "--job", "job.json"]


def test_deepspeed_is_imported_without_mlflow_which_still_imports_after():
    probe = (
        "import sys\n"
        "from dpoflow.models.node_launcher import import_deepspeed\n"
        "import_deepspeed()\n"
        "print('deepspeed' in sys.modules, 'mlflow' in sys.modules)\n"
        "import mlflow\n"
        "print(mlflow.__name__)\n"
    )
    lines = python_lines(probe)
    # The last two lines: DeepSpeed may print its accelerator warning first.
    assert lines[-2:] == ["True False", "mlflow"]


def test_the_node_launcher_looks_at_its_workers_ten_times_a_second(monkeypatch):
    import inspect
    import time

    from deepspeed.launcher import launch

    from dpoflow.models.node_launcher import POLL_SECONDS, QuickerPolling

    # DeepSpeed's launcher still pauses with `time.sleep` between two looks at its workers.
    assert "time.sleep(1)" in inspect.getsource(launch.main)
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    polling = QuickerPolling()
    polling.sleep(1)
    polling.sleep(0.05)
    assert POLL_SECONDS == 0.1 and slept == [0.1, 0.05]
    assert polling.strftime("%Y", time.gmtime(0)) == "1970"  # the rest is `time`'s
    # The node launcher's main hands it to DeepSpeed's launcher before running it.
    probe = (
        "import contextlib, sys\n"
        "from deepspeed.launcher import launch\n"
        "from dpoflow.models import node_launcher\n"
        "sys.argv = ['node_launcher', '--help']\n"
        "with contextlib.suppress(SystemExit):\n"
        "    node_launcher.main()\n"
        "print(type(launch.time).__name__)\n"
    )
    lines = python_lines(probe)
    assert lines[-1] == "QuickerPolling"
