"""Quality on MVSA by 5-fold cross-validation: every lever under the same folds, accuracy,
macro-F1, weighted-F1, neutral F1 (mean ± std over folds) and minutes on this machine.

    python bench/quality.py --data ../shared/datasets/mvsa-lab5 --root bench-quality \
        [--models ~/.cache/msa/offline-models] [--out quality.json]

A view is one cache: a text encoder (on the raw or the normalised tweet), an image encoder
and the lexicon. Rows: heads on each view, --loss weighted-ce, and probability averages of
heads (ensembles, what recipes/mvsa.sh runs); "+ biases" rows add class offsets fitted on the
other folds' out-of-fold probabilities (nested, bench/biases.py). Nothing looks at test
items' labels (there are none); the folds are msa's (msa.data.folds, seed 42).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
from biases import nested_predictions

from msa.core import rundir
from msa.core.config import ExtractConfig, TrainHeadConfig
from msa.data.mvsa import LABELS
from msa.stages import evaluate, extract, train_head
from msa.training.metrics import classification_metrics

FOLDS = 5
VIEWS = {  # name -> (text model, normalisation, image model)
    "mpnet-lite0": ("all-mpnet-base-v2", "none", "tf_efficientnet_lite0"),
    "mpnet-tweet-lite0": ("all-mpnet-base-v2", "tweet", "tf_efficientnet_lite0"),
    "minilm-lite2": ("all-MiniLM-L6-v2", "none", "tf_efficientnet_lite2"),
    "minilm-tweet-lite2": ("all-MiniLM-L6-v2", "tweet", "tf_efficientnet_lite2"),
}
HEADS = {  # row -> (view, fusion, extra options)
    **{f"{fusion} on {view}": (view, fusion, {}) for view in VIEWS for fusion in ("late", "gmu")},
    "linear on mpnet-lite0": ("mpnet-lite0", "linear", {}),
    "late, weighted-ce, on mpnet-lite0": ("mpnet-lite0", "late", {"loss": "weighted-ce"}),
}
ENSEMBLES = {
    "ensemble: late + gmu on mpnet-lite0": ["late on mpnet-lite0", "gmu on mpnet-lite0"],
    "ensemble: late + gmu on both mpnet views": [f"{f} on {v}" for v in ("mpnet-lite0", "mpnet-tweet-lite0")
                                                for f in ("late", "gmu")],
    "ensemble: late + gmu on every view (recipes/mvsa.sh)": [f"{f} on {v}" for v in VIEWS for f in ("late", "gmu")],
}


def fold_metrics(truth: np.ndarray, predicted: np.ndarray, folds: np.ndarray) -> dict:
    per_fold = [classification_metrics(truth[folds == k], predicted[folds == k], list(LABELS)) for k in range(FOLDS)]
    out = {}
    for key in ("accuracy", "macro_f1", "weighted_f1", "neutral_f1"):
        values = [m[key] if key != "neutral_f1" else m["per_class"]["neutral"]["f1"] for m in per_fold]
        out[key] = (float(np.mean(values)), float(np.std(values)))
    return out


def out_of_fold(run_dir: Path) -> pd.DataFrame:
    """guid, label, fold, p_<class>: every labelled item once, predicted by the fold that held it out."""
    folds = pd.read_csv(run_dir / rundir.FOLDS_FILE, dtype={"guid": str})
    return evaluate.val_predictions(run_dir).merge(folds, on="guid").sort_values("guid").reset_index(drop=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--root", type=Path, default=Path("bench-quality"), help="Caches and runs go here.")
    parser.add_argument("--models", type=Path, default=Path.home() / ".cache/msa/offline-models")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    minutes = {}
    for view, (text, normalise, image) in VIEWS.items():
        start = time.perf_counter()
        extract.run(ExtractConfig(data=args.data, cache=args.root / f"cache-{view}", text_model=str(args.models / text),
                                  text_normalise=normalise, image_model=f"timm:{image}",
                                  image_weights=str(args.models / f"{image}.pth"),
                                  modalities=("text", "image", "lexicon")), show_progress=False)
        minutes[f"extract {view}"] = (time.perf_counter() - start) / 60
    tables, rows = {}, []
    for name, (view, fusion, extra) in HEADS.items():
        start = time.perf_counter()
        out = args.root / "".join(c if c.isalnum() else "_" for c in name)
        train_head.run(TrainHeadConfig(cache=args.root / f"cache-{view}", fusion=fusion, folds=FOLDS, out=out, **extra),
                       log=lambda *_: None, overwrite=True)
        minutes[name] = (time.perf_counter() - start) / 60
        tables[name] = out_of_fold(out)
    first = next(iter(tables.values()))
    truth = first["label"].map({c: i for i, c in enumerate(LABELS)}).to_numpy()
    folds = first["fold"].to_numpy()
    columns = [f"p_{c}" for c in LABELS]
    groups = {name: [name] for name in HEADS} | ENSEMBLES
    for name, members in groups.items():
        probabilities = np.mean([tables[m][columns].to_numpy() for m in members], axis=0)
        spent = sum(minutes[m] for m in members)
        rows.append({"recipe": name, **fold_metrics(truth, probabilities.argmax(1), folds), "minutes": spent})
        if name in ENSEMBLES or name == "late on mpnet-lite0":
            rows.append({"recipe": f"{name} + biases", "minutes": spent,
                         **fold_metrics(truth, nested_predictions(probabilities, truth, folds), folds)})
    print("\n" + "\n".join(f"{k}: {v:.1f} min" for k, v in minutes.items() if k.startswith("extract")))
    print("| recipe | accuracy | macro-F1 | weighted-F1 | neutral F1 | minutes |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        cells = [f"{row[k][0]:.3f} ± {row[k][1]:.3f}" for k in ("accuracy", "macro_f1", "weighted_f1", "neutral_f1")]
        print(f"| {row['recipe']} | {' | '.join(cells)} | {row['minutes']:.1f} |")
    if args.out:
        args.out.write_text(json.dumps({"minutes": minutes, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
