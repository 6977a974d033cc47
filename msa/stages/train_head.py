"""Stage 2: train a fusion head on cached features, in seconds.

Model selection (early stopping, the best epoch) uses the validation split only; test
items are never looked at here.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from pathlib import Path

import numpy as np
import torch

from msa.cache.features import (
    CacheError,
    FeatureSet,
    PublishedSet,
    damaged_error,
    find_feature_set,
    scan_feature_sets,
)
from msa.cache.manifest import Manifest, manifest_columns, read_manifest
from msa.models.heads import HEADS, ScaledScore, check_head, create_head
from msa.models.image import build_image_encoder
from msa.models.text import TextEncoder
from msa.models.unfrozen import TopsAndHead, parameter_groups
from msa.pipeline import rundir
from msa.pipeline.config import TrainHeadConfig, to_json
from msa.pipeline.metrics import SELECT, SELECT_BY_TASK, classification_metrics, regression_metrics
from msa.pipeline.mvsa import LABELS
from msa.pipeline.training import (
    FeatureBank,
    class_targets,
    class_weights_from,
    classification_loss,
    evaluate,
    regression_loss,
    train_one_epoch,
    warmup_cosine,
)

KIND = "train-head"  # config.json's "kind": what wrote a run directory
MODALITY_ORDER = ("text", "image")  # roles of two-modality heads: the first is the "text" role


@dataclasses.dataclass
class TrainData:
    """What a run reads, loaded once; a sweep shares one across its runs."""

    manifest: Manifest
    feature_sets: dict[str, FeatureSet]  # modality -> set, in role order
    bank: FeatureBank
    targets: torch.Tensor  # [N] class index, -1 for unlabelled rows; regression: float scores
    task: str  # classification | regression

    def restricted(self, modalities: tuple[str, ...]) -> TrainData:
        """The same data with only some modalities, in that order (a sweep over --modalities)."""
        unknown = [m for m in modalities if m not in self.feature_sets]
        if unknown:
            raise ValueError(f"--modalities {','.join(unknown)}: the data has {', '.join(self.feature_sets)}")
        return dataclasses.replace(self, feature_sets={m: self.feature_sets[m] for m in modalities},
                                   bank=self.bank.subset(modalities))


@dataclasses.dataclass
class TrainResult:
    run_dir: Path
    metrics: dict
    best_epoch: int
    seconds: float


def select_feature_sets(cache: Path, manifest: Manifest, names: tuple[str, ...],
                        modalities: tuple[str, ...] = ()) -> dict[str, FeatureSet]:
    """One current feature set per modality, in role order. The modalities are --modalities,
    else every modality the cache holds a set of: a stale or damaged set fails the run, naming
    it, rather than leaving its modality out. --features picks among several sets of one modality."""
    published = scan_feature_sets(cache)
    if not published:
        raise CacheError(f"{cache}: no complete feature sets; run `msa extract` first")
    current: dict[str, list[FeatureSet]] = {}
    for entry in published:
        if entry.feature_set and entry.feature_set.fingerprint.get("manifest_id") == manifest.manifest_id:
            current.setdefault(entry.feature_set.fingerprint["modality"], []).append(entry.feature_set)
    named: dict[str, FeatureSet] = {}
    for name in names:
        feature_set = find_feature_set(cache, name.removesuffix(".h5"))
        if feature_set.fingerprint.get("manifest_id") != manifest.manifest_id:
            raise CacheError(stale_message(cache, feature_set.name))
        modality = feature_set.fingerprint["modality"]
        if modality in named:
            raise ValueError(f"--features names two {modality} sets ({named[modality].name}, {feature_set.name})")
        named[modality] = feature_set
    held = {modality_of(entry) for entry in published} | set(current)
    wanted = modalities or tuple(sorted(held, key=role_order))
    chosen = {}
    for modality in wanted:
        if modality in named:
            chosen[modality] = named[modality]
        elif len(current.get(modality, [])) == 1:
            chosen[modality] = current[modality][0]
        elif current.get(modality):
            raise CacheError(f"{cache} holds {len(current[modality])} {modality} feature sets "
                             f"({', '.join(s.name for s in current[modality])}); choose with --features")
        elif modality in held:
            others = [m for m in wanted if m != modality]
            raise CacheError(unusable_message(cache, published, modality, others))
        else:
            raise ValueError(f"--modalities {modality}: {cache} has {', '.join(sorted(held, key=role_order))}")
    unused = [m for m in named if m not in chosen]
    if unused:
        raise ValueError(f"--features names a {unused[0]} set, but the run reads {', '.join(chosen)} "
                         f"(--modalities)")
    return chosen


def modality_of(entry: PublishedSet) -> str:
    """A set's modality; from its name (which starts with it) when the file is unreadable."""
    return entry.feature_set.fingerprint["modality"] if entry.feature_set else entry.name.split("-")[0]


