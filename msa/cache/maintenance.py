"""`msa cache rm | gc | verify`: remove a set, collect what no run can use, check every byte.

Each takes the set's lock before touching it, so a set another process is writing is
reported as busy, never removed from under it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import h5py
import numpy as np

from msa.cache.captions import caption_dir, list_caption_sets
from msa.cache.features import (
    DAMAGED_SUFFIX,
    FEATURES_DIR,
    H5_ERRORS,
    PARTS,
    FeatureSet,
    _read_fingerprint,
    feature_path,
    lock_name,
    problem_of,
    published_files,
    set_name,
)
from msa.cache.manifest import read_manifest
from msa.cache.writer import FeatureWriter
from msa.core.errors import CacheError
from msa.core.locks import is_busy, set_lock, writable_here


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
    """The lock a file's writer holds: feature files as their writer names it, captions NAME
    (a torchrun rank's part: NAME.part-PART)."""
    if path.parent.name == FEATURES_DIR:
        return lock_name(path)
    for suffix in (".partial.jsonl", ".parquet.tmp", ".parquet"):
        if path.name.endswith(suffix):
            return path.name.removesuffix(suffix)
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
    merged = path.with_name(f"{set_name(path)}.h5")
    if ".shard-" in path.name and merged.is_file() and not problem_of(merged):
        return "shard of a set merged already"
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
            with writable_here(finding.path):
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


def list_feature_files(cache_dir: Path) -> list[dict]:
    """One dict per feature file (finished, shard, partial or set aside) for `msa cache ls`."""
    rows = []
    for path in sorted((Path(cache_dir) / FEATURES_DIR).glob("*.h5*")):
        if DAMAGED_SUFFIX in path.name:
            rows.append({"file": path.name, "status": "damaged, set aside"})
            continue
        partial = path.name.endswith(".partial")
        problem = None if partial else problem_of(path)
        try:
            with h5py.File(path, "r") as f:
                fingerprint = _read_fingerprint(f)
                done, total = int(f["done"][:].sum()), len(f["done"])
                dims = {part: list(f[part].shape[1:]) for part in PARTS if part in f}
        except H5_ERRORS:
            rows.append({"file": path.name, "status": f"damaged: {problem or 'unreadable'}"})
            continue
        status = "partial" if partial else ("shard" if ".shard-" in path.name else "complete")
        if partial and is_busy(cache_dir, _lock_name(path)):
            status = "partial, being written"
        rows.append({
            "file": path.name,
            "status": f"damaged: {problem}" if problem else status,
            "rows": f"{done}/{total}",
            "pooled": dims.get("pooled"),
            "tokens": dims.get("tokens"),
            "size_mb": round(path.stat().st_size / 2**20, 1),
            "manifest_id": fingerprint.get("manifest_id"),
        })
    return rows


def listing(cache: Path) -> dict:
    """What `msa cache ls` shows: the manifest, every feature file (stale ones named) and caption set."""
    from msa.cache.captions import CaptionSet, is_finished

    if not Path(cache).is_dir():
        raise CacheError(f"{cache}: no such cache directory; `msa extract --data DIR --cache {cache}` makes one")
    try:
        current = read_manifest(cache)
        manifest = {"id": current.manifest_id, "items": len(current), "data_dir": current.info["data_dir"]}
    except (FileNotFoundError, CacheError) as err:
        manifest = {"problem": str(err)}
    files = list_feature_files(cache)
    for row in files:
        if "id" in manifest and row.get("manifest_id") not in (None, manifest["id"]):
            row["status"] += ", stale"
    captions = []
    for name in list_caption_sets(cache):
        try:
            stored = CaptionSet.load(cache, name)
        except CacheError as err:
            captions.append({"name": name, "status": f"damaged: {err}"})
            continue
        captions.append({"name": name, "status": "complete" if is_finished(cache, name) else "partial",
                         "images": len(stored.captions), "model": str(stored.fingerprint.get("model"))})
    return {"cache": str(Path(cache).resolve()), "manifest": manifest, "feature_files": files,
            "caption_sets": captions}


def merge_shards(cache_dir: Path, name: str) -> Path:
    """Join finished shard files `NAME.shard-i-of-n.h5` into `NAME.h5`."""
    shard_files = sorted((Path(cache_dir) / FEATURES_DIR).glob(f"{name}.shard-*-of-*.h5"))
    if not shard_files:
        raise CacheError(f"no finished shards of {name!r} in {cache_dir / FEATURES_DIR}")
    counts = {int(p.name.rsplit("-of-", 1)[1].removesuffix(".h5")) for p in shard_files}
    if len(counts) != 1:
        raise CacheError(f"shards of {name!r} come from different --shard counts: {sorted(counts)}")
    expected = counts.pop()
    missing = sorted(set(range(expected)) - {int(p.name.split(".shard-")[1].split("-")[0]) for p in shard_files})
    target = feature_path(cache_dir, name)
    if target.is_file() and not problem_of(target):  # merged before: what is left of the shards is garbage
        for shard_file in shard_files:
            shard_file.unlink()
        return target
    if missing:
        raise CacheError(f"{name}: shards {missing} of {expected} are not finished yet")
    shards = [FeatureSet.open(p) for p in shard_files]
    fingerprint, target = shards[0].fingerprint, feature_path(cache_dir, name)
    with FeatureWriter(target, fingerprint, shards[0].guids, np.arange(len(shards[0].guids)), shards[0].notes) \
            as writer:
        for shard in shards:
            if shard.fingerprint != fingerprint:
                raise CacheError(f"{shard.path}: fingerprint differs from {shard_files[0].name}")
            with h5py.File(shard.path, "r") as f:
                start, stop = (int(v) for v in f.attrs["rows"])
            for lo in range(start, stop, 512):
                block = np.arange(lo, min(stop, lo + 512))
                writer.write(block, *(shard.load(part, block) for part in ("pooled", "tokens", "mask")),
                             shard.load("split", block) if "split" in shard.shapes else None)
        if not writer.finish():
            raise CacheError(f"{name}: the shards do not cover every row")
    for shard_file in shard_files:
        shard_file.unlink()
    return target
