"""dpoflow's processes freeze their objects at exit, after every other exit handler, so
Python's teardown does not walk them again (see core/process_exit.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest


def test_objects_are_frozen_after_the_handlers_registered_later():
    probe = (
        "import atexit, gc\n"
        "atexit.register(lambda: print('frozen at the end:', gc.get_freeze_count() > 0))\n"
        "from dpoflow.process_exit import freeze_objects_at_exit\n"
        "freeze_objects_at_exit()\n"
        "atexit.register(lambda: print('a later one, unfrozen:', gc.get_freeze_count() == 0))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert proc.stdout.splitlines() == [
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
    proc = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines()[-1] == "frozen at the end: True"
