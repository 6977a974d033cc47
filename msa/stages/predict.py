"""Turn a run into predictions: `guid,tag` lines in the `test_without_label.txt` format.

A run directory plus raw data is all this needs: data not yet in a cache is extracted
first, with exactly the encoder configuration recorded with the run's feature sets.
"""

from __future__ import annotations

import csv
import dataclasses
import os
from pathlib import Path

import numpy as np
import torch

from msa.cache.features import CacheError, find_feature_set
from msa.cache.manifest import MANIFEST_FILE, Manifest, build_manifest, read_manifest
from msa.core import rundir
from msa.core.compute import resolve_compute
from msa.core.config import (
    SPLITS,
    CaptionConfig,
    ConfigError,
    ExtractConfig,
    FinetuneConfig,
    PredictConfig,
    from_record,
)
from msa.core.fingerprint import config_id, slug
from msa.core.finite import require_finite
from msa.core.progress import ItemProgress
from msa.data.mvsa import read_mvsa
from msa.models.build import model_with_weights
from msa.stages import caption, extract
from msa.training.autotune import Variant
from msa.training.bank import FeatureBank, cached_batches
from msa.training.loop import evaluate, evaluation_order
from msa.training.raw import RawData, raw_batches
from msa.training.tasks import TASKS

# Fingerprint entries that may differ between the run's features and new data's: the
# manifest, and the precision `auto` picked on another machine (bf16 or fp16 features
# agree with fp32 ones to a cosine of 0.999+, see bench/extract_throughput.py).
MAY_DIFFER = ("manifest_id", "precision")


@dataclasses.dataclass
class Predictions:
    guids: list[str]
    labels: list[str | None]
    probabilities: np.ndarray  # [N, C]
    gate: np.ndarray | None
    class_names: list[str]
    scores: np.ndarray | None = None  # regression runs: the predicted score [N]
    texts: list[str] | None = None  # the items' post texts, from the manifest read anyway

    @property
    def predicted(self) -> list[str]:
        if self.scores is not None:
            return [f"{s:.4f}" for s in self.scores]
        return [self.class_names[i] for i in self.probabilities.argmax(1)]


def load_run_model(run_dir: Path, device: torch.device) -> tuple[torch.nn.Module, dict]:
    """A run's model, rebuilt from its spec with its weights, in eval mode on the device."""
    state_dict, spec = rundir.load_model(run_dir)
    model = model_with_weights(spec, state_dict, run_dir)
    return model.to(device).eval(), spec


def ensure_features(run_dir: Path, data: Path | None, cache: Path | None, device: str = "auto",
                    show_progress: bool = True) -> tuple[Path, dict[str, str]]:
    """The cache holding `data` with the run's feature sets, extracting what is missing.

    Returns the cache and, per modality, the name of the feature set to read."""
    config = rundir.read_json(Path(run_dir) / rundir.CONFIG)
    run_cache = Path(config["cache"])
    run_data = Path(read_manifest(run_cache).info["data_dir"]) if (run_cache / "manifest.parquet").is_file() else None
    same_data = data is None or (run_data is not None and Path(data).resolve() == run_data)
    own_cache = cache is None or Path(cache).resolve() == run_cache.resolve()
    if same_data and own_cache and run_data is not None:
        return run_cache, {m: info["name"] for m, info in config["feature_sets"].items()}
    if data is None:
        raise ConfigError(f"--data is needed: the run's cache {run_cache} holds no manifest any more (removed or "
                          "moved?), so give the data to extract again")
    cache = Path(cache) if cache else Path(run_dir) / rundir.PREDICT_CACHE
    names = {}
    for modality, info in config["feature_sets"].items():
        recorded = info.get("extract_config") or _recorded_in_cache(run_cache, info["name"])
        extract_cfg = _extract_config(recorded, data, cache, modality, device)
        if info.get("caption_config"):  # text made from captions: caption the new images the same way
            caption_cfg = from_record(CaptionConfig, info["caption_config"], data=Path(data), cache=cache,
                                      device=device, limit=None)
            caption.run(caption_cfg, show_progress=show_progress)
        result = extract.run(extract_cfg, show_progress=show_progress).feature_sets[modality]
        produced = find_feature_set(cache, result.name).fingerprint
        wanted = info["fingerprint"]
        differing = sorted(k for k in set(produced) | set(wanted)
                           if k not in MAY_DIFFER and produced.get(k) != wanted.get(k))
        if differing:
            run_values = [wanted.get(k) for k in differing]
            now_values = [produced.get(k) for k in differing]
            raise CacheError(f"{modality} features for {data} differ from the run's in {', '.join(differing)} "
                             f"(run: {run_values}, now: {now_values})")
        names[modality] = result.name
    return cache, names


def _recorded_in_cache(run_cache: Path, name: str) -> dict:
    """The extract options kept with the run's feature set (runs that predate config.json's copy)."""
    try:
        notes = find_feature_set(run_cache, name).notes
    except CacheError as err:
        raise CacheError(f"the run's feature set {name} is not in {run_cache}, so its encoder settings "
                         "are unknown; re-run `msa extract` with the run's options") from err
    if "extract_config" not in notes:
        raise CacheError(f"{name} records no extract options")
    return notes["extract_config"]


