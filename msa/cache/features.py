"""HDF5 feature sets: pooled `[N, D]` and token-level `[N, L, D]` features with a mask.

Row i of every feature set is row i of the manifest. A set is written to
`NAME.h5.partial` by one process at a time (its lock), one batch at a time, each batch
flushed together with its `done` flags; an interrupted write resumes at the first
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
from msa.core.errors import CacheError, WriteError, free_bytes, write_error
from msa.core.finite import non_finite_rows, require_finite
from msa.core.locks import set_lock

__all__ = ["CacheError", "FeatureSet", "FeatureWriter"]

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


class FeatureWriter:
    """Writes the given rows of one feature set (or one shard of it), resuming if it can.

    Holds the set's lock from construction to finish() or exit: a second writer of the same
    set gets BusyError. Any write error discards the partial file (its content is undefined
    once HDF5 failed to write) and raises WriteError naming the file and the free space."""

    def __init__(self, path: Path, fingerprint: dict, guids: list[str], rows: np.ndarray,
                 attrs: dict | None = None):
        """attrs: JSON-able notes kept with the set but not part of its identity (the
        extract options, with model paths, that `msa predict` re-runs on new data)."""
        self.path = Path(path)
        self.partial = partial_path(self.path)
        self.rows = np.asarray(rows)
        self.set_aside: Path | None = None  # a damaged partial file moved out of the way
        self.file: h5py.File | None = None
        self.guids = list(guids)
        self.partial.parent.mkdir(parents=True, exist_ok=True)
        self.lock = set_lock(cache_of(self.path), lock_name(self.path))
        try:
            if self.path.is_file() and problem_of(self.path):  # a damaged published set: made again
                self.set_aside = set_aside(self.path)
            fingerprint = canonical(fingerprint)
            self.file = self._open_existing(fingerprint, guids) if self.partial.exists() else None
            if self.file is None:
                self._create(fingerprint, guids, attrs)
            self.done = self.file["done"][:].astype(bool)
        except BaseException:
            self.lock.release()
            raise
        self.resumed_rows = int(self.done[self.rows].sum())

    def _create(self, fingerprint: dict, guids: list[str], attrs: dict | None) -> None:
        try:
            self.file = h5py.File(self.partial, "w", **WRITE_OPTIONS)
            self.file.attrs["fingerprint"] = json.dumps(fingerprint, sort_keys=True)
            self.file.attrs["format_version"] = FILE_FORMAT
            self.file.attrs["notes"] = json.dumps(attrs or {}, default=str)
            # The contiguous row range this file is responsible for (a shard's share).
            self.file.attrs["rows"] = [int(self.rows[0]), int(self.rows[-1]) + 1] if len(self.rows) else [0, 0]
            self.file.create_dataset("guid", data=np.array(guids, dtype=object), dtype=h5py.string_dtype())
            self.file.create_dataset("done", data=np.zeros(len(guids), dtype=np.uint8))
            self.file.flush()
        except H5_ERRORS as err:
            self._discard()
            raise write_error(self.partial, err) from None

    def _open_existing(self, fingerprint: dict, guids: list[str]) -> h5py.File | None:
        """The partial file of an interrupted run, if it is this set's and reads back whole;
        a damaged one is set aside, one of another fingerprint removed."""
        try:
            f = h5py.File(self.partial, "a", **WRITE_OPTIONS)
            same = _read_fingerprint(f) == fingerprint and f["guid"].asstr()[:].tolist() == list(guids)
            for part in PARTS:  # every chunk written so far must pass its checksum
                if part in f:
                    f[part][:]
            f["done"][:]
        except H5_ERRORS:
            if "f" in locals() and f.id.valid:
                _close_quietly(f)
            self.set_aside = set_aside(self.partial)
            return None
        if same:
            return f
        f.close()
        self.partial.unlink()
        return None

    def pending_rows(self) -> np.ndarray:
        return self.rows[~self.done[self.rows]]

    def write(self, rows: np.ndarray, pooled: np.ndarray, tokens: np.ndarray, mask: np.ndarray,
              split: np.ndarray | None = None) -> None:
        """Store a batch: pooled [B, D], tokens [B, L, D], mask [B, L], optionally split [B, ...];
        rows in any order."""
        rows = np.asarray(rows)
        # h5py writes need increasing indices; batches mostly come sorted, and copying one costs
        # the main thread as much as writing it
        order = slice(None) if np.all(rows[1:] > rows[:-1]) else np.argsort(rows)
        rows = rows[order]
        # A run of consecutive rows is written as one slice: a list of rows is one selection per row.
        where = slice(int(rows[0]), int(rows[-1]) + 1) if len(rows) and rows[-1] - rows[0] + 1 == len(rows) else rows
        # Checked as stored (after the cast): a value past float16's range becomes inf only here.
        with np.errstate(over="ignore"):
            stored = {"pooled": pooled[order].astype(np.float16, copy=False),
                      "tokens": tokens[order].astype(np.float16, copy=False),
                      "split": None if split is None else split[order].astype(np.float32, copy=False)}
        for part, values in stored.items():
            if values is not None:
                require_finite(values, f"{set_name(self.path)} ({part}, as stored in "
                                       f"{'float32' if part == 'split' else 'float16'})", [self.guids[r] for r in rows])
        try:
            if "pooled" not in self.file:
                self._create_datasets(pooled, tokens, split)
            self.file["pooled"][where] = stored["pooled"]
            self.file["tokens"][where] = stored["tokens"]
            self.file["mask"][where] = mask[order].astype(bool, copy=False)
            if split is not None:
                self.file["split"][where] = stored["split"]
            self.file["done"][rows] = 1
            self.file.flush()
        except H5_ERRORS as err:
            self._discard()
            raise write_error(self.partial, err) from None
        self.done[rows] = True

    def _create_datasets(self, pooled: np.ndarray, tokens: np.ndarray, split: np.ndarray | None) -> None:
        n = len(self.done)
        _, token_len, token_dim = tokens.shape
        row_bytes = 2 * (pooled.shape[1] + token_len * token_dim) + token_len + (split[0].size * 4 if split is not None
                                                                                 else 0)
        needed, free = row_bytes * len(self.rows), free_bytes(self.partial)
        if needed > free:  # fail now, not after an hour of encoding
            raise WriteError(f"{self.partial}: the set needs ~{needed / 2**20:.0f} MB and only "
                             f"{free / 2**20:.0f} MB are free there; free some space (`msa cache gc`) and rerun")
        # fletcher32: every chunk carries a checksum that each read verifies.
        if split is not None:
            split_rows = max(1, min(n, CHUNK_BYTES // (split[0].size * 4)))
            self.file.create_dataset("split", shape=(n, *split.shape[1:]), dtype=np.float32,
                                     chunks=(split_rows, *split.shape[1:]), fletcher32=True)
        chunk_rows = max(1, min(n, CHUNK_BYTES // (token_len * token_dim * 2)))
        self.file.create_dataset("pooled", shape=(n, pooled.shape[1]), dtype=np.float16,
                                 chunks=(min(n, 256), pooled.shape[1]), fletcher32=True)
        self.file.create_dataset("tokens", shape=(n, token_len, token_dim), dtype=np.float16,
                                 chunks=(chunk_rows, token_len, token_dim), fletcher32=True)
        self.file.create_dataset("mask", shape=(n, token_len), dtype=bool,
                                 chunks=(min(n, 1024), token_len), fletcher32=True)

    def finish(self) -> bool:
        """Close; if every row is in, read the file back, record its digest and publish it.
        Returns whether it was published."""
        complete = bool(self.done[self.rows].all())
        try:
            self.file.close()
        except H5_ERRORS as err:
            self._discard()
            raise write_error(self.partial, err) from None
        try:
            if complete:
                self._publish()
        finally:
            self.lock.release()
        return complete

    def _publish(self) -> None:
        try:
            with h5py.File(self.partial, "r+") as f:
                start, stop = (int(v) for v in f.attrs["rows"])
                if not f["done"][start:stop].all():  # what reached the file, not what we meant to write
                    raise CacheError(f"{self.partial}: rows are missing after writing; nothing was published")
                f.attrs["digest"] = content_digest(f)
            with open(self.partial, "rb+") as f:
                os.fsync(f.fileno())  # on disk before the name says "complete"
        except H5_ERRORS as err:
            self.file = None
            self._discard()
            raise write_error(self.partial, err) from None
        os.replace(self.partial, self.path)

    def _discard(self) -> None:
        """After a failed write: empty the partial file so that HDF5 can close it (it would
        otherwise retry the write at exit and crash), then remove it."""
        if self.partial.exists():
            os.truncate(self.partial, 0)
        if self.file is not None and self.file.id.valid:
            _close_quietly(self.file)
        self.partial.unlink(missing_ok=True)

    def __enter__(self) -> FeatureWriter:
        return self

    def __exit__(self, *exc) -> None:
        try:
            if self.file is not None and self.file.id.valid:  # interrupted: keep the partial file for resuming
                try:
                    self.file.close()
                except H5_ERRORS:
                    self._discard()
        finally:
            if self.lock.is_locked:
                self.lock.release()


def _close_quietly(f: h5py.File) -> None:
    try:
        f.close()
    except H5_ERRORS:
        pass


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
