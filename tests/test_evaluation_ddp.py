"""Two CPU processes (gloo), each evaluating its DistributedSampler shard with the padding duplicate,
must give exactly the single-process metrics and files, for all three evaluators."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from densepred.data import PanopticGroundTruth
from densepred.evaluation import COCOInstanceEvaluator, PanopticEvaluator, SemanticEvaluator

pytestmark = pytest.mark.slow

WORLD_SIZE = 2


def evaluate_all(data: dict, image_ids: list[int] | None, out: Path) -> dict[str, dict[str, float]]:
    """Process `image_ids` (all when None) with each evaluator in batches of two, evaluate, write."""
    semantic, panoptic = data["semantic"], data["panoptic"]
    evaluators = {
        "instance": COCOInstanceEvaluator(data["coco"]["ann_file"], data["coco"]["contiguous_to_dataset_id"]),
        "panoptic": PanopticEvaluator(
            PanopticGroundTruth(panoptic["panoptic_json"], panoptic["panoptic_root"]),
            panoptic["categories"],
            panoptic["contiguous_to_dataset_id"],
        ),
        "semantic": SemanticEvaluator(
            semantic["num_classes"], 255, semantic["ground_truth"].__getitem__, semantic["class_names"]
        ),
    }
    results = {}
    for name, evaluator in evaluators.items():
        predictions = data[{"instance": "coco"}.get(name, name)]["predictions"]
        ids = sorted(predictions) if image_ids is None else [sorted(predictions)[i] for i in image_ids]
        for start in range(0, len(ids), 2):
            batch = ids[start : start + 2]
            evaluator.process(batch, [predictions[i] for i in batch])
        results[name] = evaluator.evaluate()
        evaluator.write(out / name)
    return results


def shard(rank: int, num_images: int) -> list[int]:
    """DistributedSampler(shuffle=False): pad the indices by repeating the first ones, take every WORLD_SIZE-th."""
    indices = list(range(num_images))
    indices += indices[: -num_images % WORLD_SIZE]
    return indices[rank::WORLD_SIZE]


def worker(rank: int, init_file: str, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    try:
        data = torch.load(Path(folder) / "data.pt", weights_only=False)
        results = evaluate_all(data, shard(rank, 5), Path(folder) / "ddp")
        torch.save(results, Path(folder) / f"results_rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_processes_equal_one(tmp_path, eval_data):
    # Built here and handed to the workers through data.pt: the spawned processes import this module only.
    data = {
        "coco": eval_data.make_coco_instances(tmp_path / "coco", seed=4),
        "panoptic": eval_data.make_panoptic(tmp_path / "panoptic", seed=4, num_images=5),
        "semantic": eval_data.make_semantic(seed=4, num_images=5),
    }
    assert all(len(d["predictions"]) == 5 for d in data.values())
    assert shard(0, 5) == [0, 2, 4] and shard(1, 5) == [1, 3, 0]  # image 0 evaluated twice
    torch.save(data, tmp_path / "data.pt")
    single = evaluate_all(data, None, tmp_path / "single")

    mp.spawn(worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD_SIZE, join=True)

    for rank in range(WORLD_SIZE):
        np.testing.assert_equal(torch.load(tmp_path / f"results_rank{rank}.pt", weights_only=False), single)
    assert (
        np.isfinite(single["panoptic"]["PQ"]) and single["semantic"]["mIoU"] > 0 and single["instance"]["segm/AP"] > 0
    )
    single_files = sorted(p.relative_to(tmp_path / "single") for p in (tmp_path / "single").rglob("*") if p.is_file())
    ddp_files = sorted(p.relative_to(tmp_path / "ddp") for p in (tmp_path / "ddp").rglob("*") if p.is_file())
    assert ddp_files == single_files and len(single_files) == 2 + 3 + 2 + 5  # JSONs + the 5 panoptic PNGs
    for relative in single_files:
        assert (tmp_path / "ddp" / relative).read_bytes() == (tmp_path / "single" / relative).read_bytes(), relative
