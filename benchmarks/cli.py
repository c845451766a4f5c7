"""`python -m benchmarks`: the command line; the logic lives in benchmarks/dpo_bench.py."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

bench_app = typer.Typer(
    help="Benchmark our SFT/DPO training against TRL's trainers.", no_args_is_help=True
)

Model = Annotated[
    Path, typer.Option("--model", help="Hugging Face model folder.", exists=True, file_okay=False)
]
Data = Annotated[
    str,
    typer.Option(
        "--data",
        help="Preference data as `dpoflow validate` reads it: a .jsonl/.json/.csv/.parquet "
        "file, a save_to_disk folder or a hub name; plain, HH or conversational rows.",
    ),
]
Columns = Annotated[
    list[str] | None,
    typer.Option(
        "--columns",
        help="Map a column name, like --columns prompt=question (repeatable): data.columns.",
    ),
]
Steps = Annotated[int, typer.Option("--steps", help="Timed steps (after the warm-up).")]
Warmup = Annotated[int, typer.Option("--warmup", help="Untimed steps first.")]
Batch = Annotated[int, typer.Option("--batch-size", help="Pairs (DPO) or sequences per step.")]
MaxLen = Annotated[int, typer.Option("--max-length")]
MaxPrompt = Annotated[int, typer.Option("--max-prompt-length")]
Peer = Annotated[str | None, typer.Option("--peer", help="'trl' to run TRL's trainer too.")]
JsonOut = Annotated[Path | None, typer.Option("--json", help="Write the report here.")]
Threads = Annotated[int, typer.Option("--threads", help="torch threads per side.")]


class Where(StrEnum):
    """Where both sides of the bench train."""

    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


Device = Annotated[
    Where,
    typer.Option(
        "--device",
        help="Where both sides train: cpu (fp32) or cuda (bf16); auto picks cuda "
        "when there is a GPU.",
    ),
]
ZeroStage = Annotated[
    int,
    typer.Option(
        "--zero-stage",
        min=0,
        max=3,
        help="Our DeepSpeed ZeRO stage (one process: 0 holds the least memory).",
    ),
]
Checkpointing = Annotated[
    bool,
    typer.Option(
        "--gradient-checkpointing",
        help="Recompute activations in the backward pass on both sides (our "
        "*.gradient_checkpointing, TRL's gradient_checkpointing, non-reentrant on both); "
        "off by default on both (TRL's own default is on).",
    ),
]
Repeats = Annotated[
    int,
    typer.Option(
        "--repeats",
        min=1,
        help="Run both sides this many times in turn; report each side's "
        "fastest run (and the highest peak memory of its runs).",
    ),
]


def _run(
    spec: dict,
    peer: str | None,
    json_out: Path | None,
    repeats: int,
    modes: list[str] | None = None,
) -> None:
    """Run the bench (the layout ablation with several packing ``modes``); a mistake the user
    can fix (a model folder or data file the pipeline would refuse, too few pairs) is one
    sentence, exit 1."""
    from benchmarks.ablation import run_ablation
    from benchmarks.dpo_bench import run_bench
    from dpoflow.errors import UserError
    from dpoflow.tasks.sources import check_model_source

    try:
        check_model_source(spec["model"])  # a folder the pipeline could not load is refused
        if modes:
            run_ablation(spec, modes, peer, json_out, repeats=repeats)
        else:
            run_bench(spec, peer, json_out, repeats=repeats)
    except (ValueError, UserError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None


def _columns(items: list[str] | None) -> dict[str, str]:
    """["prompt=question"] -> {"prompt": "question"}."""
    mapping = {}
    for item in items or []:
        name, sep, source = item.partition("=")
        if not sep or not name.strip() or not source.strip():
            raise typer.BadParameter(
                f"{item!r} is not NAME=COLUMN: write it like --columns prompt=question.",
                param_hint="'--columns'",
            )
        mapping[name.strip()] = source.strip()
    return mapping


def _spec(
    kind: str,
    model: Path,
    data: str,
    steps: int,
    warmup: int,
    batch_size: int,
    max_length: int,
    max_prompt_length: int,
    threads: int,
    where: Where,
    zero_stage: int,
    **extra,
) -> dict:
    import torch

    if max_prompt_length >= max_length:
        raise typer.BadParameter(
            f"{max_prompt_length} is not below --max-length {max_length}: answers need room; "
            "lower --max-prompt-length or raise --max-length.",
            param_hint="'--max-prompt-length'",
        )
    device = where.value
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        raise typer.BadParameter(
            "this machine's torch sees no GPU: run on a GPU machine, or leave --device out.",
            param_hint="'--device'",
        )
    if extra.get("load_in_4bit") and device != "cuda":
        raise typer.BadParameter(
            "4-bit NF4 (bitsandbytes) trains on a CUDA GPU and this bench runs on the CPU: "
            "run on a GPU machine, or leave --load-in-4bit out.",
            param_hint="'--load-in-4bit'",
        )
    return dict(
        kind=kind,
        model=str(model),
        data=data,
        steps=steps,
        warmup=warmup,
        batch_size=batch_size,
        max_length=max_length,
        max_prompt_length=max_prompt_length,
        threads=threads,
        device=device,
        precision="bf16" if device == "cuda" else "fp32",
        zero_stage=zero_stage,
        learning_rate=5e-4,
        **extra,
    )


PresetName = Annotated[
    str | None,
    typer.Option(
        "--preset",
        help="Build (once, under .dpoflow/bench/) and use a preset's model and synthetic pairs: "
        "0.5b (Qwen2 shape, prompts ~200 tokens, answers ~250, max_length 1024; for a GPU) or "
        "long-prompt (4m Llama, prompts ~3x the answers; for a CPU). Its lengths, batch and "
        "steps apply unless given. Replaces --model and --data.",
    ),
]
Packing = Annotated[
    str,
    typer.Option(
        "--packing",
        help="Our dpo.packing: padded, packed or shared_prompt; several, comma-separated, run "
        "the layout ablation (each mode in turn on the same pairs).",
    ),
]


def _OrPreset(name: str, help: str):  # noqa: N802  (a type, as typer reads it)
    """An int option of `dpo` whose default (in brackets) a --preset may replace."""
    return Annotated[int | None, typer.Option(name, help=f"{help} A --preset sets its own.")]


def _packing_modes(value: str) -> list[str]:
    from dpoflow.config import PACKING_MODES

    modes = [m.strip() for m in value.split(",") if m.strip()]
    unknown = [m for m in modes if m not in PACKING_MODES]
    if not modes or unknown:
        raise typer.BadParameter(
            f"{value!r} is not a list of packing modes: use one or more of "
            f"{', '.join(PACKING_MODES)}, comma-separated.",
            param_hint="'--packing'",
        )
    return modes


@bench_app.command()
def dpo(
    model: Annotated[Path | None, Model.__metadata__[0]] = None,
    data: Annotated[str | None, Data.__metadata__[0]] = None,
    steps: _OrPreset("--steps", "Timed steps [20].") = None,
    warmup: _OrPreset("--warmup", "Untimed steps first [3].") = None,
    batch_size: _OrPreset("--batch-size", "Pairs per step [16].") = None,
    max_length: _OrPreset("--max-length", "[128]") = None,
    max_prompt_length: _OrPreset("--max-prompt-length", "[64]") = None,
    preset: PresetName = None,
    packing: Packing = "padded",
    peer: Peer = None,
    columns: Columns = None,
    json_out: JsonOut = None,
    threads: Threads = 2,
    repeats: Repeats = 1,
    device: Device = Where.auto,
    zero_stage: ZeroStage = 0,
    beta: Annotated[float, typer.Option("--beta")] = 0.1,
    loss_type: Annotated[str, typer.Option("--loss-type")] = "sigmoid",
    gradient_checkpointing: Checkpointing = False,
    lora_r: Annotated[
        int,
        typer.Option(
            "--lora-r",
            min=0,
            help="Train LoRA adapters of this rank on every linear layer (alpha 2r) on both "
            "sides (TRL through its peft_config), and our full fine-tuning too, for the ratio; "
            "0 = full fine-tuning only.",
        ),
    ] = 0,
    load_in_4bit: Annotated[
        bool,
        typer.Option(
            "--load-in-4bit",
            help="QLoRA: the base's linear layers in 4-bit NF4 (bitsandbytes) on both sides "
            "(TRL through its quantization_config); needs --lora-r and a CUDA GPU.",
        ),
    ] = False,
) -> None:
    """Train our DPO (and TRL's DPOTrainer with --peer trl) for --steps steps and compare."""
    modes = _packing_modes(packing)
    if load_in_4bit and not lora_r:
        raise typer.BadParameter(
            "a 4-bit base cannot be fine-tuned fully: give --lora-r too.",
            param_hint="'--load-in-4bit'",
        )
    sizes = dict(
        steps=steps,
        warmup=warmup,
        batch_size=batch_size,
        max_length=max_length,
        max_prompt_length=max_prompt_length,
    )
    defaults = dict(steps=20, warmup=3, batch_size=16, max_length=128, max_prompt_length=64)
    if preset is not None:
        model, data, defaults = _preset(preset, model, data, sizes)
    if model is None or data is None:
        raise typer.BadParameter(
            "the bench needs a model and pairs: give --model and --data, or --preset.",
            param_hint="'--model'",
        )
    sizes = {k: defaults[k] if v is None else v for k, v in sizes.items()}
    spec = _spec(
        "dpo",
        model,
        data,
        sizes["steps"],
        sizes["warmup"],
        sizes["batch_size"],
        sizes["max_length"],
        sizes["max_prompt_length"],
        threads,
        device,
        zero_stage,
        columns=_columns(columns),
        beta=beta,
        loss_type=loss_type,
        packing=modes[0],
        lora_r=lora_r,
        load_in_4bit=load_in_4bit,
        gradient_checkpointing=gradient_checkpointing,
    )
    if len(modes) > 1:
        _run(spec, peer, json_out, repeats, modes=modes)
    else:
        _run(spec, peer, json_out, repeats)


def _preset(name: str, model, data, sizes: dict) -> tuple[Path, str, dict]:
    """The preset's model and pairs (built on first use) and its sizes as defaults."""
    from dataclasses import asdict

    from benchmarks.presets import PRESETS, ensure_preset

    if name not in PRESETS:
        raise typer.BadParameter(
            f"unknown preset {name!r}: use one of {', '.join(PRESETS)}.", param_hint="'--preset'"
        )
    if model is not None or data is not None:
        raise typer.BadParameter(
            "--preset brings its own model and pairs: leave out --model and --data.",
            param_hint="'--preset'",
        )
    defaults = asdict(PRESETS[name])
    merged = {k: defaults[k] if v is None else v for k, v in sizes.items()}
    n_pairs = (merged["warmup"] + merged["steps"]) * merged["batch_size"]
    model_dir, pairs = ensure_preset(name, n_pairs)
    return model_dir, str(pairs), defaults


@bench_app.command()
def sft(
    model: Model,
    data: Data,
    steps: Steps = 20,
    warmup: Warmup = 3,
    batch_size: Batch = 32,
    max_length: MaxLen = 128,
    max_prompt_length: MaxPrompt = 64,
    peer: Peer = None,
    columns: Columns = None,
    json_out: JsonOut = None,
    threads: Threads = 2,
    repeats: Repeats = 1,
    device: Device = Where.auto,
    zero_stage: ZeroStage = 0,
    gradient_checkpointing: Checkpointing = False,
) -> None:
    """Train our SFT (and TRL's SFTTrainer with --peer trl) for --steps steps and compare."""
    spec = _spec(
        "sft",
        model,
        data,
        steps,
        warmup,
        batch_size,
        max_length,
        max_prompt_length,
        threads,
        device,
        zero_stage,
        columns=_columns(columns),
        gradient_checkpointing=gradient_checkpointing,
    )
    _run(spec, peer, json_out, repeats)
