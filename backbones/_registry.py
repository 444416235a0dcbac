"""The backbone registry: named factories and the backbone classes a saved config.json may name.

A leaf (timm style): it imports nothing of the package. Model modules register into it when imported
(`backbones/__init__.py` imports every family), and the loaders (`auto`, `pretrained`, `native_layout`,
`inspect`) take factories and classes from it instead of importing the model modules.

- `register_backbone` / `list_backbones` / `create_backbone`: factories by name (`resnet50`, `swin_tiny`),
  `fn(out_features=None, out_indices=None, **kwargs) -> Backbone`;
- `register_class` / `backbone_class` / `family_class`: the classes by their `_target_` string
  (`"densepred.backbones.SwinBackbone"`, a class's `config_target`) and by their `family`. Only these
  classes are ever built from a config.json: a checkpoint never chooses arbitrary code to run.
- `registered_targets`: the `_target_` strings of every registered class and factory, the backbone part of
  the allowlist that a `.ckpt` or export config is checked against before loading (`densepred.engine.trust`).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any, TypeVar

ClassT = TypeVar("ClassT", bound=type)
FactoryT = TypeVar("FactoryT", bound=Callable[..., Any])

_FACTORIES: dict[str, Callable[..., Any]] = {}
_CLASSES: dict[str, type] = {}


def register_backbone(fn: FactoryT) -> FactoryT:
    """Register a factory `fn(out_features=None, out_indices=None, **kwargs) -> Backbone` under its name."""
    if fn.__name__ in _FACTORIES:
        raise ValueError(f"backbone {fn.__name__!r} is registered twice")
    _FACTORIES[fn.__name__] = fn
    return fn


def list_backbones() -> list[str]:
    """Names accepted by `AutoBackbone.from_config`."""
    return sorted(_FACTORIES)


def create_backbone(name: str, out_features=None, out_indices=None, **kwargs: Any) -> Any:
    """Build the registered backbone `name`; an unknown name is a ValueError listing close matches."""
    if name not in _FACTORIES:
        close = difflib.get_close_matches(name, _FACTORIES, n=3)
        hint = f" Did you mean {close}?" if close else ""
        raise ValueError(
            f"unknown backbone {name!r}.{hint} Registered: {list_backbones()}. "
            "Any timm model is available through backbones.TimmBackbone(model_name)."
        )
    try:
        return _FACTORIES[name](out_features=out_features, out_indices=out_indices, **kwargs)
    except TypeError as error:  # a config key the backbone does not take: name it and the fix
        if "unexpected keyword argument" not in str(error):
            raise
        hint = (
            " `pyramid` is an option of the plain ViT backbones (backbone=dinov2_small, dinov2_base, eva02_base); "
            "head=eomt sets it to null because it reads such a ViT's tokens, so use head=eomt with one of them."
            if "pyramid" in kwargs
            else ""
        )
        raise ValueError(
            f"backbone {name!r} does not take a config key: {error}. Remove it (`~backbone.<key>` on the command "
            f"line) or choose a backbone that has it.{hint}"
        ) from error


def register_class(cls: ClassT) -> ClassT:
    """Register a backbone class under its `config_target` (the `_target_` its saved config.json names)."""
    target, family = getattr(cls, "config_target", None), getattr(cls, "family", None)
    if not target or not family:
        raise TypeError(f"{cls.__name__} needs the class attributes config_target and family to be registered")
    if _CLASSES.get(target, cls) is not cls:
        raise ValueError(f"backbone class {target!r} is registered twice")
    _CLASSES[target] = cls
    return cls


def backbone_class(target: str | None, source: str) -> type:
    """The registered class named `target` by the config.json of `source`; any other name is a ValueError."""
    if target not in _CLASSES:
        raise ValueError(f"{source}: config.json names {target!r}; loadable backbone classes are {sorted(_CLASSES)}")
    return _CLASSES[target]


def registered_targets() -> list[str]:
    """Every `_target_` string naming a registered backbone class or factory: each class by its `config_target`
    and by its defining module, each factory by its defining module (`densepred.backbones.resnet.resnet18`).
    The backbone entries of the allowlist a model file is checked against (`densepred.engine.trust`)."""
    targets = set()
    for target, cls in _CLASSES.items():
        targets |= {target, f"{cls.__module__}.{cls.__qualname__}"}
    targets |= {f"{fn.__module__}.{fn.__qualname__}" for fn in _FACTORIES.values()}
    return sorted(targets)


def family_class(family: str) -> type:
    """The registered class of `family` ("resnet", "swin", "convnext", "timm")."""
    for cls in _CLASSES.values():
        if cls.family == family:
            return cls
    raise KeyError(f"no backbone class of family {family!r} is registered (is densepred.backbones imported?)")
