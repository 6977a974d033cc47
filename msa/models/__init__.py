"""Encoders (text, image) and fusion heads."""
