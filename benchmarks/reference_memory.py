"""Peak memory of DPO with stored reference log-probs against loading the reference model.

    python benchmarks/reference_memory.py [--hidden 512 --layers 8 --steps 10]

Both runs use the real trainer under the `deepspeed` launcher on the same data,
model and settings; only `dpo.reference` differs. Prints each run's peak
resident memory (the training process) and the ratio.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dpoflow.config import DistributedConfig, DPOConfig  # noqa: E402
from dpoflow.models.reference import compute_reference_logps  # noqa: E402
from dpoflow.tasks.launcher import run_training  # noqa: E402
from dpoflow.tasks.sources import ensure_embedded_data, ensure_embedded_model  # noqa: E402


def build_model(out: Path, tokenizer_dir: Path, hidden: int, layers: int) -> int:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=hidden,
            intermediate_size=4 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=hidden // 64,
            num_key_value_heads=hidden // 64,
            max_position_embeddings=256,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def run(work: Path, model: Path, data: Path, reference: str, steps: int) -> dict:
    out = work / reference
    out.mkdir()
    ref_path = None
    if reference == "precomputed":  # what the pipeline's `reference` stage stores
        stored = compute_reference_logps(str(model), data, max_length=64, max_prompt_length=16)
        torch.save(stored, work / "ref.pt")
        ref_path = str(work / "ref.pt")
    job = {
        "kind": "dpo",
        "train": DPOConfig(
            max_steps=steps,
            batch_size=32,
            max_length=64,
            max_prompt_length=16,
            checkpoint_every=10_000,
            reference=reference,
        ).model_dump(),
        "distributed": DistributedConfig().model_dump(),
        "model_path": str(model),
        "data_path": str(data),
        "reference_logps_path": ref_path,
        "output_dir": str(out / "model"),
        "checkpoint_dir": str(out / "checkpoints"),
        "metrics_path": str(out / "metrics.jsonl"),
    }
    return run_training(job, out, log=lambda line: None, on_metrics=lambda rows: None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ref-memory-"))
    data = ensure_embedded_data(work) / "train.jsonl"
    model = work / "model"
    n_params = build_model(model, ensure_embedded_model(work), args.hidden, args.layers)
    figures = {"parameters_m": round(n_params / 1e6, 1)}
    for reference in ("precomputed", "on_the_fly"):
        result = run(work, model, data, reference, args.steps)
        figures[reference] = {
            "peak_rss_mb": round(result["peak_rss_mb"], 1),
            "pairs_per_s": round(result["final_metrics"]["pairs_per_s"], 2),
        }
    figures["memory_ratio_precomputed_over_on_the_fly"] = round(
        figures["precomputed"]["peak_rss_mb"] / figures["on_the_fly"]["peak_rss_mb"], 3
    )
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
