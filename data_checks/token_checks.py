"""Token-level helper columns for the suite: the rows exactly as training will build them.

Text checks cannot see the bugs that live in tokens: a second bos where a chat template
already wrote one, an answer that ends with its own eos text before the real eos is added,
answers cut to nothing at `max_length`, a prompt whose last tokens merge with the answer's
first ones. These columns are computed with the real tokenizer and the training's own
tokenization (passed in as `tokenize`, the `tokenize_example` of `dpoflow.models.logprobs`
with the DPO limits bound), so what is checked is what is trained on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pandas as pd

Tokenize = Callable[[str, str], tuple[list[int], list[int]]]  # (prompt, answer) -> ids
ANSWERS = ("chosen", "rejected")


@dataclass(frozen=True)
class Truncation:
    """How many answers `max_length` cuts: for the check's sentence."""

    count: int
    answers: int
    longest: int  # tokens of the longest prompt + whole answer

    @property
    def share(self) -> float:
        return self.count / self.answers if self.answers else 0.0


def token_columns(
    texts: dict[str, pd.Series], tokenizer: Any, tokenize: Tokenize, templated: bool
) -> tuple[pd.DataFrame, Truncation]:
    """One row per pair: True/False per check (None where a value is not text), and the
    share of the pair's two answers that were truncated."""
    index = texts["prompt"].index
    columns: dict[str, list] = {
        name: [] for name in ("prefix", "bos", "eos", "answer_left", "truncated")
    }
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    special = {t for t in (bos, eos, tokenizer.pad_token_id) if t is not None}
    count = answers = longest = 0
    for row in index:
        prompt, pair = texts["prompt"][row], [texts[a][row] for a in ANSWERS]
        if not all(isinstance(v, str) for v in (prompt, *pair)):
            for values in columns.values():
                values.append(None)
            continue
        body = tokenizer.encode(prompt, add_special_tokens=False)
        prefix = bos_ok = eos_ok = left = True
        truncated = 0
        for answer in pair:
            whole = tokenizer.encode(prompt + answer, add_special_tokens=False)
            prefix &= whole[: len(body)] == body
            prompt_ids, answer_ids = tokenize(prompt, answer)
            # A template may write the bos token inside the prompt too (some use it to open
            # every turn): then only a second one at the very start counts.
            after_first = prompt_ids[1:2] if templated else prompt_ids[1:]
            bos_ok &= bos is None or (bos not in after_first and bos not in answer_ids)
            full = len(tokenizer.encode(answer, add_special_tokens=False)) + 1  # + its eos
            cut = len(answer_ids) < full
            # eos only as the last token, and there unless max_length cut the answer
            eos_ok &= eos not in answer_ids[:-1] and (cut or answer_ids[-1:] == [eos])
            left &= any(t not in special for t in answer_ids)
            truncated += cut
            longest = max(longest, len(prompt_ids) + full)
        count, answers = count + truncated, answers + 2
        for name, value in zip(columns, (prefix, bos_ok, eos_ok, left, truncated / 2), strict=True):
            columns[name].append(value)
    frame = pd.DataFrame(
        {f"__token_{k}": pd.Series(v, index=index, dtype=object) for k, v in columns.items()}
    )
    frame["__token_truncated"] = frame["__token_truncated"].astype("float64")
    return frame, Truncation(count, answers, longest)
