"""`msa sweep --search optuna`: trials chosen by Optuna's TPE sampler rather than a grid.

Each trial is a train-head run (SWEEP/trial-NNN) on features loaded once, its options drawn
from a search space; the median pruner stops a trial whose best val score after an epoch is
below the median of earlier trials at that epoch. The study lives in SWEEP/study.db (SQLite),
so a rerun continues it: trials a killed search left running are marked failed and asked
again. The sampler is seeded with the first --seeds value, so the same command on a new
directory draws the same trials. Finished trials make the same results and leaderboard
files as a grid.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pandas as pd
import torch

from msa.core.config import ConfigError, SweepConfig, TrainHeadConfig, read_config_file
from msa.core.progress import progress_bar
from msa.stages import sweep, train_head
from msa.training.tasks import LARGER_IS_BETTER

STUDY_FILE = "study.db"
# Searched when --space names no file: the options that moved val macro-F1 most on MVSA.
DEFAULT_SPACE = {
    "lr": {"low": 3e-5, "high": 3e-3, "log": True},
    "weight_decay": {"low": 1e-4, "high": 0.1, "log": True},
    "dropout": {"low": 0.0, "high": 0.5},
    "hidden": {"choices": [128, 256, 512]},
}
PRUNER_STARTUP_TRIALS = 5  # trials that always run to the end: the median needs them
PRUNER_WARMUP_EPOCHS = 3  # a trial is never pruned before this many epochs


def read_space(path: Path) -> dict:
    """A search space file (TOML, YAML or JSON): per train-head option, {low, high[, log]} or
    {choices: [...]}; checked against the options' fields."""
    try:
        space = read_config_file(Path(path))
    except (ValueError, ImportError) as err:  # tomllib's and json's decode errors are ValueErrors
        raise ConfigError(f"--space {path}: not valid {path.suffix.lstrip('.') or 'JSON'} ({err})") from None
    if not isinstance(space, dict) or not space:
        raise ConfigError(f"--space {path}: expected a table of options, e.g. lr = {{low = 1e-4, high = 1e-2}}")
    return check_space(space, str(path))


def space_of(cfg: SweepConfig) -> dict:
    return read_space(cfg.space) if cfg.space else DEFAULT_SPACE


def check_space(space: dict, where: str) -> dict:
    fields = {f.name for f in dataclasses.fields(TrainHeadConfig)} - {"cache", "out", "seed", "fusion"}
    for name, spec in space.items():
        if name not in fields:
            raise ConfigError(f"--space {where}: {name!r} is not a train-head option one can search")
        ranged = isinstance(spec, dict) and {"low", "high"} <= set(spec) and \
            all(isinstance(spec[k], int | float) for k in ("low", "high")) and spec["low"] < spec["high"]
        listed = isinstance(spec, dict) and isinstance(spec.get("choices"), list) and spec["choices"]
        if not (ranged or listed):
            raise ConfigError(f"--space {where}: {name} needs low < high (numbers) or a list of choices")
        for value in (spec.get("choices") or [spec["low"], spec["high"]]):
            dataclasses.replace(TrainHeadConfig(), **{name: value})  # the option's own range check
    return space


def suggest(trial, space: dict) -> dict:
    """One trial's options from the space (integers where both bounds are: batch_size = {low = 16,
    high = 64}; as Ray Tune's domains are chosen)."""
    options = {}
    for name, spec in space.items():
        if "choices" in spec:
            options[name] = trial.suggest_categorical(name, spec["choices"])
        elif isinstance(spec["low"], int) and isinstance(spec["high"], int):
            options[name] = trial.suggest_int(name, int(spec["low"]), int(spec["high"]), log=spec.get("log", False))
        else:
            options[name] = trial.suggest_float(name, spec["low"], spec["high"], log=spec.get("log", False))
    return options


def run(cfg: SweepConfig, show_progress: bool = True) -> pd.DataFrame:
    """Run trials until cfg.trials are finished (completed or pruned), here or on Ray Tune; the
    results table of the completed ones, as a grid's."""
    space = space_of(cfg)
    sweep.check_before_work(cfg)
    select = train_head.resolved(dataclasses.replace(cfg.base, fusion=cfg.fusions[0])).select
    lock = sweep.claim_sweep(cfg)
    try:
        trials = tune_trials(cfg, space, select) if cfg.backend == "ray" else \
            local_trials(cfg, space, select, show_progress)
        if not trials:
            raise ConfigError(f"{cfg.out}: no trial so far finished (pruned or failed); rerun with more --trials "
                              "to continue the study")
        runs = [dataclasses.replace(cfg.base, seed=cfg.seeds[0], **options, out=cfg.out / name)
                for name, options in trials]
        table = sweep.results_table(runs, dict.fromkeys(space))
        table.to_parquet(cfg.out / "results.parquet", index=False)
        table.to_csv(cfg.out / "results.csv", index=False)
        sweep.write_leaderboard(table, dataclasses.replace(cfg, grid={k: () for k in space}))
    finally:
        lock.release()
    return table


