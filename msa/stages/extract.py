"""Stage 1: read the data set, write the manifest, encode every item once into the cache.

A finished feature set is never recomputed; an interrupted one resumes at its first
missing row. The text encoder sees length-sorted batches (2x faster than padding every
text to max_len); image decoding runs in a background thread while the encoder runs.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
from rich.table import Table

from msa.cache.captions import CaptionSet, list_caption_sets
from msa.cache.features import feature_path, is_complete, shard_rows
from msa.cache.maintenance import merge_shards
from msa.cache.manifest import Manifest, build_manifest, read_manifest, write_manifest
from msa.cache.writer import FeatureWriter
from msa.core.compute import Compute, encoding_streams, resolve_compute
from msa.core.config import TEXT_SOURCES, ConfigError, ExtractConfig, to_json
from msa.core.errors import BusyError, CacheError
from msa.core.fingerprint import (
    FORMAT_VERSION,
    config_id,
    file_digest,
    file_size,
    local_path,
    slug,
)
from msa.core.locks import held, lock_path
from msa.core.progress import console, rate_text
from msa.data.mvsa import BAD_ITEMS_FILE, ReadReport, described, read_mvsa, require_mvsa_folder, write_bad_items
from msa.models.build import is_run_dir, run_text_options
from msa.models.modalities import MODALITIES, BatchCallback, EncodeJob, Modality
from msa.training import autotune
from msa.training.distributed import Rank, barrier, current_rank, join

# torch.compile costs ~50 s here and makes EfficientNet-Lite0 2.8x faster on this CPU
# (22.8 -> 63 img/s): it pays off from about a thousand images. Below that it is not tried;
# above it, --precision auto measures whether it pays.
COMPILE_MIN_IMAGES = 1000
MEASURED_ITEMS = 16  # --precision auto times each variant on the first items (bf16 on AVX2: ~3 texts/s)
READER_VERSION = 2  # raised when the reader's rules change (2: confined paths, bounded items, EXIF, deep pixels)
SHOWN_BAD_ITEMS = 5  # in the summary; CACHE/bad_items.csv lists every one
TEST_LABELS_FILE = "test_labels.txt"  # a paper split's test posts with their labels
STATUS_MEANING = {"cached": "complete before this run, no encoder work", "encoded": "encoded by this run",
                  "resumed": "an interrupted run's rows kept, the rest encoded now",
                  "busy": "another process is writing it, not extracted"}

@dataclasses.dataclass
class FeatureSetResult:
    modality: str
    name: str
    path: Path
    status: str  # cached (complete before this run) | encoded | resumed | busy (another process writes it)
    resumed_rows: int  # rows an interrupted run had already written
    encoded_rows: int  # rows encoded by this run
    seconds: float
    variant: str = ""  # precision (+compile) it ran in, and how --precision auto chose it: "bf16 (measured)"

    @property
    def cached(self) -> bool:
        return self.status == "cached"


@dataclasses.dataclass
class ExtractResult:
    manifest: Manifest
    report: ReadReport
    feature_sets: dict[str, FeatureSetResult]
    manifest_dir: Path  # the cache


def parse_shard(shard: str | None) -> tuple[int, int] | None:
    if not shard:
        return None
    try:
        index, count = (int(v) for v in shard.split("/"))
    except ValueError:
        raise ConfigError(f"--shard must look like i/n (e.g. 0/4), got {shard!r}") from None
    if count < 1 or not 0 <= index < count:
        raise ConfigError(f"--shard {shard}: need 0 <= i < n")
    return index, count


def feature_fingerprint(cfg: ExtractConfig, modality: str, manifest_id: str, compute: Compute,
                        captions: CaptionSet | None = None) -> dict:
    """Everything the stored numbers depend on; a change gives a new feature set."""
    common = {"format_version": FORMAT_VERSION, "modality": modality, "manifest_id": manifest_id,
              "dtype": "float16", "precision": compute.precision}
    return {**common, **modality_named(modality).fingerprint(cfg, captions)}


def modality_named(name: str) -> Modality:
    if name not in MODALITIES:
        raise ConfigError(f"unknown modality {name!r}; known: {', '.join(MODALITIES)}")
    return MODALITIES[name]


def feature_set_name(modality: str, model: str, fingerprint: dict) -> str:
    source = fingerprint.get("text_source", "raw")
    kind = modality if source == "raw" else f"{modality}-{slug(source)}"
    return f"{kind}-{slug(model)}-{config_id(fingerprint)}"


def resolve_captions(cfg: ExtractConfig, manifest: Manifest) -> CaptionSet | None:
    """The caption set a caption text source reads, checked to cover every item of the manifest."""
    if cfg.text_source not in TEXT_SOURCES:
        raise ConfigError(f"--text-source must be one of {', '.join(TEXT_SOURCES)}, got {cfg.text_source!r}")
    if cfg.text_source == "raw" or "text" not in cfg.modalities:
        return None
    names = [cfg.captions] if cfg.captions else list_caption_sets(cfg.cache)
    if not names:
        raise CacheError(f"--text-source {cfg.text_source} needs captions, and {cfg.cache} has none: "
                         f"run `msa caption --data {cfg.data} --cache {cfg.cache}` first")
    if len(names) > 1:
        raise CacheError(f"{cfg.cache} holds {len(names)} caption sets ({', '.join(names)}); choose with --captions")
    captions = CaptionSet.load(cfg.cache, names[0])
    captions.texts(manifest.guids, [file_size(p) for p in manifest.column("image_path")])  # all there?
    return captions


def run(cfg: ExtractConfig, show_progress: bool = True, on_batch: BatchCallback | None = None) -> ExtractResult:
    """Extract every configured modality; `on_batch(modality, rows_done)` follows each batch.
    Under torchrun, each rank encodes its share (`--shard RANK/WORLD_SIZE`) on its own
    device, and rank 0 merges the shards and publishes each set once all ranks are done."""
    rank = current_rank()
    if rank.distributed and cfg.shard is None:
        return run_as_rank(cfg, rank, show_progress, on_batch)
    for modality in cfg.modalities:  # a typo stops here, before the manifest is written
        modality_named(modality)
    compute = resolve_compute(cfg.device, cfg.precision)
    if cfg.image_decode == "auto":  # the device decodes where it is a GPU: the CPU only reads the files
        cfg = dataclasses.replace(cfg, image_decode="device" if compute.device.type == "cuda" else "cpu")
    # Recorded resolved: `msa predict` re-runs these options from any working directory.
    cfg = dataclasses.replace(cfg, data=Path(cfg.data).resolve(), text_model=local_path(cfg.text_model),
                              image_weights=local_path(cfg.image_weights))
    if is_run_dir(cfg.text_model) and "text" in cfg.modalities:  # its encoder's own length and pooling
        cfg = dataclasses.replace(cfg, **run_text_options(cfg.text_model))
    shard = parse_shard(cfg.shard)
    manifest, report = prepare_manifest(cfg)
    captions = resolve_captions(cfg, manifest)
    if captions:  # recorded by name, so that predictions on new data extend the same captions
        cfg = dataclasses.replace(cfg, captions=captions.name)
    results = {m: extract_modality(cfg, m, manifest, captions if m == "text" else None, shard, compute,
                                   show_progress, on_batch) for m in cfg.modalities}
    return ExtractResult(manifest, report, results, Path(cfg.cache))


def extract_modality(cfg: ExtractConfig, modality: str, manifest: Manifest, captions: CaptionSet | None,
                     shard: tuple[int, int] | None, compute: Compute, show_progress: bool,
                     on_batch: BatchCallback | None) -> FeatureSetResult:
    """One modality's set: found complete, or encoded (resumed where an interrupted run stopped)."""
    # The encoder loads once, for a measurement or for encoding.
    encoder_of = functools.cache(functools.partial(load_encoder, cfg, modality))
    rows = shard_rows(len(manifest), shard, cfg.batch_size)
    # A set complete in any precision auto may choose is used as it is, before measuring:
    # a cache made elsewhere, on a machine with no stored decision, costs no encoder load.
    complete = next((where for where in (set_location(cfg, modality, manifest, choice, captions, shard)
                                          for choice in precisions_auto_may_choose(cfg, modality, compute))
                     if where.complete), None)
    if complete:
        return FeatureSetResult(modality, complete.name, complete.path, "cached", 0, 0, 0.0)
    decision = tuned_variant(cfg, modality, manifest, rows, compute, encoder_of)
    modality_compute = decision.applied_to(compute) if decision else compute
    fingerprint, name, path, _ = set_location(cfg, modality, manifest, modality_compute, captions, shard)
    notes = {"extract_config": to_json(cfg), **({"caption_config": captions.notes["caption_config"]}
                                                 if captions else {}),
             **({"autotune": decision.record()} if decision else {})}
    # The model loads before the set's file exists: a model that fails to load leaves nothing behind.
    encoder = encoder_of()
    try:
        writer = FeatureWriter(path, fingerprint, manifest.guids, rows, notes)
    except BusyError as err:
        console.print(f"[yellow]{err}; going on without it[/yellow]")
        return FeatureSetResult(modality, name, path, "busy", 0, 0, 0.0)
    if writer.set_aside:
        console.print(f"[yellow]{name} was damaged: set aside as {writer.set_aside.name} and encoded again[/yellow]")
    start = time.perf_counter()
    pending = writer.pending_rows()
    entry = modality_named(modality)
    use_compile = entry.compiles and (cfg.compile or (
        decision.variant.compile if decision else compute.device.type == "cpu" and len(pending) >= COMPILE_MIN_IMAGES))
    with writer:
        entry.encode(encoder, EncodeJob(cfg, manifest, pending, writer, modality_compute, show_progress, on_batch,
                                        captions, use_compile))
        writer.finish()
    variant = modality_compute.precision + ("+compile" if use_compile else "") if entry.tuned else ""
    return FeatureSetResult(modality, name, path, "resumed" if writer.resumed_rows else "encoded",
                            writer.resumed_rows, len(pending), time.perf_counter() - start,
                            f"{variant} ({decision.chosen_by})" if decision else variant)


