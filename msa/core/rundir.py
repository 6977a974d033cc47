"""Run directories: everything a run produced, readable by people and by the other stages.

    config.json             every option, and the feature sets (name + fingerprint) used
    history.csv             one row per epoch: losses, metrics, learning rate, seconds
    metrics.json            final validation metrics of the best epoch; written last, so it
                            marks a finished run
    model.safetensors       the best model's weights (safetensors: loading runs no code)
    model.json              what rebuilds the model around those weights
    val_predictions.parquet guid, label, prediction, probabilities (and gate)
    curves.png, confusion.png (classification)
    tensorboard/            the history as TensorBoard events, when tensorboard is installed
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

CONFIG = "config.json"
HISTORY = "history.csv"
METRICS = "metrics.json"
AUTOTUNE = "autotune.json"  # how --precision auto chose the training precision: variant, measured|cached, timings
MODEL_WEIGHTS = "model.safetensors"
MODEL_SPEC = "model.json"
LEGACY_CHECKPOINT = "checkpoint.pt"  # msa < 0.2: a pickle, never loaded
VAL_PREDICTIONS = "val_predictions.parquet"
RESUME_STATE = "last.pt"  # finetune's state after its last epoch (read with weights_only)
REFIT_DIR = "refit"  # RUN/refit: the model refit on every label, which predict uses for RUN
FOLDS_FILE = "folds.csv"  # guid, fold of a cross-validation run
LEADERBOARD_CSV, LEADERBOARD_JSON = "leaderboard.csv", "leaderboard.json"  # a sweep's, best first
CROSS_VALIDATION = "cross-validation"  # config.json's "kind" of a directory of fold runs (RUN/fold-k)
CURVES, CONFUSION = "curves.png", "confusion.png"
REPORT = "report.html"  # msa report's page of a run (or of a sweep, in its directory)
PREDICT_CACHE = "predict-cache"  # new data extracted for a run's predictions
EVALUATION_DIR = "evaluation"  # msa evaluate's output (evaluation-DATA for new data)


class RunDirError(RuntimeError):
    """A run directory that cannot be used or written as asked; the message says why and what to do."""


def write_json(path: Path, data: dict) -> None:
    """Atomic: a run killed mid-write leaves the old file or none, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def save_checkpoint(state: dict, path: Path) -> None:
    """torch.save of a resume state (tensors, numbers, strings and containers only, so that
    load_checkpoint reads it with weights_only=True), atomic like write_json."""
    import torch

    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    """A resume state saved by save_checkpoint; weights_only: a planted object is refused, never run."""
    import pickle

    import torch

    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        raise RunDirError(f"{path}: not a checkpoint msa can load safely ({str(err).splitlines()[0]})") from None


def save_model(run_dir: Path, state_dict: dict, spec: dict) -> None:
    """The weights as safetensors and the spec that rebuilds the model as JSON, each atomic."""
    from safetensors.torch import save_file

    # Contiguous copies: safetensors refuses views and tensors sharing memory.
    tensors = {k: v.detach().contiguous().clone() for k, v in state_dict.items()}
    tmp = run_dir / (MODEL_WEIGHTS + ".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, run_dir / MODEL_WEIGHTS)
    write_json(run_dir / MODEL_SPEC, spec)


def load_model(run_dir: Path) -> tuple[dict, dict]:
    """(state_dict, spec) of a run; neither file can run code when read."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    run_dir = Path(run_dir)
    weights = run_dir / MODEL_WEIGHTS
    if not weights.is_file():
        if (run_dir / LEGACY_CHECKPOINT).is_file():
            raise RunDirError(f"{run_dir}: written by msa < 0.2 ({LEGACY_CHECKPOINT}, a pickle that could run code "
                              "when loaded, so msa no longer reads it); train the run again")
        raise RunDirError(f"{run_dir}: no {MODEL_WEIGHTS}; is this a finished msa run?")
    try:
        state_dict, spec = load_file(str(weights)), read_json(run_dir / MODEL_SPEC)
    except (SafetensorError, OSError, ValueError) as err:
        raise RunDirError(f"{weights}: unreadable ({str(err).splitlines()[0]}); train the run again") from None
    if not isinstance(spec, dict):
        raise RunDirError(f"{run_dir / MODEL_SPEC}: not a model spec (a JSON object); train the run again")
    for name, tensor in state_dict.items():
        if tensor.is_floating_point() and not bool(tensor.isfinite().all()):
            raise RunDirError(f"{weights}: {name} holds NaN or infinite values; train the run again")
    return state_dict, spec


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def run_config(run_dir: Path) -> dict:
    """A run directory's config.json, or a RunDirError saying what the directory is instead."""
    run_dir = Path(run_dir)
    if (run_dir / CONFIG).is_file():
        return read_json(run_dir / CONFIG)
    if not run_dir.is_dir():
        raise RunDirError(f"--run {run_dir}: no such directory; give the --out of a train-head or finetune run")
    if (run_dir / LEADERBOARD_JSON).is_file():  # a sweep: its runs are the folders inside
        best = read_json(run_dir / LEADERBOARD_JSON).get("best_run")
        raise RunDirError(f"--run {run_dir} is a sweep, not a run; its best run is {best}")
    raise RunDirError(f"--run {run_dir}: not a run directory (no {CONFIG}); give the --out of a train-head or "
                      "finetune run")


def append_history(run_dir: Path, row: dict, tensorboard=None) -> None:
    """One epoch's row in history.csv (and its scalars in TensorBoard, given a writer)."""
    path = run_dir / HISTORY
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)
    if tensorboard:
        for key, value in row.items():
            if key != "epoch":
                tensorboard.add_scalar(key.replace("_", "/", 1), value, row["epoch"])


