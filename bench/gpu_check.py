"""On a CUDA machine: stage 1 and fine-tuning at the GPU's speed, against this project's CPU
figures, and the image path of `msa extract` against the bare forward pass of its encoder.

Runs extract (auto precision: bf16 on a GPU that has it), caption at fp16 with a large batch
(a random-init BLIP-base: no BLIP weights exist offline; speed does not depend on them) and
one epoch of finetune, each on the first N items, and prints items per second. The image
extract runs twice, decoded on the CPU by a thread per core and decoded on the device
(nvJPEG batches, the threads only reading files), each against the bare bf16 forward pass on
the same images, decoded beforehand, with the cosine of the two decodes' features; the text
extract and the caption run against their bare forward / generate.

    python bench/gpu_check.py --data DATA --models MODELS [--random-text-encoder] [--limit 1024] [--json F]

MODELS holds all-mpnet-base-v2 (with --random-text-encoder its config and tokenizer are
enough: the weights are drawn at random, same shapes, same work), tf_efficientnet_lite0.pth
and all-MiniLM-L6-v2/vocab.txt (the BLIP tokenizer's vocabulary). Without a CUDA device it
says so and stops. Where the data set cannot go, bench/standin_data.py makes one with its
image sizes, JPEG bytes per pixel and text lengths.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

# The CPU figures in the README (AMD EPYC with AVX512-BF16, 2 cores, auto precision bf16):
# whole extract of 1,024 items, and caption with bf16 weights at batch 16. No CPU run of the
# same finetune exists to set beside it.
CPU_FIGURES = {"extract text (mpnet)": 124.3, "extract image (lite0)": 268.7, "caption": 3.32,
               "finetune epoch (LoRA late)": None}


def random_text_encoder(config_dir: Path, out: Path) -> Path:
    """A random-init copy of a Hugging Face encoder, from its config and tokenizer files."""
    from transformers import AutoConfig, AutoModel

    torch.manual_seed(0)
    out.mkdir(parents=True)
    for path in config_dir.iterdir():
        if path.is_file() and not path.name.endswith((".safetensors", ".bin")):
            shutil.copy(path, out / path.name)
    AutoModel.from_config(AutoConfig.from_pretrained(config_dir)).save_pretrained(out)
    return out


def timed_extract(cfg) -> dict:
    """Items/s of one modality's extract: a first run, and a second into a new cache in the
    same process (model warm-up and the cuDNN algorithm search behind it)."""
    from msa.stages import extract

    rates = {}
    for run, cache in (("first run", cfg.cache), ("warm run", cfg.cache.with_name(cfg.cache.name + "-warm"))):
        result = extract.run(dataclasses.replace(cfg, cache=cache), show_progress=False)
        feature_set = next(iter(result.feature_sets.values()))
        rates[run] = feature_set.encoded_rows / feature_set.seconds
    return {**rates, "variant": feature_set.variant}


def bare_image_forward(cfg, paths: list[str], batch_size: int, device: torch.device) -> float:
    """Images/s of the encoder alone in bf16 and extract's layout, images decoded before."""
    from msa.models.image import build_image_encoder

    encoder = build_image_encoder(cfg.image_model, cfg.image_weights).to(device, memory_format=torch.channels_last)
    pixels = encoder.preprocess.load_batch(paths)
    batches = [pixels[i: i + batch_size].to(device) for i in range(0, len(pixels), batch_size)]

    def run_all() -> None:
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16):
            for batch in batches:
                encoder(encoder.preprocess.normalise(batch))
        if device.type == "cuda":
            torch.cuda.synchronize()

    run_all()  # warm-up: cuDNN picks its algorithms
    start = time.perf_counter()
    run_all()
    return len(paths) / (time.perf_counter() - start)


