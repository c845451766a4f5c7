"""What every stage task shares: its Prefect options and its build-once protocol.

A stage task is called with `key` (its cache key, computed by the flow from
its config section, its inputs' content hashes and its code version) and
`workdir`. Prefect caches on exactly that key; the task body builds the output
once under a lock, so two runs on one work directory never build it twice.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import task
from prefect.context import TaskRunContext

from flows.errors import ServerError, UserError
from tasks.stage import StageDir


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


RETRY_DELAYS = [5, 20, 60]  # seconds: back off, a server that is down may need a while


def stage_task(name: str, *, retries: int = 2) -> Callable:
    """Decorator: a Prefect task cached on its `key` parameter and retried on crashes."""
    return task(
        name=name,
        cache_key_fn=_cache_key,
        persist_result=True,
        retries=retries,
        retry_delay_seconds=RETRY_DELAYS[:retries] or 0,
        retry_condition_fn=_retry_unless_user_error,
    )


def build_once(
    stage: str, key: str, workdir: str, build: Callable[[Path], dict[str, Any]]
) -> dict[str, Any]:
    """Return the stage's manifest, building it with `build(partial_dir)` if missing.

    `build` fills the partial folder and returns the manifest's extra fields;
    the folder is then renamed into place. The result carries `reused=True`
    when the output was already there (another run built it).
    """
    where = StageDir(Path(workdir), stage, key)
    with where.lock():
        existing = where.existing()
        if existing is not None:
            return {"manifest": existing, "reused": True}
        partial = where.begin()
        extra = build(partial)
        section = extra.pop("config", {})
        inputs = extra.pop("inputs", {})
        return {"manifest": where.commit(section, inputs, **extra), "reused": False}
