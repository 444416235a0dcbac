"""The export format: a folder with `config.json` + `model.safetensors`, its writer and its reader.

Written by the training run (`export/`, the `SafetensorsExport` callback) and by `python -m
densepred.convert`; read by `densepred.engine.loading` (evaluate.py, predict.py, `init_from=`).

- `model.safetensors`: the Segmenter's state dict (keys `backbone.*`, `neck.*`, `head.*`).
- `config.json`: what rebuilds the model: `model` (the `_target_` dicts of `backbone`, `neck`, `head`,
  plus `pixel_mean` / `pixel_std`, the input normalisation: RGB, 0-1 units, applied to 0-255 pixels as
  `(x - 255 mean) / (255 std)`), `metadata` (classes), and the `task`, `criterion`, `postprocess`, ...
  settings of the run, and `global_step`, the training step of the exported weights (labels evaluate.py's
  results; absent in converted models). An export without `pixel_mean` / `pixel_std` (written before they
  were recorded) normalises with its backbone's pretrained statistics.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from densepred.utils.io import atomic_write, atomic_write_json

CONFIG_FILE = "config.json"
# config.json key of the training step the exported weights are from (absent in converted models).
EXPORT_STEP_KEY = "global_step"
WEIGHTS_FILE = "model.safetensors"
NORMALIZATION_KEYS = ("pixel_mean", "pixel_std")


def write_export(
    folder: str | Path,
    config: Mapping[str, Any],
    state_dict: Mapping[str, torch.Tensor],
    normalization: Mapping[str, Sequence[float]] | None = None,
) -> Path:
    """Write `model.safetensors` (Segmenter weights) and `config.json` (what rebuilds the model: its parts,
    criterion, post-processing and dataset metadata) into `folder`, each atomically. `normalization`
    ({"pixel_mean", "pixel_std"}, 0-1 units, e.g. `Segmenter.normalization`) is recorded in
    `config["model"]`. Returns the weights file."""
    folder = Path(folder)
    config = dict(config)
    if normalization is not None:
        model = dict(config.get("model") or {})
        model.update({key: [float(v) for v in normalization[key]] for key in NORMALIZATION_KEYS})
        config["model"] = model
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    weights = folder / WEIGHTS_FILE
    atomic_write(weights, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    atomic_write_json(folder / CONFIG_FILE, config)
    return weights


def read_export(folder: str | Path, source: str | None = None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config.json as a dict, Segmenter state dict) of an export folder. Errors name `source`
    (default: the folder)."""
    folder = Path(folder).expanduser()
    source = source or str(folder)
    config_file, weights_file = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    for needed in (config_file, weights_file):
        if not needed.is_file():
            raise ValueError(f"{source}: {needed.name} is missing; expected a train.py export or model.convert output")
    return json.loads(config_file.read_text()), load_file(str(weights_file))


def export_normalization(config: Mapping[str, Any]) -> dict[str, list[float]] | None:
    """The recorded {"pixel_mean", "pixel_std"} (0-1 units) of an export's config, or None if it has none."""
    model = config.get("model") or {}
    if all(model.get(key) is not None for key in NORMALIZATION_KEYS):
        return {key: [float(v) for v in model[key]] for key in NORMALIZATION_KEYS}
    return None
