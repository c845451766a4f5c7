"""Tokenization, batching and answer log-probs: one implementation for SFT, reference, DPO, eval.

A sequence is prompt_ids + answer_ids, right-padded. ``loss_mask`` marks answer tokens (eos
included). The log-prob of a sequence is the sum over its answer tokens of
log p(token | all previous tokens). A token at position 0 has no prefix and is never scored,
so an answer should always follow a non-empty prompt (a bos token suffices).

Preference pairs are batched as 2B sequences, chosen rows first, rejected rows after, so the
policy (and the reference) need one forward pass per batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn


def tokenize_example(
    tokenizer, prompt: str, answer: str, *, max_length: int, max_prompt_length: int
) -> tuple[list[int], list[int]]:
    """Return (prompt_ids, answer_ids), with len(prompt_ids) + len(answer_ids) <= max_length.

    The prompt keeps its END (the question usually sits last) and its leading bos; the answer
    keeps its start, so a truncated answer loses its eos.
    """
    if not 0 < max_prompt_length < max_length:
        raise ValueError(
            f"Need 0 < max_prompt_length < max_length, got {max_prompt_length} and {max_length}."
        )
    if tokenizer.eos_token_id is None:
        raise ValueError("The tokenizer has no eos token; answers must end with one.")
    ids = prompt_token_ids(tokenizer, prompt)
    n_bos = 1 if tokenizer.bos_token_id is not None else 0
    bos, body = ids[:n_bos], ids[n_bos:]
    keep = max_prompt_length - len(bos)
    prompt_ids = bos + (body[-keep:] if keep > 0 else [])
    answer_ids = tokenizer.encode(answer, add_special_tokens=False) + [tokenizer.eos_token_id]
    return prompt_ids, answer_ids[: max_length - len(prompt_ids)]


def prompt_token_ids(tokenizer, prompt: str) -> list[int]:
    """bos (if the tokenizer has one), then the prompt's tokens: how training, the reference
    and generation all begin a sequence.

    A prompt rendered by a chat template often begins with the bos text already (the template
    writes it); encoded, that is a bos token, which is not doubled.
    """
    body = tokenizer.encode(prompt, add_special_tokens=False)
    bos = tokenizer.bos_token_id
    if bos is None:
        return body
    return [bos, *(body[1:] if body[:1] == [bos] else body)]


def collate(examples: list[tuple[list[int], list[int]]], pad_token_id: int) -> dict[str, Tensor]:
    """Right-pad (prompt_ids, answer_ids) examples into one batch.

    Returns input_ids [N, T] long, attention_mask [N, T] long, loss_mask [N, T] bool (True on
    answer tokens).
    """
    if not examples:
        raise ValueError("collate needs at least one example.")
    width = max(len(p) + len(a) for p, a in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)  # [N, T]
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)  # [N, T]
    loss_mask = torch.zeros((len(examples), width), dtype=torch.bool)  # [N, T]
    for row, (prompt_ids, answer_ids) in enumerate(examples):
        n_prompt, n_total = len(prompt_ids), len(prompt_ids) + len(answer_ids)
        input_ids[row, :n_total] = torch.tensor(prompt_ids + answer_ids, dtype=torch.long)
        attention_mask[row, :n_total] = 1
        loss_mask[row, n_prompt:n_total] = True
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}


def pair_batch(
    tokenized_pairs: list[tuple[list[int], list[int], list[int]]], pad_token_id: int
) -> dict[str, Tensor]:
    """(prompt_ids, chosen_ids, rejected_ids) x B -> one batch of 2B rows: chosen, then rejected."""
    chosen = [(prompt, chosen) for prompt, chosen, _ in tokenized_pairs]
    rejected = [(prompt, rejected) for prompt, _, rejected in tokenized_pairs]
    return collate(chosen + rejected, pad_token_id)


def split_pair_logps(values: Tensor) -> tuple[Tensor, Tensor]:
    """[2B, ...] -> ([B, ...] chosen, [B, ...] rejected), the inverse of pair_batch's order."""
    n_rows = values.shape[0]
    if n_rows % 2:
        raise ValueError(f"Expected an even number of rows (chosen + rejected), got {n_rows}.")
    half = n_rows // 2
    return values[:half], values[half:]


