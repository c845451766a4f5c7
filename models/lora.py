"""LoRA and QLoRA for the training loop, with the real `peft` library.

The config's `model.lora` section (None = full fine-tuning) reaches the trainer as a plain
dict. With it the base weights are frozen and only the low-rank adapters train, so the
optimizer state, the gradients and a checkpoint cover the adapters only. B starts at zero,
so an adapted model's first forward pass is its base model's, bit for bit: DPO's reference
is the starting weights, and the stored reference log-probs already hold it.

What a stage hands on is always an ordinary Hugging Face folder with the adapters merged
in (`save_merged`), so the reference stage, evaluation and serving read one format; the
adapter alone is kept beside it for registering it unmerged.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpoflow.errors import ConfigError

if TYPE_CHECKING:  # torch is imported where it is used: the flow process reads ADAPTER_DIR only
    import torch

# Beside the trained model folder: the adapter alone (adapter_config.json + its weights).
ADAPTER_DIR = "adapter"

# peft imports bitsandbytes whenever it is installed, and its CPU backend then warns that an
# optional kernels package is missing, in every job's log. QLoRA runs only on CUDA (where
# that backend is unused); the warning is noise, its GPU warnings are kept.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def require_cuda_for_4bit(load_in_4bit: bool) -> None:
    """Refuse 4-bit loading on a machine without CUDA (bitsandbytes NF4 runs on CUDA only),
    before a run starts anything. Asked where training is started, not when the config is
    read: serving, the registry and data validation read the same config on machines that
    never train."""
    if not load_in_4bit:
        return
    import torch

    if not torch.cuda.is_available():
        raise ConfigError(
            "4-bit loading (bitsandbytes NF4) needs a CUDA GPU and this machine has none: "
            "set model.load_in_4bit to false, or run on a GPU machine."
        )


def load_kwargs(load_in_4bit: bool) -> dict[str, Any]:
    """Extra `from_pretrained` arguments: NF4 weights with bf16 compute for QLoRA, on this
    rank's GPU. A run refuses 4-bit without CUDA before it starts (`require_cuda_for_4bit`);
    transformers calls bitsandbytes to quantize only when these arguments carry its config."""
    if not load_in_4bit:
        return {}
    import torch
    from transformers import BitsAndBytesConfig

    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_use_double_quant=True,
    )
    # Quantized weights are placed when loaded. Without CUDA (tests only: runs refuse it)
    # bitsandbytes' CPU kernels hold them.
    place = _local_rank() if torch.cuda.is_available() else "cpu"
    return {"quantization_config": quantization, "device_map": {"": place}}


def load_base_model(model_path: str, *, revision: str | None, load_in_4bit: bool):
    """The weights a training stage starts from, as the trainer and the reference stage both
    load them: fp32 (DeepSpeed casts to the run's precision), or with QLoRA the linear layers'
    weights NF4-quantized from those fp32 values. The reference of a QLoRA run is this
    quantized base, as the policy's is, so the policy starts exactly at its reference."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        model_path, revision=revision, dtype=torch.float32, **load_kwargs(load_in_4bit)
    )


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def peft_config(lora: dict[str, Any]):
    """peft's LoraConfig for the config's `model.lora` section."""
    from peft import LoraConfig

    return LoraConfig(
        r=lora["r"],
        lora_alpha=lora["alpha"],
        lora_dropout=lora["dropout"],
        target_modules=lora["target_modules"],
        task_type="CAUSAL_LM",
    )


def prepare(
    model: torch.nn.Module,
    lora: dict[str, Any] | None,
    *,
    load_in_4bit: bool = False,
    gradient_checkpointing: bool = False,
) -> torch.nn.Module:
    """The model to train: activation checkpointing if asked, then adapters if `lora` is set.

    Checkpointing is non-reentrant, and transformers then makes the embeddings' output require
    grad, so the gradient reaches adapters inside checkpointed layers whose inputs come from
    frozen weights.
    """
    if gradient_checkpointing:  # recompute activations: less memory, more time
        model.activation_checkpointing_enable()
    if lora is None:
        return model
    from peft import get_peft_model, prepare_model_for_kbit_training

    if load_in_4bit:  # norms in fp32, inputs that require grad: what training NF4 needs
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing
        )
    return get_peft_model(model, peft_config(lora))


def is_adapted(model: torch.nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """What the optimizer updates: everything in full fine-tuning, the adapters with LoRA."""
    return [p for p in model.parameters() if p.requires_grad]


def checkpoint_adapters_only(engine) -> None:
    """Make `engine.save_checkpoint(..., exclude_frozen_parameters=True)` leave out every frozen
    tensor of the module's state dict.

    DeepSpeed 0.19.8 drops the names `named_parameters()` gives for frozen parameters, which
    lists a tied weight once: its alias (a tied `lm_head.weight`, the vocabulary x hidden matrix,
    the largest in a small model) stayed in every adapter checkpoint. Here every name of a
    frozen tensor goes, aliases included.
    """
    module_state_dict = engine.module_state_dict

    def trainable_state_dict(*args, exclude_frozen_parameters: bool = False, **kwargs):
        state = module_state_dict(
            *args, exclude_frozen_parameters=exclude_frozen_parameters, **kwargs
        )
        if exclude_frozen_parameters and state is not None:
            for name, p in engine.module.named_parameters(remove_duplicate=False):
                if not p.requires_grad:
                    state.pop(name, None)
        return state

    engine.module_state_dict = trainable_state_dict


def save_merged(
    model: torch.nn.Module,
    out_dir: Path,
    *,
    base_path: str,
    revision: str | None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> None:
    """Save the adapter to `out_dir/../adapter`, then the base with it merged to `out_dir`.

    When the model in training still holds the base weights as stored (whole and fp32), the
    adapters are merged into it in place: the same fp32 sums, without a second copy of the
    base in memory (for an 8 B model, 32 GB). Under ZeRO-3 (its weights are partitioned
    across ranks; `state_dict` is its consolidated one, the adapters are read from it) and
    with QLoRA (4-bit weights) the merge starts from the stored base weights instead.
    """
    import torch

    adapter_dir = out_dir.parent / ADAPTER_DIR
    model.save_pretrained(adapter_dir, state_dict=state_dict)
    whole_fp32 = all(p.dtype == torch.float32 for p in model.parameters())
    if state_dict is None and whole_fp32:
        model.merge_and_unload().save_pretrained(out_dir)
    else:
        merge_adapter(adapter_dir, base_path, out_dir, revision=revision)


def merge_adapter(
    adapter_dir: str | Path, base_path: str | Path, out_dir: str | Path, revision: str | None = None
) -> Path:
    """The base model with the adapter merged in, saved as an ordinary folder at `out_dir`
    (safetensors, fp32); the base's tokenizer goes with it."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(
        str(base_path), revision=revision, dtype=torch.float32
    )
    PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload().save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(str(base_path), revision=revision).save_pretrained(out_dir)
    return Path(out_dir)
