"""The DataModule on the synthetic default data: configs, generation and caching, loaders, DDP evaluation."""

import json
import multiprocessing
import shutil
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from omegaconf import OmegaConf
from torch.utils.data import DistributedSampler

from densepred.data import DataError, DataModule, ensure_synthetic
from densepred.data.synthetic import generate_synthetic

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"num_train": 10, "num_val": 6, "min_size": 64, "max_size": 96, "seed": 1}


def synthetic_config(tmp_path, **overrides):
    cfg = OmegaConf.load(ROOT / "configs/data/synthetic.yaml")
    cfg.root = str(tmp_path)
    cfg.synthetic = SMALL
    cfg.train_transform = {"recipe": "lsj", "size": 64, "scale": [0.5, 2.0]}
    cfg.eval_transform = {"recipe": "resize", "short": 64, "max_size": 100}
    cfg.num_workers = 0
    cfg.batch_size = 4
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


@pytest.mark.parametrize("task, num_classes", [("panoptic", 7), ("instance", 4), ("semantic", 7)])
def test_synthetic_config_gives_batches_for_every_task(tmp_path, task, num_classes):
    dm = instantiate(synthetic_config(tmp_path, task=task))
    assert isinstance(dm, DataModule)
    assert dm.metadata.num_classes == num_classes and dm.datasets == {}  # metadata before setup, no index built
    dm.setup("fit")
    ground_truth = dm.ground_truth("val")  # what the evaluation of the split reads, declared by its reader
    assert ground_truth.panoptic_json is None or ground_truth.panoptic_json.endswith("panoptic_val2017.json")
    assert ground_truth.metadata.same_classes(dm.metadata)
    batch = next(iter(dm.train_dataloader()))
    assert batch["images"].shape == (4, 3, 64, 64)
    for target, (h, w) in zip(batch["targets"], batch["image_sizes"], strict=True):
        assert (
            target["masks"].shape[1:] == (64, 64)
            and not target["masks"][:, h:].any()
            and not target["masks"][:, :, w:].any()
        )
        assert (
            target["labels"].dtype == torch.int64 and ((target["labels"] >= 0) & (target["labels"] < num_classes)).all()
        )
        assert ("sem_seg" in target) == (task == "semantic")
    val = list(dm.val_dataloader())
    assert sorted(i for b in val for i in b["image_ids"]) == list(range(11, 17))
    first = val[0]
    assert first["images"].shape[2] % 32 == 0 and first["images"].shape[3] % 32 == 0
    assert all(min(s) == 64 for s in first["image_sizes"]) and all(64 <= min(s) <= 96 for s in first["orig_sizes"])


def test_worker_processes_give_the_same_validation_batches(tmp_path):
    dm = instantiate(synthetic_config(tmp_path, num_workers=2))
    assert dm.val_dataloader().persistent_workers
    with_workers = list(dm.val_dataloader())
    dm.num_workers = 0
    in_process = list(dm.val_dataloader())
    assert [b["image_ids"] for b in with_workers] == [b["image_ids"] for b in in_process]
    for a, b in zip(with_workers, in_process, strict=True):
        torch.testing.assert_close(a["images"], b["images"])
        assert all(torch.equal(x["masks"], y["masks"]) for x, y in zip(a["targets"], b["targets"], strict=True))


def test_synthetic_generation_is_deterministic_and_cached(tmp_path):
    first = generate_synthetic(tmp_path / "a", **SMALL)
    second = generate_synthetic(tmp_path / "b", **SMALL)
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert len(files) == 2 * (10 + 6) + 4
    assert all((first / f).read_bytes() == (second / f).read_bytes() for f in files)
    other = generate_synthetic(tmp_path / "c", **{**SMALL, "seed": 2})
    assert (other / files[-1]).read_bytes() != (first / files[-1]).read_bytes()
    cached = ensure_synthetic(tmp_path / "cache", **SMALL)
    stamp = (cached / "manifest.json").stat().st_mtime_ns
    assert (
        ensure_synthetic(tmp_path / "cache", **SMALL) == cached
        and (cached / "manifest.json").stat().st_mtime_ns == stamp
    )
    assert json.loads((cached / "manifest.json").read_text())["params"] == SMALL
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".synthetic") and p.is_dir()]


