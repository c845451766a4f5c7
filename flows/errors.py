"""Errors a user can cause and fix.

Every one of them carries a single sentence that names the cause and the fix.
The CLI prints that sentence and exits non-zero; it never shows a traceback
for these.
"""


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