def role_order(modality: str) -> tuple:
    return MODALITY_ORDER.index(modality) if modality in MODALITY_ORDER else 99, modality


def stale_message(cache: Path, name: str) -> str:
    return (f"{cache}: feature set {name} was extracted for another manifest (the data, --val-ratio or "
            f"--split-seed changed since); rerun `msa extract` with the current options to encode it again")


def unusable_message(cache: Path, published: list[PublishedSet], modality: str, others: list[str]) -> str:
    """Why no set of a modality can be read, and the two ways on."""
    entry = next(e for e in published if modality_of(e) == modality)
    reason = stale_message(cache, entry.name) if entry.feature_set else str(damaged_error(entry.path, entry.problem))
    alternative = f", or train without {modality}: --modalities {','.join(others)}" if others else ""
    return f"no usable {modality} features: {reason}{alternative}"


def load_train_data(cache: Path, features: tuple[str, ...], with_tokens: bool,
                    split_names: tuple[str, ...] = (), modalities: tuple[str, ...] = ()) -> TrainData:
    manifest = read_manifest(cache)
    feature_sets = select_feature_sets(cache, manifest, features, modalities)
    bank = FeatureBank.load(feature_sets, with_tokens, split_names)
    task = task_of(manifest.table.column_names)
    if task == "regression":
        targets = torch.tensor(manifest.column("score"), dtype=torch.float32)
    else:
        targets = class_targets(manifest.column("label"))
    return TrainData(manifest, feature_sets, bank, targets, task)


def task_of(manifest_columns: list[str]) -> str:
    """Regression where the items carry float scores (imported MOSI-style data), else classification."""
    return "regression" if "score" in manifest_columns else "classification"


# Validation metrics logged per epoch in history.csv (as val_<name>).
HISTORY_METRICS = {"classification": ("accuracy", "macro_f1"), "regression": ("mae", "corr", "acc2", "acc7")}


def val_metrics(task: str, targets: np.ndarray, val: dict) -> dict:
    if task == "regression":
        metrics = regression_metrics(targets, val["scores"])
    else:
        metrics = classification_metrics(targets, val["probabilities"].argmax(1), list(LABELS))
    return {**metrics, "loss": val["loss"]}


def unfrozen(cfg) -> dict[str, int]:
    """Modality -> how many top layers (text) or stages (image) are trained."""
    return {m: k for m, k in (("text", cfg.unfreeze_text_layers), ("image", cfg.unfreeze_image_stages)) if k}


def build_tops(feature_info: dict[str, dict], counts: dict[str, int]) -> dict[str, torch.nn.Module]:
    """Encoder tops with the pretrained weights of the encoders that extracted the features."""
    tops = {}
    for modality, count in counts.items():
        if modality not in feature_info:
            raise ValueError(f"cannot unfreeze the {modality} encoder: the run reads no {modality} features")
        fingerprint, recorded = feature_info[modality]["fingerprint"], feature_info[modality]["extract_config"]
        key, option = ("split_layer", "--text-split-layer") if modality == "text" else ("split_stage",
                                                                                         "--image-split-stage")
        if fingerprint.get(key) != count:
            raise CacheError(f"{feature_info[modality]['name']} was extracted with {option} "
                             f"{fingerprint.get(key)}; unfreezing {count} needs {option} {count}")
        if modality == "text":
            tops[modality] = TextEncoder(recorded["text_model"], recorded["max_len"], recorded["pooling"]).top(count)
            tops[modality].requires_grad_(True)
        else:
            top = build_image_encoder(recorded["image_model"], recorded["image_weights"]).split(count)[1]
            top.requires_grad_(False)
            top.trunk.requires_grad_(True)  # the stages only: a timm pool holds the whole model
            tops[modality] = top
    return tops


