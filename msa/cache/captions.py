"""Caption sets: one caption per image, as Parquet keyed by guid, under CACHE/captions/.

A set is named by its captioner and generation settings (its fingerprint), not by the
data: predictions on new data add rows to the same set. Each row also records the
image file's size, so an image replaced under the same guid is captioned again.

Crash safety: a run appends each finished batch to NAME.partial.jsonl (flushed and
fsynced); finishing folds those rows into NAME.parquet with an atomic replace. A torn
last line, from a kill mid-write, is ignored, and its images are captioned again.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from msa.core.errors import CacheError, write_error
from msa.core.fingerprint import config_id, slug
from msa.core.locks import set_lock

CAPTION_DIR = "captions"
SCHEMA = pa.schema([("guid", pa.string()), ("caption", pa.string()), ("flag", pa.string()),
                    ("image_bytes", pa.int64())])
BAD_IMAGE = "bad_image"  # the flag of an image that could not be read: its caption is ""


@dataclasses.dataclass(frozen=True)
class Caption:
    text: str
    flag: str  # "" or BAD_IMAGE
    image_bytes: int  # size of the captioned file; -1 when it was missing


def caption_set_name(model: str, fingerprint: dict) -> str:
    return f"captions-{slug(model)}-{config_id(fingerprint)}"


def caption_dir(cache: Path) -> Path:
    return Path(cache) / CAPTION_DIR


def list_caption_sets(cache: Path) -> list[str]:
    folder = caption_dir(cache)
    names = {p.name.removesuffix(".parquet") for p in folder.glob("*.parquet")}
    names |= {p.name.removesuffix(".partial.jsonl").split(PART)[0] for p in folder.glob("*.partial.jsonl")}
    return sorted(names)


def is_finished(cache: Path, name: str) -> bool:
    """Stored as Parquet, with no interrupted run's rows waiting to be folded in."""
    parquet, _ = _paths(cache, name)
    return parquet.is_file() and not _partials(cache, name)


@dataclasses.dataclass
class CaptionSet:
    """A caption set as stored: finished rows plus those of an interrupted run."""

    name: str
    fingerprint: dict
    notes: dict  # the caption config that made it, and the precision it ran at
    captions: dict[str, Caption]

    @classmethod
    def load(cls, cache: Path, name: str) -> CaptionSet:
        """The Parquet rows, and those of every partial file (an interrupted run's, or the parts
        of torchrun's ranks)."""
        parquet, _ = _paths(cache, name)
        partials = _partials(cache, name)
        if not parquet.is_file() and not partials:
            known = ", ".join(list_caption_sets(cache)) or "none"
            raise CacheError(f"no caption set {name} in {caption_dir(cache)} (known: {known}); run `msa caption`")
        fingerprint, notes, captions = {}, {}, {}
        if parquet.is_file():
            try:
                table = pq.read_table(parquet)
                meta = json.loads(table.schema.metadata[b"msa"])
            except (OSError, pa.ArrowException, KeyError, TypeError, ValueError) as err:
                raise CacheError(f"{parquet}: caption set {name} is unreadable ({str(err).splitlines()[0]}); remove "
                                 f"it with `msa cache rm {name} --cache {cache}` and run `msa caption` again") from None
            fingerprint, notes = meta["fingerprint"], meta["notes"]
            for row in table.to_pylist():
                captions[row["guid"]] = Caption(row["caption"], row["flag"], row["image_bytes"])
        for partial in partials:
            header, rows = _read_partial(partial)
            if header:
                fingerprint, notes = header["fingerprint"], header["notes"]
            for row in rows:
                captions[row["guid"]] = Caption(row["caption"], row["flag"], row["image_bytes"])
        return cls(name, fingerprint, notes, captions)

    def covers(self, guid: str, image_bytes: int) -> bool:
        caption = self.captions.get(guid)
        return caption is not None and caption.image_bytes == image_bytes

    def texts(self, guids: list[str], sizes: list[int] | None = None) -> list[str]:
        """Captions in the order of `guids`. With the images' current file sizes, an image
        replaced since it was captioned counts as uncaptioned. The error names the first gap."""
        sizes = sizes if sizes is not None else [None] * len(guids)
        missing = [g for g, size in zip(guids, sizes)
                   if not (g in self.captions if size is None else self.covers(g, size))]
        if missing:
            raise CacheError(f"caption set {self.name} lacks current captions for {len(missing)} of {len(guids)} "
                             f"items (first: guid {missing[0]}); run `msa caption` on this data first")
        return [self.captions[g].text for g in guids]


