"""The tasks, each declared once: what differs between classifying sentiment classes (MVSA's
three; MOSI's 2 or 7 from the scores) and regressing a score (CMU-MOSI) in outputs, losses,
metrics, selection, predictions and reports. Stages look a task up in TASKS instead of testing
its name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from msa.core.config import ConfigError
from msa.data.mvsa import LABELS
from msa.training.metrics import classification_metrics, regression_metrics

LARGER_IS_BETTER = {"macro_f1": True, "accuracy": True, "loss": False, "mae": False, "corr": True}


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    outputs: int  # model outputs: one per class, or one score
    losses: tuple[str, ...]  # --loss choices, the default first
    selects: tuple[str, ...]  # --select choices (val metrics), the default first
    history: tuple[str, ...]  # val metrics logged per epoch in history.csv
    results: tuple[str, ...]  # metrics in a sweep's results.csv
    leaderboard: tuple[tuple[str, str], ...]  # (metric, title), its sort key first
    prediction_header: str  # the first line of a predictions file
    metrics: Callable[[np.ndarray, dict], dict]  # (targets [N], evaluate()'s output) -> val metrics
    summary: Callable[[dict], str]  # one line of the main metrics
    classes: tuple[str, ...] = ()  # class names in output order; () for regression
    # Each manifest row's class name (None: unlabelled) from the label column or the score column.
    labels: Callable[[object], list[str | None]] | None = None

    @property
    def is_regression(self) -> bool:
        return not self.classes

    @property
    def key_metric(self) -> tuple[str, str]:
        """(metric, title) that ranks runs and compares a run with its baseline."""
        return self.leaderboard[0]

    def baseline_gap(self, metrics: dict) -> float | None:
        """How far a run is ahead of its linear baseline on the key metric (negative: behind)."""
        metric = self.key_metric[0]
        baseline = metrics.get("baseline") or {}
        if metric not in baseline or metric not in metrics:
            return None
        gap = metrics[metric] - baseline[metric]
        return gap if LARGER_IS_BETTER.get(metric, True) else -gap

    def baseline_summary(self, metrics: dict) -> str | None:
        """e.g. "linear baseline (logistic regression) macro-F1 0.6120, the run +1.52 points"."""
        gap = self.baseline_gap(metrics)
        if gap is None:
            return None
        metric, title = self.key_metric
        scale, unit = (100, " points") if metric in ("macro_f1", "accuracy", "acc2", "f1") else (1, "")
        return (f"linear baseline ({metrics['baseline']['model']}) {title} {metrics['baseline'][metric]:.4f}, "
                f"the run {'+' if gap >= 0 else ''}{gap * scale:.2f}{unit} {'ahead' if gap >= 0 else 'behind'}")

    @property
    def default_loss(self) -> str:
        return self.losses[0]

    @property
    def default_select(self) -> str:
        return self.selects[0]


def _classification_metrics(classes: tuple[str, ...]) -> Callable[[np.ndarray, dict], dict]:
    def metrics_of(targets: np.ndarray, out: dict) -> dict:
        metrics = classification_metrics(targets, out["probabilities"].argmax(1), list(classes))
        metrics["neutral_f1"] = metrics["per_class"].get("neutral", {}).get("f1")
        return metrics
    return metrics_of


def _classes_of_scores(classify: Callable[[float], str]) -> Callable[[object], list[str | None]]:
    def labels(manifest) -> list[str | None]:
        return [None if score is None or np.isnan(score) else classify(score) for score in manifest.column("score")]
    return labels


# MOSI's class tasks from its scores, as the field derives them (and as metrics.py scores Acc-2 /
# Acc-7): 2 classes negative (< 0) / positive (>= 0), the Has0 convention, so every item trains;
# 7 classes the score clipped to [-3, 3] and rounded.
TWO_CLASSES = ("negative", "positive")
SEVEN_CLASSES = tuple(str(k) for k in range(-3, 4))


def _regression_metrics(targets: np.ndarray, out: dict) -> dict:
    return regression_metrics(targets, out["scores"])


TASKS = {
    "classification": Task(
        name="classification", outputs=len(LABELS), losses=("ce", "weighted-ce", "focal"),
        selects=("macro_f1", "accuracy", "loss"), history=("accuracy", "macro_f1"),
        results=("accuracy", "macro_f1", "weighted_f1", "neutral_f1", "loss", "best_epoch", "train_seconds"),
        leaderboard=(("macro_f1", "macro-F1"), ("accuracy", "accuracy"), ("neutral_f1", "neutral F1")),
        prediction_header="guid,tag", metrics=_classification_metrics(LABELS),
        summary=lambda m: f"val accuracy {m['accuracy']:.4f}  macro-F1 {m['macro_f1']:.4f}",
        classes=LABELS, labels=lambda manifest: manifest.column("label")),
    "regression": Task(
        name="regression", outputs=1, losses=("l1", "mse", "huber"), selects=("mae", "corr", "loss"),
        history=("mae", "corr", "acc2", "acc7"),
        results=("mae", "corr", "acc2", "f1", "non0_acc2", "non0_f1", "acc5", "acc7", "loss", "best_epoch",
                 "train_seconds"),
        # Both of the field's binary conventions, named: Has0 (negative vs non-negative, every item)
        # and Non0 (negative vs positive, items whose true score is not 0).
        leaderboard=(("mae", "MAE"), ("corr", "Corr"), ("acc2", "Has0-Acc-2"), ("f1", "Has0-F1"),
                     ("non0_acc2", "Non0-Acc-2"), ("non0_f1", "Non0-F1"), ("acc5", "Acc-5"), ("acc7", "Acc-7")),
        prediction_header="guid,score", metrics=_regression_metrics,
        summary=lambda m: (f"val MAE {m['mae']:.4f}  corr {m['corr']:.4f}  Acc-2 {m['acc2']:.4f}  "
                           f"Non0-Acc-2 {m['non0_acc2']:.4f}  Acc-7 {m['acc7']:.4f}")),
}


def _classes_of_scores_task(name: str, classes: tuple[str, ...], classify: Callable[[float], str]) -> Task:
    """A classification task on classes derived from the scores (no neutral class to report)."""
    three = TASKS["classification"]
    return dataclasses.replace(three, name=name, outputs=len(classes),
                               results=tuple(r for r in three.results if r != "neutral_f1"),
                               leaderboard=(("macro_f1", "macro-F1"), ("accuracy", "accuracy")),
                               metrics=_classification_metrics(classes), classes=classes,
                               labels=_classes_of_scores(classify))


TASKS["classification-2"] = _classes_of_scores_task("classification-2", TWO_CLASSES,
                                                    lambda s: TWO_CLASSES[int(s >= 0)])
TASKS["classification-7"] = _classes_of_scores_task("classification-7", SEVEN_CLASSES,
                                                    lambda s: str(int(np.round(np.clip(s, -3, 3)))))

# Selection metrics: name -> True if larger is better.



def task_named(name: str) -> Task:
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    return TASKS[name]


def task_of_metrics(metrics: dict) -> Task:
    """The task a metrics.json belongs to (older runs, without a "task" key: by its keys)."""
    return TASKS[metrics.get("task") or ("regression" if "mae" in metrics else "classification")]


def loss_function(task: Task, name: str, class_weights: torch.Tensor | None = None, label_smoothing: float = 0.0,
                  focal_gamma: float = 2.0) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """loss(outputs [B, C] (or scores [B, 1]), targets [B]) -> per-sample losses [B]."""
    if name not in task.losses:
        raise ConfigError(f"--loss {name} is not a {task.name} loss; use one of {', '.join(task.losses)}")
    if task.name == "regression":
        function = {"mse": nn.functional.mse_loss, "l1": nn.functional.l1_loss,
                    "huber": nn.functional.huber_loss}[name]
        return lambda scores, targets: function(scores[:, 0], targets, reduction="none")
    weights = class_weights if name in ("weighted-ce", "focal") else None

    def loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        ce = nn.functional.cross_entropy(logits, targets, weight=weights, reduction="none",
                                         label_smoothing=label_smoothing)
        if name != "focal":
            return ce
        # Focal: down-weight easy samples by (1 - p_true)^gamma.
        p_true = torch.softmax(logits, -1).gather(1, targets[:, None]).squeeze(1)
        return (1 - p_true).pow(focal_gamma) * ce

    return loss


def class_weights_from(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """Inverse-frequency weights, normalised so the average weight per item is 1."""
    counts = np.bincount(labels, minlength=num_classes).astype(float)
    weights = len(labels) / (num_classes * np.maximum(counts, 1))
    return torch.tensor(weights, dtype=torch.float32)


def training_loss(task: Task, cfg, train_targets: np.ndarray, device=None):
    """The loss a config asks for (cfg.loss, class_weights, label_smoothing, focal_gamma); weighted
    losses take --class-weights, or inverse class frequencies of the train split."""
    weights = None
    if cfg.loss in ("weighted-ce", "focal"):
        weights = (torch.tensor(cfg.class_weights, dtype=torch.float32) if cfg.class_weights
                   else class_weights_from(train_targets, task.outputs))
        weights = weights.to(device) if device is not None else weights
    return loss_function(task, cfg.loss, weights, cfg.label_smoothing, cfg.focal_gamma)