def bare_text_forward(cfg, texts: list[str], batch_size: int, device: torch.device) -> float:
    """Texts/s of the text encoder alone in bf16, on the device path's batches (token budget,
    longest first), tokenised and padded before."""
    from msa.models.modalities.text import MOST_TEXTS_PER_BATCH, token_budget_batches
    from msa.models.text import TextEncoder

    encoder = TextEncoder(cfg.text_model, cfg.max_len, cfg.pooling).to(device)
    ids = encoder.tokenize(texts)
    batches = [encoder.collate([ids[i] for i in batch]) for batch in
               token_budget_batches(ids, batch_size * cfg.max_len, MOST_TEXTS_PER_BATCH * batch_size)]
    batches = [(input_ids.to(device), mask.to(device)) for input_ids, mask in batches]

    def run_all() -> None:
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16):
            for input_ids, mask in batches:
                encoder(input_ids, mask)
        if device.type == "cuda":
            torch.cuda.synchronize()

    run_all()
    start = time.perf_counter()
    run_all()
    return len(texts) / (time.perf_counter() - start)


def bare_generate(cfg, paths: list[str]) -> float:
    """Images/s of BLIP's generate alone, pixels prepared before, at the caption run's batch."""
    from msa.core.compute import resolve_compute
    from msa.models.captioner import TransformersCaptioner

    captioner = TransformersCaptioner(cfg, resolve_compute(cfg.device, cfg.precision), compile_vision=False)
    batches = [captioner.prepare(paths[i: i + cfg.batch_size])[0] for i in range(0, len(paths), cfg.batch_size)]
    captioner.generate(batches[0])  # warm-up
    start = time.perf_counter()
    for pixels in batches:
        captioner.generate(pixels)
    return len(paths) / (time.perf_counter() - start)


def decode_agreement(cpu_cache: Path, device_cache: Path) -> dict:
    """Cosine of each item's pooled image feature, decoded on the CPU against on the device."""
    import numpy as np

    from msa.cache.features import FeatureSet

    pooled = [FeatureSet.open(next((cache / "features").glob("image-*.h5"))).load("pooled").astype(np.float32)
              for cache in (cpu_cache, device_cache)]
    cosine = (pooled[0] * pooled[1]).sum(1) / (np.linalg.norm(pooled[0], axis=1) * np.linalg.norm(pooled[1], axis=1))
    return {"min": float(cosine.min()), "mean": float(cosine.mean())}


