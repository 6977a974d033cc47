"""Stage 2: train a fusion head on cached features, in seconds.

Model selection (early stopping, the best epoch) uses the validation split only; test
items are never looked at here.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from msa.cache.manifest import manifest_columns
from msa.core import rundir
from msa.core.compute import Compute, resolve_compute
from msa.core.config import ConfigError, TrainHeadConfig, to_json
from msa.core.progress import ItemProgress
from msa.models.build import build_model
from msa.models.heads import fit_standardisers
from msa.models.registry import HEADS, check_head, modality_warnings
from msa.models.regression import start_linear_paths, starts_closed_form
from msa.models.unfrozen import parameter_groups
from msa.training import autotune, plots
from msa.training.bank import cached_batches
from msa.training.baselines import closed_form_baseline
from msa.training.data import TrainData, load_train_data, task_of
from msa.training.distributed import single_process_only
from msa.training.loop import (
    Optimisation,
    Regularisers,
    evaluate,
    evaluation_order,
    fit,
    shuffled_batches,
    train_one_epoch,
    warmup_cosine,
)
from msa.training.metrics import fold_summary
from msa.training.tasks import task_named, training_loss

KIND = "train-head"  # config.json's "kind": what wrote a run directory
CV_KIND = rundir.CROSS_VALIDATION
@dataclasses.dataclass
class TrainResult:
    run_dir: Path
    metrics: dict
    best_epoch: int
    seconds: float
    warnings: list[str] = dataclasses.field(default_factory=list)  # what a person should look at


def unfrozen(cfg) -> dict[str, int]:
    """Modality -> how many top layers (text) or stages (image) are trained."""
    return {m: k for m, k in (("text", cfg.unfreeze_text_layers), ("image", cfg.unfreeze_image_stages)) if k}


def resolved(cfg: TrainHeadConfig) -> TrainHeadConfig:
    """The config as it runs: the task read from the cache, and a missing batch size, loss and
    selection metric filled in (the head's own batch size; the task's default loss and metric)."""
    # Only the manifest's footer is read: a sweep resolves every planned run's config.
    task = task_named(task_of(manifest_columns(cfg.cache)) if cfg.task == "auto" else cfg.task)
    cfg = dataclasses.replace(cfg, task=task.name, batch_size=cfg.batch_size or HEADS[cfg.fusion].default_batch_size,
                              dropout=HEADS[cfg.fusion].default_dropout if cfg.dropout is None else cfg.dropout,
                              loss=cfg.loss or task.default_loss, select=cfg.select or task.default_select,
                              output_scaling=cfg.output_scaling or HEADS[cfg.fusion].output_scaling)
    if cfg.lora_rank and not cfg.unfreeze_text_layers:
        raise ConfigError("--lora-rank puts adapters in the unfrozen text layers: give --unfreeze-text-layers K too "
                          "(on a cache extracted with --text-split-layer K)")
    if cfg.select not in task.selects:
        raise ConfigError(f"--select must be one of {', '.join(task.selects)} for {task.name}")
    if cfg.loss not in task.losses:
        raise ConfigError(f"--loss {cfg.loss} is not a {task.name} loss; use one of {', '.join(task.losses)}")
    if task.is_regression and cfg.rdrop_alpha > 0:
        raise ConfigError("--rdrop-alpha compares class distributions; it does not apply to regression")
    return cfg


def recorded_options(cfg: TrainHeadConfig) -> dict:
    """The options as config.json records them (a sweep compares these to skip a run)."""
    return {**to_json(resolved(cfg)), "cache": str(Path(cfg.cache).resolve())}


def default_run_dir(cfg: TrainHeadConfig) -> Path:
    return Path("runs") / f"{cfg.fusion}-seed{cfg.seed}-{time.strftime('%Y%m%d-%H%M%S')}"


def model_spec(cfg: TrainHeadConfig, data: TrainData, feature_info: dict) -> dict:
    """What rebuilds this run's model (msa.models.build)."""
    return {"kind": "head", "fusion": cfg.fusion, "hidden": cfg.hidden, "dropout": cfg.dropout,
            "task": cfg.task, "outputs": data.task.outputs, "sequence_encoder": cfg.sequence_encoder,
            "output_scaling": cfg.output_scaling, "unfrozen": unfrozen(cfg), "class_names": list(data.task.classes),
            "dims": {m: dataclasses.asdict(d) for m, d in data.bank.dims().items()}, "feature_sets": feature_info,
            "standardised": [] if HEADS[cfg.fusion].standardises_inputs else
            [m for m, info in feature_info.items() if "imported_from" in info],  # pre-extracted: unscaled
            **({"lora": {"rank": cfg.lora_rank, "targets": list(cfg.lora_targets)}} if cfg.lora_rank else {})}


