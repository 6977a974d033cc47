"""Read an MVSA-style data set: `train.txt`, `test_without_label.txt`, `data/{guid}.txt|jpg`.

Real MVSA files are messy (a quarter of the texts are GB18030, some texts are empty,
images go missing or arrive truncated). The reader never fails half-way: structural
problems (a malformed line, an unknown label) stop it up front with the file and line,
and per-item problems become flags on the item and counts in the report.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import functools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import get_args

from PIL import Image

from msa.core.config import ConfigError, OnBadImage, OnDuplicate
from msa.data.mvsa_release import RELEASE_FILE, RULES, ReleaseError, read_release_labels

LABELS = ("negative", "neutral", "positive")
LABEL_FILES = {"train": "train.txt", "test": "test_without_label.txt"}
# Tried in order. gb18030 covers the Chinese-platform exports seen in MVSA;
# cp1252 covers Windows-exported Western text; replacement is the last resort.
TEXT_ENCODINGS = ("utf-8", "gb18030", "cp1252")
ON_BAD_IMAGE = get_args(OnBadImage)
# first-if-same: keep the first of duplicates that agree, stop where their labels conflict.
ON_DUPLICATE = get_args(OnDuplicate)
BAD_ITEMS_FILE = "bad_items.csv"
# Bounds on what one item may cost. A post is a few hundred bytes: the first 64 KiB of a text are
# kept (flagged long_text), never 50 MB. An image may hold at most 64 megapixels (a 16 KB JPEG can
# declare 65000x65000) and a side at most 20 times the other (a 65000x2 strip resized to the
# encoder's short side would need gigabytes).
MAX_TEXT_BYTES = 64 * 1024
MAX_IMAGE_PIXELS = 64_000_000
MAX_IMAGE_ASPECT = 20


class DataError(ValueError):
    """A problem in the input files; the message names the file and line."""


@dataclasses.dataclass
class Item:
    guid: str
    label: str | None  # None for unlabelled (test) items
    text: str
    text_encoding: str
    image_path: str
    flags: list[str]
    source: str  # "train" or "test": which label file listed the item
    where: str = ""  # FILE:LINE of the listing


@dataclasses.dataclass
class ReadReport:
    items_read: int = 0
    class_counts: dict[str, int] = dataclasses.field(default_factory=dict)
    encodings: dict[str, int] = dataclasses.field(default_factory=dict)
    flags: dict[str, int] = dataclasses.field(default_factory=dict)
    skipped: list[str] = dataclasses.field(default_factory=list)  # "guid: reason"
    notes: list[str] = dataclasses.field(default_factory=list)  # e.g. duplicate lines
    # An original MVSA release: its layout and how many posts each of the field's rules dropped.
    release: dict = dataclasses.field(default_factory=dict)
    bad_items: list[dict] = dataclasses.field(default_factory=list)  # guid, where (FILE:LINE), problem


def bad_image_flag(flags: list[str]) -> str | None:
    """The flag marking an item's image as missing or unreadable, if it has one."""
    return next((f for f in flags if f.endswith("_image")), None)


def decode_text(raw: bytes) -> tuple[str, str]:
    """Decode post text, returning (text, encoding used)."""
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    for encoding in TEXT_ENCODINGS:
        try:
            return raw.decode(encoding), encoding
        except UnicodeDecodeError:
            continue
    return raw.decode("utf-8", errors="replace"), "utf-8-replace"


def check_image(path: Path) -> str | None:
    """Return None if the image decodes, else the flag naming what is wrong.

    The size comes from the header first (no pixel is decoded for a bomb), then the file is
    decoded in JPEG draft mode (1/8 scale), which still reads every byte, so truncated files
    are caught for about a millisecond per image.
    """
    if not path.is_file():
        return "missing_image"
    try:
        with Image.open(path) as img:
            width, height = img.size
            if width * height > MAX_IMAGE_PIXELS or max(width, height) > MAX_IMAGE_ASPECT * max(1, min(width, height)):
                return "oversized_image"
            img.draft("RGB", (32, 32))
            img.load()
    except Image.DecompressionBombError:
        return "oversized_image"
    except Exception:  # PIL raises many types for bad files; all mean the same here
        return "corrupt_image"
    return None


def inside(root: Path, path: Path) -> bool:
    """Whether `path`, its links followed, lies in `root`: msa reads nothing outside the inputs it was given."""
    return Path(os.path.realpath(path)).is_relative_to(_real(root))


@functools.lru_cache(maxsize=8)
def _real(root: Path) -> str:
    """A data folder's real path, resolved once per read rather than once per file."""
    return os.path.realpath(root)