def truncate_history(run_dir: Path, epochs: int) -> None:
    """Drop history rows of epochs after `epochs` (a kill between a row and its resume state)."""
    if not (run_dir / HISTORY).exists():
        return
    rows = [r for r in read_history(run_dir) if int(r["epoch"]) <= epochs]
    (run_dir / HISTORY).unlink()
    for row in rows:
        append_history(run_dir, row)


def read_history(run_dir: Path) -> list[dict]:
    with open(run_dir / HISTORY, newline="") as f:
        return list(csv.DictReader(f))


def predictions_table(guids: list[str], labels: list[str | None], probabilities: np.ndarray,
                      class_names: list[str], gate: np.ndarray | None = None) -> pa.Table:
    predicted = probabilities.argmax(1)
    columns = {
        "guid": guids,
        "label": labels,
        "prediction": [class_names[i] for i in predicted],
        **{f"p_{name}": probabilities[:, i].astype(float) for i, name in enumerate(class_names)},
    }
    if gate is not None:
        columns["gate"] = gate.astype(float)
    return pa.table(columns)


def score_table(guids: list[str], scores: np.ndarray, predicted: np.ndarray) -> pa.Table:
    """Regression runs: guid, true score, predicted score."""
    return pa.table({"guid": guids, "score": np.asarray(scores, dtype=float),
                     "prediction": np.asarray(predicted, dtype=float)})


def write_val_predictions(run_dir: Path, task, manifest, rows: np.ndarray, out: dict,
                          modalities: list[str] = ()) -> None:
    """val_predictions.parquet: guid, label (or score), prediction, probabilities, and what the
    head says about its decision (gate; weight_<modality> for the attention head)."""
    all_guids = manifest.guids
    guids = [all_guids[r] for r in rows]
    if task.is_regression:
        scores = manifest.column("score")
        table = score_table(guids, np.array([scores[r] for r in rows]), out["scores"])
    else:
        labels = task.labels(manifest)
        table = predictions_table(guids, [labels[r] for r in rows], out["probabilities"], list(task.classes),
                                  out.get("gate"))
    if "modality_weights" in out:
        for i, modality in enumerate(modalities):
            table = table.append_column(f"weight_{modality}", pa.array(out["modality_weights"][:, i].astype(float)))
    write_predictions(run_dir / VAL_PREDICTIONS, table)


def tensorboard_writer(run_dir: Path):
    """A SummaryWriter logging to RUN/tensorboard when tensorboard is installed, else None
    (history.csv has the same numbers either way)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(Path(run_dir) / "tensorboard"))


def write_predictions(path: Path, table: pa.Table) -> None:
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def is_finished(run_dir: Path) -> bool:
    """Finished when all of it is: metrics.json (written last) and, for a run asked to refit,
    the refit's own; a run killed between its selection and its refit is unfinished."""
    run_dir = Path(run_dir)
    if not (run_dir / METRICS).is_file():
        return False
    try:
        config = read_json(run_dir / CONFIG)
    except (OSError, ValueError):
        return False
    return not (isinstance(config, dict) and config.get("refit")) or (run_dir / REFIT_DIR / METRICS).is_file()


def lock_run(run_dir: Path):
    """Hold the lock of a run (or sweep) directory, kept beside it; BusyError if another process has it."""
    from msa.core.locks import acquire

    run_dir = Path(run_dir)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    return acquire(run_dir.parent / f".{run_dir.name}.lock", f"the run directory {run_dir}")


