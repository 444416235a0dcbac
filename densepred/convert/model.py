"""A transformers MaskFormer / Mask2Former checkpoint -> a whole-model export folder (`python -m densepred.convert`).

The folder gets `config.json` (model parts, criterion, class names) and `model.safetensors` (Segmenter
weights), the layout the training run exports, so `evaluate.py checkpoint=DST` and fine-tuning
(`train.py init_from=DST`) read it. The criterion is the packaged Hydra config `criterion/<model_type>.yaml`
(`densepred.configs`), the losses the official model was trained with.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from densepred.backbones.checkpoint import resolve_checkpoint
from densepred.convert.mask2former import convert_mask2former
from densepred.convert.maskformer import convert_maskformer
from densepred.export_format import write_export
from densepred.segmenter import Segmenter

# config.json model_type -> converter (MaskFormerForInstanceSegmentation, Mask2FormerForUniversalSegmentation).
CONVERTERS = {"mask2former": convert_mask2former, "maskformer": convert_maskformer}


def criterion_config(model_type: str) -> dict[str, Any]:
    """The packaged `configs/criterion/<model_type>.yaml`, resolved to a plain dict."""
    text = files("densepred.configs").joinpath("criterion", f"{model_type}.yaml").read_text()
    return OmegaConf.to_container(OmegaConf.create(text), resolve=True)


def convert_model(
    name_or_path: str, revision: str | None = None, model_type: str | None = None
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(export config, Segmenter state dict) of a transformers MaskFormer or Mask2Former checkpoint;
    `model_type` is its config.json's (read from the checkpoint when not given)."""
    if model_type is None:
        model_type = (resolve_checkpoint(name_or_path, revision).config or {}).get("model_type")
    if model_type not in CONVERTERS:
        raise ValueError(
            f"{name_or_path}: config.json has model_type {model_type!r}; model.convert reads transformers "
            f"checkpoints of type {sorted(CONVERTERS)} (MaskFormerForInstanceSegmentation, "
            "Mask2FormerForUniversalSegmentation)"
        )
    segmenter_config, state_dict = CONVERTERS[model_type](name_or_path, revision=revision)
    names = list(segmenter_config.get("class_names") or [])
    config = {
        "model": {key: segmenter_config[key] for key in ("backbone", "neck", "head")},
        "criterion": criterion_config(model_type),
        "metadata": {
            "categories": [{"id": k, "name": name, "isthing": True} for k, name in enumerate(names)],
            "num_classes": int(segmenter_config["num_classes"]),
            "ignore_index": 255,
        },
        "source": {"checkpoint": name_or_path, "revision": revision, "model_type": model_type},
    }
    return config, state_dict


def save_model(config: dict[str, Any], state_dict: dict[str, torch.Tensor], folder: str | Path) -> Path:
    """Check the weights load strictly into the configured model, then write both files atomically."""
    model = Segmenter.from_config({**config["model"], "num_classes": config["metadata"]["num_classes"]})
    model.load_state_dict(state_dict, strict=True)
    write_export(folder, config, state_dict, normalization=model.normalization)
    return Path(folder)
