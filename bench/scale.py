"""Past one process on this machine: extract with 1 process and with 2 torchrun ranks, and a
sweep with 1 process, 2 local workers and 2 Ray workers, timed in one run.

    python bench/scale.py --data ../shared/datasets/mvsa-lab5 \
        --text-model ~/.cache/msa/offline-models/all-MiniLM-L6-v2 \
        --image-model timm:tf_efficientnet_lite0 \
        --image-weights ~/.cache/msa/offline-models/tf_efficientnet_lite0.pth [--limit 512]

Each command runs as a user would type it (`python -m msa`, `torchrun -m msa`), so the times
include starting Python and loading the models. One process gets every core's threads;
each of n ranks or workers gets cores / n.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TORCHRUN = str(Path(sys.executable).with_name("torchrun"))


def timed(command: list[str], threads: int) -> float:
    start = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stdout}{done.stderr}")
    return time.perf_counter() - start


def cpu_name() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "")
    return f"{name or platform.machine()}{' with AVX512-BF16' if 'avx512_bf16' in info else ''}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--text-model", required=True)
    parser.add_argument("--image-model", required=True)
    parser.add_argument("--image-weights")
    parser.add_argument("--limit", type=int, default=512)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    weights = ["--image-weights", args.image_weights] if args.image_weights else []
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        extract = ["-m", "msa", "-q", "extract", "--data", args.data, "--text-model", args.text_model,
                   "--image-model", args.image_model, *weights, "--limit", str(args.limit), "--device", "cpu"]
        one = timed([sys.executable, *extract, "--cache", f"{tmp}/one"], cores)
        two = timed([TORCHRUN, "--standalone", "--nproc-per-node", "2", *extract, "--cache", f"{tmp}/two"],
                    max(1, cores // 2))
        rows.append((f"extract, {args.limit} items (text + image)", one, two))
        sweep = ["-m", "msa", "-q", "sweep", "--cache", f"{tmp}/one", "--fusion", "concat,gmu,late",
                 "--seeds", "0,1,2,3", "--epochs", "10"]
        one = timed([sys.executable, *sweep, "--out", f"{tmp}/sweep1", "--workers", "1"], cores)
        two = timed([sys.executable, *sweep, "--out", f"{tmp}/sweep2", "--workers", "2"], cores)
        rows.append(("sweep, 12 pooled-head runs of 10 epochs", one, two))
        try:
            import ray  # noqa: F401
        except ImportError:
            print('no Ray here (pip install "msa[ray]"): the Ray row is left out')
        else:
            ray_two = timed([sys.executable, *sweep, "--out", f"{tmp}/sweep-ray", "--workers", "2", "--backend", "ray"],
                            cores)
            rows.append(("sweep as above, 2 Ray workers on a local Ray (start-up included)", one, ray_two))
    print(f"machine: {cpu_name()}, {cores} cores, Python {platform.python_version()}")
    print("| work | 1 process | 2 ranks / workers | speed-up |")
    print("|---|---|---|---|")
    for work, one, two in rows:
        print(f"| {work} | {one:.1f} s | {two:.1f} s | {one / two:.2f}x |")


if __name__ == "__main__":
    main()
