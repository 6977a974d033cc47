"""Validation metrics of a probability average of runs (what `msa predict --ensemble` would
predict), from the runs' own val predictions: runs of one fixed split, any kind.

    python bench/val_ensemble.py RUN [RUN ...]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from msa.core import rundir
from msa.data.mvsa import LABELS
from msa.training.metrics import classification_metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    args = parser.parse_args()
    tables = [pd.read_parquet(run / rundir.VAL_PREDICTIONS).set_index("guid").sort_index() for run in args.runs]
    if any(not t.index.equals(tables[0].index) for t in tables):
        raise SystemExit("the runs' val splits differ: only runs of one split can be averaged")
    columns = [f"p_{c}" for c in LABELS]
    probabilities = np.mean([t[columns].to_numpy() for t in tables], axis=0)
    index = {c: i for i, c in enumerate(LABELS)}
    metrics = classification_metrics(tables[0]["label"].map(index).to_numpy(), probabilities.argmax(1), list(LABELS))
    print(f"{len(args.runs)} runs, {metrics['n']} val items: accuracy {metrics['accuracy']:.3f}  "
          f"macro-F1 {metrics['macro_f1']:.3f}  weighted-F1 {metrics['weighted_f1']:.3f}  "
          f"neutral F1 {metrics['per_class']['neutral']['f1']:.3f}")


if __name__ == "__main__":
    main()