def run(cfg: TrainHeadConfig, data: TrainData | None = None, log=print, overwrite: bool = False,
        show_progress: bool = False, after_epoch=None) -> TrainResult:
    """Train one head; `data` lets a sweep reuse features already in memory. The run directory
    must be new or empty (or an msa run, replaced with `overwrite`); metrics.json, written
    last, marks it finished. after_epoch(FitState) follows each epoch of a run on one split (a
    search prunes there)."""
    single_process_only("train-head")
    check_head(cfg.fusion)  # before loading features, which can take seconds
    cfg = resolved(cfg)
    if data is None:
        data = load_train_data(cfg.cache, cfg.features, HEADS[cfg.fusion].uses_tokens, tuple(unfrozen(cfg)),
                               cfg.modalities, cfg.task, unfrozen(cfg))
    elif cfg.modalities and tuple(data.feature_sets) != tuple(cfg.modalities):
        data = data.restricted(cfg.modalities)
    check_head(cfg.fusion, list(data.feature_sets))
    if data.task.name != cfg.task:
        raise ConfigError(f"--task {cfg.task}: {cfg.cache} holds {data.task.name} data")
    steps = {m: fs.shapes["tokens"][1] for m, fs in data.feature_sets.items()}
    if HEADS[cfg.fusion].needs_aligned and len(set(steps.values())) > 1:
        raise ConfigError(f"--fusion {cfg.fusion} needs aligned sequences (one time axis for every modality); "
                          f"these have {', '.join(f'{m} {n}' for m, n in steps.items())} steps")
    run_dir = Path(cfg.out) if cfg.out else default_run_dir(cfg)
    lock = rundir.claim(run_dir, CV_KIND if cfg.folds >= 2 else KIND, overwrite)
    try:
        result = (cross_validate(cfg, data, run_dir, log, show_progress) if cfg.folds >= 2
                  else train(cfg, data, run_dir, log, show_progress=show_progress, after_epoch=after_epoch))
        if cfg.refit:
            result.metrics["refit"] = refit(cfg, data, run_dir, result.best_epoch, log, show_progress)
            rundir.write_json(run_dir / rundir.METRICS, result.metrics)
        return result
    finally:
        lock.release()


def cross_validate(cfg: TrainHeadConfig, data: TrainData, run_dir: Path, log=print,
                   show_progress: bool = False) -> TrainResult:
    """K runs, fold k the validation items of run k and the other folds its training items (every
    labelled item, the extract's train and val alike), in RUN/fold-k; RUN/metrics.json holds the
    mean and std over folds, and predict averages the folds' probabilities."""
    rundir.write_json(run_dir / rundir.CONFIG, {**recorded_options(cfg), "kind": CV_KIND, "out": str(run_dir),
                                                "modalities_used": list(data.feature_sets)})
    # The cache's own folds: every run of it uses the same
    every_fold = data.manifest.write_folds(cfg.folds, run_dir / rundir.FOLDS_FILE)
    labelled = np.flatnonzero(every_fold >= 0)
    folds = every_fold[labelled]
    results = []
    for k in range(cfg.folds):
        log(f"fold {k + 1}/{cfg.folds}")
        rows = (labelled[folds != k], labelled[folds == k])
        results.append(train(dataclasses.replace(cfg, folds=0), data, run_dir / f"fold-{k}", log, rows, show_progress))
    metrics = {**fold_summary([r.metrics for r in results]), "task": data.task.name}
    keys = [k for k in metrics if f"{k}_std" in metrics]
    if cfg.baseline:  # the folds' baselines, averaged as the run's metrics are
        baselines = [r.metrics["baseline"] for r in results]
        metrics["baseline"] = {"model": baselines[0]["model"], **{k: float(np.mean([b[k] for b in baselines]))
                                                                  for k in keys if k in baselines[0]}}
    rundir.write_json(run_dir / rundir.METRICS, metrics)  # last: the cross-validation is finished
    fold_warnings = [w for r in results for w in r.warnings if "baseline" not in w]
    return TrainResult(run_dir, metrics, metrics["best_epoch"], sum(r.seconds for r in results),
                       list(dict.fromkeys(fold_warnings)) + baseline_warnings(metrics, data.task))


