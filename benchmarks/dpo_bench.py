"""`python -m benchmarks dpo|sft`: our trainer against TRL's on the same model, data and machine.

Each side runs in its own subprocess (so its peak resident memory is its own), one after the
other (never both at once on a shared machine), on the same subset of the data: exactly
(warmup + steps) x batch_size pairs, so each side sees every pair once. The first `warmup`
steps are not timed. For DPO our side is two processes, as in the pipeline: the reference
stage (reference log-probs of every pair, stored once) and then the training job, which reads
them; our time is the training window plus the reference stage's time prorated to the timed
pairs, and our peak memory is the larger of the two processes' peaks (they never run at the
same time); both peaks are reported.

Figures: pairs (or sequences) per second, real tokens per second (no padding), peak RSS (and
peak GPU memory with --device cuda), the fraction of this machine's matmul ceiling reached
(fp32 on the CPU, bf16 on a GPU; model FLOPs estimated as 6 x params x tokens for training
plus 2 x params x tokens for reference forwards), the losses of the first steps, and
ours / TRL.
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

from benchmarks.bench_common import lora_settings, rate_name, write_report

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PEAKS = ("peak_rss_mb", "peak_gpu_mb")  # each process's peak memory; the GPU's on a GPU only


def matmul_ceiling_gflops(threads: int, device: str = "cpu", seconds: float = 2.0) -> float:
    """Best GFLOP/s of a square torch.mm loop on this machine: fp32 with `threads` threads on
    the CPU, bf16 on a GPU (the precision each side trains in there)."""
    import torch

    torch.set_num_threads(threads)
    cuda = device == "cuda"
    size, dtype = (8192, torch.bfloat16) if cuda else (1024, torch.float32)
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    torch.mm(a, b)  # warm-up
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        torch.mm(a, b)
        if cuda:
            torch.cuda.synchronize()
        best = max(best, 2 * size**3 / (time.perf_counter() - t0) / 1e9)
    return best


def parameter_count(model_dir: str) -> int:
    from transformers import AutoConfig, AutoModelForCausalLM

    with __import__("torch").device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    return sum(p.numel() for p in model.parameters())


def write_subset(spec: dict, n_pairs: int, out: Path) -> Path:
    """The bench's pairs, read and checked as `dpoflow validate` and `dpoflow run` do (every
    format and shape, `--columns`, the model's tokenizer and chat template, the Great
    Expectations suite), and written as the validate stage writes them (with ids): the first
    `n_pairs`. A file the pipeline would refuse is refused with the pipeline's sentence."""
    from transformers import AutoTokenizer

    from dpoflow.data_checks.loading import load_preferences
    from dpoflow.data_checks.suite import validate_preferences
    from dpoflow.errors import DataError

    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    pairs = load_preferences(spec["data"], columns=spec.get("columns"), tokenizer=tokenizer)
    if len(pairs) < n_pairs:
        raise ValueError(
            f"{spec['data']} has {len(pairs)} pairs but (--warmup + --steps) x --batch-size "
            f"needs {n_pairs}: give more pairs or fewer steps."
        )
    report = validate_preferences(
        pairs, min_rows=n_pairs, tokenizer=tokenizer, max_length=spec["max_length"]
    )
    if not report.success:
        raise DataError(report.summary_message())
    with open(out, "w", encoding="utf-8") as f:
        for row in pairs[["id", "prompt", "chosen", "rejected"]].head(n_pairs).to_dict("records"):
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return out


def run_side(module: str, spec: dict, work: Path, log) -> dict:
    """Run `python -m benchmarks.<module>` on the spec; return its figures."""
    spec_path, out_path = work / f"{module}.spec.json", work / f"{module}.out.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")])),
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS=str(spec["threads"]),
        DS_ACCELERATOR=spec.get("device", "cpu"),
    )
    load_before = os.getloadavg()[0]
    proc = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{module}", str(spec_path), str(out_path)],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{module} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    log(f"{module}: done")
    # The 1-minute load average around the run: on a shared machine it explains the timings.
    return dict(json.loads(out_path.read_text()), loadavg=[load_before, os.getloadavg()[0]])


def run_ours(spec: dict, work: Path, log) -> dict:
    """Our side: for DPO the reference stage's process, then the training process."""
    if spec["kind"] != "dpo":
        return run_side("ours_side", spec, work, log)
    spec = dict(spec, reference_logps_path=str(work / "reference_logps.pt"))
    reference = run_side("ours_reference", spec, work, log)
    return with_reference(run_side("ours_side", spec, work, log), reference, spec)


