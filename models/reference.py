"""Reference log-probs, computed once.

π_ref is frozen, so log π_ref(y|x) depends only on (reference model, data):
compute it for every pair training reads once, store it keyed by example id, and let every
β of a sweep and every epoch read it instead of running the reference model.

The pipeline's stage runs `models/reference_worker.py` under the `deepspeed` launcher, sharded
over its processes; `compute_reference_logps` is the same scoring in this process, for every
pair of a file (benchmarks, tests), returning the tensors; the stage stores them as
safetensors (no pickle is written).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from dpoflow.models.logprobs import pair_batch, sequence_logps, split_pair_logps, tokenize_example

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TokenizedPair = tuple[list[int], list[int], list[int]]  # prompt, chosen, rejected ids


def load_reference_model(
    model_dir: str,
    precision: str,
    device: str,
    revision: str | None = None,
    load_in_4bit: bool = False,
) -> tuple[torch.nn.Module, object, int]:
    """(model in eval mode on `device`, tokenizer, pad id) of the reference.

    ``precision`` is the training's (fp32, bf16 or fp16): the reference runs with the weights
    the policy starts from, so the policy's log-ratio is zero before its first step. With
    ``load_in_4bit`` (QLoRA) that is the NF4-quantized base the trainer loads, its other
    weights cast to the precision as DeepSpeed casts the policy's; it stays where it was
    loaded (this rank's GPU), as quantized weights cannot move.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dpoflow.models.lora import load_base_model

    tokenizer = AutoTokenizer.from_pretrained(model_dir, revision=revision)
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    if load_in_4bit:
        model = load_base_model(model_dir, revision=revision, load_in_4bit=True)
        for param in model.parameters():  # the packed NF4 weights are integers and stay
            if param.is_floating_point():
                param.data = param.data.to(DTYPES[precision])
        return model.eval(), tokenizer, pad_id
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, revision=revision, dtype=DTYPES[precision]
    )
    return model.to(device).eval(), tokenizer, pad_id


def tokenize_pairs(
    tokenizer, pairs: list[dict], *, max_length: int, max_prompt_length: int
) -> list[TokenizedPair]:
    """(prompt, chosen, rejected) token ids of each pair, as training tokenizes them."""
    limits = dict(max_length=max_length, max_prompt_length=max_prompt_length)
    out = []
    for p in pairs:
        prompt_ids, chosen_ids = tokenize_example(tokenizer, p["prompt"], p["chosen"], **limits)
        _, rejected_ids = tokenize_example(tokenizer, p["prompt"], p["rejected"], **limits)
        out.append((prompt_ids, chosen_ids, rejected_ids))
    return out


def by_length(tokenized: list[TokenizedPair]) -> list[int]:
    """Positions of `tokenized`, shortest pair first: batches of similar length pad less, and
    each pair's log-probs do not depend on which batch it is in."""
    return sorted(range(len(tokenized)), key=lambda i: row_length(tokenized[i]))


@torch.inference_mode()
def score_pairs(
    model: torch.nn.Module,
    tokenized: list[TokenizedPair],
    pad_id: int,
    *,
    batch_size: int = 64,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen [P], rejected [P]) float32 log-probs of the pairs, in the order given.

    Batches are cut in the order given (sort it with `by_length` first to pad less);
    `on_batch(n)` is called after each batch with the number of pairs it scored.
    """
    device = next(model.parameters()).device
    chosen = torch.empty(len(tokenized), dtype=torch.float32)  # [P]
    rejected = torch.empty(len(tokenized), dtype=torch.float32)  # [P]
    for start in range(0, len(tokenized), batch_size):
        rows = tokenized[start : start + batch_size]
        batch = pair_batch(rows, pad_id)
        logps = sequence_logps(model, {k: v.to(device) for k, v in batch.items()})["logps"]
        c, r = split_pair_logps(logps.float().cpu())  # [B], [B]
        chosen[start : start + len(rows)], rejected[start : start + len(rows)] = c, r
        if on_batch:
            on_batch(len(rows))
    return chosen, rejected


def compute_reference_logps(
    model_dir: str,
    pairs_path: str | Path,
    *,
    max_length: int,
    max_prompt_length: int,
    batch_size: int = 64,
    precision: str = "fp32",
    device: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    revision: str | None = None,
    load_in_4bit: bool = False,
) -> dict:
    """{"ids": [P], "chosen": [P] float32, "rejected": [P] float32} for every pair, in this
    process. ``device`` defaults to the GPU when there is one. ``revision`` pins a hub model
    (ignored for a folder). ``progress(done, total)`` follows the pairs. ``load_in_4bit``:
    the reference of a QLoRA run (`load_reference_model`)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer, pad_id = load_reference_model(
        model_dir, precision, device, revision, load_in_4bit
    )
    with open(pairs_path, encoding="utf-8") as f:
        pairs = [json.loads(line) for line in f if line.strip()]
    tokenized = tokenize_pairs(
        tokenizer, pairs, max_length=max_length, max_prompt_length=max_prompt_length
    )
    done = 0

    def on_batch(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress(done, len(pairs))

    if progress:
        progress(0, len(pairs))  # loaded: the forward passes start
    order = by_length(tokenized)
    sorted_chosen, sorted_rejected = score_pairs(
        model, [tokenized[i] for i in order], pad_id, batch_size=batch_size, on_batch=on_batch
    )
    chosen = torch.empty(len(pairs), dtype=torch.float32)  # [P], back in file order
    rejected = torch.empty(len(pairs), dtype=torch.float32)  # [P]
    chosen[order], rejected[order] = sorted_chosen, sorted_rejected
    return {"ids": pair_ids(pairs), "chosen": chosen, "rejected": rejected}


def save_reference_logps(path: Path, stored: dict) -> None:
    """Write {"ids", "chosen", "rejected"} as safetensors (the ids as JSON in its metadata)."""
    from safetensors.torch import save_file

    tensors = {side: stored[side].contiguous().float() for side in ("chosen", "rejected")}
    save_file(tensors, str(path), metadata={"ids": json.dumps(list(stored["ids"]))})


def read_reference_logps(path: str | Path) -> dict:
    """{"ids", "chosen", "rejected"} from `save_reference_logps`'s file; a `.pt` file (what
    the benchmarks and older runs wrote) is read with torch's weights-only loader."""
    if str(path).endswith(".pt"):
        return torch.load(path, weights_only=True)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        ids = json.loads(f.metadata()["ids"])
        return {"ids": ids, "chosen": f.get_tensor("chosen"), "rejected": f.get_tensor("rejected")}


def pair_ids(pairs: list[dict]) -> list[str]:
    """Each pair's key in the stored log-probs: its `id` (the validate stage and the bench
    write one), else its row number, so a file without ids still pairs up with itself."""
    return [str(p.get("id", f"row-{i}")) for i, p in enumerate(pairs)]


def row_length(pair: TokenizedPair) -> int:
    """The longer of a pair's two rows (prompt + answer): its padded width in a batch."""
    prompt_ids, chosen_ids, rejected_ids = pair
    return len(prompt_ids) + max(len(chosen_ids), len(rejected_ids))
