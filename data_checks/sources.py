"""Whether a data source can be read, decided from its name alone (no pandas, nothing read),
so a command can refuse a missing file before it starts anything."""

from __future__ import annotations

import re
from pathlib import Path

from dpoflow.errors import DataError

_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def require_source(source: str, named_by: str = "data.train in your config") -> None:
    """Refuse a source that is neither an existing file or folder nor a hub dataset name;
    `named_by` says where the user wrote it."""
    path = Path(source)
    if path.is_file() or path.is_dir():
        return
    if _HUB_NAME.match(source) and not source.startswith((".", "/")):
        return
    raise DataError(
        f"data file '{source}' does not exist: check {named_by} "
        "or pass an existing path (or a hub dataset name like 'owner/name')."
    )