def build_model(fusion: str, dims: dict, hidden: int, dropout: float, feature_info: dict,
                counts: dict[str, int], task: str = "classification", sequence_encoder: str = "lstm",
                output_scaling: str = "tanh") -> torch.nn.Module:
    """The head, behind encoder tops when any are unfrozen; a bounded score for regression."""
    outputs = 1 if task == "regression" else len(LABELS)
    model = create_head(fusion, dims, outputs, hidden, dropout, sequence_encoder)
    if counts:
        model = TopsAndHead(model, build_tops(feature_info, counts))
    return ScaledScore(model, output_scaling) if task == "regression" else model


TASK_DEFAULTS = {"classification": {"loss": "ce", "select": "macro_f1"},
                 "regression": {"loss": "l1", "select": "mae"}}


def resolved(cfg: TrainHeadConfig) -> TrainHeadConfig:
    """The config as it runs: the task read from the cache, and a missing batch size, loss and
    selection metric filled in (the head's own batch size; ce / macro_f1 or l1 / mae)."""
    # Only the manifest's footer is read: a sweep resolves every planned run's config.
    task = task_of(manifest_columns(cfg.cache)) if cfg.task == "auto" else cfg.task
    if task not in TASK_DEFAULTS:
        raise ValueError(f"--task must be auto, classification or regression, got {cfg.task!r}")
    defaults = TASK_DEFAULTS[task]
    return dataclasses.replace(
        cfg, task=task, batch_size=cfg.batch_size or HEADS[cfg.fusion].default_batch_size,
        loss=cfg.loss or defaults["loss"], select=cfg.select or defaults["select"])


def recorded_options(cfg: TrainHeadConfig) -> dict:
    """The options as config.json records them (a sweep compares these to skip a run)."""
    return {**to_json(resolved(cfg)), "cache": str(Path(cfg.cache).resolve())}


def default_run_dir(cfg: TrainHeadConfig) -> Path:
    return Path("runs") / f"{cfg.fusion}-seed{cfg.seed}-{time.strftime('%Y%m%d-%H%M%S')}"


def run(cfg: TrainHeadConfig, data: TrainData | None = None, log=print, overwrite: bool = False) -> TrainResult:
    """Train one head; `data` lets a sweep reuse features already in memory. The run directory
    must be new or empty (or an msa run, replaced with `overwrite`); metrics.json, written
    last, marks it finished."""
    check_head(cfg.fusion)  # before loading features, which can take seconds
    cfg = resolved(cfg)
    if cfg.select not in SELECT_BY_TASK[cfg.task]:
        raise ValueError(f"--select must be one of {', '.join(SELECT_BY_TASK[cfg.task])} for {cfg.task}")
    if cfg.task == "regression" and cfg.rdrop_alpha > 0:
        raise ValueError("--rdrop-alpha compares class distributions; it does not apply to regression")
    counts = unfrozen(cfg)
    if data is None:
        data = load_train_data(cfg.cache, cfg.features, HEADS[cfg.fusion].uses_tokens, tuple(counts),
                               cfg.modalities)
    elif cfg.modalities and tuple(data.feature_sets) != tuple(cfg.modalities):
        data = data.restricted(cfg.modalities)
    if data.task != cfg.task:
        raise ValueError(f"--task {cfg.task}: {cfg.cache} holds {data.task} data")
    run_dir = Path(cfg.out) if cfg.out else default_run_dir(cfg)
    lock = rundir.claim(run_dir, KIND, overwrite)
    try:
        return train(cfg, data, run_dir, log)
    finally:
        lock.release()


