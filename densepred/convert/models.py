"""Convert a transformers MaskFormer / Mask2Former checkpoint once into our format.

    python -m densepred.convert.models facebook/mask2former-swin-tiny-coco-panoptic converted/m2f-swin-t [--revision REV]

DST gets `config.json` (model parts, criterion, class names) and `model.safetensors` (Segmenter weights),
the same layout the training run exports, so `evaluate.py checkpoint=DST` and fine-tuning
(`train.py init_from=DST`) read it.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from densepred.backbones.checkpoint import resolve_checkpoint
from densepred.engine.callbacks import write_export
from densepred.segmenter import Segmenter

CRITERIA = {
    "mask2former": {"_target_": "densepred.heads.criterion.SetCriterion", "mask_loss": "point", "class_weight": 2.0,
                    "mask_weight": 5.0, "dice_weight": 5.0},
    "maskformer": {"_target_": "densepred.heads.criterion.SetCriterion", "mask_loss": "full", "class_weight": 1.0,
                   "mask_weight": 20.0, "dice_weight": 1.0},
}


def convert(name_or_path: str, revision: str | None = None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(export config, Segmenter state dict) for a transformers MaskFormer or Mask2Former checkpoint."""
    from densepred.convert.mask2former import convert_mask2former
    from densepred.convert.maskformer import convert_maskformer

    model_type = (resolve_checkpoint(name_or_path, revision).config or {}).get("model_type")
    converters = {"mask2former": convert_mask2former, "maskformer": convert_maskformer}
    if model_type not in converters:
        raise ValueError(
            f"{name_or_path}: config.json has model_type {model_type!r}; model.convert reads transformers "
            f"checkpoints of type {sorted(converters)} (MaskFormerForInstanceSegmentation, "
            "Mask2FormerForUniversalSegmentation)"
        )
    segmenter_config, state_dict = converters[model_type](name_or_path, revision=revision)
    names = list(segmenter_config.get("class_names") or [])
    config = {
        "model": {key: segmenter_config[key] for key in ("backbone", "neck", "head")},
        "criterion": CRITERIA[model_type],
        "metadata": {
            "categories": [{"id": k, "name": name, "isthing": True} for k, name in enumerate(names)],
            "num_classes": int(segmenter_config["num_classes"]),
            "ignore_index": 255,
        },
        "source": {"checkpoint": name_or_path, "revision": revision, "model_type": model_type},
    }
    return config, state_dict


def save(config: dict[str, Any], state_dict: dict[str, torch.Tensor], folder: str | Path) -> Path:
    """Check the weights load strictly into the configured model, then write both files atomically."""
    model = Segmenter.from_config({**config["model"], "num_classes": config["metadata"]["num_classes"]})
    model.load_state_dict(state_dict, strict=True)
    write_export(folder, config, state_dict)
    return Path(folder)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="Hub repo id or local folder of a transformers MaskFormer / Mask2Former model")
    parser.add_argument("dst", help="output folder (config.json + model.safetensors)")
    parser.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    args = parser.parse_args(argv)
    config, state_dict = convert(args.src, args.revision)
    folder = save(config, state_dict, args.dst)
    print(f"converted {args.src} ({config['source']['model_type']}, {config['metadata']['num_classes']} classes) -> {folder}")


if __name__ == "__main__":
    main()
