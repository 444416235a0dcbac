"""Registry of named native backbones and `AutoBackbone`, the entry point that builds them by name."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence

from .base import Backbone

_REGISTRY: dict[str, Callable[..., Backbone]] = {}


def register_backbone(fn: Callable[..., Backbone]) -> Callable[..., Backbone]:
    """Register a factory `fn(out_features=None, out_indices=None, **kwargs) -> Backbone` under its name."""
    if fn.__name__ in _REGISTRY:
        raise ValueError(f"backbone {fn.__name__!r} is registered twice")
    _REGISTRY[fn.__name__] = fn
    return fn


def list_backbones() -> list[str]:
    """Names accepted by `AutoBackbone.from_config`."""
    return sorted(_REGISTRY)


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
        backbone = AutoBackbone._build(name, out_indices, out_features, kwargs)
        if pretrained is not None:
            backbone.load_pretrained(pretrained, revision=revision)
        return backbone

    @staticmethod
    def from_pretrained(
        name_or_path: str,
        out_indices: Sequence[int] | None = None,
        out_features: Sequence[str] | None = None,
        revision: str | None = None,
        **kwargs,
    ) -> Backbone:
        """A backbone with pretrained weights: a transformers ResNet / Swin / ConvNeXt checkpoint (Hub id or
        folder; architecture from its config.json), a timm Hub repo, folder or model name, a folder
        written by `save_pretrained`, or a weights file with `architecture=<name>`. Without a selection,
        the checkpoint's own (`out_features` of config.json) is kept; kwargs override constructor args."""
        from .pretrained import from_pretrained

        return from_pretrained(str(name_or_path), out_indices, out_features, revision, **kwargs)

    @staticmethod
    def _build(name: str, out_indices, out_features, kwargs: dict) -> Backbone:
        if name not in _REGISTRY:
            close = difflib.get_close_matches(name, _REGISTRY, n=3)
            hint = f" Did you mean {close}?" if close else ""
            raise ValueError(
                f"unknown backbone {name!r}.{hint} Registered: {list_backbones()}. "
                "Any timm model is available through backbones.TimmBackbone(model_name)."
            )
        return _REGISTRY[name](out_features=out_features, out_indices=out_indices, **kwargs)
