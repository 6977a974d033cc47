"""The original MVSA releases (Niu et al., MMM 2016) as they are distributed: `labelResultAll.txt`
beside `data/ID.txt|jpg`, each line an ID and one `text,image` label pair per annotator (one in
MVSA-Single, three in MVSA-Multiple).

The field's published rules (Xu & Mao, "MultiSentiNet", CIKM 2017; Xu, Mao & Chen, "A Co-Memory
Network for Multimodal Sentiment Analysis", SIGIR 2018; followed by MVAN, CLMLF and others, whose
tables report 4,511 Single and 17,024 Multiple pairs after them) turn those pairs into one label:

- Multiple: each modality's label is the one at least two of the three annotators gave; a post
  where the annotators all differ on its text or on its image is dropped.
- Then, for both: text and image agreeing give that label; one neutral and the other positive or
  negative give the latter; positive against negative is a conflict, and the post is dropped.
"""

from __future__ import annotations

import collections
from pathlib import Path

RELEASE_FILE = "labelResultAll.txt"
POLARITIES = ("negative", "neutral", "positive")
RULES = {  # what each rule drops, as the read report names it
    "no_majority": "annotators all differ on the text or the image label (Multiple's majority vote)",
    "conflict": "text and image labels conflict, positive against negative",
}


class ReleaseError(ValueError):
    """A line of labelResultAll.txt msa cannot read; the message names the file and line."""


def merged_label(text: str, image: str) -> str | None:
    """One post's label from its text and image labels (None: a conflict, dropped)."""
    if text == image:
        return text
    if "neutral" in (text, image):
        return image if text == "neutral" else text
    return None


def majority(labels: list[str]) -> str | None:
    """The label at least two of three annotators gave (None: all differ)."""
    label, count = collections.Counter(labels).most_common(1)[0]
    return label if count * 2 > len(labels) else None


def read_release_labels(path: Path) -> tuple[list[tuple[str, str | None, int, str | None]], collections.Counter, str]:
    """(guid, label, line number, the rule that dropped it or None) per line, how many each rule
    dropped, and the layout ("MVSA-Single" or "MVSA-Multiple")."""
    lines = Path(path).read_bytes().decode("utf-8-sig", errors="replace").splitlines()
    header = lines[0].split("\t") if lines else []
    if len(header) < 2 or header[0].strip().lower() != "id" or any(
            c.strip().lower() != "text,image" for c in header[1:]):
        raise ReleaseError(f"{path}:1: expected the header 'ID<tab>text,image' (one text,image per annotator), "
                           f"got {lines[:1]!r}")
    annotators = len(header) - 1
    rows, dropped = [], collections.Counter()
    for line_no, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        cells = line.split("\t")
        if len(cells) != annotators + 1:
            raise ReleaseError(f"{path}:{line_no}: expected an ID and {annotators} text,image pairs, got {line!r}")
        pairs = [[p.strip().lower() for p in cell.split(",")] for cell in cells[1:]]
        if any(len(p) != 2 or not set(p) <= set(POLARITIES) for p in pairs):
            raise ReleaseError(f"{path}:{line_no}: labels must be text,image pairs of {', '.join(POLARITIES)}; "
                               f"got {line!r}")
        text, image = (majority([p[i] for p in pairs]) for i in (0, 1))
        if text is None or image is None:
            dropped["no_majority"] += 1
            rows.append((cells[0].strip(), None, line_no, "no_majority"))
            continue
        label = merged_label(text, image)
        if label is None:
            dropped["conflict"] += 1
        rows.append((cells[0].strip(), label, line_no, None if label else "conflict"))
    return rows, dropped, "MVSA-Single" if annotators == 1 else "MVSA-Multiple"