class SetLocation(NamedTuple):
    fingerprint: dict
    name: str
    path: Path  # this shard's file under --shard
    complete: bool  # the set, or this shard of it, holds every row


def set_location(cfg: ExtractConfig, modality: str, manifest: Manifest, compute: Compute,
                 captions: CaptionSet | None, shard: tuple[int, int] | None) -> SetLocation:
    fingerprint = feature_fingerprint(cfg, modality, manifest.manifest_id, compute, captions)
    name = feature_set_name(modality, modality_named(modality).model_name(cfg), fingerprint)
    path = feature_path(cfg.cache, name, shard)
    complete = is_complete(path, fingerprint) or bool(shard and is_complete(feature_path(cfg.cache, name),
                                                                              fingerprint))
    return SetLocation(fingerprint, name, path, complete)


def auto_measures(cfg: ExtractConfig, modality: str, compute: Compute) -> bool:
    return autotune.measured_here(cfg.precision, compute) and modality_named(modality).tuned


def precisions_auto_may_choose(cfg: ExtractConfig, modality: str, compute: Compute) -> list[Compute]:
    if not auto_measures(cfg, modality, compute):
        return [compute]
    return [dataclasses.replace(compute, precision=variant.precision) for variant in autotune.candidates(False)]


def run_as_rank(cfg: ExtractConfig, rank: Rank, show_progress: bool, on_batch: BatchCallback | None) -> ExtractResult:
    """One rank's share; a rank that dies leaves its shard to resume and nothing published."""
    device = join(rank, cfg.device)
    share = run(dataclasses.replace(cfg, shard=f"{rank.rank}/{rank.world_size}", device=device),
                show_progress and rank.is_main, on_batch)
    barrier()  # every shard finished
    results = {}
    for modality, result in share.feature_sets.items():
        whole = feature_path(cfg.cache, result.name)
        # Not "this rank's shard was new": a rerun may find its own shard done and another resumed.
        if rank.is_main and result.status != "busy" and not whole.is_file():
            merge_shards(Path(cfg.cache), result.name)
        results[modality] = dataclasses.replace(result, path=whole)
    barrier()  # published before any rank reports it
    return dataclasses.replace(share, feature_sets=results)


