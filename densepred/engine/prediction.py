"""Prediction on a folder of images through `Trainer.predict`: the writer of overlays and predictions.json."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter

from densepred.data.image_folder import ImageFolderDataset
from densepred.utils.io import atomic_write_json
from densepred.visualization import draw_prediction, save_png

log = logging.getLogger(__name__)


def describe(prediction: Mapping[str, Any], categories: Sequence[Mapping[str, Any]], score_threshold: float) -> dict:
    """The JSON record of one image's prediction (class names instead of ids)."""
    record: dict[str, Any] = {}
    if "segments_info" in prediction:
        record["segments"] = [
            {
                "id": s["id"],
                "category": categories[s["label"]]["name"],
                "isthing": bool(s["isthing"]),
                "score": round(float(s["score"]), 4),
                "area": int((prediction["panoptic_seg"] == s["id"]).sum()),
            }
            for s in prediction["segments_info"]
        ]
    if "instances" in prediction:
        inst = prediction["instances"]
        keep = (inst["scores"] >= score_threshold).nonzero().flatten().tolist()
        record["instances"] = [
            {
                "category": categories[int(inst["labels"][i])]["name"],
                "score": round(float(inst["scores"][i]), 4),
                "box_xyxy": [round(float(v), 1) for v in inst["boxes"][i]],
            }
            for i in keep
        ]
    if "sem_seg" in prediction and "segments_info" not in prediction:
        present = prediction["sem_seg"].argmax(0).unique().tolist()
        record["classes_present"] = [categories[c]["name"] for c in present]
    return record


class PredictionWriter(BasePredictionWriter):
    """Write `<output_dir>/<image stem>.png` (the prediction drawn over the image file, at its size) for
    every predicted image, and at the end `<output_dir>/predictions.json` ({file name: record}, in the
    dataset's file order; see `describe`). Batches are collated samples of `dataset`: their `image_ids`
    index `dataset.files`. Under DDP the ranks' records are gathered and rank 0 writes the JSON."""

    def __init__(self, output_dir: str | Path, dataset: ImageFolderDataset, score_threshold: float = 0.5) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir).expanduser()
        self.dataset = dataset
        self.files = list(dataset.files)
        self.score_threshold = float(score_threshold)
        self.records: dict[int, dict[str, Any]] = {}

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.records = {}

    def write_on_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        categories = pl_module.metadata["categories"]
        for image_id, image_prediction in zip(batch["image_ids"], prediction, strict=True):
            image = self.dataset.original(int(image_id))  # drawn at the file's own size
            overlay = draw_prediction(image, image_prediction, categories, self.score_threshold)
            save_png(overlay, self.output_dir / f"{self.files[int(image_id)].stem}.png")
            self.records[int(image_id)] = describe(image_prediction, categories, self.score_threshold)
        log.info(f"{len(self.records)}/{len(self.files)} images")

    def on_predict_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        records = self.records
        if trainer.world_size > 1:
            gathered: list[Any] = [None] * trainer.world_size
            torch.distributed.all_gather_object(gathered, records)
            records = {k: v for part in gathered for k, v in part.items()}
        if trainer.is_global_zero:
            ordered = {self.files[i].name: records[i] for i in sorted(records)}
            atomic_write_json(self.output_dir / "predictions.json", ordered)
            log.info(f"wrote {len(ordered)} overlays and predictions.json to {self.output_dir}")
