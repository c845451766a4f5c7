"""Stage 6: log the policy to MLflow as a text generator and register a version."""

from __future__ import annotations

import subprocess
from pathlib import Path

from dpoflow.tasks.common import Stage, build_once, dump, stage_logger, stage_task
from dpoflow.tasks.tracking import client, registry_lookup, server_errors, tracking_uri

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
    """A version registered for this exact stage key (a crash after registering, say).

    A search that fails raises: read as "none yet" it would register a duplicate version.
    A model with no versions is an empty answer, not an error, so no code means absence here.
    """
    versions = registry_lookup(
        lambda: c.search_model_versions(f"name='{name}'"),
        f"searching the versions of {name}",
        absent=frozenset(),
    )
    return next((v for v in versions if v.tags.get("dpoflow.key") == key), None)


@stage_task("register")
def register(key: str, workdir: str, section: dict, upstream: dict) -> dict:
    import mlflow

    from dpoflow.models.serving import log_generator

    logger = stage_logger()
    uri = tracking_uri(section["mlflow"]["tracking_uri"], workdir)
    dpo, evaluation = upstream["dpo"], upstream["evaluate"]

    def build(partial: Path) -> dict:
        note = (
            f"; the trained policy is kept in {dpo['path']} and the next run "
            "registers it without training again"
        )
        with server_errors(uri, "registering the policy", note):
            return register_version()

    def register_version() -> dict:
        c = client(uri)
        name, alias = section["registry"]["model_name"], section["registry"]["alias"]
        version = find_version(c, name, key)
        if version is None:
            with mlflow.start_run(run_id=dpo["mlflow_run_id"]):
                info = log_generator(str(Path(dpo["path"]) / dpo["model"]))
            low, high = evaluation["win_rate_ci"]
            tags = {
                "dpoflow.key": key,
                "data_sha256": upstream["validate"]["data_sha256"],
                "validation": "passed",
                "sft_run_id": upstream["sft"]["mlflow_run_id"],
                "beta": str(dpo["config"]["dpo"]["beta"]),
                "loss_type": dpo["config"]["dpo"]["loss_type"],
                "win_rate": f"{evaluation['win_rate']:.4f}",
                "win_rate_ci": f"[{low:.4f}, {high:.4f}]",
                "judge": evaluation["judge"],
                "git_commit": git_commit(),
            }
            version = mlflow.register_model(info.model_uri, name, tags=tags)
        c.set_registered_model_alias(name, alias, version.version)
        aliases = sorted(c.get_model_version(name, version.version).aliases)
        logger.info("registered %s version %s, aliases %s", name, version.version, aliases)
        return {
            "name": name,
            "version": str(version.version),
            "registered": f"{name}:{version.version}",
            "aliases": aliases,
        }

    return build_once("register", key, workdir, section, upstream, build)


STAGE = Stage(
    name="register",
    task=register,
    reads=lambda cfg, _: {"registry": dump(cfg.registry), "mlflow": dump(cfg.mlflow)},
    inputs={
        "policy": "dpo.sha256",
        "evaluation": "evaluate.sha256",
        "sft": "sft.sha256",
        "data": "validate.data_sha256",
    },
)
