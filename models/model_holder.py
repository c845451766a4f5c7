"""The model a server answers with, swapped without dropping a request.

A request takes the version that is current when it starts (`serving`) and keeps it to the
end, even when `swap` makes another version current meanwhile; `swap` returns only once the
requests still on the old version have finished, so the old model is dropped (its memory
freed) after its last answer and never under one.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Served:
    """One loaded version: the model and the requests it is answering now."""

    version: str
    model: Any
    loaded_at: float = field(default_factory=time.time)
    in_flight: int = 0


class ModelHolder:
    """The current version, handed to requests and swapped under them."""

    def __init__(self, first: Served):
        self._current = first
        self._changed = threading.Condition()

    @property
    def current(self) -> Served:
        return self._current

    @contextmanager
    def serving(self) -> Iterator[Served]:
        """The current version, held for the block: a swap meanwhile waits for it."""
        with self._changed:
            served = self._current
            served.in_flight += 1
        try:
            yield served
        finally:
            with self._changed:
                served.in_flight -= 1
                self._changed.notify_all()

    def swap(self, new: Served, drain_timeout: float | None = None) -> tuple[Served, int]:
        """Make `new` current; wait until the old version has no request left (at most
        `drain_timeout` seconds) and return it with the number of requests it finished after
        the swap. The caller drops it."""
        with self._changed:
            old, self._current = self._current, new
            finishing = old.in_flight
            self._changed.wait_for(lambda: old.in_flight == 0, timeout=drain_timeout)
        return old, finishing
