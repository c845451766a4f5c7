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
from mlflow.types.schema import ColSpec, Schema

from dpoflow.errors import ModelError

# The models-from-code file, named as a module so a stage's code version covers it even
# though nothing imports it (importing it would register it with MLflow as a side effect).
SERVED_MODEL_MODULE = "dpoflow.models.served_model"
# The artifact key `served_model.py` reads the weights folder from.
MODEL_DIR_ARTIFACT = "model_dir"
# Pinned into the logged model so it is served with the stack it was tested on.
_REQUIRED_PACKAGES = ("torch", "transformers", "tokenizers", "mlflow", "pandas")


def served_model_file() -> Path:
    """The path of `served_model.py`, found without importing it."""
    return Path(importlib.util.find_spec(SERVED_MODEL_MODULE).origin)


def generator_signature() -> ModelSignature:
    """prompt (string, required), max_new_tokens (long, optional), temperature (double,
    optional) -> text (string)."""
    inputs = Schema(
        [
            ColSpec("string", "prompt"),
            ColSpec("long", "max_new_tokens", required=False),
            ColSpec("double", "temperature", required=False),
        ]
    )
    return ModelSignature(inputs=inputs, outputs=Schema([ColSpec("string", "text")]))


def pinned_requirements() -> list[str]:
    """`name==version` for the installed serving stack, without local tags such as `+cpu`
    (pip cannot resolve those from an index)."""
    return [f"{name}=={version(name).split('+')[0]}" for name in _REQUIRED_PACKAGES]


def log_generator(model_dir: str, *, name: str = "policy") -> ModelInfo:
    """Log the model folder as a text-generating pyfunc model in the ACTIVE MLflow run."""
    if mlflow.active_run() is None:
        raise RuntimeError("log_generator must be called inside an active MLflow run")
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=str(served_model_file()),
        artifacts={MODEL_DIR_ARTIFACT: model_dir},
        signature=generator_signature(),
        input_example=pd.DataFrame({"prompt": ["This movie was"]}),
        pip_requirements=pinned_requirements(),
    )


def download_model_dir(model_uri: str, dst: str | Path) -> Path:
    """Download only the weights folder of a logged generator (`models:/name/version`, say)
    into `dst` and return its path: the caller loads it with transformers, and no code stored
    with the model runs."""
    mlmodel = mlflow.artifacts.download_artifacts(f"{model_uri}/MLmodel", dst_path=str(dst))
    pyfunc = Model.load(mlmodel).flavors.get("python_function", {})
    folder = pyfunc.get("artifacts", {}).get(MODEL_DIR_ARTIFACT, {}).get("path", "")
    # Only a folder under the model's own `artifacts/`: the MLmodel file is registry data.
    parts = PurePosixPath(folder).parts
    if len(parts) < 2 or parts[0] != "artifacts" or ".." in parts:
        raise ModelError(
            f"{model_uri} has no '{MODEL_DIR_ARTIFACT}' weights folder, so it was not logged "
            "by dpoflow's log_generator: register a model the pipeline trained instead."
        )
    return Path(mlflow.artifacts.download_artifacts(f"{model_uri}/{folder}", dst_path=str(dst)))
