"""The terminal view of a β sweep: one row per child, then where the frontier plot is."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table


def sweep_table(summary: dict) -> Table:
    table = Table(title=f"dpoflow sweep ({summary['seconds']:.0f} s)", show_header=True)
    for column in ("loss", "beta", "win rate (95% CI)", "reward", "KL", "MLflow run"):
        table.add_column(column, justify="left" if column in ("loss", "MLflow run") else "right")
    for row in summary["rows"]:
        table.add_row(
            row["loss_type"],
            f"{row['beta']:g}",
            f"{row['win_rate']:.3f} ({row['win_rate_low']:.3f}-{row['win_rate_high']:.3f})",
            f"{row['reward_policy']:.3f}",
            f"{row['kl']:.3f}",
            row["mlflow_run_id"][:12],
        )
    return table


def print_sweep(summary: dict) -> None:
    out = Console()
    out.print(sweep_table(summary))
    reference = summary["rows"][0]["reward_reference"]
    out.print(
        f"reference reward {reference:.3f}  MLflow parent run {summary['parent_run_id']}\n"
        f"frontier plot {summary['figure_artifact']}",
        highlight=False,
        soft_wrap=True,
    )
