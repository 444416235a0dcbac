"""Model files are data: what a `.ckpt` or an export's config.json may make the loader build.

A model file names Hydra `_target_`s (the backbone, neck and head of `model`, the `criterion` and its
`matcher`), and loading instantiates them. Hydra's own blocklist is no boundary (any other importable callable
runs, e.g. `builtins.open` truncating a file, nested silently in `criterion.matcher`), so every config read
from a file is checked here, as a whole and before anything is built, against an allowlist derived from the
package:

- the registered backbones (`densepred.backbones._registry.registered_targets`: each class by its
  `config_target` and module path, each factory) and `AutoBackbone.from_config`;
- every `nn.Module` class defined in a module of `densepred.necks` and `densepred.heads` (necks, heads, their
  layers, the criterion, the matcher, the post-processor), found by walking the two packages;
- the `trusted_targets` a caller adds from trusted code (train.py adds the `_target_`s of its own config's
  model parts, so a run that names a custom class can resume from and fine-tune its own checkpoints).

A `_target_` anywhere (nested dicts and lists, `_args_` included) must be allowlisted; Hydra's flags
`_recursive_`, `_convert_` and `_partial_` are refused (the project's files never write them), and so is an
OmegaConf interpolation (`${...}`) in the parts Hydra instantiates (`model`, `criterion`): resolvers such as
`oc.decode` would build new nodes after the check. Refusals are a ValueError naming the file, the config key
path and the target. The torch side is `load_checkpoint_file`: `torch.load(weights_only=True)`, always.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import pkgutil
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import IO, Any

import torch
from torch import nn

# Hydra keys that change how instantiation works; a model file has no use for them.
HYDRA_FLAGS = ("_recursive_", "_convert_", "_partial_")
# The top-level settings Hydra instantiates (and so resolves interpolations in).
INSTANTIATED = ("model", "criterion")
FIX = (
    "Loading never runs code that a model file names. If the file is yours and names your own class, build "
    "it from trusted code (densepred.engine.loading.load_module(path, trusted_targets=[...])), or name the "
    "class in the training config (train.py trusts its own config's model parts for init_from= and "
    "ckpt_path=); otherwise do not use this file."
)


@functools.cache
def allowed_targets() -> frozenset[str]:
    """Every `_target_` a model file may name: registered backbones, `AutoBackbone.from_config`, and each
    `nn.Module` class defined in densepred.necks / densepred.heads."""
    import densepred.backbones as backbones  # registers every family
    import densepred.heads
    import densepred.necks
    from densepred.backbones._registry import registered_targets

    auto = backbones.AutoBackbone
    targets = set(registered_targets())
    targets |= {f"{backbones.__name__}.AutoBackbone.from_config", f"{auto.__module__}.{auto.__qualname__}.from_config"}
    for package in (densepred.necks, densepred.heads):
        for info in pkgutil.walk_packages(package.__path__, f"{package.__name__}."):
            module = importlib.import_module(info.name)
            for name, obj in vars(module).items():
                if isinstance(obj, type) and issubclass(obj, nn.Module) and obj.__module__ == module.__name__:
                    targets.add(f"{module.__name__}.{name}")
    return frozenset(targets)


def config_targets(config: Any) -> set[str]:
    """The `_target_` strings anywhere in a (trusted) config: dicts, lists, DictConfig / ListConfig."""
    from omegaconf import OmegaConf

    if OmegaConf.is_config(config):
        config = OmegaConf.to_container(config, resolve=False)
    found: set[str] = set()
    stack = [config]
    while stack:
        node = stack.pop()
        if isinstance(node, Mapping):
            if isinstance(node.get("_target_"), str) and "${" not in node["_target_"]:
                found.add(node["_target_"])
            stack.extend(node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend(node)
    return found


def training_targets(cfg: Any) -> set[str]:
    """The `_target_`s of a training config's model parts (backbone, neck, head, criterion): what the user's
    own config already runs, trusted again when the run reads its own files (init_from=, ckpt_path=)."""
    return set().union(*(config_targets(cfg.get(part)) for part in ("backbone", "neck", "head", "criterion")))


def _walk(node: Any, path: str = "", top: str = "") -> Iterator[tuple[str, str, Any, Any]]:
    """(key path, top-level key, key, value) of every entry below `node`; paths read `a.b`, `a._args_[0]`."""
    if isinstance(node, Mapping):
        items = [(f"{path}.{key}" if path else str(key), key, value) for key, value in node.items()]
    elif isinstance(node, (list, tuple)):
        items = [(f"{path}[{index}]", index, value) for index, value in enumerate(node)]
    else:
        return
    for child_path, key, value in items:
        child_top = top or str(key)
        yield child_path, child_top, key, value
        yield from _walk(value, child_path, child_top)


def check_model_config(settings: Any, source: str, trusted_targets: Iterable[str] = ()) -> None:
    """Refuse (ValueError naming `source`, the key path and the target) a config read from a model file that
    names anything but allowlisted `_target_`s, or carries Hydra flags or interpolations. Nothing is built."""
    if not isinstance(settings, Mapping):
        raise ValueError(f"{source}: its settings are a {type(settings).__name__}, not a mapping")
    allowed = allowed_targets() | set(trusted_targets)
    for path, top, key, value in _walk(settings):
        if isinstance(value, str) and "${" in value and (top in INSTANTIATED or key == "_target_"):
            raise ValueError(
                f"{source}: refused {path}={value!r}: an interpolation in a model file would be resolved (and "
                "could build new config nodes) after this check; model files hold resolved values only"
            )
        if key == "_target_":
            if not isinstance(value, str) or value not in allowed:
                close = difflib.get_close_matches(value, allowed, n=1, cutoff=0.8) if isinstance(value, str) else []
                hint = f" (did you mean {close}?)" if close else ""
                raise ValueError(
                    f"{source}: refused {path}={value!r}{hint}: a model file may only name this project's model "
                    "parts (the registered backbones and AutoBackbone.from_config, the neck, head, criterion, "
                    "matcher and post-processing classes of densepred.necks / densepred.heads; the list is "
                    f"densepred.engine.trust.allowed_targets()). {FIX}"
                )
        elif key in HYDRA_FLAGS:
            raise ValueError(
                f"{source}: refused {path}={value!r}: Hydra flags {HYDRA_FLAGS} are not allowed in a model file"
            )


def load_checkpoint_file(file: str | Any | IO[bytes], source: str, map_location: Any = "cpu") -> dict[str, Any]:
    """A Lightning checkpoint read with `torch.load(weights_only=True)` (tensors and plain values only; explicit,
    so `TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD` cannot turn it off). Anything else is a ValueError naming `source`."""
    try:
        checkpoint = torch.load(file, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as error:  # noqa: BLE001 - any unpickling failure gets the same clear message
        text = str(error)
        refused = re.search(r"WeightsUnpickler error: (.*?)(?: Please use|\n|$)", text)  # torch's reason, no advice
        reason = refused.group(1) if refused else (text.strip().splitlines() or [""])[0]
        raise ValueError(
            f"{source}: not a readable Lightning checkpoint ({type(error).__name__}: {reason}); checkpoints "
            "are read with torch.load(weights_only=True): tensors and plain values only, never pickled code"
        ) from None
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{source}: holds a {type(checkpoint).__name__}, not a Lightning checkpoint")
    return checkpoint
