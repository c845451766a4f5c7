"""The registered text generator, as MLflow models-from-code: this file is stored with the model.

`dpoflow.models.serving.log_generator` logs this file (its source, not a pickle) together with
the weights folder, so a registered model holds readable code, `save_pretrained` files and
config only: loading it never unpickles anything.

It is SELF-CONTAINED on purpose: it imports mlflow, torch, transformers, pandas and the
standard library, never `dpoflow`, so a registered model loads and serves where only the
serving stack is installed. The price is a small copy of `dpoflow.models.generation`'s
sampling (prompt encoding, left padding, stop at eos, temperature 0 = greedy, one fixed
seed per batch); tests/test_serving.py checks that both give the same answers.

A request is a DataFrame whose rows each hold either a `prompt` (plain text) or `messages`
(an OpenAI chat-completions message list: `role`/`content` dicts), rendered as the pipeline
rendered the model's training prompts: with the tokenizer's chat template when the model was
trained with one (`data.chat_template`, stored in the model's config as `chat_template`; a
plain prompt is then one user turn), else a plain prompt continued as is and a chat as
`role: content` lines. Optional `max_new_tokens` and `temperature` columns: their first row
applies to the whole request. The answer is a DataFrame: `text`, `prompt_tokens`,
`completion_tokens` (the eos included when it was generated) and `finish_reason` (`stop` at
eos, else `length`).
"""

from __future__ import annotations

import threading

import mlflow
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from transformers import AutoModelForCausalLM, AutoTokenizer

DEFAULT_MAX_NEW_TOKENS = 32
DEFAULT_TEMPERATURE = 1.0
# As `dpoflow.models.generation.generate` with its defaults (seed 0, batches of 64), so the
# served model answers a prompt as evaluation sampled it, and the same request the same way.
BATCH_SIZE = 64
SEED = 0
_SEED_STRIDE = 1_000_003
# Sampling seeds torch's process-wide RNG (transformers' generate takes no generator), and a
# server answers requests from several threads: one at a time keeps each answer reproducible.
_GENERATE = threading.Lock()


class TextGenerator(mlflow.pyfunc.PythonModel):
    """pyfunc model: rows of `prompt` or chat `messages` in; answers and token counts out."""

    def load_context(self, context) -> None:
        folder = context.artifacts["model_dir"]
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        # data.chat_template of the run that trained the model (auto, always or never); a model
        # logged before it was recorded was trained with the default, auto.
        mode = (context.model_config or {}).get("chat_template", "auto")
        self.templated = mode != "never" and bool(getattr(self.tokenizer, "chat_template", None))
        self.model = _load_model(folder, context.artifacts.get("base_model_dir")).eval()
        if self.tokenizer.pad_token_id is None:
            # Padding positions are masked out, so any token will do; eos always exists.
            self.tokenizer.pad_token = self.tokenizer.eos_token

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None):
        prompts = [self._prompt_ids(row) for row in model_input.to_dict("records")]
        max_new_tokens = int(_first(model_input, "max_new_tokens", DEFAULT_MAX_NEW_TOKENS))
        temperature = float(_first(model_input, "temperature", DEFAULT_TEMPERATURE))
        if temperature < 0:
            raise _bad_request(f"temperature must be >= 0, got {temperature}: send 0 or more.")
        if max_new_tokens < 1:
            raise _bad_request(
                f"max_new_tokens must be at least 1, got {max_new_tokens}: send 1 or more."
            )
        answers: list[list[int]] = []
        for index, start in enumerate(range(0, len(prompts), BATCH_SIZE)):
            batch = prompts[start : start + BATCH_SIZE]
            answers += self._generate(
                batch, max_new_tokens, temperature, SEED * _SEED_STRIDE + index
            )
        eos = self.tokenizer.eos_token_id
        return pd.DataFrame(
            {
                "text": [self.tokenizer.decode(ids, skip_special_tokens=True) for ids in answers],
                "prompt_tokens": [len(ids) for ids in prompts],
                "completion_tokens": [len(ids) for ids in answers],
                "finish_reason": ["stop" if eos in ids else "length" for ids in answers],
            }
        )

    def _prompt_ids(self, row: dict) -> list[int]:
        """The token ids a row asks to continue: its prompt, or its chat rendered."""
        prompt, messages = row.get("prompt"), row.get("messages")
        has_prompt, has_messages = _present(prompt), _present(messages)
        if has_prompt == has_messages:
            raise _bad_request(
                "each request row needs exactly one of 'prompt' (text) and 'messages' (a chat "
                "list), got " + ("both" if has_prompt else "neither") + ": send one of them."
            )
        if has_prompt and not self.templated:
            return _encode(self.tokenizer, str(prompt))
        chat = [{"role": "user", "content": str(prompt)}] if has_prompt else _checked(messages)
        return _encode(self.tokenizer, _render_chat(self.tokenizer, chat, self.templated))

    def _generate(
        self, prompts: list[list[int]], max_new_tokens: int, temperature: float, seed: int
    ) -> list[list[int]]:
        """One batch: left-padded prompt ids, sampled under `seed` without touching the global
        RNG; the new ids of each row, through its first eos."""
        tokenizer = self.tokenizer
        input_ids, attention_mask = _left_pad(prompts, tokenizer.pad_token_id)
        # Spelled out in full, so the model's generation_config (e.g. top_k=50) adds nothing.
        sampling = {"num_beams": 1, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0}
        if temperature == 0:
            sampling["do_sample"] = False
        else:
            sampling |= {"do_sample": True, "temperature": temperature, "top_p": 1.0, "top_k": 0}
        device = self.model.device
        rng_devices = [device.index or 0] if device.type == "cuda" else []
        with _GENERATE, torch.inference_mode(), torch.random.fork_rng(devices=rng_devices):
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
        return [_through_eos(ids, tokenizer.eos_token_id) for ids in new_tokens]


