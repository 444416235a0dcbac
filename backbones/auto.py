"""`AutoBackbone`: the entry point that builds a registered native backbone by name, or any supported
pretrained checkpoint (the registry itself is `_registry`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ._registry import create_backbone
from .base import Backbone
from .pretrained import from_pretrained


class AutoBackbone:
    """Build a registered native backbone by name, or any supported pretrained checkpoint."""

    def __init__(self) -> None:
        raise TypeError(
            "AutoBackbone is not instantiated: use AutoBackbone.from_config(name, ...) or "
            "AutoBackbone.from_pretrained(name_or_path, ...)"
        )

    @staticmethod
    def from_config(
        name: str,
        out_indices: Sequence[int] | None = None,
        out_features: Sequence[str] | None = None,
        pretrained: str | None = None,
        revision: str | None = None,
        **kwargs,
    ) -> Backbone:
        """`name` from `list_backbones()`; extra kwargs (e.g. `drop_path_rate`, `freeze_at`) go to the model.

        `pretrained` (a Hub repo id, a folder or a weights file of the same architecture, in any layout
        `AutoBackbone.from_pretrained` reads) loads weights into the built model; None keeps it random.
        """
        backbone = create_backbone(name, out_features=out_features, out_indices=out_indices, **kwargs)
        if pretrained is not None:
            backbone.load_pretrained(pretrained, revision=revision)
        return backbone

    @staticmethod
    def from_pretrained(
        name_or_path: str | Path,
        out_indices: Sequence[int] | None = None,
        out_features: Sequence[str] | None = None,
        revision: str | None = None,
        **kwargs,
    ) -> Backbone:
        """A backbone with pretrained weights: a transformers ResNet / Swin / ConvNeXt checkpoint (Hub id or
        folder; architecture from its config.json), a timm Hub repo, folder or model name, a folder
        written by `save_pretrained`, or a weights file with `architecture=<name>`. Without a selection,
        the checkpoint's own (`out_features` of config.json) is kept; kwargs override constructor args."""
        return from_pretrained(str(name_or_path), out_indices, out_features, revision, **kwargs)
