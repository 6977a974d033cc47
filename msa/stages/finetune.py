"""Fallback: end-to-end fine-tuning on raw images and texts, for what a cache cannot serve
(image augmentation, text cleaning variants, everything unfrozen).

The encoders' bottoms stay frozen (and in eval mode, as when features are cached); their
top layers/stages train with the fusion head, at layer-wise learning rates, in the same
loop as train-head (`fit`). Every epoch writes RUN/last.pt with everything needed to
continue exactly (`--resume RUN`). The run directory has train-head's layout, plus the
manifest, so predict and evaluate work on it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from msa.cache.manifest import Manifest, build_manifest, read_manifest, write_manifest
from msa.core import rundir
from msa.core.compute import Compute, resolve_compute
from msa.core.config import ConfigError, FinetuneConfig, to_json
from msa.core.fingerprint import local_path
from msa.core.progress import ItemProgress
from msa.data.mvsa import read_mvsa, require_mvsa_folder
from msa.models.build import build_model
from msa.models.registry import HEADS, check_head
from msa.models.unfrozen import parameter_groups
from msa.training import autotune, plots
from msa.training.distributed import (
    ALONE,
    Rank,
    barrier,
    current_rank,
    every_rank_ok,
    join,
    single_process_only,
    summed_over_ranks,
)
from msa.training.loop import (
    Optimisation,
    Regularisers,
    evaluate,
    fit,
    shuffled_batches,
    train_one_epoch,
    warmup_cosine,
)
from msa.training.metrics import fold_summary
from msa.training.raw import IMAGE_AUGS, RawData, image_augmentation, raw_batches
from msa.training.tasks import TASKS, training_loss

LAST = rundir.RESUME_STATE  # the state to resume from, rewritten after every epoch
KIND = "finetune"  # config.json's "kind"
TASK = TASKS["classification"]


def model_spec(cfg: FinetuneConfig) -> dict:
    """What rebuilds this run's model (msa.models.build)."""
    return {"kind": "end-to-end", "task": TASK.name, "outputs": TASK.outputs, "class_names": list(TASK.classes),
            **{k: getattr(cfg, k) for k in ("fusion", "hidden", "dropout", "text_model", "max_len", "pooling",
                                            "image_model", "image_weights", "unfreeze_text_layers",
                                            "unfreeze_image_stages", "lora_rank")},
            "lora_targets": list(cfg.lora_targets),
            # LoRA in the top --unfreeze-text-layers K layers (0: every layer), which then train through it alone
            **({"lora_layers": cfg.unfreeze_text_layers or "all"} if cfg.lora_rank else {})}


def resolved(cfg: FinetuneConfig) -> FinetuneConfig:
    """Model paths resolved, the task's default loss and selection filled in, choices checked."""
    check_head(cfg.fusion, ["text", "image"])
    cfg = dataclasses.replace(cfg, text_model=local_path(cfg.text_model), image_weights=local_path(cfg.image_weights),
                              loss=cfg.loss or TASK.default_loss, select=cfg.select or TASK.default_select,
                              dropout=HEADS[cfg.fusion].default_dropout if cfg.dropout is None else cfg.dropout)
    if cfg.select not in TASK.selects:
        raise ConfigError(f"--select must be one of {', '.join(TASK.selects)}")
    if cfg.image_aug not in IMAGE_AUGS:
        raise ConfigError(f"--image-aug must be one of {', '.join(IMAGE_AUGS)}, got {cfg.image_aug!r}")
    if cfg.data is not None:
        require_mvsa_folder(cfg.data)
    return cfg