def train(cfg: TrainHeadConfig, data: TrainData, run_dir: Path, log=print,
          rows: tuple[np.ndarray, np.ndarray] | None = None, show_progress: bool = False,
          after_epoch=None) -> TrainResult:
    """One run into run_dir, on the extract's train/val split or on `rows` (train, val)."""
    spec = write_run_config(cfg, data, run_dir)
    train_rows, val_rows = rows or (data.manifest.rows_of_split("train"), data.manifest.rows_of_split("val"))
    if len(train_rows) == 0 or len(val_rows) == 0:
        raise ConfigError(f"{cfg.cache}: need both train and val items (have {len(train_rows)} / {len(val_rows)})")
    model, train_epoch, load, lengths, (compute, decision) = prepare_training(cfg, data, spec, train_rows,
                                                                              show_progress)

    def validate() -> tuple[dict, dict]:
        # In fp32 whatever the training precision: the val predictions equal what `msa predict` gives.
        out = evaluate(model, val_rows, load(evaluation_order(val_rows, lengths, 256)), data.targets)
        return {**data.task.metrics(data.targets[val_rows].numpy(), out), "loss": out["loss"]}, out

    best = {}

    def keep_best(state, out: dict) -> None:
        best.update(state_dict=copy.deepcopy(model.state_dict()), out=out)

    start = time.perf_counter()
    try:
        state = fit(train_epoch, validate, data.task, cfg.select, cfg.epochs, cfg.patience, run_dir, keep_best,
                    log=log, judge_start=starts_closed_form(model), after_epoch=after_epoch)
    except KeyboardInterrupt:
        if best:  # the best model so far is kept (no metrics.json: the run is unfinished, and its rerun retrains)
            rundir.save_model(run_dir, best["state_dict"], spec)
            rundir.write_val_predictions(run_dir, data.task, data.manifest, val_rows, best["out"],
                                         list(data.feature_sets))
        raise
    seconds = time.perf_counter() - start
    metrics = {**state.best_metrics, "task": data.task.name, "best_epoch": state.best_epoch, "train_seconds": seconds,
               "precision": compute.precision}
    if cfg.baseline:
        pooled = {m: data.bank.pooled[m].numpy() for m in data.feature_sets}
        metrics["baseline"] = closed_form_baseline(data.task, pooled, data.targets.numpy(), train_rows, val_rows)
    if decision:  # how fast, not how good: beside the metrics, not in them
        rundir.write_json(run_dir / rundir.AUTOTUNE, decision.record())
    rundir.save_model(run_dir, best["state_dict"], spec)
    rundir.write_val_predictions(run_dir, data.task, data.manifest, val_rows, best["out"], list(data.feature_sets))
    plots.plot_run(run_dir, metrics)
    rundir.write_json(run_dir / rundir.METRICS, metrics)  # last: the run is finished
    return TrainResult(run_dir, metrics, state.best_epoch, seconds,
                       modality_warnings(cfg.fusion, list(data.feature_sets))
                       + collapse_warnings(best["out"], data.task.classes, data.targets[val_rows].numpy())
                       + baseline_warnings(metrics, data.task))


