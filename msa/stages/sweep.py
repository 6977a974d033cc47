"""Sweeps: the cross product of heads x seeds x grid values, one run directory each.

Features are loaded once and shared by every run. A run whose `metrics.json` exists is
finished and skipped, so an interrupted sweep picks up where it stopped. The results
table (one row a run) is rebuilt from the run directories, never from stdout.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path

import pandas as pd
from rich.table import Table

from msa.models.heads import HEADS
from msa.pipeline import rundir
from msa.pipeline.config import SweepConfig, TrainHeadConfig, to_json
from msa.pipeline.progress import console, progress_bar
from msa.stages import train_head

RESULT_COLUMNS = ("accuracy", "macro_f1", "weighted_f1", "loss", "best_epoch", "train_seconds")


def parse_grid(specs: list[str]) -> dict[str, tuple]:
    """`lr=1e-3,3e-4` -> {"lr": (0.001, 0.0003)}, values typed like the config field."""
    fields = {f.name: f for f in dataclasses.fields(TrainHeadConfig)}
    grid = {}
    for spec in specs:
        key, _, values = spec.partition("=")
        key = key.strip().replace("-", "_")
        if key not in fields or not values:
            raise ValueError(f"--grid {spec!r}: expected FIELD=V1,V2 with a train-head option as FIELD")
        grid[key] = tuple(_typed(TrainHeadConfig(), key, v) for v in values.split(","))
    return grid


def _typed(config: TrainHeadConfig, key: str, value: str):
    """A grid value as the field's type; fields defaulting to None take numbers if they parse."""
    kind = type(getattr(config, key))
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
    parts = [fusion] + [f"{k}={v}" for k, v in overrides.items()] + [f"seed{seed}"]
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


def finished(run_cfg: TrainHeadConfig) -> bool:
    """A run is done when its metrics exist and it ran with exactly these options."""
    if not (run_cfg.out / rundir.METRICS).is_file():
        return False
    saved = rundir.read_json(run_cfg.out / rundir.CONFIG)
    batch_size = run_cfg.batch_size or HEADS[run_cfg.fusion].default_batch_size
    # As train_head records it: the resolved cache path and batch size.
    wanted = {**to_json(run_cfg), "cache": str(Path(run_cfg.cache).resolve()), "batch_size": batch_size}
    return all(saved.get(k) == v for k, v in wanted.items() if k != "out")


def run(cfg: SweepConfig, show_progress: bool = True) -> pd.DataFrame:
    for fusion in cfg.fusions:
        if fusion not in HEADS:
            raise ValueError(f"unknown fusion head {fusion!r}; known: {', '.join(sorted(HEADS))}")
    runs = plan(cfg)
    todo = [r for r in runs if not finished(r)]
    if len(todo) < len(runs):
        console.print(f"{len(runs) - len(todo)} of {len(runs)} runs already finished; skipping them")
    if todo:
        with_tokens = any(HEADS[r.fusion].uses_tokens for r in todo)
        data = train_head.load_train_data(cfg.base.cache, cfg.base.features, with_tokens)
        with progress_bar(show_progress) as bar:
            task = bar.add_task("sweep", total=len(todo), rate="")
            for run_cfg in todo:
                bar.update(task, rate=run_cfg.out.name)
                train_head.run(run_cfg, data=data, log=lambda *_: None)
                bar.advance(task)
    table = results_table(runs, cfg.grid)
    cfg.out.mkdir(parents=True, exist_ok=True)
    table.to_parquet(cfg.out / "results.parquet", index=False)
    table.to_csv(cfg.out / "results.csv", index=False)
    return table


def results_table(runs: list[TrainHeadConfig], grid: dict) -> pd.DataFrame:
    rows = []
    for run_cfg in runs:
        metrics = json.loads((run_cfg.out / rundir.METRICS).read_text())
        rows.append({"run": run_cfg.out.name, "fusion": run_cfg.fusion, "seed": run_cfg.seed,
                     **{k: getattr(run_cfg, k) for k in grid},
                     **{k: metrics[k] for k in RESULT_COLUMNS},
                     "neutral_f1": metrics["per_class"].get("neutral", {}).get("f1")})
    return pd.DataFrame(rows)


def leaderboard(table: pd.DataFrame, grid_keys: list[str], sort_by: str = "macro_f1") -> pd.DataFrame:
    """Mean and std over seeds per configuration, best first."""
    keys = ["fusion", *grid_keys]
    metrics = ["macro_f1", "accuracy", "neutral_f1", "train_seconds"]
    grouped = table.groupby(keys, dropna=False)[metrics].agg(["mean", "std"])
    grouped.columns = [f"{m}_{s}" for m, s in grouped.columns]
    grouped["runs"] = table.groupby(keys, dropna=False).size()
    return grouped.sort_values(f"{sort_by}_mean", ascending=False).reset_index()


def mean_std(row: pd.Series, metric: str) -> str:
    std = row[f"{metric}_std"]
    return f"{row[f'{metric}_mean']:.3f} ± {0 if pd.isna(std) else std:.3f}"


def leaderboard_table(board: pd.DataFrame, grid_keys: list[str]) -> Table:
    table = Table(title="Leaderboard (val, mean ± std over seeds)")
    for column in ["fusion", *grid_keys, "macro-F1", "accuracy", "neutral F1", "s/run", "runs"]:
        table.add_column(column)
    for _, row in board.iterrows():
        table.add_row(row["fusion"], *(str(row[k]) for k in grid_keys), mean_std(row, "macro_f1"),
                      mean_std(row, "accuracy"), mean_std(row, "neutral_f1"),
                      f"{row['train_seconds_mean']:.1f}", str(row["runs"]))
    return table
