"""Cached features in memory: every row of a run's feature sets, fed to a head in batches."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch

from msa.cache.features import CacheError, FeatureSet
from msa.data.mvsa import LABELS
from msa.models.heads import Modality, ModalityDims

Batches = Iterable[tuple[torch.Tensor, object]]  # (rows [B], the model's inputs for them)


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

    def statistics(self, rows: np.ndarray) -> Callable[[str, str], tuple[torch.Tensor, torch.Tensor]]:
        """(modality, "pooled" | "tokens") -> per-feature mean and std over the rows (tokens: over
        their real steps), for a head's Standardise modules."""
        def of(name: str, level: str) -> tuple[torch.Tensor, torch.Tensor]:
            index = torch.as_tensor(rows)
            if level == "pooled":
                values = self.pooled[name][index]
            else:
                values = self.tokens[name][index][self.masks[name][index]]  # real steps only
            return values.mean(0), values.std(0, correction=0)  # as StandardScaler

        return of

    def lengths(self) -> torch.Tensor | None:
        """[N] each item's tokens summed over modalities (fixed-length image tokens add the
        same to every item, so the order is the text's); None without tokens."""
        if not self.masks:
            return None
        return torch.stack([m.sum(1) for m in self.masks.values()]).sum(0)


def class_targets(labels: list[str | None], classes: tuple[str, ...] = LABELS) -> torch.Tensor:
    """[N] class indices in the order of `classes`, -1 for unlabelled items."""
    index = {name: i for i, name in enumerate(classes)}
    return torch.tensor([index.get(label, -1) if label else -1 for label in labels])


def used_length(mask: torch.Tensor) -> int:
    """One past the last position any row uses ([N, L] -> int, at least 1)."""
    used = mask.any(0).nonzero()
    return int(used.max()) + 1 if len(used) else 1


def cached_batches(bank: FeatureBank, batches: Iterable[torch.Tensor], with_tokens: bool,
                   device: torch.device) -> Iterator[tuple[torch.Tensor, dict[str, Modality]]]:
    """(rows, features) of cached batches, on the device."""
    for rows in batches:
        features = bank.batch(rows, with_tokens)
        yield rows, {name: Modality(*(None if t is None else t.to(device) for t in dataclasses.astuple(m)))
                     for name, m in features.items()}
