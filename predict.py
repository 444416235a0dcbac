"""Predict on a folder of images: `python predict.py checkpoint=PATH input=FOLDER output=OUT`.

Writes OUT/<image>.png (prediction overlay: masks, class names, scores) and OUT/predictions.json
(per image: panoptic segments, or instances with boxes and scores, or the classes present).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig
from torchvision import tv_tensors
from torchvision.io import write_png
from torchvision.transforms import v2

from densepred.data.collate import Collate
from densepred.data.image_io import read_image
from densepred.evaluation.base import atomic_write_bytes
from densepred.engine.build import container
from densepred.engine.loading import load_module
from densepred.visualization import draw_prediction

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


def describe(prediction: dict[str, Any], categories: list[dict], score_threshold: float) -> dict[str, Any]:
    """The JSON record of one image's prediction (class names instead of ids)."""
    record: dict[str, Any] = {}
    if "segments_info" in prediction:
        record["segments"] = [
            {"id": s["id"], "category": categories[s["label"]]["name"], "isthing": bool(s["isthing"]),
             "score": round(float(s["score"]), 4), "area": int((prediction["panoptic_seg"] == s["id"]).sum())}
            for s in prediction["segments_info"]
        ]
    if "instances" in prediction:
        inst = prediction["instances"]
        keep = (inst["scores"] >= score_threshold).nonzero().flatten().tolist()
        record["instances"] = [
            {"category": categories[int(inst["labels"][i])]["name"], "score": round(float(inst["scores"][i]), 4),
             "box_xyxy": [round(float(v), 1) for v in inst["boxes"][i]]}
            for i in keep
        ]
    if "sem_seg" in prediction and "segments_info" not in prediction:
        present = prediction["sem_seg"].argmax(0).unique().tolist()
        record["classes_present"] = [categories[c]["name"] for c in present]
    return record


@hydra.main(config_path="configs", config_name="predict", version_base="1.3")
def main(cfg: DictConfig) -> None:
    source, out = Path(cfg.input).expanduser(), Path(cfg.output).expanduser()
    if not source.is_dir():
        raise SystemExit(f"input={source}: not a folder of images")
    files = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise SystemExit(f"input={source}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          "cpu" if cfg.device == "auto" else cfg.device)
    module = load_module(cfg.checkpoint, task=cfg.task, postprocess=container(cfg.postprocess)).to(device).eval()
    categories = module.metadata["categories"]
    resize = v2.Resize(int(cfg.short_side), max_size=int(cfg.max_size))
    collate = Collate(size_divisibility=32)
    results: dict[str, Any] = {}
    for start in range(0, len(files), int(cfg.batch_size)):
        chunk = files[start : start + int(cfg.batch_size)]
        originals = [torch.from_numpy(read_image(p, p.name)).permute(2, 0, 1).contiguous() for p in chunk]
        samples = []
        for index, image in enumerate(originals):
            resized = resize(tv_tensors.Image(image))
            samples.append({"image": resized, "target": {"masks": torch.zeros(0, *resized.shape[1:], dtype=torch.bool)},
                            "image_id": index, "orig_size": tuple(image.shape[1:]), "issues": []})
        batch = collate(samples)
        batch["images"] = batch["images"].to(device)
        predictions = module.predict(batch)
        for path, image, prediction in zip(chunk, originals, predictions):
            overlay = draw_prediction(image, prediction, categories, float(cfg.score_threshold))
            out.mkdir(parents=True, exist_ok=True)
            write_png(overlay, str(out / f"{path.stem}.png"))
            results[path.name] = describe(prediction, categories, float(cfg.score_threshold))
        print(f"{min(start + len(chunk), len(files))}/{len(files)} images")
    atomic_write_bytes(out / "predictions.json", json.dumps(results, indent=2).encode())
    print(f"wrote {len(files)} overlays and predictions.json to {out}")


if __name__ == "__main__":
    main()
