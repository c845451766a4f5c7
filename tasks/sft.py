"""Stage 2: supervised fine-tuning of the reference model on the validated answers."""

from __future__ import annotations

from pathlib import Path

from dpoflow.tasks.common import Stage, build_once, dump, stage_task
from dpoflow.tasks.lineage import DESCRIPTION, validated_data
from dpoflow.tasks.tracking import flatten, sft_experiment
from dpoflow.tasks.training import adapter_section, train_in_child


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
            # An experiment of its own: its loss would flatten the DPO runs' charts.
            mlflow_cfg=section["mlflow"]
            | {"experiment": sft_experiment(section["mlflow"]["experiment"])},
            adapters=section["adapters"],
            model_path=base_model["path"],
            model_revision=base_model.get("revision"),
            data_path=str(Path(data["path"]) / "pairs.jsonl"),
            run_name="sft",
            params={**flatten("sft", section["sft"]), "model.base": base_model["path"]},
            tags={
                "dpoflow.stage": "sft",
                "dpoflow.data_sha256": data["data_sha256"],
                # Rewritten with links to its DPO runs as they are trained (tasks/lineage.py).
                DESCRIPTION: "Supervised fine-tuning of the reference model (the DPO runs' π_ref).",
            },
            datasets=validated_data(data)[:1],  # the pairs; SFT never sees the eval prompts
        )

    return build_once("sft", key, workdir, section, upstream, build)


STAGE = Stage(
    name="sft",
    task=sft,
    reads=lambda cfg, _: {
        "sft": dump(cfg.sft),
        "adapters": adapter_section(cfg),
        "distributed": dump(cfg.distributed),
        "mlflow": dump(cfg.mlflow),
    },
    inputs={"data": "validate.data_sha256", "base_model": "base_model.sha256"},
)
