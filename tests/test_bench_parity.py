"""Loss parity with TRL: the same first batch, the same weights, our loss == DPOTrainer's."""

from __future__ import annotations

import json

import pytest
import torch

trl = pytest.importorskip("trl")

from models.logprobs import sequence_logps, split_pair_logps  # noqa: E402
from models.losses import preference_loss  # noqa: E402
from models.tiny_llama import _build_model, _train_tokenizer  # noqa: E402

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
        model = _build_model(tokenizer, seed=seed, hidden_size=32, num_layers=2, num_heads=2,
                             max_position_embeddings=64)
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        paths[name] = root / name
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    return paths, data


@pytest.mark.xfail(
    strict=True,
    reason="open: TRL 1.16's log-probs (fused_lm_head path) differ from ours by ~4e-5 in loss",
)
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_first_batch_loss_matches_trl(models, loss_type, tmp_path):
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    paths, data = models
    tokenizer = AutoTokenizer.from_pretrained(paths["policy"])
    policy = AutoModelForCausalLM.from_pretrained(paths["policy"], dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(paths["reference"], dtype=torch.float32)
    args = DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=len(PAIRS),
                     beta=0.1, loss_type=[loss_type], max_length=64, report_to=[],
                     use_cpu=True, disable_tqdm=True)
    trainer = DPOTrainer(model=policy, ref_model=reference, args=args,
                         train_dataset=load_dataset("json", data_files=str(data), split="train"),
                         processing_class=tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    policy.eval()  # no dropout either side (the tiny Llama has none; be explicit)
    with torch.no_grad():
        trl_loss = trainer.compute_loss(policy, batch).item()

        ours = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                "loss_mask": batch["completion_mask"].bool()}
        out = sequence_logps(policy, ours)
        policy_c, policy_r = split_pair_logps(out["logps"])
        ref_c, ref_r = split_pair_logps(sequence_logps(reference, ours)["logps"])
        len_c, len_r = split_pair_logps(out["n_tokens"].float())
        losses, _, _ = preference_loss(policy_c, policy_r, ref_c, ref_r, beta=0.1,
                                       loss_type=loss_type, chosen_lengths=len_c,
                                       rejected_lengths=len_r)
    assert abs(losses.mean().item() - trl_loss) < 1e-5
    assert abs(trl_loss - (0.6931 if loss_type == "sigmoid" else 25.0)) > 1e-3  # not trivial
