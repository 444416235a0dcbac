"""A transformers MaskFormer / Mask2Former checkpoint -> a whole-model export folder (`python -m densepred.convert`).

The folder gets `config.json` (model parts, criterion, class names) and `model.safetensors` (Segmenter
weights), the layout the training run exports, so `evaluate.py checkpoint=DST` and fine-tuning
(`train.py init_from=DST`) read it. The criterion is the packaged Hydra config `criterion/<model_type>.yaml`
(`densepred.configs`), the losses the official model was trained with.

The classes' thing / stuff split (`metadata.categories[k]["isthing"]`, which decides what panoptic
post-processing merges) is not in a transformers config.json: it comes from the dataset's categories,
read from `--categories` (a COCO panoptic JSON, or a list of its categories), else recognised by the labels
(id2label equal to COCO panoptic's 133 classes: the packaged `coco_panoptic_categories.json`, panopticapi's
`panoptic_coco_categories.json`: id, name, isthing (80 things, 53 stuff), color); otherwise every class is
marked a thing, with a warning.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from importlib.resources import files
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from densepred.backbones.checkpoint import resolve_checkpoint
from densepred.convert.deformable_detr import convert_deformable_detr
from densepred.convert.eomt import convert_eomt
from densepred.convert.mask2former import convert_mask2former
from densepred.convert.maskformer import convert_maskformer
from densepred.convert.rtdetr import convert_rtdetr
from densepred.export_format import write_export
from densepred.segmenter import Segmenter

# config.json model_type -> converter (MaskFormerForInstanceSegmentation, Mask2FormerForUniversalSegmentation,
# EomtForUniversalSegmentation).
CONVERTERS = {
    "mask2former": convert_mask2former,
    "maskformer": convert_maskformer,
    "eomt": convert_eomt,
    "deformable_detr": convert_deformable_detr,  # DeformableDetrForObjectDetection
    "rt_detr": convert_rtdetr,  # RTDetrForObjectDetection (v1)
}
MODEL_KEYS = ("backbone", "neck", "head", "pixel_mean", "pixel_std")
DETECTORS = ("deformable_detr", "rt_detr")  # their exports are for task "detection"
# config.json model_type -> its shipped criterion config `configs/criterion/<name>.yaml`, where the names differ.
CRITERIA = {"rt_detr": "rtdetr"}
COCO_PANOPTIC_CATEGORIES = "coco_panoptic_categories.json"

logger = logging.getLogger(__name__)


def coco_panoptic_categories() -> list[dict[str, Any]]:
    """COCO panoptic's 133 categories (id, name, isthing, color) in id order, packaged with densepred.convert."""
    return json.loads(files("densepred.convert").joinpath(COCO_PANOPTIC_CATEGORIES).read_text())


def _label(name: Any) -> str:
    """A class name compared loosely: case, underscores and runs of spaces do not count."""
    return " ".join(str(name).lower().replace("_", " ").split())


def read_categories_file(path: str | Path) -> list[dict[str, Any]]:
    """The categories (id, name, isthing, optional color) of a COCO panoptic JSON (its `categories`) or of a
    JSON list of them, in id order (the contiguous order of the dataset readers)."""
    path = Path(path).expanduser()
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"--categories {path}: not a readable JSON file ({error})") from error
    categories = data.get("categories") if isinstance(data, dict) else data
    if not isinstance(categories, list) or not categories:
        raise ValueError(f"--categories {path}: expected a COCO panoptic JSON with 'categories', or a list of them")
    for position, category in enumerate(categories):
        if not (
            isinstance(category, dict)
            and isinstance(category.get("id"), int)
            and isinstance(category.get("name"), str)
            and category.get("isthing") in (0, 1, True, False)
        ):
            raise ValueError(
                f"--categories {path}: categories[{position}] needs an integer 'id', a string 'name' and 'isthing' "
                f"0 or 1 (a COCO panoptic category), got {category!r}"
            )
    return sorted(categories, key=lambda category: category["id"])


