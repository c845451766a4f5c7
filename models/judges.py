"""Judges: the "true" reward used to label pairs and to compare policy and reference samples.

Two kinds, chosen by `eval.judge`:

* a pointwise `Judge` scores whole texts (prompt + answer), higher meaning better. Win rates
  only need an ordering, so the scale is judge-specific; VADER's compound score lies in
  [-1, 1], a reward model's is its logit;
* a `PairwiseJudge` (the LLM judge, `models/llm_judge.py`) sees two answers side by side and
  returns a verdict per pair, because that is how LLM judges are reliable; it has no scale.
"""

from __future__ import annotations

from typing import Any

from dpoflow.config import JUDGES
from dpoflow.errors import ConfigError, ModelError
from dpoflow.models.judge_protocol import Judge, PairwiseJudge


def _check_pairs(prompts: list[str], answers: list[str]) -> None:
    if len(prompts) != len(answers):
        raise ValueError(
            f"got {len(prompts)} prompts but {len(answers)} answers; they must pair up"
        )


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
        _check_pairs(prompts, answers)
        return [
            float(self._analyzer.polarity_scores(prompt + answer)["compound"])
            for prompt, answer in zip(prompts, answers, strict=True)
        ]


class RewardModelJudge:
    """A Hugging Face sequence-classification model with one output: the reward's logit.

    It reads ``prompt + answer`` as one text (answers are continuations, as for VADER), in
    batches under inference mode; long texts keep their end, where the answer is.
    """

    name = "reward_model"

    def __init__(
        self,
        path_or_name: str,
        *,
        batch_size: int = 32,
        max_length: int = 512,
        revision: str | None = None,
    ):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        try:
            self._tokenizer = AutoTokenizer.from_pretrained(path_or_name, revision=revision)
            self._model = AutoModelForSequenceClassification.from_pretrained(
                path_or_name, revision=revision, dtype=torch.float32
            ).eval()
        except (OSError, ValueError) as exc:
            raise ModelError(
                f"cannot load a reward model from {path_or_name!r} ({exc.__class__.__name__}): "
                "set eval.reward_model to a sequence-classification folder or hub name."
            ) from exc
        if self._model.config.num_labels != 1:
            raise ModelError(
                f"reward model {path_or_name!r} has {self._model.config.num_labels} labels: "
                "use a model with a single reward output (num_labels=1)."
            )
        if self._tokenizer.pad_token_id is None:
            self._tokenizer.pad_token = self._tokenizer.eos_token
        # Sequence classifiers pool at the last non-pad token, which they find by its id.
        self._model.config.pad_token_id = self._tokenizer.pad_token_id
        self._tokenizer.truncation_side = "left"
        self._batch_size = batch_size
        self._max_length = max_length

    def score(self, prompts: list[str], answers: list[str]) -> list[float]:
        import torch

        _check_pairs(prompts, answers)
        texts = [prompt + answer for prompt, answer in zip(prompts, answers, strict=True)]
        scores: list[float] = []
        for start in range(0, len(texts), self._batch_size):
            batch = self._tokenizer(
                texts[start : start + self._batch_size],
                padding=True,
                truncation=True,
                max_length=self._max_length,
                return_tensors="pt",
            )
            batch.pop("token_type_ids", None)
            with torch.inference_mode():
                logits = self._model(**batch).logits
            scores.extend(float(v) for v in logits[:, 0].double())
        return scores


def _vader(section: dict[str, Any]) -> Judge:
    return VaderJudge()


def _reward_model(section: dict[str, Any]) -> Judge:
    if not section.get("reward_model"):
        raise ConfigError(
            "eval.judge is reward_model but eval.reward_model is not set: set it to a "
            "sequence-classification model folder or hub name."
        )
    return RewardModelJudge(section["reward_model"], batch_size=section.get("batch_size", 32))


def _llm(section: dict[str, Any]) -> PairwiseJudge:
    from dpoflow.models.llm_judge import LLMJudge

    llm = section.get("llm") or {}
    if not llm.get("base_url") or not llm.get("model"):
        raise ConfigError(
            "eval.judge is llm but eval.llm.base_url or eval.llm.model is not set: set both "
            "to the chat-completions endpoint and the model it serves."
        )
    return LLMJudge(**llm)


_JUDGES = {"vader": _vader, "reward_model": _reward_model, "llm": _llm}
assert set(_JUDGES) == set(JUDGES), "every judge the config accepts has a factory here"


def make_judge(name: str, section: dict[str, Any] | None = None) -> Judge | PairwiseJudge:
    """Build the judge a config names from its eval section (options: `reward_model`, `llm`);
    unknown names are a config mistake the user can fix."""
    try:
        factory = _JUDGES[name]
    except KeyError:
        allowed = ", ".join(sorted(JUDGES))
        raise ConfigError(f"Unknown judge {name!r}; set judge to one of: {allowed}.") from None
    return factory(section or {})