def train(cfg: TrainHeadConfig, data: TrainData, run_dir: Path, log=print) -> TrainResult:
    counts = unfrozen(cfg)
    # With the extract options (and the caption config, for text made from captions), the run
    # directory alone can extract new data for prediction.
    feature_info = {m: {"name": fs.name, "fingerprint": fs.fingerprint, **fs.notes}
                    for m, fs in data.feature_sets.items()}
    rundir.write_json(run_dir / rundir.CONFIG, {**recorded_options(cfg), "kind": KIND, "out": str(run_dir),
                                                "modalities_used": list(data.feature_sets),
                                                "feature_sets": feature_info})

    train_rows = data.manifest.rows_of_split("train")
    val_rows = data.manifest.rows_of_split("val")
    if len(train_rows) == 0 or len(val_rows) == 0:
        raise ValueError(f"{cfg.cache}: need both train and val items (have {len(train_rows)} / {len(val_rows)})")
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    model = build_model(cfg.fusion, data.bank.dims(), cfg.hidden, cfg.dropout, feature_info, counts, cfg.task,
                        cfg.sequence_encoder, cfg.output_scaling)
    weights = None
    if cfg.loss in ("weighted-ce", "focal"):
        weights = (torch.tensor(cfg.class_weights, dtype=torch.float32) if cfg.class_weights
                   else class_weights_from(data.targets[train_rows].numpy(), len(LABELS)))
    loss_fn = (regression_loss(cfg.loss) if cfg.task == "regression"
               else classification_loss(cfg.loss, weights, cfg.label_smoothing, cfg.focal_gamma))
    # fused: one kernel for all parameters; the default per-parameter loop was 24% of an epoch.
    groups = (parameter_groups(model, cfg.lr_encoder, cfg.lr_fusion, cfg.lr_head, cfg.weight_decay) if counts
              else model.parameters())
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    steps_per_epoch = -(-len(train_rows) // (cfg.batch_size * cfg.grad_accum))
    scheduler = warmup_cosine(optimizer, cfg.epochs * steps_per_epoch, cfg.warmup_ratio)
    select_key, larger_is_better = SELECT[cfg.select]

    start = time.perf_counter()
    tensorboard = rundir.tensorboard_writer(run_dir)
    best_score, best_epoch, best_state, best_val, best_metrics, stale = None, 0, None, None, None, 0
    for epoch in range(1, cfg.epochs + 1):
        epoch_start = time.perf_counter()
        train = train_one_epoch(model, data.bank, train_rows, data.targets, optimizer, scheduler, loss_fn,
                                cfg.batch_size, generator, cfg.rdrop_alpha, cfg.modality_dropout, cfg.aux_weight,
                                cfg.grad_accum)
        val = evaluate(model, data.bank, val_rows, data.targets)
        metrics = val_metrics(cfg.task, data.targets[val_rows].numpy(), val)
        row = {"epoch": epoch, "train_loss": round(train["loss"], 5), "aux_loss": round(train["aux_loss"], 5),
               "val_loss": round(val["loss"], 5),
               **{f"val_{k}": round(metrics[k], 5) for k in HISTORY_METRICS[cfg.task]},
               "lr": scheduler.get_last_lr()[0], "seconds": round(time.perf_counter() - epoch_start, 3)}
        rundir.append_history(run_dir, row)
        if tensorboard:
            for key, value in row.items():
                if key != "epoch":
                    tensorboard.add_scalar(key.replace("_", "/", 1), value, epoch)
        score = metrics[select_key] if larger_is_better else -metrics[select_key]
        if best_score is None or score > best_score:
            best_score, best_epoch, stale = score, epoch, 0
            best_state, best_val, best_metrics = copy.deepcopy(model.state_dict()), val, metrics
        else:
            stale += 1
            if stale >= cfg.patience:
                log(f"early stop at epoch {epoch}: no better val {cfg.select} for {cfg.patience} epochs")
                break
    seconds = time.perf_counter() - start
    if tensorboard:
        tensorboard.close()

    val, metrics = best_val, {**best_metrics, "best_epoch": best_epoch, "train_seconds": seconds}
    rundir.save_model(run_dir, best_state, {
        "fusion": cfg.fusion, "hidden": cfg.hidden, "dropout": cfg.dropout, "unfrozen": counts, "task": cfg.task,
        "sequence_encoder": cfg.sequence_encoder, "output_scaling": cfg.output_scaling,
        "dims": {m: dataclasses.asdict(d) for m, d in data.bank.dims().items()}, "class_names": list(LABELS),
        "feature_sets": feature_info})
    all_guids = data.manifest.guids
    guids = [all_guids[r] for r in val_rows]
    if cfg.task == "regression":
        table = rundir.score_table(guids, data.targets[val_rows].numpy(), val["scores"])
    else:
        labels = data.manifest.column("label")
        table = rundir.predictions_table(guids, [labels[r] for r in val_rows], val["probabilities"], list(LABELS),
                                         val.get("gate"))
    rundir.write_predictions(run_dir / rundir.VAL_PREDICTIONS, table)
    rundir.plot_run(run_dir, metrics)
    rundir.write_json(run_dir / rundir.METRICS, metrics)  # last: the run is finished
    return TrainResult(run_dir, metrics, best_epoch, seconds)
