"""Stage 1b: caption every image once (BLIP) into a caption set of the cache.

Captioned guids are skipped, so a run resumes after a crash and new data only costs its
new images. Unreadable images get an empty caption and the bad_image flag.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from rich.table import Table

from msa.cache.captions import (
    BAD_IMAGE,
    CaptionSet,
    CaptionWriter,
    caption_path,
    caption_set_name,
    is_finished,
    list_caption_sets,
)
from msa.core.compute import Compute, loading_workers, prefetch, resolve_compute
from msa.core.config import CaptionConfig, ConfigError, to_json
from msa.core.fingerprint import FORMAT_VERSION, file_size, local_path, model_reference
from msa.core.progress import ItemProgress, rate_text
from msa.data.mvsa import Item, bad_image_flag, read_mvsa
from msa.models.captioner import DTYPES, captioner_class, create_captioner, spread_captions
from msa.training import autotune
from msa.training.distributed import Rank, barrier, current_rank, join

# Compiling BLIP's ViT costs ~30 s here and saves ~0.2 s an image (1.02 -> 1.34 img/s,
# bench/caption_throughput.py part 2).
COMPILE_MIN_IMAGES = 200
MEASURED_IMAGES = 2  # --precision auto times BLIP's ViT on this many (bf16 on AVX2: several s each)


@dataclasses.dataclass
class CaptionResult:
    name: str
    path: Path
    items: int  # items of the data set
    cached: int  # captioned by an earlier run
    captioned: int  # captioned by this run (bad images included)
    bad_images: int  # empty captions of this run's unreadable images
    seconds: float
    caption_set: CaptionSet


def caption_fingerprint(cfg: CaptionConfig) -> dict:
    """What the caption text depends on. The precision is recorded in the notes instead, so that
    a run's captions made with fp16 on a GPU can be extended on a CPU (fp32) for new data."""
    return {"format_version": FORMAT_VERSION, "backend": cfg.backend, "model": model_reference(cfg.model),
            "weights": captioner_class(cfg.backend).identity(cfg), "num_beams": cfg.num_beams,
            "max_new_tokens": cfg.max_new_tokens, "prompt": cfg.prompt}


def run(cfg: CaptionConfig, show_progress: bool = True, on_batch=None) -> CaptionResult:
    """Caption the images of `cfg.data` that the caption set lacks; `on_batch(n)` follows each batch."""
    rank = current_rank()
    if rank.distributed:  # torchrun: each rank captions its share on its own device
        cfg = dataclasses.replace(cfg, device=join(rank, cfg.device))
        show_progress = show_progress and rank.is_main
    if cfg.num_beams < 1 or cfg.max_new_tokens < 1 or cfg.batch_size < 1:
        raise ConfigError("--num-beams, --max-new-tokens and --batch-size must be at least 1")
    start = time.perf_counter()
    compute = resolve_compute(cfg.device, cfg.precision)
    cfg = dataclasses.replace(cfg, model=local_path(cfg.model), data=Path(cfg.data).resolve())
    items, _ = read_mvsa(cfg.data, on_bad_image="blank")
    items = items[: cfg.limit] if cfg.limit else items
    fingerprint = caption_fingerprint(cfg)
    name = caption_set_name(cfg.model, fingerprint)
    stored = (CaptionSet.load(cfg.cache, name) if name in list_caption_sets(cfg.cache)
              else CaptionSet(name, fingerprint, {}, {}))
    sizes = {item.guid: file_size(item.image_path) for item in items}
    pending = [item for item in items if not stored.covers(item.guid, sizes[item.guid])]
    barrier()  # every rank has its list of pending items before any writes: they deal the same list
    if not pending and is_finished(cfg.cache, name):
        return CaptionResult(name, caption_path(cfg.cache, name), len(items), len(items), 0, 0,
                             time.perf_counter() - start, stored)
    notes = {"caption_config": to_json(cfg), "precision": compute.precision}
    decision = tuned_precision(cfg, compute, pending)
    if decision:
        compute = decision.applied_to(compute)
        notes.update(precision=compute.precision, autotune=decision.record())
    if rank.distributed:
        return caption_as_rank(cfg, compute, rank, name, fingerprint, notes, items, pending, sizes, show_progress,
                               on_batch, start)
    writer = CaptionWriter(cfg.cache, name, fingerprint, notes)
    try:
        bad = caption_items(cfg, compute, pending, sizes, writer, show_progress, on_batch)
        caption_set = writer.finish()
    finally:
        writer.close()
    return CaptionResult(name, caption_path(cfg.cache, name), len(items), len(items) - len(pending), len(pending), bad,
                         time.perf_counter() - start, caption_set)


