"""The DPO pipeline as a Prefect flow: it reads like the diagram.

    validate ─► sft ─► reference log-probs ─► dpo ─► evaluate ─► register ─► promote

Each stage is declared once, in its own module under `tasks/` (`STAGE = Stage(...)`):
its task, the config it reads and the upstream outputs it reads. The flow runs them
in order; each is cached on a key made of its config section, its inputs' content
hashes and the code version of its module's import closure: change β and only dpo,
evaluate, register and promote run again; change the data and all of them do.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, tags

from dpoflow.config import PipelineConfig, resolve_config
from dpoflow.errors import ConfigError, hide_user_error_tracebacks
from dpoflow.flows.run_view import pipeline_run_name, publish_run_view, run_tags, tag_flow_run
from dpoflow.models.lora import require_cuda_for_4bit
from dpoflow.tasks import dpo, evaluate, promote, reference, register, sft, validate
from dpoflow.tasks.common import Stage, retry_delays
from dpoflow.tasks.promote import registry_state
from dpoflow.tasks.sources import resolve_sources
from dpoflow.tasks.stage import MANIFEST, StageDir
from dpoflow.tasks.tracking import server_errors, tracking_uri

hide_user_error_tracebacks()  # a bad config or bad data is reported in one sentence

STAGES: tuple[Stage, ...] = (
    validate.STAGE,
    sft.STAGE,
    reference.STAGE,
    dpo.STAGE,
    evaluate.STAGE,
    register.STAGE,
    promote.STAGE,
)
STAGE_NAMES = tuple(stage.name for stage in STAGES)


def check_stage_name(until: str | None) -> None:
    if until is not None and until not in STAGE_NAMES:
        raise ConfigError(
            f"unknown stage {until!r} for --until: choose one of {', '.join(STAGE_NAMES)}."
        )


class StoppedAfter(Exception):
    """Raised by the runner after the stage the user asked to stop at (`--until`)."""


class StageRunner:
    """Calls stage tasks, times them, and records whether each ran or came from the cache.

    With `until`, it stops the flow (raises `StoppedAfter`) once that stage is done."""

    def __init__(self, workdir: Path, until: str | None = None):
        self.workdir = workdir
        self.until = until
        self.stages: dict[str, dict[str, Any]] = {}

    def __call__(self, stage: Stage, params: dict[str, Any]) -> dict[str, Any]:
        started = time.perf_counter()
        task = stage.task.with_options(
            result_storage=self.workdir / "prefect-results",
            retry_delay_seconds=retry_delays()[: stage.task.retries] or 0,
        )
        state = task(**params, return_state=True)
        result = state.result(raise_on_failure=False)
        if state.is_completed() and not (Path(result["manifest"]["path"]) / MANIFEST).is_file():
            # A cache hit for an output deleted since: build it again.
            state = task.with_options(refresh_cache=True)(**params, return_state=True)
            result = state.result(raise_on_failure=False)
        if isinstance(result, BaseException):
            raise result
        cached = state.name == "Cached" or result["reused"]
        manifest = result["manifest"]
        self.stages[stage.name] = {
            "status": "cached" if cached else "completed",
            "seconds": round(time.perf_counter() - started, 3),
        }
        for resumed in (k for k in manifest if k.startswith("resumed_")):
            # How much of the work an earlier, interrupted attempt had done.
            self.stages[stage.name][resumed] = 0 if cached else manifest[resumed]
        if stage.name == self.until:
            raise StoppedAfter(stage.name)
        return manifest


@flow(name="dpo-pipeline", flow_run_name=pipeline_run_name, log_prints=True)
def dpo_pipeline(
    config: dict[str, Any],
    workdir: str = ".dpoflow",
    parent_run_id: str | None = None,
    until: str | None = None,
) -> dict[str, Any]:
    """validate -> sft -> reference -> dpo -> evaluate -> register -> promote; returns the
    run's summary. `until` names the last stage to run (the later ones run next time)."""
    check_stage_name(until)
    cfg = resolve_config(config)
    require_cuda_for_4bit(cfg.model.load_in_4bit)  # a deployment's run, too, before any stage
    work = Path(workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    run = StageRunner(work, until)
    # The inputs, as manifests: the embedded default is made here on first use.
    manifests: dict[str, dict[str, Any]] = resolve_sources(cfg, work)
    labels = run_tags(cfg)  # β, loss type, model: on the flow run and on each task run
    tag_flow_run(labels)
    try:
        with tags(*labels):
            for stage in STAGES:
                if stage.enabled(cfg):
                    params = stage.call(cfg, work, manifests, parent_run_id)
                    manifests[stage.name] = run(stage, params)
    except StoppedAfter:
        get_run_logger().info("stopped after %s as asked; run without --until to go on", until)
        publish_run_view(cfg, work, run.stages, manifests, None, until)
        return {"stages": run.stages, "stopped_after": until}
    summary = run_summary(cfg, run.stages, manifests, work)
    publish_run_view(cfg, work, run.stages, manifests, summary)
    get_run_logger().info(headline(summary))
    return summary


def headline(summary: dict[str, Any]) -> str:
    """The result in one line of the flow's log, rounded as the console prints it."""
    low, high = summary["win_rate_ci"]
    return f"win rate {summary['win_rate']:.3f} [{low:.3f}, {high:.3f}], KL {summary['kl']:.3f}"


def run_summary(
    cfg: PipelineConfig, stages: dict[str, dict], manifests: dict[str, dict], work: Path
) -> dict[str, Any]:
    """What `dpoflow run` prints and writes to --summary-json. The registered model is
    described as the registry has it now, so a cached run never replays old aliases."""
    evaluation, promoted = manifests["evaluate"], manifests["promote"]
    uri = tracking_uri(cfg.mlflow.tracking_uri, work)
    with server_errors(uri, "reading the registry for the run's summary"):
        now = registry_state(uri, promoted["name"], promoted["version"])
    return {
        "stages": stages,
        "win_rate": evaluation["win_rate"],
        "win_rate_ci": evaluation["win_rate_ci"],
        "reward_policy": evaluation["reward_policy"],
        "reward_reference": evaluation["reward_reference"],
        "kl": evaluation["kl"],
        "mlflow_run_id": manifests["dpo"]["mlflow_run_id"],
        "registered_model": {k: promoted[k] for k in ("name", "version", "promoted")} | now,
        "beta": cfg.dpo.beta,
        "loss_type": cfg.dpo.loss_type,
    }


def validated_output(cfg: PipelineConfig, workdir: Path) -> dict[str, Any] | None:
    """The validate stage's manifest for this config in `workdir`, if that stage has run."""
    work = workdir.resolve()
    params = validate.STAGE.call(cfg, work, resolve_sources(cfg, work))
    return StageDir(work, validate.STAGE.name, params["key"]).existing()
