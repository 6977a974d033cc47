"""Encoders and fusion heads. Importing the package registers every head (models.registry)."""

from msa.models import heads, sequence_heads  # noqa: F401  (each registers its heads)