class CaptionWriter:
    """Appends captioned batches to the partial file; `finish()` folds them into the Parquet set."""

    def __init__(self, cache: Path, name: str, fingerprint: dict, notes: dict, part: str | None = None):
        """Holds the set's lock until close(): a second captioner of the same set gets BusyError.
        `part` (a torchrun rank's) writes NAME.part-PART.partial.jsonl under a lock of its own;
        the main writer's finish() folds every part in."""
        self.cache, self.name, self.fingerprint, self.notes = Path(cache), name, fingerprint, notes
        self.parquet, self.partial = _paths(cache, name, part)
        self.parquet.parent.mkdir(parents=True, exist_ok=True)
        self.lock = set_lock(cache, name if part is None else f"{name}{PART}{part}")
        try:
            _drop_torn_tail(self.partial)
            new = not self.partial.is_file() or self.partial.stat().st_size == 0
            self.file = open(self.partial, "a", encoding="utf-8")
            if new:
                self._append([{"fingerprint": fingerprint, "notes": notes}])
        except BaseException as err:
            self.lock.release()
            raise write_error(self.partial, err) if isinstance(err, OSError) else err from None

    def write(self, guids: list[str], captions: list[str], flags: list[str], image_bytes: list[int]) -> None:
        self._append([{"guid": guid, "caption": caption, "flag": flag, "image_bytes": size}
                      for guid, caption, flag, size in zip(guids, captions, flags, image_bytes)])

    def _append(self, records: list[dict]) -> None:
        """Whole lines, flushed and fsynced; a failed write is cut back to the last whole line."""
        try:
            self.file.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
            self.file.flush()
            os.fsync(self.file.fileno())
        except OSError as err:
            self.close()
            _drop_torn_tail(self.partial)
            raise write_error(self.partial, err) from None

    def finish(self) -> CaptionSet:
        """Write every row (earlier runs' and this one's) to NAME.parquet, then drop the partial file."""
        self.file.close()
        stored = CaptionSet.load(self.cache, self.name)
        captions = dict(sorted(stored.captions.items()))
        rows = [{"guid": g, "caption": c.text, "flag": c.flag, "image_bytes": c.image_bytes}
                for g, c in captions.items()]
        table = pa.Table.from_pylist(rows, schema=SCHEMA).replace_schema_metadata(
            {"msa": json.dumps({"fingerprint": self.fingerprint, "notes": self.notes})})
        tmp = self.parquet.with_suffix(".parquet.tmp")
        try:
            pq.write_table(table, tmp)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            raise write_error(self.parquet, err) from None
        os.replace(tmp, self.parquet)
        for partial in _partials(self.cache, self.name):
            partial.unlink()
        return CaptionSet(self.name, self.fingerprint, self.notes, captions)

    def close(self) -> None:
        if not self.file.closed:
            try:
                self.file.close()
            except OSError:  # the data that failed to flush is cut off by _drop_torn_tail
                pass
        if self.lock.is_locked:
            self.lock.release()


def caption_path(cache: Path, name: str) -> Path:
    return caption_dir(cache) / f"{name}.parquet"


PART = ".part-"  # NAME.part-PART.partial.jsonl: one torchrun rank's rows


def _paths(cache: Path, name: str, part: str | None = None) -> tuple[Path, Path]:
    stem = name if part is None else f"{name}{PART}{part}"
    return caption_path(cache, name), caption_dir(cache) / f"{stem}.partial.jsonl"


def _partials(cache: Path, name: str) -> list[Path]:
    """The set's partial files: the main one and the ranks' parts."""
    folder = caption_dir(cache)
    return sorted(p for p in [folder / f"{name}.partial.jsonl", *folder.glob(f"{name}{PART}*.partial.jsonl")]
                  if p.is_file())


def _drop_torn_tail(path: Path) -> None:
    """Cut a last line that a kill left without its newline, so appends start on a fresh line."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def _read_partial(path: Path) -> tuple[dict | None, list[dict]]:
    """The header and rows of a partial file; no header when a kill tore its first line."""
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):  # torn by a kill mid-write: those images are captioned again
                break
            raise CacheError(f"{path}:{number}: not a JSON line; delete the file to caption its images again") \
                from None
    if not records:
        return None, []
    if "fingerprint" not in records[0]:
        raise CacheError(f"{path}: no header line; delete the file to caption its images again")
    return records[0], records[1:]
