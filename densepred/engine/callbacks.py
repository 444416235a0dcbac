"""Lightning callbacks: validation overlays and a safetensors export of the trained weights (the prediction
writer of `Trainer.predict` is in `densepred.engine.prediction`)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

from densepred.export_format import EXPORT_STEP_KEY, write_export
from densepred.visualization import draw_prediction, draw_target, save_png

log = logging.getLogger(__name__)


class SafetensorsExport(Callback):
    """At the end of fit, export the best checkpoint's weights (or the last ones) to `<dirpath>/`, with the
    model's input normalisation and the weights' training step recorded in its config.json
    (`densepred.export_format`)."""

    def __init__(self, dirpath: str) -> None:
        self.dirpath = dirpath

    @rank_zero_only
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        best = getattr(trainer.checkpoint_callback, "best_model_path", "")
        if best and Path(best).is_file():
            checkpoint = torch.load(best, map_location="cpu", weights_only=True)
            state = {k[len("model.") :]: v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
            step = checkpoint.get("global_step", trainer.global_step)
        else:
            state, step = pl_module.model.state_dict(), trainer.global_step
        config = {k: v for k, v in dict(pl_module.hparams).items() if k != "output_dir"}
        config[EXPORT_STEP_KEY] = int(step)
        weights = write_export(self.dirpath, config, state, normalization=pl_module.model.normalization)
        log.info(f"Exported weights to {weights}")


class ValidationOverlays(Callback):
    """Every validation, draw prediction | ground truth side by side for the first `num_images` images
    (taken from the first batches); save PNGs under `dirpath` and log them to TensorBoard."""

    def __init__(self, dirpath: str, num_images: int = 4) -> None:
        self.dirpath = Path(dirpath)
        self.num_images = num_images
        self.drawn = 0

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.drawn = 0

    @rank_zero_only
    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if trainer.sanity_checking or not outputs or self.drawn >= self.num_images:
            return
        categories = pl_module.metadata["categories"]
        for index in range(min(self.num_images - self.drawn, len(outputs))):
            h, w = batch["image_sizes"][index]
            height, width = batch["orig_sizes"][index]
            image = batch["images"][index, :, :h, :w].float().cpu()  # raw pixels (the model normalises its copy)
            image = F.interpolate(image[None], size=(height, width), mode="bilinear", align_corners=False)[0]
            image = image.round().clamp(0, 255).to(torch.uint8)
            target = dict(batch["targets"][index])
            if "masks" in target:
                masks = target["masks"][:, :h, :w].float().cpu()
                if len(masks):
                    masks = F.interpolate(masks[None], size=(height, width), mode="nearest")[0].bool()
                target["masks"] = masks
            else:  # detection: boxes in the resized image's pixels, drawn at the original size
                scale = torch.tensor([width / w, height / h, width / w, height / h])
                target["boxes"] = target["boxes"].cpu() * scale
            prediction = draw_prediction(image, outputs[index], categories)
            panel = torch.cat([prediction, draw_target(image, target, categories)], dim=2)
            save_png(panel, self.dirpath / f"step{trainer.global_step:07d}_image{self.drawn}.png")
            for logger in trainer.loggers:
                if isinstance(logger, TensorBoardLogger):
                    logger.experiment.add_image(f"val/overlay_{self.drawn}", panel, global_step=trainer.global_step)
            self.drawn += 1
