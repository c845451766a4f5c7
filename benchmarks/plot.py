"""Plot the bench reports: throughput ours vs TRL per case (docs/bench/throughput.png).

    python -m benchmarks.plot docs/bench/dpo-4m.json docs/bench/dpo-30m.json ... --out PNG
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("reports", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=Path("docs/bench/throughput.png"))
    args = parser.parse_args()
    labels, ours, peer = [], [], []
    for path in args.reports:
        report = json.loads(path.read_text())
        rate = "pairs_per_s" if report["settings"]["kind"] == "dpo" else "sequences_per_s"
        labels.append(f"{path.stem}\n({rate.replace('_per_s', '')}/s)")
        ours.append(report["ours"][rate])
        peer.append(report["trl"][rate])
    x = range(len(labels))
    fig, ax = plt.subplots(figsize=(2.2 * len(labels) + 2, 4))
    ax.bar([i - 0.2 for i in x], ours, width=0.4, label="dpoflow")
    ax.bar([i + 0.2 for i in x], peer, width=0.4, label="TRL")
    for i, (a, b) in enumerate(zip(ours, peer, strict=True)):
        ax.text(i, max(a, b) * 1.02, f"{a / b:.2f}x", ha="center")
    ax.set_xticks(list(x), labels)
    ax.set_ylabel("examples per second (2 CPU cores)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)


if __name__ == "__main__":
    main()
