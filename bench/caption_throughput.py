"""Captioning throughput of `msa caption` on real images (the README's caption figures come from here).

Part 1 runs the whole stage in each variant; part 2 times the ViT encoder alone (eager,
compiled, dynamic int8), which is what bounds batching on a CPU.

No BLIP weights can be had offline, so the model is a random-init BLIP of the
blip-image-captioning-base architecture (ViT-B/16 at 384 px, 12-layer BERT decoder) with
the bert-base-uncased vocabulary; speed does not depend on the weights. Each variant runs
the whole stage (decoding, generation, the caption store) on the first N images:

    python bench/caption_throughput.py --data ../shared/datasets/mvsa-lab5 \
        --vocab ~/.cache/msa/offline-models/all-MiniLM-L6-v2/vocab.txt --out bench/results/caption.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from msa.core.config import CaptionConfig
from msa.stages import caption
from msa.training import autotune


def make_random_blip_base(path: Path, vocab: Path) -> Path:
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    torch.manual_seed(0)
    # transformers 5's BertTokenizer takes the vocabulary as a dict (vocab_file= leaves it empty)
    words = {line.rstrip("\n"): i for i, line in enumerate(vocab.read_text(encoding="utf-8").splitlines(True))}
    tokenizer = BertTokenizer(vocab=words)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})  # BLIP's decoder start token, id 30522
    BlipForConditionalGeneration(BlipConfig()).save_pretrained(path)  # the defaults are blip-...-base's shapes
    BlipProcessor(BlipImageProcessor(size={"height": 384, "width": 384}), tokenizer).save_pretrained(path)
    return path


def timed_run(cfg: CaptionConfig) -> dict:
    """captions/s over the whole run, and after its first batch (compile and warm-up excluded)."""
    marks = []
    start = time.perf_counter()
    result = caption.run(cfg, show_progress=False, on_batch=lambda n: marks.append((time.perf_counter(), n)))
    total = time.perf_counter() - start
    after_first = sum(n for _, n in marks[1:]) / (marks[-1][0] - marks[0][0]) if len(marks) > 1 else None
    words = [len(c.text.split()) for c in result.caption_set.captions.values() if c.text]
    return {"images": result.captioned, "seconds": round(total, 1), "captions/s": round(result.captioned / total, 3),
            "captions/s after first batch": after_first and round(after_first, 3),
            "precision": result.caption_set.notes["precision"],
            "mean words per caption": round(sum(words) / max(len(words), 1), 1)}


def vision_alone(model_dir: Path, batch: int = 16) -> dict:
    """Images/s of BLIP's vision encoder on one batch, after a warm-up pass (which compiles)."""
    from transformers import BlipForConditionalGeneration

    model = BlipForConditionalGeneration.from_pretrained(model_dir).eval()
    pixels = torch.randn(batch, 3, 384, 384)

    def rate(vision) -> float:
        with torch.inference_mode():
            vision(pixel_values=pixels)
            start = time.perf_counter()
            vision(pixel_values=pixels)
        return round(batch / (time.perf_counter() - start), 2)

    eager = rate(model.vision_model)
    quantized = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    int8 = rate(quantized.vision_model)
    return {"eager fp32": eager, "dynamic int8": int8,
            "compiled fp32": rate(torch.compile(model.vision_model, dynamic=False)),
            "compiled int8": rate(torch.compile(quantized.vision_model, dynamic=False))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--vocab", type=Path, required=True, help="a bert-base-uncased vocab.txt")
    parser.add_argument("--single-n", type=int, default=24, help="images for one-at-a-time")
    parser.add_argument("--batched-n", type=int, default=256, help="images for each batched variant")
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--out", type=Path, help="also write the figures here as JSON")
    parser.add_argument("--precision-only", action="store_true",
                        help="only batch 16 in fp32, bf16 weights and --precision auto (with the verdict)")
    args = parser.parse_args()

    report = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
                         f"torch {torch.__version__}", "max_new_tokens": args.max_new_tokens}
    print(report["machine"], flush=True)
    precisions = {
        "batch 16 greedy, fp32": dict(batch_size=16, compile=False, limit=args.batched_n // 4),
        "batch 16 greedy, bf16 weights": dict(batch_size=16, compile=False, limit=args.batched_n // 4,
                                              precision="bf16"),
        "batch 16 greedy, --precision auto": dict(batch_size=16, compile=False, limit=args.batched_n // 4,
                                                  precision="auto"),
    }
    variants = precisions if args.precision_only else {
        "one at a time, fp32": dict(batch_size=1, compile=False, limit=args.single_n),
        "batch 16 greedy, fp32": dict(batch_size=16, compile=False, limit=args.batched_n // 4),
        "batch 16 greedy, fp32, compiled ViT (the default from 200 images)": dict(batch_size=16, compile=True,
                                                                                   limit=args.batched_n),
        "batch 16 beam 3, fp32, compiled ViT": dict(batch_size=16, compile=True, num_beams=3,
                                                    limit=args.batched_n // 4),
        **{k: v for k, v in precisions.items() if k != "batch 16 greedy, fp32"},
    }
    with tempfile.TemporaryDirectory() as tmp:
        os.environ[autotune.DECISIONS_ENV] = str(Path(tmp) / "autotune.json")  # auto measures here and now
        model = make_random_blip_base(Path(tmp) / "blip-base-random", args.vocab)
        for i, (label, options) in enumerate(variants.items()):
            options = {"precision": "fp32", **options}
            cfg = CaptionConfig(data=args.data, cache=Path(tmp) / f"cache-{i}", model=str(model), device="cpu",
                                max_new_tokens=args.max_new_tokens, **options)
            report[label] = timed_run(cfg)
            print(label, json.dumps(report[label]), flush=True)
        if not args.precision_only:
            report["part 2: vision encoder alone, img/s at batch 16"] = vision_alone(model)
            print(json.dumps(report["part 2: vision encoder alone, img/s at batch 16"]), flush=True)
    rates = {p: report[label]["captions/s after first batch"] for p, label in
             (("fp32", "batch 16 greedy, fp32"), ("bf16", "batch 16 greedy, bf16 weights"))}
    chosen = report["batch 16 greedy, --precision auto"]["precision"]
    report["verdict"] = {"auto chose": chosen, "fastest": max(rates, key=rates.get),
                         "auto is fastest (within 5%)": rates[chosen] >= 0.95 * max(rates.values())}
    print(json.dumps(report["verdict"]), flush=True)
    if args.precision_only:
        return
    single = report["one at a time, fp32"]["captions/s"]
    report["speed-up over one at a time"] = {k: round(v["captions/s"] / single, 2) for k, v in report.items()
                                             if isinstance(v, dict) and "captions/s" in v}
    print(json.dumps(report["speed-up over one at a time"], indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