def sequence_logps(
    model: nn.Module, batch: dict[str, Tensor], *, chunk_size: int | None = None
) -> dict[str, Tensor]:
    """Sum of answer-token log-probs per sequence, from one forward pass.

    Returns "logps" [N] (float32, or float64 for a float64 model), "n_tokens" [N] long (number
    of scored answer tokens) and "logits_mean" [N] (detached mean logit over answer positions,
    for the logits/chosen metric). Gradients flow through "logps".

    The output head runs only at the positions that predict answer tokens (in chunks of
    ``chunk_size`` positions if given; without gradients, NO_GRAD_LOGITS_BYTES of logits at a
    time), so float32 logits are never built for the whole batch.
    """
    input_ids, loss_mask = batch["input_ids"], batch["loss_mask"]  # [N, T], [N, T]
    target_mask = loss_mask[:, 1:]  # [N, T-1]: position t predicts token t+1
    rows = target_mask.nonzero(as_tuple=True)[0]  # [M] row of each scored token
    targets = input_ids[:, 1:][target_mask]  # [M]

    inputs = {"input_ids": input_ids, "attention_mask": batch["attention_mask"]}
    states, head = answer_states(model, inputs, lambda h: h[:, :-1][target_mask])  # [M, H or V]
    return score_answers(states, head, targets, rows, input_ids.shape[0], chunk_size=chunk_size)


# The float32 logits made at once when no gradient is taken (reference, evaluation, probes).
NO_GRAD_LOGITS_BYTES = 256 << 20


