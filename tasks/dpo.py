"""Stage 4: DPO of the policy, starting from the SFT model, against the stored reference."""

from __future__ import annotations

from pathlib import Path

from dpoflow.tasks.common import Stage, build_once, dump, stage_task
from dpoflow.tasks.tracking import flatten
from dpoflow.tasks.training import train_in_child


@stage_task("dpo")
def dpo(key: str, workdir: str, section: dict, upstream: dict) -> dict:
    dpo_cfg = section["dpo"]
    data, sft, reference = upstream["validate"], upstream["sft"], upstream["reference"]

    def build(partial: Path) -> dict:
        tags = {
            "dpoflow.stage": "dpo",
            "dpoflow.data_sha256": data["data_sha256"],
            "dpoflow.sft_run_id": sft["mlflow_run_id"],
            "dpoflow.validation": "passed",
        }
        if section["parent_run_id"]:
            tags["mlflow.parentRunId"] = section["parent_run_id"]
        # β first, so it leads the MLflow compare view; then every value that matters.
        params = {"beta": str(dpo_cfg["beta"]), "loss_type": dpo_cfg["loss_type"]}
        params.update(flatten("", section["logged_config"]))
        reference_path = None
        if reference is not None:
            reference_path = str(Path(reference["path"]) / reference["logps"])
        return train_in_child(
            partial,
            kind="dpo",
            workdir=workdir,
            section=dpo_cfg,
            distributed=section["distributed"],
            mlflow_cfg=section["mlflow"],
            model_path=str(Path(sft["path"]) / sft["model"]),
            data_path=str(Path(data["path"]) / "pairs.jsonl"),
            run_name=f"dpo-{dpo_cfg['loss_type']}-beta{dpo_cfg['beta']}",
            params=params,
            tags=tags,
            reference_logps_path=reference_path,
            # The Great Expectations report and Data Docs travel with the run they gated.
            artifacts={"validation": Path(data["path"]) / "report"},
        )

    return build_once("dpo", key, workdir, section, upstream, build)


STAGE = Stage(
    name="dpo",
    task=dpo,
    reads=lambda cfg, parent_run_id: {
        "dpo": dump(cfg.dpo),
        "distributed": dump(cfg.distributed),
        "mlflow": dump(cfg.mlflow),
        "parent_run_id": parent_run_id,  # a sweep's child trains its own run
        # Logged as MLflow params only; not part of the key (see RUN_ONLY).
        "logged_config": cfg.model_dump(mode="json", exclude={"mlflow"}),
    },
    inputs={"data": "validate.data_sha256", "sft": "sft.sha256", "reference": "reference.sha256"},
    optional=frozenset({"reference"}),  # dpo.reference: on_the_fly computes it while training
)
