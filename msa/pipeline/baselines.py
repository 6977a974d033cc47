"""Reference models outside the training loop, for benches and tests to judge heads against."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from msa.cache.features import FeatureSet
from msa.cache.manifest import read_manifest
from msa.pipeline.metrics import regression_metrics


def pooled_ridge(cache: Path, feature_sets: dict[str, Path]) -> dict:
    """Val regression metrics of StandardScaler + RidgeCV (alpha by cross-validation on the
    train split) on the concatenated pooled (masked-mean) features of a cache."""
    from sklearn.linear_model import RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    manifest = read_manifest(cache)
    pooled = np.concatenate([FeatureSet.open(path).load("pooled") for path in feature_sets.values()], axis=1)
    scores = np.asarray(manifest.column("score"))
    train, val = manifest.rows_of_split("train"), manifest.rows_of_split("val")
    model = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-2, 4, 13))).fit(pooled[train], scores[train])
    return regression_metrics(scores[val], model.predict(pooled[val]))
