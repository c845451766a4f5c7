"""The batch-layout ablation: our DPO in each `dpo.packing` mode, side by side in one run.

`python -m benchmarks dpo --packing padded,packed,shared_prompt ...` comes here: the same pairs
and the same stored reference log-probs (the reference stage runs once: it does not depend on
the layout), then our training process once per mode, the modes in turn within each repeat,
so that a machine whose load drifts slows every mode alike; with `--peer trl`, TRL's trainer
once per repeat too. Each mode's figures are dpo_bench's (its reference share included), plus
the positions its forward passes ran over (real tokens + padding) and its speed over the
first mode's.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from benchmarks.bench_common import write_report
from benchmarks.dpo_bench import (
    best_run,
    figures,
    matmul_ceiling_gflops,
    parameter_count,
    run_side,
    with_reference,
    write_subset,
)


def run_ablation(
    spec: dict,
    modes: list[str],
    peer: str | None,
    json_path: Path | None,
    log=print,
    repeats: int = 1,
) -> dict:
    n_pairs = (spec["warmup"] + spec["steps"]) * spec["batch_size"]
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="dpoflow-ablation-") as scratch:
        work = Path(scratch)
        data = write_subset(spec, n_pairs, work / "data.jsonl")
        spec = dict(
            spec,
            data=str(data),
            scratch=scratch,
            reference_logps_path=str(work / "reference_logps.pt"),
        )
        ceiling = matmul_ceiling_gflops(spec["threads"], spec.get("device", "cpu"))
        params = parameter_count(spec["model"])
        reference = run_side("ours_reference", spec, work, log)
        for repeat in range(repeats):
            run: dict[str, Any] = {}
            for mode in modes:
                log(f"repeat {repeat + 1}/{repeats}: ours, packing {mode}")
                side = run_side("ours_side", dict(spec, packing=mode), work, log)
                own_load = side["loadavg"]
                side = with_reference(side, reference, spec)
                run[mode] = dict(figures(side, spec, params, ceiling), loadavg=own_load)
                run[mode]["positions"] = side["positions"]
            if peer == "trl":
                run["trl"] = figures(run_side("trl_peer", spec, work, log), spec, params, ceiling)
            runs.append(run)
    sides = [*modes, *(["trl"] if peer == "trl" else [])]
    best = {side: best_run(runs, side) for side in sides}
    first = best[modes[0]]
    report: dict[str, Any] = {
        "settings": {k: v for k, v in spec.items() if k not in ("data", "scratch", "columns")}
        | {"repeats": repeats, "modes": modes},
        "params": params,
        "matmul_ceiling_gflops": ceiling,
        "sides": best,
        f"speed_over_{modes[0]}": {m: best[m]["pairs_per_s"] / first["pairs_per_s"] for m in modes},
        "runs": runs,
    }
    if peer == "trl":
        report["speed_over_trl"] = {
            m: best[m]["pairs_per_s"] / best["trl"]["pairs_per_s"] for m in modes
        }
    return write_report(report, format_ablation(report), json_path, log)


def format_ablation(report: dict) -> str:
    s, sides = report["settings"], report["sides"]
    modes = s["modes"]
    lines = [
        f"dpo layout ablation: model {s['model']} ({report['params'] / 1e6:.1f} M params), "
        f"batch {s['batch_size']}, max_length {s['max_length']}, max_prompt_length "
        f"{s['max_prompt_length']}, {s['steps']} timed steps after {s['warmup']} warm-up, "
        f"{s['threads']} threads, {s.get('device', 'cpu')} {s.get('precision', 'fp32')}, "
        f"{s['repeats']} repeat(s), modes in turn; each side's fastest run",
        f"{'side':>14}{'pairs/s':>10}{'tokens/s':>11}{'positions':>11}{'peak MB':>10}"
        f"{'vs ' + modes[0]:>12}{'vs trl':>9}{'load':>12}",
    ]
    for side, fig in sides.items():
        vs_first = fig["pairs_per_s"] / sides[modes[0]]["pairs_per_s"]
        vs_trl = fig["pairs_per_s"] / sides["trl"]["pairs_per_s"] if "trl" in sides else None
        before, after = fig["loadavg"]
        lines.append(
            f"{side:>14}{fig['pairs_per_s']:>10.2f}{fig['tokens_per_s']:>11.1f}"
            f"{fig.get('positions') or '-':>11}{fig['peak_rss_mb']:>10.1f}{vs_first:>11.3f}x"
            f"{(f'{vs_trl:.3f}x' if vs_trl else '-'):>9}{f'{before:.2f}->{after:.2f}':>12}"
        )
    for side in sides:
        losses = ", ".join(f"{v:.5f}" for v in sides[side]["losses"][:3])
        lines.append(f"{side} first losses: {losses}")
    return "\n".join(lines)
