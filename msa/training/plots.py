"""The pictures of a run, to read at a glance: curves.png and confusion.png."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from msa.core import rundir


def plot_run(run_dir: Path, metrics: dict) -> None:
    """Training curves (loss; the selection metric, train and val, best epoch marked, the
    majority-class baseline) and, for classification, the confusion matrix as PNGs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    config = rundir.read_json(Path(run_dir) / rundir.CONFIG)
    history = rundir.read_history(run_dir)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    fig.suptitle(title(config), fontsize=9)
    _curves(left, history, "loss", metrics["best_epoch"], None)
    select = config.get("select") or ("mae" if "mae" in metrics else "macro_f1")
    metric = select if select != "loss" else ("mae" if "mae" in metrics else "macro_f1")
    _curves(right, history, metric, metrics["best_epoch"], majority_baseline(metrics, metric))
    fig.tight_layout()
    fig.savefig(Path(run_dir) / rundir.CURVES, dpi=100)
    plt.close(fig)
    if "confusion_matrix" in metrics:
        plot_confusion(Path(run_dir) / rundir.CONFUSION, metrics, title(config))


def title(config: dict) -> str:
    """The head, the modalities and the feature sets a run read."""
    used = config.get("modalities_used") or list(config.get("feature_sets", {}))
    sets = ", ".join(info["name"] for info in config.get("feature_sets", {}).values())
    head = config.get("fusion", "?") + (" (end to end)" if config.get("kind") == "finetune" else "")
    return f"{head} on {' + '.join(used) or 'text + image'}" + (f"\n{sets}" if sets else "")


def majority_baseline(metrics: dict, metric: str) -> float | None:
    """What always predicting the largest val class scores on `metric` (classification only)."""
    if "per_class" not in metrics or metric not in ("accuracy", "macro_f1"):
        return None
    share = max(c["support"] for c in metrics["per_class"].values()) / max(1, metrics["n"])
    return share if metric == "accuracy" else 2 * share / (1 + share) / len(metrics["per_class"])


def _curves(ax, history: list[dict], metric: str, best_epoch: int, baseline: float | None) -> None:
    epochs = [int(r["epoch"]) for r in history]
    for split, style in (("train", "--"), ("val", "-")):
        key = f"{split}_{metric}"
        if history and key in history[0]:
            ax.plot(epochs, [float(r[key]) for r in history], style, label=f"{split} {metric}")
    ax.axvline(best_epoch, color="grey", linestyle=":", label=f"best epoch ({best_epoch})")
    if baseline is not None:
        ax.axhline(baseline, color="red", linewidth=0.8, label=f"majority class ({baseline:.3f})")
    ax.set_xlabel("epoch")
    ax.set_title(metric)
    ax.legend(fontsize=8)


def plot_confusion(path: Path, metrics: dict, heading: str) -> None:
    """Counts, and beside them the rows normalised (recall per true class)."""
    import matplotlib.pyplot as plt

    matrix = np.array(metrics["confusion_matrix"])
    names = metrics["class_names"]
    rates = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    fig, axes = plt.subplots(1, 2, figsize=(9, 4))
    for ax, values, label in ((axes[0], matrix, "counts"), (axes[1], rates, "share of each true class")):
        ax.imshow(values, cmap="Blues", vmin=0)
        ax.set_xticks(range(len(names)), names, rotation=30)
        ax.set_yticks(range(len(names)), names)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(label, fontsize=9)
        for i in range(len(names)):
            for j in range(len(names)):
                text = str(values[i, j]) if values is matrix else f"{values[i, j]:.2f}"
                ax.text(j, i, text, ha="center", va="center",
                        color="white" if values[i, j] > values.max() / 2 else "black")
    fig.suptitle(f"{heading}\nval: accuracy {metrics['accuracy']:.3f}, macro-F1 {metrics['macro_f1']:.3f}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
