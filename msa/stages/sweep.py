"""Sweeps: the cross product of heads x seeds x grid values, one run directory each.

Features are loaded once and shared by every run. A run whose `metrics.json` exists is
finished and skipped, so an interrupted sweep picks up where it stopped. The results
table (one row a run) is rebuilt from the run directories, never from stdout.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import itertools
import json
import multiprocessing
import os
import queue
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from rich.table import Table

from msa.cache.manifest import read_manifest
from msa.core import rundir
from msa.core.config import ConfigError, SweepConfig, TrainHeadConfig, to_json
from msa.core.progress import console, progress_bar
from msa.models.registry import HEADS, check_head
from msa.stages import train_head
from msa.training.data import select_feature_sets
from msa.training.distributed import single_process_only
from msa.training.tasks import LARGER_IS_BETTER, TASKS, task_of_metrics


def parse_grid(specs: list[str]) -> dict[str, tuple]:
    """`lr=1e-3,3e-4` -> {"lr": (0.001, 0.0003)}, values typed like the config field."""
    fields = {f.name: f for f in dataclasses.fields(TrainHeadConfig)}
    grid = {}
    for spec in specs:
        key, _, values = spec.partition("=")
        key = key.strip().replace("-", "_")
        if key not in fields or not values:
            raise ConfigError(f"--grid {spec!r}: expected FIELD=V1,V2 with a train-head option as FIELD")
        try:
            grid[key] = tuple(_typed(TrainHeadConfig(), key, v) for v in values.split(","))
        except ValueError:
            kind = type(getattr(TrainHeadConfig(), key)).__name__
            raise ConfigError(f"--grid {spec!r}: every value must be of type {kind}") from None
    return grid


def parse_seeds(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise ConfigError(f"--seeds {text!r}: expected whole numbers, comma-separated (0,1,2)") from None


def _typed(config: TrainHeadConfig, key: str, value: str):
    """A grid value as the field's type; fields defaulting to None take numbers if they parse;
    tuple fields take `+`-joined values (`modalities=text,text+audio`)."""
    kind = type(getattr(config, key))
    if kind is tuple:
        return tuple(v for v in value.split("+") if v)
    if kind in (int, float):
        return kind(value)
    if getattr(config, key) is None:
        for number in (int, float):
            try:
                return number(value)
            except ValueError:
                pass
    return value


def run_name(fusion: str, seed: int, overrides: dict) -> str:
    parts = [fusion] + [f"{k}={'+'.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in overrides.items()]
    parts.append(f"seed{seed}")
    return "-".join(parts).replace("/", "_")


def plan(cfg: SweepConfig) -> list[TrainHeadConfig]:
    keys = list(cfg.grid)
    configs = []
    for fusion in cfg.fusions:
        for values in itertools.product(*(cfg.grid[k] for k in keys)):
            overrides = dict(zip(keys, values))
            for seed in cfg.seeds:
                configs.append(dataclasses.replace(cfg.base, fusion=fusion, seed=seed, **overrides,
                                                   out=cfg.out / run_name(fusion, seed, overrides)))
    return configs


SWEEP_FILE = "sweep.json"  # marks a sweep directory: a later sweep into it resumes


def finished(run_cfg: TrainHeadConfig, overwrite: bool = False) -> bool:
    """A run is done when its metrics exist and it ran with exactly these options. A finished
    run with other options is never replaced silently: that takes `overwrite`."""
    if not rundir.is_finished(run_cfg.out):
        return False
    saved = rundir.read_json(run_cfg.out / rundir.CONFIG)
    # An option a run predates (absent from its record) counts as its default.
    defaults = to_json(TrainHeadConfig())
    differing = sorted(k for k, v in train_head.recorded_options(run_cfg).items()
                       if k != "out" and saved.get(k, defaults.get(k)) != v)
    if differing and not overwrite:
        raise rundir.RunDirError(f"{run_cfg.out} holds a finished run with other options ({', '.join(differing)}); "
                                 "pass --overwrite to train it again, or choose another --out")
    return not differing


def claim_sweep(cfg: SweepConfig):
    """Hold the sweep directory's lock (one sweep at a time in it); refuse a directory that is
    neither empty nor a sweep's."""
    lock = rundir.lock_run(cfg.out)
    if cfg.out.exists() and any(cfg.out.iterdir()) and not (cfg.out / SWEEP_FILE).is_file():
        lock.release()
        raise rundir.RunDirError(f"--out {cfg.out}: not empty and not a sweep directory; choose another --out")
    cfg.out.mkdir(parents=True, exist_ok=True)
    rundir.write_json(cfg.out / SWEEP_FILE, {"kind": "sweep", "fusions": list(cfg.fusions), "seeds": list(cfg.seeds),
                                             "grid": {k: list(v) for k, v in cfg.grid.items()},
                                             "base": to_json(cfg.base)})
    return lock