def read_label_file(path: Path, labelled: bool) -> list[tuple[str, str | None, int]]:
    """Parse a `guid,tag` file into (guid, label, line number) rows."""
    rows = []
    try:
        lines = path.read_bytes().decode("utf-8-sig").splitlines()
    except UnicodeDecodeError as err:
        line_no = path.read_bytes()[: err.start].count(b"\n") + 1
        raise DataError(f"{path}:{line_no}: not UTF-8 (byte {err.object[err.start]:#04x}); guids and labels "
                        "must be plain text") from None
    if not lines or [c.strip().lower() for c in lines[0].split(",")] != ["guid", "tag"]:
        raise DataError(f"{path}:1: expected the header 'guid,tag', got {lines[:1]!r}")
    for line_no, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 2 or not parts[0]:
            raise DataError(f"{path}:{line_no}: expected 'guid,tag', got {line!r}")
        guid, tag = parts
        if [guid.lower(), tag.lower()] == ["guid", "tag"]:
            raise DataError(f"{path}:{line_no}: a second header line (files joined together?); remove it")
        check_guid(guid, f"{path}:{line_no}")
        label: str | None = None
        if labelled:
            label = tag.lower()
            if label not in LABELS:
                raise DataError(
                    f"{path}:{line_no}: label {tag!r} is not one of {', '.join(LABELS)}"
                )
        rows.append((guid, label, line_no))
    return rows


def check_guid(guid: str, where: str) -> None:
    """A guid names files in data/: it must be a plain name, never a path out of the folder."""
    if guid.startswith(".") or any(c in guid for c in "/\\\0") or ".." in guid or not guid.isprintable():
        raise DataError(f"{where}: guid {guid!r} is not a plain file name (no '/', '\\', '..' or leading '.')")


def require_mvsa_folder(data_dir: Path) -> Path:
    """The folder, if it holds a train.txt or an original release's labelResultAll.txt (a command
    checks before it loads any model)."""
    data_dir = Path(data_dir)
    if not (data_dir / LABEL_FILES["train"]).is_file() and not (data_dir / RELEASE_FILE).is_file():
        raise DataError(f"{data_dir}: no {LABEL_FILES['train']} here (nor an original release's {RELEASE_FILE}); "
                        "is this an MVSA folder?")
    return data_dir


def listed_posts(data_dir: Path, report: ReadReport) -> Iterator[tuple[str, str | None, str, str]]:
    """(guid, label, source, FILE:LINE) of every listed post: train.txt and test_without_label.txt,
    or an original release's labelResultAll.txt with the field's rules applied."""
    if (data_dir / RELEASE_FILE).is_file() and not (data_dir / LABEL_FILES["train"]).is_file():
        yield from release_posts(data_dir / RELEASE_FILE, data_dir, report)
        return
    for source, file_name in LABEL_FILES.items():
        label_path = data_dir / file_name
        if not label_path.is_file():
            report.notes.append(f"{label_path}: not found, no {source} items")
            continue
        require_inside(data_dir, label_path)
        for guid, label, line_no in read_label_file(label_path, labelled=source == "train"):
            yield guid, label, source, f"{label_path}:{line_no}"


def release_posts(path: Path, data_dir: Path, report: ReadReport) -> Iterator[tuple[str, str, str, str]]:
    """The posts an original release keeps; those a rule drops are named in the bad items."""
    require_inside(data_dir, path)
    try:
        rows, dropped, layout = read_release_labels(path)
    except ReleaseError as err:
        raise DataError(str(err)) from None
    report.release = {"layout": layout, "posts": len(rows), "dropped": dict(dropped)}
    for guid, label, line_no, rule in rows:
        check_guid(guid, f"{path}:{line_no}")
        if rule:
            report.skipped.append(f"{guid}: {rule}")
            report.bad_items.append({"guid": guid, "where": f"{path}:{line_no}",
                                     "problem": f"{rule} ({RULES[rule]}), skipped"})
            continue
        yield guid, label, "train", f"{path}:{line_no}"


def require_inside(data_dir: Path, path: Path) -> None:
    if not inside(data_dir, path):
        raise DataError(f"{path}: a link to {os.path.realpath(path)}, outside {data_dir}; msa reads "
                        "only files inside the data folder")


