"""One training job for the SFT and DPO stages: launched, streamed to MLflow, summarised.

SFT and DPO run as child processes under the `deepspeed` launcher
(`models/trainer.py`); this module builds their job, streams its metrics to
MLflow while it runs, and returns what the stage's manifest records. A retried
attempt finds its checkpoints in the stage's partial folder and resumes from
the newest one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from dpoflow.models.lora import ADAPTER_DIR
from dpoflow.tasks.common import stage_logger
from dpoflow.tasks.curves import FIGURE, training_curves
from dpoflow.tasks.launcher import run_training
from dpoflow.tasks.lineage import DataRef, log_datasets, source_tags
from dpoflow.tasks.system_metrics import system_metrics
from dpoflow.tasks.tracking import (
    client,
    last_logged_step,
    log_metric_rows,
    log_params,
    server_errors,
    start_or_resume_run,
    tracking_uri,
)


def train_in_child(
    partial: Path,
    *,
    kind: str,
    workdir: str,
    section: dict[str, Any],
    distributed: dict[str, Any],
    mlflow_cfg: dict[str, Any],
    model_path: str,
    data_path: str,
    run_name: str,
    params: dict[str, str],
    tags: dict[str, str],
    reference_logps_path: str | None = None,
    artifacts: dict[str, Path] | None = None,
    model_revision: str | None = None,
    adapters: dict[str, Any] | None = None,
    datasets: list[DataRef] | None = None,
) -> dict[str, Any]:
    """Run one training job into `partial/model`; returns the manifest's extra fields.
    `datasets` are logged as the run's inputs (MLflow's Dataset column).

    `adapters` is `adapter_section(cfg)`: LoRA / QLoRA settings, or None for full fine-tuning.
    """
    logger = stage_logger()
    uri = tracking_uri(mlflow_cfg["tracking_uri"], workdir)
    with server_errors(uri, f"starting the {kind} run"):
        run_id = start_or_resume_run(
            uri,
            mlflow_cfg["experiment"],
            workdir,
            partial / "mlflow_run_id",
            name=run_name,
            tags=source_tags(kind) | tags,
        )
        log_params(uri, run_id, params)
        log_datasets(uri, run_id, datasets or [])
        for artifact_path, local in (artifacts or {}).items():
            if local.is_dir():
                client(uri).log_artifacts(run_id, str(local), artifact_path)
        # Steps an interrupted attempt logged stay; a resumed job replays metrics.jsonl
        # from its checkpoint, and those steps must not go into the run twice.
        logged_up_to = last_logged_step(uri, run_id)

    def on_metrics(rows: list[dict]) -> None:
        nonlocal logged_up_to
        new = [row for row in rows if row["step"] > logged_up_to]
        if new:
            log_metric_rows(uri, run_id, new)
            logged_up_to = new[-1]["step"]

    job = {
        "kind": kind,
        "train": section,
        "distributed": distributed,
        "model_path": model_path,
        "model_revision": model_revision,  # a hub model's branch, tag or commit
        "adapters": adapters,
        "data_path": data_path,
        "reference_logps_path": reference_logps_path,
        "output_dir": str(partial / "model"),
        "checkpoint_dir": str(partial / "checkpoints"),
        "metrics_path": str(partial / "metrics.jsonl"),
    }
    finished = partial / "model" / "result.json"  # written last, after the whole model
    if finished.is_file():
        # An earlier attempt trained to the end and failed after it (a tracking server down
        # while the run was closed or linked): its retry finishes that model, not a new one.
        logger.info("%s: the model an earlier attempt finished is reused", kind)
        result = json.loads(finished.read_text())
    else:
        with system_metrics(uri, run_id):
            result = run_training(
                job,
                partial,
                log=logger.info,
                on_metrics=on_metrics,
                timeout_seconds=distributed.get("timeout_seconds"),
            )
    # The finished model is the output; checkpoints were only resume points.
    shutil.rmtree(partial / "checkpoints", ignore_errors=True)
    curves = training_curves(partial / "metrics.jsonl", partial / FIGURE, run_name)
    if curves is not None:
        client(uri).log_artifact(run_id, str(curves))
    client(uri).set_terminated(run_id)
    logger.info(
        "%s finished: %d steps (resumed from step %d), final %s",
        kind,
        result["steps"],
        result["resumed_from_step"],
        {k: round(v, 4) for k, v in result["final_metrics"].items() if "/" in k or k == "loss"},
    )
    return {
        "model": "model",
        # LoRA: the adapter alone, beside the merged model (registry.merge_adapters: false).
        "adapter": ADAPTER_DIR if (partial / ADAPTER_DIR).is_dir() else None,
        "mlflow_run_id": run_id,
        "resumed_from_step": result["resumed_from_step"],
        "final_metrics": result["final_metrics"],
        "train_seconds": result["seconds"],
    }


def adapter_section(cfg) -> dict[str, Any]:
    """What a training stage reads of the `model` section: `lora` and `load_in_4bit` (the base
    itself enters the key through its hash)."""
    return cfg.model.model_dump(mode="json", include={"lora", "load_in_4bit"})
