"""Reference log-probs, computed once.

π_ref is frozen, so log π_ref(y|x) depends only on (reference model, data):
compute it for every pair once, store it keyed by example id, and let every
β of a sweep and every epoch read it instead of running the reference model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dpoflow.models.logprobs import pair_batch, sequence_logps, split_pair_logps, tokenize_example

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@torch.inference_mode()
def compute_reference_logps(
    model_dir: str,
    pairs_path: str | Path,
    *,
    max_length: int,
    max_prompt_length: int,
    batch_size: int = 64,
    precision: str = "fp32",
    device: str | None = None,
    progress=None,
    revision: str | None = None,
) -> dict:
    """{"ids": [P], "chosen": [P] float32, "rejected": [P] float32} for every pair.

    ``precision`` is the training's (fp32, bf16 or fp16): the reference runs with the weights
    the policy starts from, so the policy's log-ratio is zero before its first step. ``device``
    defaults to the GPU when there is one. ``revision`` pins a hub model (ignored for a folder).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, revision=revision)
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, revision=revision, dtype=DTYPES[precision]
    )
    model = model.to(device).eval()
    with open(pairs_path, encoding="utf-8") as f:
        pairs = [json.loads(line) for line in f if line.strip()]
    limits = dict(max_length=max_length, max_prompt_length=max_prompt_length)

    if progress:
        progress(0, len(pairs))  # loaded: the forward passes start
    tokenized = []
    for p in pairs:
        prompt_ids, chosen_ids = tokenize_example(tokenizer, p["prompt"], p["chosen"], **limits)
        _, rejected_ids = tokenize_example(tokenizer, p["prompt"], p["rejected"], **limits)
        tokenized.append((prompt_ids, chosen_ids, rejected_ids))
    # Batches of pairs of similar length pad less; each pair's log-probs do not depend on
    # which batch it is in, and go back to file order below.
    order = sorted(range(len(pairs)), key=lambda i: _row_length(tokenized[i]))
    chosen = torch.empty(len(pairs), dtype=torch.float32)  # [P]
    rejected = torch.empty(len(pairs), dtype=torch.float32)  # [P]
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        batch = pair_batch([tokenized[i] for i in rows], pad_id)
        logps = sequence_logps(model, {k: v.to(device) for k, v in batch.items()})["logps"]
        c, r = split_pair_logps(logps.float().cpu())  # [B], [B]
        chosen[rows], rejected[rows] = c, r
        if progress:
            progress(min(start + batch_size, len(pairs)), len(pairs))
    return {"ids": pair_ids(pairs), "chosen": chosen, "rejected": rejected}


def pair_ids(pairs: list[dict]) -> list[str]:
    """Each pair's key in the stored log-probs: its `id` (the validate stage and the bench
    write one), else its row number, so a file without ids still pairs up with itself."""
    return [str(p.get("id", f"row-{i}")) for i, p in enumerate(pairs)]


def _row_length(pair: tuple[list[int], list[int], list[int]]) -> int:
    """The longer of a pair's two rows (prompt + answer): its padded width in a batch."""
    prompt_ids, chosen_ids, rejected_ids = pair
    return len(prompt_ids) + max(len(chosen_ids), len(rejected_ids))
