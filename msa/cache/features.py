"""HDF5 feature sets: pooled `[N, D]` and token-level `[N, L, D]` features with a mask.

Row i of every feature set is row i of the manifest. A set is written to
`NAME.h5.partial` by one process at a time (its lock; msa.cache.writer), one batch at a time,
each batch flushed together with its `done` flags; an interrupted write resumes at the first
missing row. A set is published (renamed to `NAME.h5`) only after it was read back in
full: every `done` flag set, every chunk's fletcher32 checksum right, and a sha256 of its
content recorded. Readers open published sets only, and `FeatureSet.open` refuses one
whose flags or digest are missing; a bit flipped later fails its chunk's checksum on
read, naming the set, and `msa cache verify` re-reads everything against the digest.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path

import h5py
import numpy as np

from msa.cache.contained import outside_storage
from msa.core.config import ConfigError
from msa.core.errors import CacheError
from msa.core.finite import non_finite_rows, require_finite

__all__ = ["CacheError", "FeatureSet"]

FILE_FORMAT = 2  # the HDF5 layout; 2: fletcher32 chunks and a content digest (older files are re-encoded)
FEATURES_DIR = "features"
# split: the activation entering the unfreezable top of the encoder (--text-split-layer,
# --image-split-stage), kept float32 so that training the top on it matches end to end.
PARTS = ("pooled", "tokens", "mask", "split")
# ~1 MiB chunks of whole rows: a random batch reads few chunks, a chunk is one write.
CHUNK_BYTES = 1 << 20
DAMAGED_SUFFIX = ".damaged"
# No chunk cache in writers: a write error then surfaces at the write itself, and no dirty
# chunk is left for HDF5 to retry (and crash on) when the process exits.
WRITE_OPTIONS = {"rdcc_nbytes": 0}
# What h5py raises for a file it cannot read or write: OSError for most, RuntimeError for
# write failures surfacing at flush/close, KeyError/ValueError for damaged internals.
H5_ERRORS = (OSError, RuntimeError, KeyError, ValueError)


def feature_path(cache_dir: Path, name: str, shard: tuple[int, int] | None = None) -> Path:
    suffix = f".shard-{shard[0]}-of-{shard[1]}.h5" if shard else ".h5"
    return Path(cache_dir) / FEATURES_DIR / f"{name}{suffix}"


def partial_path(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def set_name(path: Path) -> str:
    """The set's name from any of its files: NAME.h5, NAME.shard-i-of-n.h5, NAME.h5.partial."""
    return Path(path).name.split(".h5")[0].split(".shard-")[0]


def lock_name(path: Path) -> str:
    """The lock its writer holds, from any file of a set or shard: NAME, or NAME.shard-i-of-n."""
    return Path(path).name.split(".h5")[0]


def cache_of(path: Path) -> Path:
    return Path(path).parent.parent


