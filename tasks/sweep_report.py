"""What a β sweep leaves on its MLflow parent run: the reward-KL frontier and a table.

The DPO paper compares methods on the frontier of mean reward against
KL(π ‖ π_ref): a larger β keeps the policy closer to the reference (less KL,
less reward). One point per child run, labelled with its β, one series per loss
type; beside it the win rate against β with its 95% interval.
"""

from __future__ import annotations

from pathlib import Path

from dpoflow.tasks.common import in_prefect_run, stage_logger

FIGURE = "sweep/frontier.png"
TABLE = "sweep/children.json"


def children_rows(summaries: list[dict]) -> list[dict]:
    """One flat row per child pipeline summary, in sweep order."""
    return [
        {
            "loss_type": s["loss_type"],
            "beta": s["beta"],
            "win_rate": s["win_rate"],
            "win_rate_low": s["win_rate_ci"][0],
            "win_rate_high": s["win_rate_ci"][1],
            "reward_policy": s["reward_policy"],
            "reward_reference": s["reward_reference"],
            "kl": s["kl"],
            "mlflow_run_id": s["mlflow_run_id"],
            "model_version": s["registered_model"]["version"],
        }
        for s in summaries
    ]


def frontier_figure(rows: list[dict], path: Path) -> Path:
    """Reward against KL (each point labelled β) and win rate against β, as one PNG."""
    import matplotlib.pyplot as plt

    fig = draw_frontier(rows)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def draw_frontier(rows: list[dict]):
    """The figure itself: left, one line per loss type through (KL, mean reward) of its
    children in KL order; right, win rate against β with 95% intervals."""
    import matplotlib

    matplotlib.use("Agg")  # no display: render to a file only
    import matplotlib.pyplot as plt

    fig, (frontier, by_beta) = plt.subplots(1, 2, figsize=(11, 4.5))
    for loss_type in dict.fromkeys(r["loss_type"] for r in rows):
        series = sorted((r for r in rows if r["loss_type"] == loss_type), key=lambda r: r["kl"])
        kl = [r["kl"] for r in series]
        frontier.plot(kl, [r["reward_policy"] for r in series], "o-", label=loss_type)
        for r in series:
            frontier.annotate(
                f"β={r['beta']:g}",
                (r["kl"], r["reward_policy"]),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=8,
            )
        series = sorted(series, key=lambda r: r["beta"])
        betas = [r["beta"] for r in series]
        rates = [r["win_rate"] for r in series]
        errors = [
            [r["win_rate"] - r["win_rate_low"] for r in series],
            [r["win_rate_high"] - r["win_rate"] for r in series],
        ]
        by_beta.errorbar(betas, rates, yerr=errors, fmt="o-", capsize=3, label=loss_type)
    references = {r["reward_reference"] for r in rows}
    if len(references) == 1:  # one reference sampled once: draw where the policies start
        frontier.axhline(references.pop(), color="grey", ls=":", label="reference")
    frontier.set(xlabel="KL(π ‖ π_ref), nats", ylabel="mean reward (judge)", title="frontier")
    by_beta.axhline(0.5, color="grey", ls=":")
    by_beta.set(xscale="log", xlabel="β", ylabel="win rate vs reference (95% CI)", ylim=(0, 1))
    by_beta.set_title("win rate against β")
    frontier.legend()
    by_beta.legend()
    return fig


def report(uri: str, parent_run_id: str, summaries: list[dict], out_dir: Path) -> dict:
    """Plot, then log the figure and the children table to the parent run and to Prefect."""
    import mlflow
    import pandas as pd

    from dpoflow.tasks.tracking import client

    rows = children_rows(summaries)
    figure = frontier_figure(rows, out_dir / parent_run_id / "frontier.png")
    c = client(uri)
    with mlflow.start_run(run_id=parent_run_id):
        mlflow.log_artifact(str(figure), artifact_path=str(Path(FIGURE).parent))
        mlflow.log_table(pd.DataFrame(rows), artifact_file=TABLE)
        artifact_uri = mlflow.get_artifact_uri(FIGURE)
    # Each child carries the frontier too: a person who opens one β's run sees where it sits.
    for child in dict.fromkeys(r["mlflow_run_id"] for r in rows):
        c.log_artifact(child, str(figure), artifact_path=str(Path(FIGURE).parent))
    publish_table(rows)
    return {"rows": rows, "figure": str(figure), "figure_artifact": artifact_uri}


def publish_table(rows: list[dict]) -> None:
    """The children table as a Prefect artifact: a courtesy, never a reason to fail the sweep,
    but a skipped one is said, not swallowed."""
    if not in_prefect_run():
        return
    from prefect.artifacts import create_table_artifact

    try:
        create_table_artifact(
            key="beta-sweep", table=rows, description="β sweep: one row per child run"
        )
    except Exception as exc:
        stage_logger().warning("the beta-sweep table artifact was not published (%s)", exc)
