"""Precision and compile chosen by measurement, not assumed from the CPU's name.

On an AVX2-only CPU bf16 runs the encoders 6-9x slower than fp32; with AVX512-BF16 or AMX
it runs them 3.5-4.5x faster. So `--precision auto` on a CPU times each candidate variant
(fp32, bf16, and each with torch.compile where the run is long enough for compiling to pay)
on the first real batch, keeps the fastest whose output stays within a cosine of fp32's,
and stores the measurements per machine and model in a small JSON file, so later runs
decide from them without paying again. Stages record the decision: a feature set's
fingerprint holds the precision and its notes the timings (caption sets' notes and a
training run's autotune.json the same way).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import platform
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from filelock import FileLock

from msa.core import rundir
from msa.core.compute import CPU_BF16_ENV, Compute, forced_cpu_bf16
from msa.core.progress import console

# Where decisions are kept; tests point it at a temporary file.
DECISIONS_ENV = "MSA_AUTOTUNE_FILE"
MIN_COSINE = 0.999  # pooled features of a variant against fp32's, mean over the measured items
# Training compares the logits of a freshly initialised head: small, near-random values where
# bf16's three significant digits show more than in trained features (MiniLM + Lite0 fine-tuned
# end to end: 0.9987). Whether bf16 training keeps the validation metrics is measured in the
# benches (bench/stage2_speed.py; bench/finetune_speed.py --precisions).
TRAINING_MIN_COSINE = 0.99
# The CPU flags that change which precision is fast; a machine with other flags measures again.
SPEED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile")


@dataclasses.dataclass(frozen=True)
class Variant:
    precision: str  # fp32 | bf16
    compile: bool = False

    @property
    def name(self) -> str:
        return self.precision + ("+compile" if self.compile else "")

    @classmethod
    def parse(cls, name: str) -> Variant:
        precision, _, compiled = name.partition("+")
        return cls(precision, compiled == "compile")


@dataclasses.dataclass(frozen=True)
class Measurement:
    items_per_second: float  # the forward pass alone, once warm
    setup_seconds: float  # the first call's extra time (torch.compile's compilation)
    cosine: float  # pooled features against fp32, mean over items

    def seconds_for(self, items: int) -> float:
        return self.setup_seconds + items / self.items_per_second


@dataclasses.dataclass(frozen=True)
class Decision:
    variant: Variant
    chosen_by: str  # "measured" (this run), "cached" (an earlier run's measurements), or the env override
    measurements: dict[str, Measurement]

    def applied_to(self, compute: Compute) -> Compute:
        """`compute` in the chosen precision."""
        return dataclasses.replace(compute, precision=self.variant.precision)

    def record(self) -> dict:
        """What a feature set's notes keep: the choice and the figures behind it."""
        return {"variant": self.variant.name, "chosen_by": self.chosen_by,
                "measurements": {name: dataclasses.asdict(m) for name, m in self.measurements.items()}}


def decisions_file() -> Path:
    return Path(os.environ.get(DECISIONS_ENV) or Path.home() / ".cache" / "msa" / "autotune.json")


