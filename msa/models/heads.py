"""Fusion heads, chosen by name from `HEADS`.

A head reads features, never raw images or text, so the same class serves cached
features (`msa train-head`) and live encoders (`msa finetune`). Inputs are a dict of
named modalities, each a `Modality(pooled [B, D], tokens [B, L, D], mask [B, L])`; the
output is a dict with `logits` `[B, C]`, and `gate` `[B]` / `aux_loss` where a head
has them. Heads that fuse two specific roles (text queries image tokens) take the
first modality as the "text" role and the second as the "image" role.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn

HEADS: dict[str, type[nn.Module]] = {}


def register_head(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    def add(cls: type[nn.Module]) -> type[nn.Module]:
        HEADS[name] = cls
        return cls

    return add


def create_head(name: str, dims: dict[str, ModalityDims], num_classes: int, hidden: int = 256,
                dropout: float = 0.1) -> nn.Module:
    """The one place heads are built."""
    if name not in HEADS:
        raise ValueError(f"unknown fusion head {name!r}; known: {', '.join(sorted(HEADS))}")
    return HEADS[name](dims, num_classes, hidden, dropout)


@dataclasses.dataclass(frozen=True)
class ModalityDims:
    pooled: int
    token: int


@dataclasses.dataclass
class Modality:
    pooled: torch.Tensor  # [B, D]
    tokens: torch.Tensor | None = None  # [B, L, D]
    mask: torch.Tensor | None = None  # [B, L], True where a token is real

    def present(self) -> torch.Tensor:
        """[B] True where the modality is there at all (modality dropout zeroes it)."""
        return self.pooled.abs().sum(-1) > 0


def mlp(in_dim: int, hidden: int, out_dim: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, out_dim))


def projection(in_dim: int, out_dim: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.LayerNorm(out_dim), nn.GELU(), nn.Dropout(dropout))


class FusionHead(nn.Module):
    """Common set-up: the modality names in order, and which token-level inputs a head reads."""

    uses_tokens = False

    def __init__(self, dims: dict[str, ModalityDims], num_classes: int, hidden: int, dropout: float):
        super().__init__()
        self.names = list(dims)
        self.num_classes = num_classes


class UnimodalHead(FusionHead):
    """An ablation: one modality's pooled feature through an MLP."""

    modality_index = 0

    def __init__(self, dims, num_classes, hidden, dropout):
        super().__init__(dims, num_classes, hidden, dropout)
        self.modality = self.names[self.modality_index]
        self.net = nn.Sequential(nn.LayerNorm(dims[self.modality].pooled),
                                 mlp(dims[self.modality].pooled, hidden, num_classes, dropout))

    def forward(self, inputs: dict[str, Modality]) -> dict[str, torch.Tensor]:
        return {"logits": self.net(inputs[self.modality].pooled)}


@register_head("text-only")
class TextOnlyHead(UnimodalHead):
    modality_index = 0


@register_head("image-only")
class ImageOnlyHead(UnimodalHead):
    modality_index = 1


@register_head("concat")
class ConcatHead(FusionHead):
    """Project each pooled feature (Linear + LayerNorm), concatenate, 2-layer MLP."""

    def __init__(self, dims, num_classes, hidden, dropout):
        super().__init__(dims, num_classes, hidden, dropout)
        self.project = nn.ModuleDict({m: projection(d.pooled, hidden, dropout) for m, d in dims.items()})
        self.classify = mlp(hidden * len(dims), hidden, num_classes, dropout)

    def forward(self, inputs):
        joined = torch.cat([self.project[m](inputs[m].pooled) for m in self.names], dim=-1)  # [B, M*H]
        return {"logits": self.classify(joined)}


@register_head("late")
class LateFusionHead(FusionHead):
    """Average of unimodal heads' logits (over the modalities present in each sample)."""

    def __init__(self, dims, num_classes, hidden, dropout):
        super().__init__(dims, num_classes, hidden, dropout)
        self.heads = nn.ModuleDict({
            m: nn.Sequential(nn.LayerNorm(d.pooled), mlp(d.pooled, hidden, num_classes, dropout))
            for m, d in dims.items()})

    def forward(self, inputs):
        logits = torch.stack([self.heads[m](inputs[m].pooled) for m in self.names], dim=1)  # [B, M, C]
        present = torch.stack([inputs[m].present() for m in self.names], dim=1).float()  # [B, M]
        weights = present / present.sum(1, keepdim=True).clamp(min=1)
        return {"logits": (logits * weights.unsqueeze(-1)).sum(1)}


