"""Reference models outside the training loop: the closed-form baseline every run is judged
against (scikit-learn, on the same split and features, in seconds), and the benches' ridge."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from msa.cache.features import FeatureSet
from msa.cache.manifest import read_manifest


def pooled_ridge(cache: Path, feature_sets: dict[str, Path]) -> dict:
    """Val regression metrics of the regression baseline (closed_form_baseline) on a cache's
    train/val split and its sets' pooled (masked-mean) features."""
    from msa.training.tasks import TASKS

    manifest = read_manifest(cache)
    pooled = {name: FeatureSet.open(path).load("pooled") for name, path in feature_sets.items()}
    metrics = closed_form_baseline(TASKS["regression"], pooled, np.asarray(manifest.column("score")),
                                   manifest.rows_of_split("train"), manifest.rows_of_split("val"))
    return {k: v for k, v in metrics.items() if k != "model"}


def closed_form_baseline(task, pooled: dict, targets: np.ndarray, train_rows: np.ndarray,
                         val_rows: np.ndarray) -> dict:
    """The task's linear model on the concatenated pooled features, standardised: logistic
    regression (classification) or RidgeCV (regression, the sequences mean-pooled, alpha chosen
    by cross-validation on the training rows). A head that does not beat it learned nothing the
    features did not already say linearly. Returns its val metrics and its name under "model"."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression, RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    features = np.concatenate([np.asarray(p, dtype=np.float32) for p in pooled.values()], axis=1)
    train_x, val_x = features[train_rows], features[val_rows]
    if task.is_regression:
        model = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-2, 4, 13)))
        model.fit(train_x, targets[train_rows])
        return {"model": "ridge", **task.metrics(targets[val_rows], {"scores": model.predict(val_x)})}
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=300))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # the baseline's quality is what it is
        model.fit(train_x, targets[train_rows])
    probabilities = np.zeros((len(val_rows), len(task.classes)))
    probabilities[:, model.classes_] = model.predict_proba(val_x)
    return {"model": "logistic regression", **task.metrics(targets[val_rows], {"probabilities": probabilities})}

