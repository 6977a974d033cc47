"""Do the sequence heads learn? Each head against a ridge regression on mean-pooled features,
on generated MOSI-style data whose score is planted three ways (msa.pipeline.demo.
make_sequence_signal): in the per-modality means (the ridge's home ground: every head should
be within 10% of its MAE and 5% of its correlation), in the last steps (order matters), and
in an interaction between text and audio (the best head should beat the ridge).

    python bench/sequence_quality.py [--seeds 1,2,3] [--epochs 15] [--json out.json]

600 / 150 / 150 items, 20 steps, text 300-d, audio 74-d (with -inf), vision 35-d, columns
scaled from 0.01 to 100: the shapes of MultiBench's MOSI files. Heads run with train-head's
defaults and --epochs 15 (the issue's setting); figures are val MAE and Pearson r, mean over
seeds. The ridge's alpha is chosen by cross-validation on the train split (RidgeCV).
"""

from __future__ import annotations

import argparse
import json
import pickle
import tempfile
import time
from pathlib import Path

import numpy as np

from msa.pipeline.baselines import pooled_ridge
from msa.pipeline.config import TrainHeadConfig
from msa.pipeline.demo import SIGNALS, make_sequence_signal
from msa.stages import import_features, train_head

HEADS = ("linear", "sum-lstm", "attention", "seq-concat", "tfn")
SEQUENCE_HEADS = HEADS[1:]


def measure(signal: str, seeds: list[int], epochs: int, root: Path) -> dict:
    features_file = root / f"{signal}.pkl"
    with open(features_file, "wb") as f:
        pickle.dump(make_sequence_signal(signal), f)
    imported = import_features.run(features_file, root / f"cache-{signal}")
    ridge = pooled_ridge(root / f"cache-{signal}", imported.feature_sets)
    rows = {"ridge (mean-pooled)": {"mae": [ridge["mae"]], "corr": [ridge["corr"]]}}
    for head in HEADS:
        runs = []
        for seed in seeds:
            start = time.perf_counter()
            cfg = TrainHeadConfig(cache=root / f"cache-{signal}", fusion=head, epochs=epochs, seed=seed,
                                  out=root / f"{signal}-{head}-{seed}")
            result = train_head.run(cfg, log=lambda *_: None)
            runs.append({**result.metrics, "seconds": time.perf_counter() - start})
        rows[head] = {k: [r[k] for r in runs] for k in ("mae", "corr", "seconds")}
    return rows


def verdicts(signal: str, rows: dict) -> dict[str, str]:
    ridge = rows["ridge (mean-pooled)"]
    ridge_mae, ridge_corr = np.mean(ridge["mae"]), np.mean(ridge["corr"])
    out = {}
    for head in SEQUENCE_HEADS:
        mae, corr = np.mean(rows[head]["mae"]), np.mean(rows[head]["corr"])
        if signal == "means":
            out[head] = "ok" if mae <= 1.10 * ridge_mae and corr >= 0.95 * ridge_corr else "MISSED"
        else:
            out[head] = "beats ridge" if mae < ridge_mae else "-"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--signals", default=",".join(SIGNALS))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for signal in args.signals.split(","):
            results[signal] = measure(signal, seeds, args.epochs, Path(tmp))
    print("| signal | model | val MAE | val Corr | MAE / ridge | Corr / ridge | s/run | verdict |")
    print("|---|---|---|---|---|---|---|---|")
    for signal, rows in results.items():
        ridge = rows["ridge (mean-pooled)"]
        judged = verdicts(signal, rows)
        for model, row in rows.items():
            mae, corr = np.mean(row["mae"]), np.mean(row["corr"])
            spread = f" ± {np.std(row['mae']):.3f}" if len(row["mae"]) > 1 else ""
            seconds = f"{np.mean(row['seconds']):.1f}" if "seconds" in row else ""
            print(f"| {signal} | {model} | {mae:.3f}{spread} | {corr:.3f} | {mae / np.mean(ridge['mae']):.2f} | "
                  f"{corr / np.mean(ridge['corr']):.2f} | {seconds} | {judged.get(model, '')} |")
    if args.json:
        args.json.write_text(json.dumps({"seeds": seeds, "epochs": args.epochs, "results": results}, indent=1))


if __name__ == "__main__":
    main()
