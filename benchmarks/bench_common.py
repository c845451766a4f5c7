"""What both sides of a benchmark share: the spec, thread settings, peak memory, step timing."""

from __future__ import annotations

import json
import os
import resource
import sys
from pathlib import Path
from typing import Any

Spec = dict[str, Any]  # kind, model, data, steps, warmup, batch_size, max_length, ...


def rate_name(kind: str) -> str:
    """The throughput figure of a kind of run: DPO counts pairs, SFT sequences."""
    return "pairs_per_s" if kind == "dpo" else "sequences_per_s"


def setup_threads(spec: Spec) -> None:
    import torch

    torch.set_num_threads(int(spec["threads"]))


def peak_rss_mb() -> float:
    """Peak resident memory of this process (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_gpu_mb() -> float | None:
    """Peak GPU memory held by this process's tensors (torch's allocator), if it used a GPU."""
    import torch

    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return None
    return torch.cuda.max_memory_allocated() / 2**20


def timed_window(step_times: list[float], warmup: int) -> float:
    """Seconds from the end of the last warm-up step to the end of the last step.

    ``step_times[k]`` is the time at the end of step k+1, counted from the loop's start."""
    return step_times[-1] - (step_times[warmup - 1] if warmup else 0.0)


def child_main(run) -> None:
    """`python -m benchmarks.<side> SPEC.json OUT.json`: run one side, write its figures."""
    spec = json.loads(Path(sys.argv[1]).read_text())
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    setup_threads(spec)
    result = run(spec)
    result["peak_rss_mb"] = peak_rss_mb()
    if spec.get("device") == "cuda":
        result["peak_gpu_mb"] = peak_gpu_mb()
    Path(sys.argv[2]).write_text(json.dumps(result, indent=2))


def lora_settings(spec: Spec) -> dict[str, Any] | None:
    """`--lora-r R`: the adapters both sides train (alpha 2R, no dropout, every linear layer
    but the output head), as the config's `model.lora` section; None (R = 0) = full FT."""
    r = int(spec.get("lora_r") or 0)
    if r == 0:
        return None
    return {"r": r, "alpha": float(2 * r), "dropout": 0.0, "target_modules": "all-linear"}


def write_report(report: dict, text: str, json_path: Path | None, log) -> dict:
    """Print a bench's report and, when asked, write its JSON."""
    log(text)
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=2))
    return report