def machine_key() -> str:
    """The CPU model, its speed-relevant flags, the threads and torch: what the timings depend on
    (stages measure on CPUs only; on CUDA auto is bf16/fp16 AMP)."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:  # not Linux: the processor name alone
        pass
    speed_flags = "+".join(f for f in SPEED_FLAGS if f in flags)
    # The instructions torch and oneDNN may use, which ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA
    # can hold below what the CPU has (the README's AVX2-class figures were measured so)
    kernels = f"{torch.backends.cpu.get_cpu_capability()}/{os.environ.get('ONEDNN_MAX_CPU_ISA', 'ALL')}"
    return (f"cpu|{name}|{speed_flags}|kernels={kernels}|threads={torch.get_num_threads()}"
            f"|torch={torch.__version__}")


def measured_here(precision: str, compute: Compute) -> bool:
    """Whether a stage's `precision` option is decided by measuring: auto, on a CPU (on CUDA,
    auto is bf16/fp16 AMP without measuring)."""
    return precision == "auto" and compute.device.type == "cpu"


def candidates(compile_worth_trying: bool) -> list[Variant]:
    """fp32 and bf16 (bf16 is kept only if it measures faster), each compiled too when the run
    is long enough for a compile (tens of seconds) to pay."""
    precisions = ["fp32"]
    if torch.backends.mkldnn.is_available():
        precisions.append("bf16")
    return [Variant(p, c) for c in ((False, True) if compile_worth_trying else (False,)) for p in precisions]


def measure(variant_forward: Callable[[Variant], Callable], batch, variants: list[Variant],
            repeats: int = 2, inference: bool = True) -> dict[str, Measurement]:
    """Time each variant's forward on one batch; variant_forward(v) returns a callable
    batch -> pooled features [B, D] running in v's precision (compiled when v says so).
    inference=False leaves autograd on, for timing training steps."""
    pooled, timings = {}, {}
    for variant in variants:
        forward = variant_forward(variant)
        with torch.inference_mode(inference):
            start = time.perf_counter()
            first = forward(batch)
            first_seconds = time.perf_counter() - start
            seconds = []
            for _ in range(repeats):
                start = time.perf_counter()
                forward(batch)
                seconds.append(time.perf_counter() - start)
        pooled[variant.name] = first.float()
        best = min(seconds)
        timings[variant.name] = (len(first) / best, max(0.0, first_seconds - best))
    reference = pooled[Variant("fp32").name]
    return {name: Measurement(rate, setup, float(torch.nn.functional.cosine_similarity(
        pooled[name], reference, dim=1).mean())) for name, (rate, setup) in timings.items()}


def decide_training(what: str, model_key: str, items: int, model: torch.nn.Module, inputs, targets: torch.Tensor,
                    loss_fn, compute: Compute, steps: int) -> Decision:
    """decide() for training `items` items: bf16 autocast or fp32, timed as forward and backward
    on one batch, `steps` times per variant after a warm-up, on a copy of the model in eval mode
    (no dropout: every variant computes the same function) with the random state restored
    after, so that a run is the same whether its decision was measured now or read from the file."""
    def measure_now(variants: list[Variant]) -> dict[str, Measurement]:
        with torch.random.fork_rng():
            trial = copy.deepcopy(model).eval()

            def forward(variant: Variant):
                def training_step(batch):
                    with compute.autocast(variant.precision):
                        logits = trial(batch)["logits"].float()
                    loss_fn(logits, targets).mean().backward()
                    trial.zero_grad(set_to_none=True)
                    return logits.detach()
                return training_step

            return measure(forward, inputs, variants, repeats=steps, inference=False)
    return decide(what, model_key, items, False, measure_now, TRAINING_MIN_COSINE)


def choose(measurements: dict[str, Measurement], items: int, min_cosine: float = MIN_COSINE) -> Variant:
    """The variant that encodes `items` soonest (setup included) among those close to fp32."""
    close = {name: m for name, m in measurements.items() if m.cosine >= min_cosine}
    return Variant.parse(min(close, key=lambda name: close[name].seconds_for(items)))


def decide(what: str, model_key: str, items: int, compile_worth_trying: bool,
           measure_now: Callable[[list[Variant]], dict[str, Measurement]], min_cosine: float = MIN_COSINE) -> Decision:
    """The variant for `what` (a stage's work on a CPU, named in the message) on `items` with
    this model here: from the machine's stored measurements when they cover the candidates,
    else measured now (measure_now(variants)) and stored. MSA_CPU_BF16=0/1 skips measuring
    (the suite plays each CPU class with it)."""
    forced = forced_cpu_bf16()
    if forced is not None:
        return Decision(Variant("bf16" if forced else "fp32", compile_worth_trying), CPU_BF16_ENV, {})
    wanted = candidates(compile_worth_trying)
    key = f"{machine_key()}|{model_key}"
    path = decisions_file()
    with locked(path):  # two extracts measuring at once would each slow the other
        stored = read_decisions(path)
        known = {name: Measurement(**m) for name, m in stored.get(key, {}).items()}
        missing = [v for v in wanted if v.name not in known]
        chosen_by = "cached"
        if missing:
            variants = [Variant("fp32"), *[v for v in missing if v != Variant("fp32")]]
            console.print(f"[dim]{what}: measuring {', '.join(v.name for v in variants)} on this machine "
                          "(once per machine and model)[/dim]")
            known.update(measure_now(variants))
            stored[key] = {name: dataclasses.asdict(m) for name, m in known.items()}
            write_decisions(path, stored)
            chosen_by = "measured"
    usable = {v.name: known[v.name] for v in wanted}
    return Decision(choose(usable, items, min_cosine), chosen_by, usable)


def read_decisions(path: Path) -> dict:
    """The stored measurements; an unreadable file, or an entry of another shape, is measured
    again, never trusted."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    fields = {f.name for f in dataclasses.fields(Measurement)}

    def valid(m) -> bool:
        return isinstance(m, dict) and set(m) == fields and all(isinstance(v, int | float) for v in m.values())

    return {key: {name: m for name, m in entry.items() if valid(m)}
            for key, entry in data.items() if isinstance(entry, dict)} if isinstance(data, dict) else {}


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """The decisions file's lock; where it cannot be taken (a read-only home), measuring goes on
    unlocked and write_decisions says why nothing is stored."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(path) + ".lock")
        lock.acquire()
    except OSError:
        yield
        return
    try:
        yield
    finally:
        lock.release()


def write_decisions(path: Path, data: dict) -> None:
    try:
        rundir.write_json(path, data)
    except OSError as err:  # the run goes on; the next one measures again
        console.print(f"[yellow]could not store the measured precision in {path} ({err}); set "
                      f"{DECISIONS_ENV} to a writable file to keep it[/yellow]")