def refit(cfg: TrainHeadConfig, data: TrainData, run_dir: Path, epochs: int, log=print,
          show_progress: bool = False) -> dict:
    """The selected configuration trained again on every labelled item (train and val) for the
    epochs selection found, into RUN/refit, a run directory of its own that predict uses for RUN.
    The schedule is selection's (sized for --epochs), cut at the selected epoch; nothing is
    validated, so RUN's metrics stay those of selection."""
    refit_dir = run_dir / rundir.REFIT_DIR
    if refit_dir.exists():  # a refit killed before it finished: start it again
        shutil.rmtree(refit_dir)
    spec = write_run_config(dataclasses.replace(cfg, refit=False, folds=0), data, refit_dir)  # a plain run
    rows = np.flatnonzero(np.isin(data.manifest.column("split"), ("train", "val")))
    model, train_epoch, *_ = prepare_training(cfg, data, spec, rows, show_progress)
    log(f"refit on {len(rows)} labelled items for {epochs} epochs")
    start = time.perf_counter()
    fit(train_epoch, None, data.task, cfg.select, epochs, cfg.patience, refit_dir, lambda *_: None, log=log)
    rundir.save_model(refit_dir, model.state_dict(), spec)
    summary = {"epochs": epochs, "items": len(rows), "seconds": time.perf_counter() - start}
    rundir.write_json(refit_dir / rundir.METRICS, {"task": data.task.name, "refit": summary})
    return summary


def write_run_config(cfg: TrainHeadConfig, data: TrainData, run_dir: Path) -> dict:
    """config.json of a run, and the model spec it trains."""
    # With the extract options (and the caption config, for text made from captions), the run
    # directory alone can extract new data for prediction.
    feature_info = {m: {"name": fs.name, "fingerprint": fs.fingerprint, **fs.notes}
                    for m, fs in data.feature_sets.items()}
    run_dir.mkdir(parents=True, exist_ok=True)
    rundir.write_json(run_dir / rundir.CONFIG, {**recorded_options(cfg), "kind": KIND, "out": str(run_dir),
                                                "modalities_used": list(data.feature_sets),
                                                "feature_sets": feature_info})
    return model_spec(cfg, data, feature_info)