def with_reference(side: dict, reference: dict, spec: dict) -> dict:
    """Our DPO figures: the training process's, plus the reference stage's forward passes
    prorated to the timed pairs, and the larger of the two processes' peaks."""
    share = reference["seconds"] * spec["steps"] / (spec["warmup"] + spec["steps"])
    side["processes"] = {
        "reference_seconds_all_pairs": reference["seconds"],
        "reference_startup_seconds": reference["startup_seconds"],
        "reference_seconds_timed_share": share,
        "training_seconds": side["seconds"],
    }
    side["seconds"] += share
    for peak in PEAKS:
        if peak in side:
            side["processes"][f"reference_{peak}"] = reference[peak]
            side["processes"][f"training_{peak}"] = side[peak]
            side[peak] = max(reference[peak], side[peak])
    side["loadavg"] = [reference["loadavg"][0], side["loadavg"][1]]
    return side


def figures(side: dict, spec: dict, params: int, ceiling: float) -> dict[str, Any]:
    seconds, tokens = side["seconds"], side["tokens"]
    reference = 2 * params * tokens if spec["kind"] == "dpo" else 0
    flops = 6 * params * tokens + reference
    out = {
        rate_name(spec["kind"]): side["examples"] / seconds,
        "tokens_per_s": tokens / seconds,
        "peak_rss_mb": side["peak_rss_mb"],
        **({"peak_gpu_mb": side["peak_gpu_mb"]} if "peak_gpu_mb" in side else {}),
        "matmul_fraction": flops / seconds / (ceiling * 1e9),
        "seconds": seconds,
        "losses": side["losses"][: spec["warmup"] + 5],
        "loadavg": side["loadavg"],
    }
    if "processes" in side:
        out["processes"] = side["processes"]
    return out


def best_run(runs: list[dict], side: str) -> dict:
    """A side's figures over repeated runs: the fastest run's, with the highest peak memory."""
    fastest = min(runs, key=lambda run: run[side]["seconds"])
    peaks = [k for k in PEAKS if k in fastest[side]]
    best = dict(
        fastest[side],
        **{k: max(run[side][k] for run in runs) for k in peaks},
        fastest_run=runs.index(fastest) + 1,
    )
    if "processes" in best:  # our two processes' peaks, also the highest of the runs
        best["processes"] = dict(
            best["processes"],
            **{
                k: max(run[side]["processes"][k] for run in runs)
                for k in best["processes"]
                if k.endswith(PEAKS)
            },
        )
    return best


