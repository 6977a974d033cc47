"""HDF5 feature sets: pooled `[N, D]` and token-level `[N, L, D]` features with a mask.

Row i of every feature set is row i of the manifest. A set is written to
`NAME.h5.partial`, one batch at a time, each batch flushed together with its `done`
flags, and renamed to `NAME.h5` only when every row is in: a reader never sees a
half-written set as complete, and an interrupted write resumes at the first missing row.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import h5py
import numpy as np

FORMAT_VERSION = 1
FEATURES_DIR = "features"
# split: the activation entering the unfreezable top of the encoder (--text-split-layer,
# --image-split-stage), kept float32 so that training the top on it matches end to end.
PARTS = ("pooled", "tokens", "mask", "split")
# ~1 MiB chunks of whole rows: a random batch reads few chunks, a chunk is one write.
CHUNK_BYTES = 1 << 20


class CacheError(RuntimeError):
    pass


def feature_path(cache_dir: Path, name: str, shard: tuple[int, int] | None = None) -> Path:
    suffix = f".shard-{shard[0]}-of-{shard[1]}.h5" if shard else ".h5"
    return Path(cache_dir) / FEATURES_DIR / f"{name}{suffix}"


def partial_path(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def shard_rows(n_rows: int, shard: tuple[int, int] | None) -> np.ndarray:
    """Contiguous, disjoint row ranges, so each shard file allocates only its own chunks."""
    if shard is None:
        return np.arange(n_rows)
    index, count = shard
    if not 0 <= index < count:
        raise ValueError(f"shard {index}/{count}: index must be in 0..{count - 1}")
    bounds = np.linspace(0, n_rows, count + 1).round().astype(int)
    return np.arange(bounds[index], bounds[index + 1])


def _read_fingerprint(f: h5py.File) -> dict:
    return json.loads(f.attrs["fingerprint"])


def canonical(fingerprint: dict) -> dict:
    """The fingerprint as it reads back from the file (tuples become lists)."""
    return json.loads(json.dumps(fingerprint, sort_keys=True))


def is_complete(path: Path, fingerprint: dict) -> bool:
    """True when a finished set with exactly this fingerprint is at `path`."""
    if not path.is_file():
        return False
    with h5py.File(path, "r") as f:
        return _read_fingerprint(f) == canonical(fingerprint)


class FeatureWriter:
    """Writes the given rows of one feature set (or one shard of it), resuming if it can."""

    def __init__(self, path: Path, fingerprint: dict, guids: list[str], rows: np.ndarray,
                 attrs: dict | None = None):
        """attrs: JSON-able notes kept with the set but not part of its identity (the
        extract options, with model paths, that `msa predict` re-runs on new data)."""
        self.path = Path(path)
        self.rows = np.asarray(rows)
        fingerprint = canonical(fingerprint)
        partial = partial_path(self.path)
        partial.parent.mkdir(parents=True, exist_ok=True)
        self.file = self._open_existing(partial, fingerprint, guids) if partial.exists() else None
        if self.file is None:
            self.file = h5py.File(partial, "w")
            self.file.attrs["fingerprint"] = json.dumps(fingerprint, sort_keys=True)
            self.file.attrs["format_version"] = FORMAT_VERSION
            self.file.attrs["notes"] = json.dumps(attrs or {}, default=str)
            # The contiguous row range this file is responsible for (a shard's share).
            self.file.attrs["rows"] = [int(self.rows[0]), int(self.rows[-1]) + 1] if len(self.rows) else [0, 0]
            self.file.create_dataset("guid", data=np.array(guids, dtype=object), dtype=h5py.string_dtype())
            self.file.create_dataset("done", data=np.zeros(len(guids), dtype=np.uint8))
            self.file.flush()
        self.done = self.file["done"][:].astype(bool)
        self.resumed_rows = int(self.done[self.rows].sum())

    @staticmethod
    def _open_existing(partial: Path, fingerprint: dict, guids: list[str]) -> h5py.File | None:
        try:
            f = h5py.File(partial, "a")
        except OSError:  # killed before its first flush: nothing worth keeping
            partial.unlink()
            return None
        same = _read_fingerprint(f) == fingerprint and f["guid"].asstr()[:].tolist() == list(guids)
        if same:
            return f
        f.close()
        partial.unlink()
        return None

    def pending_rows(self) -> np.ndarray:
        return self.rows[~self.done[self.rows]]

    def write(self, rows: np.ndarray, pooled: np.ndarray, tokens: np.ndarray, mask: np.ndarray,
              split: np.ndarray | None = None) -> None:
        """Store a batch: pooled [B, D], tokens [B, L, D], mask [B, L], optionally split [B, ...];
        rows in any order."""
        if "pooled" not in self.file:
            self._create_datasets(pooled, tokens, split)
        order = np.argsort(rows)
        rows = np.asarray(rows)[order]  # h5py writes need increasing indices
        self.file["pooled"][rows] = pooled[order].astype(np.float16)
        self.file["tokens"][rows] = tokens[order].astype(np.float16)
        self.file["mask"][rows] = mask[order].astype(bool)
        if split is not None:
            self.file["split"][rows] = split[order].astype(np.float32)
        self.file["done"][rows] = 1
        self.done[rows] = True
        self.file.flush()

    def _create_datasets(self, pooled: np.ndarray, tokens: np.ndarray, split: np.ndarray | None) -> None:
        n = len(self.done)
        if split is not None:
            split_rows = max(1, min(n, CHUNK_BYTES // (split[0].size * 4)))
            self.file.create_dataset("split", shape=(n, *split.shape[1:]), dtype=np.float32,
                                     chunks=(split_rows, *split.shape[1:]))
        _, token_len, token_dim = tokens.shape
        chunk_rows = max(1, min(n, CHUNK_BYTES // (token_len * token_dim * 2)))
        self.file.create_dataset("pooled", shape=(n, pooled.shape[1]), dtype=np.float16,
                                 chunks=(min(n, 256), pooled.shape[1]))
        self.file.create_dataset("tokens", shape=(n, token_len, token_dim), dtype=np.float16,
                                 chunks=(chunk_rows, token_len, token_dim))
        self.file.create_dataset("mask", shape=(n, token_len), dtype=bool,
                                 chunks=(min(n, 1024), token_len))

    def finish(self) -> bool:
        """Close; publish as complete if every row is in. Returns whether it was published."""
        complete = bool(self.done[self.rows].all())
        self.file.close()
        if complete:
            os.replace(partial_path(self.path), self.path)
        return complete

    def __enter__(self) -> FeatureWriter:
        return self

    def __exit__(self, *exc) -> None:
        if self.file.id.valid:  # interrupted: keep the partial file for resuming
            self.file.close()


@dataclasses.dataclass
class FeatureSet:
    """A finished feature set, opened for reading."""

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
        with h5py.File(path, "r") as f:
            shapes = {part: f[part].shape for part in PARTS if part in f}
            notes = json.loads(f.attrs.get("notes", "{}"))
            return cls(Path(path), _read_fingerprint(f), f["guid"].asstr()[:].tolist(), shapes, notes)

    def load(self, part: str, rows: np.ndarray | None = None) -> np.ndarray:
        """Read one part (`pooled`, `tokens`, `mask` or `split`), all rows or the given ones."""
        with h5py.File(self.path, "r") as f:
            if rows is None:
                return f[part][:]
            order = np.argsort(rows)
            out = np.empty((len(rows), *f[part].shape[1:]), dtype=f[part].dtype)
            out[order] = f[part][np.asarray(rows)[order]]
            return out


def find_feature_set(cache_dir: Path, name: str) -> FeatureSet:
    path = feature_path(cache_dir, name)
    if not path.is_file():
        known = sorted(p.name.removesuffix(".h5") for p in (Path(cache_dir) / FEATURES_DIR).glob("*.h5")
                       if ".shard-" not in p.name)
        raise CacheError(f"no feature set {name!r} in {cache_dir}; cached: {', '.join(known) or 'none'}")
    return FeatureSet.open(path)


def complete_feature_sets(cache_dir: Path, manifest_id: str) -> list[FeatureSet]:
    """Every finished (unsharded) feature set that follows the given manifest."""
    found = []
    for path in sorted((Path(cache_dir) / FEATURES_DIR).glob("*.h5")):
        if ".shard-" not in path.name:
            feature_set = FeatureSet.open(path)
            if feature_set.fingerprint.get("manifest_id") == manifest_id:
                found.append(feature_set)
    return found


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
    if missing:
        raise CacheError(f"{name}: shards {missing} of {expected} are not finished yet")
    first = FeatureSet.open(shard_files[0])
    fingerprint, target = first.fingerprint, feature_path(cache_dir, name)
    writer = FeatureWriter(target, fingerprint, first.guids, np.arange(len(first.guids)), first.notes)
    for shard_file in shard_files:
        with h5py.File(shard_file, "r") as f:
            if _read_fingerprint(f) != fingerprint:
                raise CacheError(f"{shard_file}: fingerprint differs from {shard_files[0].name}")
            start, stop = (int(v) for v in f.attrs["rows"])
            for lo in range(start, stop, 512):
                hi = min(stop, lo + 512)
                writer.write(np.arange(lo, hi), f["pooled"][lo:hi], f["tokens"][lo:hi], f["mask"][lo:hi],
                             f["split"][lo:hi] if "split" in f else None)
    if not writer.finish():
        raise CacheError(f"{name}: the shards do not cover every row")
    for shard_file in shard_files:
        shard_file.unlink()
    return target


def list_feature_files(cache_dir: Path) -> list[dict]:
    """One dict per feature file (finished, shard, or partial) for `msa cache ls`."""
    rows = []
    for path in sorted((Path(cache_dir) / FEATURES_DIR).glob("*.h5*")):
        try:
            with h5py.File(path, "r") as f:
                fingerprint = _read_fingerprint(f)
                done = int(f["done"][:].sum())
                total = len(f["done"])
                dims = {part: list(f[part].shape[1:]) for part in PARTS if part in f}
        except OSError:
            rows.append({"file": path.name, "status": "unreadable (interrupted before its first flush)"})
            continue
        status = "partial" if path.name.endswith(".partial") else ("shard" if ".shard-" in path.name else "complete")
        rows.append({
            "file": path.name,
            "status": status,
            "rows": f"{done}/{total}",
            "pooled": dims.get("pooled"),
            "tokens": dims.get("tokens"),
            "size_mb": round(path.stat().st_size / 2**20, 1),
            "fingerprint": fingerprint,
        })
    return rows
