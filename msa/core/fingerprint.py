"""Stable short ids for configurations and files."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

# The version of every fingerprint (feature sets, caption sets, imports): raised when what a
# stored value means changes, so that old sets get new names instead of being misread.
FORMAT_VERSION = 1


def file_size(path: str | Path) -> int:
    """A file's size in bytes, -1 when it is missing: recorded so that a replaced file (an image
    under the same guid) counts as changed."""
    try:
        return os.path.getsize(path)
    except OSError:
        return -1


def config_id(config: dict, length: int = 12) -> str:
    """Hex id of a JSON-able dict; key order does not matter."""
    blob = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def file_digest(path: Path, length: int = 16) -> str:
    """sha256 of a file's content (weights files: ~1 s per GB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()[:length]


def files_digest(files: list[Path], length: int = 16) -> str:
    """One digest over several files' names and contents (a model directory)."""
    digest = hashlib.sha256()
    for path in sorted(files):
        digest.update(Path(path).name.encode() + file_digest(path).encode())
    return digest.hexdigest()[:length]


def local_path(name: str | None) -> str | None:
    """A model or weights reference as it is recorded: a local path resolved (so that a run
    works from any directory), anything else (a hub id, a library name) as given."""
    if name and Path(name).exists():
        return str(Path(name).resolve())
    return name


def model_reference(name: str) -> str:
    """The model's entry in a fingerprint: "local" for a local path, whose content digest is
    recorded beside it (two spellings or copies of one folder are one model), else the hub id."""
    return "local" if Path(name).exists() else name


def slug(name: str) -> str:
    """A file-name-safe form of a model name: `timm:tf_efficientnet_lite0` -> `tf_efficientnet_lite0`."""
    tail = Path(str(name).rstrip("/")).name.split(":")[-1]
    return re.sub(r"[^A-Za-z0-9._-]+", "-", tail).strip("-").lower() or "model"
