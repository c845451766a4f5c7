"""Synthetic preference pairs with the length distribution of real preference data.

Real sets (UltraFeedback, HH) have prompts of a few hundred tokens and answers of a few
hundred more, with a long tail: lengths are close to log-normal. The embedded IMDb set has
~20-token rows, far from that. Here each pair's prompt and answer lengths (in the bench
model's tokens) are drawn from log-normal distributions with the given medians, clipped so
that the prompt fits max_prompt_length and prompt + answer fits max_length (nothing is
truncated, so the bench measures the lengths drawn). The text is random tokens of the
model's tokenizer: content does not matter for throughput, lengths do.

    python -m benchmarks.synthetic --model DIR --out pairs.jsonl --pairs 512 \
        --prompt-median 200 --answer-median 250 --max-length 1024 --max-prompt-length 512
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
from pathlib import Path

# The spread of the log-normal lengths: a median of 250 puts ~5% of answers above 690.
SIGMA = 0.6


def draw_length(rng: random.Random, median: int, low: int, high: int) -> int:
    return max(low, min(high, round(rng.lognormvariate(math.log(median), SIGMA))))


def write_synthetic_pairs(
    out: Path,
    tokenizer,
    *,
    n_pairs: int,
    prompt_median: int,
    answer_median: int,
    max_length: int,
    max_prompt_length: int,
    seed: int = 0,
) -> dict[str, float]:
    """Write ``n_pairs`` prompt/chosen/rejected rows to ``out`` (JSONL, with ids); return the
    median and maximum token lengths written (re-tokenized, as the trainer will see them)."""
    rng = random.Random(seed)
    special = set(tokenizer.all_special_ids)
    # Tokens that decode to printable text: a byte-level vocabulary also holds control bytes
    # and pieces of multi-byte characters, which the data checks rightly refuse.
    words = [
        i
        for i in range(len(tokenizer))
        if i not in special
        and (piece := tokenizer.decode([i])).strip()
        and piece.isprintable()
        and "\ufffd" not in piece
    ]
    # Room left for the bos the trainer adds before the prompt and the eos after each answer.
    bos = 1 if tokenizer.bos_token_id is not None else 0

    def text(n_tokens: int) -> tuple[str, int]:
        # Decoding random ids and encoding again can merge or split tokens: cut the
        # re-encoded ids to the drawn length, and report that length.
        ids = tokenizer.encode(
            tokenizer.decode([rng.choice(words) for _ in range(n_tokens)]),
            add_special_tokens=False,
        )[:n_tokens]
        body = tokenizer.decode(ids).strip()
        n = len(tokenizer.encode(body, add_special_tokens=False))
        while n > n_tokens:  # re-encoding merged differently: shorten until it fits
            ids = ids[: len(ids) - (n - n_tokens)]
            body = tokenizer.decode(ids).strip()
            n = len(tokenizer.encode(body, add_special_tokens=False))
        return body, n

    prompts, answers, lines = [], [], []
    for i in range(n_pairs):
        prompt, n_prompt = text(draw_length(rng, prompt_median, 8, max_prompt_length - bos))
        room = max_length - n_prompt - bos - 1
        chosen, n_chosen = text(draw_length(rng, answer_median, 4, room))
        rejected, n_rejected = text(draw_length(rng, answer_median, 4, room))
        prompts.append(n_prompt)
        answers += [n_chosen, n_rejected]
        row = {"id": f"synthetic-{i}", "prompt": prompt, "chosen": chosen, "rejected": rejected}
        lines.append(json.dumps(row, ensure_ascii=False))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {
        "prompt_median": statistics.median(prompts),
        "prompt_max": max(prompts),
        "answer_median": statistics.median(answers),
        "answer_max": max(answers),
    }


def main() -> None:
    from transformers import AutoTokenizer

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, required=True, help="its tokenizer is used")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--pairs", type=int, required=True)
    parser.add_argument("--prompt-median", type=int, required=True)
    parser.add_argument("--answer-median", type=int, required=True)
    parser.add_argument("--max-length", type=int, required=True)
    parser.add_argument("--max-prompt-length", type=int, required=True)
    args = parser.parse_args()
    stats = write_synthetic_pairs(
        args.out,
        AutoTokenizer.from_pretrained(args.model),
        n_pairs=args.pairs,
        prompt_median=args.prompt_median,
        answer_median=args.answer_median,
        max_length=args.max_length,
        max_prompt_length=args.max_prompt_length,
    )
    print(json.dumps(stats))


if __name__ == "__main__":
    main()
