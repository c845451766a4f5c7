"""Resolve the config's data and model names to something the stages can read.

`embedded:imdb` and `embedded:tiny-llama` are the default that ships with the
project: made deterministically on first use in `<workdir>/embedded/`, then
read exactly like a user's file and a user's Hugging Face folder. Anything
else is a local path or a hub name, passed through untouched.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from filelock import FileLock

from dpoflow.config import PipelineConfig
from dpoflow.data_checks.sources import require_source
from dpoflow.errors import ConfigError, ModelError
from dpoflow.models.lora import require_cuda_for_4bit
from dpoflow.process_gc import imports_without_collection
from dpoflow.tasks.code_version import code_version
from dpoflow.tasks.stage import content_hash

EMBEDDED_DATA = "embedded:imdb"
EMBEDDED_MODEL = "embedded:tiny-llama"
HUB_NAME = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


def embedded_dir(workdir: str | Path) -> Path:
    return Path(workdir) / "embedded"


def ensure_embedded_data(workdir: str | Path) -> Path:
    """The embedded IMDb-style preference data (train.jsonl, eval_prompts.jsonl)."""
    from dpoflow.data_checks.embedded_imdb import write_embedded_dataset

    version = code_version("dpoflow.data_checks.embedded_imdb")
    out = embedded_dir(workdir) / f"imdb-{version}"
    with FileLock(str(out) + ".lock"):
        if not (out / "eval_prompts.jsonl").is_file():
            write_embedded_dataset(out)
    return out


def ensure_embedded_model(workdir: str | Path) -> Path:
    """The embedded tiny Llama, its tokenizer trained on the embedded corpus."""
    data = ensure_embedded_data(workdir)
    # Rebuilt when its code or the corpus its tokenizer learns from changes.
    version = code_version("dpoflow.models.tiny_llama")[:8] + data.name.removeprefix("imdb-")[:8]
    out = embedded_dir(workdir) / f"tiny-llama-{version}"
    with FileLock(str(out) + ".lock"):
        if not (out / "config.json").is_file():
            # Only to build it: a run that finds it made never imports torch for it.
            with imports_without_collection():
                from dpoflow.models.tiny_llama import build_tiny_llama

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


def check_before_running(cfg: PipelineConfig) -> None:
    """What `run` and `sweep` refuse before anything runs (Prefect, the embedded default's
    build, torch for the stages): a model or data source that cannot work, and 4-bit loading
    on a machine without CUDA."""
    check_model_source(cfg.model.base)
    check_data_sources(cfg)
    require_cuda_for_4bit(cfg.model.load_in_4bit)


def check_data_sources(
    cfg: PipelineConfig, names: tuple[str, ...] = ("train", "eval_prompts")
) -> None:
    """Refuse a data source (data.train, data.eval_prompts) that does not exist before anything
    runs, as check_model_source does for the model (the embedded data is made, and an unknown
    embedded name refused, by resolve_data)."""
    for name in names:
        source = getattr(cfg.data, name)
        if not source.startswith("embedded:"):
            require_source(source, named_by=f"data.{name} in your config")


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


def fingerprint(resolved: str, revision: str | None = None, *, repo_type: str = "model") -> str:
    """Content hash of a local file or folder; for a hub name, `hub:name@<commit>`: the
    commit `revision` (a branch, tag or sha; main by default) resolves to now, so a repo
    updated on the hub gets a new fingerprint. Offline, or when the hub cannot be asked,
    `hub:name@<revision>` (logged: an update under the same revision then goes unseen)."""
    path = Path(resolved)
    if path.exists():
        return content_hash(path)
    commit = hub_commit(resolved, revision, repo_type)
    return f"hub:{resolved}@{commit or revision or 'main'}"


def hub_commit(name: str, revision: str | None, repo_type: str) -> str | None:
    """The commit sha `revision` of a hub repo resolves to, or None (offline, or a failure)."""
    from dpoflow.tasks.common import stage_logger

    fallback = f"fingerprinting {repo_type} '{name}' by its revision name"
    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
        stage_logger().info("HF_HUB_OFFLINE is set: %s, not its commit", fallback)
        return None
    from huggingface_hub import HfApi

    try:
        return HfApi().repo_info(name, revision=revision, repo_type=repo_type, timeout=10).sha
    except Exception as exc:  # noqa: BLE001 - the hub raises many unrelated types
        # The class and first line only: the hub's messages carry no token, but stay short.
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        stage_logger().warning("the hub did not resolve a commit (%s): %s", reason, fallback)
        return None


def resolve_sources(cfg: PipelineConfig, workdir: str | Path) -> dict[str, dict[str, str]]:
    """The pipeline's three inputs as manifests the stages read like any other: `path` to
    read, `sha256` to key on (`base_model`, `train_data`, `eval_data`)."""
    model = resolve_model(cfg.model.base, workdir)
    train = resolve_data(cfg.data.train, workdir)
    eval_prompts = resolve_data(cfg.data.eval_prompts, workdir, eval_prompts=True)
    return {
        "base_model": {
            "path": model,
            "sha256": fingerprint(model, cfg.model.revision),
            "revision": cfg.model.revision,
        },
        "train_data": {
            "path": train,
            "sha256": fingerprint(train, cfg.data.revision, repo_type="dataset"),
        },
        "eval_data": {
            "path": eval_prompts,
            "sha256": fingerprint(eval_prompts, repo_type="dataset"),
        },
    }
