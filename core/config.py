"""The pipeline config: YAML validated by pydantic, with dotted overrides.

`load_config(path, overrides)` (files, the CLI) and `resolve_config(mapping)` (a flow's
parameter, a deployment) are the ways in; both start from configs/default.yaml, the one
source of defaults. Unknown keys, wrong types and out-of-range values are refused with
one sentence naming the key and what is allowed, before anything runs.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from dpoflow.errors import ConfigError

# configs/ is installed as the data package `dpoflow.configs` (pyproject.toml).
DEFAULT_CONFIG = Path(str(resources.files("dpoflow.configs") / "default.yaml"))


class Section(BaseModel):
    """A config section: unknown keys are an error, not a silent no-op."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(Section):
    train: str = Field("embedded:imdb", description="preference data: file, folder, hub name")
    eval_prompts: str = Field("embedded:imdb", description="held-out prompts for evaluation")
    split: str = "train"
    revision: str | None = None
    columns: dict[str, str] = Field(default_factory=dict, description="internal name -> source")
    min_rows: int = Field(100, ge=1)
    severities: dict[str, Literal["error", "warning"]] = Field(default_factory=dict)
    chat_template: Literal["auto", "always", "never"] = Field(
        "auto", description="render plain prompts as one user turn with the tokenizer's template"
    )
    max_truncated_share: float = Field(
        0.1, ge=0, le=1, description="share of answers cut at dpo.max_length before it fails"
    )


class LoraConfig(Section):
    """Low-rank adapters (peft): SFT and DPO train these instead of every weight."""

    r: int = Field(16, ge=1, description="rank of each adapter")
    alpha: float = Field(32.0, gt=0, description="scale: the update is alpha / r x B A")
    dropout: float = Field(0.0, ge=0, lt=1)
    # peft's "all-linear": every linear layer but the output head.
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description='"all-linear" or module names such as [q_proj, v_proj]'
    )


class ModelConfig(Section):
    base: str = Field("embedded:tiny-llama", description="base model: hub name or local folder")
    revision: str | None = None
    lora: LoraConfig | None = Field(None, description="train adapters; None = full fine-tuning")
    load_in_4bit: bool = Field(False, description="QLoRA: NF4 base weights on CUDA, bf16 compute")

    @model_validator(mode="after")
    def _4bit_is_possible(self) -> ModelConfig:
        if not self.load_in_4bit:
            return self
        if self.lora is None:
            raise ValueError(
                "4-bit weights cannot be trained directly: add a model.lora section "
                "(QLoRA trains adapters on them) or set load_in_4bit to false"
            )
        # Whether this machine has CUDA is not the config's to say: the config is read on
        # machines that never train (serving, the registry, data validation); see
        # models/lora.py require_cuda_for_4bit, which `run` and `sweep` ask before anything runs.
        return self


class TrainConfig(Section):
    """What SFT and DPO share: one training loop serves both."""

    max_steps: int = Field(300, ge=1)
    epochs: float | None = Field(None, gt=0, description="if set, overrides max_steps")
    batch_size: int = Field(32, ge=1, description="global batch (sequences for SFT, pairs for DPO)")
    grad_accum: int = Field(1, ge=1)
    learning_rate: float = Field(1e-3, gt=0)
    lr_schedule: Literal["constant", "linear", "cosine"] = "cosine"
    warmup_steps: int = Field(10, ge=0)
    optimizer: Literal["adamw", "rmsprop"] = "adamw"
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    max_length: int = Field(96, ge=8)
    max_prompt_length: int = Field(32, ge=1)
    checkpoint_every: int = Field(100, ge=1)
    eval_every: int = Field(0, ge=0, description="steps between held-out evaluations; 0 = never")
    eval_examples: int = Field(64, ge=1, description="examples held out when eval_every > 0")
    gradient_checkpointing: bool = False
    seed: int = 0

    @model_validator(mode="after")
    def _prompt_fits(self) -> TrainConfig:
        if self.max_prompt_length >= self.max_length:
            raise ValueError(
                f"max_prompt_length ({self.max_prompt_length}) must be below max_length "
                f"({self.max_length}) so that answers have room"
            )
        return self


class SFTConfig(TrainConfig):
    answers: Literal["both", "chosen"] = Field(
        "both", description="which answers the reference is fine-tuned on"
    )


# The preference losses `models/losses.py` implements, and the judges `models/judges.py`
# builds: named here, at the bottom, so the config can refuse anything else.
LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "sigmoid_norm", "simpo")
JUDGES = ("llm", "reward_model", "vader")
# How the DPO forward lays out a batch (`models/packing.py`): right-padded rows, sequences packed
# end to end, or packed with one prompt per pair shared by both answers.
PACKING_MODES = ("padded", "packed", "shared_prompt")


class DPOConfig(TrainConfig):
    max_steps: int = Field(200, ge=1)
    learning_rate: float = Field(5e-4, gt=0)
    beta: float = Field(0.1, gt=0)
    loss_type: Literal[LOSS_TYPES] = "sigmoid"
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    simpo_gamma: float = 0.5
    rpo_alpha: float = Field(0.0, ge=0, description="weight of an NLL term on chosen answers")
    reference: Literal["precomputed", "on_the_fly"] = "precomputed"
    packing: Literal[PACKING_MODES] = Field(
        "padded", description="batch layout of the DPO forward: padded | packed | shared_prompt"
    )
    group_by_length: bool = Field(
        True,
        description="order each global batch by length before cutting it into micro-batches "
        "and ranks: less padding, even work per process, the same rows per step",
    )