def run(cfg: FinetuneConfig, resume: bool = False, show_progress: bool = True, log=print,
        on_epoch=None, overwrite: bool = False) -> Path:
    """Train end to end into cfg.out; with resume, continue from cfg.out/last.pt. `on_epoch(epoch)`
    follows each saved epoch. Returns the run directory, whose metrics.json is written last."""
    rank = current_rank()
    if cfg.folds >= 2 or cfg.refit:
        single_process_only("finetune --folds/--refit")
    if rank.distributed:  # torchrun: DistributedDataParallel, each rank on its own device
        cfg = dataclasses.replace(cfg, device=join(rank, cfg.device))
        if cfg.out is None:
            raise ConfigError("under torchrun, give --out: every rank must write to the same run directory")
    run_dir = Path(cfg.out or Path("runs") / f"finetune-{cfg.fusion}-seed{cfg.seed}-{time.strftime('%Y%m%d-%H%M%S')}")
    cfg = resolved(cfg)
    if cfg.folds >= 2:
        return cross_validate(cfg, run_dir, show_progress, log, overwrite)
    if resume and not (run_dir / LAST).is_file():
        raise rundir.RunDirError(f"--resume {run_dir}: no {LAST} there, so nothing to resume")
    lock, failure = None, None
    if rank.is_main:  # rank 0 owns the run directory; the others only read what it writes
        try:
            lock = rundir.lock_run(run_dir) if resume else rundir.claim(run_dir, KIND, overwrite)
        except Exception as err:
            failure = err
    if not every_rank_ok(failure is None, cfg.device):  # alone: whether this process claimed it
        raise failure or rundir.RunDirError(f"{run_dir}: rank 0 could not claim the run directory (its message "
                                            "says why)")
    try:
        run_dir = _train(cfg, run_dir, resume, show_progress and rank.is_main,
                         log if rank.is_main else (lambda *_: None), on_epoch, rank)
        if cfg.refit:
            refit(cfg, read_manifest(run_dir), run_dir, rundir.read_json(run_dir / rundir.METRICS)["best_epoch"],
                  show_progress, log)
        return run_dir
    finally:
        if lock is not None:
            lock.release()


def data_manifest(cfg: FinetuneConfig) -> Manifest:
    items, _ = read_mvsa(cfg.data, cfg.on_bad_image, cfg.on_duplicate)
    return build_manifest(items[: cfg.limit] if cfg.limit else items, cfg.data, cfg.val_ratio, cfg.split_seed,
                          cfg.on_bad_image)


def with_splits(manifest: Manifest, train_rows: np.ndarray, val_rows: np.ndarray) -> Manifest:
    """The manifest with train and val re-dealt (a fold's, or every label train for a refit)."""
    splits = np.full(len(manifest), "test", dtype=object)
    splits[train_rows], splits[val_rows] = "train", "val"
    table = manifest.table.set_column(manifest.table.column_names.index("split"), "split",
                                      pa.array(splits.tolist(), type=pa.string()))
    return Manifest(table, manifest.info)


def cross_validate(cfg: FinetuneConfig, run_dir: Path, show_progress: bool, log, overwrite: bool) -> Path:
    """K end-to-end runs on the manifest's folds, in RUN/fold-k (each a finetune run of its own, resumed
    from its last.pt by a rerun: finished folds are kept), their mean and std in RUN/metrics.json; with
    refit, RUN/refit trains on every label for the folds' mean best epoch. Predict averages the folds."""
    manifest = data_manifest(cfg)  # its folds: a rerun continues only on the same data and options
    config = json.loads(json.dumps({**to_json(cfg), "kind": rundir.CROSS_VALIDATION, "trained_by": KIND,
                                    "out": str(run_dir), "cache": str(run_dir),
                                    "manifest_id": manifest.manifest_id}))  # as it reads back
    lock = rundir.claim(run_dir, rundir.CROSS_VALIDATION, overwrite, continues=config)
    try:
        write_manifest(manifest, run_dir)
        rundir.write_json(run_dir / rundir.CONFIG, config)
        folds = manifest.write_folds(cfg.folds, run_dir / rundir.FOLDS_FILE)
        labelled = np.flatnonzero(folds >= 0)
        per_fold = []
        for k in range(cfg.folds):
            fold_dir = run_dir / f"fold-{k}"
            if not (fold_dir / rundir.METRICS).is_file():
                log(f"fold {k + 1}/{cfg.folds}")
                resume = (fold_dir / LAST).is_file()  # a fold stopped midway continues where it stopped
                if not resume:
                    shutil.rmtree(fold_dir, ignore_errors=True)
                    write_manifest(with_splits(manifest, labelled[folds[labelled] != k], np.flatnonzero(folds == k)),
                                   fold_dir)
                _train(dataclasses.replace(cfg, folds=0, refit=False, out=fold_dir), fold_dir, resume, show_progress,
                       log, None, manifest_given=True)
            per_fold.append(rundir.read_json(fold_dir / rundir.METRICS))
        metrics = {**fold_summary(per_fold), "task": TASK.name}
        if cfg.refit:
            refit(cfg, manifest, run_dir, metrics["best_epoch"], show_progress, log)
        rundir.write_json(run_dir / rundir.METRICS, metrics)  # last: the cross-validation is finished
        return run_dir
    finally:
        lock.release()