def check_before_work(cfg: SweepConfig) -> None:
    """Every head known and fitting the cache's modalities, the cache there and its options
    valid, before the sweep directory is made (a bad sweep leaves nothing behind)."""
    if not cfg.fusions or not cfg.seeds:
        raise ConfigError("--fusion and --seeds each need at least one value")
    for fusion in cfg.fusions:
        check_head(fusion)
    for run_cfg in plan(cfg):  # every grid value checked as its run's option
        train_head.resolved(run_cfg)  # reads the cache's footer: a missing cache fails here
    if "modalities" not in cfg.grid and "features" not in cfg.grid:
        sets = select_feature_sets(cfg.base.cache, read_manifest(cfg.base.cache), cfg.base.features,
                                   cfg.base.modalities)
        for fusion in cfg.fusions:
            check_head(fusion, list(sets))


def run(cfg: SweepConfig, show_progress: bool = True, overwrite: bool = False) -> pd.DataFrame:
    single_process_only("sweep")
    check_before_work(cfg)
    lock = claim_sweep(cfg)
    try:
        runs = plan(cfg)
        todo = [r for r in runs if not finished(r, overwrite)]
        if len(todo) < len(runs):
            console.print(f"{len(runs) - len(todo)} of {len(runs)} runs already finished; skipping them")
        if todo:
            with progress_bar(show_progress) as bar:
                task = bar.add_task("sweep", total=len(todo), rate="")

                def advance(name: str) -> None:
                    bar.update(task, advance=1, rate=name)

                if cfg.backend == "ray":
                    run_on_ray(todo, cfg.workers, cfg.address, advance)
                elif cfg.workers > 1 and len(todo) > 1:
                    run_in_workers(todo, cfg.workers, advance)
                else:
                    train_share(todo, torch.get_num_threads(), advance)
        table = results_table(runs, cfg.grid)
        table.to_parquet(cfg.out / "results.parquet", index=False)
        table.to_csv(cfg.out / "results.csv", index=False)
        write_leaderboard(table, cfg)
    finally:
        lock.release()
    return table


def train_share(runs: list[TrainHeadConfig], threads: int, finished) -> None:
    """Train runs one after another on features loaded once; finished("NAME: val METRIC") after
    each. A run directory left unfinished by a killed sweep belongs to this sweep, so it is
    started again."""
    torch.set_num_threads(threads)
    data = shared_data(runs)
    for run_cfg in runs:
        result = train_head.run(run_cfg, data=data, log=lambda *_: None, overwrite=True)
        metric = task_of_metrics(result.metrics).leaderboard[0][0]
        finished(f"{run_cfg.out.name}: val {metric} {result.metrics[metric]:.3f}")


def shared_data(runs: list[TrainHeadConfig]):
    """The features every run reads, loaded once: tokens if a head needs them, the split
    activations of every unfrozen top. Runs that differ in --modalities share the data of every
    modality and take their part."""
    with_tokens = any(HEADS[r.fusion].uses_tokens for r in runs)
    split_names = tuple(sorted({m for r in runs for m in train_head.unfrozen(r)}))
    modalities = runs[0].modalities if len({r.modalities for r in runs}) == 1 else ()
    return train_head.load_train_data(runs[0].cache, runs[0].features, with_tokens, split_names, modalities,
                                      runs[0].task)


