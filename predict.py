"""Predict on a folder of images: `python predict.py checkpoint=PATH input=FOLDER output=OUT`.

Writes OUT/<image file name>.png (prediction overlay: masks or boxes, class names, scores; `x.jpg` -> `x.jpg.png`,
so `x.jpg` and `x.png` get two overlays) and OUT/predictions.json ({image file name: panoptic segments, or
instances with boxes and scores, or the classes present}, plus "skipped": {file name: reason} for the
images that could not be read; they are logged and the others predicted). OUT may be neither the input
folder nor inside it: predict.py refuses it before loading anything, so no input file is ever overwritten.
Runs `Trainer.predict` (`SegmentationModule.predict_step`) on an `ImageFolderDataset`; a
`PredictionWriter` writes the files. The model normalises the images with the statistics its
checkpoint or export records. Large photos are post-processed at the network's working size, with only
the results brought to the photo's size (`postprocess.exact_max_pixels`, heads/postprocess.py).
"""

from __future__ import annotations

from typing import Any

import hydra
from lightning import Trainer
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from densepred.data.errors import DataError
from densepred.data.image_folder import ImageFolderCollate, ImageFolderDataset
from densepred.engine.build import container
from densepred.engine.loading import load_module
from densepred.engine.prediction import PredictionWriter


def trainer_devices(device: str) -> dict[str, Any]:
    """predict.yaml's `device` (auto | cpu | cuda | cuda:N, or another Lightning accelerator name) ->
    the Trainer's `accelerator` and `devices` (one device)."""
    device = str(device)
    kind, _, index = device.partition(":")
    accelerator = {"cuda": "gpu"}.get(kind, kind)
    return {"accelerator": accelerator, "devices": [int(index)] if index else 1}


@hydra.main(config_path="configs", config_name="predict", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        dataset = ImageFolderDataset(cfg.input, short_side=int(cfg.short_side), max_size=int(cfg.max_size))
    except DataError as error:
        raise SystemExit(f"input={error}") from None
    try:  # before the model is loaded: the output folder may not be (inside) the input folder
        writer = PredictionWriter(cfg.output, dataset, score_threshold=float(cfg.score_threshold))
    except ValueError as error:
        raise SystemExit(str(error)) from None
    module = load_module(cfg.checkpoint, task=cfg.task, postprocess=container(cfg.postprocess))
    loader = DataLoader(
        dataset,
        batch_size=int(cfg.batch_size),
        shuffle=False,
        num_workers=int(cfg.num_workers),
        collate_fn=ImageFolderCollate(size_divisibility=32),
    )
    trainer = Trainer(
        **trainer_devices(cfg.device),
        logger=False,
        callbacks=[writer],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.predict(module, dataloaders=loader, return_predictions=False)


if __name__ == "__main__":
    main()
