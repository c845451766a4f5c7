"""What the training loop logs is measured, not a placeholder: the gradient norm and the
held-out drift metrics, each checked against a plain computation."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.test_training import embedded, make_job, train  # noqa: F401  (fixture)

pytestmark = pytest.mark.slow


def dpo_setup(embedded: dict, job: dict):  # noqa: F811
    """The model, the objective and the training/held-out examples, as the trainer builds
    them for `job` (before any step)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dpoflow.models.trainer import (
        DPOObjective,
        dpo_examples,
        load_reference_logps,
        read_pairs,
        split_heldout,
    )

    cfg = job["train"]
    tokenizer = AutoTokenizer.from_pretrained(embedded["model"])
    model = AutoModelForCausalLM.from_pretrained(embedded["model"], dtype=torch.float32)
    pairs = read_pairs(embedded["data"])
    objective = DPOObjective(cfg, load_reference_logps(embedded["ref"], pairs))
    examples, heldout = split_heldout(dpo_examples(pairs, tokenizer, cfg), cfg)
    return model, objective, examples, heldout, tokenizer.pad_token_id or tokenizer.eos_token_id


def test_grad_norm_is_the_real_norm_and_heldout_drift_is_logged(embedded, tmp_path):  # noqa: F811
    """ZeRO-0 in fp32 (the default): DeepSpeed keeps no gradient norm there, so the loop
    measures it; step 1's must equal the norm of plain autograd's gradient of the same batch
    (two micro-batches accumulated, as DeepSpeed scales them), before clipping."""
    from dpoflow.models.trainer import batch_indices, micro_batches

    job = make_job(embedded, tmp_path, max_steps=2, grad_accum=2, eval_every=2, eval_examples=16)
    _, rows = train(job, tmp_path)
    logged = rows[0]["grad_norm"]

    cfg = job["train"]
    model, objective, examples, _, pad_id = dpo_setup(embedded, job)
    first_batch = batch_indices(len(examples), 0, cfg["batch_size"], cfg["seed"])
    for idx in micro_batches(first_batch, 2, rank=0, world=1):
        loss, _ = objective(model, examples, idx, pad_id, cfg)
        (loss / 2).backward()
    plain = math_norm([p.grad for p in model.parameters() if p.grad is not None])
    print(f"step 1 grad_norm: logged {logged:.6f}, plain autograd {plain:.6f}")
    assert plain > cfg["max_grad_norm"] / 100  # a real gradient, not a vanishing one
    assert logged == pytest.approx(plain, rel=1e-4)
    assert rows[1]["grad_norm"] > 0 and rows[1]["grad_norm"] != logged

    # The held-out drift metrics arrive at eval_every (step 2), not before.
    drift = {"eval/kl_ref_policy", "eval/length/chosen", "eval/length/rejected"}
    assert not drift & set(rows[0]) and drift <= set(rows[1])
    print(f"step 2 eval/kl_ref_policy {rows[1]['eval/kl_ref_policy']:.5f}")
    assert rows[1]["eval/kl_ref_policy"] != 0  # two steps moved the policy off its reference
    probe = json.loads((tmp_path / "reference_samples.json").read_text())
    assert len(probe["answers"]) == len(probe["reference_logps"]) == 16  # eval_examples


def math_norm(grads: list[torch.Tensor]) -> float:
    return sum(float((g.double() ** 2).sum()) for g in grads) ** 0.5


def plain_logp(model, prompt_ids: list[int], answer_ids: list[int]) -> float:
    """log p(answer | prompt), one sequence at a time, from the logits by hand."""
    ids = torch.tensor([prompt_ids + answer_ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    start = len(prompt_ids)
    return sum(float(logprobs[start - 1 + i, t]) for i, t in enumerate(answer_ids))


def test_heldout_kl_estimate_and_lengths_match_a_plain_computation(embedded):  # noqa: F811
    """The drift probe: answers sampled from the reference, scored by it at step 0 and by the
    moved policy later; the KL estimate is the mean difference of plain per-answer log-probs.
    The lengths are the held-out answers' mean token counts."""
    from transformers import AutoTokenizer

    from dpoflow.models.drift import DriftProbe, sample_answers
    from dpoflow.models.trainer import evaluate_heldout

    job = make_job(embedded, Path("unused"), eval_every=1, eval_examples=24, batch_size=8)
    cfg = job["train"]
    model, objective, _, heldout, pad_id = dpo_setup(embedded, job)
    tokenizer = AutoTokenizer.from_pretrained(embedded["model"])
    prompts = [tokenizer.decode(e[0], skip_special_tokens=True) for e in heldout]
    answers = sample_answers(model, tokenizer, prompts, max_new_tokens=12, batch_size=8, seed=0)
    probe = DriftProbe.record(model, answers, pad_id, batch_size=8)
    reference = [plain_logp(model, p, a) for p, a in answers]
    engine = SimpleNamespace(module=model)

    same = evaluate_heldout(engine, objective, heldout, pad_id, cfg, world=1, probe=probe)
    assert abs(same["eval/kl_ref_policy"]) < 1e-5  # the policy is still its reference

    with torch.no_grad():  # move the policy: noise on its output head
        head = model.get_output_embeddings().weight
        head.add_(torch.randn(head.shape, generator=torch.Generator().manual_seed(0)) * 0.05)
    moved = evaluate_heldout(engine, objective, heldout, pad_id, cfg, world=1, probe=probe)
    now = [plain_logp(model, p, a) for p, a in answers]
    plain_kl = sum(r - n for r, n in zip(reference, now, strict=True)) / len(answers)
    print(f"KL(ref || policy): probe {moved['eval/kl_ref_policy']:.5f}, plain {plain_kl:.5f}")
    assert plain_kl > 0.01
    assert moved["eval/kl_ref_policy"] == pytest.approx(plain_kl, rel=1e-4)
    assert moved["eval/length/chosen"] == pytest.approx(
        sum(len(e[1]) for e in heldout) / len(heldout)
    )
    assert moved["eval/length/rejected"] == pytest.approx(
        sum(len(e[2]) for e in heldout) / len(heldout)
    )
    assert moved["eval/loss"] != same["eval/loss"]  # the ordinary held-out metrics still come
