"""Regression heads: a head's score bounded to [-3, 3] (ScaledScore), and the closed-form start
of the `linear` head."""

from __future__ import annotations

from typing import get_args

import numpy as np
import torch
from torch import nn

from msa.core.config import ConfigError, OutputScaling
from msa.models.heads import HeadWrapper, LinearHead

OUTPUT_SCALINGS = get_args(OutputScaling)


class ScaledScore(HeadWrapper):
    """Regression: a head's single output squashed into [-bound, bound] (MOSI scores: 3)."""

    def __init__(self, head: nn.Module, scaling: str = "tanh", bound: float = 3.0):
        super().__init__(head)
        if scaling not in OUTPUT_SCALINGS:
            raise ConfigError(f"--output-scaling must be one of {', '.join(OUTPUT_SCALINGS)}, got {scaling!r}")
        self.scaling, self.bound = scaling, bound

    def unsquashed(self, scores: torch.Tensor) -> torch.Tensor:
        """The raw output that forward squashes to `scores` (clipped inside the bound)."""
        if self.scaling == "clip":
            return scores
        inside = (scores / self.bound).clamp(-0.99, 0.99)
        return torch.atanh(inside) if self.scaling == "tanh" else torch.logit((inside + 1) / 2)

    def forward(self, inputs):
        out = self.head(inputs)
        raw = out["logits"]
        if self.scaling == "clip":
            return {**out, "logits": raw.clamp(-self.bound, self.bound)}
        squashed = torch.tanh(raw) if self.scaling == "tanh" else 2 * torch.sigmoid(raw) - 1
        return {**out, "logits": self.bound * squashed}


def start_linear_paths(model: nn.Module, pooled: dict[str, torch.Tensor], scores: torch.Tensor) -> None:
    """A regression `linear` head starts at the ridge's closed-form solution on the training rows
    (RidgeCV, alpha by leave-one-out on them), in the raw space its output squashes: gradient
    descent from zero took more epochs than a run has to reach it (at lr 1e-3: val MAE 1.01 against
    the ridge's 0.36; bench/sequence_quality.py). Classifiers start at zero. The same start for a
    linear path beside the sequence heads made them worse at every signal on 300 items (the means
    0.43 -> 0.66 MAE): the ridge's fit of the training rows left their sequence paths little to learn."""
    from sklearn.linear_model import RidgeCV

    path = closed_form_path(model)
    if path is None:
        return
    target = model.unsquashed(scores.float()).numpy()
    with torch.no_grad():
        features = torch.cat([path.standardise[m](pooled[m].float()) for m in path.names], -1).numpy()
        ridge = RidgeCV(alphas=np.logspace(-2, 4, 13)).fit(features, target)
        path.classify.weight.copy_(torch.as_tensor(ridge.coef_, dtype=torch.float32).reshape(1, -1))
        path.classify.bias.fill_(float(ridge.intercept_))


def closed_form_path(model: nn.Module) -> LinearHead | None:
    """A regression model's `linear` head (behind encoder tops too), the part with a closed-form start."""
    if not isinstance(model, ScaledScore):
        return None
    return next((m for m in model.modules() if isinstance(m, LinearHead)), None)


def starts_closed_form(model: nn.Module) -> bool:
    """Whether start_linear_paths gives this model a fitted start, which selection then judges
    as epoch 0: Adam's steps of lr on every weight at once moved a ridge's 400 weights off its
    optimum within an epoch (val MAE 0.32 -> 0.52 on 200 items), so the start can be the best."""
    return closed_form_path(model) is not None
