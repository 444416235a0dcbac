"""densepred: dense prediction (semantic, instance, panoptic segmentation) with Lightning + Hydra.

The package map, and what each part may import, is in docs/architecture.md.
"""

__version__ = "0.1.0"
