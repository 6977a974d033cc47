"""Stratified K-fold assignment of the labelled items, the same on every run."""

from __future__ import annotations

import numpy as np


def stratified_folds(labels: list[str | None], k: int, seed: int = 42) -> np.ndarray:
    """[N] fold index of each item (-1 for unlabelled ones): per class, a seeded shuffle dealt
    round-robin over the folds, so every fold holds each class in proportion, folds are
    disjoint and cover every labelled item. Unlike scikit-learn's StratifiedKFold it accepts
    classes with fewer than K items (small or filtered data sets have them)."""
    if k < 2:
        raise ValueError(f"--folds must be at least 2, got {k}")
    rng = np.random.default_rng(seed)
    labels_array = np.asarray(labels, dtype=object)
    folds = np.full(len(labels), -1)
    offset = 0
    for label in sorted({lab for lab in labels if lab is not None}, key=str):
        members = rng.permutation(np.flatnonzero(labels_array == label))
        folds[members] = (np.arange(len(members)) + offset) % k
        offset += len(members)  # the next class starts where this one ended: fold sizes stay even
    return folds
