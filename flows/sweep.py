"""A β sweep: one parent flow, one `dpo_pipeline` child flow per (loss type, β).

    validate ─► sft ─► reference      (built by the first child, cached for the others)
        └─► dpo ─► evaluate ─► register      per β, each its own MLflow child run

The children are the pipeline itself, called as Prefect subflows: every stage
before DPO has the same cache key for every β, so it runs once and the later
children find it cached; nothing of the pipeline is copied here. MLflow holds a
parent run made here, and each child's DPO run carries `mlflow.parentRunId`, so
the MLflow compare view shows β against win rate, reward and KL. The parent run
gets the reward-KL frontier plot and a table of the children (`tasks.sweep_report`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from pydantic import ValidationError

from dpoflow.config import PipelineConfig, describe_error, resolve_config
from dpoflow.errors import ConfigError
from dpoflow.flows.pipeline import dpo_pipeline
from dpoflow.flows.run_view import sweep_run_name, sweep_tags, tag_flow_run
from dpoflow.tasks import sweep_report
from dpoflow.tasks.lineage import source_tags
from dpoflow.tasks.tracking import client, experiment_id, log_params, tracking_uri


def parse_list(text: str, option: str, cast: type = str) -> list:
    """ "0.05,0.1" -> [0.05, 0.1]; duplicates dropped, order kept."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    try:
        values = list(dict.fromkeys(cast(item) for item in items))
    except ValueError:
        raise ConfigError(
            f"{option} '{text}' is not a comma-separated list of numbers: write it like "
            f"{option} 0.05,0.1,0.5."
        ) from None
    if not values:
        raise ConfigError(f"{option} is empty: give at least one value, like {option} 0.1.")
    return values


def child_configs(
    config: PipelineConfig, betas: list[float], loss_types: list[str]
) -> list[dict[str, Any]]:
    """One validated config per (loss type, β), loss type outermost; a bad value is
    refused before anything runs."""
    children = []
    for loss_type in loss_types:
        for beta in betas:
            raw = config.model_dump(mode="json")
            raw["dpo"] |= {"beta": beta, "loss_type": loss_type}
            try:
                children.append(PipelineConfig.model_validate(raw).model_dump(mode="json"))
            except ValidationError as exc:
                where = f"--betas/--loss-types value beta={beta:g}, loss_type={loss_type}"
                raise ConfigError(f"{where}: {describe_error(exc.errors()[0])}") from None
    return children


def start_parent_run(cfg: PipelineConfig, work: Path, betas: list, loss_types: list) -> str:
    """The MLflow parent run of the sweep: params say what was swept."""
    uri = tracking_uri(cfg.mlflow.tracking_uri, work)
    experiment = experiment_id(uri, cfg.mlflow.experiment, work)
    name = f"sweep-{'+'.join(loss_types)}-beta{'_'.join(f'{b:g}' for b in betas)}"
    tags = source_tags("sweep") | {"dpoflow.stage": "sweep"}
    run = client(uri).create_run(experiment, run_name=name, tags=tags)
    params = {
        "sweep.betas": ",".join(f"{b:g}" for b in betas),
        "sweep.loss_types": ",".join(loss_types),
    }
    log_params(uri, run.info.run_id, params)
    return run.info.run_id


@flow(name="dpo-beta-sweep", flow_run_name=sweep_run_name, log_prints=True)
def beta_sweep(
    config: dict[str, Any],
    betas: list[float],
    loss_types: list[str] | None = None,
    workdir: str = ".dpoflow",
) -> dict[str, Any]:
    """Run the pipeline once per (loss type, β) under one MLflow parent run; returns the
    sweep's summary: the parent run, each child's pipeline summary, the frontier plot."""
    started = time.perf_counter()
    cfg = resolve_config(config)
    loss_types = loss_types or [cfg.dpo.loss_type]
    children = child_configs(cfg, betas, loss_types)
    logger = get_run_logger()
    tag_flow_run(sweep_tags(cfg, betas, loss_types))
    work = Path(workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    uri = tracking_uri(cfg.mlflow.tracking_uri, work)
    parent_run_id = start_parent_run(cfg, work, betas, loss_types)
    summaries = []
    try:
        for child in children:
            dpo = child["dpo"]
            logger.info("sweep child: loss %s, beta %g", dpo["loss_type"], dpo["beta"])
            # Named and tagged by the pipeline itself (`dpo β=0.1 sigmoid`), as any run.
            summaries.append(
                dpo_pipeline(config=child, workdir=str(work), parent_run_id=parent_run_id)
            )
        report = sweep_report.report(uri, parent_run_id, summaries, work / "sweeps")
    except BaseException:
        client(uri).set_terminated(parent_run_id, status="FAILED")
        raise
    client(uri).set_terminated(parent_run_id, status="FINISHED")
    return {
        "parent_run_id": parent_run_id,
        "children": summaries,
        "rows": report["rows"],
        "figure": report["figure"],
        "figure_artifact": report["figure_artifact"],
        "seconds": round(time.perf_counter() - started, 1),
    }
