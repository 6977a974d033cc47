"""A stand-in for MVSA where the data cannot go (the device machine takes 64 MiB): N image+text
pairs with the first N MVSA items' image sizes, about their JPEG bytes per pixel (so about
their decoding time) and their words per text. Pixels, words and labels are synthetic: for
timing only, never for quality.

    python bench/standin_data.py shapes --like ../shared/datasets/mvsa-lab5 --n 1024 --out shapes.json
    python bench/standin_data.py make --shapes shapes.json --out /tmp/mvsa-standin [--items 4096]

The first writes sizes and counts only (no pixel or word of the data); the second builds the
data set from them where it is needed.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from msa.data.mvsa import LABELS

# Smooth colour fields plus noise of this strength, saved at this quality, come out at
# 0.15 bytes a pixel, as MVSA's photos do (0.151 over the first 1,100).
NOISE, QUALITY, CELL = 3.0, 85, 24
WORDS = ("day", "great", "sad", "city", "game", "love", "rain", "news", "team", "food", "home", "night",
         "happy", "bad", "today", "people", "music", "light", "road", "match")


def shapes(like: Path, n: int) -> list[dict]:
    paths = sorted((like / "data").glob("*.jpg"), key=lambda p: (len(p.stem), p.stem))[:n]
    rows = []
    for path in paths:
        with Image.open(path) as image:
            width, height = image.size
        text = path.with_suffix(".txt")
        words = len(text.read_bytes().split()) if text.is_file() else 0
        rows.append({"width": width, "height": height, "bytes": path.stat().st_size, "words": words})
    return rows


def make(rows: list[dict], out: Path, items: int | None = None, seed: int = 0) -> Path:
    """The stand-in of `rows`; with `items` beyond them, the first items' files again (a
    throughput run on more items than there are shapes)."""
    rng = np.random.default_rng(seed)
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    items = items or len(rows)
    for i, row in enumerate(rows[:items], start=1):
        width, height = row["width"], row["height"]
        coarse = rng.integers(0, 256, (max(2, height // CELL), max(2, width // CELL), 3), dtype=np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), np.float32)
        pixels = (smooth + rng.normal(0, NOISE, smooth.shape)).clip(0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(data / f"{i}.jpg", quality=QUALITY)
        (data / f"{i}.txt").write_text(" ".join(rng.choice(WORDS, size=max(1, row["words"]))) + "\n", encoding="utf-8")
    for i in range(len(rows) + 1, items + 1):
        for suffix in (".jpg", ".txt"):
            shutil.copyfile(data / f"{(i - 1) % len(rows) + 1}{suffix}", data / f"{i}{suffix}")
    labels = rng.choice(LABELS, size=items, p=[0.3, 0.2, 0.5])
    lines = [f"{i},{label}" for i, label in enumerate(labels, start=1)]
    (out / "train.txt").write_text("guid,tag\n" + "\n".join(lines) + "\n")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    measure = commands.add_parser("shapes", help="image sizes, bytes and words per text of the first N items")
    measure.add_argument("--like", type=Path, required=True)
    measure.add_argument("--n", type=int, default=1024)
    measure.add_argument("--out", type=Path, required=True)
    build = commands.add_parser("make", help="a stand-in data set from those shapes")
    build.add_argument("--shapes", type=Path, required=True)
    build.add_argument("--out", type=Path, required=True)
    build.add_argument("--items", type=int, help="more items than shapes: the first ones' files again")
    args = parser.parse_args()
    if args.command == "shapes":
        args.out.write_text(json.dumps(shapes(args.like, args.n)))
    else:
        rows = json.loads(args.shapes.read_text())
        make(rows, args.out, args.items)
        rows = rows[: args.items or len(rows)]
        made = sum((args.out / "data" / f"{i}.jpg").stat().st_size for i in range(1, len(rows) + 1))
        pixels = sum(r["width"] * r["height"] for r in rows)
        print(f"{len(rows)} stand-in items in {args.out}: {made / pixels:.3f} bytes a pixel "
              f"(the originals {sum(r['bytes'] for r in rows) / pixels:.3f})")


if __name__ == "__main__":
    main()
