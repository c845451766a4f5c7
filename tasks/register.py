"""Stage 5: log the policy to MLflow as a text generator and register a version."""

from __future__ import annotations

import subprocess
from pathlib import Path

from prefect import get_run_logger

from tasks.common import build_once, stage_task
from tasks.tracking import client, server_errors, tracking_uri

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=PROJECT_ROOT,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def find_version(c, name: str, key: str):
    """A version registered for this exact stage key (a crash after registering, say)."""
    from mlflow.exceptions import MlflowException

    try:
        versions = c.search_model_versions(f"name='{name}'")
    except MlflowException:
        return None
    return next((v for v in versions if v.tags.get("dpoflow.key") == key), None)


@stage_task("register")
def register(
    key: str,
    workdir: str,
    section: dict,
    mlflow_cfg: dict,
    dpo_manifest: dict,
    sft_manifest: dict,
    data_manifest: dict,
    eval_manifest: dict,
    inputs: dict,
) -> dict:
    import mlflow

    from models.serving import log_generator

    logger = get_run_logger()
    uri = tracking_uri(mlflow_cfg["tracking_uri"], workdir)

    def build(partial: Path) -> dict:
        note = (
            f"; the trained policy is kept in {dpo_manifest['path']} and the next run "
            "registers it without training again"
        )
        with server_errors(uri, "registering the policy", note):
            return register_version(partial)

    def register_version(partial: Path) -> dict:
        c = client(uri)
        name, run_id = section["model_name"], dpo_manifest["mlflow_run_id"]
        version = find_version(c, name, key)
        if version is None:
            with mlflow.start_run(run_id=run_id):
                info = log_generator(str(Path(dpo_manifest["path"]) / dpo_manifest["model"]))
            low, high = eval_manifest["win_rate_ci"]
            tags = {
                "dpoflow.key": key,
                "data_sha256": data_manifest["data_sha256"],
                "validation": "passed",
                "sft_run_id": sft_manifest["mlflow_run_id"],
                "beta": str(dpo_manifest["config"]["beta"]),
                "loss_type": dpo_manifest["config"]["loss_type"],
                "win_rate": f"{eval_manifest['win_rate']:.4f}",
                "win_rate_ci": f"[{low:.4f}, {high:.4f}]",
                "judge": eval_manifest["judge"],
                "git_commit": git_commit(),
            }
            version = mlflow.register_model(info.model_uri, name, tags=tags)
        c.set_registered_model_alias(name, section["alias"], version.version)
        aliases = sorted(c.get_model_version(name, version.version).aliases)
        logger.info("registered %s version %s, aliases %s", name, version.version, aliases)
        return {
            "config": section,
            "inputs": inputs,
            "name": name,
            "version": str(version.version),
            "aliases": aliases,
        }

    return build_once("register", key, workdir, build)
