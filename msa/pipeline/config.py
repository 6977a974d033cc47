"""One dataclass config per stage. Defaults live here only; the CLI maps options onto fields."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any


@dataclasses.dataclass
class ExtractConfig:
    data: Path  # MVSA folder: train.txt, test_without_label.txt, data/{guid}.txt|jpg
    cache: Path = Path("msa-cache")  # one cache directory per data set
    text_model: str = "roberta-base"  # HF hub id or local model directory
    max_len: int = 128  # tokens kept per text (longer texts are truncated)
    pooling: str = "mean"  # mean | cls: how the pooled text feature is made
    image_model: str = "resnet50"  # torchvision name or timm:NAME
    image_weights: str | None = None  # local state dict instead of downloaded weights
    on_bad_image: str = "blank"  # blank | skip | fail
    val_ratio: float = 0.2  # stratified share of labelled items held out for validation
    split_seed: int = 42
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 (auto: bf16/fp16 only where fast)
    compile: bool = False  # torch.compile the image encoder (pays off on large data sets)
    batch_size: int = 32
    limit: int | None = None  # only the first N listed items: a quick trial
    shard: str | None = None  # "i/n": encode the i-th of n disjoint shares (0-based)
    modalities: tuple[str, ...] = ("text", "image")


def to_json(config: Any) -> dict:
    """A config as plain JSON values (paths and tuples become strings and lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))


def save_config(config: Any, path: Path) -> None:
    path.write_text(json.dumps(to_json(config), indent=2) + "\n")


def default(config_class: type, field: str) -> Any:
    """The default of one field, for CLI options that must not repeat it."""
    value = config_class.__dataclass_fields__[field].default
    if value is dataclasses.MISSING:
        raise KeyError(f"{config_class.__name__}.{field} has no default")
    return value