def loading_rates(cfg, paths: list[str], batch_size: int) -> dict:
    """Images/s of loading alone (decode, resize, crop, batch) by 1 to 16 threads."""
    from msa.core.compute import prefetch
    from msa.models.image import build_image_encoder

    preprocess = build_image_encoder(cfg.image_model, cfg.image_weights).preprocess
    batches = [paths[i: i + batch_size] for i in range(0, len(paths), batch_size)]
    rates = {}
    for workers in (1, 4, 8, 16):
        list(prefetch(batches, preprocess.load_batch, workers))  # files into the page cache
        start = time.perf_counter()
        list(prefetch(batches, preprocess.load_batch, workers))
        rates[f"{workers} threads"] = len(paths) / (time.perf_counter() - start)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--models", type=Path, required=True)
    parser.add_argument("--random-text-encoder", action="store_true")
    parser.add_argument("--limit", type=int, default=1024, help="items for caption and finetune")
    parser.add_argument("--extract-limit", type=int, default=4096, help="items for extract")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--caption-batch", type=int, default=64)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--device", default="cuda", help="cpu: a quick run of this script itself, not a figure")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device here: bench/gpu_check.py measures a GPU (the CPU figures are in the README)")

    from caption_throughput import make_random_blip_base

    from msa.core.compute import loading_workers
    from msa.core.config import CaptionConfig, ExtractConfig, FinetuneConfig
    from msa.data.mvsa import read_mvsa
    from msa.stages import caption, finetune

    card = torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU (a run of the script, not a figure)"
    rates, image_path = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        text_model = args.models / "all-mpnet-base-v2"
        if args.random_text_encoder:
            text_model = random_text_encoder(text_model, tmp / "mpnet-random")
        common = {"data": args.data, "limit": args.limit, "device": args.device}
        encoders = {"text_model": str(text_model), "image_model": "timm:tf_efficientnet_lite0",
                    "image_weights": str(args.models / "tf_efficientnet_lite0.pth")}
        extract_common = {**common, "limit": args.extract_limit}
        text = timed_extract(ExtractConfig(cache=tmp / "cache-text", modalities=("text",),
                                           batch_size=args.batch_size, **encoders, **extract_common))
        rates["extract text (mpnet)"] = text["warm run"]
        image_cfg = ExtractConfig(cache=tmp / "cache-image", modalities=("image",), batch_size=args.batch_size,
                                  **encoders, **extract_common)
        device = torch.device(args.device)
        workers = loading_workers(device)
        image_path[f"CPU decode, {workers} threads"] = timed_extract(dataclasses.replace(image_cfg, image_decode="cpu"))
        image_cfg = ExtractConfig(cache=tmp / "cache-image-device", modalities=("image",), image_decode="device",
                                  batch_size=args.batch_size, **encoders, **extract_common)
        image_path[f"device decode, {workers} threads reading"] = timed_extract(image_cfg)
        rates["extract image (lite0)"] = image_path[f"device decode, {workers} threads reading"]["warm run"]
        agreement = decode_agreement(tmp / "cache-image", tmp / "cache-image-device")
        items, _ = read_mvsa(args.data, on_bad_image="blank")
        paths = [item.image_path for item in items[: args.extract_limit] if item.image_path]
        bare = bare_image_forward(image_cfg, paths, args.batch_size, device)
        bare_text = bare_text_forward(ExtractConfig(**encoders, data=args.data), [i.text for i in
                                      items[: args.extract_limit]], args.batch_size, device)
        loading = loading_rates(image_cfg, paths, args.batch_size)
        blip = make_random_blip_base(tmp / "blip", args.models / "all-MiniLM-L6-v2" / "vocab.txt")
        captioned = caption.run(CaptionConfig(cache=tmp / "cache-caption", model=str(blip), precision="fp16",
                                              batch_size=args.caption_batch, **common), show_progress=False)
        rates["caption"] = captioned.captioned / captioned.seconds
        generate = bare_generate(CaptionConfig(cache=tmp / "unused", model=str(blip), precision="fp16",
                                               batch_size=args.caption_batch, **common), paths[: args.limit])
        start = time.perf_counter()
        finetune.run(FinetuneConfig(out=tmp / "ft", **encoders, fusion="late", lora_rank=8, unfreeze_text_layers=0,
                                    unfreeze_image_stages=0, lr_encoder=3e-4, epochs=1, batch_size=32,
                                    precision="auto", **common),
                     show_progress=False, log=lambda *_: None)
        rates["finetune epoch (LoRA late)"] = args.limit / (time.perf_counter() - start)  # train + val, with loading
    print(f"GPU: {card}, torch {torch.__version__}, first {args.extract_limit} items (extract), "
          f"{args.limit} (caption, finetune)"
          + (", random-init MPNet" if args.random_text_encoder else ""))
    print("| work | GPU items/s | CPU items/s (README) | GPU / CPU |")
    print("|---|---|---|---|")
    for name, rate in rates.items():
        cpu = CPU_FIGURES[name]
        print(f"| {name} | {rate:.1f} | {cpu or '-'} | {f'{rate / cpu:.1f}x' if cpu else '-'} |")
    variant = next(iter(image_path.values()))["variant"]
    print(f"\nImage extract against the bare forward pass in bf16 ({bare:.0f} img/s; extract ran {variant})")
    print("| loading | first run img/s | warm run img/s | warm run / bare |")
    print("|---|---|---|---|")
    for name, figures in image_path.items():
        print(f"| {name} | {figures['first run']:.0f} | {figures['warm run']:.0f} | {figures['warm run'] / bare:.0%} |")
    print(f"Features decoded on the device against on the CPU: cosine min {agreement['min']:.4f}, "
          f"mean {agreement['mean']:.5f}")
    print(f"\nText extract (warm) {text['warm run']:.0f} texts/s, bare bf16 forward {bare_text:.0f}: "
          f"{text['warm run'] / bare_text:.0%}")
    print(f"Caption {rates['caption']:.1f} img/s, bare generate {generate:.1f}: {rates['caption'] / generate:.0%}")
    print(f"\nLoading alone ({torch.get_num_threads()} torch threads)")
    print("| loading | img/s |")
    print("|---|---|")
    for name, rate in loading.items():
        print(f"| {name} | {rate:.0f} |")
    if args.json:
        args.json.write_text(json.dumps({"card": card, "limit": args.limit, "rates": rates, "bare image": bare,
                                         "image path": image_path, "text": text, "bare text": bare_text,
                                         "bare generate": generate, "decode agreement": agreement,
                                         "loading": loading}, indent=1))


if __name__ == "__main__":
    main()
