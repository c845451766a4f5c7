"""Package a trained policy as an MLflow pyfunc model that generates text, without pickles.

The model is logged with MLflow's models-from-code: `python_model` is the PATH of
`served_model.py`, whose source is stored with the model, and the trained folder
(`save_pretrained` files) is its one artifact. Nothing is cloudpickled, so loading a
registered model unpickles nothing. `served_model.py` imports no `dpoflow`, so the model
loads where only the serving stack is installed.

MLflow is imported here only, so training and evaluation do not pay for it.
"""

from __future__ import annotations

import importlib.util
from importlib.metadata import version
from pathlib import Path, PurePosixPath

import mlflow
import pandas as pd
from mlflow.models import Model, ModelSignature
from mlflow.models.model import ModelInfo
from mlflow.types.schema import Array, ColSpec, Object, Property, Schema

from dpoflow.errors import ModelError

# The models-from-code file, named as a module so a stage's code version covers it even
# though nothing imports it (importing it would register it with MLflow as a side effect).
SERVED_MODEL_MODULE = "dpoflow.models.served_model"
# The artifact key `served_model.py` reads the weights folder from.
MODEL_DIR_ARTIFACT = "model_dir"
# The artifact key of the base model an unmerged LoRA adapter in `model_dir` applies to.
BASE_MODEL_DIR_ARTIFACT = "base_model_dir"
# Pinned into the logged model so it is served with the stack it was tested on.
_REQUIRED_PACKAGES = ("torch", "transformers", "tokenizers", "mlflow", "pandas")


def served_model_file() -> Path:
    """The path of `served_model.py`, found without importing it."""
    return Path(importlib.util.find_spec(SERVED_MODEL_MODULE).origin)


def generator_signature() -> ModelSignature:
    """Each row: `prompt` (string) or `messages` (OpenAI chat messages: role and content
    strings), optional `max_new_tokens` (long) and `temperature` (double) -> `text`,
    `prompt_tokens`, `completion_tokens`, `finish_reason`."""
    message = Object([Property("role", "string"), Property("content", "string")])
    inputs = Schema(
        [
            ColSpec("string", "prompt", required=False),
            ColSpec(Array(message), "messages", required=False),
            ColSpec("long", "max_new_tokens", required=False),
            ColSpec("double", "temperature", required=False),
        ]
    )
    outputs = Schema(
        [
            ColSpec("string", "text"),
            ColSpec("long", "prompt_tokens"),
            ColSpec("long", "completion_tokens"),
            ColSpec("string", "finish_reason"),
        ]
    )
    return ModelSignature(inputs=inputs, outputs=outputs)


def generator_input_example() -> pd.DataFrame:
    """One request of each shape: a plain prompt, and a chat (null where a row has no value:
    MLflow's schema check accepts null, not a missing value, in a list column)."""
    chat = [{"role": "user", "content": "Write a review of a movie you liked."}]
    return pd.DataFrame(
        {
            # object, or pandas writes the missing prompt as NaN (not JSON) instead of null
            "prompt": pd.Series(["This movie was", None], dtype=object),
            "messages": pd.Series([None, chat], dtype=object),
            "max_new_tokens": [16, 16],
            "temperature": [0.0, 0.0],
        }
    )


def pinned_requirements() -> list[str]:
    """`name==version` for the installed serving stack, without local tags such as `+cpu`
    (pip cannot resolve those from an index)."""
    return [f"{name}=={version(name).split('+')[0]}" for name in _REQUIRED_PACKAGES]


def log_generator(
    model_dir: str,
    *,
    chat_template: str,
    name: str = "policy",
    base_model_dir: str | None = None,
) -> ModelInfo:
    """Log the model folder as a text-generating pyfunc model in the ACTIVE MLflow run.

    With `base_model_dir`, `model_dir` is an unmerged LoRA adapter (`registry.merge_adapters:
    false`): the base is logged beside it and `served_model.py` applies the adapter on load.
    `chat_template` is the `data.chat_template` the model was trained with: stored in the
    model's config (MLmodel, plain YAML), so requests are rendered as its training prompts were.
    """
    if mlflow.active_run() is None:
        raise RuntimeError("log_generator must be called inside an active MLflow run")
    artifacts = {MODEL_DIR_ARTIFACT: model_dir}
    requirements = pinned_requirements()
    if base_model_dir is not None:
        artifacts[BASE_MODEL_DIR_ARTIFACT] = base_model_dir
        requirements.append(f"peft=={version('peft')}")
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=str(served_model_file()),
        artifacts=artifacts,
        signature=generator_signature(),
        input_example=generator_input_example(),
        pip_requirements=requirements,
        model_config={"chat_template": chat_template},
    )


def download_model_dir(model_uri: str, dst: str | Path) -> Path:
    """Download only the weights folder of a logged generator (`models:/name/version`, say)
    into `dst` and return its path: the caller loads it with transformers, and no code stored
    with the model runs. An unmerged LoRA adapter comes back merged into its logged base."""
    mlmodel = mlflow.artifacts.download_artifacts(f"{model_uri}/MLmodel", dst_path=str(dst))
    artifacts = Model.load(mlmodel).flavors.get("python_function", {}).get("artifacts", {})
    folder = _artifact_folder(model_uri, artifacts, MODEL_DIR_ARTIFACT, dst)
    if BASE_MODEL_DIR_ARTIFACT not in artifacts:
        return folder
    from dpoflow.models.lora import merge_adapter

    base = _artifact_folder(model_uri, artifacts, BASE_MODEL_DIR_ARTIFACT, dst)
    return merge_adapter(folder, base, Path(dst) / "merged")


def _artifact_folder(model_uri: str, artifacts: dict, key: str, dst: str | Path) -> Path:
    folder = artifacts.get(key, {}).get("path", "")
    # Only a folder under the model's own `artifacts/`: the MLmodel file is registry data.
    parts = PurePosixPath(folder).parts
    if len(parts) < 2 or parts[0] != "artifacts" or ".." in parts:
        raise ModelError(
            f"{model_uri} has no '{key}' weights folder, so it was not logged "
            "by dpoflow's log_generator: register a model the pipeline trained instead."
        )
    return Path(mlflow.artifacts.download_artifacts(f"{model_uri}/{folder}", dst_path=str(dst)))
