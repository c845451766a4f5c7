"""Stage 6: log the policy to MLflow as a text generator and register a version."""

from __future__ import annotations

from pathlib import Path

from dpoflow.tasks.common import Stage, build_once, dump, stage_logger, stage_task
from dpoflow.tasks.lineage import describe_version, git_commit
from dpoflow.tasks.tracking import client, registry_lookup, server_errors, tracking_uri


def find_version(c, name: str, run_id: str, weights: str = "full"):
    """The version of `name` registered from the DPO run `run_id` in the form `weights`
    ("full" or "lora_adapter"), if any (the first such).

    One DPO run is one set of weights, and the same weights are one version: an evaluation
    with other settings, or a crash after registering, finds this version instead of making
    a second one. A search that fails raises: read as "none yet" it would register a duplicate
    version. A model with no versions is an empty answer, not an error, so no code means
    absence here.
    """
    versions = registry_lookup(
        lambda: c.search_model_versions(f"name='{name}'"),
        f"searching the versions of {name}",
        absent=frozenset(),
    )
    same = [v for v in versions if v.run_id == run_id and v.tags.get("weights", "full") == weights]
    return min(same, key=lambda v: int(v.version), default=None)


def evaluation_tags(evaluation: dict) -> dict[str, str]:
    """The version tags that come from its evaluation: the figures and the run holding them."""
    low, high = evaluation["win_rate_ci"]
    return {
        "win_rate": f"{evaluation['win_rate']:.4f}",
        "win_rate_ci": f"[{low:.4f}, {high:.4f}]",
        "judge": evaluation["judge"],
        "evaluation_run_id": evaluation["evaluation_run_id"],
    }


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
        sft = upstream["sft"]
        # LoRA: the merged weights (the default), or the adapter on the SFT model it trained
        # on, the base named in the tags below.
        unmerged = bool(dpo.get("adapter")) and not section["registry"]["merge_adapters"]
        weights = "lora_adapter" if unmerged else "full"
        version = find_version(c, name, dpo["mlflow_run_id"], weights)
        if version is not None:
            # These weights are registered: the version now records this evaluation.
            for tag, value in evaluation_tags(evaluation).items():
                c.set_model_version_tag(name, version.version, tag, value)
            logger.info(
                "%s version %s holds these weights already; its evaluation tags now name run %s",
                name,
                version.version,
                evaluation["evaluation_run_id"],
            )
        else:
            # Served requests are rendered as the training prompts were.
            rendering = {"chat_template": upstream["validate"]["config"]["data"]["chat_template"]}
            with mlflow.start_run(run_id=dpo["mlflow_run_id"]):
                if unmerged:
                    info = log_generator(
                        str(Path(dpo["path"]) / dpo["adapter"]),
                        base_model_dir=str(Path(sft["path"]) / sft["model"]),
                        **rendering,
                    )
                else:
                    info = log_generator(str(Path(dpo["path"]) / dpo["model"]), **rendering)
            tags = {
                "dpoflow.key": key,
                "data_sha256": upstream["validate"]["data_sha256"],
                "validation": "passed",
                "sft_run_id": upstream["sft"]["mlflow_run_id"],
                "beta": str(dpo["config"]["dpo"]["beta"]),
                "loss_type": dpo["config"]["dpo"]["loss_type"],
                "git_commit": git_commit(),
                "weights": weights,
                **evaluation_tags(evaluation),
            }
            if unmerged:  # the base the adapter applies to: the SFT model, by run and content
                tags["adapter_base_run_id"] = sft["mlflow_run_id"]
                tags["adapter_base_sha256"] = sft["sha256"]
            version = mlflow.register_model(info.model_uri, name, tags=tags)
        # The evaluation's run names the version it evaluated (a nested run has no other link).
        run_tag = f"{name}:{version.version}"
        c.set_tag(evaluation["evaluation_run_id"], "dpoflow.model_version", run_tag)
        c.set_registered_model_alias(name, alias, version.version)
        describe_version(c, name, str(version.version))
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
