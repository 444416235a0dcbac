"""Predict on a folder of images: `python predict.py checkpoint=PATH input=FOLDER output=OUT`.

Writes OUT/<image>.png (prediction overlay: masks, class names, scores) and OUT/predictions.json
(per image: panoptic segments, or instances with boxes and scores, or the classes present).
Runs `Trainer.predict` (`SegmentationModule.predict_step`) on an `ImageFolderDataset`; a
`PredictionWriter` writes the files. The model normalises the images with the statistics its
checkpoint or export records.
"""

from __future__ import annotations

from typing import Any

import hydra
from lightning import Trainer
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from densepred.data.collate import Collate
from densepred.data.errors import DataError
from densepred.data.image_folder import ImageFolderDataset
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
    module = load_module(cfg.checkpoint, task=cfg.task, postprocess=container(cfg.postprocess))
    loader = DataLoader(
        dataset,
        batch_size=int(cfg.batch_size),
        shuffle=False,
        num_workers=int(cfg.num_workers),
        collate_fn=Collate(size_divisibility=32),
    )
    writer = PredictionWriter(cfg.output, dataset, score_threshold=float(cfg.score_threshold))
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
