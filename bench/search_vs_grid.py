"""An Optuna search against a grid of the same size, on one head and one cache.

    python bench/search_vs_grid.py --cache CACHE --fusion gmu --out /tmp/search-bench

Runs `msa sweep` twice on the same features, one seed: a grid of 30 configurations (lr x
dropout x hidden) and `--search optuna --trials 30` over the default space (lr, weight decay,
dropout, hidden, with median pruning). Prints the wall time of each, how many runs finished,
and the best val macro-F1 with its options.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

GRID = ["lr=1e-4,3e-4,1e-3,2e-3,3e-3", "dropout=0.1,0.3,0.5", "hidden=128,512"]  # 5 x 3 x 2 = 30


def sweep(args: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "msa.cli", "--quiet", "sweep", *args], check=True)
    return time.perf_counter() - start


def best(out: Path) -> tuple[int, float, dict]:
    table = pd.read_csv(out / "results.csv")
    top = table.loc[table["macro_f1"].idxmax()]
    options = {k: top[k] for k in ("lr", "weight_decay", "dropout", "hidden") if k in table.columns}
    return len(table), float(top["macro_f1"]), options


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", required=True)
    parser.add_argument("--fusion", default="gmu")
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--seed", default="0")
    parser.add_argument("--out", type=Path, default=Path("/tmp/search-bench"))
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    common = ["--cache", args.cache, "--fusion", args.fusion, "--seeds", args.seed, "--no-progress"]
    rows = []
    for method, extra in (("grid", [f"--grid={g}" for g in GRID]),
                          ("optuna", ["--search", "optuna", "--trials", str(args.trials)])):
        out = args.out / method
        seconds = sweep([*common, *extra, "--out", str(out)])
        finished, score, options = best(out)
        rows.append({"method": method, "wall s": round(seconds, 1), "finished runs": finished,
                     "best val macro-F1": round(score, 4), "its options": json.dumps(options, default=str)})
    print("| " + " | ".join(rows[0]) + " |")
    print("|" + "---|" * len(rows[0]))
    for row in rows:
        print("| " + " | ".join(str(v) for v in row.values()) + " |")


if __name__ == "__main__":
    main()
