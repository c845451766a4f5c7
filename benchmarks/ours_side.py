"""Our side of the benchmark: the real trainer loop (models/trainer.py), in this process.

``dpoflow.models.trainer.train(job)`` is called directly with a one-process gloo group: the
same code the deepspeed launcher runs (DeepSpeed engine, objective, optimizer, metrics), minus the
launcher's process start. Step times come from the loop's own metrics (its cumulative
throughput gives the elapsed time at each step), so nothing is added to the loop to time it.
For DPO the reference log-probs were computed before, in their own process, as the pipeline's
`reference` stage does (benchmarks/ours_reference.py); this process reads the stored file
(spec["reference_logps_path"]). benchmarks/dpo_bench.py adds that stage's forward passes'
time, prorated to the timed steps' share of the pairs, as TRL's time includes its reference
passes.

    python -m benchmarks.ours_side SPEC.json OUT.json
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from benchmarks.bench_common import Spec, child_main, lora_settings, rate_name, timed_window
from dpoflow.config import DPOConfig, SFTConfig
from dpoflow.models import trainer
from dpoflow.models.packing import pair_inputs
from dpoflow.tasks.launcher import free_port


def train_section(spec: Spec) -> dict:
    common = dict(
        max_steps=spec["warmup"] + spec["steps"],
        batch_size=spec["batch_size"],
        learning_rate=spec["learning_rate"],
        warmup_steps=0,
        lr_schedule="constant",
        max_length=spec["max_length"],
        max_prompt_length=spec["max_prompt_length"],
        checkpoint_every=10**9,
        seed=0,
        gradient_checkpointing=bool(spec.get("gradient_checkpointing")),
    )
    if spec["kind"] == "sft":
        return SFTConfig(answers="chosen", **common).model_dump()
    return DPOConfig(
        beta=spec["beta"],
        loss_type=spec["loss_type"],
        packing=spec.get("packing", "padded"),
        **common,
    ).model_dump()


def real_tokens(spec: Spec, section: dict) -> int:
    """Prompt + answer tokens (no padding) of the pairs the timed steps train on."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    pairs = trainer.read_pairs(spec["data"])
    if spec["kind"] == "sft":
        examples = [(p, a) for p, a in trainer.sft_examples(pairs, tokenizer, section)]
        per = [len(p) + len(a) for p, a in examples]
    else:
        per = [
            2 * len(p) + len(c) + len(r)
            for p, c, r, _ in trainer.dpo_examples(pairs, tokenizer, section)
        ]
    total = 0
    for step in range(spec["warmup"], section["max_steps"]):
        total += sum(
            per[i]
            for i in trainer.batch_indices(len(per), step, section["batch_size"], section["seed"])
        )
    return total


def positions(spec: Spec, section: dict) -> int | None:
    """Positions the timed DPO steps' forward passes run over, in the run's batch layout
    (dpo.packing): real tokens plus padding (the padded rows' or the packed rows' tails)."""
    if spec["kind"] != "dpo":
        return None
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    examples = trainer.dpo_examples(trainer.read_pairs(spec["data"]), tokenizer, section)
    total = 0
    for step in range(spec["warmup"], section["max_steps"]):
        idx = trainer.batch_indices(len(examples), step, section["batch_size"], section["seed"])
        pairs = [examples[i][:3] for i in idx]
        batch, _ = pair_inputs(pairs, 0, section["packing"], "cpu")
        total += batch["input_ids"].numel() if isinstance(batch, dict) else batch.input_ids.numel()
    return total


def run(spec: Spec) -> dict:
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    # A free port unless the spec names one: two benchmarks at once must not share it.
    os.environ.setdefault("MASTER_PORT", str(spec.get("port") or free_port()))
    section = train_section(spec)
    work = Path(tempfile.mkdtemp(prefix="ours-", dir=spec.get("scratch")))
    reference_path = spec.get("reference_logps_path") if spec["kind"] == "dpo" else None
    if spec["kind"] == "dpo" and not reference_path:
        raise ValueError("DPO needs spec['reference_logps_path'] (see benchmarks.ours_reference)")
    job = {
        "kind": spec["kind"],
        "train": section,
        "distributed": {
            "zero_stage": spec.get("zero_stage", 0),
            "precision": spec.get("precision", "fp32"),
        },
        "model_path": spec["model"],
        "data_path": spec["data"],
        "reference_logps_path": reference_path,
        "adapters": {"lora": lora_settings(spec), "load_in_4bit": bool(spec.get("load_in_4bit"))},
        "output_dir": str(work / "model"),
        "checkpoint_dir": str(work / "checkpoints"),
        "metrics_path": str(work / "metrics.jsonl"),
    }
    trainer.train(job)
    rows = [json.loads(line) for line in Path(job["metrics_path"]).read_text().splitlines()]
    rate = rate_name(spec["kind"])
    step_times = [r["step"] * spec["batch_size"] / r[rate] for r in rows]
    return {
        "seconds": timed_window(step_times, spec["warmup"]),  # training only
        "examples": spec["steps"] * spec["batch_size"],
        "tokens": real_tokens(spec, section),
        "positions": positions(spec, section),
        "losses": [r["loss"] for r in rows],
    }


if __name__ == "__main__":
    child_main(run)
