"""Stage 2: supervised fine-tuning of the reference model on the validated answers."""

from __future__ import annotations

from pathlib import Path

from dpoflow.tasks.common import Stage, build_once, dump, stage_task
from dpoflow.tasks.tracking import flatten
from dpoflow.tasks.training import train_in_child


@stage_task("sft")
def sft(key: str, workdir: str, section: dict, upstream: dict) -> dict:
    data, base_model = upstream["validate"], upstream["base_model"]

    def build(partial: Path) -> dict:
        return train_in_child(
            partial,
            kind="sft",
            workdir=workdir,
            section=section["sft"],
            distributed=section["distributed"],
            mlflow_cfg=section["mlflow"],
            model_path=base_model["path"],
            model_revision=base_model.get("revision"),
            data_path=str(Path(data["path"]) / "pairs.jsonl"),
            run_name="sft",
            params={**flatten("sft", section["sft"]), "model.base": base_model["path"]},
            tags={"dpoflow.stage": "sft", "dpoflow.data_sha256": data["data_sha256"]},
        )

    return build_once("sft", key, workdir, section, upstream, build)


STAGE = Stage(
    name="sft",
    task=sft,
    reads=lambda cfg, _: {
        "sft": dump(cfg.sft),
        "distributed": dump(cfg.distributed),
        "mlflow": dump(cfg.mlflow),
    },
    inputs={"data": "validate.data_sha256", "base_model": "base_model.sha256"},
)
