"""Plot the bench reports: throughput and peak memory, ours vs TRL, per case.

python -m benchmarks.plot docs/bench/dpo-4m.json docs/bench/dpo-30m.json ... --out PNG
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from benchmarks.bench_common import rate_name  # noqa: E402


def bars(ax, labels: list[str], ours: list[float], peer: list[float], ylabel: str) -> None:
    x = range(len(labels))
    ax.bar([i - 0.2 for i in x], ours, width=0.4, label="dpoflow")
    ax.bar([i + 0.2 for i in x], peer, width=0.4, label="TRL 1.16")
    for i, (a, b) in enumerate(zip(ours, peer, strict=True)):
        ax.text(i, max(a, b) * 1.02, f"{a / b:.2f}x", ha="center")
    ax.set_xticks(list(x), labels)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, max(ours + peer) * 1.3)
    ax.legend(loc="upper left", ncol=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("reports", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=Path("docs/bench/throughput.png"))
    args = parser.parse_args()
    labels, cases, ours, peer, ours_mb, peer_mb = [], [], [], [], [], []
    for path in args.reports:
        report = json.loads(path.read_text())
        if "trl" not in report:
            continue  # a run without --peer trl has nothing to compare
        rate = rate_name(report["settings"]["kind"])
        labels.append(f"{path.stem}\n({rate.replace('_per_s', '')}/s)")
        cases.append(path.stem)
        ours.append(report["ours"][rate])
        peer.append(report["trl"][rate])
        ours_mb.append(report["ours"]["peak_rss_mb"])
        peer_mb.append(report["trl"]["peak_rss_mb"])
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(2.2 * len(labels) + 2, 7))
    bars(top, labels, ours, peer, "examples per second (2 CPU cores, fp32)")
    top.set_title("throughput: higher is better (label: dpoflow / TRL)")
    bars(bottom, cases, ours_mb, peer_mb, "peak resident memory (MB)")
    bottom.set_title("peak memory: lower is better (label: dpoflow / TRL)")
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)


if __name__ == "__main__":
    main()