def read_mvsa(data_dir: Path, on_bad_image: str = "blank", on_duplicate: str = "first-if-same"
              ) -> tuple[list[Item], ReadReport]:
    """Read every listed item of an MVSA folder.

    on_bad_image: `blank` keeps the item with a `bad_image` flag (encoders see a blank
    image), `skip` leaves it out, `fail` raises a DataError naming the file.
    on_duplicate: what a guid listed twice does (ON_DUPLICATE); kept duplicates are named
    in the report's bad items either way.
    """
    if on_bad_image not in ON_BAD_IMAGE:
        raise ConfigError(f"on_bad_image must be one of {ON_BAD_IMAGE}, got {on_bad_image!r}")
    if on_duplicate not in ON_DUPLICATE:
        raise ConfigError(f"on_duplicate must be one of {ON_DUPLICATE}, got {on_duplicate!r}")
    data_dir = require_mvsa_folder(data_dir)
    report = ReadReport()
    items: list[Item] = []
    first_seen: dict[str, tuple[str, str | None]] = {}  # guid -> (where, label)
    for guid, label, source, where in listed_posts(data_dir, report):
        if guid in first_seen:
            _duplicate(report, guid, label, where, *first_seen[guid], on_duplicate)
            continue
        first_seen[guid] = (where, label)
        item = _read_item(data_dir, guid, label, source, where)
        if label is not None and {"missing_text", "missing_image"} <= set(item.flags):
            # Nothing to learn from: a labelled post with neither file would train as a blank image
            # and an empty text. An unlabelled one is kept, so every listed guid gets a prediction.
            report.skipped.append(f"{guid}: no_files")
            report.bad_items.append({"guid": guid, "where": where,
                                     "problem": "no_files (neither data/GUID.txt nor data/GUID.jpg), skipped"})
            continue
        bad_image = bad_image_flag(item.flags)
        if bad_image and on_bad_image == "fail":
            raise DataError(f"{item.image_path}: {bad_image.replace('_', ' ')} (listed at {where})")
        if bad_image and on_bad_image == "skip":
            report.skipped.append(f"{guid}: {bad_image}")
            report.bad_items.append({"guid": guid, "where": where, "problem": f"{bad_image}, skipped"})
            continue
        report.bad_items += [{"guid": guid, "where": where, "problem": flag} for flag in item.flags]
        items.append(item)
    return items, described(report, items)


def described(report: ReadReport, items: list[Item]) -> ReadReport:
    """The report's counts and bad items for exactly these items (all read, or the first N of
    --limit); what the reader skipped or ignored stays as it is."""
    guids = {i.guid for i in items}
    flags = collections.Counter(flag for i in items for flag in i.flags)
    kept = [bad for bad in report.bad_items if bad["guid"] in guids or "skipped" in bad["problem"]]
    duplicates = sum(1 for bad in kept if bad["problem"].startswith("duplicate"))
    return dataclasses.replace(
        report, items_read=len(items), class_counts=dict(collections.Counter(i.label or "unlabelled" for i in items)),
        encodings=dict(collections.Counter(i.text_encoding for i in items)),
        flags={**dict(flags), **({"duplicate_guid": duplicates} if duplicates else {})}, bad_items=kept)


def _duplicate(report: ReadReport, guid: str, label: str | None, where: str, first_where: str,
               first_label: str | None, on_duplicate: str) -> None:
    """A guid listed again: stop (on_duplicate error, or conflicting labels unless `first`), or keep the first."""
    conflict = label != first_label
    if on_duplicate == "error" or (conflict and on_duplicate == "first-if-same"):
        what = f"with label {label or 'none'} (first at {first_where} as {first_label or 'unlabelled'})"
        raise DataError(f"{where}: guid {guid} is listed again {what}; remove one line, or keep the first "
                        "listing with --on-duplicate first")
    problem = f"duplicate guid (first at {first_where}){', conflicting label ' + str(label) if conflict else ''}"
    report.notes.append(f"{where}: {problem.replace('guid', f'guid {guid}', 1)}, ignored")
    report.bad_items.append({"guid": guid, "where": where, "problem": problem})
    report.flags["duplicate_guid"] = report.flags.get("duplicate_guid", 0) + 1


def write_bad_items(report: ReadReport, cache_dir: Path) -> Path:
    """Every bad item with its FILE:LINE, as CACHE/bad_items.csv (the summary shows the first few)."""
    path = Path(cache_dir) / BAD_ITEMS_FILE
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["guid", "where", "problem"])
        writer.writeheader()
        writer.writerows(report.bad_items)
    os.replace(tmp, path)
    return path


def _read_item(data_dir: Path, guid: str, label: str | None, source: str, where: str = "") -> Item:
    flags = []
    text_path = data_dir / "data" / f"{guid}.txt"
    if text_path.is_file() and not inside(data_dir, text_path):
        text, encoding = "", "none"
        flags.append("outside_text")  # a link out of the data folder: never read
    elif text_path.is_file():
        with open(text_path, "rb") as f:
            raw = f.read(MAX_TEXT_BYTES + 1)
        if len(raw) > MAX_TEXT_BYTES:
            raw = raw[:MAX_TEXT_BYTES].rsplit(b" ", 1)[0]  # at a space: never half of a character
            flags.append("long_text")
        text, encoding = decode_text(raw)
        text = " ".join(text.split())  # posts are one line; newlines and runs of spaces carry nothing
        if encoding == "utf-8-replace":
            flags.append("undecodable_text")
    else:
        text, encoding = "", "none"
        flags.append("missing_text")
    if not text and not {"missing_text", "outside_text"} & set(flags):
        flags.append("empty_text")
    image_path = data_dir / "data" / f"{guid}.jpg"
    image_problem = "outside_image" if image_path.exists() and not inside(data_dir, image_path) \
        else check_image(image_path)
    if image_problem:
        flags.append(image_problem)
    return Item(guid, label, text, encoding, str(image_path.resolve()), flags, source, where)
