"""Resolve the config's data and model names to something the stages can read.

`embedded:imdb` and `embedded:tiny-llama` are the default that ships with the
project: made deterministically on first use in `<workdir>/embedded/`, then
read exactly like a user's file and a user's Hugging Face folder. Anything
else is a local path or a hub name, passed through untouched.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from filelock import FileLock

from flows.errors import ConfigError, ModelError
from tasks.stage import code_version, content_hash

EMBEDDED_DATA = "embedded:imdb"
EMBEDDED_MODEL = "embedded:tiny-llama"
HUB_NAME = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


def embedded_dir(workdir: str | Path) -> Path:
    return Path(workdir) / "embedded"


def ensure_embedded_data(workdir: str | Path) -> Path:
    """The embedded IMDb-style preference data (train.jsonl, eval_prompts.jsonl)."""
    from data_checks.embedded_imdb import write_embedded_dataset

    version = code_version("data_checks/embedded_imdb.py")
    out = embedded_dir(workdir) / f"imdb-{version}"
    with FileLock(str(out) + ".lock"):
        if not (out / "eval_prompts.jsonl").is_file():
            write_embedded_dataset(out)
    return out


def ensure_embedded_model(workdir: str | Path) -> Path:
    """The embedded tiny Llama, its tokenizer trained on the embedded corpus."""
    from models.tiny_llama import build_tiny_llama

    data = ensure_embedded_data(workdir)
    version = code_version("models/tiny_llama.py", "data_checks/embedded_imdb.py")
    out = embedded_dir(workdir) / f"tiny-llama-{version}"
    with FileLock(str(out) + ".lock"):
        if not (out / "config.json").is_file():
            texts = []
            with open(data / "train.jsonl", encoding="utf-8") as f:
                for line in f:
                    pair = json.loads(line)
                    texts += [pair["prompt"] + pair["chosen"], pair["prompt"] + pair["rejected"]]
            build_tiny_llama(out, texts)
    return out


def resolve_data(source: str, workdir: str | Path, *, eval_prompts: bool = False) -> str:
    if source == EMBEDDED_DATA:
        name = "eval_prompts.jsonl" if eval_prompts else "train.jsonl"
        return str(ensure_embedded_data(workdir) / name)
    if source.startswith("embedded:"):
        raise ConfigError(
            f"unknown embedded dataset '{source}': the one shipped is {EMBEDDED_DATA}."
        )
    return source


def resolve_model(source: str, workdir: str | Path) -> str:
    """The embedded model (made on first use), a local folder's absolute path, or a hub name."""
    if source == EMBEDDED_MODEL:
        return str(ensure_embedded_model(workdir))
    path = check_model_source(source)
    return str(path.resolve()) if path else source


def check_model_source(source: str) -> Path | None:
    """Refuse a model source that cannot work, before anything runs; return its local folder
    (None for the embedded model or a hub name, which are resolved later)."""
    if source == EMBEDDED_MODEL:
        return None
    if source.startswith("embedded:"):
        raise ConfigError(
            f"unknown embedded model '{source}': the one shipped is {EMBEDDED_MODEL}."
        )
    path = Path(source).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(
                f"model folder '{source}' has no config.json: point model.base at a folder "
                "saved with save_pretrained, or at a hub name."
            )
        return path
    if source.startswith((".", "/", "~")) or not HUB_NAME.match(source):
        raise ModelError(
            f"model '{source}' does not exist: set model.base to an existing local folder "
            "or a hub name like 'gpt2'."
        )
    return None


def fingerprint(resolved: str, revision: str | None = None) -> str:
    """Content hash of a local file or folder; name@revision for a hub name."""
    path = Path(resolved)
    if path.exists():
        return content_hash(path)
    return f"hub:{resolved}@{revision or 'main'}"
