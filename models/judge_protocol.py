"""What a judge is: the verdict type and the two judge interfaces, in one home.

`models/judges.py` builds the judges a config names and `models/llm_judge.py` is one of
them; both import this module and never each other's protocol, so there is no cycle.
"""

from __future__ import annotations

from typing import Literal, Protocol, runtime_checkable

# The first answer's verdict against the second; "unparseable" is counted, never guessed.
Verdict = Literal["win", "tie", "loss", "unparseable"]


@runtime_checkable
class Judge(Protocol):
    """Anything with a ``name`` that scores (prompt, answer) pairs, higher is better."""

    name: str

    def score(self, prompts: list[str], answers: list[str]) -> list[float]: ...


@runtime_checkable
class PairwiseJudge(Protocol):
    """Anything with a ``name`` that compares two answers to each prompt.

    ``compare`` returns, per prompt, the verdict for ``answers_a`` against ``answers_b``.
    """

    name: str

    def compare(
        self, prompts: list[str], answers_a: list[str], answers_b: list[str]
    ) -> list[Verdict]: ...
