"""Find, read, load and save backbone checkpoints.

- `resolve_checkpoint`: a local weights file, a local folder (`config.json` + weights) or a Hugging Face
  Hub repo id, downloaded through huggingface_hub (its cache, `HF_HUB_OFFLINE`, `revision`). Weights are
  `model.safetensors`, `pytorch_model.bin` or their sharded forms (`*.index.json`).
- `read_state_dict`: safetensors, or `torch.load(weights_only=True)` for pickled files: nothing from a
  checkpoint is ever executed. Wrappers (`state_dict`, `model`, `module`) are unwrapped and every
  value must be a tensor.
- `load_backbone_state_dict`: load native-layout weights into a backbone, refusing shape mismatches and
  weights of another architecture, and return a `LoadReport` listing what was not loaded.
- `save_backbone`: `config.json` + `model.safetensors`, each written atomically (`densepred.utils.io`).
"""

from __future__ import annotations

import json
import os
import pickle
import re
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import constants, hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from densepred.utils.io import atomic_write

CONFIG_NAME = "config.json"
# Weight files of a folder or Hub repo, in order of preference (safetensors first).
WEIGHT_NAMES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt")
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
# Containers that training scripts wrap state dicts in (Microsoft Swin: "model", others "state_dict").
WRAPPERS = ("state_dict", "model", "module", "model_state", "model_state_dict")
# Native weights that a checkpoint may lack or carry spare: the per-output norms follow the selection, and a
# ViT's feature pyramid is new when fine-tuning from a classification / self-supervised checkpoint.
OPTIONAL = ("out_norms.", "pyramid.")


@dataclass
class Checkpoint:
    """A resolved checkpoint: where it came from, its config.json (if any) and its weight files."""

    source: str
    config: dict[str, Any] | None
    weight_files: list[Path]


# ---- resolving ----------------------------------------------------------------------------------
def _offline_hint(repo_id: str | None = None, revision: str | None = None) -> str:
    """With HF_HUB_OFFLINE set: that only the cache is used, and (given the repo) the two ways out."""
    if constants.HF_HUB_OFFLINE:
        hint = f" HF_HUB_OFFLINE is set: only the cache ({constants.HF_HUB_CACHE}) is used."
        return hint + (f" {_missing_weights_fixes(repo_id, revision)}" if repo_id else " Download it once online.")
    return ""


def _missing_weights_fixes(repo_id: str, revision: str | None = None) -> str:
    """The two fixes for pretrained weights that are not in the cache: download them, or train without them."""
    command = f"{repo_id}" + (f" --revision {revision}" if revision else "")
    return (
        f"Either download it once with network access and HF_HUB_OFFLINE unset: `hf download {command}` (older "
        f"huggingface_hub: `huggingface-cli download {command}`); or train from scratch without pretrained "
        "weights: `backbone.pretrained=null`."
    )


def _hub_file(repo_id: str, filename: str, revision: str | None) -> Path | None:
    """Download (or find in the cache) one file of a Hub repo; None when the repo has no such file."""
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision))
    except LocalEntryNotFoundError as error:  # not in the cache, and the Hub is off (offline / unreachable)
        if (Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}").is_dir():
            return None  # the repo is cached, without this file
        raise ValueError(
            f"checkpoint {repo_id!r} is not a local file or folder, and Hub repo {repo_id!r} is not in the cache "
            f"({constants.HF_HUB_CACHE}) while the Hub cannot be reached ({type(error).__name__})."
            + (_offline_hint(repo_id, revision) or f" {_missing_weights_fixes(repo_id, revision)}")
        ) from error
    except EntryNotFoundError:  # the repo has no such file
        return None
    except (RepositoryNotFoundError, GatedRepoError) as error:
        raise ValueError(
            f"{repo_id!r} is neither a local file or folder nor a Hugging Face Hub repo you can access "
            f"({type(error).__name__}); check the name, or log in for a gated/private repo"
        ) from error
    except RevisionNotFoundError as error:
        raise ValueError(f"Hub repo {repo_id!r} has no revision {revision!r}") from error
    except (HfHubHTTPError, OfflineModeIsEnabled, OSError) as error:
        raise ValueError(
            f"cannot download {filename} of Hub repo {repo_id!r}: {error}.{_offline_hint(repo_id, revision)}"
        ) from error


def _weights_in(folder: Path) -> list[Path]:
    """The weight files of a local folder (all shards of a sharded checkpoint)."""
    for name in WEIGHT_NAMES:
        path = folder / name
        if path.is_file():
            return _shards(path, lambda shard: folder / shard)
    return []