def _extract_config(recorded: dict, data: Path, cache: Path, modality: str, device: str) -> ExtractConfig:
    # The run's own decode, whatever this machine would choose: a set recorded before --image-decode
    # existed was decoded on the CPU.
    return from_record(ExtractConfig, recorded, data=Path(data), cache=cache, modalities=(modality,),
                       device=device, shard=None, limit=None, image_decode=recorded.get("image_decode", "cpu"))


def predict(run_dir: Path, data: Path | None = None, split: str = "test", cache: Path | None = None,
            device: str = "auto", show_progress: bool = True) -> Predictions:
    if split not in SPLITS:
        raise ConfigError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    config = rundir.run_config(run_dir)
    if config.get("refit"):  # the model refit on every label stands for the run
        run_dir = refit_model_dir(Path(run_dir))
        config = rundir.read_json(run_dir / rundir.CONFIG)
    kind = config.get("kind")
    if kind == "finetune":
        return _predict_finetuned(run_dir, data, split, device, show_progress)
    # A cross-validation predicts with its fold ensemble: the folds share one extraction and one load.
    members = sorted(Path(run_dir).glob("fold-*"), key=lambda p: int(p.name.split("-")[1])) \
        if kind == rundir.CROSS_VALIDATION else [Path(run_dir)]
    if config.get("trained_by") == "finetune":  # end-to-end folds read the raw data, each with its own model
        # Read once for every fold: the run's own data under its own splits, or the new data
        manifest = read_manifest(run_dir) if data is None else finetuned_manifest(members[0], data)
        return ensemble([_predict_finetuned(member, data, split, device, show_progress, manifest)
                         for member in members])
    cache = cache or (Path(run_dir) / rundir.PREDICT_CACHE if data and len(members) > 1 else None)
    cache, names = ensure_features(members[0], data, cache, device, show_progress)
    compute = resolve_compute(device, "fp32")
    models = [load_run_model(member, compute.device) for member in members]
    manifest = read_manifest(cache)
    feature_sets = {m: find_feature_set(cache, n) for m, n in names.items()}
    for feature_set in feature_sets.values():  # rows line up only with the manifest they were extracted for
        if feature_set.fingerprint.get("manifest_id") != manifest.manifest_id:
            raise CacheError(f"{cache}: its manifest changed since {feature_set.name} was extracted (another "
                             "extract or predict on other data into the same cache?); run predict again")
        feature_set.require_rows_of(manifest.guids, Path(cache) / MANIFEST_FILE)
    model, spec = models[0]  # the folds differ in weights only
    bank = FeatureBank.load(feature_sets, model.uses_tokens, tuple(spec["unfrozen"]))
    rows = np.arange(len(manifest)) if split == "all" else manifest.rows_of_split(split)
    batches = evaluation_order(rows, bank.lengths() if model.uses_tokens else None, 256)
    guids, labels, texts = manifest.guids, manifest.column("label"), manifest.column("text")
    predictions = []
    for model, spec in models:
        out = evaluate(model, rows, cached_batches(bank, batches, model.uses_tokens, compute.device), None)
        predictions.append(Predictions([guids[r] for r in rows], [labels[r] for r in rows], out["probabilities"],
                                       out.get("gate"), spec["class_names"], out.get("scores"),
                                       [texts[r] for r in rows]))
    return ensemble(predictions) if len(predictions) > 1 else predictions[0]


def refit_model_dir(run_dir: Path) -> Path:
    refit = run_dir / rundir.REFIT_DIR
    if not (refit / rundir.METRICS).is_file():
        raise rundir.RunDirError(f"{refit} is unfinished (the refit was stopped); run train-head again with "
                                 "--overwrite, or without --refit")
    return refit


def finetuned_manifest(run_dir: Path, data: Path | None) -> Manifest:
    """What an end-to-end run predicts: its own data (the manifest kept in the run), or new data
    read with the run's reading options."""
    if data is None:
        return read_manifest(run_dir)
    cfg = from_record(FinetuneConfig, rundir.read_json(Path(run_dir) / rundir.CONFIG))
    items, _ = read_mvsa(data, cfg.on_bad_image, cfg.on_duplicate)
    return build_manifest(items, data, cfg.val_ratio, cfg.split_seed, cfg.on_bad_image)


