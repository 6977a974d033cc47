"""Stage 1 throughput on real data, in two parts (the figures in the README come from here).

1. The whole `msa extract` against the bare forward pass of the same encoders on the
   same inputs: decoding, tokenising and writing should hide behind the encoders.
2. The encoders themselves in each precision / layout / compile variant, with the
   mean cosine similarity of each variant's pooled features to plain fp32.

    python bench/extract_throughput.py --data ../shared/datasets/mvsa-lab5 \
        --text-model ~/.cache/msa/offline-models/all-mpnet-base-v2 \
        --image-model timm:tf_efficientnet_lite0 \
        --image-weights ~/.cache/msa/offline-models/tf_efficientnet_lite0.pth
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from msa.cache.features import FeatureSet
from msa.core.compute import Compute, encoding_streams, in_cpu_streams
from msa.core.config import ExtractConfig
from msa.data.mvsa import read_mvsa
from msa.models.image import build_image_encoder
from msa.models.modalities.text import WRITE_WINDOW
from msa.models.text import TextEncoder
from msa.stages import extract
from msa.training import autotune
from msa.training.autotune import Variant


def cosine(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    x, y = torch.cat(a).float(), torch.cat(b).float()
    return torch.nn.functional.cosine_similarity(x, y, dim=1).mean().item()


def image_variants(args, paths: list[str]) -> dict:
    encoder = build_image_encoder(args.image_model, args.image_weights)
    preprocess = encoder.preprocess
    start = time.perf_counter()
    pixels = preprocess.load_batch(paths)
    decode_draft = len(paths) / (time.perf_counter() - start)
    start = time.perf_counter()
    for p in paths[:64]:
        with Image.open(p) as img:
            img.convert("RGB").resize((preprocess.resize, preprocess.resize))
    decode_full = 64 / (time.perf_counter() - start)
    images = preprocess.normalise(pixels)
    batches = [b.contiguous() for b in images.split(args.batch_size)]
    results = {"decode + resize img/s (as extract)": decode_draft, "decode + resize img/s (PIL, full)": decode_full}
    reference = None
    channels_last = [b.contiguous(memory_format=torch.channels_last) for b in batches]
    variants = [("fp32", False, False), ("fp32 channels_last", True, False), ("bf16 channels_last", True, False),
                ("fp32 channels_last compile", True, True), ("bf16 channels_last compile", True, True)]
    for name, use_cl, use_compile in variants:
        model = encoder.to(memory_format=torch.channels_last if use_cl else torch.contiguous_format)
        torch._dynamo.reset()  # each compile starts clean, not from guards of an earlier model
        forward = torch.compile(model, dynamic=False) if use_compile else model
        precision = "bf16" if name.startswith("bf16") else "fp32"
        compile_start = time.perf_counter()
        if use_compile:
            with torch.inference_mode():
                forward(channels_last[0])
        compile_seconds = time.perf_counter() - compile_start

        def run(x, forward=forward, precision=precision):
            return _with(precision, forward, x)[1]

        rate, pooled = streamed_rate(run, channels_last if use_cl else batches)
        reference = reference or pooled
        results[name] = {"img/s": rate, "cosine_to_fp32": cosine(pooled, reference)}
        if use_compile:
            results[name]["compile_s"] = compile_seconds
    return results


def auto_verdict(results: dict, auto_variant: str, rate_key: str, items: int) -> dict:
    """Which variant `--precision auto` chose here (part 1's extract measured it), the fastest
    for encoding `items` (part 1's count; compile time counted, as auto counts it), and whether
    they are the same (or within 5%). Variants further than cosine 0.999 from fp32 do not count."""
    seconds = {name: items / r[rate_key] + r.get("compile_s", 0.0) for name, r in results.items()
               if isinstance(r, dict) and rate_key in r and r["cosine_to_fp32"] >= autotune.MIN_COSINE}
    fastest = min(seconds, key=seconds.get)
    return {"auto runs": auto_variant, f"fastest for {items} items": fastest,
            "seconds": {name: round(s, 2) for name, s in seconds.items()},
            "auto is fastest (within 5%)": seconds[auto_variant] <= 1.05 * seconds[fastest]}


def pad_to(batch: tuple[torch.Tensor, torch.Tensor], length: int, encoder: TextEncoder):
    """Pad (input_ids, attention_mask) to a fixed length, as a naive pipeline does."""
    input_ids, mask = batch
    extra = length - input_ids.shape[1]
    pad_id = encoder.tokenizer.pad_token_id or 0
    return torch.nn.functional.pad(input_ids, (0, extra), value=pad_id), torch.nn.functional.pad(mask, (0, extra))


def text_variants(args, texts: list[str]) -> dict:
    encoder = TextEncoder(args.text_model, args.max_len)
    ids = encoder.tokenize(texts)
    results = {}
    reference = None
    batches = encoder.length_sorted_batches(ids, args.batch_size)
    order = np.concatenate(batches)
    sorted_batches = [encoder.collate([ids[j] for j in batch]) for batch in batches]
    padded_batches = [pad_to(encoder.collate(ids[i: i + args.batch_size]), args.max_len, encoder)
                      for i in range(0, len(ids), args.batch_size)]
    inverse = np.argsort(order)
    for name, batches, precision in [("padded fp32", padded_batches, "fp32"),
                                     ("length-sorted fp32", sorted_batches, "fp32"),
                                     ("length-sorted bf16", sorted_batches, "bf16")]:
        def run(batch, precision=precision):
            return _with(precision, encoder, *batch)[1]

        rate, pooled = streamed_rate(run, batches)
        if name.startswith("length-sorted"):
            pooled = [torch.cat(pooled)[torch.from_numpy(inverse)]]
        reference = reference or pooled
        results[name] = {"texts/s": rate, "cosine_to_fp32": cosine(pooled, reference)}
    return results


def whole_extract(args, n: int) -> dict:
    """Default settings, a fresh cache and a fresh decisions file (so --precision auto measures
    here and now); steady rate measured after the first batch (warm-up, compile)."""
    stamps: dict[str, list[tuple[float, int]]] = {"text": [], "image": []}

    def on_batch(modality: str, rows: int) -> None:
        stamps[modality].append((time.perf_counter(), rows))

    torch._dynamo.reset()
    with tempfile.TemporaryDirectory() as cache:
        os.environ[autotune.DECISIONS_ENV] = str(Path(cache) / "autotune.json")
        cfg = ExtractConfig(data=args.data, cache=Path(cache), text_model=args.text_model, max_len=args.max_len,
                            image_model=args.image_model, image_weights=args.image_weights,
                            batch_size=args.batch_size, limit=n)
        start = time.perf_counter()
        result = extract.run(cfg, show_progress=False, on_batch=on_batch)
        total = time.perf_counter() - start
        decisions = {m: FeatureSet.open(r.path).notes.get("autotune") for m, r in result.feature_sets.items()}
        start = time.perf_counter()
        extract.run(cfg, show_progress=False)
        second = time.perf_counter() - start
    out = {"items": n, "seconds_total": total, "seconds_second_run": second}
    for modality, marks in stamps.items():
        (t0, _), (t1, _) = marks[0], marks[-1]
        rows = sum(r for _, r in marks[1:])
        out[modality] = {"items/s steady": rows / (t1 - t0), "seconds": result.feature_sets[modality].seconds,
                         "auto chose": decisions[modality]}
    return out


def bare_forward(args, n: int, texts: list[str], paths: list[str], text_variant: Variant,
                 image_variant: Variant) -> dict:
    """The encoders alone, in the variants extract chose, on pre-decoded, pre-tokenised inputs:
    in the CPU streams extract runs them in, and as one stream of every thread."""
    text_encoder = TextEncoder(args.text_model, args.max_len)
    ids = text_encoder.tokenize(texts[:n])
    text_batches = [text_encoder.collate([ids[j] for j in batch])
                    for batch in text_encoder.length_sorted_batches(ids, args.batch_size)]
    image_encoder = build_image_encoder(args.image_model, args.image_weights).to(memory_format=torch.channels_last)
    torch._dynamo.reset()
    forward = torch.compile(image_encoder, dynamic=False) if image_variant.compile else image_encoder
    pixels = image_encoder.preprocess.load_batch(paths[:n])
    images = [image_encoder.preprocess.normalise(b) for b in pixels.split(args.batch_size)]
    cpu = torch.device("cpu")
    report = {}
    for modality, fn, batches, streams in (
            ("text", lambda b: _with(text_variant.precision, text_encoder, *b)[1], text_batches,
             encoding_streams(Compute(cpu, text_variant.precision))),
            ("image", lambda x: _with(image_variant.precision, forward, x)[1], images,
             encoding_streams(Compute(cpu, image_variant.precision), image_variant.compile))):
        report[f"{modality} items/s"], _ = streamed_rate(fn, batches, streams)
        report[f"{modality} streams"] = streams
        report[f"{modality} items/s, one stream of every thread"], _ = streamed_rate(fn, batches)
    return report


def streamed_rate(fn, batches: list, streams: int = 1) -> tuple[float, list[torch.Tensor]]:
    """Items per second of fn over batches in `streams` CPU streams (1: one stream of every
    thread), after a warm-up; and the pooled outputs."""
    list(in_cpu_streams(fn, batches[:streams], streams))
    start = time.perf_counter()
    outputs = list(in_cpu_streams(fn, batches, streams))
    return sum(len(pooled) for pooled in outputs) / (time.perf_counter() - start), outputs


def _with(precision: str, fn, *inputs):
    with torch.inference_mode(), Compute(torch.device("cpu"), precision).autocast():  # per thread: in each stream
        return fn(*inputs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--text-model", required=True)
    parser.add_argument("--image-model", required=True)
    parser.add_argument("--image-weights")
    parser.add_argument("--max-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--variants-n", type=int, default=256, help="items per encoder variant")
    parser.add_argument("--extract-n", type=int, default=1024, help="items for the whole-extract comparison")
    parser.add_argument("--out", type=Path, help="also write the figures here as JSON")
    parser.add_argument("--part-1-only", action="store_true", help="the whole extract against the bare forward")
    args = parser.parse_args()
    if args.extract_n <= WRITE_WINDOW:  # texts are written, and so timed, a window at a time
        parser.error(f"--extract-n must be over {WRITE_WINDOW}: the steady text rate needs two windows")

    items, _ = read_mvsa(args.data)
    texts = [i.text for i in items]
    paths = [i.image_path for i in items if not i.flags]
    report = {"machine": autotune.machine_key()}
    print(f"machine: {report['machine']}", flush=True)

    # Part 1 first: its extract measures the variants (--precision auto) on a fresh decisions file.
    whole = whole_extract(args, args.extract_n)
    chosen = {m: Variant.parse(whole[m]["auto chose"]["variant"]) for m in ("text", "image")}
    print(f"--precision auto chose: text {chosen['text'].name}, image {chosen['image'].name}", flush=True)
    bare = bare_forward(args, args.extract_n, texts, paths, chosen["text"], chosen["image"])
    report["part 1: whole extract"] = whole
    report["part 1: bare forward"] = bare
    report["part 1: ratio"] = {
        "text": whole["text"]["items/s steady"] / bare["text items/s"],
        "image": whole["image"]["items/s steady"] / bare["image items/s"],
        **{f"{m}, to one stream of every thread": (whole[m]["items/s steady"]
                                                   / bare[f"{m} items/s, one stream of every thread"])
           for m in ("text", "image")},
    }
    print(json.dumps({k: report[k] for k in report if k.startswith("part 1")}, indent=1), flush=True)
    if args.part_1_only:
        if args.out:
            args.out.write_text(json.dumps(report, indent=1))
        return

    image = image_variants(args, paths[: args.variants_n])
    image_name = f"{chosen['image'].precision} channels_last" + (" compile" if chosen["image"].compile else "")
    image["verdict"] = auto_verdict(image, image_name, "img/s", args.extract_n)
    report["part 2: image encoder"] = image
    print(json.dumps(image, indent=1), flush=True)
    text = text_variants(args, texts[: args.variants_n])
    text["verdict"] = auto_verdict(text, f"length-sorted {chosen['text'].precision}", "texts/s", args.extract_n)
    report["part 2: text encoder"] = text
    print(json.dumps(text, indent=1), flush=True)
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
