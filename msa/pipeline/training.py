"""The training loop shared by train-head (cached features) and, later, finetune.

Features live in memory as tensors and batches are indexed directly: no per-sample
Python loop and no DataLoader workers for cached features.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
from torch import nn

from msa.cache.features import CacheError, FeatureSet
from msa.models.heads import Modality, ModalityDims
from msa.pipeline.mvsa import LABELS

LOSSES = ("ce", "weighted-ce", "focal")
REGRESSION_LOSSES = ("mse", "l1", "huber")


@dataclasses.dataclass
class FeatureBank:
    """All rows of the feature sets a head reads, in memory as float32: converting each
    batch from the cache's float16 cost co-attn 20 ms of its ~110 ms per batch on MVSA."""

    pooled: dict[str, torch.Tensor]  # name -> [N, D]
    tokens: dict[str, torch.Tensor]  # name -> [N, L, D] (empty if the head reads none)
    masks: dict[str, torch.Tensor]  # name -> [N, L] bool
    split: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # name -> [N, ...] for encoder tops

    @classmethod
    def load(cls, feature_sets: dict[str, FeatureSet], with_tokens: bool, split_names: tuple[str, ...] = ()
             ) -> FeatureBank:
        pooled, tokens, masks, split = {}, {}, {}, {}
        for name, feature_set in feature_sets.items():
            pooled[name] = torch.from_numpy(feature_set.load("pooled")).float()
            if with_tokens or name in split_names:
                mask = torch.from_numpy(feature_set.load("mask"))
                length = used_length(mask)  # texts rarely fill max_len
                masks[name] = mask[:, :length]
            if with_tokens:
                tokens[name] = torch.from_numpy(feature_set.load("tokens")[:, :length].astype(np.float32))
            if name in split_names:
                if "split" not in feature_set.shapes:
                    raise CacheError(f"{feature_set.name} holds no split activations; extract with "
                                     "--text-split-layer / --image-split-stage")
                values = torch.from_numpy(feature_set.load("split"))
                split[name] = values[:, :length] if values.ndim == 3 else values  # text [N, L, D]: trimmed
        return cls(pooled, tokens, masks, split)

    def subset(self, names: tuple[str, ...]) -> FeatureBank:
        """The same tensors for some modalities only, in that order (no copies)."""
        def pick(part: dict) -> dict:
            return {name: part[name] for name in names if name in part}

        return FeatureBank(pick(self.pooled), pick(self.tokens), pick(self.masks), pick(self.split))

    def dims(self) -> dict[str, ModalityDims]:
        return {name: ModalityDims(p.shape[1], self.tokens[name].shape[2] if name in self.tokens else p.shape[1])
                for name, p in self.pooled.items()}

    def batch(self, rows: torch.Tensor, with_tokens: bool) -> dict[str, Modality]:
        """The rows' features; token sequences (only for heads that read them) and text split
        activations cut to the batch's longest (pad positions are masked, so this changes no
        result, and texts average a quarter of max_len)."""
        batch = {}
        for name, pooled in self.pooled.items():
            tokens = mask = split = None
            if name in self.masks and ((with_tokens and name in self.tokens) or name in self.split):
                mask = self.masks[name][rows]
                length = used_length(mask)
                mask = mask[:, :length]
                if with_tokens and name in self.tokens:
                    tokens = self.tokens[name][rows, :length]
            if name in self.split:
                split = self.split[name][rows]
                split = split[:, :length] if split.ndim == 3 else split
            batch[name] = Modality(pooled[rows], tokens, mask, split)
        return batch

    def lengths(self) -> torch.Tensor | None:
        """[N] each item's tokens summed over modalities (fixed-length image tokens add the
        same to every item, so the order is the text's); None without tokens."""
        if not self.masks:
            return None
        return torch.stack([m.sum(1) for m in self.masks.values()]).sum(0)


def class_targets(labels: list[str | None]) -> torch.Tensor:
    """[N] class indices in LABELS order, -1 for unlabelled items."""
    index = {name: i for i, name in enumerate(LABELS)}
    return torch.tensor([index.get(label, -1) if label else -1 for label in labels])


