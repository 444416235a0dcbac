"""Build the data module, the LightningModule and the Trainer from a composed Hydra config."""

from __future__ import annotations

import logging
from typing import Any

from hydra.utils import instantiate
from lightning import Callback, LightningDataModule, Trainer
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from densepred.engine.checkpoint_io import DurableCheckpointIO
from densepred.engine.loading import init_from
from densepred.engine.module import SegmentationModule
from densepred.engine.trust import training_targets

# The metric that picks the best checkpoint for each task (logged as "val/<metric>").
MAIN_METRIC = {"panoptic": "val/PQ", "instance": "val/segm/AP", "semantic": "val/mIoU", "detection": "val/bbox/AP"}

OmegaConf.register_new_resolver("main_metric", lambda task: MAIN_METRIC[task], replace=True)

log = logging.getLogger(__name__)


def container(node: Any) -> Any:
    """A resolved plain-Python copy of a config node (what the module stores in its checkpoints)."""
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def metadata_dict(metadata: Any) -> dict[str, Any]:
    """`data.DatasetMetadata` -> the plain dict the module keeps (class names, colors, things, ids)."""
    return {
        "categories": [dict(c, color=list(c["color"])) for c in metadata.categories],
        "num_classes": metadata.num_classes,
        "ignore_index": metadata.ignore_index,
    }


def build_datamodule(cfg: DictConfig) -> LightningDataModule:
    return instantiate(cfg.data)


def build_module(cfg: DictConfig, metadata: Any) -> SegmentationModule:
    """The LightningModule for `cfg` (backbone, neck, head, criterion, optimizer, scheduler, postprocess, and
    `pixel_mean` / `pixel_std` when set: else the backbone's statistics normalise the input), starting from
    the weights of `cfg.init_from` when set (fine-tuning a trained or converted model)."""
    model = {"backbone": container(cfg.backbone), "neck": container(cfg.neck), "head": container(cfg.head)}
    for key in ("pixel_mean", "pixel_std"):
        if cfg.get(key) is not None:
            model[key] = [float(v) for v in container(cfg[key])]
    module = SegmentationModule(
        model=model,
        criterion=container(cfg.criterion),
        metadata=metadata_dict(metadata),
        task=cfg.data.task,
        optimizer=container(cfg.optimizer),
        scheduler=container(cfg.scheduler),
        postprocess=container(cfg.postprocess),
        compile=cfg.compile,
        channels_last=cfg.channels_last,
        activation_checkpointing=list(cfg.activation_checkpointing or []),
        recompute_norm_outputs=bool(cfg.get("recompute_norm_outputs", True)),
        output_dir=str(cfg.paths.output_dir),
    )
    if cfg.get("init_from"):
        skipped = init_from(module, cfg.init_from, trusted_targets=training_targets(cfg))
        reinitialised = f"; re-initialised {skipped} (shape differs)" if skipped else ""
        if rank_zero_only.rank == 0:
            log.info(f"init_from={cfg.init_from}: loaded the model weights{reinitialised}")
    return module


def build_trainer(cfg: DictConfig, **overrides: Any) -> Trainer:
    """The Trainer with the configured loggers and callbacks (`logger=none` turns logging off, and with it
    the LR monitor, which needs a logger), and `trainer.plugins` plus, unless they hold a CheckpointIO, the
    `DurableCheckpointIO` (atomic checkpoint saves beside the file, weights-only allowlist-checked loads,
    the training config's model parts trusted), whose stale temp files it clears from the checkpoint folders."""
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values()]
    callbacks: list[Callback] = [instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    if not loggers:
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    plugins = list(instantiate(cfg.trainer.get("plugins") or []))
    if not any(isinstance(p, CheckpointIO) for p in plugins):
        plugins.append(DurableCheckpointIO(trusted_targets=training_targets(cfg)))
    kwargs = {"logger": loggers or False, "callbacks": callbacks, "plugins": plugins, **overrides}
    trainer = instantiate(cfg.trainer, **kwargs)
    checkpoint_io = trainer.strategy.checkpoint_io
    if isinstance(checkpoint_io, DurableCheckpointIO) and rank_zero_only.rank == 0:
        for callback in trainer.checkpoint_callbacks:
            if getattr(callback, "dirpath", None):
                checkpoint_io.clean(callback.dirpath)
    return trainer
