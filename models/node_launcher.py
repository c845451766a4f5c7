"""DeepSpeed's launcher for the processes of one machine, as `tasks/launcher.py` starts it.

    python -m dpoflow.models.node_launcher --world_info=B64 --master_addr=127.0.0.1 \
        --master_port=P --module dpoflow.models.worker --worker dpoflow.models.trainer \
        --job job.json

This is `deepspeed.launcher.launch`, the process the `deepspeed` command starts on every
node: it spawns one worker per local rank (RANK, LOCAL_RANK, WORLD_SIZE set), streams their
output and ends them all when one fails. On a single machine the `deepspeed` command itself
only works out the world info (`{"localhost": [0, ..., n-1]}`, base64 JSON) and starts this
launcher, at the cost of one more process that imports torch and DeepSpeed (about 5 s of
CPU a launch). So a job on this machine starts the launcher directly; a job with a hostfile
still goes through the `deepspeed` command, which reaches the other nodes over ssh.

Here, and in every worker, DeepSpeed is imported without MLflow (`import_deepspeed`), and
this launcher looks at its workers ten times a second instead of once (`QuickerPolling`).
"""

from __future__ import annotations

import base64
import json
import sys
import time


def import_deepspeed():
    """`import deepspeed`, without the import of mlflow it makes on the way.

    `import deepspeed` loads deepspeed.autotuning.autotuner, which imports mlflow whenever it is
    installed (to log autotuning experiments; no dpoflow process autotunes). mlflow brings
    pandas, scipy, fastapi, opentelemetry and more: about 115 MB of resident memory and 2 s of
    CPU in every launcher and training process, for nothing: they report through files, never
    mlflow. So mlflow is hidden during that one import (DeepSpeed catches the ImportError and
    sets its has_mlflow to False); afterwards `import mlflow` works as usual. A process that has
    already imported mlflow or deepspeed is left as it is.
    """
    if "deepspeed" in sys.modules or "mlflow" in sys.modules:
        import deepspeed

        return deepspeed
    sys.modules["mlflow"] = None  # type: ignore[assignment]  # `import mlflow` -> ImportError
    try:
        import deepspeed
    finally:
        del sys.modules["mlflow"]
    return deepspeed


def world_info(num_local_processes: int) -> str:
    """The `--world_info` value for `num_local_processes` ranks on this machine, as the
    `deepspeed` command encodes it for `--num_gpus N` (device slots 0..N-1 of localhost)."""
    slots = {"localhost": list(range(num_local_processes))}
    return base64.urlsafe_b64encode(json.dumps(slots).encode()).decode()


# How often the launcher looks at its workers. DeepSpeed's looks once a second, so the end of
# every job (and the failure of a rank) was seen up to a second late.
POLL_SECONDS = 0.1


class QuickerPolling:
    """`time` for DeepSpeed's launcher module, with its sleeps held to POLL_SECONDS (its only
    sleep is the pause between two looks at its workers); everything else is `time`'s."""

    def __getattr__(self, name: str):
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        time.sleep(min(seconds, POLL_SECONDS))


def main() -> None:
    from dpoflow.process_gc import freeze_objects_at_exit, imports_without_collection

    freeze_objects_at_exit()
    with imports_without_collection():
        import_deepspeed()
        from deepspeed.launcher import launch
    launch.time = QuickerPolling()
    launch.main()  # it reads its own command line: this module's arguments are its own


if __name__ == "__main__":
    main()
