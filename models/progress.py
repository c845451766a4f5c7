"""Progress lines for every long loop: training steps, reference pairs, evaluation prompts.

One rule everywhere, so a user watching any stage sees it move: a line at the start, then
whenever another 5% of the work is done or 30 s have passed since the last line, whichever
comes first, and one at the end; each line gives the count, the share, the rate and an ETA.
"""

from __future__ import annotations

import time
from collections.abc import Callable

EVERY_FRACTION = 0.05
EVERY_SECONDS = 30.0


class Progress:
    """Call `update(done)` as work finishes; it decides when a line is worth writing.

    `already` counts work finished before this run (a resumed stage): it is reported as
    done but left out of the rate, so the ETA is that of the work this run really does.
    """

    def __init__(
        self,
        name: str,
        total: int,
        unit: str,
        log: Callable[[str], None],
        *,
        already: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.name, self.total, self.unit, self.log, self.clock = name, total, unit, log, clock
        self.already = already
        self.start = self.last_time = clock()
        self.last_done = already
        self.step = max(1, round(total * EVERY_FRACTION))
        resumed = f" ({already} done before)" if already else ""
        self.log(f"{name}: 0% of {total} {unit}{resumed}")

    def update(self, done: int, detail: str = "") -> None:
        """`done`: the work finished so far, `already` included; `detail` ends the line
        (a loss, say)."""
        now = self.clock()
        due = done - self.last_done >= self.step or now - self.last_time >= EVERY_SECONDS
        if not (due or done >= self.total):
            return
        if done == self.last_done and done < self.total:
            return  # nothing new: the 30 s rule never repeats a line
        self.last_done, self.last_time = done, now
        self.log(self.line(done, now) + (f", {detail}" if detail else ""))

    def line(self, done: int, now: float) -> str:
        elapsed = max(now - self.start, 1e-9)
        rate = (done - self.already) / elapsed
        left = self.total - done
        eta = f"ETA {format_seconds(left / rate)}" if rate > 0 and left > 0 else "ETA -"
        if left <= 0:
            eta = f"took {format_seconds(elapsed)}"
        share = 100.0 * done / max(self.total, 1)
        return (
            f"{self.name}: {done}/{self.total} {self.unit} ({share:.0f}%), "
            f"{rate:.2f} {self.unit}/s, {eta}"
        )


def format_seconds(seconds: float) -> str:
    """12 s, 3 min 05 s, 2 h 07 min: short enough for a log line."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
