"""Stage outputs: content-addressed folders with a manifest, written atomically.

A stage's output lives at `<workdir>/stages/<stage>/<key[:16]>/`. It is built
in a sibling `.partial` folder (kept across retries, so long stages resume
from their checkpoints there) and renamed into place only when complete, so a
crash never leaves a half-written output that a later run could mistake for a
finished one. `manifest.json` is the contract between stages: downstream
stages read manifests, never live Python objects.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

MANIFEST = "manifest.json"


def sha256_file(path: Path, h: Any = None) -> str:
    h = h or hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def content_hash(path: str | Path) -> str:
    """sha256 of a file, or of a folder's files (names and bytes, in sorted order)."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        if file.name == MANIFEST:
            continue
        h.update(str(file.relative_to(path)).encode())
        sha256_file(file, h)
    return h.hexdigest()


def stage_key(stage: str, section: dict[str, Any], inputs: dict[str, str], code: str) -> str:
    """The cache key: config section + content hashes of the inputs + code version (hex)."""
    blob = json.dumps(
        {"stage": stage, "config": section, "inputs": inputs, "code": code}, sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass(frozen=True)
class StageDir:
    """Where one stage's output for one cache key goes."""

    workdir: Path
    stage: str
    key: str

    @property
    def final(self) -> Path:
        return self.workdir / "stages" / self.stage / self.key[:16]

    @property
    def partial(self) -> Path:
        return self.final.with_name(self.final.name + ".partial")

    def lock(self) -> FileLock:
        """Two runs on one work directory build a stage once: the second waits, then reuses."""
        self.final.parent.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.final) + ".lock")

    def existing(self) -> dict[str, Any] | None:
        """The finished output's manifest, or None. Its `path` is where the output is now, so a
        work directory can be moved or copied and its outputs still found."""
        manifest = self.final / MANIFEST
        if not manifest.is_file():
            return None
        return json.loads(manifest.read_text()) | {"path": str(self.final)}

    def begin(self) -> Path:
        """The `.partial` folder to build in; what an earlier attempt left there is kept."""
        self.partial.mkdir(parents=True, exist_ok=True)
        return self.partial

    def commit(self, section: dict[str, Any], made_from: dict[str, str], **extra: Any) -> dict:
        """Write the manifest into the partial folder and rename it into place; `made_from`
        names the upstream outputs (their keys or content hashes)."""
        manifest = {
            "stage": self.stage,
            "key": self.key,
            "path": str(self.final),
            "sha256": content_hash(self.partial),
            "config": section,
            "made_from": made_from,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **extra,
        }
        write_json_atomic(self.partial / MANIFEST, manifest)
        if self.final.exists():  # only a folder without a manifest can be here: a dead output
            shutil.rmtree(self.final)
        os.replace(self.partial, self.final)
        return manifest


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)
