"""The registered text generator, as MLflow models-from-code: this file is stored with the model.

`dpoflow.models.serving.log_generator` logs this file (its source, not a pickle) together with
the weights folder, so a registered model holds readable code, `save_pretrained` files and
config only: loading it never unpickles anything.

It is SELF-CONTAINED on purpose: it imports mlflow, torch, transformers, pandas and the
standard library, never `dpoflow`, so a registered model loads and serves where only the
serving stack is installed. The price is a small copy of `dpoflow.models.generation`'s
sampling (prompt encoding, left padding, stop at eos, temperature 0 = greedy, one fixed
seed per batch); tests/test_serving.py checks that both give the same answers.

A request is a DataFrame with a `prompt` column and optional `max_new_tokens` and
`temperature` columns; the first row's values apply to the whole request. The answer is a
DataFrame with one `text` column.
"""

from __future__ import annotations

import mlflow
import pandas as pd
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

DEFAULT_MAX_NEW_TOKENS = 32
DEFAULT_TEMPERATURE = 1.0
# As `dpoflow.models.generation.generate` with its defaults (seed 0, batches of 64), so the
# served model answers a prompt as evaluation sampled it, and the same request the same way.
BATCH_SIZE = 64
SEED = 0
_SEED_STRIDE = 1_000_003


class TextGenerator(mlflow.pyfunc.PythonModel):
    """pyfunc model: a DataFrame with a `prompt` column in, a `text` column of answers out."""

    def load_context(self, context) -> None:
        folder = context.artifacts["model_dir"]
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        # safetensors only: a pickled `pytorch_model.bin` is refused, not loaded.
        self.model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float32, use_safetensors=True
        ).eval()
        if self.tokenizer.pad_token_id is None:
            # Padding positions are masked out, so any token will do; eos always exists.
            self.tokenizer.pad_token = self.tokenizer.eos_token

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None):
        prompts = [str(prompt) for prompt in model_input["prompt"]]
        max_new_tokens = int(_first(model_input, "max_new_tokens", DEFAULT_MAX_NEW_TOKENS))
        temperature = float(_first(model_input, "temperature", DEFAULT_TEMPERATURE))
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}: send 0 or more.")
        answers: list[str] = []
        for index, start in enumerate(range(0, len(prompts), BATCH_SIZE)):
            batch = prompts[start : start + BATCH_SIZE]
            answers += self._generate(
                batch, max_new_tokens, temperature, SEED * _SEED_STRIDE + index
            )
        return pd.DataFrame({"text": answers})

    def _generate(
        self, prompts: list[str], max_new_tokens: int, temperature: float, seed: int
    ) -> list[str]:
        """One batch: left-padded prompts, sampled under `seed` without touching the global RNG."""
        tokenizer = self.tokenizer
        input_ids, attention_mask = _left_pad(
            [_encode(tokenizer, prompt) for prompt in prompts], tokenizer.pad_token_id
        )
        # Spelled out in full, so the model's generation_config (e.g. top_k=50) adds nothing.
        sampling = {"num_beams": 1, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0}
        if temperature == 0:
            sampling["do_sample"] = False
        else:
            sampling |= {"do_sample": True, "temperature": temperature, "top_p": 1.0, "top_k": 0}
        device = self.model.device
        rng_devices = [device.index or 0] if device.type == "cuda" else []
        with torch.inference_mode(), torch.random.fork_rng(devices=rng_devices):
            torch.manual_seed(seed)
            output = self.model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                max_new_tokens=max_new_tokens,
                min_new_tokens=0,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                use_cache=True,
                **sampling,
            )
        new_tokens = output[:, input_ids.shape[1] :].tolist()
        return [
            tokenizer.decode(_through_eos(ids, tokenizer.eos_token_id), skip_special_tokens=True)
            for ids in new_tokens
        ]


def _first(frame: pd.DataFrame, column: str, default):
    """The column's first value, or `default` when the column is absent or that value is null."""
    if column not in frame.columns or frame.empty or pd.isna(frame[column].iloc[0]):
        return default
    return frame[column].iloc[0]


def _encode(tokenizer, prompt: str) -> list[int]:
    """bos (if any) + the prompt's tokens, as training saw prompts; an empty prompt without bos
    starts from eos, since generation needs one token to condition on."""
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    if tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id, *ids]
    return ids or [tokenizer.eos_token_id]


def _left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left padding puts every row's next token in the same column; returns (ids, mask)."""
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, width - len(row) :] = 1
    return input_ids, attention_mask


def _through_eos(ids: list[int], eos_id: int | None) -> list[int]:
    """Drop what follows the first eos (generate pads finished rows)."""
    return ids[: ids.index(eos_id) + 1] if eos_id is not None and eos_id in ids else ids


mlflow.models.set_model(TextGenerator())