def local_trials(cfg: SweepConfig, space: dict, select: str, show_progress: bool) -> list[tuple[str, dict]]:
    """Trials one after another here, on features loaded once: (run name, options) of the completed."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name="msa", storage=f"sqlite:///{(cfg.out / STUDY_FILE).resolve()}", load_if_exists=True,
        direction="maximize" if LARGER_IS_BETTER[select] else "minimize",
        pruner=optuna.pruners.MedianPruner(PRUNER_STARTUP_TRIALS, PRUNER_WARMUP_EPOCHS))
    # Seeded by the trials so far as well: a continued study draws new trials, not the first ones again.
    study.sampler = optuna.samplers.TPESampler(seed=cfg.seeds[0] + len(study.trials))
    for stale in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study.tell(stale.number, state=optuna.trial.TrialState.FAIL)  # a killed search's
    finished_states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    done = len(study.get_trials(deepcopy=False, states=finished_states))
    data = None
    with progress_bar(show_progress) as bar:
        task = bar.add_task("search", total=cfg.trials, completed=min(done, cfg.trials), rate="")
        while done < cfg.trials:
            trial = study.ask()
            options = {"fusion": trial.suggest_categorical("fusion", list(cfg.fusions)) if len(cfg.fusions) > 1
                       else cfg.fusions[0], **suggest(trial, space)}
            run_cfg = dataclasses.replace(cfg.base, seed=cfg.seeds[0], **options,
                                          out=cfg.out / f"trial-{trial.number:03d}")
            if data is None:  # every fusion's needs: the trials' heads differ
                data = sweep.shared_data(sweep.plan(cfg))
            outcome = train_trial(trial, run_cfg, data, select)
            done += 1
            bar.update(task, advance=1, rate=f"trial {trial.number}: {outcome}")
    completed = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    return [(f"trial-{t.number:03d}", {"fusion": cfg.fusions[0], **t.params}) for t in completed]


def tune_trials(cfg: SweepConfig, space: dict, select: str) -> list[tuple[str, dict]]:
    """The same search on Ray Tune: Optuna's TPE through OptunaSearch, ASHA stopping trials on
    the per-epoch val score, --workers trials at a time, each loading the features itself.
    Trials write SWEEP/trial-ID where they run (a cluster: --out and the cache on a shared
    filesystem); a rerun restores the experiment and finishes its unfinished trials."""
    try:
        from ray import tune
        from ray.tune.schedulers import ASHAScheduler
        from ray.tune.search.optuna import OptunaSearch
    except ImportError:
        raise ConfigError('--backend ray needs Ray Tune: pip install "msa[ray]"') from None
    mode = "max" if LARGER_IS_BETTER[select] else "min"
    param_space = {"fusion": tune.choice(list(cfg.fusions)),
                   **{name: tune_domain(spec) for name, spec in space.items()}}
    with sweep.ray_session(cfg.workers, cfg.address) as ray:
        threads = max(1, int(ray.available_resources().get("CPU", 1)) // cfg.workers)
        base = dataclasses.replace(cfg.base, cache=Path(cfg.base.cache).resolve(), seed=cfg.seeds[0])
        trainable = tune.with_resources(tune.with_parameters(tune_trial, base=base, out=cfg.out.resolve(),
                                                             select=select, threads=threads), {"cpu": threads})
        storage = (cfg.out / "ray-tune").resolve()
        if tune.Tuner.can_restore(storage / "study"):
            tuner = tune.Tuner.restore(str(storage / "study"), trainable=trainable, resume_errored=True)
        else:
            tuner = tune.Tuner(trainable, param_space=param_space, tune_config=tune.TuneConfig(
                search_alg=OptunaSearch(metric="score", mode=mode, seed=cfg.seeds[0]),
                # max_t past the last epoch: at max_t ASHA ends a trial right after its report, before
                # the run writes its metrics; it is to stop only the trials behind.
                scheduler=ASHAScheduler(time_attr="epoch", metric="score", mode=mode, max_t=cfg.base.epochs + 1,
                                        grace_period=PRUNER_WARMUP_EPOCHS),
                num_samples=cfg.trials, max_concurrent_trials=cfg.workers),
                run_config=tune.RunConfig(storage_path=str(storage), name="study", verbose=0))
        results = tuner.fit()
    trials = []
    for result in results:
        name = f"trial-{result.metrics.get('trial_id', '')}" if result.metrics else ""
        if name and (cfg.out / name / "metrics.json").is_file():
            trials.append((name, {k: v for k, v in result.config.items() if k in param_space}))
    return sorted(trials)


def tune_domain(spec: dict):
    from ray import tune

    if "choices" in spec:
        return tune.choice(spec["choices"])
    if isinstance(spec["low"], int) and isinstance(spec["high"], int):
        return tune.lograndint(spec["low"], spec["high"] + 1) if spec.get("log") else \
            tune.randint(spec["low"], spec["high"] + 1)
    return tune.loguniform(spec["low"], spec["high"]) if spec.get("log") else tune.uniform(spec["low"], spec["high"])


def tune_trial(options: dict, base: TrainHeadConfig, out: Path, select: str, threads: int) -> None:
    """One Ray Tune trial: a train-head run reporting its best val score after each epoch."""
    from ray import tune

    torch.set_num_threads(threads)
    trial_id = tune.get_context().get_trial_id()
    larger = LARGER_IS_BETTER[select]

    def report(state) -> None:
        tune.report({"score": state.best_score if larger else -state.best_score, "epoch": state.epoch,
                     "trial_id": trial_id})

    run_cfg = dataclasses.replace(base, **options, out=out / f"trial-{trial_id}")
    train_head.run(run_cfg, log=lambda *_: None, overwrite=True, after_epoch=report if base.folds < 2 else None)


def train_trial(trial, run_cfg: TrainHeadConfig, data, select: str) -> str:
    """Train one trial, reporting its best val score after each epoch; tells the study how it ended."""
    import optuna

    larger = LARGER_IS_BETTER[select]

    def report(state) -> None:
        trial.report(state.best_score if larger else -state.best_score, state.epoch)
        if trial.should_prune():
            raise optuna.TrialPruned()

    try:
        result = train_head.run(run_cfg, data=data, log=lambda *_: None, overwrite=True,
                                after_epoch=report if run_cfg.folds < 2 else None)
    except optuna.TrialPruned:
        trial.study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        return "pruned"
    trial.study.tell(trial, result.metrics[select])
    return f"val {select} {result.metrics[select]:.3f}"
