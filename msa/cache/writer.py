"""Writing a feature set (msa.cache.features describes the format): one process at a time
under the set's lock, a batch at a time with its `done` flags, resumable, published only when
read back whole."""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np

from msa.cache.features import (
    CHUNK_BYTES,
    FILE_FORMAT,
    H5_ERRORS,
    PARTS,
    WRITE_OPTIONS,
    _read_fingerprint,
    cache_of,
    canonical,
    content_digest,
    lock_name,
    partial_path,
    problem_of,
    set_aside,
    set_name,
)
from msa.core.errors import CacheError, WriteError, free_bytes, write_error
from msa.core.finite import require_finite
from msa.core.locks import set_lock


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