def _shards(path: Path, locate) -> list[Path]:
    """`[path]`, or the shard files listed by a `*.index.json` (each found with `locate(name)`)."""
    if not path.name.endswith(".index.json"):
        return [path]
    weight_map = _read_json(path).get("weight_map")
    if not isinstance(weight_map, dict):
        raise ValueError(f"{path} is not a sharded-checkpoint index: it has no 'weight_map' object")
    shards = []
    for name in dict.fromkeys(weight_map.values()):
        shard = locate(name)
        if shard is None or not Path(shard).is_file():
            raise ValueError(f"shard {name!r} listed in {path} is missing{_offline_hint()}")
        shards.append(Path(shard))
    return shards


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not a readable JSON file ({error})") from error
    if not isinstance(value, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(value).__name__}")
    return value


def is_hub_id(name_or_path: str) -> bool:
    """`org/name` that is not an existing local path."""
    return bool(HUB_ID.fullmatch(name_or_path)) and not Path(name_or_path).exists()


def resolve_checkpoint(name_or_path: str | os.PathLike, revision: str | None = None) -> Checkpoint:
    """Find config.json and the weight files of a local file, a local folder or a Hub repo id."""
    source = str(name_or_path)
    path = Path(source).expanduser()
    if path.is_file():
        if not path.name.endswith(WEIGHT_SUFFIXES):
            raise ValueError(
                f"{path} is not a weights file: expected one of {WEIGHT_SUFFIXES}, a folder or a Hub repo id"
            )
        return Checkpoint(source, None, [path])
    if path.is_dir():
        config = _read_json(path / CONFIG_NAME) if (path / CONFIG_NAME).is_file() else None
        weights = _weights_in(path)
        if not weights:
            raise ValueError(f"folder {path} holds no weights: expected one of {WEIGHT_NAMES}")
        return Checkpoint(source, config, weights)
    if not is_hub_id(source):
        raise FileNotFoundError(
            f"checkpoint {source!r} not found: it is not an existing file or folder, nor a Hub repo id (org/name)"
        )
    try:
        config_file = _hub_file(source, CONFIG_NAME, revision)
    except HFValidationError as error:
        raise ValueError(f"{source!r} is not a valid Hub repo id: {error}") from error
    for name in WEIGHT_NAMES:
        weights = _hub_file(source, name, revision)
        if weights is not None:
            return Checkpoint(
                source,
                _read_json(config_file) if config_file else None,
                _shards(weights, lambda shard: _hub_file(source, shard, revision)),
            )
    raise ValueError(
        f"Hub repo {source!r}{f' (revision {revision})' if revision else ''} has none of {WEIGHT_NAMES}"
        f"{' and no config.json' if config_file is None else ''}.{_offline_hint(source, revision)}"
    )


# ---- reading ------------------------------------------------------------------------------------
def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a safetensors or pickled (.bin/.pth/.pt, weights only) file into a flat {name: tensor} dict."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    if path.name.endswith(".safetensors"):
        try:
            return load_file(path, device="cpu")
        except (SafetensorError, OSError) as error:
            raise ValueError(
                f"{path} is not a valid safetensors file ({error}); download or convert it again"
            ) from error
    try:
        value = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{path} holds pickled objects that are not tensors, which are never unpickled here (weights_only=True). "
            "Load it in a trusted environment and save its state dict with safetensors "
            "(or torch.save of plain tensors)."
        ) from error
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as error:
        raise ValueError(f"{path} is not a readable PyTorch weights file ({type(error).__name__}: {error})") from error
    return _as_state_dict(value, str(path))


def _as_state_dict(value: Any, source: str) -> dict[str, torch.Tensor]:
    """Unwrap training-checkpoint containers and check that every entry is a named tensor."""
    while isinstance(value, Mapping) and not all(isinstance(v, torch.Tensor) for v in value.values()):
        inner = next((value[k] for k in WRAPPERS if isinstance(value.get(k), Mapping)), None)
        if inner is None:
            break
        value = inner
    if not isinstance(value, Mapping):
        raise ValueError(f"{source} holds a {type(value).__name__}, not a state dict of named tensors")
    for key, tensor in value.items():
        if not isinstance(key, str) or not isinstance(tensor, torch.Tensor):
            raise ValueError(
                f"{source}: entry {key!r} is a {type(tensor).__name__}, not a tensor; a weights file must map "
                f"names to tensors (containers {WRAPPERS} are unwrapped)"
            )
    if value and all(key.startswith("module.") for key in value):  # saved from DistributedDataParallel
        value = {key[len("module.") :]: tensor for key, tensor in value.items()}
    return dict(value)


def read_weights(checkpoint: Checkpoint) -> dict[str, torch.Tensor]:
    """All weights of a resolved checkpoint, shards merged."""
    state_dict: dict[str, torch.Tensor] = {}
    for path in checkpoint.weight_files:
        state_dict.update(read_state_dict(path))
    return state_dict


