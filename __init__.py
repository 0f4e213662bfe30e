"""DynamicID toolkit: curation, training and inference for zero-shot multi-person personalization."""

__version__ = "0.1.0"