def _predict_finetuned(run_dir: Path, data: Path | None, split: str, device: str,
                       show_progress: bool, manifest: Manifest | None = None) -> Predictions:
    """An end-to-end run reads raw data: its own (the manifest kept in the run, or `manifest`) or new data."""
    cfg = from_record(FinetuneConfig, rundir.read_json(Path(run_dir) / rundir.CONFIG))
    precision, tuned = cfg.precision, Path(run_dir) / rundir.AUTOTUNE
    if precision == "auto" and tuned.is_file():  # the precision it validated in: predictions match its val ones
        precision = Variant.parse(rundir.read_json(tuned)["variant"]).precision
    compute = resolve_compute(device, precision)
    model, spec = load_run_model(run_dir, compute.device)
    if manifest is None:
        manifest = finetuned_manifest(run_dir, data)
    raw = RawData.read(manifest, model.encoders["text"], cfg.clean_text)
    rows = np.arange(len(manifest)) if split == "all" else manifest.rows_of_split(split)
    batches = list(torch.from_numpy(rows).split(cfg.batch_size * 2))
    with ItemProgress("predict", len(rows), show_progress) as advance:
        out = evaluate(model, rows, raw_batches(model, raw, batches, compute.device, advance=advance), None, compute)
    guids, labels, texts = manifest.guids, manifest.column("label"), manifest.column("text")
    return Predictions([guids[r] for r in rows], [labels[r] for r in rows], out["probabilities"], None,
                       spec["class_names"], texts=[texts[r] for r in rows])


def write_predictions_file(predictions: Predictions, path: Path, probs: bool = False) -> Path:
    """`guid,tag` with a header, as test_without_label.txt (`guid,score` for regression runs), atomic;
    probs: the class probabilities too (`guid,tag,p_negative,p_neutral,p_positive`)."""
    # Nothing is written from a NaN: a label argmax'ed from NaN probabilities would look like any other.
    values = predictions.scores if predictions.scores is not None else predictions.probabilities
    require_finite(values, "the predictions (NaN from the model's weights or the items' features)",
                   predictions.guids)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = TASKS["regression" if predictions.scores is not None else "classification"].prediction_header.split(",")
    rows = [[g, p] for g, p in zip(predictions.guids, predictions.predicted)]
    if probs and predictions.scores is None:
        header += [f"p_{name}" for name in predictions.class_names]
        rows = [row + [f"{p:.6f}" for p in ps] for row, ps in zip(rows, predictions.probabilities)]
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:  # the csv module quotes a guid holding , or "
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
    os.replace(tmp, path)
    return path


def default_output(run_dir: Path, data: Path | None, split: str, ensemble: bool = False) -> Path:
    """RUN/predictions-SPLIT.txt for the run's own data; new data's go beside it, named after it;
    an ensemble's are named as one."""
    kind = "predictions-ensemble" if ensemble else "predictions"
    if data is None:
        return Path(run_dir) / f"{kind}-{split}.txt"
    return Path(run_dir) / f"{kind}-{data_tag(data)}-{split}.txt"


def data_tag(data: Path) -> str:
    """A short name for a data folder in file names: its name and a digest of its path."""
    data = Path(data).resolve()
    return f"{slug(data.name)}-{config_id({'data': str(data)}, 6)}"


def ensemble(members: list[Predictions]) -> Predictions:
    """The mean of several runs' probabilities (or scores), with equal weights; the runs must
    share the task, the classes and the items."""
    first = members[0]
    for other in members[1:]:
        if other.guids != first.guids or other.class_names != first.class_names or \
                (other.scores is None) != (first.scores is None):
            raise ConfigError("--ensemble: the runs differ in task, classes or items; only runs of one task and "
                              "label set predicting the same data can be averaged")
    scores = np.mean([m.scores for m in members], axis=0) if first.scores is not None else None
    return dataclasses.replace(first, probabilities=np.mean([m.probabilities for m in members], axis=0), gate=None,
                               scores=scores)


def run(cfg: PredictConfig, show_progress: bool = True, overwrite: bool = False) -> tuple[Path, Predictions]:
    """Predict and write the file. An existing --out is replaced only with `overwrite` (the
    default output, which only predict writes, is always rewritten). With --ensemble, the runs'
    probabilities are averaged and the run list and weights written beside, as OUT.runs.json."""
    runs = [Path(cfg.run), *map(Path, cfg.ensemble)]
    out = cfg.out or default_output(cfg.run, cfg.data, cfg.split, ensemble=len(runs) > 1)
    if cfg.out and Path(cfg.out).exists() and not overwrite:
        raise rundir.RunDirError(f"--out {cfg.out} exists; pass --overwrite to replace it or choose another file")
    # New data is extracted once into one cache for all the runs (sets are shared by fingerprint).
    cache = cfg.cache or (Path(cfg.run) / rundir.PREDICT_CACHE if cfg.data and len(runs) > 1 else None)
    members = [predict(r, cfg.data, cfg.split, cache, cfg.device, show_progress) for r in runs]
    predictions = ensemble(members) if len(members) > 1 else members[0]
    path = write_predictions_file(predictions, out, cfg.probs)
    if len(runs) > 1:
        rundir.write_json(path.with_name(path.name + ".runs.json"),
                          {"runs": [str(r.resolve()) for r in runs], "weights": [1 / len(runs)] * len(runs),
                           "split": cfg.split, "data": str(cfg.data) if cfg.data else None})
    return path, predictions