def read_hf_checkpoint(
    name_or_path: str, revision: str | None = None
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config.json, state dict) of a transformers checkpoint: a local folder or a Hub repo id."""
    checkpoint = resolve_checkpoint(name_or_path, revision)
    if checkpoint.config is None:
        raise ValueError(
            f"{name_or_path} has no config.json: a transformers checkpoint is a folder or Hub repo with one"
        )
    return checkpoint.config, read_weights(checkpoint)


# ---- loading ------------------------------------------------------------------------------------
@dataclass
class LoadReport:
    """What loading a checkpoint into a backbone did."""

    source: str
    model: str
    loaded: list[str]
    missing: list[str] = field(default_factory=list)  # backbone weights not in the checkpoint (kept as initialised)
    unused: list[str] = field(default_factory=list)  # checkpoint weights the backbone has no place for
    ignored: list[str] = field(default_factory=list)  # checkpoint entries that are not backbone weights

    def __str__(self) -> str:
        lines = [f"loaded {len(self.loaded)} weights from {self.source} into {self.model}"]
        if self.missing:
            lines.append(f"not in the checkpoint, freshly initialised: {_short(self.missing)}")
        if self.unused:
            lines.append(f"in the checkpoint but not used (stages not selected): {_short(self.unused)}")
        if self.ignored:
            lines.append(f"not backbone weights, skipped: {_short(self.ignored)}")
        return "; ".join(lines)


def _short(keys: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return f"{shown} (+{len(keys) - limit} more)" if len(keys) > limit else shown


def load_backbone_state_dict(
    backbone: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str, ignored: Iterable[str] = ()
) -> LoadReport:
    """Load native-layout weights into `backbone` and report what happened.

    Refused with a ValueError: a weight whose shape differs (naming the first such key and both shapes),
    and any backbone weight missing from the checkpoint or checkpoint weight without a place in the
    backbone (another architecture). Only the per-output norms (`out_norms.*`, which classification
    checkpoints lack and which follow the stage selection) and a ViT's `pyramid.*` may be missing or unused;
    they are listed in the report. BatchNorm's `num_batches_tracked` counters are not weights and are not compared.
    """
    name = type(backbone).__name__
    own = {k: v for k, v in backbone.state_dict().items() if not k.endswith("num_batches_tracked")}
    given = {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
    for key, value in own.items():
        if key in given and given[key].shape != value.shape:
            raise ValueError(
                f"{source}: weight {key!r} has shape {tuple(given[key].shape)} in the checkpoint but "
                f"{tuple(value.shape)} in {name}; the checkpoint is of another architecture or size"
            )
    matched = [k for k in own if k in given]
    if not matched:
        raise ValueError(
            f"{source} holds no weight of {name}: it is another architecture (checkpoint keys e.g. "
            f"{_short(list(given), 3) or 'none'}; {name} keys e.g. {_short(list(own), 3)})"
        )
    missing = [k for k in own if k not in given]
    unused = [k for k in given if k not in own]
    wrong = [k for k in missing if not k.startswith(OPTIONAL)], [k for k in unused if not k.startswith(OPTIONAL)]
    if wrong[0] or wrong[1]:
        raise ValueError(
            f"{source} does not match {name} (another architecture or depth): "
            + "; ".join(
                text
                for text in (
                    wrong[0] and f"{len(wrong[0])} weights of {name} are not in the checkpoint: {_short(wrong[0])}",
                    wrong[1] and f"{len(wrong[1])} checkpoint weights have no place in {name}: {_short(wrong[1])}",
                )
                if text
            )
        )
    backbone.load_state_dict({k: given[k] for k in matched}, strict=False)
    return LoadReport(source, name, matched, missing, unused, list(ignored))


# ---- saving -------------------------------------------------------------------------------------
def save_backbone(backbone: nn.Module, folder: str | os.PathLike) -> Path:
    """Write `config.json` ({"densepred_backbone": backbone.config}) and `model.safetensors` into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"densepred_backbone": backbone.config}
    tensors = {k: v.detach().contiguous().cpu() for k, v in backbone.state_dict().items()}
    atomic_write(folder / "model.safetensors", lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write(folder / CONFIG_NAME, lambda tmp: tmp.write_text(json.dumps(config, indent=2) + "\n"))
    return folder


# ---- timm sources -------------------------------------------------------------------------------
def timm_pretrained_overlay(source: str) -> dict[str, Any]:
    """timm `pretrained_cfg_overlay` that makes timm's loader read `source`: a weights file or a Hub repo id
    (`org/name`, optionally `@revision`) holding timm weights."""
    path = Path(source).expanduser()
    if path.is_file():
        if not path.name.endswith(WEIGHT_SUFFIXES):
            raise ValueError(f"{path} is not a weights file: expected one of {WEIGHT_SUFFIXES}")
        return {"file": str(path), "source": "", "hf_hub_id": None, "url": None}
    if path.is_dir():
        raise ValueError(
            f"{path} is a folder: load it with AutoBackbone.from_pretrained({str(path)!r}), or name its weights file"
        )
    if HUB_ID.fullmatch(source.split("@")[0]):
        return {"hf_hub_id": source, "source": "hf-hub"}
    raise FileNotFoundError(f"timm weights {source!r} not found: not an existing file nor a Hub repo id (org/name)")
