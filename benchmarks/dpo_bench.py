"""`dpoflow bench dpo|sft`: our trainer against TRL's on the same model, data and machine.

Each side runs in its own subprocess (so its peak resident memory is its own), one after the
other (never both at once on a shared machine), on the same subset of the data: exactly
(warmup + steps) x batch_size pairs, so each side sees every pair once. The first `warmup`
steps are not timed. Figures: pairs (or sequences) per second, real tokens per second (no
padding), peak RSS, the fraction of this machine's fp32 matmul ceiling reached (model FLOPs
estimated as 6 x params x tokens for training plus 2 x params x tokens for reference
forwards), the losses of the first steps, and ours / TRL.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def matmul_ceiling_gflops(threads: int, size: int = 1024, seconds: float = 2.0) -> float:
    """Best fp32 GFLOP/s of a square torch.mm loop on this machine, with `threads` threads."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)  # warm-up
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2 * size**3 / (time.perf_counter() - t0) / 1e9)
    return best


def parameter_count(model_dir: str) -> int:
    from transformers import AutoConfig, AutoModelForCausalLM

    with __import__("torch").device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    return sum(p.numel() for p in model.parameters())


def write_subset(data: Path, n_pairs: int, out: Path) -> Path:
    lines = [line for line in data.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(lines) < n_pairs:
        raise ValueError(f"{data} has {len(lines)} pairs; the run needs {n_pairs}.")
    out.write_text("\n".join(lines[:n_pairs]) + "\n", encoding="utf-8")
    return out


def run_side(module: str, spec: dict, work: Path, log) -> dict:
    """Run `python -m benchmarks.<module>` on the spec; return its figures."""
    spec_path, out_path = work / f"{module}.spec.json", work / f"{module}.out.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ, PYTHONPATH=str(PROJECT_ROOT), TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS=str(spec["threads"]), DS_ACCELERATOR="cpu")
    proc = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{module}", str(spec_path), str(out_path)],
        cwd=PROJECT_ROOT, env=env, capture_output=True, text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{module} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    log(f"{module}: done")
    return json.loads(out_path.read_text())


def figures(side: dict, spec: dict, params: int, ceiling: float) -> dict[str, Any]:
    seconds, tokens = side["seconds"], side["tokens"]
    reference = 2 * params * tokens if spec["kind"] == "dpo" else 0
    flops = 6 * params * tokens + reference
    return {
        "pairs_per_s" if spec["kind"] == "dpo" else "sequences_per_s": side["examples"] / seconds,
        "tokens_per_s": tokens / seconds,
        "peak_rss_mb": side["peak_rss_mb"],
        "matmul_fraction": flops / seconds / (ceiling * 1e9),
        "seconds": seconds,
        "losses": side["losses"][: spec["warmup"] + 5],
    }


def run_bench(spec: dict, peer: str | None, json_path: Path | None, log=print) -> dict:
    """Run our side and (with peer='trl') TRL's; print and return the report."""
    n_pairs = (spec["warmup"] + spec["steps"]) * spec["batch_size"]
    work = Path(tempfile.mkdtemp(prefix="dpoflow-bench-"))
    spec = dict(spec, data=str(write_subset(Path(spec["data"]), n_pairs, work / "data.jsonl")))
    ceiling = matmul_ceiling_gflops(spec["threads"])
    params = parameter_count(spec["model"])
    report: dict[str, Any] = {
        "settings": {k: v for k, v in spec.items() if k != "data"},
        "params": params,
        "matmul_ceiling_gflops": ceiling,
        "ours": figures(run_side("ours_side", spec, work, log), spec, params, ceiling),
    }
    if peer == "trl":
        report["trl"] = figures(run_side("trl_peer", spec, work, log), spec, params, ceiling)
        rate = "pairs_per_s" if spec["kind"] == "dpo" else "sequences_per_s"
        report["ratio"] = {
            k: report["ours"][k] / report["trl"][k]
            for k in (rate, "tokens_per_s", "peak_rss_mb", "matmul_fraction")
        }
    log(format_report(report))
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=2))
    return report


def format_report(report: dict) -> str:
    s = report["settings"]
    lines = [
        f"{s['kind']} bench: model {s['model']} ({report['params'] / 1e6:.1f} M params), "
        f"batch {s['batch_size']}, max_length {s['max_length']}, {s['steps']} timed steps "
        f"after {s['warmup']} warm-up, {s['threads']} threads",
        f"fp32 matmul ceiling: {report['matmul_ceiling_gflops']:.1f} GFLOP/s",
    ]
    sides = [k for k in ("ours", "trl", "ratio") if k in report]
    keys = [k for k in report["ours"] if k not in ("losses", "seconds")]
    lines.append(f"{'':16}" + "".join(f"{k:>14}" for k in sides))
    for key in keys:
        row = "".join(f"{report[k].get(key, float('nan')):>14.3f}" for k in sides)
        lines.append(f"{key:16}{row}")
    for side in ("ours", "trl"):
        if side in report:
            losses = ", ".join(f"{v:.5f}" for v in report[side]["losses"])
            lines.append(f"{side} losses (first steps): {losses}")
    return "\n".join(lines)