@register_head("gmu")
class GMUHead(FusionHead):
    """Gated multimodal unit (Arevalo et al. 2017): h = sum_m z_m * tanh(W_m x_m), with
    gates z from all inputs (sigmoid for two modalities, softmax over more). The gate of
    the first modality is returned per sample, so one can see which modality it trusted."""

    def __init__(self, dims, num_classes, hidden, dropout):
        super().__init__(dims, num_classes, hidden, dropout)
        self.norm = nn.ModuleDict({m: nn.LayerNorm(d.pooled) for m, d in dims.items()})
        self.transform = nn.ModuleDict({m: nn.Linear(d.pooled, hidden) for m, d in dims.items()})
        total = sum(d.pooled for d in dims.values())
        self.gate = nn.Linear(total, hidden * (1 if len(dims) == 2 else len(dims)))
        self.classify = nn.Sequential(nn.Dropout(dropout), mlp(hidden, hidden, num_classes, dropout))
        self.hidden = hidden

    def forward(self, inputs):
        normed = [self.norm[m](inputs[m].pooled) for m in self.names]
        states = torch.stack([torch.tanh(self.transform[m](x)) for m, x in zip(self.names, normed)], 1)  # [B, M, H]
        gate_logits = self.gate(torch.cat(normed, dim=-1))
        if len(self.names) == 2:
            first = torch.sigmoid(gate_logits)  # [B, H]
            gates = torch.stack([first, 1 - first], dim=1)  # [B, 2, H]
        else:
            gates = torch.softmax(gate_logits.view(-1, len(self.names), self.hidden), dim=1)  # [B, M, H]
        fused = (gates * states).sum(1)  # [B, H]
        return {"logits": self.classify(fused), "gate": gates[:, 0].mean(-1)}


def _key_padding(mask: torch.Tensor | None) -> torch.Tensor | None:
    """nn.MultiheadAttention wants True where a key is padding."""
    return None if mask is None else ~mask.bool()


@register_head("cross-attn")
class CrossAttentionHead(FusionHead):
    """The text's pooled feature queries the image tokens (multi-head attention)."""

    uses_tokens = True

    def __init__(self, dims, num_classes, hidden, dropout, heads: int = 4):
        super().__init__(dims, num_classes, hidden, dropout)
        self.text, self.image = self.names[:2]
        self.query = projection(dims[self.text].pooled, hidden, dropout)
        self.keys = projection(dims[self.image].token, hidden, dropout)
        self.attend = nn.MultiheadAttention(hidden, heads, dropout=dropout, batch_first=True)
        self.classify = mlp(2 * hidden, hidden, num_classes, dropout)

    def forward(self, inputs):
        text, image = inputs[self.text], inputs[self.image]
        query = self.query(text.pooled).unsqueeze(1)  # [B, 1, H]
        keys = self.keys(image.tokens)  # [B, Li, H]
        context, _ = self.attend(query, keys, keys, key_padding_mask=_key_padding(image.mask))
        return {"logits": self.classify(torch.cat([query, context], dim=-1).squeeze(1))}


@register_head("co-attn")
class CoAttentionHead(FusionHead):
    """Both directions: text tokens attend to image tokens and image tokens to text tokens;
    the two pooled contexts and the global image feature are joined."""

    uses_tokens = True

    def __init__(self, dims, num_classes, hidden, dropout, heads: int = 4):
        super().__init__(dims, num_classes, hidden, dropout)
        self.text, self.image = self.names[:2]
        self.text_tokens = projection(dims[self.text].token, hidden, dropout)
        self.image_tokens = projection(dims[self.image].token, hidden, dropout)
        self.image_global = projection(dims[self.image].pooled, hidden, dropout)
        self.text_to_image = nn.MultiheadAttention(hidden, heads, dropout=dropout, batch_first=True)
        self.image_to_text = nn.MultiheadAttention(hidden, heads, dropout=dropout, batch_first=True)
        self.classify = mlp(3 * hidden, hidden, num_classes, dropout)

    def forward(self, inputs):
        text, image = inputs[self.text], inputs[self.image]
        t = self.text_tokens(text.tokens)  # [B, Lt, H]
        v = self.image_tokens(image.tokens)  # [B, Li, H]
        text_ctx, _ = self.text_to_image(t, v, v, key_padding_mask=_key_padding(image.mask))  # [B, Lt, H]
        image_ctx, _ = self.image_to_text(v, t, t, key_padding_mask=_key_padding(text.mask))  # [B, Li, H]
        joined = torch.cat([masked_mean(text_ctx, text.mask), masked_mean(image_ctx, image.mask),
                            self.image_global(image.pooled)], dim=-1)
        return {"logits": self.classify(joined)}


