"""Fusion heads behind the unfrozen tops of the encoders, and layer-wise learning rates.

On cached features (`train-head --unfreeze-...`), a top reads the split activation that
`msa extract --text-split-layer/--image-split-stage` stored; end to end (`msa finetune`)
the same top reads the frozen bottom's output. Either way the head sees what it would
see on cached features: token features, pooled features and masks per modality.
"""

from __future__ import annotations

import torch
from torch import nn

from msa.core.config import resolve_layer_count
from msa.models.heads import HeadWrapper, Modality
from msa.models.image import ImageEncoder
from msa.models.text import TextEncoder, TextTop, transformer_layers


def text_modality(tokens: torch.Tensor, pooled: torch.Tensor, mask: torch.Tensor) -> Modality:
    """A text encoder's output as a head reads it from the cache: zeros at pad positions."""
    return Modality(pooled, tokens * mask.unsqueeze(-1).to(tokens.dtype), mask.bool())


def image_modality(tokens: torch.Tensor, pooled: torch.Tensor) -> Modality:
    """An image encoder's output as a head reads it from the cache: every token real."""
    return Modality(pooled, tokens, torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device))


def top_features(top: nn.Module, split: torch.Tensor, mask: torch.Tensor | None) -> Modality:
    """Run one encoder top on its input activation: a text top on hidden states and their mask,
    an image top on a feature map."""
    if isinstance(top, TextTop):
        return text_modality(*top(split, mask), mask)
    return image_modality(*top(split))


class TopsAndHead(HeadWrapper):
    """A head whose inputs for some modalities come from trainable encoder tops."""

    def __init__(self, head: nn.Module, tops: dict[str, nn.Module]):
        super().__init__(head)
        self.tops = nn.ModuleDict(tops)

    def forward(self, inputs: dict[str, Modality]) -> dict[str, torch.Tensor]:
        features = {name: top_features(self.tops[name], m.split, m.mask) if name in self.tops else m
                    for name, m in inputs.items()}
        return self.head(features)


def parameter_groups(model: nn.Module, lr_encoder: float, lr_fusion: float, lr_head: float,
                     weight_decay: float, layer_decay: float = 1.0) -> list[dict]:
    """Optimizer groups: encoder layers (`tops.`/`encoders.`), the head's classifier (its
    `classify` module; all of a head that has none, like text-only or late), the rest of the
    head (fusion). Frozen parameters are left out. With layer_decay < 1, text layer i of n
    learns at lr_encoder * layer_decay ** (n - 1 - i): lower layers hold general language
    and move least (ULMFiT, ELECTRA); LoRA adapters follow the layer they sit in."""
    groups = {"encoder": [], "fusion": [], "head": []}
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    head_has_classifier = any("classify" in n.split(".") for n, _ in trainable)
    text_depth = text_layer_depths(model) if layer_decay != 1.0 else {}
    by_depth: dict[int, list] = {}
    for name, parameter in trainable:
        parts = name.split(".")
        if id(parameter) in text_depth:
            by_depth.setdefault(text_depth[id(parameter)], []).append(parameter)
        elif parts[0] in ("tops", "encoders"):
            groups["encoder"].append(parameter)
        elif "classify" in parts or not head_has_classifier:
            groups["head"].append(parameter)
        else:
            groups["fusion"].append(parameter)
    rates = {"encoder": lr_encoder, "fusion": lr_fusion, "head": lr_head}
    layered = [{"name": f"text-depth-{depth}", "params": by_depth[depth], "lr": lr_encoder * layer_decay ** depth,
                "weight_decay": weight_decay} for depth in sorted(by_depth)]
    return layered + [{"name": k, "params": v, "lr": rates[k], "weight_decay": weight_decay}
                      for k, v in groups.items() if v]


def text_layer_depths(model: nn.Module) -> dict[int, int]:
    """id(parameter) -> how many layers below the top its text transformer layer is (0: the top)."""
    stacks = [top.layers() for name, top in getattr(model, "tops", {}).items() if name == "text"]
    if isinstance(getattr(model, "encoders", None), nn.ModuleDict):
        stacks.append(transformer_layers(model.encoders["text"].model))
    depths = {}
    for layers in stacks:
        for index, layer in enumerate(layers):
            for parameter in layer.parameters():
                depths[id(parameter)] = len(layers) - 1 - index
    return depths


class EndToEndModel(nn.Module):
    """Text and image encoders with trainable tops, and a fusion head; reads token ids and pixels
    (`msa finetune`). The head sees what it would see on cached features."""

    def __init__(self, text: TextEncoder, image: ImageEncoder, head: nn.Module, text_layers: int, image_stages: int):
        super().__init__()
        self.encoders = nn.ModuleDict({"text": text, "image": image})
        self.head = head
        self.uses_tokens = head.uses_tokens
        self.encoders.requires_grad_(False)
        layers = transformer_layers(text.model)
        if text_layers:
            text_layers = resolve_layer_count(text_layers, len(layers), "--unfreeze-text-layers")
        self.trainable = nn.ModuleList(list(layers[len(layers) - text_layers:]) if text_layers else [])
        if image_stages:  # the stages only: a timm pool holds the whole model
            self.trainable.append(image.split(image_stages)[1].trunk)
        self.trainable.requires_grad_(True)
        for name, parameter in text.named_parameters():  # LoRA adapters, where add_lora put some
            if "lora_" in name:
                parameter.requires_grad_(True)

    def train(self, mode: bool = True) -> EndToEndModel:
        """Frozen parts stay in eval mode (no dropout, fixed BatchNorm statistics), as when cached."""
        super().train(mode)
        self.encoders.eval()
        self.trainable.train(mode)
        return self

    def forward(self, inputs: dict) -> dict[str, torch.Tensor]:
        input_ids, mask = inputs["text"]
        text = text_modality(*self.encoders["text"](input_ids, mask), mask)
        return self.head({"text": text, "image": image_modality(*self.encoders["image"](inputs["image"]))})
