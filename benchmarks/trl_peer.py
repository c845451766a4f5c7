"""TRL's side of the benchmark: DPOTrainer / SFTTrainer on the same model folder, data and
settings, timed by a callback at the end of each optimizer step.

The peer runs as TRL ships it for this setting: the reference model's forward passes run at
each step (``precompute_ref_log_probs=False``, its default), right padding, in the spec's
precision: fp32 on CPU (``bf16=False``: TRL would otherwise autocast to bf16), bf16 autocast
on a GPU.

    python -m benchmarks.trl_peer SPEC.json OUT.json
"""

from __future__ import annotations

import tempfile
import time

from datasets import load_dataset
from transformers import AutoTokenizer, TrainerCallback

from benchmarks.bench_common import Spec, child_main, lora_settings, timed_window


class StepClock(TrainerCallback):
    """Records the time at the end of every step and the logged loss of every step."""

    def __init__(self) -> None:
        self.start = 0.0
        self.step_times: list[float] = []
        self.losses: list[float] = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.step_times.append(time.perf_counter() - self.start)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))


def common_args(spec: Spec, out_dir: str) -> dict:
    return dict(
        output_dir=out_dir,
        per_device_train_batch_size=spec["batch_size"],
        max_steps=spec["warmup"] + spec["steps"],
        learning_rate=spec["learning_rate"],
        lr_scheduler_type="constant",
        max_grad_norm=1.0,
        max_length=spec["max_length"],
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=spec.get("device", "cpu") == "cpu",
        # TRL's configs turn bf16 on by default, even on CPU, and then run the reference
        # model under bf16 autocast: we compare fp32 with fp32 (on a GPU, bf16 with bf16).
        bf16=spec.get("precision", "fp32") == "bf16",
        # TRL's configs turn gradient checkpointing on by default: here it follows the spec,
        # as ours does (off unless --gradient-checkpointing), non-reentrant like ours.
        gradient_checkpointing=bool(spec.get("gradient_checkpointing")),
        gradient_checkpointing_kwargs={"use_reentrant": False},
        dataloader_num_workers=0,
        seed=0,
        disable_tqdm=True,
    )


def trainer_for(spec: Spec, out_dir: str):
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    data = load_dataset("json", data_files=spec["data"], split="train")
    if spec["kind"] == "sft":
        from trl import SFTConfig, SFTTrainer

        data = data.map(
            lambda x: {"prompt": x["prompt"], "completion": x["chosen"]},
            remove_columns=[c for c in data.column_names if c not in ("prompt",)],
        )
        args = SFTConfig(completion_only_loss=True, **common_args(spec, out_dir))
        return SFTTrainer(
            model=spec["model"], args=args, train_dataset=data, processing_class=tokenizer
        )
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(beta=spec["beta"], loss_type=[spec["loss_type"]], **common_args(spec, out_dir))
    # --lora-r: TRL's own PEFT path (its reference is the policy with the adapters disabled),
    # with the very LoraConfig our trainer builds from the same settings.
    # --load-in-4bit: TRL's QLoRA, the very BitsAndBytesConfig ours loads with.
    from dpoflow.models.lora import load_kwargs, peft_config

    adapters = lora_settings(spec)
    quantized = load_kwargs(bool(spec.get("load_in_4bit")))
    return DPOTrainer(
        model=spec["model"],
        args=args,
        train_dataset=data,
        processing_class=tokenizer,
        peft_config=None if adapters is None else peft_config(adapters),
        quantization_config=quantized.get("quantization_config"),
    )


def real_tokens(trainer, spec: Spec) -> int:
    """Prompt + answer tokens (no padding) of the timed steps' batches, in TRL's own order."""
    total = 0
    for step, batch in enumerate(trainer.get_train_dataloader()):
        if step >= spec["warmup"] + spec["steps"]:
            break
        if step >= spec["warmup"]:
            total += int(batch["attention_mask"].sum())
    return total


def run(spec: Spec) -> dict:
    clock = StepClock()
    trainer = trainer_for(spec, tempfile.mkdtemp(prefix="trl-", dir=spec.get("scratch")))
    trainer.add_callback(clock)
    trainer.train()
    return {
        "seconds": timed_window(clock.step_times, spec["warmup"]),
        "examples": spec["steps"] * spec["batch_size"],
        "tokens": real_tokens(trainer, spec),
        "losses": clock.losses,
    }


if __name__ == "__main__":
    child_main(run)