def masked_mean(tokens: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """[B, L, H] -> [B, H], averaging real tokens only."""
    if mask is None:
        return tokens.mean(1)
    weights = mask.unsqueeze(-1).to(tokens.dtype)
    return (tokens * weights).sum(1) / weights.sum(1).clamp(min=1)


@register_head("early")
class EarlyFusionHead(FusionHead):
    """All modalities' token sequences, projected and tagged with a modality embedding,
    joined into one sequence behind a [CLS] token, through a small transformer encoder."""

    uses_tokens = True

    def __init__(self, dims, num_classes, hidden, dropout, layers: int = 2, heads: int = 4):
        super().__init__(dims, num_classes, hidden, dropout)
        self.project = nn.ModuleDict({m: nn.Sequential(nn.Linear(d.token, hidden), nn.LayerNorm(hidden))
                                      for m, d in dims.items()})
        self.modality_embedding = nn.Parameter(torch.zeros(len(dims), hidden))
        self.cls = nn.Parameter(torch.zeros(1, 1, hidden))
        layer = nn.TransformerEncoderLayer(hidden, heads, 2 * hidden, dropout, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.classify = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, num_classes))

    def forward(self, inputs):
        batch = next(iter(inputs.values())).pooled.shape[0]
        sequences = [self.cls.expand(batch, -1, -1)]
        masks = [torch.ones(batch, 1, dtype=torch.bool, device=self.cls.device)]
        for i, m in enumerate(self.names):
            tokens = inputs[m].tokens
            sequences.append(self.project[m](tokens) + self.modality_embedding[i])
            masks.append(inputs[m].mask.bool() if inputs[m].mask is not None else
                         torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device))
        encoded = self.encoder(torch.cat(sequences, 1), src_key_padding_mask=~torch.cat(masks, 1))  # [B, 1+ΣL, H]
        return {"logits": self.classify(encoded[:, 0])}


@register_head("aligned")
class AlignedHead(FusionHead):
    """Every modality projected into one space; an auxiliary contrastive loss pulls an
    item's projections together (and pushes other items' apart), then concat + MLP."""

    temperature = 0.1

    def __init__(self, dims, num_classes, hidden, dropout):
        super().__init__(dims, num_classes, hidden, dropout)
        self.project = nn.ModuleDict({m: projection(d.pooled, hidden, dropout) for m, d in dims.items()})
        self.classify = mlp(hidden * len(dims), hidden, num_classes, dropout)

    def forward(self, inputs):
        projected = [self.project[m](inputs[m].pooled) for m in self.names]
        normed = [nn.functional.normalize(p, dim=-1) for p in projected]
        targets = torch.arange(normed[0].shape[0], device=normed[0].device)
        aux = torch.stack([
            nn.functional.cross_entropy(normed[i] @ normed[j].T / self.temperature, targets)
            for i in range(len(normed)) for j in range(len(normed)) if i != j
        ]).mean()
        return {"logits": self.classify(torch.cat(projected, dim=-1)), "aux_loss": aux}


@register_head("hierarchical")
class HierarchicalHead(FusionHead):
    """Fusion at two levels: token level (text tokens attend to image tokens) and pooled
    level (projected pooled features); both are joined before the classifier."""

    uses_tokens = True

    def __init__(self, dims, num_classes, hidden, dropout, heads: int = 4):
        super().__init__(dims, num_classes, hidden, dropout)
        self.text, self.image = self.names[:2]
        self.text_tokens = projection(dims[self.text].token, hidden, dropout)
        self.image_tokens = projection(dims[self.image].token, hidden, dropout)
        self.attend = nn.MultiheadAttention(hidden, heads, dropout=dropout, batch_first=True)
        self.pooled = nn.ModuleDict({m: projection(d.pooled, hidden, dropout) for m, d in dims.items()})
        self.classify = mlp(hidden * (1 + len(dims)), hidden, num_classes, dropout)

    def forward(self, inputs):
        text, image = inputs[self.text], inputs[self.image]
        t = self.text_tokens(text.tokens)
        v = self.image_tokens(image.tokens)
        token_level, _ = self.attend(t, v, v, key_padding_mask=_key_padding(image.mask))  # [B, Lt, H]
        pooled_level = [self.pooled[m](inputs[m].pooled) for m in self.names]
        joined = torch.cat([masked_mean(token_level + t, text.mask), *pooled_level], dim=-1)
        return {"logits": self.classify(joined)}