def score_answers(
    states: Tensor,
    head: nn.Module,
    targets: Tensor,
    rows: Tensor,
    n_rows: int,
    *,
    chunk_size: int | None = None,
) -> dict[str, Tensor]:
    """Per-row answer log-probs from the states that predict each answer token.

    ``states`` [M, H] (or logits [M, V] with an identity ``head``) predict ``targets`` [M];
    ``rows`` [M] says which of the ``n_rows`` sequences each token belongs to. Returns
    sequence_logps's dict. Shared by the padded batch (here) and the packed one
    (models/packing.py), so both score tokens with the same arithmetic.
    """
    token_logps, token_logit_means = [], []
    vocab = getattr(head, "out_features", None)  # None: `states` are already logits
    if chunk_size is None and vocab and not torch.is_grad_enabled():
        # Without gradients nothing keeps the logits, so they need not exist for every answer
        # token at once: the answers of a reference batch of 64 pairs (~32k tokens) with a
        # 152k vocabulary made 19 GB of float32 logits.
        chunk_size = max(1, NO_GRAD_LOGITS_BYTES // (4 * vocab))
    step = chunk_size or max(len(targets), 1)
    for start in range(0, len(targets), step):
        logits = head(states[start : start + step])  # [m, V]
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        token_logps.append(_TokenLogps.apply(logits, targets[start : start + step]))  # [m]
        token_logit_means.append(logits.detach().mean(dim=-1))  # [m]
        del logits

    dtype = torch.promote_types(states.dtype, torch.float32)
    logps = _row_sums(token_logps, rows, n_rows, dtype)  # [N]
    n_tokens = torch.zeros(n_rows, dtype=torch.long, device=rows.device).index_add_(
        0, rows, torch.ones_like(rows)
    )  # [N]
    logit_sums = _row_sums(token_logit_means, rows, n_rows, dtype)  # [N]
    logits_mean = logit_sums / n_tokens.clamp(min=1)  # [N]
    return {"logps": logps, "n_tokens": n_tokens, "logits_mean": logits_mean}


_LOG_SOFTMAX_CHUNK_BYTES = 4 << 20


class _TokenLogps(torch.autograd.Function):
    """log softmax(logits)[target] per row, with a backward that needs one [m, V] buffer.

    Forward is ``logits.log_softmax(-1).gather(-1, targets)``, the same values; but autograd
    through those two ops keeps the [m, V] log-probs for the backward and then builds two more
    [m, V] tensors (the scattered gradient of the gather, then the gradient of the log-softmax).
    Here the log-probs are dropped after the gather, the logits are kept instead (the same
    size), and the backward writes its one [m, V] result in place:
    d logp_i / d logits_ij = [j == target_i] - softmax(logits_i)_j. With a 32000-row vocabulary
    the [m, V] float32 tensors dominate a small model's step: this saves one of them at the
    step's peak (about 46 MB at m = 360 answer tokens) and a pass over it.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor) -> Tensor:
        # log_softmax over a few rows at a time: the values are the same (each row is computed
        # on its own), but the [m, V] log-probs are never built whole (about 45 MB at m = 360
        # answer tokens and V = 32000, at the forward's memory peak).
        rows = max(1, _LOG_SOFTMAX_CHUNK_BYTES // (logits.shape[-1] * logits.element_size()))
        logps = logits.new_empty(logits.shape[0])  # [m]
        for start in range(0, logits.shape[0], rows):
            chunk = logits[start : start + rows].log_softmax(dim=-1)  # [rows, V]
            logps[start : start + rows] = chunk.gather(-1, targets[start : start + rows, None])[
                :, 0
            ]
        ctx.save_for_backward(logits, targets)
        return logps

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        logits, targets = ctx.saved_tensors  # [m, V], [m]
        grad_logits = logits.softmax(dim=-1).mul_(-grad[:, None])  # [m, V]
        return grad_logits.scatter_add_(-1, targets[:, None], grad[:, None]), None


def answer_states(
    model: nn.Module, inputs: dict[str, Tensor], select: Callable[[Tensor], Tensor]
) -> tuple[Tensor, nn.Module]:
    """Run the model once on ``inputs``; return (``select``ed hidden states [M, H], lm head),
    or (``select``ed logits [M, V], identity) when the model cannot be split into body and head.

    ``select`` maps a per-position tensor [N, T, X] to the M positions that predict answer
    tokens [M, X]. A peft-wrapped (LoRA) model is split like the model it wraps.
    """
    # peft's wrapper: its `.model` is the whole causal LM, so split the model it wraps instead.
    # LoRA adapters (dpoflow's only kind) sit inside that model's layers, so its body still
    # runs and trains them; a prompt-learning adapter, which the wrapper adds, would be lost.
    unwrap = getattr(model, "get_base_model", None)
    if callable(unwrap):
        model = unwrap()
    body = getattr(model, "model", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    config = getattr(model, "config", None)
    # Models that post-process the logits (soft-capping, scaling) cannot use the bare head.
    plain_head = not (
        getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None)
    )
    if isinstance(body, nn.Module) and isinstance(head, nn.Module) and plain_head:
        outputs = body(**inputs, use_cache=False)
        hidden = getattr(outputs, "last_hidden_state", None)  # [N, T, H]
        if hidden is not None:
            return select(hidden), head  # [M, H]
        # e.g. a wrapper whose .model is itself a causal LM: its output already has logits.
        return select(outputs.logits), nn.Identity()  # [M, V]
    logits = model(**inputs, use_cache=False).logits  # [N, T, V]
    return select(logits), nn.Identity()  # [M, V]


def _row_sums(values: list[Tensor], rows: Tensor, n_rows: int, dtype: torch.dtype) -> Tensor:
    """Sum per-token values [M] (given in chunks) into per-row totals [N]."""
    flat = torch.cat(values).to(dtype) if values else torch.zeros(0, dtype=dtype)  # [M]
    totals = torch.zeros(n_rows, dtype=dtype, device=rows.device)  # [N]
    return totals.index_add(0, rows, flat.to(rows.device))
