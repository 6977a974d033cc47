"""Per-epoch time of the same model trained two ways (the README's finetune figures come from here):
cached (train-head on the split activations, tops unfrozen) and end to end (msa finetune),
with the same encoders, unfrozen layers, head and batch size, on the first N items.

    python bench/finetune_speed.py --data ../shared/datasets/mvsa-lab5 \
        --text-model ~/.cache/msa/offline-models/all-MiniLM-L6-v2 --image-model timm:tf_efficientnet_lite0 \
        --image-weights ~/.cache/msa/offline-models/tf_efficientnet_lite0.pth --out bench/results/finetune.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from msa.core import rundir
from msa.core.config import ExtractConfig, FinetuneConfig, TrainHeadConfig
from msa.stages import extract, finetune, train_head
from msa.training import autotune


def epoch_seconds(run_dir: Path) -> float:
    return statistics.mean(float(row["seconds"]) for row in rundir.read_history(run_dir))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--text-model", required=True)
    parser.add_argument("--image-model", required=True)
    parser.add_argument("--image-weights")
    parser.add_argument("--items", type=int, default=400, help="the first N labelled items (train + val)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--text-layers", type=int, default=2)
    parser.add_argument("--image-stages", type=int, default=1)
    parser.add_argument("--lora-rank", type=int, default=0, help="LoRA adapters of this rank in the unfrozen text "
                        "layers, trained in their place, on both paths (0: the layers themselves)")
    parser.add_argument("--fusion", default="concat")
    parser.add_argument("--seeds", default="0", help="comma-separated; each trains both paths")
    parser.add_argument("--lr-encoder", type=float, default=1e-5)
    parser.add_argument("--lr-fusion", type=float, default=5e-5)
    parser.add_argument("--lr-head", type=float, default=1e-4)
    parser.add_argument("--precisions", default="auto",
                        help="end-to-end runs in each, e.g. fp32,bf16,auto (with auto's choice and a verdict)")
    parser.add_argument("--out", type=Path, help="also write the figures here as JSON")
    args = parser.parse_args()

    report = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
                         f"torch {torch.__version__}", **{k: str(v) for k, v in vars(args).items() if k != "out"}}
    common = dict(text_model=args.text_model, image_model=args.image_model, image_weights=args.image_weights,
                  limit=args.items, device="cpu")
    rates = dict(lr_encoder=args.lr_encoder, lr_fusion=args.lr_fusion, lr_head=args.lr_head, lora_rank=args.lora_rank)
    precisions = args.precisions.split(",")
    e2e = {p: "end to end" if precisions == ["auto"] else f"end to end, {p}" for p in precisions}
    runs = {"cached": [], **{name: [] for name in e2e.values()}}
    with tempfile.TemporaryDirectory() as tmp:
        os.environ[autotune.DECISIONS_ENV] = str(Path(tmp) / "autotune.json")  # auto measures here and now
        start = time.perf_counter()
        extract.run(ExtractConfig(data=args.data, cache=Path(tmp) / "cache", text_split_layer=args.text_layers,
                                  image_split_stage=args.image_stages, **common), show_progress=False)
        report["extract with split, once (s)"] = round(time.perf_counter() - start, 1)
        for seed in (int(s) for s in args.seeds.split(",")):
            cached = train_head.run(TrainHeadConfig(
                cache=Path(tmp) / "cache", fusion=args.fusion, out=Path(tmp) / f"cached-{seed}", epochs=args.epochs,
                batch_size=args.batch_size, unfreeze_text_layers=args.text_layers, seed=seed,
                unfreeze_image_stages=args.image_stages, patience=args.epochs, **rates), log=lambda *_: None).run_dir
            paths = {"cached": cached}
            for precision, name in e2e.items():
                paths[name] = finetune.run(FinetuneConfig(
                    data=args.data, out=Path(tmp) / f"e2e-{precision}-{seed}", fusion=args.fusion, epochs=args.epochs,
                    seed=seed, batch_size=args.batch_size, unfreeze_text_layers=args.text_layers,
                    unfreeze_image_stages=args.image_stages, patience=args.epochs, precision=precision, **rates,
                    **common), show_progress=False, log=lambda *_: None)
            for path, run_dir in paths.items():
                metrics = rundir.read_json(run_dir / rundir.METRICS)
                tuned = run_dir / rundir.AUTOTUNE
                runs[path].append({"seed": seed, "s per epoch": round(epoch_seconds(run_dir), 2),
                                   "val macro_f1": round(metrics["macro_f1"], 4),
                                   "val accuracy": round(metrics["accuracy"], 4),
                                   "auto chose": rundir.read_json(tuned)["variant"] if tuned.is_file() else None})
            print(json.dumps(runs, indent=1), flush=True)
    report["runs"] = runs
    for path, rows in runs.items():
        report[f"{path}: s per epoch"] = round(statistics.mean(r["s per epoch"] for r in rows), 2)
        report[f"{path}: val macro_f1"] = [r["val macro_f1"] for r in rows]
    report["speed-up per epoch"] = round(report[f"{e2e[precisions[-1]]}: s per epoch"]
                                         / report["cached: s per epoch"], 2)
    if {"fp32", "bf16", "auto"} <= set(precisions):
        seconds = {p: report[f"{e2e[p]}: s per epoch"] for p in ("fp32", "bf16")}
        chosen = runs[e2e["auto"]][0]["auto chose"]
        report["verdict"] = {"auto chose": chosen, "fastest": min(seconds, key=seconds.get),
                             "auto is fastest (within 5%)": seconds[chosen] <= 1.05 * min(seconds.values())}
    print(json.dumps(report, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
