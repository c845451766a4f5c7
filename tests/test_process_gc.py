"""dpoflow's processes import with the garbage collector paused and freeze their objects at
exit, after every other exit handler (core/process_gc.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import python_lines


def test_objects_are_frozen_after_the_handlers_registered_later():
    probe = (
        "import atexit, gc\n"
        "atexit.register(lambda: print('frozen at the end:', gc.get_freeze_count() > 0))\n"
        "from dpoflow.process_gc import freeze_objects_at_exit\n"
        "freeze_objects_at_exit()\n"
        "atexit.register(lambda: print('a later one, unfrozen:', gc.get_freeze_count() == 0))\n"
    )
    assert python_lines(probe) == [
        "a later one, unfrozen: True",
        "frozen at the end: True",
    ]


@pytest.mark.parametrize(
    "module",
    [
        "dpoflow.flows.cli",
        "dpoflow.models.node_launcher",
        "dpoflow.models.trainer",
        "dpoflow.models.reference_worker",
    ],
)
def test_every_entry_point_freezes_its_objects_at_exit(module):
    probe = (
        "import atexit, gc, runpy, sys\n"
        "atexit.register(lambda: print('frozen at the end:', gc.get_freeze_count() > 0))\n"
        "sys.argv = ['x', '--help']\n"
        f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)\n"
    )
    assert python_lines(probe)[-1] == "frozen at the end: True"


JOB = """
import gc, sys
IMPORTED_WITH_GC = gc.isenabled()


def main():
    print(IMPORTED_WITH_GC, gc.isenabled(), gc.get_freeze_count() > 0, sys.argv[1:])
"""


def test_the_worker_entry_imports_the_job_without_collection_then_runs_it(tmp_path: Path):
    (tmp_path / "probe_job.py").write_text(JOB)
    cmd = [sys.executable, "-m", "dpoflow.models.worker", "--local_rank=0"]
    cmd += ["--worker", "probe_job", "--job", "job.json"]
    env = {"PATH": "", "PYTHONPATH": str(tmp_path)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # Imported with the collector paused; run with it on again, the imports frozen; the job
    # reads its own arguments.
    assert proc.stdout.strip() == "False True True ['--local_rank=0', '--job', 'job.json']"
