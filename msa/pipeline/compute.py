"""Device and precision choices shared by every stage that runs a model."""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import os
from collections.abc import Callable, Iterator

import torch

from msa.pipeline.config import ConfigError

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclasses.dataclass(frozen=True)
class Compute:
    device: torch.device
    precision: str  # fp32 | bf16 | fp16, already resolved

    def autocast(self, precision: str | None = None) -> contextlib.AbstractContextManager:
        """Autocast in this compute's precision, or in `precision` (a variant being measured)."""
        precision = precision or self.precision
        if precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)


# "1" or "0" overrides the CPU check below: the suite runs once as each CPU class would.
CPU_BF16_ENV = "MSA_CPU_BF16"


def forced_cpu_bf16() -> bool | None:
    """MSA_CPU_BF16=1 / 0: play a CPU with / without fast bf16; None when unset."""
    forced = os.environ.get(CPU_BF16_ENV, "").strip()
    return forced == "1" if forced in ("0", "1") else None


def cpu_has_fast_bf16() -> bool:
    """bf16 pays off only with native bf16 units (AVX512-BF16 / AMX): measured on an
    AVX2-only EPYC, bf16 autocast ran EfficientNet-Lite0 8x slower than fp32. The stages'
    `auto` on a CPU measures instead (msa.pipeline.autotune); this is the guess where they don't."""
    forced = forced_cpu_bf16()
    if forced is not None:
        return forced
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_compute(device: str = "auto", precision: str = "auto") -> Compute:
    if device not in DEVICES:
        raise ConfigError(f"--device must be one of {', '.join(DEVICES)}, got {device!r}")
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available here")
    if precision == "auto":
        if device == "cuda":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            precision = "bf16" if cpu_has_fast_bf16() else "fp32"
    return Compute(torch.device(device), precision)


def prefetch(batches: list, load: Callable, depth: int = 2) -> Iterator:
    """Yield load(batch) for each batch, loading up to `depth` batches ahead in a thread.

    PIL releases the GIL while decoding and resizing, so this overlaps with the forward pass.
    """
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        pending = [pool.submit(load, b) for b in batches[:depth]]
        for i in range(len(batches)):
            result = pending.pop(0).result()
            if i + depth < len(batches):
                pending.append(pool.submit(load, batches[i + depth]))
            yield result
