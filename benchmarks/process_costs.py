"""What starting and ending dpoflow's processes costs, beside what it replaced.

    python -m benchmarks.process_costs [--repeats 3]

- launch: a one-process job (`benchmarks.launch_probe`, which imports what the training worker
  imports and ends) started as `tasks/launcher.py` starts it on one machine (DeepSpeed's node
  launcher, directly, which starts `models/worker.py`: the job imported with the garbage
  collector paused) and as the `deepspeed` command starts a module (its runner, then the node
  launcher, then the module itself);
- import and exit: a process that imports what a `dpoflow run` process imports
  (`dpoflow.flows.pipeline`) or what a training worker imports (`dpoflow.models.trainer`), then
  ends: with the garbage collector paused during the imports and the objects frozen at exit
  (`core/process_gc.py`), and as plain Python does both.

Each figure is the median of the repeats: wall seconds, and CPU seconds (user + system) of
the whole process tree.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from dpoflow.tasks.launcher import child_env, free_port, launcher_command

PROBE = "benchmarks.launch_probe"
ONE_PROCESS = {"num_processes": 1, "num_nodes": 1}
EXIT_PROBE = """
import time
from dpoflow.process_gc import freeze_objects_at_exit, imports_without_collection
if {freeze}:
    freeze_objects_at_exit()
    with imports_without_collection():
        import {module}
else:
    import {module}
print(time.time(), flush=True)
"""


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """(wall s, CPU s of the process and its children, stdout) of one run of `cmd`."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    wall = time.time() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, proc.stdout


def deepspeed_command() -> list[str]:
    """The peer: the `deepspeed` command, as the launcher ran it before models/node_launcher."""
    deepspeed = shutil.which("deepspeed") or str(Path(sys.executable).with_name("deepspeed"))
    return [deepspeed, "--master_port", str(free_port()), "--num_gpus", "1", "--module", PROBE]


def launch_costs(repeats: int) -> list[tuple[str, float, float]]:
    env = child_env(ONE_PROCESS)
    ours = launcher_command(Path("unused"), ONE_PROCESS, module=PROBE)  # the probe reads no job
    rows = []
    for name, cmd in (("node launcher (dpoflow)", ours), ("deepspeed command", None)):
        runs = [timed(cmd or deepspeed_command(), env)[:2] for _ in range(repeats)]
        rows.append((f"launch, {name}", *medians(runs)))
    return rows


def exit_costs(repeats: int) -> list[tuple[str, float, float, float]]:
    rows = []
    for module in ("dpoflow.flows.pipeline", "dpoflow.models.trainer"):
        for freeze, name in ((True, "dpoflow's gc settings"), (False, "plain Python")):
            code = EXIT_PROBE.format(freeze=freeze, module=module)
            runs, teardowns = [], []
            for _ in range(repeats):
                wall, cpu, out = timed([sys.executable, "-c", code], dict(os.environ))
                teardowns.append(time.time() - float(out.split()[-1]))  # the print to the end
                runs.append((wall, cpu))
            rows.append((f"import {module}, {name}", *medians(runs), statistics.median(teardowns)))
    return rows


def medians(runs: list[tuple[float, float]]) -> tuple[float, float]:
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.process_costs")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"{'process':<62} {'wall s':>7} {'CPU s':>7} {'end s':>7}")
    for name, wall, cpu in launch_costs(args.repeats):
        print(f"{name:<62} {wall:7.2f} {cpu:7.2f} {'':>7}", flush=True)
    for name, wall, cpu, teardown in exit_costs(args.repeats):
        print(f"{name:<62} {wall:7.2f} {cpu:7.2f} {teardown:7.2f}", flush=True)
    print("(end s: from the process's last line of Python to its end)")


if __name__ == "__main__":
    main()