def _load_model(folder: str, base_folder: str | None):
    """The weights folder, or (registry.merge_adapters: false) the LoRA adapter in it applied to
    the base logged beside it, merged once here so that generation pays nothing for it.
    safetensors only: a pickled `pytorch_model.bin` is refused, not loaded."""
    if base_folder is None:
        return AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float32, use_safetensors=True
        )
    from peft import PeftModel  # only an adapter needs it (logged then among the requirements)

    base = AutoModelForCausalLM.from_pretrained(
        base_folder, dtype=torch.float32, use_safetensors=True
    )
    return PeftModel.from_pretrained(base, folder).merge_and_unload()


def _first(frame: pd.DataFrame, column: str, default):
    """The column's first value, or `default` when the column is absent or that value is null."""
    if column not in frame.columns or frame.empty or pd.isna(frame[column].iloc[0]):
        return default
    return frame[column].iloc[0]


def _present(value) -> bool:
    """False for an absent cell (None, NaN), True for anything else, lists included."""
    return value is not None and not (isinstance(value, float) and pd.isna(value))


def _bad_request(message: str) -> MlflowException:
    """A client's mistake: MLflow's server answers it as a 400 with this message."""
    return MlflowException.invalid_parameter_value(message)


def _checked(messages) -> list[dict]:
    """The chat as {role, content} dicts (the signature made sure each message has both), or a
    bad request when it is empty."""
    messages = [{"role": str(m["role"]), "content": str(m["content"])} for m in messages]
    if not messages:
        raise _bad_request("'messages' is empty: send at least one message.")
    return messages


def _render_chat(tokenizer, messages: list[dict], templated: bool) -> str:
    """The chat as the prompt the model answers: the tokenizer's chat template with the
    assistant's turn opened (`templated`), or the plain `role: content` lines the pipeline
    trains chats with otherwise (`dpoflow.data_checks.loading`); tests/test_serving.py checks
    both match."""
    if templated:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


def _encode(tokenizer, prompt: str) -> list[int]:
    """bos (if any, and unless a chat template already wrote it) + the prompt's tokens, as
    training saw prompts; an empty prompt without bos starts from eos, since generation needs
    one token to condition on."""
    bos = tokenizer.bos_token
    if bos and prompt.startswith(bos):
        prompt = prompt[len(bos) :]
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
