"""msa: a feature-caching, two-stage pipeline for multimodal sentiment analysis."""

__version__ = "0.2.0"
