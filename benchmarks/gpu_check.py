"""DPO on one GPU with ZeRO-2 in bf16 on a ~100 M-parameter Llama: throughput and memory.

Builds the model from a config (no download), makes synthetic pairs with the
embedded generator, precomputes reference log-probs, then runs the real
trainer under the `deepspeed` launcher for 50 steps.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dpoflow.config import DistributedConfig, DPOConfig  # noqa: E402
from dpoflow.models.reference import compute_reference_logps  # noqa: E402
from dpoflow.tasks.launcher import run_training  # noqa: E402
from dpoflow.tasks.sources import ensure_embedded_data  # noqa: E402


def build_model(out: Path, tokenizer_source: Path) -> None:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=12,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def main() -> None:
    from dpoflow.tasks.sources import ensure_embedded_model

    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    data = ensure_embedded_data(work) / "train.jsonl"
    model = work / "llama-100m"
    build_model(model, ensure_embedded_model(work))
    ref = compute_reference_logps(
        str(model), data, max_length=128, max_prompt_length=32, precision="bf16"
    )
    torch.save(ref, work / "ref.pt")
    job = {
        "kind": "dpo",
        "train": DPOConfig(
            max_steps=50,
            batch_size=32,
            max_length=128,
            max_prompt_length=32,
            learning_rate=1e-5,
            checkpoint_every=1000,
        ).model_dump(),
        "distributed": DistributedConfig(num_gpus=1, zero_stage=2, precision="bf16").model_dump(),
        "model_path": str(model),
        "data_path": str(data),
        "reference_logps_path": str(work / "ref.pt"),
        "output_dir": str(work / "out" / "model"),
        "checkpoint_dir": str(work / "out" / "checkpoints"),
        "metrics_path": str(work / "out" / "metrics.jsonl"),
    }
    (work / "out").mkdir()
    rows: list[dict] = []
    result = run_training(job, work / "out", log=print, on_metrics=rows.extend)
    last = rows[-1]
    print(
        json.dumps(
            {
                "pairs_per_s": round(last["pairs_per_s"], 1),
                "tokens_per_s": round(last["tokens_per_s"], 1),
                "peak_gpu_mb": result.get("peak_gpu_mb"),
                "final_loss": round(last["loss"], 4),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
