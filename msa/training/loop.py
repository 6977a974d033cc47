"""The one training loop, shared by train-head (cached features) and finetune (raw data).

`fit` runs the epochs: `train_one_epoch`, `evaluate` on the val split, a history row,
the best state kept, early stopping, and (for finetune) a resume state after each epoch.
Both stages hand it batches as (rows, inputs) pairs: cached features are indexed from
tensors in memory (no per-sample Python loop, no DataLoader workers), raw items are
tokenised once and their images decoded in a background thread.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from msa.core import rundir
from msa.core.compute import Compute
from msa.data.mvsa import LABELS
from msa.models.heads import Modality
from msa.training.tasks import LARGER_IS_BETTER, Task

Batches = Iterable[tuple[torch.Tensor, object]]  # (rows [B], the model's inputs for them)


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float):
    """Linear warm-up over warmup_ratio of the steps, then cosine decay to 0 (transformers')."""
    from transformers import get_cosine_schedule_with_warmup

    return get_cosine_schedule_with_warmup(optimizer, max(1, int(total_steps * warmup_ratio)), total_steps)


def drop_modalities(inputs: dict[str, Modality], p: float, generator: torch.Generator) -> dict[str, Modality]:
    """With probability p per sample, zero one modality (never all of them)."""
    names = list(inputs)
    batch = inputs[names[0]].pooled.shape[0]
    drop = torch.rand(batch, generator=generator) < p
    which = torch.randint(len(names), (batch,), generator=generator)
    out = {}
    for i, name in enumerate(names):
        keep = (~(drop & (which == i))).to(inputs[name].pooled.device)  # [B]
        m = inputs[name]
        # The mask stays: attention over all-zero keys is fine, over no keys is NaN.
        out[name] = dataclasses.replace(
            m, pooled=m.pooled * keep[:, None], tokens=None if m.tokens is None else m.tokens * keep[:, None, None],
            split=None if m.split is None else m.split * keep.view(-1, *[1] * (m.split.ndim - 1)))
    return out


def shuffled_batches(rows: np.ndarray, batch_size: int, generator: torch.Generator,
                     lengths: torch.Tensor | None = None, pool_batches: int = 50) -> list[torch.Tensor]:
    """Random batches; with lengths, from length buckets: shuffle, sort each pool of
    `pool_batches` batches by length, cut it into batches, shuffle the batch order.
    Batches of similar lengths carry little padding (co-attn trains 3x faster on MVSA)."""
    order = torch.from_numpy(rows)[torch.randperm(len(rows), generator=generator)]
    if lengths is None:
        return list(order.split(batch_size))
    batches = []
    for pool in order.split(batch_size * pool_batches):
        pool = pool[torch.argsort(lengths[pool], stable=True)]
        batches += list(pool.split(batch_size))
    return [batches[i] for i in torch.randperm(len(batches), generator=generator)]


@dataclasses.dataclass
class Optimisation:
    """How a training step updates the model."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    compute: Compute
    grad_accum: int = 1  # batches per optimizer step
    grad_clip: float = 0.0  # max gradient norm (0: off)
    scaler: torch.amp.GradScaler | None = None  # fp16 on CUDA

    def state_dicts(self) -> dict:
        states = {"optimizer": self.optimizer, "scheduler": self.scheduler}
        return {**states, "scaler": self.scaler} if self.scaler is not None else states


@dataclasses.dataclass
class Regularisers:
    rdrop_alpha: float = 0.0  # R-Drop: weight of the KL between two dropout passes
    modality_dropout: float = 0.0  # per-sample chance of zeroing one modality (cached features only)
    aux_weight: float = 0.1  # weight of a head's auxiliary loss


def train_one_epoch(model: nn.Module, batches: list[torch.Tensor], load: Callable[[list[torch.Tensor]], Batches],
                    targets: torch.Tensor, loss_fn, step: Optimisation, task: Task, generator: torch.Generator,
                    regularisers: Regularisers = Regularisers()) -> dict:
    """One pass over the batches of rows (`load` turns them into inputs); returns the mean loss,
    the auxiliary loss, the train metrics (of this epoch's outputs, dropout on) and the
    learning rate at the end."""
    model.train()
    totals, rows_seen, outputs = {"loss": 0.0, "aux_loss": 0.0}, [], []
    step.optimizer.zero_grad(set_to_none=True)
    for index, (rows, inputs) in enumerate(load(batches)):
        if regularisers.modality_dropout > 0:
            inputs = drop_modalities(inputs, regularisers.modality_dropout, generator)
        y = targets[rows].to(step.compute.device)
        with step.compute.autocast():
            out = model(inputs)
            second = model(inputs) if regularisers.rdrop_alpha > 0 else None
        logits = out["logits"].float()
        loss = loss_fn(logits, y).mean()
        if second is not None:  # R-Drop: a second pass with other dropout masks; penalise disagreement
            other = second["logits"].float()
            loss = 0.5 * (loss + loss_fn(other, y).mean())
            p, q = logits.log_softmax(-1), other.log_softmax(-1)
            kl = 0.5 * (nn.functional.kl_div(p, q, log_target=True, reduction="batchmean")
                        + nn.functional.kl_div(q, p, log_target=True, reduction="batchmean"))
            loss = loss + regularisers.rdrop_alpha * kl
        if out.get("aux_loss") is not None:
            loss = loss + regularisers.aux_weight * out["aux_loss"]
            totals["aux_loss"] += out["aux_loss"].item() * len(rows)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite training loss ({loss.item()}); lower the learning rate(s)")
        backward_and_step(loss, step, last=(index + 1) % step.grad_accum == 0 or index + 1 == len(batches))
        totals["loss"] += loss.item() * len(rows)
        rows_seen.append(rows)
        outputs.append(logits.detach().cpu())
    seen = torch.cat(rows_seen)
    train = task.metrics(targets[seen].numpy(), outputs_of(torch.cat(outputs)))
    return {**{k: v / len(seen) for k, v in totals.items()}, **{k: train[k] for k in task.history},
            "lr": step.scheduler.get_last_lr()[-1]}


def backward_and_step(loss: torch.Tensor, step: Optimisation, last: bool) -> None:
    """Accumulate the gradient; every grad_accum batches (and at the end): clip, step, schedule."""
    (step.scaler.scale(loss / step.grad_accum) if step.scaler else loss / step.grad_accum).backward()
    if not last:
        return
    if step.scaler:
        step.scaler.unscale_(step.optimizer)
    if step.grad_clip:
        nn.utils.clip_grad_norm_([p for g in step.optimizer.param_groups for p in g["params"]], step.grad_clip)
    if step.scaler:
        step.scaler.step(step.optimizer)
        step.scaler.update()
    else:
        step.optimizer.step()
    step.scheduler.step()
    step.optimizer.zero_grad(set_to_none=True)


def outputs_of(logits: torch.Tensor) -> dict:
    """Model outputs [N, C] as a task reads them: probabilities, or scores [N] for one output."""
    if logits.shape[-1] == 1:
        return {"scores": logits[:, 0].numpy()}
    return {"probabilities": logits.softmax(-1).numpy()}


@torch.no_grad()
def evaluate(model: nn.Module, rows: np.ndarray, batches: Batches, targets: torch.Tensor | None,
             compute: Compute | None = None,
             summed_over_ranks: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict:
    """Outputs for `rows`, in their order, from batches of them in any order: probabilities [N, C]
    (scores [N] for a one-output model), the gate [N] or modality weights [N, M] where the head
    has them, and with targets the loss (cross-entropy; mean squared error for scores).

    Under torchrun a rank may evaluate its share of the batches: `summed_over_ranks` (an
    all-reduce) fills in the other ranks' rows, each row being computed by one rank and left
    zero by the others, so every rank gets the whole outputs exactly."""
    model.eval()
    logits, seen, explained = [], [], {"gate": [], "modality_weights": []}
    for batch_rows, inputs in batches:
        with compute.autocast() if compute else contextlib.nullcontext():
            out = model(inputs)
        logits.append(out["logits"].float().cpu())
        seen += batch_rows.tolist()
        for key, values in explained.items():  # what a head says about its decision: kept per item
            if key in out:
                values.append(out[key].float().cpu())
    position = {row: i for i, row in enumerate(np.asarray(rows).tolist())}
    at = torch.tensor([position[row] for row in seen], dtype=torch.long)

    def in_row_order(parts: list[torch.Tensor]) -> torch.Tensor:
        values = torch.cat(parts)
        ordered = values.new_zeros((len(rows), *values.shape[1:]))
        ordered[at] = values
        return summed_over_ranks(ordered) if summed_over_ranks else ordered

    every = in_row_order(logits) if logits else torch.zeros((0, len(LABELS)))
    result = {"probabilities": np.zeros((0, 0)), **outputs_of(every)}
    result.update({key: in_row_order(values).numpy() for key, values in explained.items() if values})
    if targets is not None:
        y = targets[torch.from_numpy(np.asarray(rows))]
        loss = (nn.functional.mse_loss(every[:, 0], y) if every.shape[-1] == 1
                else nn.functional.cross_entropy(every, y))
        result["loss"] = float(loss) if len(rows) else 0.0
    return result


def evaluation_order(rows: np.ndarray, lengths: torch.Tensor | None, batch_size: int) -> list[torch.Tensor]:
    """Batches of rows for evaluation, length-sorted where lengths are known (little padding)."""
    order = rows[np.argsort(lengths[rows].numpy(), kind="stable")] if lengths is not None else rows
    return list(torch.from_numpy(np.asarray(order)).split(batch_size))


@dataclasses.dataclass
class FitState:
    """Where a training run stands: what early stopping and resuming need."""

    epoch: int = 0
    best_score: float | None = None
    best_epoch: int = 0
    stale: int = 0  # epochs since the best
    best_metrics: dict | None = None


def fit(train_epoch: Callable[[int], dict], validate: Callable[[], tuple[dict, dict]] | None, task: Task, select: str,
        epochs: int, patience: int, run_dir: Path, on_best: Callable[[FitState, dict], None],
        resume_state: Path | None = None, stateful: dict | None = None, generator: torch.Generator | None = None,
        log=print, after_epoch: Callable[[FitState], None] | None = None, writes: bool = True,
        judge_start: bool = False) -> FitState:
    """The epoch loop. train_epoch(epoch) -> train figures; validate() -> (val metrics, outputs);
    on_best(state, outputs) keeps the best model; without validate (a refit on every label), the
    last epoch is the best and patience does not apply. With resume_state, every epoch ends by saving
    `stateful` (objects with state_dict), every RNG state (the batch `generator` too) and the
    FitState there, and a run that finds the file resumes from it exactly. after_epoch(state) follows.
    writes=False (the other ranks of a distributed run) reads the resume state but writes nothing.
    judge_start: the model before any epoch is a candidate too, as epoch 0 (a closed-form start)."""
    state = FitState()
    if resume_state and resume_state.is_file():
        state = load_resume_state(resume_state, stateful, generator)
        if writes:
            rundir.truncate_history(run_dir, state.epoch)  # rows written after the saved state
        log(f"resuming {run_dir} after epoch {state.epoch}")
    larger = LARGER_IS_BETTER[select]
    if judge_start and validate and state.epoch == 0:
        metrics, outputs = validate()
        state.best_score, state.best_metrics = (metrics[select] if larger else -metrics[select]), metrics
        on_best(state, outputs)
        log(f"start: val {select} {metrics[select]:.4f}")
    tensorboard = rundir.tensorboard_writer(run_dir) if writes else None
    for epoch in range(state.epoch + 1, epochs + 1):
        if state.stale >= patience:
            break
        start = time.perf_counter()
        train = train_epoch(epoch)
        metrics, outputs = validate() if validate else ({}, None)
        row = {"epoch": epoch, **{f"train_{k}": round(v, 5) for k, v in train.items() if k != "lr"},
               **{f"val_{k}": round(metrics[k], 5) for k in ("loss", *task.history) if k in metrics},
               "lr": train["lr"], "seconds": round(time.perf_counter() - start, 3)}
        if writes:
            rundir.append_history(run_dir, row, tensorboard)
        score = (metrics[select] if larger else -metrics[select]) if validate else epoch
        state.epoch = epoch
        if state.best_score is None or score > state.best_score:
            state.best_score, state.best_epoch, state.stale, state.best_metrics = score, epoch, 0, metrics
            on_best(state, outputs)
        else:
            state.stale += 1
        judged = f"val {select} {metrics[select]:.4f}  (best {state.best_metrics[select]:.4f} at {state.best_epoch})" \
            if validate else "no validation (refit)"
        log(f"epoch {epoch}/{epochs}  train loss {train['loss']:.4f}  {judged}  {row['seconds']:.1f} s")
        if state.stale >= patience:
            log(f"early stop at epoch {epoch}: no better val {select} for {patience} epochs")
        if resume_state and writes:
            save_resume_state(resume_state, state, stateful, generator)
        if after_epoch:
            after_epoch(state)
    if tensorboard:
        tensorboard.close()
    return state


def save_resume_state(path: Path, state: FitState, stateful: dict, generator: torch.Generator | None) -> None:
    rundir.save_checkpoint({**{k: v.state_dict() for k, v in stateful.items()},
                            "rng": rng_state(generator), "state": dataclasses.asdict(state)}, path)


def load_resume_state(path: Path, stateful: dict, generator: torch.Generator | None) -> FitState:
    saved = rundir.load_checkpoint(path)
    for name, thing in stateful.items():
        thing.load_state_dict(saved[name])
    set_rng_state(saved["rng"], generator)
    return FitState(**saved["state"])


def rng_state(generator: torch.Generator | None) -> dict:
    """Every random state, as tensors and plain values (the checkpoint loads with weights_only)."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    numpy_state = {"keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                   "has_gauss": int(has_gauss), "gauss": float(gauss)}
    return {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate(),
            "generator": generator.get_state() if generator is not None else None,
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict, generator: torch.Generator | None) -> None:
    torch.set_rng_state(state["torch"].cpu())
    numpy_state = state["numpy"]
    np.random.set_state(("MT19937", numpy_state["keys"].cpu().numpy().astype(np.uint32), numpy_state["position"],
                         numpy_state["has_gauss"], numpy_state["gauss"]))
    random.setstate(state["python"])
    if generator is not None:
        generator.set_state(state["generator"].cpu())
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