def _worker_start(names) -> None:
    """In each worker: report through `names`, and die with the sweep (a killed sweep leaves no
    worker training on)."""
    global _report
    _report = names.put
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


_report = None


def _train_share_in_worker(runs: list[TrainHeadConfig], threads: int) -> None:
    train_share(runs, threads, _report)


def run_in_workers(runs: list[TrainHeadConfig], workers: int, finished) -> None:
    """Runs dealt round-robin to worker processes, each with its share of the CPU threads
    and its own copy of the features. Small heads are bound by per-step overhead, which
    one thread each hides better than two threads in one process: on MVSA, 2 cores, 4
    concat runs took 11.7 s in 2 workers and 17.8 s in one process; a whole sweep of 12
    pooled-head runs 26.8 s against 30.8 s, worker start-up included."""
    workers = min(workers, len(runs))
    threads = max(1, torch.get_num_threads() // workers)
    context = multiprocessing.get_context("spawn")  # fork after torch's thread pools start can hang
    names = context.Queue()
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_start,
                                                initargs=(names,)) as pool:
        futures = [pool.submit(_train_share_in_worker, runs[i::workers], threads) for i in range(workers)]
        reported = 0
        while reported < len(runs):
            try:
                finished(names.get(timeout=0.5))
                reported += 1
            except queue.Empty:
                failed = [f for f in futures if f.done() and f.exception()]
                if failed:
                    raise failed[0].exception() from None


def _train_share_on_ray(runs: list[TrainHeadConfig], threads: int) -> list[str]:
    names: list[str] = []
    train_share(runs, threads, names.append)
    return names


def run_on_ray(runs: list[TrainHeadConfig], workers: int, address: str | None, finished) -> None:
    """Runs dealt round-robin to `workers` Ray tasks, each loading the features once for its
    share and asking for its CPU threads (and a GPU where the runs use one). The run
    directories are written where the tasks run: on a cluster, put --out and the cache on a
    filesystem every node mounts. Without --address, a Ray instance is started here."""
    with ray_session(workers, address) as ray:
        workers = min(workers, len(runs))
        threads = max(1, int(ray.available_resources().get("CPU", 1)) // workers)
        gpus = 1 if any(r.device == "cuda" for r in runs) else 0
        task = ray.remote(_train_share_on_ray).options(num_cpus=threads, num_gpus=gpus)
        pending = [task.remote(runs[i::workers], threads) for i in range(workers)]
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for name in ray.get(done[0]):  # a failed task raises its error here
                finished(name)


@contextlib.contextmanager
def ray_session(workers: int, address: str | None):
    """Ray, joined at `address` or started here with a CPU per worker at least (and shut down
    after, if started here); a sweep's and a search's."""
    try:
        import ray
    except ImportError:
        raise ConfigError('--backend ray needs Ray: pip install "msa[ray]" (or pip install ray)') from None
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 **({} if address else {"num_cpus": max(workers, torch.get_num_threads())}))
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


def results_table(runs: list[TrainHeadConfig], grid: dict) -> pd.DataFrame:
    rows = []
    for run_cfg in runs:
        metrics = rundir.read_json(run_cfg.out / rundir.METRICS)
        task = task_of_metrics(metrics)
        # What the run read, so that a leaderboard never shows a unimodal run as a multimodal one.
        used = rundir.read_json(run_cfg.out / rundir.CONFIG)["modalities_used"]
        rows.append({"run": run_cfg.out.name, "task": task.name, "fusion": run_cfg.fusion, "seed": run_cfg.seed,
                     **{k: getattr(run_cfg, k) for k in grid}, "modalities_used": "+".join(used),
                     **{k: metrics.get(k) for k in task.results},
                     "vs_baseline": task.baseline_gap(metrics)})
    return pd.DataFrame(rows)


