"""Packed and shared-prompt DPO batches (models/packing.py) score exactly what padded rows do."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from dpoflow.config import DPOConfig
from dpoflow.models.logprobs import pair_batch, sequence_logps
from dpoflow.models.packing import pack_pairs, packed_sequence_logps, pair_inputs
from dpoflow.models.trainer import DPOObjective, length_grouped, micro_batches

PAD = 0
# (prompt, chosen, rejected) lengths: uneven on purpose (a one-token prompt, a one-token
# answer, a long prompt), so units of different lengths share packed rows.
LENGTHS = [(5, 3, 7), (1, 9, 2), (12, 4, 4), (3, 1, 1), (2, 6, 5)]


def _model(attn: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=61,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention, as Qwen2 and Llama 3
        max_position_embeddings=64,
        pad_token_id=PAD,
        attn_implementation=attn,
    )
    return LlamaForCausalLM(config)


def _pairs() -> list[tuple[list[int], list[int], list[int]]]:
    g = torch.Generator().manual_seed(1)

    def ids(n: int) -> list[int]:
        return torch.randint(3, 61, (n,), generator=g).tolist()

    return [(ids(p), ids(c), ids(r)) for p, c, r in LENGTHS]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("share_prompt", [False, True])
def test_packed_logps_and_gradients_equal_padded_rows(attn, share_prompt):
    model, pairs = _model(attn), _pairs()
    weights = torch.linspace(0.5, 1.5, 2 * len(pairs))  # a different weight per sequence

    def run(logps_fn, batch) -> tuple[dict, list[torch.Tensor]]:
        model.zero_grad()
        out = logps_fn(model, batch)
        (out["logps"] * weights).sum().backward()
        return out, [p.grad.clone() for p in model.parameters()]

    padded, padded_grads = run(sequence_logps, pair_batch(pairs, PAD))
    packed, packed_grads = run(
        packed_sequence_logps, pack_pairs(pairs, PAD, share_prompt=share_prompt)
    )
    # per sequence, in pair_batch's order (chosen rows, then rejected)
    torch.testing.assert_close(packed["logps"], padded["logps"], rtol=0, atol=1e-5)
    assert packed["n_tokens"].tolist() == padded["n_tokens"].tolist()
    torch.testing.assert_close(packed["logits_mean"], padded["logits_mean"], rtol=0, atol=1e-5)
    for got, want in zip(packed_grads, padded_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_packing_drops_padding_and_the_second_prompt():
    pairs = _pairs()
    padded = pair_batch(pairs, PAD)["input_ids"].numel()
    real = sum(2 * len(p) + len(c) + len(r) for p, c, r in pairs)
    packed = pack_pairs(pairs, PAD, share_prompt=False)
    shared = pack_pairs(pairs, PAD, share_prompt=True)
    assert packed.real_tokens == real
    assert shared.real_tokens == real - sum(len(p) for p, _, _ in pairs)
    # rows are no wider than the padded batch's, and there are fewer positions in all
    assert packed.input_ids.shape[1] <= max(len(p) + max(len(c), len(r)) for p, c, r in pairs)
    assert packed.input_ids.numel() < padded
    assert shared.input_ids.numel() < packed.input_ids.numel()


@pytest.mark.parametrize("packing", ["packed", "shared_prompt"])
def test_dpo_objective_loss_is_the_same_in_every_layout(packing):
    """The trainer's DPO step (dpo.packing) gives the padded layout's loss and metrics."""
    model, pairs = _model("sdpa"), _pairs()
    examples = [(*pair, i) for i, pair in enumerate(pairs)]
    reference = {"chosen": -torch.arange(5.0) - 20, "rejected": -torch.arange(5.0) - 21}
    idx = list(range(len(pairs)))

    def step(mode: str) -> dict[str, torch.Tensor]:
        cfg = DPOConfig(packing=mode, rpo_alpha=0.3).model_dump()
        loss, metrics = DPOObjective(cfg, reference)(model, examples, idx, PAD, cfg)
        return {"loss": loss.detach(), **metrics}

    want, got = step("padded"), step(packing)
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=1e-5, msg=name)


def test_an_attention_that_takes_no_custom_mask_is_refused_with_the_fix():
    model = _model("sdpa")
    model.config._attn_implementation = "flash_attention_2"
    batch, logps_fn = pair_inputs(_pairs(), PAD, "packed", "cpu")
    with pytest.raises(ValueError, match="attn_implementation='sdpa' or set dpo.packing: padded"):
        logps_fn(model, batch)


def test_length_grouping_keeps_the_step_and_cuts_the_padding():
    """dpo.group_by_length orders the global batch before it is cut into micro-batches: the
    step's loss and gradient are the same (each micro-batch still holds half the pairs), and
    the padded micro-batches hold fewer positions."""
    model = _model("sdpa")
    g = torch.Generator().manual_seed(2)
    lengths = [(2, 2, 3), (14, 9, 12), (3, 1, 2), (12, 11, 8), (2, 3, 1), (13, 10, 9)]
    examples = [
        (*(torch.randint(3, 61, (n,), generator=g).tolist() for n in sizes), i)
        for i, sizes in enumerate(lengths)
    ]
    reference = {"chosen": -torch.arange(6.0) - 20, "rejected": -torch.arange(6.0) - 21}
    cfg = DPOConfig().model_dump()
    batch = [0, 1, 2, 3, 4, 5]

    def step(order: list[int]) -> tuple[float, list[torch.Tensor], int]:
        model.zero_grad()
        total, positions = 0.0, 0
        for idx in micro_batches(order, 2, rank=0, world=1):
            loss, _ = DPOObjective(cfg, reference)(model, examples, idx, PAD, cfg)
            (loss / 2).backward()
            total += loss.item() / 2
            positions += pair_batch([examples[i][:3] for i in idx], PAD)["input_ids"].numel()
        return total, [p.grad.clone() for p in model.parameters()], positions

    grouped = length_grouped(batch, examples)
    assert sorted(grouped) == batch and grouped != batch
    loss, grads, positions = step(batch)
    loss_grouped, grads_grouped, positions_grouped = step(grouped)
    assert loss_grouped == pytest.approx(loss, abs=1e-6)
    for got, want in zip(grads_grouped, grads, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert positions_grouped < 0.8 * positions
