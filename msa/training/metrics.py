"""Classification and regression metrics as the field reports them."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, class_names: list[str]) -> dict:
    """accuracy, macro/weighted F1, per-class precision/recall/F1/support, confusion matrix."""
    labels = list(range(len(class_names)))
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "weighted_f1": float(f1_score(y_true, y_pred, labels=labels, average="weighted", zero_division=0)),
        "per_class": {
            name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                   "support": int(support[i])}
            for i, name in enumerate(class_names)
        },
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        "class_names": list(class_names),
        "n": int(len(y_true)),
    }


def regression_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict:
    """CMU-MOSI-style scores in [-3, 3]: MAE, Pearson correlation, Acc-2 and F1 two ways
    (negative vs non-negative over all items; negative vs positive over items whose true
    score is not 0, "Non0"), Acc-5 and Acc-7 (scores clipped to [-2, 2] / [-3, 3], rounded).
    F1 is weighted over the two classes, as the field's reference code computes it."""
    y_true, y_pred = np.asarray(y_true, dtype=float), np.asarray(y_pred, dtype=float)
    nonzero = y_true != 0
    corr = float(np.corrcoef(y_true, y_pred)[0, 1]) if len(y_true) > 1 and y_pred.std() > 0 else 0.0
    return {
        "mae": float(np.abs(y_true - y_pred).mean()),
        "corr": corr,
        "acc2": float(accuracy_score(y_true >= 0, y_pred >= 0)),
        "f1": float(f1_score(y_true >= 0, y_pred >= 0, average="weighted", zero_division=0)),
        "non0_acc2": float(accuracy_score(y_true[nonzero] > 0, y_pred[nonzero] > 0)) if nonzero.any() else 0.0,
        "non0_f1": float(f1_score(y_true[nonzero] > 0, y_pred[nonzero] > 0, average="weighted", zero_division=0))
        if nonzero.any() else 0.0,
        "acc5": float(np.mean(np.round(np.clip(y_true, -2, 2)) == np.round(np.clip(y_pred, -2, 2)))),
        "acc7": float(np.mean(np.round(np.clip(y_true, -3, 3)) == np.round(np.clip(y_pred, -3, 3)))),
        "n": int(len(y_true)),
    }


def fold_summary(per_fold: list[dict]) -> dict:
    """A cross-validation's metrics: each number's mean over folds, its std beside it (`KEY_std`),
    the folds' own metrics under `per_fold`, and the epoch count a refit uses (the folds' mean)."""
    keys = [k for k, v in per_fold[0].items() if isinstance(v, int | float) and k != "best_epoch"]
    return {**{k: float(np.mean([m[k] for m in per_fold])) for k in keys},
            **{f"{k}_std": float(np.std([m[k] for m in per_fold])) for k in keys},
            "folds": len(per_fold), "best_epoch": round(float(np.mean([m["best_epoch"] for m in per_fold]))),
            "per_fold": per_fold}
