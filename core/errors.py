"""Errors a user can cause and fix.

Every one of them carries a single sentence that names the cause and the fix.
The CLI prints that sentence and exits non-zero; it never shows a traceback
for these.
"""

import logging


class UserError(Exception):
    """Something the user can fix: bad data, bad config, a missing model, a server that is down."""


class ConfigError(UserError):
    """The pipeline config is invalid."""


class DataError(UserError):
    """The preference data cannot be read or fails validation."""


class ModelError(UserError):
    """A model or tokenizer cannot be found or loaded."""


class ServerError(UserError):
    """A server the pipeline needs (MLflow, Prefect, a judge endpoint) is unreachable."""


class CheckpointError(UserError):
    """A checkpoint to resume from fails its sha256 check: never retried, a retry would read
    the same files."""


class HideUserErrorTracebacks(logging.Filter):
    """A user's mistake is one sentence: drop the traceback Prefect would log beside it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], UserError):
            record.exc_info = None
            record.exc_text = None
        return True


def hide_user_error_tracebacks() -> None:
    """Install the filter on the loggers Prefect reports task and flow failures on."""
    for name in ("prefect.task_runs", "prefect.flow_runs"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, HideUserErrorTracebacks) for f in logger.filters):
            logger.addFilter(HideUserErrorTracebacks())
