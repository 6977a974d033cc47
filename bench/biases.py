"""bench helper: class biases fitted on out-of-fold probabilities (a lever bench/quality.py judges).

A head trained with cross-entropy on MVSA (neutral: 10% of the items) rarely says neutral.
Adding a per-class offset to the log-probabilities before the argmax moves the decision
boundaries without retraining. The offsets are fitted by coordinate ascent on macro-F1 over
out-of-fold probabilities (never the items they are judged on), and judged by nested
cross-validation: for each fold, offsets fitted on the other folds' predictions.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import f1_score

GRID = np.round(np.arange(-2.0, 2.01, 0.1), 2)  # offsets tried per class, in log-probability
ROUNDS = 3  # passes over the classes; the search settles in two


def adjusted(probabilities: np.ndarray, biases: np.ndarray) -> np.ndarray:
    """Class indices after adding `biases` to the log-probabilities."""
    return (np.log(np.clip(probabilities, 1e-12, 1.0)) + biases).argmax(1)


def fit_biases(probabilities: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """[C] offsets maximising macro-F1 on these items (the first class's stays 0); ties keep the
    smaller offset, so that without gain nothing moves."""
    classes = probabilities.shape[1]
    biases = np.zeros(classes)

    def score(b: np.ndarray) -> float:
        return f1_score(truth, adjusted(probabilities, b), labels=range(classes), average="macro", zero_division=0)

    best = score(biases)
    for _ in range(ROUNDS):
        moved = False
        for c in range(1, classes):
            for value in sorted(GRID, key=abs):
                trial = biases.copy()
                trial[c] = value
                trial_score = score(trial)
                if trial_score > best + 1e-9:
                    best, biases, moved = trial_score, trial, True
        if not moved:
            break
    return biases


def nested_predictions(probabilities: np.ndarray, truth: np.ndarray, folds: np.ndarray) -> np.ndarray:
    """Each fold's items predicted with offsets fitted on the other folds' out-of-fold probabilities."""
    predicted = np.empty(len(truth), dtype=int)
    for k in np.unique(folds):
        inside = folds == k
        predicted[inside] = adjusted(probabilities[inside], fit_biases(probabilities[~inside], truth[~inside]))
    return predicted