def tuned_precision(cfg: CaptionConfig, compute: Compute, pending: list[Item]) -> autotune.Decision | None:
    """--precision auto on a CPU: BLIP's weights in bf16 or fp32, whichever measured faster here
    (msa.training.autotune), timed on the ViT, ~3/4 of captioning's time, with two images."""
    readable = [item.image_path for item in pending if not bad_image_flag(item.flags)][:MEASURED_IMAGES]
    if not autotune.measured_here(cfg.precision, compute) or cfg.backend != "transformers" or not readable:
        return None

    def measure_now(variants: list[autotune.Variant]) -> dict[str, autotune.Measurement]:
        captioner = create_captioner(cfg, dataclasses.replace(compute, precision="fp32"), False)
        pixels, _ = captioner.prepare(readable)
        vision = captioner.model.vision_model

        def forward(variant: autotune.Variant):
            dtype = DTYPES[variant.precision]
            vision.to(dtype)
            return lambda batch: vision(pixel_values=batch.to(dtype)).pooler_output

        try:
            return autotune.measure(forward, pixels, variants, repeats=1)
        finally:
            captioner.close()

    key = f"caption|{captioner_class(cfg.backend).identity(cfg)}"
    return autotune.decide("caption", key, len(pending), False, measure_now)


def caption_as_rank(cfg: CaptionConfig, compute, rank: Rank, name: str, fingerprint: dict, notes: dict,
                    items: list[Item], pending: list[Item], sizes: dict[str, int], show_progress: bool, on_batch,
                    start: float) -> CaptionResult:
    """One rank's share into its own part file; once every rank is done, rank 0 folds the
    parts into the set. A rank that dies leaves its part (resumed by the next run) and no set."""
    share = pending[rank.rank::rank.world_size]
    writer = CaptionWriter(cfg.cache, name, fingerprint, notes, part=f"rank-{rank.rank}")
    try:
        bad = caption_items(cfg, compute, share, sizes, writer, show_progress, on_batch)
    finally:
        writer.close()
    barrier()  # every part written
    if rank.is_main:
        folding = CaptionWriter(cfg.cache, name, fingerprint, notes)
        try:
            folding.finish()
        finally:
            folding.close()
    barrier()  # the set is published before any rank reports it
    return CaptionResult(name, caption_path(cfg.cache, name), len(items), len(items) - len(pending), len(share), bad,
                         time.perf_counter() - start, CaptionSet.load(cfg.cache, name))


def caption_items(cfg: CaptionConfig, compute, items: list[Item], sizes: dict[str, int], writer: CaptionWriter,
                  show_progress: bool, on_batch) -> int:
    """Caption `items` into the writer, unreadable images as empty flagged captions; returns
    how many images were unreadable."""
    unreadable = [item for item in items if bad_image_flag(item.flags)]
    writer.write([i.guid for i in unreadable], [""] * len(unreadable), [BAD_IMAGE] * len(unreadable),
                 [sizes[i.guid] for i in unreadable])
    readable = [item for item in items if not bad_image_flag(item.flags)]
    return len(unreadable) + (_caption(cfg, compute, readable, sizes, writer, show_progress, on_batch)
                              if readable else 0)


def _caption(cfg: CaptionConfig, compute, items: list[Item], sizes: dict[str, int], writer: CaptionWriter,
             show_progress: bool, on_batch) -> int:
    """Caption `items` batch by batch into the writer; returns how many images turned out unreadable."""
    use_compile = cfg.compile if cfg.compile is not None else (
        compute.device.type == "cpu" and len(items) >= COMPILE_MIN_IMAGES)
    captioner = create_captioner(cfg, compute, use_compile)
    batches = [items[i: i + cfg.batch_size] for i in range(0, len(items), cfg.batch_size)]
    bad = 0
    try:
        with ItemProgress("caption", len(items), show_progress) as advance:
            prepared = prefetch(batches, lambda batch: captioner.prepare([i.image_path for i in batch]),
                                loading_workers(compute.device))
            for batch, (inputs, ok) in zip(batches, prepared):
                captions = spread_captions(captioner.generate(inputs) if any(ok) else [], ok)
                flags = ["" if good else BAD_IMAGE for good in ok]
                writer.write([i.guid for i in batch], captions, flags, [sizes[i.guid] for i in batch])
                bad += ok.count(False)
                advance(len(batch))
                if on_batch:
                    on_batch(len(batch))
    finally:
        captioner.close()
    return bad


def summary_table(result: CaptionResult, examples: int = 3) -> Table:
    """What was captioned, how fast, and a few captions to eyeball."""
    table = Table(title=f"Captions: {result.name}")
    table.add_column("")
    table.add_column("", overflow="fold")
    rate = rate_text(result.captioned, result.seconds, "captions") if result.captioned else "-"
    table.add_row("items", f"{result.items} ({result.cached} captioned before, {result.captioned} now, {rate})")
    table.add_row("bad images", f"{result.bad_images} (empty caption, flag {BAD_IMAGE})")
    for guid, caption in list(result.caption_set.captions.items())[:examples]:
        table.add_row(f"guid {guid}", caption.text or "(empty)")
    return table
