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

from msa.models.registry import register_head


@dataclasses.dataclass(frozen=True)
class ModalityDims:
    pooled: int
    token: int


@dataclasses.dataclass
class Modality:
    pooled: torch.Tensor  # [B, D]
    tokens: torch.Tensor | None = None  # [B, L, D]
    mask: torch.Tensor | None = None  # [B, L], True where a token is real
    split: torch.Tensor | None = None  # the activation entering an unfrozen encoder top, if one reads it

    def present(self) -> torch.Tensor:
        """[B] True where the modality is there at all (modality dropout zeroes it)."""
        return self.pooled.abs().sum(-1) > 0


def mlp(in_dim: int, hidden: int, out_dim: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, out_dim))


def projection(in_dim: int, out_dim: int, dropout: float) -> nn.Sequential:
    layers = [nn.Linear(in_dim, out_dim), nn.LayerNorm(out_dim), nn.GELU()]
    return nn.Sequential(*layers, nn.Dropout(dropout)) if dropout > 0 else nn.Sequential(*layers)


def token_projection(in_dim: int, out_dim: int) -> nn.Sequential:
    """For token sequences: no dropout here (its mask over [B, L, W] cost co-attn 10% of its
    time); the classifier MLP after it keeps its dropout."""
    return projection(in_dim, out_dim, 0.0)


class Standardise(nn.Module):
    """Per-feature standardisation with statistics of the training rows (sklearn's
    StandardScaler, as a module): pre-extracted features come unscaled (COVAREP and Facet
    columns differ by orders of magnitude), and a LayerNorm across one step's features
    lets the largest columns drown the rest. The statistics are buffers, saved with the
    weights; `fit_standardisers` sets them before training."""

    def __init__(self, modality: str, level: str, dim: int):
        super().__init__()
        self.modality, self.level = modality, level  # level: "tokens" or "pooled"
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x standardised; with a mask [B, L] of token steps, the padding stays zero."""
        standardised = (x - self.mean) / self.std
        return standardised if mask is None else standardised * mask.unsqueeze(-1)


def fit_standardisers(model: nn.Module, statistics: Callable[[str, str], tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Set every Standardise module of the model from statistics(modality, level) -> (mean, std)."""
    for module in model.modules():
        if isinstance(module, Standardise):
            mean, std = statistics(module.modality, module.level)
            module.mean.copy_(mean)
            module.std.copy_(std.clamp(min=1e-6))


