"""`msa cache rm | gc | verify`: remove a set, collect what no run can use, check every byte.

Each takes the set's lock before touching it, so a set another process is writing is
reported as busy, never removed from under it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import h5py

from msa.cache.captions import caption_dir, list_caption_sets
from msa.cache.errors import BusyError, CacheError
from msa.cache.features import (
    DAMAGED_SUFFIX,
    FEATURES_DIR,
    H5_ERRORS,
    _read_fingerprint,
    problem_of,
    published_files,
    set_name,
)
from msa.cache.locks import is_busy, set_lock
from msa.cache.manifest import read_manifest


@dataclasses.dataclass
class Finding:
    path: Path
    reason: str


def set_files(cache: Path, name: str) -> list[Path]:
    """Every file of one feature set (published, partial, shards, set aside) or caption set."""
    features = Path(cache) / FEATURES_DIR
    files = [p for p in features.glob(f"{name}.*") if set_name(p) == name]
    files += [p for p in caption_dir(cache).glob(f"{name}.*") if p.name.split(".")[0] == name]
    return sorted(files)


def remove(cache: Path, name: str) -> list[Path]:
    """Delete one set's files, holding its locks; BusyError while a process writes it."""
    name = name.removesuffix(".h5").removesuffix(".parquet")
    files = set_files(cache, name)
    if not files:
        features = {set_name(p) for p in (Path(cache) / FEATURES_DIR).glob("*.h5*")}
        known = sorted(features | set(list_caption_sets(cache)))
        raise CacheError(f"{cache}: no set named {name}; the cache holds: {', '.join(known) or 'none'}")
    locks = [set_lock(cache, lock_name) for lock_name in sorted({_lock_name(p) for p in files})]
    try:
        for path in files:
            path.unlink(missing_ok=True)
    finally:
        for lock in locks:
            lock.release()
    return files


def _lock_name(path: Path) -> str:
    """The lock a file's writer holds: features NAME.h5 / NAME.shard-i-of-n.h5, captions NAME."""
    if path.parent.name == FEATURES_DIR:
        return path.name.split(".h5")[0]
    return path.name.split(".")[0]


def garbage(cache: Path) -> list[Finding]:
    """Files no run can use: partials nobody is writing, damaged and stale sets, leftovers of
    interrupted writes. Sets being written are left alone."""
    cache = Path(cache)
    try:
        manifest_id = read_manifest(cache).manifest_id
    except (FileNotFoundError, CacheError):
        manifest_id = None  # no usable manifest: no set can be called stale
    found = []
    for path in sorted((cache / FEATURES_DIR).glob("*.h5*")):
        if is_busy(cache, _lock_name(path)):
            continue
        reason = _feature_file_garbage(path, manifest_id)
        if reason:
            found.append(Finding(path, reason))
    for path in sorted(caption_dir(cache).glob("*.partial.jsonl")):
        if not is_busy(cache, _lock_name(path)):
            found.append(Finding(path, "interrupted caption run (`msa caption` would resume it)"))
    for path in sorted(cache.rglob("*.tmp")):
        found.append(Finding(path, "temporary file of an interrupted write"))
    return found


def _feature_file_garbage(path: Path, manifest_id: str | None) -> str | None:
    if DAMAGED_SUFFIX in path.name:
        return "damaged file, set aside"
    if path.name.endswith(".partial"):
        return "partial set nobody is writing (`msa extract` would resume it)"
    problem = problem_of(path)
    if problem:
        return f"damaged: {problem}"
    with h5py.File(path, "r") as f:
        recorded = _read_fingerprint(f).get("manifest_id")
    if manifest_id and recorded != manifest_id:
        return "stale: extracted for another manifest"
    return None


def collect(cache: Path, dry_run: bool) -> list[Finding]:
    """garbage(), removed unless dry_run."""
    found = garbage(cache)
    if not dry_run:
        for finding in found:
            finding.path.unlink(missing_ok=True)
    return found


def verify(cache: Path, names: tuple[str, ...] = ()) -> list[Finding]:
    """Every published feature set (or the named ones) read back in full against its digest;
    caption sets read whole. One finding per set: its problem, or "ok"."""
    cache = Path(cache)
    results = []
    for path in published_files(cache):
        if names and set_name(path) not in names:
            continue
        results.append(Finding(path, problem_of(path, full=True) or "ok"))
    for name in list_caption_sets(cache):
        if names and name not in names:
            continue
        results.append(Finding(caption_dir(cache) / f"{name}.parquet", _caption_problem(cache, name) or "ok"))
    missing = set(names) - {set_name(r.path) for r in results} - {r.path.name.split(".")[0] for r in results}
    if missing:
        raise CacheError(f"{cache}: no set named {', '.join(sorted(missing))}")
    return results


def _caption_problem(cache: Path, name: str) -> str | None:
    from msa.cache.captions import CaptionSet

    try:
        CaptionSet.load(cache, name)
    except (CacheError, OSError, *H5_ERRORS) as err:
        return f"unreadable ({str(err).splitlines()[0]})"
    return None


__all__ = ["BusyError", "Finding", "collect", "garbage", "remove", "verify"]
