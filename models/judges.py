"""Judges: the "true" reward used to label pairs and to compare policy and reference samples.

A judge scores whole texts (prompt + answer), higher meaning better. Win rates only need
an ordering, so the scale is judge-specific; VADER's compound score lies in [-1, 1].
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from flows.errors import ConfigError


@runtime_checkable
class Judge(Protocol):
    """Anything with a ``name`` that scores (prompt, answer) pairs, higher is better."""

    name: str

    def score(self, prompts: list[str], answers: list[str]) -> list[float]: ...


class VaderJudge:
    """Sentiment judge from the DPO paper's IMDb setting, with VADER instead of a classifier.

    VADER is a small rule-based lexicon, so it runs offline and instantly on CPU. It scores
    ``prompt + answer`` because answers are continuations and only read naturally joined.
    """

    name = "vader"

    def __init__(self) -> None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self._analyzer = SentimentIntensityAnalyzer()

    def score(self, prompts: list[str], answers: list[str]) -> list[float]:
        if len(prompts) != len(answers):
            raise ValueError(
                f"got {len(prompts)} prompts but {len(answers)} answers; they must pair up"
            )
        return [
            float(self._analyzer.polarity_scores(prompt + answer)["compound"])
            for prompt, answer in zip(prompts, answers, strict=True)
        ]


_JUDGES = {"vader": VaderJudge}


def make_judge(name: str) -> Judge:
    """Build the judge a config names; unknown names are a config mistake the user can fix."""
    try:
        factory = _JUDGES[name]
    except KeyError:
        allowed = ", ".join(sorted(_JUDGES))
        raise ConfigError(f"Unknown judge {name!r}; set judge to one of: {allowed}.") from None
    return factory()
