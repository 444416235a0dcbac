"""Load a trained or converted model for evaluation, prediction or fine-tuning.

Accepted: a Lightning checkpoint (`.ckpt` written by train.py), or a folder with `config.json` +
`model.safetensors` (the run's `export/` folder, or `python -m densepred.convert` output; the format
is `densepred.export_format`'s). An export's recorded input normalisation (`model.pixel_mean` /
`pixel_std`) is passed back to the rebuilt Segmenter.

Model files are data (`densepred.engine.trust`): a `.ckpt` is read with `torch.load(weights_only=True)`, and
its `hyper_parameters` / the export's config.json may name only this project's model parts (plus the
`trusted_targets` a trusted caller adds); both are checked in `read_checkpoint`, before anything is built.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from densepred.engine.module import SegmentationModule
from densepred.engine.trust import check_model_config, load_checkpoint_file
from densepred.export_format import EXPORT_STEP_KEY, read_export


def without_pretrained(model_config: Mapping[str, Any]) -> dict[str, Any]:
    """The model config with the backbone's pretrained source switched off (the weights come from the checkpoint)."""
    config = copy.deepcopy(dict(model_config))
    backbone = dict(config["backbone"])
    if "pretrained" in backbone:
        backbone["pretrained"] = False if str(backbone.get("_target_", "")).endswith("TimmBackbone") else None
    config["backbone"] = backbone
    return config


def read_checkpoint(
    path: str | Path, trusted_targets: Iterable[str] = (), source: str = "checkpoint"
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(module settings, SegmentationModule state dict) from a `.ckpt` file or an export folder (settings
    `global_step`: the training step of the weights, None if unknown, e.g. a converted model), its settings
    checked (`trust.check_model_config`: allowlisted `_target_`s, plus `trusted_targets`). Errors name
    `source=path`."""
    path = Path(path).expanduser()
    where = f"{source}={path}"
    if path.is_file():
        checkpoint = load_checkpoint_file(path, source=where)
        if "state_dict" not in checkpoint or "hyper_parameters" not in checkpoint:
            raise ValueError(f"{where}: has no 'state_dict' / 'hyper_parameters'; was it written by train.py?")
        settings, state = checkpoint["hyper_parameters"], checkpoint["state_dict"]
        settings = {**settings, EXPORT_STEP_KEY: checkpoint.get("global_step")}  # as an export records it
    elif path.is_dir():
        settings, weights = read_export(path, source=where)
        state = {f"model.{k}": v for k, v in weights.items()}
    else:
        raise ValueError(f"{where}: no such file or folder")
    check_model_config(settings, source=where, trusted_targets=trusted_targets)
    return dict(settings), state


def load_module(
    path: str | Path,
    metadata: Mapping[str, Any] | None = None,
    task: str | None = None,
    trusted_targets: Iterable[str] = (),
    **overrides: Any,
) -> SegmentationModule:
    """A SegmentationModule with the checkpoint's weights, for `task` with the classes of `metadata`
    (default: the checkpoint's own). The class count must match the checkpoint's. The file may name only
    allowlisted model parts (`densepred.engine.trust`) and the `trusted_targets` given here."""
    settings, state = read_checkpoint(path, trusted_targets)
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
    step = settings.get(EXPORT_STEP_KEY)
    module.checkpoint_step = int(step) if isinstance(step, int) else None  # labels evaluate.py's results
    return module


def init_from(module: SegmentationModule, path: str | Path, trusted_targets: Iterable[str] = ()) -> list[str]:
    """Fine-tuning start: copy the checkpoint's model weights into `module`, leaving out (and returning)
    the weights whose shape differs, e.g. the class head when the new data has other classes. Every
    other weight of the new model must be present in the checkpoint. Nothing the file names is built,
    yet a file naming other than allowlisted model parts (and `trusted_targets`) is refused all the same."""
    _, state = read_checkpoint(path, trusted_targets, source="init_from")
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