def refit(cfg: FinetuneConfig, manifest: Manifest, run_dir: Path, epochs: int, show_progress: bool, log) -> None:
    """The configuration trained again on every labelled item for `epochs`, into RUN/refit (what
    predict uses for RUN); nothing is validated."""
    refit_dir = run_dir / rundir.REFIT_DIR
    if refit_dir.exists():  # a refit stopped before it finished: start it again
        shutil.rmtree(refit_dir)
    write_manifest(with_splits(manifest, manifest.labelled_rows(), np.array([], dtype=np.int64)), refit_dir)
    log(f"refit on {len(manifest.labelled_rows())} labelled items for {epochs} epochs")
    _train(dataclasses.replace(cfg, folds=0, refit=False, out=refit_dir, epochs=epochs), refit_dir, False,
           show_progress, log, None, manifest_given=True)


def training_precision(cfg: FinetuneConfig, spec: dict, model: torch.nn.Module, data: RawData,
                       train_rows: np.ndarray, loss_fn, compute: Compute) -> autotune.Decision | None:
    """--precision auto on a CPU: bf16 autocast or fp32, whichever trained this model faster on
    this machine (msa.training.autotune), timed on the first training batch."""
    if not autotune.measured_here(cfg.precision, compute):
        return None
    rows = torch.from_numpy(train_rows[: cfg.batch_size])
    _, inputs = next(raw_batches(model, data, [rows], compute.device))
    targets = data.targets[rows].to(compute.device)
    key = f"finetune|{json.dumps(spec, sort_keys=True)}|batch={cfg.batch_size}"
    return autotune.decide_training("finetune", key, cfg.epochs * len(train_rows), model, inputs, targets, loss_fn,
                                    compute, steps=1)


