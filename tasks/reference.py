"""Stage 3: the reference model's log-probs of the training pairs DPO will read, computed once.

The reference is frozen, so its log-probs depend only on (SFT model, data,
tokenization limits, precision), never on β: stored here, they serve every β of
a sweep and every epoch of DPO without holding a second model in memory.

The job runs under the `deepspeed` launcher like training (`models/reference_worker.py`),
sharded over every process, and scores only the pairs the DPO run reads (all of them when
it covers the file). Its chunks stay in the stage's partial folder until the stage is
complete, so a killed or retried stage scores only the chunks it had not finished.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from dpoflow.tasks.common import Stage, build_once, dump, stage_logger, stage_task
from dpoflow.tasks.launcher import run_training

# Run by name under the launcher (a string: it is imported in the child only).
WORKER = "dpoflow.models.reference_worker"
OUTPUT = "reference_logps.safetensors"  # the worker's OUTPUT
# Pairs per chunk: the unit a killed stage resumes from, a few forward batches of 64.
CHUNK_PAIRS = 256
# What decides which pairs DPO reads (`trainer.examples_read`) and how they are tokenized;
# β, the loss and the learning rate do not, so a sweep shares one reference.
PAIRS_READ = (
    "max_steps",
    "epochs",
    "batch_size",
    "grad_accum",
    "seed",
    "eval_every",
    "eval_examples",
    "max_length",
    "max_prompt_length",
)


@stage_task("reference")
def reference(key: str, workdir: str, section: dict, upstream: dict) -> dict:
    logger = stage_logger()
    sft, data = upstream["sft"], upstream["validate"]

    def build(partial: Path) -> dict:
        job = {
            "kind": "reference",
            "train": section["dpo"],
            "distributed": section["distributed"],
            "load_in_4bit": section["load_in_4bit"],
            "model_path": str(Path(sft["path"]) / sft["model"]),
            "data_path": str(Path(data["path"]) / "pairs.jsonl"),
            "output_dir": str(partial),
            "chunks_dir": str(partial / "chunks"),
            "chunk_pairs": CHUNK_PAIRS,
            "metrics_path": str(partial / "metrics.jsonl"),  # none: progress goes to the log
        }
        result = run_training(
            job,
            partial,
            log=logger.info,
            on_metrics=lambda rows: None,
            timeout_seconds=section["distributed"].get("timeout_seconds"),
            module=WORKER,
        )
        # The joined file is the output; chunks were only resume points.
        shutil.rmtree(partial / "chunks", ignore_errors=True)
        return {
            "logps": OUTPUT,
            "n_pairs": result["n_pairs"],
            "reused_chunks": result["reused_chunks"],
        }

    return build_once("reference", key, workdir, section, upstream, build)


STAGE = Stage(
    name="reference",
    task=reference,
    # The DPO settings that choose and tokenize the pairs, how the job is launched, and
    # whether the base is quantized (QLoRA's reference is the NF4 base its policy starts from).
    reads=lambda cfg, _: {
        "dpo": {k: v for k, v in dump(cfg.dpo).items() if k in PAIRS_READ},
        "distributed": dump(cfg.distributed),
        "load_in_4bit": cfg.model.load_in_4bit,
    },
    inputs={"data": "validate.data_sha256", "sft": "sft.sha256"},
    enabled=lambda cfg: cfg.dpo.reference == "precomputed",
)