MARKER = ".msa-run.json"  # written when msa claims a directory: only what carries it may be replaced
# What msa writes in a run directory, and so may replace: the names above, the files of plots,
# folds, refits, predictions and evaluations, and .tmp leftovers of an atomic write.
OWNED_NAMES = {MARKER, REPORT, CONFIG, HISTORY, METRICS, AUTOTUNE, MODEL_WEIGHTS, MODEL_SPEC, VAL_PREDICTIONS, CURVES,
               CONFUSION, FOLDS_FILE, RESUME_STATE, "tensorboard", REFIT_DIR, PREDICT_CACHE, EVALUATION_DIR}
OWNED_PATTERNS = ("fold-*", "predictions-*", f"{EVALUATION_DIR}-*", "*.tmp", "events.out.tfevents.*")
OWNED_TREES = {"tensorboard", PREDICT_CACHE, EVALUATION_DIR}  # made whole by msa: their content is msa's


def is_owned_name(name: str) -> bool:
    import fnmatch

    return name in OWNED_NAMES or any(fnmatch.fnmatch(name, p) for p in OWNED_PATTERNS)


def foreign_entries(run_dir: Path) -> list[Path]:
    """What in a run directory msa did not write (a user's notes, sources): never deleted."""
    foreign = []
    for entry in sorted(Path(run_dir).iterdir()):
        if not is_owned_name(entry.name) or entry.is_symlink():
            foreign.append(entry)
        elif entry.is_dir() and entry.name not in OWNED_TREES and not entry.name.startswith(f"{EVALUATION_DIR}-"):
            foreign += foreign_entries(entry)  # a fold or refit run: msa's names inside too
    return foreign


def marked_kind(run_dir: Path) -> str | None:
    """The kind of run msa recorded when it claimed this directory, or None if it never did."""
    try:
        record = json.loads((Path(run_dir) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return record.get("kind") if isinstance(record, dict) and isinstance(record.get("kind"), str) else None


def mark(run_dir: Path, kind: str) -> None:
    write_json(Path(run_dir) / MARKER, {"kind": kind, "note": "made by msa; msa replaces only what it wrote here"})


def clear_owned(run_dir: Path) -> None:
    """Remove what msa wrote in a directory it marked, after checking that nothing else is there."""
    foreign = foreign_entries(run_dir)
    if foreign:
        names = ", ".join(str(p.relative_to(run_dir)) for p in foreign[:3]) + (" ..." if len(foreign) > 3 else "")
        raise RunDirError(f"--out {run_dir} holds files msa did not write ({names}); msa never deletes them: "
                          "move them away or choose another --out")
    for entry in Path(run_dir).iterdir():
        if entry.name == MARKER:
            continue
        shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


def claim(run_dir: Path, kind: str, overwrite: bool = False, continues: dict | None = None):
    """Take `run_dir` for a new run of `kind` and hold its lock (returned; release it when done).
    `continues`: the config.json of a run that resumes its parts (a cross-validation's folds); an
    unfinished run that recorded the same is continued, its finished parts kept.

    Nothing is lost silently: an absent or empty directory is created and marked as msa's; one
    that msa marked is replaced (only the files msa writes there) with `overwrite`, or without it
    when its run never finished (a crash or Ctrl-C must not block the rerun); anything else
    (a cache, a user's folder, a directory msa did not mark) is refused."""
    run_dir = Path(run_dir)
    lock = lock_run(run_dir)
    try:
        if run_dir.is_symlink() or (run_dir.exists() and not run_dir.is_dir()):
            raise RunDirError(f"--out {run_dir}: not a directory msa made; choose another --out")
        if run_dir.exists() and any(run_dir.iterdir()):
            recorded = marked_kind(run_dir)
            if recorded is None:
                raise RunDirError(f"--out {run_dir}: not empty and not an msa run directory (msa marks those it "
                                  f"makes with {MARKER}); choose another --out")
            if is_finished(run_dir) and not overwrite:
                raise RunDirError(f"--out {run_dir} holds a finished {recorded} run; pass --overwrite to replace it "
                                  "or choose another --out")
            if (run_dir / RESUME_STATE).is_file() and not overwrite:  # hours of training: never dropped unasked
                raise RunDirError(f"--out {run_dir} holds an unfinished {recorded} run that can resume; pass --resume "
                                  f"{run_dir} to continue it, or --overwrite to start again")
            if overwrite or continues is None or not (run_dir / CONFIG).is_file() or \
                    read_json(run_dir / CONFIG) != continues:
                clear_owned(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        mark(run_dir, kind)
    except BaseException:
        lock.release()
        raise
    return lock