def _train(cfg: FinetuneConfig, run_dir: Path, resume: bool, show_progress: bool, log, on_epoch,
           rank: Rank = ALONE, manifest_given: bool = False) -> Path:
    """One run; its manifest is read from run_dir when resuming or given (a fold's, a refit's: a
    refit has no val items, so it trains its epochs without selection), else built from the data."""
    compute = resolve_compute(cfg.device, cfg.precision)  # on a CPU, auto is measured below
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    main = rank.is_main
    spec = model_spec(cfg)
    model = build_model(spec).to(compute.device)
    manifest = run_manifest(cfg, run_dir, resume or manifest_given, main)
    # Under torchrun every rank draws the same global batches (--batch-size) and trains on its
    # share of each; DDP averages the gradients, so a step is the one process's step.
    trained = torch.nn.parallel.DistributedDataParallel(model) if rank.distributed else model
    data = RawData.read(manifest, model.encoders["text"], cfg.clean_text)
    train_rows, val_rows = manifest.rows_of_split("train"), manifest.rows_of_split("val")
    refitting = manifest_given and len(val_rows) == 0
    if len(train_rows) == 0 or (len(val_rows) == 0 and not refitting):
        raise ConfigError(f"{cfg.data}: need both train and val items (have {len(train_rows)} / {len(val_rows)})")

    loss_fn = training_loss(TASK, cfg, data.targets[train_rows].numpy(), compute.device)
    decision = training_precision(cfg, spec, model, data, train_rows, loss_fn, compute)
    if decision:
        compute = decision.applied_to(compute)
        if main:
            rundir.write_json(run_dir / rundir.AUTOTUNE, decision.record())
    step = optimisation(cfg, model, compute, len(train_rows))
    augment = image_augmentation(cfg.image_aug, model.encoders["image"].preprocess.crop)
    lengths = data.lengths()

    def train_epoch(epoch: int) -> dict:
        # Each rank trains on its share of every batch (alone: all of it); a batch too small to
        # give every rank a row is left out.
        batches = [b[rank.rank::rank.world_size] for b in shuffled_batches(train_rows, cfg.batch_size, generator,
                                                                           lengths) if len(b) >= rank.world_size]
        with ItemProgress(f"epoch {epoch}", sum(len(b) for b in batches), show_progress) as advance:
            return train_one_epoch(trained, batches, lambda b: raw_batches(model, data, b, compute.device, augment,
                                                                           advance),
                                   data.targets, loss_fn, step, TASK, generator, Regularisers(cfg.rdrop_alpha))

    def validate() -> tuple[dict, dict]:
        batches = list(torch.from_numpy(val_rows).split(cfg.batch_size * 2))
        # Under torchrun each rank validates its share of the one process's batches: the same
        # numbers, gathered on every rank, so every rank makes the same early-stopping decision.
        shared = rank.distributed and len(batches) >= rank.world_size
        if shared:
            batches = batches[rank.rank::rank.world_size]
        out = evaluate(model, val_rows, raw_batches(model, data, batches, compute.device), data.targets, compute,
                       functools.partial(summed_over_ranks, device=compute.device) if shared else None)
        return {**TASK.metrics(data.targets[val_rows].numpy(), out), "loss": out["loss"]}, out

    def keep_best(state, out: dict | None) -> None:
        if main:
            rundir.save_model(run_dir, model.state_dict(), spec)
            if out is not None:
                rundir.write_val_predictions(run_dir, TASK, manifest, val_rows, out)

    def after_epoch(state) -> None:
        barrier()  # rank 0 has saved the epoch's state before any rank goes on
        if on_epoch:
            on_epoch(state.epoch)

    # The state saved is world-size free, so a resume may use another number of ranks.
    state = fit(train_epoch, None if refitting else validate, TASK, cfg.select, cfg.epochs, cfg.patience, run_dir,
                keep_best, resume_state=run_dir / LAST, stateful={"model": model, **step.state_dicts()},
                generator=generator, log=log, after_epoch=after_epoch, writes=main)
    if main:
        write_metrics(run_dir, state, len(train_rows) if refitting else None)
    barrier()
    return run_dir


def run_manifest(cfg: FinetuneConfig, run_dir: Path, kept_in_run: bool, main: bool) -> Manifest:
    """The run's manifest, read from run_dir (a resume's, a fold's, a refit's) or built from the
    data and written there; config.json beside it."""
    manifest = read_manifest(run_dir) if kept_in_run else data_manifest(cfg)
    if main:
        if not kept_in_run:
            write_manifest(manifest, run_dir)
        rundir.write_json(run_dir / rundir.CONFIG, {**to_json(cfg), "kind": KIND, "out": str(run_dir),
                                                    "cache": str(run_dir)})
    return manifest


def optimisation(cfg: FinetuneConfig, model: torch.nn.Module, compute: Compute, train_items: int) -> Optimisation:
    """AdamW over the layer-wise groups, warm-up then cosine over every step, fp16's scaler on CUDA."""
    optimizer = torch.optim.AdamW(parameter_groups(model, cfg.lr_encoder, cfg.lr_fusion, cfg.lr_head,
                                                   cfg.weight_decay, cfg.layer_decay))
    steps_per_epoch = -(-train_items // (cfg.batch_size * cfg.grad_accum))
    scaler = torch.amp.GradScaler(compute.device.type) if compute.device.type == "cuda" and \
        compute.precision == "fp16" else None
    return Optimisation(optimizer, warmup_cosine(optimizer, cfg.epochs * steps_per_epoch, cfg.warmup_ratio), compute,
                        cfg.grad_accum, cfg.grad_clip, scaler)


def write_metrics(run_dir: Path, state, refit_items: int | None) -> None:
    """metrics.json, written last: the run is finished (a refit's records its epochs and items)."""
    if refit_items is not None:
        metrics = {"task": TASK.name, "refit": {"epochs": state.epoch, "items": refit_items}}
    else:
        metrics = {**state.best_metrics, "task": TASK.name, "best_epoch": state.best_epoch}
        plots.plot_run(run_dir, metrics)
    rundir.write_json(run_dir / rundir.METRICS, metrics)