def tuned_variant(cfg: ExtractConfig, modality: str, manifest: Manifest, rows: np.ndarray, compute: Compute,
                  encoder_of: Callable) -> autotune.Decision | None:
    """--precision auto on a CPU: the precision (and, for images, compile) that measured fastest
    on this machine for this model (msa.training.autotune); None where nothing is measured.
    Decided for all the set's rows, not the pending ones: a resumed run finds the same set."""
    if not auto_measures(cfg, modality, compute):
        return None
    entry, sample = modality_named(modality), rows[:MEASURED_ITEMS]

    def forward(variant):
        return entry.timed_forward(encoder_of(), variant, compute, encoding_streams(compute, variant.compile))

    def measure_now(variants):
        return autotune.measure(forward, entry.sample_inputs(encoder_of(), manifest, sample), variants)

    compile_may_pay = entry.compiles and not cfg.compile and len(rows) >= COMPILE_MIN_IMAGES
    return autotune.decide(modality, entry.autotune_key(cfg), len(rows), compile_may_pay, measure_now)


def load_encoder(cfg: ExtractConfig, modality: str):
    return modality_named(modality).load(cfg)


def imported_manifest(cfg: ExtractConfig) -> tuple[Manifest, ReadReport]:
    """The manifest `msa import-features FILE` wrote for this file: its items' raw text (MMSA's
    raw_text) can be encoded by any text model, beside the file's own features."""
    try:
        manifest = read_manifest(cfg.cache)
    except FileNotFoundError:
        raise ConfigError(f"--data {cfg.data} is a file: run `msa import-features {cfg.data} --cache {cfg.cache}` "
                          "first, then extract its texts into that cache") from None
    if Path(manifest.info.get("data_dir", "")) != Path(cfg.data).resolve():
        raise ConfigError(f"{cfg.cache} holds {manifest.info.get('data_dir')}, not {cfg.data}")
    unsupported = [m for m in cfg.modalities if m not in ("text", "lexicon")]
    if unsupported:
        raise ConfigError(f"--modalities {','.join(unsupported)}: an imported features file has no raw "
                          f"{unsupported[0]} data to encode (text and lexicon read its raw_text)")
    if not any(manifest.column("text")):
        raise ConfigError(f"{cfg.data} holds no raw text (MMSA files carry it as raw_text) to encode")
    return manifest, ReadReport(items_read=len(manifest))


