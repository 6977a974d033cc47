"""msa: a feature-caching, two-stage pipeline for multimodal sentiment analysis.

The Python API (msa.api): msa.extract, msa.train_head, msa.finetune, msa.load_run."""

__version__ = "0.2.0"

API = ("extract", "train_head", "finetune", "load_run", "Run")


def __getattr__(name: str):
    if name in API:  # loaded on first use: `import msa` (and the CLI's start) stays light
        from msa import api

        return getattr(api, name)
    raise AttributeError(f"module 'msa' has no attribute {name!r}")