def shard_rows(n_rows: int, shard: tuple[int, int] | None, unit: int = 1) -> np.ndarray:
    """Contiguous, disjoint row ranges, so each shard file allocates only its own chunks; they
    start at multiples of `unit` (the batch size), so that images meet the encoder in the same
    batches as in one process (CPU kernels may round differently for another batch)."""
    if shard is None:
        return np.arange(n_rows)
    index, count = shard
    if not 0 <= index < count:
        raise ConfigError(f"shard {index}/{count}: index must be in 0..{count - 1}")
    bounds = np.minimum(np.linspace(0, -(-n_rows // unit), count + 1).round().astype(int) * unit, n_rows)
    return np.arange(bounds[index], bounds[index + 1])


def _read_fingerprint(f: h5py.File) -> dict:
    return json.loads(f.attrs["fingerprint"])


def canonical(fingerprint: dict) -> dict:
    """The fingerprint as it reads back from the file (tuples become lists)."""
    return json.loads(json.dumps(fingerprint, sort_keys=True))


def set_aside(path: Path) -> Path:
    """Rename a damaged file out of the way (kept for a look; `msa cache gc` removes it)."""
    target = path.with_name(f"{path.name}{DAMAGED_SUFFIX}-{time.strftime('%Y%m%d-%H%M%S')}")
    os.replace(path, target)
    return target


def content_digest(f: h5py.File, block_bytes: int = 64 << 20) -> str:
    """sha256 of the fingerprint, the guids and every part, read in row blocks (each chunk's
    fletcher32 is checked on the way)."""
    digest = hashlib.sha256(f.attrs["fingerprint"].encode())
    digest.update("\n".join(f["guid"].asstr()[:]).encode())
    for part in PARTS:
        if part not in f:
            continue
        data = f[part]
        rows = max(1, block_bytes // max(1, data.dtype.itemsize * int(np.prod(data.shape[1:]))))
        for start in range(0, data.shape[0], rows):
            digest.update(np.ascontiguousarray(data[start: start + rows]).tobytes())
    return digest.hexdigest()


def problem_of(path: Path, full: bool = False) -> str | None:
    """Why a published set cannot be used, or None. Quick: it opens, its flags are all set and
    it has a digest. full: every byte read back and checked against the digest too."""
    try:
        with h5py.File(path, "r") as f:
            outside = outside_storage(f)
            if outside:
                return f"not self-contained: {outside}"
            if int(f.attrs.get("format_version", 1)) < FILE_FORMAT:
                return "written by an older msa, without checksums"
            if "digest" not in f.attrs:
                return "has no content digest (never verified)"
            start, stop = (int(v) for v in f.attrs["rows"])  # a shard's share, or every row
            done = f["done"][start:stop]
            if not done.all():
                return f"only {int(done.sum())} of {len(done)} rows are done"
            if full:
                try:
                    digest = content_digest(f)
                except H5_ERRORS as err:
                    return f"damaged on disk: a chunk fails its checksum ({str(err).splitlines()[0]})"
                if digest != f.attrs["digest"]:
                    return "damaged on disk: its content differs from its digest"
                return non_finite_problem(f)
    except H5_ERRORS as err:
        return f"unreadable ({str(err).splitlines()[0]})"
    return None


def non_finite_problem(f: h5py.File, block_rows: int = 4096) -> str | None:
    """Which part of a set holds a NaN or an inf (sets written before msa checked at write may)."""
    guids = f["guid"].asstr()
    for part in ("pooled", "tokens", "split"):
        if part not in f:
            continue
        for start in range(0, f[part].shape[0], block_rows):
            bad = non_finite_rows(f[part][start: start + block_rows])
            if len(bad):
                return f"holding NaN or infinite values in '{part}' (guid {guids[start + bad[0]]})"
    return None


def damaged_error(path: Path, problem: str) -> CacheError:
    name = set_name(path)
    return CacheError(f"{path}: feature set {name} is {problem}; remove it with `msa cache rm {name} --cache "
                      f"{cache_of(path)}` and run `msa extract` again (it re-encodes the set)")


def is_complete(path: Path, fingerprint: dict) -> bool:
    """True when a finished, intact set with exactly this fingerprint is at `path`."""
    if not path.is_file() or problem_of(path):
        return False
    with h5py.File(path, "r") as f:
        return _read_fingerprint(f) == canonical(fingerprint)


@dataclasses.dataclass
class FeatureSet:
    """A finished feature set, opened for reading (after checking its flags and digest)."""

    path: Path
    fingerprint: dict
    guids: list[str]
    shapes: dict[str, tuple[int, ...]]
    notes: dict = dataclasses.field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.name.removesuffix(".h5")

    @classmethod
    def open(cls, path: Path) -> FeatureSet:
        problem = problem_of(path)
        if problem:
            raise damaged_error(path, problem)
        with h5py.File(path, "r") as f:
            shapes = {part: f[part].shape for part in PARTS if part in f}
            notes = json.loads(f.attrs.get("notes", "{}"))
            return cls(Path(path), _read_fingerprint(f), f["guid"].asstr()[:].tolist(), shapes, notes)

    def require_rows_of(self, guids: list[str], manifest_path: Path) -> None:
        """Row i of a set is row i of the manifest: checked by guid at every use, so a manifest
        edited by hand (a row removed, rows reordered) never pairs items with others' features."""
        if self.guids != list(guids):
            where = next((i for i, (a, b) in enumerate(zip(self.guids, guids)) if a != b), min(len(guids),
                                                                                              len(self.guids)))
            raise CacheError(f"{manifest_path}: its rows no longer match feature set {self.name} ({len(guids)} rows "
                             f"against {len(self.guids)}, first difference at row {where}); rerun `msa extract` "
                             "to rebuild the manifest from the data")

    def load(self, part: str, rows: np.ndarray | None = None) -> np.ndarray:
        """Read one part (`pooled`, `tokens`, `mask` or `split`), all rows or the given ones."""
        try:
            with h5py.File(self.path, "r") as f:
                if rows is None:
                    out = f[part][:]
                else:
                    order = np.argsort(rows)
                    out = np.empty((len(rows), *f[part].shape[1:]), dtype=f[part].dtype)
                    out[order] = f[part][np.asarray(rows)[order]]
        except H5_ERRORS as err:
            raise damaged_error(self.path, f"damaged in '{part}' ({str(err).splitlines()[0]})") from None
        names = self.guids if rows is None else [self.guids[r] for r in rows]
        require_finite(out, f"{self.path} ('{part}')", names)
        return out


def find_feature_set(cache_dir: Path, name: str) -> FeatureSet:
    path = feature_path(cache_dir, name)
    if not path.is_file():
        known = sorted(set_name(p) for p in published_files(cache_dir))
        raise CacheError(f"no feature set {name!r} in {cache_dir}; cached: {', '.join(known) or 'none'}")
    return FeatureSet.open(path)


def published_files(cache_dir: Path) -> list[Path]:
    """Every published (unsharded) set file, intact or not."""
    return sorted(p for p in (Path(cache_dir) / FEATURES_DIR).glob("*.h5") if ".shard-" not in p.name)


@dataclasses.dataclass
class PublishedSet:
    """A published set as a listing sees it: opened when intact, else the error that says why not."""

    path: Path
    feature_set: FeatureSet | None
    error: CacheError | None

    @property
    def name(self) -> str:
        return set_name(self.path)


def scan_feature_sets(cache_dir: Path) -> list[PublishedSet]:
    found = []
    for path in published_files(cache_dir):
        try:
            found.append(PublishedSet(path, FeatureSet.open(path), None))
        except CacheError as err:  # damaged: named, never used
            found.append(PublishedSet(path, None, err))
    return found
