"""The sentiment lexicon (VADER and emoji scores) of the raw post text: no model, fp32 arithmetic."""

from __future__ import annotations

import numpy as np

from msa.cache.captions import CaptionSet
from msa.core.config import ExtractConfig
from msa.models.lexicon import FEATURES, LexiconScorer
from msa.models.modalities import EncodeJob, Modality

BATCH = 512


class LexiconModality(Modality):
    name = "lexicon"

    def model_name(self, cfg: ExtractConfig) -> str:
        return "vader-emoji"

    def fingerprint(self, cfg: ExtractConfig, captions: CaptionSet | None) -> dict:
        return {"precision": "fp32", "model": self.model_name(cfg), "weights": LexiconScorer.identity(),
                "features": list(FEATURES)}

    def load(self, cfg: ExtractConfig) -> LexiconScorer:
        return LexiconScorer()

    def encode(self, scorer: LexiconScorer, job: EncodeJob) -> None:
        """pooled [B, F], and the same as one token [B, 1, F]."""
        texts, rows = job.manifest.column("text"), job.rows
        with job.progress("lexicon") as advance:
            for start in range(0, len(rows), BATCH):
                batch = rows[start: start + BATCH]
                scores = scorer([texts[r] for r in batch])
                job.writer.write(batch, scores, scores[:, None, :], np.ones((len(batch), 1), dtype=bool))
                advance(len(batch))
                job.done("lexicon", len(batch))