class LLMJudgeConfig(Section):
    """An OpenAI-compatible chat-completions endpoint; the key stays in the environment."""

    base_url: str | None = Field(None, description="e.g. http://127.0.0.1:8000/v1")
    model: str | None = None
    api_key_env: str | None = Field(None, description="name of the variable holding the key")
    timeout_seconds: float = Field(60.0, gt=0)
    max_retries: int = Field(3, ge=0)
    concurrency: int = Field(4, ge=1)
    allow_insecure_http: bool = Field(
        False,
        description="allow plain http to a non-loopback base_url (the key travels unencrypted)",
    )


class EvalConfig(Section):
    num_prompts: int = Field(256, ge=1)
    max_new_tokens: int = Field(32, ge=1)
    temperature: float = Field(1.0, ge=0)
    temperatures: list[float] | None = Field(
        None, description="also evaluate at these temperatures (metrics eval/win_rate_t{T}, ...)"
    )
    top_p: float = Field(1.0, gt=0, le=1)
    batch_size: int = Field(64, ge=1)
    judge: str = Field("vader", description="vader | reward_model | llm")
    reward_model: str | None = Field(None, description="judge=reward_model: folder or hub name")
    llm: LLMJudgeConfig = Field(default_factory=LLMJudgeConfig)
    seed: int = 0

    @field_validator("judge")
    @classmethod
    def _judge_is_known(cls, judge: str) -> str:
        if judge not in JUDGES:
            raise ValueError(f"unknown judge '{judge}': set it to one of {', '.join(JUDGES)}")
        return judge

    @model_validator(mode="after")
    def _judge_has_its_options(self) -> EvalConfig:
        if self.judge == "reward_model" and not self.reward_model:
            raise ValueError("judge reward_model needs eval.reward_model (a folder or hub name)")
        if self.judge == "llm" and not (self.llm.base_url and self.llm.model):
            raise ValueError("judge llm needs eval.llm.base_url and eval.llm.model")
        if any(t < 0 for t in self.temperatures or []):
            raise ValueError("temperatures must be >= 0")
        return self


class DistributedConfig(Section):
    num_processes: int = Field(1, ge=1, description="processes on this machine (CPU or GPUs)")
    num_gpus: int | None = Field(None, ge=1, description="GPUs per node; None = CPU/auto")
    num_nodes: int = Field(1, ge=1)
    hostfile: str | None = None
    zero_stage: Literal[0, 1, 2, 3] = 0
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    master_port: int | None = Field(None, ge=1024, le=65535)
    timeout_seconds: int | None = Field(None, ge=1, description="end training after this long")

    @model_validator(mode="after")
    def _nodes_are_listed(self) -> DistributedConfig:
        # Without a hostfile a job runs on this machine only (tasks/launcher.py).
        if self.num_nodes > 1 and not self.hostfile:
            raise ValueError("num_nodes > 1 needs distributed.hostfile, the list of the nodes")
        return self


class RegistryConfig(Section):
    model_name: str = "dpoflow-policy"
    alias: str = "candidate"
    merge_adapters: bool = Field(
        True, description="LoRA: log merged weights; false logs the adapter and its base"
    )


class MlflowConfig(Section):
    experiment: str = "dpoflow"
    tracking_uri: str | None = Field(None, description="default: $MLFLOW_TRACKING_URI or sqlite")


class PipelineConfig(Section):
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    sft: SFTConfig = Field(default_factory=SFTConfig)
    dpo: DPOConfig = Field(default_factory=DPOConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)


def parse_override(item: str) -> tuple[list[str], Any]:
    """`dpo.beta=0.2` -> (["dpo", "beta"], 0.2); the value is read as YAML."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override '{item}' is not KEY=VALUE: write it like --set dpo.beta=0.2.")
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else ""


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        path, value = parse_override(item)
        node = raw
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(
                    f"override '{item}' goes below '{part}', which is a value, not a section: "
                    "check the key against the config reference in the README."
                )
            node = child
        node[path[-1]] = value
    return raw


def describe_error(error: dict[str, Any]) -> str:
    key = ".".join(str(p) for p in error["loc"]) or "config"
    if error["type"] == "extra_forbidden":
        return f"unknown config key '{key}': remove it or fix its spelling (see the README)."
    message = error["msg"].removeprefix("Value error, ")
    return f"config key '{key}' is invalid: {message}."


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML config file's mapping of sections, or one sentence saying what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist: pass an existing --config path.")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(
            f"config file '{path}' is not valid YAML ({exc}): fix its syntax."
        ) from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of sections, like data: ...")
    return raw


def merged(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """`base` with `update` laid over it, section by section (`update` wins)."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


def validated(raw: dict[str, Any]) -> PipelineConfig:
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(describe_error(exc.errors()[0])) from None


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None
) -> PipelineConfig:
    """The one source of a run's config: the embedded default (configs/default.yaml), then
    the user's YAML file laid over it, then `--set` overrides; validated."""
    raw = read_yaml(DEFAULT_CONFIG)
    if path:
        raw = merged(raw, read_yaml(path))
    return validated(apply_overrides(raw, overrides or []))


def resolve_config(config: dict[str, Any]) -> PipelineConfig:
    """A flow's `config` parameter: overrides laid over the embedded default, as
    `load_config` does for a file. A deployment passes only what it changes; the CLI
    passes a whole config, which resolves to itself."""
    return validated(merged(read_yaml(DEFAULT_CONFIG), config))
