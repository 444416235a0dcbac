"""The segmentation model (backbone + neck + head) and its training glue."""

from model.segmenter import Segmenter

__all__ = ["Segmenter"]