def leaderboard(table: pd.DataFrame, grid_keys: list[str]) -> pd.DataFrame:
    """Mean and std over seeds per configuration, best first (by the task's first leaderboard metric)."""
    keys = ["fusion", *grid_keys, "modalities_used"]  # what a configuration read is part of what it is
    task = TASKS[table["task"].iloc[0]]
    # vs_baseline: the key metric's lead over the linear baseline (negative: the head learned less)
    metrics = [m for m, _ in task.leaderboard] + ["vs_baseline", "train_seconds"]
    grouped = table.groupby(keys, dropna=False)[metrics].agg(["mean", "std"])
    grouped.columns = [f"{m}_{s}" for m, s in grouped.columns]
    grouped["runs"] = table.groupby(keys, dropna=False).size()
    grouped["task"] = task.name
    sort_by = metrics[0]
    return grouped.sort_values(f"{sort_by}_mean", ascending=not LARGER_IS_BETTER[sort_by]).reset_index()


def best_run(table: pd.DataFrame, board: pd.DataFrame, grid_keys: list[str]) -> str:
    """The run directory of the leaderboard's first configuration with its best key metric."""
    keys = ["fusion", *grid_keys, "modalities_used"]
    top = board.iloc[0]
    members = table[np.logical_and.reduce([table[k].map(grid_value) == grid_value(top[k]) for k in keys])]
    metric = TASKS[board["task"].iloc[0]].leaderboard[0][0]
    pick = members[metric].idxmax() if LARGER_IS_BETTER[metric] else members[metric].idxmin()
    return str(members.loc[pick, "run"])


def write_leaderboard(table: pd.DataFrame, cfg: SweepConfig) -> dict:
    """SWEEP/leaderboard.csv and leaderboard.json (mean and std over seeds, best first, with
    best_run: the directory a script takes on to predict or evaluate)."""
    grid_keys = list(cfg.grid)
    board = leaderboard(table, grid_keys)
    board.to_csv(cfg.out / rundir.LEADERBOARD_CSV, index=False)
    summary = {"task": board["task"].iloc[0], "best_run": str(Path(cfg.out) / best_run(table, board, grid_keys)),
               "leaderboard": json.loads(board.to_json(orient="records"))}
    rundir.write_json(cfg.out / rundir.LEADERBOARD_JSON, summary)
    return summary


def grid_value(value) -> str:
    """A grid value as typed on the command line (tuples joined by +)."""
    if isinstance(value, float):  # a searched value: three digits tell trials apart
        return f"{value:.3g}"
    return "+".join(map(str, value)) if isinstance(value, tuple | list) else str(value)


def mean_std(row: pd.Series, metric: str) -> str:
    std = row[f"{metric}_std"]
    return f"{row[f'{metric}_mean']:.3f}" + ("" if pd.isna(std) else f" ± {std:.3f}")  # one run: no spread


SHOWN_CONFIGURATIONS = 15  # in the terminal; leaderboard.csv holds every one


def leaderboard_table(board: pd.DataFrame, grid_keys: list[str]) -> Table:
    more = len(board) - SHOWN_CONFIGURATIONS
    table = Table(title="Leaderboard (val, mean ± std over seeds)",
                  caption=f"{more} more in leaderboard.csv" if more > 0 else None)
    board = board.head(SHOWN_CONFIGURATIONS)
    columns = TASKS[board["task"].iloc[0]].leaderboard
    key_title = columns[0][1]
    for column in ["fusion", *grid_keys, "modalities", *(title for _, title in columns), f"{key_title} vs linear",
                   "s/run", "runs"]:
        table.add_column(column)
    for _, row in board.iterrows():
        gap = row["vs_baseline_mean"]
        table.add_row(row["fusion"], *(grid_value(row[k]) for k in grid_keys), row["modalities_used"],
                      *(mean_std(row, m) for m, _ in columns),
                      "-" if pd.isna(gap) else f"{gap:+.4f}", f"{row['train_seconds_mean']:.1f}", str(row["runs"]))
    return table
