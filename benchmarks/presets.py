"""Bench presets: a model built from a config and synthetic pairs of realistic lengths.

`python -m benchmarks dpo --preset 0.5b` builds (once, under .dpoflow/bench/) the preset's
model (benchmarks/make_model.py, random weights, no download) and enough synthetic pairs
(benchmarks/synthetic.py) for the run, and takes the preset's lengths, batch and steps
unless the command line sets them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from benchmarks.make_model import ensure_model

BENCH_ROOT = Path(".dpoflow/bench")


@dataclass(frozen=True)
class BenchPreset:
    model: str  # a benchmarks/make_model.py preset
    prompt_median: int  # tokens
    answer_median: int
    max_length: int
    max_prompt_length: int
    batch_size: int
    steps: int
    warmup: int


PRESETS: dict[str, BenchPreset] = {
    # What users train, for a GPU: ~0.5 B parameters (Qwen2 shape), prompts ~200 tokens,
    # answers ~250, a long tail to max_length 1024.
    "0.5b": BenchPreset("0.5b", 200, 250, 1024, 512, batch_size=8, steps=20, warmup=3),
    # For 2 CPU cores: the 4m model, prompts about 3x the answers (the shared prompt's case).
    "long-prompt": BenchPreset("4m", 120, 40, 320, 256, batch_size=8, steps=8, warmup=2),
}


def ensure_preset(name: str, n_pairs: int, root: Path = BENCH_ROOT) -> tuple[Path, Path]:
    """(model folder, pairs file) of the preset, built on first use; the pairs file holds at
    least ``n_pairs`` pairs."""
    from transformers import AutoTokenizer

    from benchmarks.synthetic import write_synthetic_pairs
    from dpoflow.tasks.sources import ensure_embedded_data

    preset = PRESETS[name]
    corpus = ensure_embedded_data(root.parent) / "train.jsonl"  # the tokenizer is fitted on it
    model = ensure_model(
        root / f"{preset.model}-model",
        corpus,
        preset.model,
        max_positions=max(512, preset.max_length),
    )
    data = root / f"pairs-{name}-{n_pairs}.jsonl"
    if not data.is_file():
        stats = write_synthetic_pairs(
            data,
            AutoTokenizer.from_pretrained(model),
            n_pairs=n_pairs,
            prompt_median=preset.prompt_median,
            answer_median=preset.answer_median,
            max_length=preset.max_length,
            max_prompt_length=preset.max_prompt_length,
        )
        data.with_suffix(".lengths.json").write_text(json.dumps(stats))
    return model, data