def run_bench(
    spec: dict, peer: str | None, json_path: Path | None, log=print, repeats: int = 1
) -> dict:
    """Run our side and (with peer='trl') TRL's, `repeats` times in turn; print and return the
    report. With repeats > 1 each side's time is its fastest run (the least disturbed by other
    work on a shared machine) and its peak memory the highest of its runs; every run is kept."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    n_pairs = (spec["warmup"] + spec["steps"]) * spec["batch_size"]
    runs: list[dict[str, Any]] = []
    # Everything the sides write (the data subset, reference log-probs, checkpoints and
    # models) goes to one scratch folder, deleted at the end, also when a side fails.
    with tempfile.TemporaryDirectory(prefix="dpoflow-bench-") as scratch:
        work = Path(scratch)
        data = write_subset(spec, n_pairs, work / "data.jsonl")
        spec = dict(spec, data=str(data), scratch=scratch)
        ceiling = matmul_ceiling_gflops(spec["threads"], spec.get("device", "cpu"))
        params = parameter_count(spec["model"])
        for _ in range(repeats):
            run = {"ours": figures(run_ours(spec, work, log), spec, params, ceiling)}
            if lora_settings(spec):  # LoRA's targets are against full FT at the same batch
                full = run_ours(dict(spec, lora_r=0, load_in_4bit=False), work, log)
                run["full"] = figures(full, spec, params, ceiling)
            if peer == "trl":
                run["trl"] = figures(run_side("trl_peer", spec, work, log), spec, params, ceiling)
            runs.append(run)
    report: dict[str, Any] = {
        "settings": {k: v for k, v in spec.items() if k not in ("data", "scratch", "columns")}
        | {"repeats": repeats},
        "params": params,
        "matmul_ceiling_gflops": ceiling,
        "ours": best_run(runs, "ours"),
    }
    if peer == "trl":
        report["trl"] = best_run(runs, "trl")
        rate = rate_name(spec["kind"])
        report["ratio"] = {
            k: report["ours"][k] / report["trl"][k]
            for k in (rate, "tokens_per_s", *PEAKS, "matmul_fraction")
            if k in report["ours"]
        }
    if "full" in runs[0]:
        report["full"] = best_run(runs, "full")
        report["vs_full"] = {
            k: report["ours"][k] / report["full"][k]
            for k in (rate_name(spec["kind"]), *PEAKS)
            if k in report["ours"]
        }
    if repeats > 1:
        report["runs"] = runs
    return write_report(report, format_report(report), json_path, log)


def format_report(report: dict) -> str:
    s = report["settings"]
    lines = [
        f"{s['kind']} bench: model {s['model']} ({report['params'] / 1e6:.1f} M params), "
        f"batch {s['batch_size']}, max_length {s['max_length']}, {s['steps']} timed steps "
        f"after {s['warmup']} warm-up, {s['threads']} threads, "
        f"{s.get('device', 'cpu')} {s.get('precision', 'fp32')}, our ZeRO stage "
        f"{s.get('zero_stage', 0)}"
        + (f", LoRA r={s['lora_r']}" if s.get("lora_r") else "")
        + (" on a 4-bit NF4 base (QLoRA)" if s.get("load_in_4bit") else "")
        + (", gradient checkpointing on both sides" if s.get("gradient_checkpointing") else ""),
        f"{'bf16' if s.get('device') == 'cuda' else 'fp32'} matmul ceiling: "
        f"{report['matmul_ceiling_gflops']:.1f} GFLOP/s",
    ]
    runs = report.get("runs", [])
    if runs:
        lines.append(
            f"{len(runs)} runs, each side in turn; below: each side's fastest run, and "
            f"the highest peak memory of its runs"
        )
    sides = [k for k in ("ours", "trl", "ratio", "full", "vs_full") if k in report]
    skip = ("losses", "seconds", "processes", "loadavg", "fastest_run")
    keys = [k for k in report["ours"] if k not in skip]
    lines.append(f"{'':16}" + "".join(f"{k:>14}" for k in sides))
    for key in keys:
        row = "".join(f"{report[k].get(key, float('nan')):>14.3f}" for k in sides)
        lines.append(f"{key:16}{row}")
    for side in ("ours", "trl", "full"):
        if side in report:
            before, after = report[side]["loadavg"]
            lines.append(
                f"{side}: {report[side]['seconds']:.2f} s timed; 1-min load average "
                f"{before:.2f} before, {after:.2f} after"
            )
    rate = rate_name(s["kind"])
    for i, run in enumerate(runs, 1):
        cells = [
            f"{side} {run[side][rate]:.3f} {rate}, {run[side]['peak_rss_mb']:.1f} MB, load "
            f"{run[side]['loadavg'][0]:.2f}->{run[side]['loadavg'][1]:.2f}"
            for side in ("ours", "trl", "full")
            if side in run
        ]
        lines.append(f"run {i}: " + "; ".join(cells))
    p = report["ours"].get("processes")
    if p:
        lines.append(
            f"ours by process (one after the other; peak = the larger): reference stage "
            f"{p['reference_peak_rss_mb']:.1f} MB peak, {p['reference_seconds_all_pairs']:.2f} s "
            f"of forward passes for all pairs ({p['reference_seconds_timed_share']:.2f} s "
            f"counted for the timed "
            f"pairs); training {p['training_peak_rss_mb']:.1f} MB peak, "
            f"{p['training_seconds']:.2f} s timed"
        )
        startup = p.get("reference_startup_seconds")
        if startup is not None and "trl" in report:
            # For information: TRL's timed window leaves out its start-up, so ours does too.
            share = startup * s["steps"] / (s["steps"] + s["warmup"])
            seconds = report["ours"]["seconds"]
            ours = report["ours"][rate] * seconds / (seconds + share)
            lines.append(
                f"the reference stage's start-up (imports, tokenizer and model load, "
                f"{startup:.2f} s) is not counted, as TRL's start-up is not; counting its "
                f"share ({share:.2f} s), ours would be {ours:.3f} {rate}, "
                f"{ours / report['trl'][rate]:.3f}x TRL"
            )
    for side in ("ours", "trl", "full"):
        if side in report:
            losses = ", ".join(f"{v:.5f}" for v in report[side]["losses"])
            lines.append(f"{side} losses (first steps): {losses}")
    return "\n".join(lines)
