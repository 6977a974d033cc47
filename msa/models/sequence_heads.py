"""Sequence heads for CMU-MOSI-style data: token sequences of any number of modalities (text,
audio, vision), one sequence encoder per modality, then a fusion. Registered in HEADS."""

from __future__ import annotations

import math

import torch
from torch import nn

from msa.models.heads import FusionHead, masked_mean, mlp, register_head
from msa.pipeline.config import ConfigError

SEQUENCE_ENCODERS = ("lstm", "transformer")


def sinusoidal_positions(length: int, dim: int) -> torch.Tensor:
    """[length, dim] fixed positional encoding (Vaswani et al.)."""
    position = torch.arange(length, dtype=torch.float32)[:, None]
    frequency = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency[: dim // 2])
    return table


def last_step(mask: torch.Tensor) -> torch.Tensor:
    """[B] index of each sequence's last real step (the files pad at the start or the end)."""
    return (mask * torch.arange(1, mask.shape[1] + 1, device=mask.device)).argmax(1)


class SequenceEncoder(nn.Module):
    """One modality's sequence: LayerNorm + projection, then an LSTM or a transformer encoder
    (with positional encoding). Returns per-step outputs [B, T, H] and a state [B, H]."""

    def __init__(self, dim: int, hidden: int, kind: str, dropout: float, layers: int = 1, heads: int = 4):
        super().__init__()
        if kind not in SEQUENCE_ENCODERS:
            raise ConfigError(f"unknown sequence encoder {kind!r}; known: {', '.join(SEQUENCE_ENCODERS)}")
        self.kind = kind
        self.project = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU())
        if kind == "lstm":
            self.encoder = nn.LSTM(hidden, hidden, num_layers=layers, batch_first=True)
        else:
            layer = nn.TransformerEncoderLayer(hidden, heads, hidden * 2, dropout, batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.project(tokens)
        if self.kind == "lstm":
            steps, _ = self.encoder(x)
            return steps, steps[torch.arange(len(steps)), last_step(mask)]
        x = x + sinusoidal_positions(x.shape[1], x.shape[2]).to(x.device)
        steps = self.encoder(x, src_key_padding_mask=~mask)
        return steps, masked_mean(steps, mask)


class SequenceHead(FusionHead):
    """Heads over token sequences of any number of modalities (CMU-MOSI style: text, audio,
    vision), one sequence encoder per modality."""

    uses_tokens = True
    options = ("sequence_encoder",)
    default_batch_size = 32  # MOSI has 1,284 training items; the field trains with small batches

    def __init__(self, dims, num_classes, hidden, dropout, sequence_encoder: str = "lstm"):
        super().__init__(dims, num_classes, hidden, dropout)
        self.encoders = nn.ModuleDict({m: SequenceEncoder(d.token, hidden, sequence_encoder, dropout)
                                       for m, d in dims.items()})

    def states(self, inputs) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        steps, states = {}, {}
        for m in self.names:
            steps[m], states[m] = self.encoders[m](inputs[m].tokens, inputs[m].mask)
        return steps, states


@register_head("sum-lstm")
class SumLSTMHead(SequenceHead):
    """The lab baseline: the modalities' per-step outputs summed (aligned sequences), a fusion
    LSTM over the sum, its last state through an MLP."""

    needs_aligned = True  # one time axis for all modalities (MOSI's aligned features; not MVSA's)

    def __init__(self, dims, num_classes, hidden, dropout, sequence_encoder: str = "lstm"):
        super().__init__(dims, num_classes, hidden, dropout, sequence_encoder)
        self.fuse = nn.LSTM(hidden, hidden, batch_first=True)
        self.classify = mlp(hidden, hidden, num_classes, dropout)

    def forward(self, inputs):
        steps, _ = self.states(inputs)
        lengths = {s.shape[1] for s in steps.values()}
        if len(lengths) > 1:
            raise ConfigError(f"sum-lstm needs aligned sequences of one length, got lengths {sorted(lengths)}")
        masks = [inputs[m].mask for m in self.names]
        mask = torch.stack(masks).any(0)
        fused, _ = self.fuse(sum(steps.values()))
        return {"logits": self.classify(fused[torch.arange(len(fused)), last_step(mask)])}


@register_head("attention")
class ModalityAttentionHead(SequenceHead):
    """A learned query attends over the modality states; the weighted sum through an MLP.
    The weights per modality are returned as `modality_weights` [B, M]."""

    def __init__(self, dims, num_classes, hidden, dropout, sequence_encoder: str = "lstm"):
        super().__init__(dims, num_classes, hidden, dropout, sequence_encoder)
        self.query = nn.Parameter(torch.randn(hidden) / math.sqrt(hidden))
        self.key = nn.Linear(hidden, hidden)
        self.classify = mlp(hidden, hidden, num_classes, dropout)

    def forward(self, inputs):
        _, states = self.states(inputs)
        stacked = torch.stack([states[m] for m in self.names], dim=1)  # [B, M, H]
        weights = torch.softmax(self.key(stacked) @ self.query / math.sqrt(stacked.shape[-1]), dim=1)  # [B, M]
        # The weights go into val_predictions.parquet as weight_<modality>, like GMU's gate.
        return {"logits": self.classify((weights.unsqueeze(-1) * stacked).sum(1)), "modality_weights": weights}


@register_head("seq-concat")
class SequenceConcatHead(SequenceHead):
    """The modality states concatenated, through an MLP."""

    def __init__(self, dims, num_classes, hidden, dropout, sequence_encoder: str = "lstm"):
        super().__init__(dims, num_classes, hidden, dropout, sequence_encoder)
        self.classify = mlp(hidden * len(dims), hidden, num_classes, dropout)

    def forward(self, inputs):
        _, states = self.states(inputs)
        return {"logits": self.classify(torch.cat([states[m] for m in self.names], dim=-1))}
