"""Stage 4: DPO of the policy, starting from the SFT model, against the stored reference."""

from __future__ import annotations

from pathlib import Path

from dpoflow.tasks.common import Stage, build_once, dump, stage_task
from dpoflow.tasks.lineage import DESCRIPTION, SFT_RUN_ID, link_sft_and_dpo, validated_data
from dpoflow.tasks.tracking import flatten, server_errors, tracking_uri
from dpoflow.tasks.training import adapter_section, train_in_child


@stage_task("dpo")
def dpo(key: str, workdir: str, section: dict, upstream: dict) -> dict:
    dpo_cfg = section["dpo"]
    data, sft, reference = upstream["validate"], upstream["sft"], upstream["reference"]

    def build(partial: Path) -> dict:
        tags = {
            "dpoflow.stage": "dpo",
            "dpoflow.data_sha256": data["data_sha256"],
            SFT_RUN_ID: sft["mlflow_run_id"],
            "dpoflow.validation": "passed",
            # The evaluation stage replaces it with the headline result.
            DESCRIPTION: f"DPO β={dpo_cfg['beta']:g}, {dpo_cfg['loss_type']}: not evaluated yet.",
        }
        if section["parent_run_id"]:
            tags["mlflow.parentRunId"] = section["parent_run_id"]
        # Each value once, under its config key (`dpo.beta`): β and the loss type first.
        params = flatten("", section["logged_config"])
        params = {k: params[k] for k in ("dpo.beta", "dpo.loss_type")} | params
        reference_path = None
        if reference is not None:
            reference_path = str(Path(reference["path"]) / reference["logps"])
        result = train_in_child(
            partial,
            kind="dpo",
            workdir=workdir,
            section=dpo_cfg,
            distributed=section["distributed"],
            mlflow_cfg=section["mlflow"],
            adapters=section["adapters"],
            model_path=str(Path(sft["path"]) / sft["model"]),
            data_path=str(Path(data["path"]) / "pairs.jsonl"),
            run_name=f"dpo-{dpo_cfg['loss_type']}-beta{dpo_cfg['beta']}",
            params=params,
            tags=tags,
            reference_logps_path=reference_path,
            # The Great Expectations report and Data Docs travel with the run they gated.
            artifacts={"validation": Path(data["path"]) / "report"},
            datasets=validated_data(data),
        )
        uri = tracking_uri(section["mlflow"]["tracking_uri"], workdir)
        with server_errors(uri, "linking the DPO run and its SFT run"):
            link_sft_and_dpo(uri, sft["mlflow_run_id"], result["mlflow_run_id"])
        return result

    return build_once("dpo", key, workdir, section, upstream, build)


STAGE = Stage(
    name="dpo",
    task=dpo,
    reads=lambda cfg, parent_run_id: {
        "dpo": dump(cfg.dpo),
        "adapters": adapter_section(cfg),
        "distributed": dump(cfg.distributed),
        "mlflow": dump(cfg.mlflow),
        "parent_run_id": parent_run_id,  # a sweep's child trains its own run
        # Logged as MLflow params only; not part of the key (see RUN_ONLY).
        "logged_config": cfg.model_dump(mode="json", exclude={"mlflow"}),
    },
    inputs={"data": "validate.data_sha256", "sft": "sft.sha256", "reference": "reference.sha256"},
    optional=frozenset({"reference"}),  # dpo.reference: on_the_fly computes it while training
)
