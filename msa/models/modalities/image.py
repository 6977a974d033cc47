"""Images: a torchvision or timm encoder on each post's picture (a blank one where it is missing)."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable

import numpy as np
import torch

from msa.cache.captions import CaptionSet
from msa.core.compute import Compute, encoding_streams, in_cpu_streams, loading_workers, prefetch
from msa.core.config import ExtractConfig
from msa.models.image import ImageEncoder, build_image_encoder, image_preprocess, weights_identity
from msa.models.modalities import EncodeJob, Modality, pooled_in_streams


class ImageModality(Modality):
    name = "image"
    tuned = True
    compiles = True

    def model_name(self, cfg: ExtractConfig) -> str:
        return cfg.image_model

    def fingerprint(self, cfg: ExtractConfig, captions: CaptionSet | None) -> dict:
        # Decoded on the device, a JPEG is decoded whole and box-averaged: pixels close to the
        # CPU's draft-mode decode, not equal, so another set (CPU sets keep their names).
        decode = {"jpeg_draft": False, "decode": "device-batch", "draft_scale": "box"} \
            if cfg.image_decode == "device" else {"jpeg_draft": True}
        return {"model": cfg.image_model, "weights": weights_identity(cfg.image_model, cfg.image_weights),
                "preprocess": dataclasses.asdict(image_preprocess(cfg.image_model)), **decode,
                "resize": "torch-antialias", "exif_orientation": "applied", "deep_pixels": "scaled-to-8-bit",
                "split_stage": cfg.image_split_stage}

    def load(self, cfg: ExtractConfig) -> ImageEncoder:
        return build_image_encoder(cfg.image_model, cfg.image_weights)

    def autotune_key(self, cfg: ExtractConfig) -> str:
        return f"image|{cfg.image_model}|{weights_identity(cfg.image_model, cfg.image_weights)}"

    def sample_inputs(self, encoder: ImageEncoder, manifest, rows: np.ndarray):
        sources = manifest.image_sources()
        return encoder.preprocess.normalise(encoder.preprocess.load_batch([sources[r] for r in rows]))

    def timed_forward(self, encoder: ImageEncoder, variant, compute: Compute, streams: int):
        encoder = encoder.to(compute.device, memory_format=torch.channels_last)
        return pooled_in_streams(compiled(encoder) if variant.compile else encoder, variant.precision, compute,
                                 streams)

    def encode(self, encoder: ImageEncoder, job: EncodeJob) -> None:
        compute, rows = job.compute, job.rows
        encoder.to(compute.device, memory_format=torch.channels_last)
        forward = stored_forward(encoder, job.cfg.image_split_stage, job.use_compile)
        # Flagged images (missing, corrupt) are encoded as a blank image: the row stays aligned.
        every_source = job.manifest.image_sources()
        sources = [every_source[r] for r in rows]
        size = job.cfg.batch_size
        batches = [np.arange(i, min(i + size, len(rows))) for i in range(0, len(rows), size)]

        on_device = job.cfg.image_decode == "device"

        def load(batch: np.ndarray) -> torch.Tensor:
            if on_device:  # decoded where the encoder runs: the loading threads only read files
                return encoder.preprocess.load_batch_on([sources[i] for i in batch], compute.device)[0]
            return encoder.preprocess.load_batch([sources[i] for i in batch])

        def encode(batch: np.ndarray, pixels: torch.Tensor) -> tuple:
            images = encoder.preprocess.normalise(pixels.to(compute.device))
            with torch.inference_mode(), compute.autocast():
                tokens, pooled, *split = forward(images)
            split = split[0].float().contiguous().cpu().numpy() if split else None
            # In the set's float16 here, in the streams, rather than on the writing thread
            return batch, pooled.half().cpu().numpy(), tokens.half().cpu().numpy(), split

        streams = 1 if on_device else encoding_streams(compute, job.use_compile)
        if streams > 1:  # each stream decodes its own batch, then encodes it
            encoded = in_cpu_streams(lambda batch: encode(batch, load(batch)), batches, streams)
        else:
            encoded = map(encode, batches, prefetch(batches, load, loading_workers(compute.device)))
        with job.progress("image") as advance:
            for batch, pooled, tokens, split in encoded:  # written here: h5py is not thread-safe
                job.writer.write(rows[batch], pooled, tokens, np.ones(tokens.shape[:2], dtype=bool), split)
                advance(len(batch))
                job.done("image", len(batch))


def stored_forward(encoder: ImageEncoder, split_stage: int | None, use_compile: bool) -> Callable:
    """images -> (tokens, pooled[, the activation entering the last split_stage stages])."""
    if not split_stage:
        return compiled(encoder) if use_compile else encoder
    bottom, top = encoder.split(split_stage)  # bottom and top in turn: the activation between them is stored too
    bottom, top = (compiled(bottom), compiled(top)) if use_compile else (bottom, top)

    def forward(images):
        split = bottom(images)
        return (*top(split), split)
    return forward


def compiled(encoder: ImageEncoder) -> Callable:
    try:
        return torch.compile(encoder, dynamic=False)
    except Exception as err:  # no C++ compiler, unsupported platform: eager still works
        warnings.warn(f"torch.compile unavailable ({err}); encoding without it", stacklevel=2)
        return encoder
