"""Package a trained policy as an MLflow pyfunc model that generates text.

MLflow's transformers flavor lags behind the transformers release this project
pins, so the model folder is logged as an artifact of a small custom
`PythonModel` instead: it loads the folder with the same code the pipeline uses
and samples with `models.generation.generate`. Loading the logged model needs
this project (`dpoflow`) importable, which `mlflow models serve --env-manager
local` from the project's environment provides.

MLflow is imported here only, so training and evaluation do not pay for it.
"""

from __future__ import annotations

from importlib.metadata import version

import mlflow
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.models.model import ModelInfo
from mlflow.types.schema import ColSpec, Schema

from models.generation import generate, load_causal_lm

DEFAULT_MAX_NEW_TOKENS = 32
DEFAULT_TEMPERATURE = 1.0
# Pinned into the logged model so it is served with the stack it was tested on.
_REQUIRED_PACKAGES = ("torch", "transformers", "tokenizers", "mlflow", "pandas")


class TextGenerator(mlflow.pyfunc.PythonModel):
    """pyfunc model: a DataFrame with a `prompt` column in, a `text` column of answers out.

    Optional `max_new_tokens` and `temperature` columns set the sampling for the
    whole request; the first row's value applies (one request = one setting keeps
    batching simple).
    """

    def load_context(self, context) -> None:
        self.model, self.tokenizer = load_causal_lm(context.artifacts["model_dir"])

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None):
        prompts = [str(prompt) for prompt in model_input["prompt"]]
        answers = generate(
            self.model,
            self.tokenizer,
            prompts,
            max_new_tokens=int(_first(model_input, "max_new_tokens", DEFAULT_MAX_NEW_TOKENS)),
            temperature=float(_first(model_input, "temperature", DEFAULT_TEMPERATURE)),
        )
        return pd.DataFrame({"text": answers})


def _first(frame: pd.DataFrame, column: str, default):
    """The column's first value, or `default` when the column is absent or that value is null."""
    if column not in frame.columns or frame.empty or pd.isna(frame[column].iloc[0]):
        return default
    return frame[column].iloc[0]


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
        python_model=TextGenerator(),
        artifacts={"model_dir": model_dir},
        signature=generator_signature(),
        input_example=pd.DataFrame({"prompt": ["This movie was"]}),
        pip_requirements=pinned_requirements(),
    )
