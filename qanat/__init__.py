"""Qanat: an open inference factory for any chip."""

__version__ = "0.1.0"
