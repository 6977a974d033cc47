"""What the cache's integrity checks cost: fletcher32 chunks, the read-back digest at publish,
and the flag check on open, against a writer without them, on feature sets of MVSA's shape;
loading as train-head loads (FeatureBank.load, tokens included).

    python bench/cache_integrity.py [--rows 4011] [--text-rate 24.8] [--image-rate 61.3]

The rates are extract's items/s on the same machine (bench/extract_throughput.py), to put
the overhead next to the encoding it rides on. Both writers get the same batches of 32 rows.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch

from msa.cache.features import CHUNK_BYTES, FeatureSet
from msa.cache.writer import FeatureWriter
from msa.training.bank import FeatureBank

SHAPES = {"text": (128, 768), "image": (49, 1280)}  # all-mpnet-base-v2 at max_len 128; EfficientNet-Lite0 at 224 px


def batches(rows: int, tokens: tuple[int, int], batch: int = 32):
    rng = np.random.default_rng(0)
    length, dim = tokens
    block = rng.standard_normal((batch, length, dim)).astype(np.float16)
    for start in range(0, rows, batch):
        index = np.arange(start, min(rows, start + batch))
        yield index, block[: len(index)].mean(1), block[: len(index)], np.ones((len(index), length), dtype=bool)


def with_checks(path: Path, rows: int, tokens: tuple[int, int]) -> dict:
    start = time.perf_counter()
    writer = FeatureWriter(path, {"bench": True}, [str(i) for i in range(rows)], np.arange(rows))
    for index, pooled, token, mask in batches(rows, tokens):
        writer.write(index, pooled, token, mask)
    written = time.perf_counter()
    writer.finish()
    return {"write_s": written - start, "publish_s": time.perf_counter() - written}


def without_checks(path: Path, rows: int, tokens: tuple[int, int]) -> dict:
    """The writer before checksums: default chunk cache, no fletcher32, no read-back."""
    length, dim = tokens
    start = time.perf_counter()
    with h5py.File(path, "w") as f:
        f.create_dataset("guid", data=np.array([str(i) for i in range(rows)], dtype=object),
                         dtype=h5py.string_dtype())
        done = f.create_dataset("done", data=np.zeros(rows, dtype=np.uint8))
        chunk_rows = max(1, min(rows, CHUNK_BYTES // (length * dim * 2)))
        pooled_set = f.create_dataset("pooled", (rows, dim), np.float16, chunks=(min(rows, 256), dim))
        token_set = f.create_dataset("tokens", (rows, length, dim), np.float16, chunks=(chunk_rows, length, dim))
        mask_set = f.create_dataset("mask", (rows, length), bool, chunks=(min(rows, 1024), length))
        for index, pooled, token, mask in batches(rows, tokens):
            pooled_set[index] = pooled
            token_set[index] = token
            mask_set[index] = mask
            done[index] = 1
            f.flush()
    return {"write_s": time.perf_counter() - start, "publish_s": 0.0}


def load_seconds(path: Path, checked: bool, repeats: int = 3) -> float:
    """Best of `repeats` loads as train-head does them (FeatureBank.load of every part, float32
    tokens), the file in the page cache. checked: through FeatureSet.open, which checks the flags
    and digest first; else a FeatureSet made by hand, as before the checks."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        if checked:
            feature_set = FeatureSet.open(path)
        else:
            with h5py.File(path, "r") as f:
                shapes = {part: f[part].shape for part in ("pooled", "tokens", "mask")}
                feature_set = FeatureSet(path, {}, f["guid"].asstr()[:].tolist(), shapes)
        FeatureBank.load({"m": feature_set}, with_tokens=True)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=4011)
    parser.add_argument("--text-rate", type=float, default=24.8, help="extract's text items/s on this machine")
    parser.add_argument("--image-rate", type=float, default=61.3, help="extract's image items/s on this machine")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rates = {"text": args.text_rate, "image": args.image_rate}
    report = {"machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}", "rows": args.rows}
    print(f"{'set':<6} {'checks':<7} {'write s':>8} {'publish s':>10} {'load s':>7} {'extract s':>10} "
          f"{'write+publish overhead':>23} {'load overhead':>14}")
    for modality, tokens in SHAPES.items():
        with tempfile.TemporaryDirectory() as tmp:
            plain, checked = Path(tmp) / "plain.h5", Path(tmp) / "features" / "checked.h5"
            figures = {"off": without_checks(plain, args.rows, tokens), "on": with_checks(checked, args.rows, tokens)}
            figures["off"]["load_s"] = load_seconds(plain, False)
            figures["on"]["load_s"] = load_seconds(checked, True)
        extract_s = args.rows / rates[modality]
        extra_write = (figures["on"]["write_s"] + figures["on"]["publish_s"]) - figures["off"]["write_s"]
        extra_load = figures["on"]["load_s"] / figures["off"]["load_s"] - 1
        report[modality] = {**figures, "extract_s": extract_s, "write_overhead_of_extract": extra_write / extract_s,
                            "load_overhead": extra_load}
        for state in ("off", "on"):
            f = figures[state]
            overheads = (f"{extra_write:+.2f} s = {extra_write / extract_s:+.1%}", f"{extra_load:+.1%}") \
                if state == "on" else ("", "")
            print(f"{modality:<6} {state:<7} {f['write_s']:>8.2f} {f['publish_s']:>10.2f} {f['load_s']:>7.2f} "
                  f"{extract_s:>10.0f} {overheads[0]:>23} {overheads[1]:>14}")
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
