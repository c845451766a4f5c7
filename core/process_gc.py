"""Garbage collection for dpoflow's processes, which import torch, transformers and DeepSpeed.

Two costs of Python's collector that such a process pays for nothing:

- While modules are imported, the collector runs every few hundred new objects, and its
  oldest generation walks everything imported so far, again and again: about a fifth of the
  CPU of importing what a training worker or a `dpoflow run` imports (about 1 s of 4-5 s on
  this project's 2-core machine). `imports_without_collection` pauses it around those imports
  and then freezes what they made (`gc.freeze()`: the permanent generation, which later
  collections skip; modules and classes live as long as the process anyway).
- When Python exits it tears every module down, and the collector walks what they still
  hold, several times: about 1.4 s of CPU at the end of a `dpoflow run`, 1 s at the end of a
  training process. `freeze_objects_at_exit` freezes every object still alive first; the
  modules are still torn down and every object whose count drops to zero is still freed. It
  is an exit handler registered at the start, so it runs last (handlers run in reverse
  order): threads have been joined and every other handler has run (Prefect stopping its
  temporary server, logging flushing its handlers).
"""

from __future__ import annotations

import atexit
import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def imports_without_collection() -> Iterator[None]:
    """Around a process's heavy imports: the collector paused, what they made frozen after.

    Also around the imports a stage makes in the flow's process the first time it needs them
    (torch and transformers, for evaluation and the promotion gate): what else is alive then
    is frozen too, which only means the collector skips it; it is still freed when its last
    reference goes."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if was_enabled:
            gc.enable()


def freeze_objects_at_exit() -> None:
    """Call once, early in a process's entry point."""
    atexit.register(gc.freeze)
