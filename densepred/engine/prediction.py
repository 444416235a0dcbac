"""Prediction on a folder of images through `Trainer.predict`: the writer of overlays and predictions.json.

Output rules (predict.py): the output folder may be neither the input folder nor inside it
(`check_output_folder`), so no input file is ever overwritten or mixed with the results; each overlay is
named by the whole input file name plus `.png` (`x.jpg` -> `x.jpg.png`, `x.png` -> `x.png.png`), so no two
inputs share an overlay; an unreadable image is skipped, logged and listed in predictions.json, and the
other images are predicted.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter

from densepred.data.errors import DataError
from densepred.data.image_folder import ImageFolderDataset
from densepred.utils.io import atomic_write_json
from densepred.visualization import draw_prediction, save_png

log = logging.getLogger(__name__)

# The key of predictions.json listing the skipped images ({file name: reason}); no image file is named so,
# since every listed image has an image suffix (`densepred.data.image_io.IMAGE_SUFFIXES`).
SKIPPED_KEY = "skipped"


def check_output_folder(input_folder: str | Path, output_folder: str | Path) -> Path:
    """The output folder, resolved; a ValueError naming `input=` and `output=` if it is the input folder or
    inside it (symbolic links followed), where overlays and predictions.json would land among the images."""
    source = Path(input_folder).expanduser().resolve()
    target = Path(output_folder).expanduser().resolve()
    if target == source or source in target.parents:
        where = "is the input folder" if target == source else "is inside the input folder"
        raise ValueError(
            f"output={output_folder} {where} input={input_folder}: predict.py would write its overlays and "
            "predictions.json among the images it reads. Choose an output folder outside the input folder, e.g. "
            f"output={source.parent / (source.name + '_predictions')}"
        )
    return target


def overlay_name(image_file: str | Path) -> str:
    """The overlay file of an input image: its whole file name plus `.png` (`x.jpg` -> `x.jpg.png`)."""
    return f"{Path(image_file).name}.png"


def describe(prediction: Mapping[str, Any], categories: Sequence[Mapping[str, Any]], score_threshold: float) -> dict:
    """The JSON record of one image's prediction (class names instead of ids)."""
    record: dict[str, Any] = {}
    if "segments_info" in prediction:
        segments = prediction["segments_info"]
        last_id = max((int(s["id"]) for s in segments), default=0)
        areas = torch.bincount(prediction["panoptic_seg"].flatten(), minlength=last_id + 1).tolist()
        record["segments"] = [
            {
                "id": s["id"],
                "category": categories[s["label"]]["name"],
                "isthing": bool(s["isthing"]),
                "score": round(float(s["score"]), 4),
                "area": int(areas[int(s["id"])]),
            }
            for s in segments
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
    if "sem_seg_labels" in prediction and "segments_info" not in prediction:
        present = prediction["sem_seg_labels"].unique().tolist()
        record["classes_present"] = [categories[c]["name"] for c in present]
    return record


class PredictionWriter(BasePredictionWriter):
    """Write `<output_dir>/<image file name>.png` (`overlay_name`: the prediction drawn over the image file,
    at its size) for every predicted image, and at the end `<output_dir>/predictions.json`: {file name:
    record (`describe`), in the dataset's file order, then "skipped": {file name: reason}, the unreadable
    images (empty when none)}, written atomically. Batches are collated samples of `dataset`
    (`ImageFolderCollate`): their `image_ids` and `skipped` ids index `dataset.files`. The output folder may
    not be the dataset's folder or inside it (`check_output_folder`). Under DDP the ranks' records are
    gathered and rank 0 writes the JSON."""

    def __init__(self, output_dir: str | Path, dataset: ImageFolderDataset, score_threshold: float = 0.5) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = check_output_folder(dataset.folder, output_dir)
        self.dataset = dataset
        self.files = list(dataset.files)
        self.score_threshold = float(score_threshold)
        self.records: dict[int, dict[str, Any]] = {}
        self.skipped: dict[int, str] = {}

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.records, self.skipped = {}, {}

    def _skip(self, image_id: int, reason: str) -> None:
        self.skipped[image_id] = reason
        log.warning(f"skipped {self.files[image_id].name}: {reason}")

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
        for image_id, reason in batch.get("skipped", []):
            self._skip(int(image_id), reason)
        for image_id, image_prediction in zip(batch["image_ids"], prediction, strict=True):
            image_id = int(image_id)
            try:
                image = self.dataset.original(image_id)  # drawn at the file's own size
            except DataError as error:  # read when loading, unreadable now (changed or removed since)
                self._skip(image_id, str(error))
                continue
            overlay = draw_prediction(image, image_prediction, categories, self.score_threshold)
            save_png(overlay, self.output_dir / overlay_name(self.files[image_id]))
            self.records[image_id] = describe(image_prediction, categories, self.score_threshold)
        log.info(f"{len(self.records) + len(self.skipped)}/{len(self.files)} images ({len(self.skipped)} skipped)")

    def on_predict_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        records, skipped = self.records, self.skipped
        if trainer.world_size > 1:
            gathered: list[Any] = [None] * trainer.world_size
            torch.distributed.all_gather_object(gathered, (records, skipped))
            records = {k: v for part, _ in gathered for k, v in part.items()}
            skipped = {k: v for _, part in gathered for k, v in part.items()}
        if trainer.is_global_zero:
            ordered: dict[str, Any] = {self.files[i].name: records[i] for i in sorted(records)}
            ordered[SKIPPED_KEY] = {self.files[i].name: skipped[i] for i in sorted(skipped)}
            atomic_write_json(self.output_dir / "predictions.json", ordered)
            message = f"wrote {len(records)} overlays and predictions.json to {self.output_dir}"
            if skipped:
                message += f"; {len(skipped)} unreadable image(s) skipped, listed under {SKIPPED_KEY!r} there"
                log.warning(message)
            else:
                log.info(message)