def _ensure(cache):
    return str(ensure_synthetic(cache, **SMALL))


def test_two_processes_racing_generate_one_dataset(tmp_path):
    with multiprocessing.get_context("fork").Pool(2) as pool:
        roots = pool.map(_ensure, [tmp_path, tmp_path])
    assert roots[0] == roots[1]
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == [Path(roots[0]).name]


def test_evaluation_needs_no_train_split(tmp_path):
    """evaluate.py / validate / test on a folder holding only val: the train annotations are never read."""
    source = ensure_synthetic(tmp_path / "cache", **SMALL)
    root = tmp_path / "val_only"
    shutil.copytree(source / "val2017", root / "val2017")
    shutil.copytree(source / "annotations" / "panoptic_val2017", root / "annotations" / "panoptic_val2017")
    for name in ("panoptic_val2017.json", "instances_val2017.json"):
        shutil.copy(source / "annotations" / name, root / "annotations" / name)
    cfg = OmegaConf.load(ROOT / "configs/data/coco_panoptic.yaml")  # data.train set, its files absent
    cfg.root, cfg.num_workers = str(root), 0
    cfg.eval_transform = {"recipe": "resize", "short": 64, "max_size": 100}
    dm = instantiate(cfg)
    assert dm.metadata.num_classes == 7
    for stage in ("validate", "test"):
        dm.setup(stage)
    assert dm.ground_truth("test").panoptic_json.endswith("panoptic_val2017.json")
    assert sorted(i for b in dm.test_dataloader() for i in b["image_ids"]) == list(range(11, 17))
    assert "train" not in dm.datasets
    with pytest.raises(DataError, match=r"panoptic_train2017\.json: annotation file not found"):
        dm.setup("fit")  # training does need it


class FakeTrainer:
    def __init__(self, world_size, rank):
        self.world_size, self.global_rank, self.current_epoch = world_size, rank, 0


def test_ddp_evaluation_sees_every_image_exactly_once(tmp_path):
    seen = []
    for rank in range(4):  # 6 val images over 4 ranks: a padding sampler would repeat 2
        dm = instantiate(synthetic_config(tmp_path, eval_batch_size=1))
        dm.trainer = FakeTrainer(4, rank)
        loader = dm.val_dataloader()
        assert isinstance(loader.sampler, UnrepeatedDistributedSampler)
        assert isinstance(loader.sampler, DistributedSampler)  # so Lightning leaves it in place
        seen += [i for b in loader for i in b["image_ids"]]
    assert sorted(seen) == list(range(11, 17))
    single = instantiate(synthetic_config(tmp_path))
    assert not isinstance(single.val_dataloader().sampler, DistributedSampler)


def test_issue_report_is_flushed_once_per_epoch(tmp_path):
    dm = instantiate(synthetic_config(tmp_path))
    dm.trainer = FakeTrainer(1, 0)
    dm.on_before_batch_transfer({"data_issues": [("skipped image", "a.jpg")]}, 0)
    dm.on_before_batch_transfer({"data_issues": [("skipped image", "b.jpg")]}, 0)
    assert dm.issue_report.counts["skipped image"] == 2
    dm.trainer.current_epoch = 1
    dm.on_before_batch_transfer({"data_issues": []}, 0)  # first batch of epoch 1 reports epoch 0
    assert len(dm.issue_report) == 0


@pytest.mark.parametrize("name", ["synthetic", "coco_panoptic", "coco_instance", "ade20k", "custom"])
def test_every_data_config_builds_a_datamodule(name):
    cfg = OmegaConf.load(ROOT / f"configs/data/{name}.yaml")
    if name == "custom":
        cfg.train.img_dir, cfg.train.ann_file = "/data/images", "/data/train.json"
    dm = instantiate(cfg)
    assert isinstance(dm, DataModule) and dm.task in ("panoptic", "instance", "semantic")
    assert "root" in cfg
    if name == "ade20k":
        assert len(dm.class_names) == 150 and dm.class_names[:3] == ["wall", "building", "sky"]
    if name == "custom":
        assert dm.splits["val"] == {"img_dir": "/data/images", "ann_file": "/data/train.json"}
