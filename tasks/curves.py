"""A training run's curves as one PNG, for a person who opens the run's artifacts (or a
report) rather than MLflow's chart tabs: the loss, and for DPO the reward margin and
accuracy, beside the optimizer's view (gradient norm, learning rate)."""

from __future__ import annotations

import json
from pathlib import Path

FIGURE = "training_curves.png"
# (panel title, metrics drawn in it), in reading order; a panel with none of its metrics in
# the run is left out, so SFT gets loss and optimizer panels only.
PANELS = (
    ("loss", ("loss", "eval/loss")),
    ("reward margin (chosen − rejected)", ("rewards/margins", "eval/rewards/margins")),
    ("preference accuracy", ("rewards/accuracies", "eval/rewards/accuracies")),
    ("KL estimate on held-out answers, nats", ("eval/kl_ref_policy",)),
    ("gradient norm", ("grad_norm",)),
    ("learning rate", ("learning_rate",)),
)


def read_rows(metrics_path: Path) -> list[dict]:
    if not metrics_path.is_file():
        return []
    with open(metrics_path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def training_curves(metrics_path: Path, out: Path, title: str) -> Path | None:
    """Draw the run's metrics.jsonl into `out`; None when there is nothing to draw."""
    rows = read_rows(metrics_path)
    panels = [(name, [m for m in keys if any(m in r for r in rows)]) for name, keys in PANELS]
    panels = [(name, found) for name, found in panels if found]
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display: render to a file only
    import matplotlib.pyplot as plt

    columns = min(3, len(panels))
    lines = -(-len(panels) // columns)
    fig, axes = plt.subplots(lines, columns, figsize=(4.2 * columns, 3.2 * lines), squeeze=False)
    for ax, (name, metrics) in zip(axes.flat, panels, strict=False):
        for metric in metrics:
            points = [(r["step"], r[metric]) for r in rows if metric in r]
            style = "o-" if metric.startswith("eval/") else "-"
            ax.plot(*zip(*points, strict=True), style, label=metric, markersize=3)
        ax.set(title=name, xlabel="step")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
