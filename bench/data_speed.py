"""Throughput of one data-loading worker for the LSJ 1024 training pipeline on COCO-sized images.

Writes a synthetic COCO-format set of ~640x480 JPEGs with ~20 segments each (things as polygons / RLE,
stuff regions, crowds) and times what one DataLoader worker does per image: JPEG decode, mask decode
(pycocotools for instances, the PNG for panoptic), LSJ (flip, scale jitter of a 1024 target, 1024 crop),
targets and collation (pad to 1024, normalise). One thread, as in a DataLoader worker.

    python bench/data_speed.py [--images 60] [--batch-size 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import torch

from densepred.data import CocoInstanceDataset, CocoPanopticDataset, Collate, build_transform, generate_synthetic
from densepred.data.transforms import recipe_fixed_size


def time_pipeline(dataset, collate: Collate, batch_size: int) -> float:
    """Images per second of load + transform + target + collate over the whole dataset, after one warm-up batch."""
    collate([dataset[k] for k in range(batch_size)])
    start = time.perf_counter()
    for first in range(0, len(dataset) - batch_size + 1, batch_size):
        collate([dataset[k] for k in range(first, first + batch_size)])
    return (len(dataset) // batch_size * batch_size) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = generate_synthetic(
            tmp,
            num_train=args.images,
            num_val=0,
            min_size=480,
            max_size=640,
            min_things=14,
            max_things=20,
            crowd_prob=0.2,
            seed=0,
        )
        recipe = {"recipe": "lsj", "size": 1024, "scale": [0.1, 2.0]}
        collate = Collate(32, recipe_fixed_size(**recipe))
        ann = root / "annotations"
        datasets = {
            "instance (instances JSON)": CocoInstanceDataset(
                ann / "instances_train2017.json", root / "train2017", build_transform(**recipe)
            ),
            "panoptic (panoptic PNGs)": CocoPanopticDataset(
                ann / "panoptic_train2017.json",
                ann / "panoptic_train2017",
                root / "train2017",
                build_transform(**recipe),
            ),
        }
        segments = [len(datasets["panoptic (panoptic PNGs)"].load_raw(k)["labels"]) for k in range(args.images)]
        print(
            f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, 1 thread"
        )
        print(
            f"{args.images} JPEGs 480..640 px a side, {sum(segments) / len(segments):.1f}"
            f" segments per image (panoptic), LSJ 1024, batch {args.batch_size}"
        )
        for name, dataset in datasets.items():
            rate = time_pipeline(dataset, collate, args.batch_size)
            print(f"  {name:<28} {rate:6.1f} images/s per worker ({1000 / rate:5.1f} ms/image)")


if __name__ == "__main__":
    main()
