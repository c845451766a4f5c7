"""Sampling answers from a causal language model, and loading one.

Evaluation compares a policy against its reference on the answers each one
samples, so sampling has to be cheap (batched, KV cache) and reproducible: the
same seed gives the same answers whatever the batch order, and temperature 0
is plain greedy decoding.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from dpoflow.errors import ModelError
from dpoflow.models.logprobs import prompt_token_ids
from dpoflow.models.progress import Progress

# Mixes the batch index into the user's seed; a large prime keeps seeds of
# neighbouring batches and neighbouring user seeds apart.
_SEED_STRIDE = 1_000_003


def load_causal_lm(
    path_or_name: str, *, dtype: torch.dtype = torch.float32, revision: str | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, ready for generation (eval mode, a pad token).
    `revision` pins a hub model (a branch, tag or commit); a local folder ignores it.

    Failures become a `ModelError` with one sentence, because a wrong path is the
    usual cause and the user can fix it.
    """
    if _looks_like_local_path(path_or_name) and not Path(path_or_name).is_dir():
        raise ModelError(
            f"Model folder {path_or_name!r} does not exist: train or download the model "
            "first, or fix the path in the config."
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(path_or_name, revision=revision)
        model = AutoModelForCausalLM.from_pretrained(path_or_name, revision=revision, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise ModelError(
            f"Cannot load a causal language model from {path_or_name!r} "
            f"({exc.__class__.__name__}): point to a folder saved with save_pretrained "
            "or a model name in the local Hugging Face cache."
        ) from exc
    if tokenizer.pad_token_id is None:
        # Padding positions are masked out, so any token will do; eos always exists.
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model, tokenizer


def _looks_like_local_path(path_or_name: str) -> bool:
    """A hub name is `name` or `org/name`; anything else is meant as a folder."""
    path = Path(path_or_name)
    return (
        path.is_absolute()
        or path_or_name.startswith((".", "~"))
        or len(path.parts) > 2
        or path.exists()
    )


@dataclass(frozen=True)
class Sample:
    """One sampled answer as token ids: the prompt the model was given (bos included) and the
    tokens it wrote, its eos included when it stopped by itself (not when max_new_tokens cut
    it). Scoring these ids, not re-encoded text, gives the log-probs of what was sampled."""

    prompt_ids: list[int]
    answer_ids: list[int]


def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    **sampling,
) -> list[str]:
    """Sample one answer per prompt and return only the answer text (see `sample`)."""
    return answer_texts(tokenizer, sample(model, tokenizer, prompts, **sampling))


def answer_texts(tokenizer: PreTrainedTokenizerBase, samples: list[Sample]) -> list[str]:
    """The answers as text, without their eos."""
    return [tokenizer.decode(s.answer_ids, skip_special_tokens=True) for s in samples]


def sample(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    *,
    max_new_tokens: int = 32,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 64,
    seed: int = 0,
    first_batch: int = 0,
    log: Callable[[str], None] | None = None,
) -> list[Sample]:
    """Sample one answer per prompt, as token ids.

    Prompts are encoded as `[bos] + encode(prompt)` (no other special tokens),
    left-padded so every row's next token is at the same column, and sampled
    until eos. Each batch reseeds from `(seed, batch index)`, so a batch's
    samples do not depend on how many batches ran before it; the caller's
    global RNG state is left as it was. `temperature=0` means greedy decoding.
    `first_batch` numbers the batches from there: sampling a list in pieces of
    `batch_size` prompts, piece k with `first_batch=k`, gives the same answers as one call.
    `log`, if given, gets progress lines (`Progress`).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    encoded = [_encode_prompt(tokenizer, prompt) for prompt in prompts]
    samples: list[Sample] = []
    progress = Progress("generation", len(prompts), "prompts", log) if log else None
    for index, batch in enumerate(_chunks(encoded, batch_size)):
        answer_ids = _generate_batch(
            model,
            tokenizer,
            batch,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed * _SEED_STRIDE + first_batch + index,
        )
        samples += [Sample(p, a) for p, a in zip(batch, answer_ids, strict=True)]
        if progress:
            progress.update(len(samples))
    return samples


def _encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """Token ids of a prompt: bos (if the tokenizer has one), then the text.

    The same function training uses (`prompt_token_ids`), so the model sees the same
    prefix at evaluation. An empty prompt without bos starts from eos, since
    generation needs at least one token to condition on.
    """
    ids = prompt_token_ids(tokenizer, prompt)
    return ids or [tokenizer.eos_token_id]


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _left_pad(rows: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad to a rectangle; returns (input_ids, attention_mask)."""
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            input_ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            attention_mask[i, width - len(row) :] = 1
    return input_ids, attention_mask


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _sampling_kwargs(temperature: float, top_p: float) -> dict:
    """Generation settings spelled out in full.

    The model's own `generation_config` (and transformers' defaults such as
    top_k=50) would otherwise fill in anything left unset, and a policy and its
    reference must sample under exactly the same rules.
    """
    common = {"num_beams": 1, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0}
    if temperature == 0:
        return {**common, "do_sample": False}
    return {**common, "do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}


def _generate_batch(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    rows: list[list[int]],
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int,
) -> list[list[int]]:
    """Generate for one batch; returns each row's new tokens, up to and including the first
    eos."""
    pad_id = _pad_id(tokenizer)
    input_ids, attention_mask = _left_pad(rows, pad_id)
    device = model.device
    rng_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.inference_mode(), torch.random.fork_rng(devices=rng_devices):
        torch.manual_seed(seed)
        output = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            max_new_tokens=max_new_tokens,
            min_new_tokens=0,
            pad_token_id=pad_id,
            eos_token_id=tokenizer.eos_token_id,
            use_cache=True,
            **_sampling_kwargs(temperature, top_p),
        )
    new_tokens = output[:, input_ids.shape[1] :].tolist()
    return [_through_eos(ids, tokenizer.eos_token_id) for ids in new_tokens]


def _through_eos(ids: list[int], eos_token_id: int | None) -> list[int]:
    """Drop what follows the first eos (generate pads finished rows); the eos stays."""
    if eos_token_id is not None and eos_token_id in ids:
        return ids[: ids.index(eos_token_id) + 1]
    return ids
