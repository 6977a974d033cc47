"""Stage 2 speed and quality on a real cache (the README's stage 2 figures come from here).

1. Each token-level head and concat in fp32 and in bf16 autocast, --epochs 6 with early
   stopping off: seconds and val macro-F1 of each, which precision `--precision auto` chose
   (measured here, on a fresh decisions file) and whether it is the faster (or within 5%).
2. A sweep of every head x 3 seeds with default options, the same as
   `msa sweep --cache CACHE --fusion <all heads> --seeds 1,2,3 --out OUT`;
   its leaderboard (val macro-F1 and accuracy, mean ± std over seeds) is printed as a
   Markdown table.

    python bench/stage2_speed.py --cache msa-cache --out runs/bench-stage2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

from msa.core.config import SweepConfig, TrainHeadConfig
from msa.models.registry import HEADS
from msa.models.sequence_heads import SequenceHead
from msa.stages import sweep, train_head
from msa.training import autotune

ABLATIONS_LAST = ["text-only", "image-only"]
PRECISION_HEADS = ("concat", "cross-attn", "hierarchical", "co-attn", "early")


def markdown(board) -> str:
    lines = ["| head | val macro-F1 | val accuracy | neutral F1 | s / run |", "|---|---|---|---|---|"]
    for _, row in board.iterrows():
        lines.append(f"| {row['fusion']} | {sweep.mean_std(row, 'macro_f1')} | {sweep.mean_std(row, 'accuracy')} "
                     f"| {sweep.mean_std(row, 'neutral_f1')} | {row['train_seconds_mean']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-stage2"))
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--sweep-only", action="store_true", help="part 2 alone")
    args = parser.parse_args()
    if args.out.exists():
        shutil.rmtree(args.out)  # timings of a fresh sweep, not of skipped runs
    print(f"machine: {autotune.machine_key()}", flush=True)

    os.environ[autotune.DECISIONS_ENV] = str(args.out / "autotune.json")  # auto measures here and now
    report = {"machine": autotune.machine_key(), "precision": {}}
    data = train_head.load_train_data(args.cache, (), True)
    if not args.sweep_only:
        print("| head | fp32 s | bf16 s | fp32 val macro-F1 | bf16 val macro-F1 | auto chose | auto is fastest (5%) |")
        print("|---|---|---|---|---|---|---|")
    for fusion in () if args.sweep_only else PRECISION_HEADS:
        row = {}
        for precision in ("fp32", "bf16", "auto"):
            cfg = TrainHeadConfig(cache=args.cache, fusion=fusion, epochs=6, patience=6, seed=1, precision=precision,
                                  out=args.out / f"{fusion}-{precision}")
            result = train_head.run(cfg, data=data, log=lambda *_: None)
            row[precision] = {"seconds": result.seconds, "macro_f1": result.metrics["macro_f1"],
                              "precision": result.metrics["precision"]}
        chosen = row["auto"]["precision"]
        fastest = min(("fp32", "bf16"), key=lambda p: row[p]["seconds"])
        row["auto is fastest (within 5%)"] = row[chosen]["seconds"] <= 1.05 * row[fastest]["seconds"]
        report["precision"][fusion] = row
        print(f"| {fusion} | {row['fp32']['seconds']:.1f} | {row['bf16']['seconds']:.1f} | "
              f"{row['fp32']['macro_f1']:.3f} | {row['bf16']['macro_f1']:.3f} | {chosen} | "
              f"{'yes' if row['auto is fastest (within 5%)'] else 'NO'} |", flush=True)

    # MVSA's heads: the sequence heads (msa.models.sequence_heads) are for MOSI-style data.
    mvsa_heads = {name for name, head in HEADS.items() if not issubclass(head, SequenceHead)}
    fusions = tuple(sorted(mvsa_heads - set(ABLATIONS_LAST))) + tuple(ABLATIONS_LAST)
    seeds = tuple(int(s) for s in args.seeds.split(","))
    start = time.perf_counter()
    table = sweep.run(SweepConfig(base=TrainHeadConfig(cache=args.cache), out=args.out / "sweep", fusions=fusions,
                                  seeds=seeds), show_progress=False)
    seconds = time.perf_counter() - start
    report[f"sweep: {len(fusions)} heads x {len(seeds)} seeds, s"] = seconds
    print(f"sweep of {len(table)} runs in {seconds:.0f} s ({seconds / 60:.1f} min)", flush=True)
    board = sweep.leaderboard(table, [])
    print(markdown(board))
    (args.out / "report.json").write_text(json.dumps(report, indent=1))
    (args.out / "leaderboard.md").write_text(markdown(board) + "\n")


if __name__ == "__main__":
    main()
