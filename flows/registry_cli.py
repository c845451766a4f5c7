"""What `dpoflow models` and `dpoflow promote` do, kept out of the CLI's wiring."""

from __future__ import annotations

import json
from pathlib import Path

from rich import box
from rich.console import Group
from rich.table import Table
from rich.text import Text

from flows.config import PipelineConfig


def _win_rate(row: dict) -> str:
    """Tags "0.604" and "[0.4076, 0.7720]" -> "0.604 (0.408-0.772)"; blank if untagged."""
    if not row["win_rate"]:
        return ""
    low, high = json.loads(row["win_rate_ci"] or "[nan, nan]")
    return f"{float(row['win_rate']):.3f} ({low:.3f}-{high:.3f})"


def versions_table(rows: list[dict], uri: str) -> Group:
    """Registered versions, newest first, with aliases and figures; then each version's
    promotion reason on its own line (reasons are sentences: too long for a column)."""
    table = Table(title=f"registered models at {uri}", show_header=True, box=box.SIMPLE)
    for column in ("model", "version", "aliases", "win rate (95% CI)", "β", "loss", "judge"):
        table.add_column(column)  # wraps between words only, so names stay whole
    for row in rows:
        table.add_row(
            row["name"],
            row["version"],
            ", ".join(row["aliases"]),
            _win_rate(row),
            row["beta"],
            row["loss_type"],
            row["judge"],
        )
    reasons = [
        Text(f"{row['name']} v{row['version']}: {row['promotion.reason']}")
        for row in rows
        if row["promotion.reason"]
    ]
    return Group(table, *reasons)


def show_models(cfg: PipelineConfig, workdir: Path, name: str | None) -> Group | str:
    """The versions table, or one line saying that nothing is registered yet."""
    from tasks.registry import list_versions, registry
    from tasks.tracking import tracking_uri

    uri = tracking_uri(cfg.mlflow.tracking_uri, workdir)
    rows = list_versions(registry(uri), name)
    if not rows:
        return f"no registered models at {uri}: run `dpoflow run` to register one."
    return versions_table(rows, uri)


def promote_by_hand(
    cfg: PipelineConfig, workdir: Path, name: str, version: str, *, force: bool
) -> dict:
    """The promotion gate on one version, on the config's evaluation prompts and settings."""
    from data_checks.loading import load_prompts
    from tasks.registry import promote_version
    from tasks.sources import resolve_data
    from tasks.tracking import tracking_uri

    prompts: list[str] = []
    if not force:
        source = resolve_data(cfg.data.eval_prompts, workdir, eval_prompts=True)
        prompts = load_prompts(source)["prompt"].astype(str).tolist()[: cfg.eval.num_prompts]
    return promote_version(
        tracking_uri(cfg.mlflow.tracking_uri, workdir),
        name,
        version,
        prompts,
        cfg.eval.model_dump(mode="json"),
        force=force,
    )
