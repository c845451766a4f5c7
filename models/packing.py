"""Padding-free preference batches: pairs packed end to end, optionally one prompt per pair.

A padded batch (models/logprobs.py ``pair_batch``) holds 2B rows, prompt + chosen and prompt +
rejected, each right-padded to the longest: the model runs over the padding, and over every
prompt twice. Here the same 2B sequences become *units* placed end to end in a few packed rows:

* ``packed``: one unit per sequence (prompt + answer), so no position holds padding except
  the tail of a packed row;
* ``shared_prompt``: one unit per pair, prompt + chosen + rejected, so the prompt is encoded
  once and both answers attend to its keys and values.

Each token gets the position id it would have in its own sequence (an answer continues at
the prompt's length, the rejected answer too) and attends only to what it would see in the
padded batch, through one 4D mask [R, 1, C, C] that the installed transformers passes
through untouched to its attention (SDPA's boolean ``attn_mask``, or eager's additive one).
Key k is visible from query q when both are in the same unit, k is not after q, and k is
in the prompt or in q's own answer. So every scored log-prob is the padded batch's, up to
float rounding (tests/test_packing.py).

Units are placed first-fit by decreasing length into rows as wide as the longest unit: with
SDPA's dense mask a row costs attention over its whole width squared, so no row is made
wider than the padded batch's (or the shared unit's) longest; shorter units fill the gaps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from dpoflow.config import PACKING_MODES
from dpoflow.models.logprobs import answer_states, pair_batch, score_answers, sequence_logps

# Branch of a token inside its unit: the prompt (seen by every token after it), or an answer
# (seen only by the same answer's later tokens).
_PROMPT, _CHOSEN, _REJECTED = 0, 1, 2


@dataclass
class PackedPairs:
    """A preference batch packed into R rows of C positions.

    ``scored`` [M] are flat indices (row * C + column) of the positions whose hidden state
    predicts each answer token ``targets`` [M]; ``rows`` [M] is that token's sequence in
    pair_batch's order (chosen 0..B-1, then rejected B..2B-1), so the outputs line up with
    the padded path's.
    """

    input_ids: Tensor  # [R, C] long
    position_ids: Tensor  # [R, C] long
    unit: Tensor  # [R, C] long: the unit of each position (padding: a unit of its own)
    branch: Tensor  # [R, C] long: _PROMPT, _CHOSEN or _REJECTED
    scored: Tensor  # [M] long
    targets: Tensor  # [M] long
    rows: Tensor  # [M] long
    n_rows: int  # 2B

    def to(self, device: torch.device | str) -> PackedPairs:
        moved = {
            name: getattr(self, name).to(device, non_blocking=True)
            for name in ("input_ids", "position_ids", "unit", "branch", "scored", "targets", "rows")
        }
        return PackedPairs(**moved, n_rows=self.n_rows)

    @property
    def real_tokens(self) -> int:
        """Positions holding a token (not a packed row's tail)."""
        return int((self.unit >= 0).sum())


def pack_pairs(
    tokenized_pairs: Sequence[tuple[list[int], list[int], list[int]]],
    pad_token_id: int,
    *,
    share_prompt: bool,
) -> PackedPairs:
    """(prompt_ids, chosen_ids, rejected_ids) x B -> PackedPairs.

    As in the padded batch, an answer token at position 0 (an empty prompt) has no prefix and
    is not scored.
    """
    if not tokenized_pairs:
        raise ValueError("pack_pairs needs at least one pair.")
    n_pairs = len(tokenized_pairs)
    # A unit: [(tokens, branch, output row or None for the prompt)], in the order they sit.
    units: list[list[tuple[list[int], int, int | None]]] = []
    for i, (prompt, chosen, rejected) in enumerate(tokenized_pairs):
        if share_prompt:
            units.append(
                [(prompt, _PROMPT, None), (chosen, _CHOSEN, i), (rejected, _REJECTED, n_pairs + i)]
            )
        else:
            units.append([(prompt, _PROMPT, None), (chosen, _CHOSEN, i)])
    if not share_prompt:
        units += [
            [(prompt, _PROMPT, None), (rejected, _REJECTED, n_pairs + i)]
            for i, (prompt, _, rejected) in enumerate(tokenized_pairs)
        ]

    lengths = [sum(len(part) for part, _, _ in unit) for unit in units]
    width = max(lengths)
    # First-fit decreasing: each unit goes into the first row with room for it.
    row_of_unit, row_fill = [0] * len(units), []
    for u in sorted(range(len(units)), key=lambda u: -lengths[u]):
        row = next((r for r, fill in enumerate(row_fill) if fill + lengths[u] <= width), None)
        if row is None:
            row_fill.append(0)
            row = len(row_fill) - 1
        row_of_unit[u] = row
        row_fill[row] += lengths[u]

    n_packed = len(row_fill)
    input_ids = torch.full((n_packed, width), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((n_packed, width), dtype=torch.long)
    # Padding at a row's tail: each position a unit of its own (-1 - column), so it sees only
    # itself; a query row with nothing visible would make SDPA return NaN.
    unit_ids = -1 - torch.arange(width).repeat(n_packed, 1)
    branch = torch.zeros((n_packed, width), dtype=torch.long)
    scored: list[int] = []
    targets: list[int] = []
    out_rows: list[int] = []
    cursor = [0] * n_packed
    for u in range(len(units)):
        row = row_of_unit[u]
        start = cursor[row]
        col = start
        prompt_last = None  # column of the prompt's last token: it predicts each answer's first
        for tokens, part_branch, out_row in units[u]:
            n = len(tokens)
            first_position = 0 if part_branch == _PROMPT else len(units[u][0][0])
            input_ids[row, col : col + n] = torch.tensor(tokens, dtype=torch.long)
            position_ids[row, col : col + n] = torch.arange(first_position, first_position + n)
            unit_ids[row, col : col + n] = u
            branch[row, col : col + n] = part_branch
            if out_row is None:
                prompt_last = col + n - 1 if n else None
            else:
                for k in range(n):
                    predictor = (col + k - 1) if k else prompt_last
                    if predictor is None:  # nothing before it: not scored, as when padded
                        continue
                    scored.append(row * width + predictor)
                    targets.append(tokens[k])
                    out_rows.append(out_row)
            col += n
        cursor[row] = col
    return PackedPairs(
        input_ids=input_ids,
        position_ids=position_ids,
        unit=unit_ids,
        branch=branch,
        scored=torch.tensor(scored, dtype=torch.long),
        targets=torch.tensor(targets, dtype=torch.long),
        rows=torch.tensor(out_rows, dtype=torch.long),
        n_rows=2 * n_pairs,
    )


def attention_mask(packed: PackedPairs) -> Tensor:
    """[R, 1, C, C] bool, True where query q may attend to key k (see the module's doc)."""
    unit, branch = packed.unit, packed.branch  # [R, C]
    width = unit.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=unit.device).tril()  # [C, C]
    same_unit = unit[:, :, None] == unit[:, None, :]  # [R, C, C]
    same_branch = branch[:, :, None] == branch[:, None, :]
    key_in_prompt = (branch == _PROMPT)[:, None, :]
    return (same_unit & causal & (same_branch | key_in_prompt))[:, None]  # [R, 1, C, C]


def model_mask(model: nn.Module, mask: Tensor) -> Tensor:
    """The boolean mask in the form the model's attention takes a custom 4D mask.

    transformers passes a 4D mask to the attention as it is: SDPA reads True as "attend";
    eager attention adds the mask to its scores, so it gets 0 / the dtype's minimum.
    """
    config = getattr(model, "config", None)
    implementation = getattr(config, "_attn_implementation", None) or "eager"
    if implementation == "sdpa":
        return mask
    if implementation == "eager":
        dtype = next(model.parameters()).dtype
        additive = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
        return additive.masked_fill_(~mask, torch.finfo(dtype).min)
    raise ValueError(
        f"dpo.packing needs the model's attention to take a custom mask (sdpa or eager), but it "
        f"uses {implementation!r}: load it with attn_implementation='sdpa' or set "
        "dpo.packing: padded."
    )


def packed_sequence_logps(
    model: nn.Module, packed: PackedPairs, *, chunk_size: int | None = None
) -> dict[str, Tensor]:
    """sequence_logps's outputs ([2B] logps, n_tokens, logits_mean, in pair_batch's order) from
    one forward pass over the packed rows."""
    inputs = {
        "input_ids": packed.input_ids,
        "position_ids": packed.position_ids,
        "attention_mask": model_mask(model, attention_mask(packed)),
    }
    states, head = answer_states(model, inputs, lambda h: h.flatten(0, 1)[packed.scored])
    return score_answers(
        states, head, packed.targets, packed.rows, packed.n_rows, chunk_size=chunk_size
    )


LogpsFn = Callable[[nn.Module, Any], dict[str, Tensor]]


def pair_inputs(
    tokenized_pairs: Sequence[tuple[list[int], list[int], list[int]]],
    pad_token_id: int,
    packing: str,
    device: torch.device | str,
) -> tuple[Any, LogpsFn]:
    """The DPO forward's batch in the layout ``packing`` names (dpo.packing), on ``device``,
    and the function that scores it: ``logps_fn(model, batch)`` gives sequence_logps's
    outputs in pair_batch's order (chosen rows, then rejected) whatever the layout."""
    if packing == "padded":
        batch = pair_batch(list(tokenized_pairs), pad_token_id)
        return {k: v.to(device, non_blocking=True) for k, v in batch.items()}, sequence_logps
    if packing not in PACKING_MODES:
        raise ValueError(f"unknown packing {packing!r}: use one of {', '.join(PACKING_MODES)}.")
    packed = pack_pairs(tokenized_pairs, pad_token_id, share_prompt=packing == "shared_prompt")
    return packed.to(device), packed_sequence_logps