def class_categories(
    names: Sequence[str], categories: Sequence[dict[str, Any]] | None = None, source: str = "the checkpoint"
) -> list[dict[str, Any]]:
    """Metadata categories (id, name, isthing[, color]) of a converted model's classes, in class order.

    From `categories` (the dataset's, e.g. `read_categories_file`; one per class, in id order) when given;
    else COCO panoptic's when the class names are its 133 labels in order; else every class is a thing, with a
    warning (panoptic post-processing then never merges stuff segments)."""
    if categories is not None:
        if len(categories) != len(names):
            raise ValueError(
                f"--categories lists {len(categories)} categories but {source} predicts {len(names)} classes; give "
                "the categories of the dataset the model was trained on"
            )
        differ = [(n, c["name"]) for n, c in zip(names, categories, strict=True) if _label(n) != _label(c["name"])]
        if differ:
            logger.warning(
                "%d class name(s) of %s differ from --categories (in id order), e.g. %s; the --categories names "
                "are used",
                len(differ),
                source,
                ", ".join(f"{a!r} / {b!r}" for a, b in differ[:3]),
            )
        return [_category(c, c["name"]) for c in categories]
    coco = coco_panoptic_categories()
    if [_label(n) for n in names] == [_label(c["name"]) for c in coco]:
        return [_category(c, name) for c, name in zip(coco, names, strict=True)]
    logger.warning(
        "the thing/stuff split of the %d classes of %s is unknown (they are not COCO panoptic's 133): every class "
        "is marked a thing, so panoptic post-processing never merges stuff segments; pass --categories "
        "<panoptic.json> (a COCO panoptic JSON of the training data) to set it",
        len(names),
        source,
    )
    return [{"id": k, "name": name, "isthing": True} for k, name in enumerate(names)]


def _category(category: dict[str, Any], name: str) -> dict[str, Any]:
    out = {"id": int(category["id"]), "name": name, "isthing": bool(category["isthing"])}
    if isinstance(category.get("color"), list) and len(category["color"]) == 3:
        out["color"] = [int(v) for v in category["color"]]
    return out


def criterion_config(model_type: str) -> dict[str, Any]:
    """The packaged `configs/criterion/<model_type>.yaml`, resolved to a plain dict."""
    text = files("densepred.configs").joinpath("criterion", f"{model_type}.yaml").read_text()
    return OmegaConf.to_container(OmegaConf.create(text), resolve=True)


def convert_model(
    name_or_path: str,
    revision: str | None = None,
    model_type: str | None = None,
    categories: Sequence[dict[str, Any]] | None = None,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(export config, Segmenter state dict) of a transformers MaskFormer or Mask2Former checkpoint;
    `model_type` is its config.json's (read from the checkpoint when not given); `categories` the dataset's
    (id, name, isthing, color; see `class_categories`)."""
    if model_type is None:
        model_type = (resolve_checkpoint(name_or_path, revision).config or {}).get("model_type")
    if model_type not in CONVERTERS:
        raise ValueError(
            f"{name_or_path}: config.json has model_type {model_type!r}; model.convert reads transformers "
            f"checkpoints of type {sorted(CONVERTERS)} (MaskFormerForInstanceSegmentation, "
            "Mask2FormerForUniversalSegmentation, EomtForUniversalSegmentation)"
        )
    segmenter_config, state_dict = CONVERTERS[model_type](name_or_path, revision=revision)
    names = list(segmenter_config.get("class_names") or [])
    config = {
        # pixel_mean / pixel_std: where the converter reads the checkpoint's input normalisation (RT-DETR: none)
        "model": {key: segmenter_config[key] for key in MODEL_KEYS if key in segmenter_config},
        "criterion": criterion_config(CRITERIA.get(model_type, model_type)),
        "metadata": {
            "categories": class_categories(names, categories, source=name_or_path),
            "num_classes": int(segmenter_config["num_classes"]),
            "ignore_index": 255,
        },
        "source": {"checkpoint": name_or_path, "revision": revision, "model_type": model_type},
        **({"task": "detection"} if model_type in DETECTORS else {}),  # else the loader's default (panoptic)
    }
    return config, state_dict


def save_model(config: dict[str, Any], state_dict: dict[str, torch.Tensor], folder: str | Path) -> Path:
    """Check the weights load strictly into the configured model, then write both files atomically."""
    model = Segmenter.from_config({**config["model"], "num_classes": config["metadata"]["num_classes"]})
    model.load_state_dict(state_dict, strict=True)
    write_export(folder, config, state_dict, normalization=model.normalization)
    return Path(folder)