def prepare_manifest(cfg: ExtractConfig) -> tuple[Manifest, ReadReport]:
    """Read the data and write the manifest, unless an identical one is already cached.

    Reading checks every image (~7 s for MVSA's 4,011); when no file in the data folder
    changed size or time since the cached manifest was built, that is skipped.
    """
    if Path(cfg.data).is_file():  # a features file imported by `msa import-features`: encode its raw text
        return imported_manifest(cfg)
    require_mvsa_folder(cfg.data)  # before the cache's lock folder is made
    signature = source_signature(cfg)
    # One process at a time reads, compares and rewrites the manifest (a few seconds at most).
    with held(lock_path(cfg.cache, "manifest"), "the manifest"):
        try:
            previous = read_manifest(cfg.cache)
        except FileNotFoundError:
            previous = None
        except CacheError as err:  # damaged: rebuilt from the data; the feature sets keep matching it
            console.print(f"[yellow]{err}; rebuilding it[/yellow]")
            previous = None
        if previous is not None and previous.info.get("source_signature") == signature:
            return previous, ReadReport(**previous.info["report"])
        items, report = read_mvsa(cfg.data, cfg.on_bad_image, cfg.on_duplicate)
        if cfg.limit:  # the summary and bad_items.csv describe the items used
            items = items[: cfg.limit]
            report = described(report, items)
        manifest = build_manifest(items, cfg.data, cfg.val_ratio, cfg.split_seed, cfg.on_bad_image, cfg.split)
        manifest.info.update(report=dataclasses.asdict(report), source_signature=signature)
        if previous is not None and previous.manifest_id != manifest.manifest_id:
            console.print(f"[yellow]{cfg.cache}: the data or split changed; the manifest is rebuilt and "
                          "feature sets of the old one no longer match[/yellow]")
        write_manifest(manifest, Path(cfg.cache))
        write_bad_items(report, Path(cfg.cache))
        write_test_labels(manifest, Path(cfg.cache))
    return manifest, report


