"""Load a trained or converted model for evaluation, prediction or fine-tuning.

Accepted: a Lightning checkpoint (`.ckpt` written by train.py), or a folder with `config.json` +
`model.safetensors` (the run's `export/` folder, or `python -m densepred.convert` output; the format
is `densepred.export_format`'s). An export's recorded input normalisation (`model.pixel_mean` /
`pixel_std`) is passed back to the rebuilt Segmenter.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from densepred.engine.module import SegmentationModule
from densepred.export_format import read_export


def without_pretrained(model_config: Mapping[str, Any]) -> dict[str, Any]:
    """The model config with the backbone's pretrained source switched off (the weights come from the checkpoint)."""
    config = copy.deepcopy(dict(model_config))
    backbone = dict(config["backbone"])
    if "pretrained" in backbone:
        backbone["pretrained"] = False if str(backbone.get("_target_", "")).endswith("TimmBackbone") else None
    config["backbone"] = backbone
    return config


def read_checkpoint(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(module settings, SegmentationModule state dict) from a `.ckpt` file or an export folder."""
    path = Path(path).expanduser()
    if path.is_file():
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - any unpickling failure gets the same clear message
            reason = f"{type(error).__name__}: {error}"
            raise ValueError(f"checkpoint={path}: not a readable Lightning checkpoint ({reason})") from None
        if "state_dict" not in checkpoint or "hyper_parameters" not in checkpoint:
            raise ValueError(
                f"checkpoint={path}: has no 'state_dict' / 'hyper_parameters'; was it written by train.py?"
            )
        return dict(checkpoint["hyper_parameters"]), checkpoint["state_dict"]
    if path.is_dir():
        settings, weights = read_export(path, source=f"checkpoint={path}")
        return settings, {f"model.{k}": v for k, v in weights.items()}
    raise ValueError(f"checkpoint={path}: no such file or folder")


def load_module(
    path: str | Path,
    metadata: Mapping[str, Any] | None = None,
    task: str | None = None,
    **overrides: Any,
) -> SegmentationModule:
    """A SegmentationModule with the checkpoint's weights, for `task` with the classes of `metadata`
    (default: the checkpoint's own). The class count must match the checkpoint's."""
    settings, state = read_checkpoint(path)
    saved_classes = int(settings["metadata"]["num_classes"])
    if metadata is not None and int(metadata["num_classes"]) != saved_classes:
        raise ValueError(
            f"checkpoint={path} predicts {saved_classes} classes but the data has {metadata['num_classes']}; "
            "evaluate on data with the same categories, or fine-tune with train.py init_from=..."
        )
    kwargs = {
        key: settings[key]
        for key in ("criterion", "optimizer", "scheduler", "postprocess", "evaluations")
        if settings.get(key) is not None
    }
    kwargs.update({k: v for k, v in overrides.items() if v is not None})
    module = SegmentationModule(
        model=without_pretrained(settings["model"]),
        metadata=dict(metadata if metadata is not None else settings["metadata"]),
        task=task or settings.get("task", "panoptic"),
        **kwargs,
    )
    missing, unexpected = module.load_state_dict(state, strict=False)
    model_missing = [k for k in missing if k.startswith("model.")]
    if model_missing or unexpected:
        raise ValueError(
            f"checkpoint={path} does not match its configured model: missing {model_missing[:5]}, "
            f"unexpected {list(unexpected)[:5]}"
        )
    return module


def init_from(module: SegmentationModule, path: str | Path) -> list[str]:
    """Fine-tuning start: copy the checkpoint's model weights into `module`, leaving out (and returning)
    the weights whose shape differs, e.g. the class head when the new data has other classes. Every
    other weight of the new model must be present in the checkpoint."""
    _, state = read_checkpoint(path)
    own = module.state_dict()
    model_state = {k: v for k, v in state.items() if k.startswith("model.")}
    skipped = [k for k, v in model_state.items() if k in own and own[k].shape != v.shape]
    loadable = {k: v for k, v in model_state.items() if k in own and k not in skipped}
    missing = [k for k in own if k.startswith("model.") and k not in loadable and k not in skipped]
    if missing:
        raise ValueError(
            f"init_from={path}: the checkpoint lacks {len(missing)} weights of the configured model (first: "
            f"{missing[0]}); it was trained with another backbone/neck/head configuration"
        )
    module.load_state_dict(loadable, strict=False)
    return skipped
