"""What every stage shares: its declaration, its Prefect options, its build-once protocol.

A stage module (`tasks/validate.py` ... `tasks/promote.py`) holds its task and ends with
one `Stage(...)`: its name, its task, the config it reads, and the content hashes it reads
from upstream manifests. From that the flow derives everything else: which stages come
before it, its cache key (config section + input hashes + the code version of the task
module's import closure), and the call.

Every stage task takes the same four arguments: `key`, `workdir`, `section` (what
`reads` picked from the config) and `upstream` (the manifests it reads, by name). Prefect
caches on the key; the task body builds the output once under a lock, so two runs on
one work directory never build it twice.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import task
from prefect.context import TaskRunContext

from dpoflow.config import PipelineConfig
from dpoflow.errors import ServerError, UserError
from dpoflow.tasks.code_version import code_version
from dpoflow.tasks.stage import StageDir, stage_key

# How a stage is run, not what it computes: left out of its cache key wherever they appear.
RUN_ONLY = frozenset({"mlflow", "master_port", "timeout_seconds", "logged_config"})


@dataclass(frozen=True)
class Stage:
    """One box of the pipeline diagram, declared once, beside its task.

    `inputs` names, for each input of the cache key, the manifest field it comes from
    ("validate.data_sha256"); the manifests before the dot are the stage's upstream.
    """

    name: str
    task: Any  # a `stage_task`
    reads: Callable[..., dict[str, Any]]  # (config, parent_run_id) -> section
    inputs: dict[str, str]
    optional: frozenset[str] = field(default_factory=frozenset)  # upstream that may be absent
    enabled: Callable[[PipelineConfig], bool] = lambda cfg: True

    @property
    def upstream(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(ref.split(".")[0] for ref in self.inputs.values()))

    @property
    def module(self) -> str:
        return self.task.fn.__module__

    def call(
        self,
        cfg: PipelineConfig,
        workdir: Path,
        manifests: dict[str, dict[str, Any]],
        parent_run_id: str | None = None,
        *,
        code_root: Path | None = None,
    ) -> dict[str, Any]:
        """The task's arguments for this config and these upstream manifests, key included.
        `code_root` is a copy of the repository whose code the key hashes (default: this)."""
        section = self.reads(cfg, parent_run_id)
        upstream = {name: manifests.get(name) for name in self.upstream}
        inputs = {}
        for label, ref in self.inputs.items():
            name, _, fld = ref.partition(".")
            if upstream[name] is None and name in self.optional:
                inputs[label] = "absent"
            else:
                inputs[label] = upstream[name][fld]
        code = code_version(self.module, code_root)
        key = stage_key(self.name, without_run_only(section), inputs, code)
        return {"key": key, "workdir": str(workdir), "section": section, "upstream": upstream}


def without_run_only(section: Any) -> Any:
    """`section` less the RUN_ONLY keys, at every depth."""
    if isinstance(section, dict):
        return {k: without_run_only(v) for k, v in section.items() if k not in RUN_ONLY}
    return section


def dump(section) -> dict[str, Any]:
    """A config section as plain JSON-able data (what tasks receive and keys hash)."""
    return section.model_dump(mode="json")


def _cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    # The workdir is part of the key: two work directories never share outputs.
    where = hashlib.sha256(str(Path(parameters["workdir"]).resolve()).encode()).hexdigest()[:12]
    return f"{context.task.name}-{parameters['key'][:32]}-{where}"


def _retry_unless_user_error(task, task_run, state) -> bool:
    """Retry crashes and servers that are down; a user's mistake fails at once."""
    try:
        state.result()
    except ServerError:
        return True  # it may come back: retried with backoff, then one clear error
    except UserError:
        return False
    except Exception:
        return True
    return False


def retry_delays() -> list[float]:
    """Seconds before each retry: back off, a server that is down may need a while.

    `DPOFLOW_RETRY_DELAYS` ("5,20,60" by default) changes them, for a fast test or a
    patient cluster."""
    raw = os.environ.get("DPOFLOW_RETRY_DELAYS", "5,20,60")
    try:
        return [float(x) for x in raw.split(",") if x.strip()]
    except ValueError:
        raise UserError(
            f"DPOFLOW_RETRY_DELAYS={raw!r} is not a list of seconds: set it like 5,20,60."
        ) from None


# The state name of a stage whose output was already there: Prefect's own name for its cache
# hits, so the UI shows one word for "not built in this run", whichever cache found it.
CACHED = "Cached"


def reused_state(result: dict[str, Any]) -> Any:
    """A task body's result as its final Prefect state: "Cached" when `build_once` found the
    output already built (another work directory's copy, another run), else the result as is.
    Without this, Prefect shows a stage that did nothing as "Completed"."""
    from prefect.states import Completed

    if TaskRunContext.get() is None or not result.get("reused"):
        return result  # called as a plain function (tests, scripts): the result itself
    where = result["manifest"]["path"]
    return Completed(name=CACHED, data=result, message=f"dpoflow's stage cache: {where}")


def stage_task(name: str, *, retries: int = 2) -> Callable:
    """Decorator: a Prefect task cached on its `key` parameter and retried on crashes.
    Its retry delays are set per run (`retry_delays`); a reused output ends "Cached"."""

    def decorate(fn: Callable[..., dict[str, Any]]) -> Any:
        @functools.wraps(fn)  # keeps the module: the code version is derived from it
        def body(*args: Any, **kwargs: Any) -> Any:
            return reused_state(fn(*args, **kwargs))

        return task(
            name=name,
            cache_key_fn=_cache_key,
            persist_result=True,
            retries=retries,
            retry_condition_fn=_retry_unless_user_error,
        )(body)

    return decorate


def stage_logger() -> logging.Logger | logging.LoggerAdapter:
    """Prefect's run logger inside a run; a plain logger when the task body is called as an
    ordinary function (tests, scripts)."""
    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("dpoflow")


def in_prefect_run() -> bool:
    """True inside a Prefect flow or task run: where run artifacts can be published."""
    from prefect.context import FlowRunContext, TaskRunContext

    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


def build_once(
    stage: str,
    key: str,
    workdir: str,
    section: dict[str, Any],
    upstream: dict[str, dict | None],
    build: Callable[[Path], dict[str, Any]],
) -> dict[str, Any]:
    """Return the stage's manifest, building it with `build(partial_dir)` if missing.

    `build` fills the partial folder and returns the manifest's extra fields; the
    manifest also records the config section and the upstream outputs it was made
    from, and the folder is renamed into place. The result carries `reused=True` when
    the output was already there (another run built it).
    """
    where = StageDir(Path(workdir), stage, key)
    with where.lock():
        existing = where.existing()
        if existing is not None:
            return {"manifest": existing, "reused": True}
        partial = where.begin()
        extra = build(partial)
        made_from = {
            name: manifest.get("key", manifest["sha256"])
            for name, manifest in upstream.items()
            if manifest is not None
        }
        manifest = where.commit(without_run_only(section), made_from, **extra)
        return {"manifest": manifest, "reused": False}
