"""The promotion gate: when a registered candidate may become the `champion`.

Two checks, both on judged win rates with ties counted as half a win:

1. against the reference (the SFT model), from the evaluation stage;
2. head to head against the current champion, when there is one: both
   policies sampled on the evaluation prompts with the evaluation settings and
   scored by the same judge.

Each check passes only when the lower bound of the Wilson 95% interval is above
0.5, not merely the point estimate. A point estimate above 0.5 is a coin flip
for two equally good models (it happens half the time), so the champion would
change on noise; the lower bound asks for evidence that the candidate is
better, and keeps the champion when the evaluation set is too small to tell.

`decide` is pure so the rule can be read and tested on its own; the MLflow side
(which versions, which aliases, which tags) lives in `tasks/promote.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

from models.evaluation import WinRate

THRESHOLD = 0.5


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str


def _describe(what: str, low: float, high: float, rate: float | None = None) -> str:
    point = f"{rate:.3f} " if rate is not None else ""
    return f"{what} {point}(95% CI {low:.3f}-{high:.3f})"


def decide(
    reference_interval: tuple[float, float],
    head_to_head: WinRate | None,
    *,
    champion: str | None = None,
    threshold: float = THRESHOLD,
) -> Decision:
    """Promote when the win rate against the reference has its lower bound above
    `threshold` and, if there is a champion, so does the head-to-head win rate."""
    low, high = reference_interval
    vs_reference = _describe("win rate vs reference", low, high)
    if low <= threshold:
        return Decision(False, f"{vs_reference}: lower bound is not above {threshold}")
    if head_to_head is None:
        return Decision(True, f"{vs_reference} and no champion yet")
    h2h = head_to_head
    vs_champion = _describe(
        f"head-to-head win rate vs champion {champion or ''}".rstrip(), h2h.low, h2h.high, h2h.rate
    )
    if h2h.low <= threshold:
        return Decision(False, f"{vs_champion}: lower bound is not above {threshold}")
    return Decision(True, f"{vs_reference}; {vs_champion}")
