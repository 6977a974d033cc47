"""What `msa extract` encodes, by name: each modality is one entry (its fingerprint, its encoder,
how a batch of the manifest's items becomes rows of its feature set), so adding a modality is
one module here and one line in MODALITIES."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import torch

from msa.cache.captions import CaptionSet
from msa.cache.manifest import Manifest
from msa.cache.writer import FeatureWriter
from msa.core.compute import Compute, in_cpu_streams
from msa.core.config import ExtractConfig
from msa.core.progress import ItemProgress

BatchCallback = Callable[[str, int], None]


@dataclasses.dataclass
class EncodeJob:
    """The rows of one feature set that extract encodes now, and where they go."""

    cfg: ExtractConfig
    manifest: Manifest
    rows: np.ndarray  # pending rows of the manifest
    writer: FeatureWriter
    compute: Compute
    show_progress: bool
    on_batch: BatchCallback | None
    captions: CaptionSet | None = None  # text made from captions
    use_compile: bool = False

    def progress(self, name: str) -> ItemProgress:
        return ItemProgress(name, len(self.rows), self.show_progress)

    def done(self, name: str, count: int) -> None:
        if self.on_batch:
            self.on_batch(name, count)


class Modality:
    """The interface of an entry. `tuned`: --precision auto measures its variants on a CPU
    (sample_inputs and timed_forward say how); `compiles`: torch.compile may pay for it."""

    name: str
    tuned = False
    compiles = False

    def model_name(self, cfg: ExtractConfig) -> str:
        raise NotImplementedError

    def fingerprint(self, cfg: ExtractConfig, captions: CaptionSet | None) -> dict:
        """What its numbers depend on beyond the common keys (extract adds those)."""
        raise NotImplementedError

    def load(self, cfg: ExtractConfig):
        raise NotImplementedError

    def encode(self, encoder, job: EncodeJob) -> None:
        raise NotImplementedError

    def autotune_key(self, cfg: ExtractConfig) -> str:
        raise NotImplementedError

    def sample_inputs(self, encoder, manifest: Manifest, rows: np.ndarray):
        raise NotImplementedError

    def timed_forward(self, encoder, variant, compute: Compute, streams: int) -> Callable:
        raise NotImplementedError


def pooled_in_streams(forward: Callable, precision: str, compute: Compute, streams: int) -> Callable:
    """batch (a tensor, or a tuple of them) -> pooled features, the batch shared out over the
    CPU streams extract encodes in, so that a variant is timed as it will run."""
    def pooled_of_share(share: tuple) -> torch.Tensor:  # autocast and inference mode are per thread
        with torch.inference_mode(), compute.autocast(precision):
            return forward(*share)[1]

    def pooled(batch) -> torch.Tensor:
        parts = batch if isinstance(batch, tuple) else (batch,)
        shares = list(zip(*(part.chunk(streams) for part in parts)))
        return torch.cat(list(in_cpu_streams(pooled_of_share, shares, streams)))
    return pooled


def _registry() -> dict[str, Modality]:
    from msa.models.modalities.image import ImageModality
    from msa.models.modalities.lexicon import LexiconModality
    from msa.models.modalities.text import TextModality

    return {m.name: m for m in (TextModality(), ImageModality(), LexiconModality())}


MODALITIES: dict[str, Modality] = _registry()
