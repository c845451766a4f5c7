"""The one progress rule: a line every 5% of the work or every 30 s, with a rate and an ETA."""

from __future__ import annotations

from dpoflow.models.progress import Progress


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_line_every_five_percent_with_rate_and_eta():
    lines: list[str] = []
    clock = Clock()
    progress = Progress("work", 1000, "pairs", lines.append, clock=clock)
    for done in range(1, 1001):
        clock.now = done / 10  # 10 pairs/s
        progress.update(done)
    assert lines[0] == "work: 0% of 1000 pairs"
    assert len(lines) == 1 + 20  # the start, then every 50 pairs (5%)
    assert lines[1] == "work: 50/1000 pairs (5%), 10.00 pairs/s, ETA 1 min 35 s"
    assert lines[-1] == "work: 1000/1000 pairs (100%), 10.00 pairs/s, took 1 min 40 s"


def test_a_line_every_30_seconds_when_the_work_is_slow_and_resumed_work_is_not_in_the_rate():
    lines: list[str] = []
    clock = Clock()
    progress = Progress("steps", 1000, "steps", lines.append, already=400, clock=clock)
    for done in range(401, 411):  # 1 step every 10 s: 1% per line would take 50 s
        clock.now += 10
        progress.update(done, "loss 0.5")
    assert lines[0] == "steps: 0% of 1000 steps (400 done before)"
    assert lines[1:] == [
        "steps: 403/1000 steps (40%), 0.10 steps/s, ETA 1 h 39 min, loss 0.5",
        "steps: 406/1000 steps (41%), 0.10 steps/s, ETA 1 h 39 min, loss 0.5",
        "steps: 409/1000 steps (41%), 0.10 steps/s, ETA 1 h 38 min, loss 0.5",
    ]
