"""A stage's code version: the hash of every project module its code can import.

No list of files is kept by hand. Starting from a module (a stage's task module, say),
its source is parsed with `ast` and every `dpoflow` module it imports, at the top or
inside a function, is followed in turn; a string that names a `dpoflow` module (the
training loop the launcher starts with `--module`) counts as an import too, since that
module runs on the stage's behalf. Parent packages count (their `__init__` runs on
import). The version is the hash of the closure's names and sources, so an edit
anywhere a stage can reach invalidates exactly the stages that reach it.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import importlib.util
from functools import cache
from pathlib import Path

PACKAGE = "dpoflow"
# Where the repository's files are: the folder above the one this file is in.
PROJECT_ROOT = Path(__file__).resolve().parents[1]


def _is_project_name(name: str) -> bool:
    return name == PACKAGE or name.startswith(PACKAGE + ".")


@cache
def module_file(name: str) -> Path | None:
    """The source file of project module `name`, or None when no such module exists."""
    if not _is_project_name(name):
        return None
    parent = name.rpartition(".")[0]
    if parent and ((parent_file := module_file(parent)) is None or parent_file.stem != "__init__"):
        return None  # below a plain module: an attribute (a function, a constant), not a module
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):  # a parent is not a package: `name` is an attribute
        return None
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return None
    return Path(spec.origin).resolve()


# Attempts at parsing one source: see `parse`.
PARSE_ATTEMPTS = 3


def parse(source: str) -> ast.Module:
    """`ast.parse`, tried again on CPython 3.11's spurious SystemError ("AST constructor
    recursion depth mismatch"): its AST builder keeps one recursion counter per interpreter,
    which another thread building an AST at the same moment upsets (python/cpython#106905,
    seen in a Prefect worker's flow run); each call starts the counter afresh."""
    for _ in range(PARSE_ATTEMPTS - 1):
        with contextlib.suppress(SystemError):
            return ast.parse(source)
    return ast.parse(source)  # the last attempt: its error, if any, is raised


@cache  # every stage's closure reads the same modules: each source is parsed once
def imported_names(source: str) -> frozenset[str]:
    """Every dotted name `source` imports or names in a string, project or not."""
    names: set[str] = set()
    for node in ast.walk(parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            # `from dpoflow.models import trainer`: `trainer` may be a module itself.
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if _is_project_name(node.value) and node.value.replace(".", "").isidentifier():
                names.add(node.value)
    return frozenset(names)


def _with_parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def code_closure(module: str, root: Path | None = None) -> dict[str, Path]:
    """{module name: source file} for `module` and every project module it can import.

    With `root`, files are read from that copy of the repository instead of this one
    (the same relative paths), which is how a test edits code without touching ours.
    """

    def source_of(path: Path) -> Path:
        return root / path.relative_to(PROJECT_ROOT) if root else path

    found: dict[str, Path] = {}
    pending = _with_parents(module)
    while pending:
        name = pending.pop()
        if name in found or (path := module_file(name)) is None:
            continue
        found[name] = source_of(path)
        for imported in imported_names(found[name].read_text(encoding="utf-8")):
            if _is_project_name(imported):
                pending.extend(_with_parents(imported))
    if module not in found:
        raise ValueError(f"{module!r} is not a module of {PACKAGE}")
    return dict(sorted(found.items()))


def code_version(module: str, root: Path | None = None) -> str:
    """Hash of the names and sources of `module`'s closure (16 hex digits)."""
    h = hashlib.sha256()
    for name, path in code_closure(module, root).items():
        h.update(name.encode() + b"\0")
        h.update(path.read_bytes())
    return h.hexdigest()[:16]