def write_test_labels(manifest: Manifest, cache: Path) -> Path | None:
    """CACHE/test_labels.txt: the labelled test posts of a paper split, as `guid,tag` (what
    `msa evaluate --labels` takes), so a run is scored on the split published tables use."""
    path = cache / TEST_LABELS_FILE
    rows = [(guid, label) for guid, label, split in zip(manifest.guids, manifest.column("label"),
                                                         manifest.column("split")) if split == "test" and label]
    if not rows:
        path.unlink(missing_ok=True)  # an earlier paper split's, no longer true
        return None
    path.write_text("guid,tag\n" + "".join(f"{guid},{label}\n" for guid, label in rows), encoding="utf-8")
    return path


def source_signature(cfg: ExtractConfig) -> str:
    """The content of every data file (a sha256 of its bytes: a label edited in place keeps its
    size and time), plus the reading options. MVSA's 190 MB hash in under a second, a quarter of
    what reading and checking every image costs."""
    entries = []
    for folder in (Path(cfg.data), Path(cfg.data) / "data"):
        if folder.is_dir():
            with os.scandir(folder) as scan:
                files = sorted(e.path for e in scan if e.is_file())
            entries += [(path, file_digest(Path(path))) for path in files]
    return config_id({"files": entries, "on_bad_image": cfg.on_bad_image, "limit": cfg.limit,
                      "val_ratio": cfg.val_ratio, "split_seed": cfg.split_seed, "split": cfg.split,
                      "reader": READER_VERSION})


def summary_tables(result: ExtractResult) -> list[Table]:
    """What was read and what was encoded, for the terminal."""
    report = result.report
    data = Table(title=f"Data: {report.items_read} items")
    data.add_column("split / class")
    data.add_column("items", justify="right")
    splits = result.manifest.column("split")
    labels = result.manifest.column("label")
    for split in ("train", "val", "test"):
        counts: dict[str, int] = {}
        for s, label in zip(splits, labels):
            if s == split:
                counts[label or "unlabelled"] = counts.get(label or "unlabelled", 0) + 1
        detail = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        data.add_row(split, f"{sum(counts.values())}  ({detail})")
    data.add_row("text encodings", ", ".join(f"{k} {v}" for k, v in sorted(report.encodings.items())))
    if report.release:
        dropped = ", ".join(f"{rule} {n}" for rule, n in sorted(report.release["dropped"].items())) or "none"
        data.add_row(report.release["layout"], f"{report.release['posts']} posts listed; dropped by the field's "
                                               f"label rules: {dropped}")
    if (Path(result.manifest_dir) / TEST_LABELS_FILE).is_file():
        data.add_row("paper split", f"test labels: {Path(result.manifest_dir) / TEST_LABELS_FILE} "
                                    "(msa evaluate --run RUN --labels FILE)")
    problems = {**report.flags, **({"skipped": len(report.skipped)} if report.skipped else {})}
    data.add_row("bad items", ", ".join(f"{k} {v}" for k, v in sorted(problems.items())) or "none")
    for bad in report.bad_items[:SHOWN_BAD_ITEMS]:
        data.add_row("", f"{bad['where']}: guid {bad['guid']}: {bad['problem']}")
    if report.bad_items:
        data.add_row("", f"all {len(report.bad_items)}: {Path(result.manifest_dir) / BAD_ITEMS_FILE}")
    statuses = sorted({r.status for r in result.feature_sets.values()})
    features = Table(title="Feature sets", caption="; ".join(f"{s}: {STATUS_MEANING[s]}" for s in statuses))
    for column in ("modality", "name", "status", "rows encoded", "items/s", "variant"):
        features.add_column(column, overflow="fold")  # whole names, which --features takes, never cut
    for r in result.feature_sets.values():
        rate = rate_text(r.encoded_rows, r.seconds, "")[:-2]
        features.add_row(r.modality, r.name, r.status, str(r.encoded_rows), rate, r.variant)
    return [data, features]