class HeadWrapper(nn.Module):
    """Something around a head (its score's bound, encoder tops, standardised inputs) that
    declares what the head declares to the stages that batch for it."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head
        self.uses_tokens = head.uses_tokens
        self.default_batch_size = head.default_batch_size


class StandardisedInputs(HeadWrapper):
    """A head given some modalities' features standardised per feature first (the training
    rows' statistics, as Standardise): pooled, and tokens for a head that reads them (padding
    stays zero). For pre-extracted features, which come unscaled: the heads meet them with a
    LayerNorm or a linear layer, where the largest columns drown the rest (on bench/
    sequence_quality.py's means signal, concat's val corr was 0.05 without this, 0.90 with
    it; early's -0.02). Sets msa extracts itself keep their scale, as measured."""

    def __init__(self, head: nn.Module, dims: dict[str, ModalityDims], modalities: list[str]):
        super().__init__(head)
        self.pooled = nn.ModuleDict({m: Standardise(m, "pooled", dims[m].pooled) for m in modalities})
        self.tokens = nn.ModuleDict({m: Standardise(m, "tokens", dims[m].token) for m in modalities}
                                    if head.uses_tokens else {})

    def standardised(self, modality: str, x: Modality) -> Modality:
        if modality not in self.pooled:
            return x
        tokens = x.tokens
        if modality in self.tokens and tokens is not None:
            tokens = self.tokens[modality](tokens, x.mask)
        return dataclasses.replace(x, pooled=self.pooled[modality](x.pooled), tokens=tokens)

    def forward(self, inputs: dict[str, Modality]) -> dict[str, torch.Tensor]:
        return self.head({m: self.standardised(m, x) for m, x in inputs.items()})


class FusionHead(nn.Module):
    """The contract of a head: the modality names in order, its width and dropout, and what it
    declares about itself to the stages that build and feed it."""

    uses_tokens = False  # reads token-level features (else pooled only)
    needs_aligned = False  # its modalities share one time axis (checked before training)
    min_modalities = 1  # the modalities it reads by role (text and image tokens: 2)
    fuses = False  # built to combine modalities: on one it trains, as a one-modality model (warned)
    output_scaling = "tanh"  # how a regression score is bounded (ScaledScore), unless --output-scaling says
    standardises_inputs = False  # whether it standardises its own inputs (else imported ones get StandardisedInputs)
    options: tuple[str, ...] = ()  # run options its constructor takes by keyword
    # Measured on MVSA, 2 CPU cores, 20 epochs: concat 6.0 s at 64 and 4.6 s at 128 (same
    # macro-F1); co-attn 57 s at 64 and 70 s at 128 (longer batches carry more padding).
    default_batch_size = 128
    default_dropout = 0.1  # unless --dropout says

    def __init__(self, dims: dict[str, ModalityDims], num_classes: int, hidden: int, dropout: float):
        super().__init__()
        self.names = list(dims)
        self.num_classes, self.hidden, self.dropout = num_classes, hidden, dropout


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
    min_modalities = 2


@register_head("concat")
class ConcatHead(FusionHead):
    """Project each pooled feature (Linear + LayerNorm), concatenate, 2-layer MLP."""

    fuses = True

    def __init__(self, dims, num_classes, hidden, dropout):
        super().__init__(dims, num_classes, hidden, dropout)
        self.project = nn.ModuleDict({m: projection(d.pooled, hidden, dropout) for m, d in dims.items()})
        self.classify = mlp(hidden * len(dims), hidden, num_classes, dropout)

    def forward(self, inputs):
        joined = torch.cat([self.project[m](inputs[m].pooled) for m in self.names], dim=-1)  # [B, M*H]
        return {"logits": self.classify(joined)}


@register_head("linear")
class LinearHead(FusionHead):
    """The baseline every leaderboard should show: one linear layer on the concatenated pooled
    features, each feature standardised with the training rows' statistics (StandardScaler),
    trained by the same loop as the others: a logistic regression for classes (softmax), a
    linear regression for scores (with --weight-decay, a ridge)."""

    output_scaling = "clip"  # a linear regression, its score clipped to the bound: tanh made it no linear model
    standardises_inputs = True

    def __init__(self, dims, num_classes, hidden, dropout):
        super().__init__(dims, num_classes, hidden, dropout)
        self.standardise = nn.ModuleDict({m: Standardise(m, "pooled", d.pooled) for m, d in dims.items()})
        self.classify = nn.Linear(sum(d.pooled for d in dims.values()), num_classes)
        nn.init.zeros_(self.classify.weight)

    def forward(self, inputs):
        return {"logits": self.classify(torch.cat([self.standardise[m](inputs[m].pooled) for m in self.names], -1))}


@register_head("late")
class LateFusionHead(FusionHead):
    """Average of unimodal heads' logits (over the modalities present in each sample)."""

    fuses = True

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

    fuses = True

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


class TokenAttention(nn.Module):
    """Multi-head attention over tokens that a head has already projected.

    The per-modality projection serves as the query map and one linear gives keys and
    values, where nn.MultiheadAttention adds three projections of its own. In a
    micro-benchmark of co-attn's shapes (batch 64, 2 CPU cores), a training step cost
    158 ms with nn.MultiheadAttention at width 256 and 58 ms with no extra projections at
    width 128; this class adds the key/value linear back.
    """

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.key_value = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        batch, length, dim = queries.shape
        key, value = self.key_value(keys).chunk(2, dim=-1)  # [B, Lk, D] each

        def split(x: torch.Tensor) -> torch.Tensor:  # [B, L, D] -> [B, heads, L, D / heads]
            return x.view(batch, x.shape[1], self.heads, dim // self.heads).transpose(1, 2)

        mask = None if key_mask is None else key_mask.bool()[:, None, None, :]  # True: attend
        # No dropout on the attention weights (8% of co-attn's time); the classifier has it.
        attended = nn.functional.scaled_dot_product_attention(split(queries), split(key), split(value), attn_mask=mask)
        return self.out(attended.transpose(1, 2).reshape(batch, length, dim))


@register_head("cross-attn")
class CrossAttentionHead(FusionHead):
    """The text's pooled feature queries the image tokens (multi-head attention)."""

    uses_tokens = True
    min_modalities = 2
    default_batch_size = 64

    def __init__(self, dims, num_classes, hidden, dropout, heads: int = 4):
        super().__init__(dims, num_classes, hidden, dropout)
        self.text, self.image = self.names[:2]
        width = hidden // 2  # token-level work dominates; see TokenAttention
        self.query = projection(dims[self.text].pooled, width, dropout)
        self.keys = token_projection(dims[self.image].token, width)
        self.attend = TokenAttention(width, heads)
        self.classify = mlp(2 * width, hidden, num_classes, dropout)

    def forward(self, inputs):
        text, image = inputs[self.text], inputs[self.image]
        query = self.query(text.pooled).unsqueeze(1)  # [B, 1, W]
        context = self.attend(query, self.keys(image.tokens), image.mask)  # [B, 1, W]
        return {"logits": self.classify(torch.cat([query, context], dim=-1).squeeze(1))}


class TokenPairHead(FusionHead):
    """Set-up shared by heads that work on the text and image token sequences: the first
    two modalities in those roles, each projected to `width` = hidden // 2."""

    uses_tokens = True
    min_modalities = 2
    default_batch_size = 64

    def __init__(self, dims, num_classes, hidden, dropout):
        super().__init__(dims, num_classes, hidden, dropout)
        self.text, self.image = self.names[:2]
        self.width = hidden // 2  # token-level work dominates; see TokenAttention
        self.text_tokens = token_projection(dims[self.text].token, self.width)
        self.image_tokens = token_projection(dims[self.image].token, self.width)


@register_head("co-attn")
class CoAttentionHead(TokenPairHead):
    """Both directions: text tokens attend to image tokens and image tokens to text tokens;
    the two pooled contexts and the global image feature are joined."""

    def __init__(self, dims, num_classes, hidden, dropout, heads: int = 4):
        super().__init__(dims, num_classes, hidden, dropout)
        width = self.width
        self.image_global = projection(dims[self.image].pooled, width, dropout)
        self.text_to_image = TokenAttention(width, heads)
        self.image_to_text = TokenAttention(width, heads)
        self.classify = mlp(3 * width, hidden, num_classes, dropout)

    def forward(self, inputs):
        text, image = inputs[self.text], inputs[self.image]
        t = self.text_tokens(text.tokens)  # [B, Lt, W]
        v = self.image_tokens(image.tokens)  # [B, Li, W]
        text_ctx = self.text_to_image(t, v, image.mask)  # [B, Lt, W]
        image_ctx = self.image_to_text(v, t, text.mask)  # [B, Li, W]
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

    fuses = True

    uses_tokens = True
    default_batch_size = 64

    def __init__(self, dims, num_classes, hidden, dropout, layers: int = 1, heads: int = 4):
        super().__init__(dims, num_classes, hidden, dropout)
        width = hidden // 2  # token-level work dominates; see TokenAttention
        self.project = nn.ModuleDict({m: nn.Sequential(nn.Linear(d.token, width), nn.LayerNorm(width))
                                      for m, d in dims.items()})
        self.modality_embedding = nn.Parameter(torch.zeros(len(dims), width))
        self.cls = nn.Parameter(torch.zeros(1, 1, width))
        # No dropout inside the encoder: masks over [B, heads, L, L] made up most of its time
        # on MVSA (5.4 s per 10 batches); the [CLS] output gets dropout instead.
        layer = nn.TransformerEncoderLayer(width, heads, 2 * width, 0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.classify = nn.Sequential(nn.LayerNorm(width), nn.Dropout(dropout), nn.Linear(width, num_classes))

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

    fuses = True

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
class HierarchicalHead(TokenPairHead):
    """Fusion at two levels: token level (text tokens attend to image tokens) and pooled
    level (projected pooled features); both are joined before the classifier."""

    def __init__(self, dims, num_classes, hidden, dropout, heads: int = 4):
        super().__init__(dims, num_classes, hidden, dropout)
        width = self.width
        self.attend = TokenAttention(width, heads)
        self.pooled = nn.ModuleDict({m: projection(d.pooled, hidden, dropout) for m, d in dims.items()})
        self.classify = mlp(width + hidden * len(dims), hidden, num_classes, dropout)

    def forward(self, inputs):
        text, image = inputs[self.text], inputs[self.image]
        t = self.text_tokens(text.tokens)  # [B, Lt, W]
        token_level = self.attend(t, self.image_tokens(image.tokens), image.mask) + t  # [B, Lt, W]
        pooled_level = [self.pooled[m](inputs[m].pooled) for m in self.names]
        joined = torch.cat([masked_mean(token_level, text.mask), *pooled_level], dim=-1)
        return {"logits": self.classify(joined)}