def used_length(mask: torch.Tensor) -> int:
    """One past the last position any row uses ([N, L] -> int, at least 1)."""
    used = mask.any(0).nonzero()
    return int(used.max()) + 1 if len(used) else 1


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float):
    warmup = max(1, int(total_steps * warmup_ratio))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def class_weights_from(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """Inverse-frequency weights, normalised so the average weight per item is 1."""
    counts = np.bincount(labels, minlength=num_classes).astype(float)
    weights = len(labels) / (num_classes * np.maximum(counts, 1))
    return torch.tensor(weights, dtype=torch.float32)


def classification_loss(name: str, class_weights: torch.Tensor | None, label_smoothing: float,
                        focal_gamma: float = 2.0):
    """loss(logits [B, C], targets [B]) -> per-sample losses [B]."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; known: {', '.join(LOSSES)}")
    weights = class_weights if name in ("weighted-ce", "focal") else None

    def loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        ce = nn.functional.cross_entropy(logits, targets, weight=weights, reduction="none",
                                         label_smoothing=label_smoothing)
        if name != "focal":
            return ce
        # Focal: down-weight easy samples by (1 - p_true)^gamma.
        p_true = torch.softmax(logits, -1).gather(1, targets[:, None]).squeeze(1)
        return (1 - p_true).pow(focal_gamma) * ce

    return loss


def regression_loss(name: str):
    """loss(scores [B, 1], targets [B]) -> per-sample losses [B]."""
    if name not in REGRESSION_LOSSES:
        raise ValueError(f"loss {name!r} is not for regression; use one of {', '.join(REGRESSION_LOSSES)}")
    function = {"mse": nn.functional.mse_loss, "l1": nn.functional.l1_loss, "huber": nn.functional.huber_loss}[name]
    return lambda scores, targets: function(scores[:, 0], targets, reduction="none")


def drop_modalities(inputs: dict[str, Modality], p: float, generator: torch.Generator) -> dict[str, Modality]:
    """With probability p per sample, zero one modality (never all of them)."""
    names = list(inputs)
    batch = inputs[names[0]].pooled.shape[0]
    drop = torch.rand(batch, generator=generator) < p
    which = torch.randint(len(names), (batch,), generator=generator)
    out = {}
    for i, name in enumerate(names):
        keep = ~(drop & (which == i))  # [B]
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


def train_one_epoch(model: nn.Module, bank: FeatureBank, rows: np.ndarray, targets: torch.Tensor,
                    optimizer: torch.optim.Optimizer, scheduler, loss_fn, batch_size: int,
                    generator: torch.Generator, rdrop_alpha: float = 0.0, modality_dropout: float = 0.0,
                    aux_weight: float = 0.1, grad_accum: int = 1) -> dict[str, float]:
    model.train()
    totals = {"loss": 0.0, "aux_loss": 0.0}
    # A run's batches depend on its model alone, not on whether a sweep loaded tokens for others.
    with_tokens = model.uses_tokens
    with_tops = bool(getattr(model, "tops", None))  # a text top runs transformer layers: bucket by length
    lengths = bank.lengths() if with_tokens or with_tops else None
    batches = shuffled_batches(rows, batch_size, generator, lengths)
    optimizer.zero_grad(set_to_none=True)
    for index, batch_rows in enumerate(batches):
        inputs = bank.batch(batch_rows, with_tokens)
        if modality_dropout > 0:
            inputs = drop_modalities(inputs, modality_dropout, generator)
        y = targets[batch_rows]
        out = model(inputs)
        loss = loss_fn(out["logits"], y).mean()
        if rdrop_alpha > 0:  # R-Drop: a second pass with other dropout masks; penalise disagreement
            second = model(inputs)
            loss = 0.5 * (loss + loss_fn(second["logits"], y).mean())
            p, q = out["logits"].log_softmax(-1), second["logits"].log_softmax(-1)
            kl = 0.5 * (nn.functional.kl_div(p, q, log_target=True, reduction="batchmean")
                        + nn.functional.kl_div(q, p, log_target=True, reduction="batchmean"))
            loss = loss + rdrop_alpha * kl
        aux = out.get("aux_loss")
        if aux is not None:
            loss = loss + aux_weight * aux
            totals["aux_loss"] += aux.item() * len(batch_rows)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite training loss ({loss.item()}); lower --lr")
        (loss / grad_accum).backward()
        if (index + 1) % grad_accum == 0 or index + 1 == len(batches):
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        totals["loss"] += loss.item() * len(batch_rows)
    return {k: v / len(rows) for k, v in totals.items()}


@torch.no_grad()
def evaluate(model: nn.Module, bank: FeatureBank, rows: np.ndarray, targets: torch.Tensor | None,
             batch_size: int = 256) -> dict:
    """Probabilities [N, C] (and gate [N] where the head has one) for rows; for a regression
    model (one output) scores [N] instead, and the loss is the mean squared error."""
    model.eval()
    probabilities, scores, gates, loss = [], [], [], 0.0
    lengths = bank.lengths() if model.uses_tokens else None
    # Length-sorted batches (little padding); outputs are put back in the order of rows.
    order = np.argsort(lengths[rows].numpy(), kind="stable") if lengths is not None else np.arange(len(rows))
    for start in range(0, len(rows), batch_size):
        batch_rows = torch.from_numpy(rows[order[start: start + batch_size]])
        out = model(bank.batch(batch_rows, model.uses_tokens))
        logits = out["logits"]
        if logits.shape[-1] == 1:
            scores.append(logits[:, 0])
            if targets is not None:
                loss += nn.functional.mse_loss(logits[:, 0], targets[batch_rows], reduction="sum").item()
        else:
            probabilities.append(logits.softmax(-1))
            if targets is not None:
                loss += nn.functional.cross_entropy(logits, targets[batch_rows], reduction="sum").item()
        if "gate" in out:
            gates.append(out["gate"])
    restore = np.argsort(order)
    result = {"probabilities": torch.cat(probabilities).numpy()[restore] if probabilities else np.zeros((0, 0))}
    if scores:
        result["scores"] = torch.cat(scores).numpy()[restore]
    if gates:
        result["gate"] = torch.cat(gates).numpy()[restore]
    if targets is not None:
        result["loss"] = loss / max(1, len(rows))
    return result