def prepare_training(cfg: TrainHeadConfig, data: TrainData, spec: dict, train_rows: np.ndarray,
                     show_progress: bool = False):
    """The model and one epoch's training on train_rows: (model, train_epoch, load, lengths,
    (compute, how --precision auto chose its precision or None))."""
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    compute = resolve_compute(cfg.device, "fp32" if cfg.precision == "auto" else cfg.precision)
    model = build_model(spec)
    fit_standardisers(model, data.bank.statistics(train_rows))  # from the training rows only
    start_linear_paths(model, {m: data.bank.pooled[m][train_rows] for m in data.feature_sets},
                       data.targets[train_rows])
    model = model.to(compute.device)
    loss_fn = training_loss(data.task, cfg, data.targets[train_rows].numpy(), compute.device)
    decision = training_precision(cfg, data, spec, model, loss_fn, train_rows, compute)
    if decision:
        compute = decision.applied_to(compute)
    counts = unfrozen(cfg)
    # fused: one kernel for all parameters; the default per-parameter loop was 24% of an epoch.
    groups = (parameter_groups(model, cfg.lr_encoder, cfg.lr_fusion, cfg.lr_head, cfg.weight_decay, cfg.layer_decay)
              if counts else model.parameters())
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    steps_per_epoch = -(-len(train_rows) // (cfg.batch_size * cfg.grad_accum))
    step = Optimisation(optimizer, warmup_cosine(optimizer, cfg.epochs * steps_per_epoch, cfg.warmup_ratio), compute,
                        cfg.grad_accum, cfg.grad_clip)
    regularisers = Regularisers(cfg.rdrop_alpha, cfg.modality_dropout, cfg.aux_weight)
    # Batches depend on the model alone, not on whether a sweep loaded tokens for other runs;
    # a text top runs transformer layers, so it gets length buckets too.
    lengths = data.bank.lengths() if model.uses_tokens or counts else None

    def load(batches):
        return cached_batches(data.bank, batches, model.uses_tokens, compute.device)

    def train_epoch(epoch: int) -> dict:
        batches = shuffled_batches(train_rows, cfg.batch_size, generator, lengths)
        # A bar inside the epoch, for long ones (unfrozen layers, token heads); gone when the epoch
        # ends, its line being the record, and silent where stderr is no terminal.
        with ItemProgress(f"epoch {epoch}", sum(map(len, batches)), show_progress, transient=True) as advance:
            def counted(batches):
                for rows, inputs in load(batches):
                    yield rows, inputs
                    advance(len(rows))

            return train_one_epoch(model, batches, counted, data.targets, loss_fn, step, data.task, generator,
                                   regularisers)

    return model, train_epoch, load, lengths, (compute, decision)


MEASURED_STEPS = 3  # --precision auto times this many training steps per precision (after a warm-up one)


def training_precision(cfg: TrainHeadConfig, data: TrainData, spec: dict, model: torch.nn.Module, loss_fn,
                       train_rows: np.ndarray, compute: Compute) -> autotune.Decision | None:
    """--precision auto on a CPU: bf16 autocast or fp32, whichever trained this head faster on
    this machine (msa.training.autotune)."""
    if not autotune.measured_here(cfg.precision, compute):
        return None
    rows = torch.from_numpy(train_rows[: cfg.batch_size])
    _, inputs = next(cached_batches(data.bank, [rows], model.uses_tokens, compute.device))
    targets = data.targets[rows].to(compute.device)
    shapes = {m: [d["pooled"], d["token"]] for m, d in spec["dims"].items()}
    key = (f"train|{cfg.fusion}|{json.dumps(shapes)}|batch={cfg.batch_size}|hidden={cfg.hidden}|"
           f"unfrozen={json.dumps(spec['unfrozen'])}|tokens={model.uses_tokens}")
    return autotune.decide_training("train-head", key, cfg.epochs * len(train_rows), model, inputs, targets, loss_fn,
                                    compute, MEASURED_STEPS)


def baseline_warnings(metrics: dict, task) -> list[str]:
    """A head behind the linear model on the same features learned nothing the features did not say linearly."""
    gap = task.baseline_gap(metrics)
    if gap is None or gap >= 0:
        return []
    metric, title = task.key_metric
    return [f"the run is behind its linear baseline on {title} ({metrics[metric]:.4f} against "
            f"{metrics['baseline'][metric]:.4f}); try another --fusion, a lower --lr, more --dropout or "
            "--weight-decay, or fewer --epochs"]


SMALL_VAL_CLASS = 10  # val items of a class under which its F1 is noise


def collapse_warnings(val: dict, classes: tuple[str, ...], targets: np.ndarray | None = None) -> list[str]:
    """What a person should look at in a classifier's best epoch: one class predicted for every
    val item (it learned nothing useful), a class it never predicts, a class with few val items."""
    if not val["probabilities"].size:
        return []
    predicted = sorted(set(val["probabilities"].argmax(1).tolist()))
    if len(predicted) == 1:
        warnings = [f"the best epoch predicts {classes[predicted[0]]} for every val item (the head collapsed to one "
                    "class); try --loss weighted-ce, a lower --lr or more --epochs"]
    else:
        warnings = [f"the best epoch never predicts {name} on val (its F1 is 0); try --loss weighted-ce or "
                    "--select macro_f1" for i, name in enumerate(classes) if i not in predicted]
    if targets is not None:
        counts = np.bincount(targets[targets >= 0].astype(int), minlength=len(classes))
        warnings += [f"val holds {n} {name} item{'s' if n != 1 else ''}: its scores are noise; use --folds 5 "
                     "(every labelled item validated once)" for name, n in zip(classes, counts) if n < SMALL_VAL_CLASS]
    return warnings
