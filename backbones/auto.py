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
    """Build a registered native backbone by name (random weights)."""

    def __init__(self) -> None:
        raise TypeError("AutoBackbone is not instantiated: use AutoBackbone.from_config(name, ...)")

    @staticmethod
    def from_config(
        name: str,
        out_indices: Sequence[int] | None = None,
        out_features: Sequence[str] | None = None,
        **kwargs,
    ) -> Backbone:
        """`name` from `list_backbones()`; extra kwargs (e.g. `drop_path_rate`, `freeze_at`) go to the model."""
        if name not in _REGISTRY:
            close = difflib.get_close_matches(name, _REGISTRY, n=3)
            hint = f" Did you mean {close}?" if close else ""
            raise ValueError(
                f"unknown backbone {name!r}.{hint} Registered: {list_backbones()}. "
                "Any timm model is available through backbones.TimmBackbone(model_name)."
            )
        return _REGISTRY[name](out_features=out_features, out_indices=out_indices, **kwargs)
