"""Stages 2-3: SFT of the reference, its log-probs, and DPO of the policy.

SFT and DPO run as child processes under the `deepspeed` launcher
(`models/trainer.py`); this module builds their jobs, streams their metrics
to MLflow while they run, and turns their output folders into manifests. A
retried attempt finds its checkpoints in the stage's partial folder and
resumes from the newest one.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from prefect import get_run_logger

from tasks.common import build_once, stage_task
from tasks.launcher import run_training
from tasks.tracking import (
    client,
    flatten,
    last_logged_step,
    log_metric_rows,
    log_params,
    server_errors,
    start_or_resume_run,
    tracking_uri,
)

TRAINING_CODE = (
    "models/trainer.py",
    "models/cpu_memory.py",
    "models/logprobs.py",
    "models/losses.py",
    "tasks/training.py",
    "tasks/launcher.py",
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
) -> dict[str, Any]:
    """Run one training job into `partial/model`; returns the manifest's extra fields."""
    logger = get_run_logger()
    uri = tracking_uri(mlflow_cfg["tracking_uri"], workdir)
    with server_errors(uri, f"starting the {kind} run"):
        run_id = start_or_resume_run(
            uri,
            mlflow_cfg["experiment"],
            workdir,
            partial / "mlflow_run_id",
            name=run_name,
            tags=tags,
        )
        log_params(uri, run_id, params)
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
        "data_path": data_path,
        "reference_logps_path": reference_logps_path,
        "output_dir": str(partial / "model"),
        "checkpoint_dir": str(partial / "checkpoints"),
        "metrics_path": str(partial / "metrics.jsonl"),
    }
    result = run_training(
        job,
        partial,
        log=logger.info,
        on_metrics=on_metrics,
        timeout_seconds=distributed.get("timeout_seconds"),
    )
    # The finished model is the output; checkpoints were only resume points.
    shutil.rmtree(partial / "checkpoints", ignore_errors=True)
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
        "mlflow_run_id": run_id,
        "resumed_from_step": result["resumed_from_step"],
        "final_metrics": result["final_metrics"],
        "train_seconds": result["seconds"],
    }


@stage_task("sft")
def sft(
    key: str,
    workdir: str,
    section: dict,
    distributed: dict,
    mlflow_cfg: dict,
    model_path: str,
    data_manifest: dict,
    inputs: dict,
) -> dict:
    def build(partial: Path) -> dict:
        extra = train_in_child(
            partial,
            kind="sft",
            workdir=workdir,
            section=section,
            distributed=distributed,
            mlflow_cfg=mlflow_cfg,
            model_path=model_path,
            data_path=str(Path(data_manifest["path"]) / "pairs.jsonl"),
            run_name="sft",
            params={**flatten("sft", section), "model.base": model_path},
            tags={"dpoflow.stage": "sft", "dpoflow.data_sha256": data_manifest["data_sha256"]},
        )
        return {"config": section, "inputs": inputs, **extra}

    return build_once("sft", key, workdir, build)


@stage_task("reference")
def reference(
    key: str, workdir: str, section: dict, sft_manifest: dict, data_manifest: dict, inputs: dict
) -> dict:
    """Reference log-probs of every training pair, stored once for every β and epoch."""
    import torch

    from models.reference import compute_reference_logps

    logger = get_run_logger()

    def build(partial: Path) -> dict:
        def progress(done: int, total: int) -> None:
            if done == total or done % (50 * section["batch_size"]) == 0:
                logger.info("reference log-probs: %d / %d pairs", done, total)

        stored = compute_reference_logps(
            str(Path(sft_manifest["path"]) / sft_manifest["model"]),
            Path(data_manifest["path"]) / "pairs.jsonl",
            max_length=section["max_length"],
            max_prompt_length=section["max_prompt_length"],
            precision=section.get("precision", "fp32"),
            progress=progress,
        )
        torch.save(stored, partial / "reference_logps.pt")
        return {
            "config": section,
            "inputs": inputs,
            "logps": "reference_logps.pt",
            "n_pairs": len(stored["ids"]),
        }

    return build_once("reference", key, workdir, build)


@stage_task("dpo")
def dpo(
    key: str,
    workdir: str,
    config: dict,
    sft_manifest: dict,
    data_manifest: dict,
    reference_manifest: dict | None,
    inputs: dict,
    parent_run_id: str | None = None,
) -> dict:
    section = config["dpo"]

    def build(partial: Path) -> dict:
        tags = {
            "dpoflow.stage": "dpo",
            "dpoflow.data_sha256": data_manifest["data_sha256"],
            "dpoflow.sft_run_id": sft_manifest["mlflow_run_id"],
            "dpoflow.validation": "passed",
        }
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        # β first, so it leads the MLflow compare view; then every value that matters.
        params = {"beta": str(section["beta"]), "loss_type": section["loss_type"]}
        params.update(flatten("", {k: v for k, v in config.items() if k != "mlflow"}))
        reference_path = None
        if reference_manifest is not None:
            reference_path = str(Path(reference_manifest["path"]) / reference_manifest["logps"])
        extra = train_in_child(
            partial,
            kind="dpo",
            workdir=workdir,
            section=section,
            distributed=config["distributed"],
            mlflow_cfg=config["mlflow"],
            model_path=str(Path(sft_manifest["path"]) / sft_manifest["model"]),
            data_path=str(Path(data_manifest["path"]) / "pairs.jsonl"),
            run_name=f"dpo-{section['loss_type']}-beta{section['beta']}",
            params=params,
            tags=tags,
            reference_logps_path=reference_path,
            # The Great Expectations report and Data Docs travel with the run they gated.
            artifacts={"validation": Path(data_manifest["path"]) / "report"},
        )
        return {"config": section, "inputs": inputs, **extra}

    return build_once("dpo", key, workdir, build)
