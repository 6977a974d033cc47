"""Quality on MVSA by 5-fold cross-validation: recipe, accuracy, macro-F1, weighted-F1,
neutral F1 (mean ± std over folds) and minutes on this machine.

    python bench/quality.py --data ../shared/datasets/mvsa-lab5 --cache bench-cache \
        --text-model ~/.cache/msa/offline-models/all-mpnet-base-v2 \
        --image-model timm:tf_efficientnet_lite0 \
        --image-weights ~/.cache/msa/offline-models/tf_efficientnet_lite0.pth [--out quality.json]

Every row is judged on the same folds of the labelled items (msa.pipeline.folds, seed 42);
nothing looks at test items' labels (there are none). Rows: the linear baseline, frozen
heads, the lexicon modality and multi-layer pooling (--pool-layers 4) as levers, and the
probability average of the heads (a head ensemble, per fold).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from msa.pipeline.config import ExtractConfig, TrainHeadConfig
from msa.pipeline.metrics import classification_metrics
from msa.pipeline.mvsa import LABELS
from msa.stages import extract, train_head

FOLDS = 5
TEXT, IMAGE, LEXICON = ("text", "image", "lexicon")
POOL4 = "text4"  # the text set pooled over the last 4 layers (--pool-layers 4)
RECIPES = {  # name -> (fusion, feature sets)
    "linear baseline (text+image)": ("linear", (TEXT, IMAGE)),
    "text-only": ("text-only", (TEXT, IMAGE)),
    "concat": ("concat", (TEXT, IMAGE)),
    "gmu": ("gmu", (TEXT, IMAGE)),
    "late": ("late", (TEXT, IMAGE)),
    "linear + lexicon": ("linear", (TEXT, IMAGE, LEXICON)),
    "concat + lexicon": ("concat", (TEXT, IMAGE, LEXICON)),
    "gmu + lexicon": ("gmu", (TEXT, IMAGE, LEXICON)),
    "late + lexicon": ("late", (TEXT, IMAGE, LEXICON)),
    "linear, text pooled over 4 layers": ("linear", (POOL4, IMAGE)),
    "gmu + lexicon, 4 layers": ("gmu", (POOL4, IMAGE, LEXICON)),
    "late + lexicon, 4 layers": ("late", (POOL4, IMAGE, LEXICON)),
    "concat + lexicon, 4 layers": ("concat", (POOL4, IMAGE, LEXICON)),
}
ENSEMBLES = {"ensemble of concat, gmu, late + lexicon": ("concat + lexicon", "gmu + lexicon", "late + lexicon"),
             "ensemble of concat, gmu, late + lexicon, 4 layers": ("concat + lexicon, 4 layers",
                                                                  "gmu + lexicon, 4 layers",
                                                                  "late + lexicon, 4 layers")}


def summary(per_fold: list[dict]) -> dict:
    out = {}
    for key in ("accuracy", "macro_f1", "weighted_f1", "neutral_f1"):
        values = [m[key] if key != "neutral_f1" else m["per_class"]["neutral"]["f1"] for m in per_fold]
        out[key] = (float(np.mean(values)), float(np.std(values)))
    return out


def ensemble_folds(run_dirs: list[Path]) -> list[dict]:
    """Per fold, the metrics of the runs' averaged val probabilities (the folds are shared)."""
    per_fold = []
    for k in range(FOLDS):
        tables = [pd.read_parquet(d / f"fold-{k}" / "val_predictions.parquet") for d in run_dirs]
        probabilities = np.mean([t[[f"p_{c}" for c in LABELS]].to_numpy() for t in tables], axis=0)
        truth = tables[0]["label"].map({c: i for i, c in enumerate(LABELS)}).to_numpy()
        per_fold.append(classification_metrics(truth, probabilities.argmax(1), list(LABELS)))
    return per_fold


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--cache", type=Path, required=True)
    parser.add_argument("--runs", type=Path, default=Path("bench-quality-runs"))
    parser.add_argument("--text-model", required=True)
    parser.add_argument("--image-model", required=True)
    parser.add_argument("--image-weights")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    start = time.perf_counter()
    base = ExtractConfig(data=args.data, cache=args.cache, text_model=args.text_model, image_model=args.image_model,
                         image_weights=args.image_weights, modalities=(TEXT, IMAGE, LEXICON))
    sets = {m: r.name for m, r in extract.run(base, show_progress=False).feature_sets.items()}
    pooled4 = dataclasses.replace(base, modalities=(TEXT,), pool_layers=4)
    sets[POOL4] = extract.run(pooled4, show_progress=False).feature_sets[TEXT].name
    extract_minutes = (time.perf_counter() - start) / 60
    rows, run_dirs = [], {}
    for name, (fusion, chosen) in RECIPES.items():
        start = time.perf_counter()
        out = args.runs / "".join(c if c.isalnum() else "_" for c in name)
        modalities = tuple(TEXT if s == POOL4 else s for s in chosen)
        result = train_head.run(TrainHeadConfig(cache=args.cache, fusion=fusion, modalities=modalities,
                                                features=tuple(sets[s] for s in chosen), folds=FOLDS, out=out),
                                log=lambda *_: None, overwrite=True)
        run_dirs[name] = out
        rows.append({"recipe": name, **summary(result.metrics["per_fold"]),
                     "minutes": (time.perf_counter() - start) / 60})
        print(rows[-1], flush=True)
    for name, members in ENSEMBLES.items():
        rows.append({"recipe": name, **summary(ensemble_folds([run_dirs[m] for m in members])),
                     "minutes": sum(r["minutes"] for r in rows if r["recipe"] in members)})
    print(f"\nextract (text, image, lexicon; cached after the first run): {extract_minutes:.1f} min")
    print("| recipe | accuracy | macro-F1 | weighted-F1 | neutral F1 | minutes |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        cells = [f"{row[k][0]:.3f} ± {row[k][1]:.3f}" for k in ("accuracy", "macro_f1", "weighted_f1", "neutral_f1")]
        print(f"| {row['recipe']} | {' | '.join(cells)} | {row['minutes']:.1f} |")
    if args.out:
        args.out.write_text(json.dumps({"extract_minutes": extract_minutes, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
