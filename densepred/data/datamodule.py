"""The LightningDataModule: datasets per split, transforms, loaders, DDP-exact evaluation, issue reports."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader

from .base import SegmentationDataset
from .build import build_dataset, read_metadata, resolve_split
from .collate import Collate
from .errors import DataError
from .metadata import DatasetMetadata, GroundTruth
from .reporting import IssueReport
from .sampler import ResumableDataLoader, ResumableSampler, SeededDataset, WorkerInit
from .synthetic import ensure_synthetic
from .transforms import build_transform, recipe_fixed_size


class DataModule(LightningDataModule):
    """Train / val / test loaders for task "panoptic", "instance", "semantic" or "detection" (boxes).

    Split settings (`train`, `val`, `test`; test defaults to val) hold paths relative to `root`
    (absolute paths are kept): img_dir, ann_file, panoptic_json, panoptic_root or sem_seg_dir, and options
    filter_empty, skip_bad_images, ignore_value, reduce_zero_label. With `synthetic` set (generator
    settings), the synthetic dataset is generated under `root` on first use and `root` becomes its folder.
    Transforms are {"recipe": "lsj" | "ade" | "resize", **sizes}.

    `metadata` works right after construction (it reads only the categories); `ground_truth(split)` declares
    what the evaluation of a split reads (the evaluators are built from it).

    Training draws from a `ResumableSampler` (densepred/data/sampler.py): the order of epoch e is
    DistributedSampler's for seed `seed` + e (each rank its shard under DDP), every sample is loaded under
    generators seeded from (seed, epoch, index), and `state_dict()` (saved in every checkpoint) records the
    samples the training loop consumed, so a run resumed from any checkpoint draws exactly the batches and
    augmentations of the uninterrupted run. `seed` None: the seed of `lightning.seed_everything`
    (PL_GLOBAL_SEED), else 0. Validation and test use a non-padding sampler under DDP, so every image is seen
    exactly once over all ranks (ranks may differ by one batch). No loader draws from the global generators.
    """

    def __init__(
        self,
        task: str = "panoptic",
        root: str = ".",
        train: Mapping[str, Any] | None = None,
        val: Mapping[str, Any] | None = None,
        test: Mapping[str, Any] | None = None,
        synthetic: Mapping[str, Any] | None = None,
        class_names: Sequence[str] | None = None,
        train_transform: Mapping[str, Any] | None = None,
        eval_transform: Mapping[str, Any] | None = None,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        size_divisibility: int = 32,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        self.task = task
        self.root, self.synthetic = root, dict(synthetic) if synthetic else None
        self.splits = {"train": train, "val": val, "test": test if test else val}
        self.class_names = list(class_names) if class_names else None
        self.train_transform = dict(train_transform or {"recipe": "lsj", "size": 1024, "scale": [0.1, 2.0]})
        self.eval_transform = dict(eval_transform or {"recipe": "resize", "short": 800, "max_size": 1333})
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.persistent_workers, self.size_divisibility = persistent_workers, size_divisibility
        self.datasets: dict[str, SegmentationDataset] = {}
        self.issue_report = IssueReport()
        self._data_root: Path | None = None
        self._metadata: DatasetMetadata | None = None
        self._report_epoch: int | None = None
        self.seed = seed
        self.train_sampler: ResumableSampler | None = None
        self._resume_state: dict[str, int] | None = None

    @property
    def data_root(self) -> Path:
        """The folder split paths are relative to (the generated synthetic folder with `synthetic` set)."""
        if self._data_root is None:
            root = Path(str(self.root)).expanduser()
            self._data_root = ensure_synthetic(root, **self.synthetic) if self.synthetic else root
        return self._data_root

    def _settings(self, split: str) -> dict[str, Any]:
        return resolve_split(split, self.splits[split], self.data_root)

    @property
    def metadata(self) -> DatasetMetadata:
        """Classes of the evaluation split (val, else test, else train); no index is built, and no other split
        is read, so evaluation needs no train annotations. Every split's dataset is checked against these
        classes when it is built (training's at `setup("fit")`, before the first step)."""
        if self._metadata is None:
            source = self._metadata_split
            self._metadata = read_metadata(self.task, source, self._settings(source), self.class_names)
        return self._metadata

    @property
    def _metadata_split(self) -> str:
        return next((split for split in ("val", "test", "train") if self.splits[split]), "train")

    def _dataset(self, split: str) -> SegmentationDataset:
        if split not in self.datasets:
            train = split == "train"
            recipe = self.train_transform if train else self.eval_transform
            transform = build_transform(**recipe)
            dataset = build_dataset(self.task, split, self._settings(split), transform, train, self.class_names)
            if not dataset.metadata.same_classes(self.metadata):
                raise DataError(
                    f"data.{split}: its categories differ from data.{self._metadata_split}'s;"
                    f" all splits must list the same classes"
                )
            self.datasets[split] = dataset
        return self.datasets[split]

    def setup(self, stage: str | None = None) -> None:
        splits = {"fit": ["train", "val"], "validate": ["val"], "test": ["test"], "predict": ["test"]}
        for split in splits.get(stage, ["train", "val", "test"]) if stage else ["train", "val", "test"]:
            if self.splits[split]:
                self._dataset(split)

    def ground_truth(self, split: str) -> GroundTruth:
        """What the evaluation of `split` ("val" or "test") reads: its classes and ground-truth files (and
        for label maps the per-pixel reader), as the split's reader declares them; builds its index once."""
        return self._dataset(split).ground_truth

    @property
    def train_dataset(self) -> SegmentationDataset:
        return self._dataset("train")

    @property
    def val_dataset(self) -> SegmentationDataset:
        return self._dataset("val")

    @property
    def test_dataset(self) -> SegmentationDataset:
        return self._dataset("test")

    @property
    def data_seed(self) -> int:
        """The seed of the training order and of the per-sample augmentation seeds."""
        return int(self.seed) if self.seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))

    def _loader(self, dataset: SegmentationDataset, train: bool) -> DataLoader:
        fixed_size = recipe_fixed_size(**self.train_transform) if train else None
        trainer = self.trainer
        world_size, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        sampler, worker_init_fn, source = None, None, dataset
        if train:
            current_epoch = (lambda: trainer.current_epoch) if trainer is not None else None
            sampler = ResumableSampler(dataset, world_size, rank, self.data_seed, current_epoch=current_epoch)
            sampler.set_epoch(0)  # a loader rebuilt in a later epoch (reload_dataloaders_every_n_epochs) starts there
            if self._resume_state is not None:  # set before the first `iter()`, which Lightning calls early
                sampler.load_state_dict(self._resume_state)
                self._resume_state = None
            self.train_sampler, worker_init_fn, source = sampler, WorkerInit(sampler), SeededDataset(dataset)
        elif world_size > 1:
            sampler = UnrepeatedDistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=False)
        return (ResumableDataLoader if train else DataLoader)(
            source,
            batch_size=self.batch_size if train else self.eval_batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=Collate(self.size_divisibility, fixed_size, self.metadata.ignore_index),
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.persistent_workers and self.num_workers > 0,
            worker_init_fn=worker_init_fn,
            # Workers' base seeds come from here, not from the global generator the model draws from.
            generator=torch.Generator().manual_seed(self.data_seed),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_dataset, train=False)

    def state_dict(self) -> dict[str, Any]:
        """Saved in every checkpoint: where the training order stands, counted from the fit loop's progress
        (the batches the training loop processed in the current epoch), not from what the DataLoader's
        workers pulled ahead. A checkpoint at the end of an epoch records the start of the next one."""
        sampler, trainer = self.train_sampler, self.trainer
        if sampler is None or trainer is None:
            return {}
        fit_loop = trainer.fit_loop
        # `batch_progress.current` counts the batches of the epoch whose batches began last: of the current
        # epoch once `started` passed it (it is reset then), else (hooks before the epoch's first batch) of the
        # previous epoch, which leaves nothing of the current one consumed.
        epoch = trainer.current_epoch
        started = fit_loop.epoch_progress.current.started > epoch
        batches = fit_loop.epoch_loop.batch_progress.current.processed if started else 0
        if batches >= trainer.num_training_batches:  # the epoch is over (also with limit_train_batches)
            epoch, batches = epoch + 1, 0
        consumed = min(batches * self.batch_size, sampler.num_samples)
        return {"train_sampler": sampler.state_dict(consumed=consumed, epoch=epoch)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume the training order (when fitting: not for `trainer.test(ckpt_path=...)`), applied to the
        train sampler when the train loader is built; Lightning calls this before."""
        if self.trainer is not None and self.trainer.state.fn != "fit":
            return
        self._resume_state = state_dict.get("train_sampler")
        if self._resume_state is not None and self.train_sampler is not None:
            self.train_sampler.load_state_dict(self._resume_state)
            self._resume_state = None

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Take the batch's data issues out, count them, and report the previous epoch's once it is over."""
        issues = batch.pop("data_issues", []) if isinstance(batch, dict) else []
        trainer = self.trainer
        epoch = trainer.current_epoch if trainer is not None else None
        if epoch != self._report_epoch:
            self.report_issues()
            self._report_epoch = epoch
        self.issue_report.extend(issues)
        return batch

    def report_issues(self) -> str | None:
        """Log the data issues counted since the last report (once) and return the text."""
        return self.issue_report.flush(f"data (epoch {self._report_epoch})")

    def teardown(self, stage: str | None = None) -> None:
        self.report_issues()
