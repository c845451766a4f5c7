"""Stage 6: the promotion gate on the version just registered (see models/promotion.py)."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger

from tasks.common import build_once, stage_task
from tasks.evaluate import read_prompts
from tasks.registry import promote_version
from tasks.tracking import server_errors, tracking_uri


@stage_task("promote")
def promote(
    key: str,
    workdir: str,
    section: dict,
    mlflow_cfg: dict,
    register_manifest: dict,
    data_manifest: dict,
    inputs: dict,
) -> dict:
    logger = get_run_logger()

    def build(partial: Path) -> dict:
        prompts = read_prompts(
            Path(data_manifest["path"]) / "eval_prompts.jsonl", section["num_prompts"]
        )
        uri = tracking_uri(mlflow_cfg["tracking_uri"], workdir)
        with server_errors(uri, "applying the promotion gate"):
            outcome = promote_version(
                uri, register_manifest["name"], register_manifest["version"], prompts, section
            )
        logger.info(
            "%s v%s %s: %s",
            outcome["name"],
            outcome["version"],
            "promoted to champion" if outcome["promoted"] else "stays candidate",
            outcome["reason"],
        )
        return {"config": section, "inputs": inputs, **outcome}

    return build_once("promote", key, workdir, build)
