"""Run directories: everything a run produced, readable by people and by the other stages.

    config.json             every option, and the feature sets (name + fingerprint) used
    history.csv             one row per epoch: losses, metrics, learning rate, seconds
    metrics.json            final validation metrics of the best epoch
    checkpoint.pt           the best head's weights, with what is needed to rebuild it
    val_predictions.parquet guid, label, prediction, probabilities (and gate)
    curves.png, confusion.png (classification)
    tensorboard/            the history as TensorBoard events, when tensorboard is installed
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

CONFIG = "config.json"
HISTORY = "history.csv"
METRICS = "metrics.json"
CHECKPOINT = "checkpoint.pt"
VAL_PREDICTIONS = "val_predictions.parquet"


def write_json(path: Path, data: dict) -> None:
    """Atomic: a run killed mid-write leaves the old file or none, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def save_checkpoint(state: dict, path: Path) -> None:
    """torch.save, atomic like write_json: a kill mid-save leaves the previous checkpoint."""
    import torch

    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def append_history(run_dir: Path, row: dict) -> None:
    path = run_dir / HISTORY
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


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


def plot_run(run_dir: Path, metrics: dict) -> None:
    """Training curves and the confusion matrix as PNGs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = read_history(run_dir)
    epochs = [int(r["epoch"]) for r in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(epochs, [float(r["train_loss"]) for r in history], label="train loss")
    left.plot(epochs, [float(r["val_loss"]) for r in history], label="val loss")
    left.set_xlabel("epoch")
    left.legend()
    for key, label in (("val_accuracy", "val accuracy"), ("val_macro_f1", "val macro-F1"),
                       ("val_mae", "val MAE"), ("val_corr", "val correlation")):
        if key in history[0]:
            right.plot(epochs, [float(r[key]) for r in history], label=label)
    right.set_xlabel("epoch")
    right.legend()
    fig.tight_layout()
    fig.savefig(run_dir / "curves.png", dpi=100)
    plt.close(fig)
    if "confusion_matrix" not in metrics:  # regression
        return

    matrix = np.array(metrics["confusion_matrix"])
    names = metrics["class_names"]
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=30)
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, str(matrix[i, j]), ha="center", va="center",
                    color="white" if matrix[i, j] > matrix.max() / 2 else "black")
    ax.set_title(f"val: acc {metrics['accuracy']:.3f}, macro-F1 {metrics['macro_f1']:.3f}")
    fig.tight_layout()
    fig.savefig(run_dir / "confusion.png", dpi=100)
    plt.close(fig)
