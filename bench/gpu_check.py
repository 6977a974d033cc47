"""On a CUDA machine: stage 1 and fine-tuning at the GPU's speed, against this project's CPU
figures. Runs extract with its auto precision, caption at fp16 with a large batch (a
random-init BLIP-base: no BLIP weights exist offline; speed does not depend on them) and
one epoch of finetune with AMP, each on the first N items, and prints items per second.

    python bench/gpu_check.py --data ../shared/datasets/mvsa-lab5 \
        --models ~/.cache/msa/offline-models [--limit 1024] [--json gpu.json]

Needs the offline models (all-mpnet-base-v2, tf_efficientnet_lite0.pth; MiniLM's vocabulary
for the BLIP tokenizer). Without a CUDA device it says so and stops.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

# The CPU figures in the README (AMD EPYC with AVX512-BF16, 2 cores, auto precision bf16).
CPU_FIGURES = {"extract text (mpnet)": 96.2, "extract image (lite0)": 262.6, "caption": 3.95,
               "finetune epoch (LoRA late)": 2800 / 87}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--models", type=Path, required=True)
    parser.add_argument("--limit", type=int, default=1024)
    parser.add_argument("--caption-batch", type=int, default=64)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("no CUDA device here: bench/gpu_check.py measures a GPU (the CPU figures are in the README)")

    from caption_throughput import make_random_blip_base

    from msa.pipeline.config import CaptionConfig, ExtractConfig, FinetuneConfig
    from msa.stages import caption, extract, finetune

    card = torch.cuda.get_device_name(0)
    rates = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        common = {"data": args.data, "limit": args.limit, "device": "cuda"}
        for modality, name in (("text", "extract text (mpnet)"), ("image", "extract image (lite0)")):
            cfg = ExtractConfig(cache=tmp / f"cache-{modality}", text_model=str(args.models / "all-mpnet-base-v2"),
                                image_model="timm:tf_efficientnet_lite0",
                                image_weights=str(args.models / "tf_efficientnet_lite0.pth"), modalities=(modality,),
                                batch_size=128, **common)
            result = extract.run(cfg, show_progress=False).feature_sets[modality]
            rates[name] = result.encoded_rows / result.seconds
        blip = make_random_blip_base(tmp / "blip", args.models / "all-MiniLM-L6-v2" / "vocab.txt")
        captioned = caption.run(CaptionConfig(cache=tmp / "cache-caption", model=str(blip), precision="fp16",
                                              batch_size=args.caption_batch, **common), show_progress=False)
        rates["caption"] = captioned.captioned / captioned.seconds
        start = time.perf_counter()
        finetune.run(FinetuneConfig(out=tmp / "ft", text_model=str(args.models / "all-mpnet-base-v2"),
                                    image_model="timm:tf_efficientnet_lite0",
                                    image_weights=str(args.models / "tf_efficientnet_lite0.pth"), fusion="late",
                                    lora_rank=8, unfreeze_text_layers=0, unfreeze_image_stages=0, lr_encoder=3e-4,
                                    epochs=1, batch_size=32, precision="auto", **common),
                     show_progress=False, log=lambda *_: None)
        rates["finetune epoch (LoRA late)"] = args.limit / (time.perf_counter() - start)  # train + val, with loading
    print(f"GPU: {card}, torch {torch.__version__}, first {args.limit} items")
    print("| work | GPU items/s | CPU items/s (README) | GPU / CPU |")
    print("|---|---|---|---|")
    for name, rate in rates.items():
        print(f"| {name} | {rate:.1f} | {CPU_FIGURES[name]:.1f} | {rate / CPU_FIGURES[name]:.1f}x |")
    if args.json:
        args.json.write_text(json.dumps({"card": card, "limit": args.limit, "rates": rates}, indent=1))


if __name__ == "__main__":
    main()
