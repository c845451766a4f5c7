"""Loss parity with TRL: the same first batch, the same weights, our loss == DPOTrainer's."""

from __future__ import annotations

import json

import pytest
import torch

from dpoflow.models.logprobs import sequence_logps, split_pair_logps
from dpoflow.models.losses import preference_loss
from dpoflow.models.tiny_llama import _build_model, _train_tokenizer
from tests.conftest import require_peer

PAIRS = [
    {"prompt": "The film was", "chosen": " wonderful and warm.", "rejected": " dull."},
    {"prompt": "I watched it", "chosen": " and smiled.", "rejected": " and left early, bored."},
    {"prompt": "Overall the plot", "chosen": " is clever.", "rejected": " made no sense at all."},
    {"prompt": "The actors", "chosen": " shine in every scene.", "rejected": " look lost."},
]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A policy and a different reference (other seed), saved as Hugging Face folders."""
    root = tmp_path_factory.mktemp("parity")
    texts = [p["prompt"] + p[k] for p in PAIRS for k in ("chosen", "rejected")]
    tokenizer = _train_tokenizer(texts * 4, 300)
    paths = {}
    for name, seed in (("policy", 0), ("reference", 1)):
        model = _build_model(
            tokenizer,
            seed=seed,
            hidden_size=32,
            num_layers=2,
            num_heads=2,
            max_position_embeddings=64,
        )
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        paths[name] = root / name
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    return paths, data


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_first_batch_loss_matches_trl(models, loss_type, tmp_path):
    """Both sides in float32: TRL's DPOConfig must be given ``bf16=False``.

    TRL 1.16's configs default to ``bf16=True`` when fp16 is unset
    (``trl/trainer/base_config.py:108``), even with ``use_cpu=True``. DPOTrainer.__init__ then
    prepares the reference model with ``accelerator.prepare_model(ref_model, evaluation_mode=True)``
    (``trl/trainer/dpo_trainer.py:990``), which wraps its forward in ``torch.autocast(bfloat16)``
    plus ``convert_outputs_to_fp32`` (``accelerate/accelerator.py:1824-1835``). The policy handed
    straight to ``compute_loss`` is not prepared (that happens in ``train()``), so it runs in
    float32. With the default, TRL's loss therefore mixes bf16-autocast reference log-probs
    (off by up to ~2e-3 per sequence from float32) with float32 policy log-probs, while ours are
    float32 throughout: a loss gap of ~7e-5 (sigmoid) and ~1e-3 (ipo) that says nothing about
    either implementation. With ``bf16=False`` the per-sequence log-probs of both models agree
    with TRL's fused LM head to ~1e-5 and the losses to float32 rounding.
    """
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    trl = require_peer("trl")
    DPOConfig, DPOTrainer = trl.DPOConfig, trl.DPOTrainer

    paths, data = models
    tokenizer = AutoTokenizer.from_pretrained(paths["policy"])
    policy = AutoModelForCausalLM.from_pretrained(paths["policy"], dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(paths["reference"], dtype=torch.float32)
    args = DPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=len(PAIRS),
        beta=0.1,
        loss_type=[loss_type],
        max_length=64,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        bf16=False,
    )
    trainer = DPOTrainer(
        model=policy,
        ref_model=reference,
        args=args,
        train_dataset=load_dataset("json", data_files=str(data), split="train"),
        processing_class=tokenizer,
    )
    assert trainer.accelerator.mixed_precision == "no"  # the reference forward is not autocast
    batch = next(iter(trainer.get_train_dataloader()))
    policy.eval()  # no dropout either side (the tiny Llama has none; be explicit)
    with torch.no_grad():
        trl_loss = trainer.compute_loss(policy, batch).item()

        ours = {
            "input_ids": batch["input_ids"],
            "attention_mask": batch["attention_mask"],
            "loss_mask": batch["completion_mask"].bool(),
        }
        out = sequence_logps(policy, ours)
        policy_c, policy_r = split_pair_logps(out["logps"])
        ref_c, ref_r = split_pair_logps(sequence_logps(reference, ours)["logps"])
        len_c, len_r = split_pair_logps(out["n_tokens"].float())
        losses, _, _ = preference_loss(
            policy_c,
            policy_r,
            ref_c,
            ref_r,
            beta=0.1,
            loss_type=loss_type,
            chosen_lengths=len_c,
            rejected_lengths=len_r,
        )
    assert abs(losses.mean().item() - trl_loss) < 1e-5
    assert abs(trl_loss - (0.6931 if loss_type == "sigmoid" else 25.0)) > 1e-3  # not trivial
