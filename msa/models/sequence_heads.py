"""Sequence heads for CMU-MOSI-style data: token sequences of any number of modalities (text,
audio, vision), one sequence encoder per modality, then a fusion. Registered in HEADS."""

from __future__ import annotations

import math
from typing import get_args

import torch
from torch import nn

from msa.core.config import ConfigError, SequenceEncoder
from msa.models.heads import FusionHead, Standardise, masked_mean, mlp
from msa.models.registry import register_head

SEQUENCE_ENCODERS = get_args(SequenceEncoder)


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

    def __init__(self, modality: str, dim: int, hidden: int, kind: str, dropout: float, layers: int = 1,
                 heads: int = 4):
        super().__init__()
        if kind not in SEQUENCE_ENCODERS:
            raise ConfigError(f"unknown sequence encoder {kind!r}; known: {', '.join(SEQUENCE_ENCODERS)}")
        self.kind = kind
        self.standardise = Standardise(modality, "tokens", dim)
        self.project = nn.Sequential(nn.Linear(dim, hidden), nn.GELU())
        # The mean of the standardised steps, projected linearly, joins the state: a signal in
        # the means (what a ridge on pooled features finds) needs no recurrence to be learned.
        self.mean_path = nn.Linear(dim, hidden)
        if kind == "lstm":
            self.encoder = nn.LSTM(hidden, hidden, num_layers=layers, batch_first=True)
        else:
            layer = nn.TransformerEncoderLayer(hidden, heads, hidden * 2, dropout, batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-step outputs [B, T, H], state [B, H])."""
        standardised = self.standardise(tokens, mask)
        x = self.project(standardised)
        means = masked_mean(standardised, mask)
        if self.kind == "lstm":
            steps, _ = self.encoder(x)
            return steps, steps[torch.arange(len(steps)), last_step(mask)] + self.mean_path(means)
        x = x + sinusoidal_positions(x.shape[1], x.shape[2]).to(x.device)
        steps = self.encoder(x, src_key_padding_mask=~mask)
        return steps, masked_mean(steps, mask) + self.mean_path(means)


class SequenceHead(FusionHead):
    """Heads over token sequences of any number of modalities (CMU-MOSI style: text, audio,
    vision), one sequence encoder per modality."""

    uses_tokens = True
    fuses = True
    options = ("sequence_encoder",)
    default_batch_size = 32  # MOSI has 1,284 training items; the field trains with small batches
    # A score is a clipped linear scale, and tanh bends all of it: on bench/sequence_quality.py's
    # means signal at 2,000 items, attention's val MAE was 1.10x the ridge's with tanh, 1.08x
    # clipped (seeds 1-3); dropout, weight decay, lr, batch size and width did no better than 1.09x.
    output_scaling = "clip"
    standardises_inputs = True  # every step, in its SequenceEncoder

    def __init__(self, dims, num_classes, hidden, dropout, sequence_encoder: str = "lstm"):
        super().__init__(dims, num_classes, hidden, dropout)
        self.encoders = nn.ModuleDict({m: SequenceEncoder(m, d.token, hidden, sequence_encoder, dropout)
                                       for m, d in dims.items()})

    def states(self, inputs) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        steps, states = {}, {}
        for m in self.names:
            steps[m], states[m] = self.encoders[m](inputs[m].tokens, inputs[m].mask)
        return steps, states


@register_head("sum-lstm")
class SumLSTMHead(SequenceHead):
    """The lab baseline: the modalities' per-step outputs summed (aligned sequences), a fusion
    LSTM over the sum; its last state and the modality states, concatenated, through an MLP
    (the modality states keep each modality's own path: with the fused state alone, a signal
    in the modalities' means was learned markedly worse)."""

    needs_aligned = True  # one time axis for all modalities (MOSI's aligned features; not MVSA's)

    def __init__(self, dims, num_classes, hidden, dropout, sequence_encoder: str = "lstm"):
        super().__init__(dims, num_classes, hidden, dropout, sequence_encoder)
        self.fuse = nn.LSTM(hidden, hidden, batch_first=True)
        self.classify = mlp(hidden * (1 + len(dims)), hidden, num_classes, dropout)

    def forward(self, inputs):
        steps, states = self.states(inputs)
        lengths = {s.shape[1] for s in steps.values()}
        if len(lengths) > 1:
            raise ConfigError(f"sum-lstm needs aligned sequences of one length, got lengths {sorted(lengths)}")
        masks = [inputs[m].mask for m in self.names]
        mask = torch.stack(masks).any(0)
        fused, _ = self.fuse(sum(steps.values()))
        # The modality states (with their mean paths) join the fusion LSTM's last state.
        return {"logits": self.classify(torch.cat([fused[torch.arange(len(fused)), last_step(mask)],
                                                   *(states[m] for m in self.names)], dim=-1))}


@register_head("attention")
class ModalityAttentionHead(SequenceHead):
    """A learned query attends over the modality states; each state, scaled by its weight (times
    the number of modalities: equal weights leave it as it was), and the scaled states
    concatenated through an MLP. Concatenated, not summed: a sum mixes the modalities' paths,
    and on a signal spread over the modalities (bench/sequence_quality.py's data) it cost val
    MAE. The weights per modality are returned as `modality_weights` [B, M]."""

    def __init__(self, dims, num_classes, hidden, dropout, sequence_encoder: str = "lstm"):
        super().__init__(dims, num_classes, hidden, dropout, sequence_encoder)
        self.query = nn.Parameter(torch.randn(hidden) / math.sqrt(hidden))
        self.key = nn.Linear(hidden, hidden)
        self.classify = mlp(hidden * len(dims), hidden, num_classes, dropout)

    def forward(self, inputs):
        _, states = self.states(inputs)
        stacked = torch.stack([states[m] for m in self.names], dim=1)  # [B, M, H]
        weights = torch.softmax(self.key(stacked) @ self.query / math.sqrt(stacked.shape[-1]), dim=1)  # [B, M]
        scaled = weights.unsqueeze(-1) * stacked * len(self.names)
        # The weights go into val_predictions.parquet as weight_<modality>, like GMU's gate.
        return {"logits": self.classify(scaled.flatten(1)), "modality_weights": weights}


@register_head("seq-concat")
class SequenceConcatHead(SequenceHead):
    """The modality states concatenated, through an MLP."""

    def __init__(self, dims, num_classes, hidden, dropout, sequence_encoder: str = "lstm"):
        super().__init__(dims, num_classes, hidden, dropout, sequence_encoder)
        self.classify = mlp(hidden * len(dims), hidden, num_classes, dropout)

    def forward(self, inputs):
        _, states = self.states(inputs)
        return {"logits": self.classify(torch.cat([states[m] for m in self.names], dim=-1))}


@register_head("tfn")
class TensorFusionHead(SequenceHead):
    """Tensor Fusion Network (Zadeh et al., EMNLP 2017), the field's reference for modelling
    interactions: each modality's sequence encoded to a small vector z_m, a constant appended,
    and the outer product of all of them, [z_1; c] x [z_2; c] x ..., flattened, through two
    ReLU layers (the paper's sentiment inference subnetwork). The constant keeps each
    modality's own terms and every pair's alongside the full interaction. The paper encodes
    text with an LSTM and mean-pools audio and vision through an MLP; here every modality has
    the same sequence encoder (--sequence-encoder), whose state includes its inputs' mean.

    Three departures, measured on bench/sequence_quality.py's generated data: c = 4, not 1, so
    the unimodal and bimodal terms outweigh the three-way products at the start (with c = 1,
    a signal in the means was learned far worse than by a ridge regression); z_m is a linear
    map of the encoder state, with dropout after the first fused layer, not before it; and a
    linear map of the concatenated modality states, initialised to zero, adds to the output.
    Without that path the means signal's val MAE was 1.14x the ridge's (1.03x with it); a path
    initialised at random took over and lost the interaction signal (0.483 vs 0.426)."""

    max_fused = 250_000  # the outer product's size; past it, memory and the first layer explode
    constant = 4.0
    # Its fused layer overfits small data: on 300 items of bench/sequence_quality.py's interaction
    # signal, val corr 0.59x the ridge's at dropout 0.1, 1.00x at 0.3 (every other cell still ok).
    default_dropout = 0.3

    def __init__(self, dims, num_classes, hidden, dropout, sequence_encoder: str = "lstm"):
        super().__init__(dims, num_classes, hidden, dropout, sequence_encoder)
        self.fusion_dim = max(4, hidden // 32)  # 8 at the default width: 9^3 = 729 fused entries for 3 modalities
        fused = (self.fusion_dim + 1) ** len(dims)
        if fused > self.max_fused:
            raise ConfigError(f"tfn: the outer product of {len(dims)} modalities at {self.fusion_dim} dims each has "
                              f"{fused:,} entries; use fewer modalities (--modalities) or a smaller --hidden")
        self.reduce = nn.ModuleDict({m: nn.Linear(hidden, self.fusion_dim) for m in dims})
        self.classify = nn.Sequential(nn.Linear(fused, hidden), nn.ReLU(), nn.Dropout(dropout),
                                      nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))
        self.unimodal = nn.Linear(hidden * len(dims), num_classes)
        nn.init.zeros_(self.unimodal.weight)
        nn.init.zeros_(self.unimodal.bias)

    def forward(self, inputs):
        _, states = self.states(inputs)
        fused = None
        for m in self.names:
            z = self.reduce[m](states[m])
            z = torch.cat([z, torch.full_like(z[:, :1], self.constant)], dim=-1)  # [B, d + 1]
            fused = z if fused is None else (fused.unsqueeze(-1) * z.unsqueeze(1)).flatten(1)
        unimodal = self.unimodal(torch.cat([states[m] for m in self.names], dim=-1))
        return {"logits": self.classify(fused) + unimodal}
