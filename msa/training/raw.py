"""Raw items for end-to-end training and prediction (`msa finetune`): texts tokenised once,
images decoded per batch in a background thread, as (rows, inputs) batches for the loop."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from typing import get_args

import torch

from msa.cache.manifest import Manifest
from msa.core.compute import loading_workers, prefetch
from msa.core.config import ImageAug
from msa.models.text import TextEncoder
from msa.models.unfrozen import EndToEndModel
from msa.training.bank import class_targets

IMAGE_AUGS = get_args(ImageAug)


def clean_text(text: str) -> str:
    """Drop URLs and @mentions, keep a #tag's word, collapse whitespace."""
    text = re.sub(r"https?://\S+|www\.\S+", " ", text)
    text = re.sub(r"@\w+", " ", text)
    text = re.sub(r"#(\w+)", r"\1", text)
    return re.sub(r"\s+", " ", text).strip()


def image_augmentation(preset: str, crop: int):
    """A transform of uint8 [3, H, W] tensors, drawing from torch's global RNG (saved with checkpoints)."""
    if preset == "none":
        return None
    from torchvision.transforms import v2

    weak = [v2.RandomResizedCrop(crop, scale=(0.6, 1.0), antialias=True), v2.RandomHorizontalFlip(),
            v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2)]
    return v2.Compose(weak + ([v2.RandAugment()] if preset == "strong" else []))


@dataclasses.dataclass
class RawData:
    """Items tokenised once; images decoded per batch."""

    manifest: Manifest
    token_ids: list[list[int]]
    image_sources: list[str | None]  # None: a bad image, fed as a blank one
    targets: torch.Tensor  # [N], -1 for unlabelled

    @classmethod
    def read(cls, manifest: Manifest, encoder: TextEncoder, clean: bool) -> RawData:
        texts = [clean_text(t) if clean else t for t in manifest.column("text")]
        return cls(manifest, encoder.tokenize(texts), manifest.image_sources(), class_targets(manifest.column("label")))

    def lengths(self) -> torch.Tensor:
        """[N] token counts, for length-bucketed batches."""
        return torch.tensor([len(ids) for ids in self.token_ids])


def batch_inputs(model: EndToEndModel, data: RawData, rows: torch.Tensor, pixels: torch.Tensor, augment,
                 device: torch.device) -> dict:
    text: TextEncoder = model.encoders["text"]
    input_ids, mask = text.collate([data.token_ids[r] for r in rows.tolist()])
    if augment is not None:  # in this thread, so that its random draws follow the saved RNG state
        pixels = torch.stack([augment(p) for p in pixels])
    images = model.encoders["image"].preprocess.normalise(pixels.to(device))
    images = images.contiguous(memory_format=torch.channels_last)
    return {"text": (input_ids.to(device), mask.to(device)), "image": images}


def load_pixels(model: EndToEndModel, data: RawData, rows: torch.Tensor) -> torch.Tensor:
    preprocess = model.encoders["image"].preprocess
    return preprocess.load_batch([data.image_sources[r] for r in rows.tolist()])


def raw_batches(model: EndToEndModel, data: RawData, batches: list[torch.Tensor], device: torch.device,
                augment=None, advance=None) -> Iterator[tuple[torch.Tensor, dict]]:
    """(rows, inputs) per batch; images decoded ahead in threads while the model runs.
    advance(n) follows each batch (a progress bar)."""
    for rows, pixels in zip(batches, prefetch(batches, lambda b: load_pixels(model, data, b),
                                              loading_workers(device))):
        yield rows, batch_inputs(model, data, rows, pixels, augment, device)
        if advance:
            advance(len(rows))
