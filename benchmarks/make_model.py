"""Benchmark models: a Llama from a LlamaConfig with a realistic vocabulary.

The tokenizer is a byte-level BPE fitted on the data (the builder of ``models/tiny_llama.py``).
On the embedded corpus BPE saturates at about 850 tokens, so the model's embedding and output
layer are sized to the preset's vocabulary (32000 rows, the rest never produced by the
tokenizer, as in real models with padded vocabularies): the output layer (vocab x hidden) then
dominates the cost, as it does for small real models.

    python -m benchmarks.make_model --preset 4m --out .dpoflow/bench/llama-4m
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from dpoflow.models.tiny_llama import _train_tokenizer

# name -> vocab, hidden, layers, heads (and the architecture, MLP width, key/value heads)
PRESETS: dict[str, dict[str, int | str]] = {
    # 4.2 M non-embedding + 8.2 M tied embedding (32000 x 256): 12.4 M in all
    "4m": dict(vocab_size=32000, hidden_size=256, num_layers=4, num_heads=4),
    # 33.2 M in all: 16.4 M tied embedding (32000 x 512), 16.8 M in 4 layers (4.2 M each)
    "30m": dict(vocab_size=32000, hidden_size=512, num_layers=4, num_heads=8),
    # 95.4 M in all (the LoRA bench on a CPU): 24.6 M tied embedding (32000 x 768), 70.8 M
    # in 10 layers
    "100m": dict(vocab_size=32000, hidden_size=768, num_layers=10, num_heads=12),
    # 137.8 M in all, for a GPU: 24.6 M tied embedding (32000 x 768), 113.2 M in 12 layers
    "140m": dict(vocab_size=32000, hidden_size=768, num_layers=12, num_heads=12),
    # Qwen2.5-0.5B's shape, random weights: 494.0 M in all, 136.1 M tied embedding
    # (151936 x 896), 24 layers with grouped-query attention (14 query heads, 2 key/value).
    "0.5b": dict(
        arch="qwen2",
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_layers=24,
        num_heads=14,
        num_kv_heads=2,
    ),
}


def corpus(data_path: Path) -> list[str]:
    texts: list[str] = []
    with open(data_path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                pair = json.loads(line)
                texts += [pair["prompt"] + pair["chosen"], pair["prompt"] + pair["rejected"]]
    return texts


def preset_config(preset: str, tokenizer, *, max_positions: int = 512):
    """The preset's model config (Llama, or Qwen2 where the preset says so)."""
    p = PRESETS[preset]
    config_class = Qwen2Config if p.get("arch") == "qwen2" else LlamaConfig
    return config_class(
        vocab_size=max(p["vocab_size"], len(tokenizer)),
        hidden_size=p["hidden_size"],
        intermediate_size=p.get("intermediate_size", 4 * p["hidden_size"]),
        num_hidden_layers=p["num_layers"],
        num_attention_heads=p["num_heads"],
        num_key_value_heads=p.get("num_kv_heads", p["num_heads"]),
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def ensure_model(out: Path, data_path: Path, preset: str, *, max_positions: int = 512) -> Path:
    """Build (once) the preset's model and tokenizer into ``out``."""
    if (out / "config.json").is_file():
        return out
    tokenizer = _train_tokenizer(corpus(data_path), PRESETS[preset]["vocab_size"])
    config = preset_config(preset, tokenizer, max_positions=max_positions)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    tokenizer.save_pretrained(out)
    model.save_pretrained(out)
    return out


def count_parameters(model_dir: Path) -> dict[str, int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    total = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight.numel()
    return {"total": total, "embedding": embedding, "non_embedding": total - embedding}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", choices=sorted(PRESETS), required=True)
    parser.add_argument("--data", type=Path, required=True, help="JSONL of prompt/chosen/rejected")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    ensure_model(args.out, args.data, args.preset)
    print(json.dumps(count_parameters(args.out)))


if __name__ == "__main__":
    main()
