"""Device and precision choices shared by every stage that runs a model."""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import os
import queue
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import get_args

import torch

from msa.core.config import ConfigError, Device, Precision

DEVICES = get_args(Device)
PRECISIONS = get_args(Precision)


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


# The suite's record of which tests consult the CPU class (tests/conftest.py): a file touched
# here, in the test's process or any it starts, marks the test as one whose outcome can depend
# on the precision, the only ones CI's second pass (a bf16 CPU) runs again.
PRECISION_PROBE_ENV = "MSA_PRECISION_PROBE"


def forced_cpu_bf16() -> bool | None:
    """MSA_CPU_BF16=1 / 0: play a CPU with / without fast bf16; None when unset."""
    probe = os.environ.get(PRECISION_PROBE_ENV)
    if probe:
        Path(probe).touch()
    forced = os.environ.get(CPU_BF16_ENV, "").strip()
    return forced == "1" if forced in ("0", "1") else None


def cpu_has_fast_bf16() -> bool:
    """bf16 pays off only with native bf16 units (AVX512-BF16 / AMX): measured on an
    AVX2-only EPYC, bf16 autocast ran EfficientNet-Lite0 8x slower than fp32. The stages'
    `auto` on a CPU measures instead (msa.training.autotune); this is the guess where they don't."""
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


def prefetch(batches: list, load: Callable, workers: int = 1) -> Iterator:
    """Yield load(batch) for each batch, in order, loaded ahead by `workers` threads (two
    batches each in flight).

    JPEG decoding (simplejpeg, PIL) and resizing release the GIL, so loading overlaps with
    the forward pass, and several workers decode at once."""
    return ordered_map(load, batches, workers=workers, ahead=2 * workers)


# A GPU's forward pass outruns one decoding thread many times over: on H200 machines (16
# vCPUs) Lite0 bf16 ran ~20,800 img/s, and loading alone 453 / 1,843 / 2,598 / 2,907 img/s
# in 1 / 4 / 8 / 16 threads on one and 533 / 2,014 / 3,428 / 2,673 on another
# (bench/gpu_check.py): past 8 threads, little or nothing more, for as many batches held.
MAX_LOADING_WORKERS = 8


def loading_workers(device: torch.device) -> int:
    """Threads that decode images ahead of the forward pass: one per core (at most 8) when a
    GPU runs the model; one on a CPU, whose cores run the forward pass."""
    if device.type == "cpu":
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, MAX_LOADING_WORKERS))


def in_cpu_streams(work: Callable, batches: list, streams: int) -> Iterator:
    """Yield work(batch) for each batch, in order, run by `streams` threads that each take
    threads/streams of torch's intra-op threads.

    A stream that decodes its own images before its forward pass never takes a core from
    another's forward, where a decoding thread beside a forward pass on every thread stalled
    it (its threads wait for the slowest): whole image extract, 2 cores, bf16 Lite0, 187 -> 252
    img/s. The bare forward passes run as fast or faster, and steadier, in streams (Lite0:
    283-290 img/s as 2 streams of 1 thread, 243-298 as 1 stream of 2, seven runs; MPNet: 138
    vs 111 texts/s)."""
    if streams == 1:
        yield from map(work, batches)
        return
    threads = torch.get_num_threads()
    per_stream = max(1, threads // streams)

    def run(batch):
        torch.set_num_threads(per_stream)
        return work(batch)
    try:
        yield from ordered_map(run, batches, workers=streams, ahead=2 * streams)
    finally:  # torch's thread count is process-wide: the streams' setting must not outlive them
        torch.set_num_threads(threads)


# Each stream holds its own batches' activations: past 8 (measured only on 2 cores), a many-core
# CPU gives each stream several intra-op threads instead of holding 64 batches at once.
MAX_STREAMS = 8


def encoding_streams(compute: Compute, compiled: bool = False) -> int:
    """Streams for encoding: one per intra-op thread on a CPU in eager mode (MPNet bf16 on 2
    cores: 123 texts/s as 2 streams, 101 as one). A compiled network already runs fused
    kernels across threads (Lite0 fp32: 164 vs 160 img/s in 2 streams, after 5x the compile
    time), and a GPU takes one stream (images loaded ahead by loading_workers threads)."""
    if compute.device.type != "cpu" or compiled:
        return 1
    return min(torch.get_num_threads(), MAX_STREAMS)


def ordered_map(work: Callable, items: list, workers: int, ahead: int) -> Iterator:
    """Yield work(item) for each item in order, from `workers` threads, at most `ahead` items
    in flight; whatever is still queued is cancelled when the consumer stops or fails."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        pending = collections.deque(pool.submit(work, item) for item in items[:ahead])
        try:
            for i in range(len(items)):
                result = pending.popleft().result()
                if i + ahead < len(items):
                    pending.append(pool.submit(work, items[i + ahead]))
                yield result
        finally:
            for future in pending:
                future.cancel()


class WriteBehind:
    """Calls write(*args) on one thread of its own, at most `pending` calls behind the caller, so
    a GPU's next batches run while the last ones are written (h5py is not thread-safe: this
    thread is the only one that writes). A failed write stops the writing, and its error is
    raised in the caller at its next put or at close; leaving the `with` waits for the writes."""

    def __init__(self, write: Callable, pending: int = 2):
        self.write, self.error = write, None
        self.queue: queue.Queue = queue.Queue(maxsize=pending)
        self.thread = threading.Thread(target=self._drain, name="msa-write-behind", daemon=True)
        self.thread.start()

    def _drain(self) -> None:
        while (args := self.queue.get()) is not None:
            if self.error is None:
                try:
                    self.write(*args)
                except BaseException as err:  # re-raised in the caller, whatever it was
                    self.error = err

    def put(self, *args) -> None:
        self._raise()
        self.queue.put(args)

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    def __enter__(self) -> WriteBehind:
        return self

    def __exit__(self, *exc) -> None:
        self.queue.put(None)
        self.thread.join()
        if exc[0] is None:
            self._raise()
