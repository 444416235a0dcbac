"""The resumable training sampler (densepred/data/sampler.py) and the DataModule's resume state: the order is
DistributedSampler's and a function of (seed, epoch) only, a resume skips exactly what was consumed (per
rank under DDP), samples load under their own seeds without moving the caller's random streams. The whole
run is in tests/test_resume.py."""

from __future__ import annotations

import pickle
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.utils.data.distributed import DistributedSampler

from densepred.data.sampler import ResumableSampler, SeededDataset, WorkerInit
from densepred.engine.build import build_datamodule


def indices(sampler) -> list[int]:
    return [index for index, _ in sampler]


@pytest.mark.parametrize(("size", "world_size"), [(8, 1), (7, 1), (7, 2), (7, 3), (2, 3)])
def test_order_is_distributed_samplers_and_depends_only_on_seed_and_epoch(size, world_size):
    dataset = list(range(size))
    for rank in range(world_size):
        for epoch in range(3):
            reference = DistributedSampler(dataset, num_replicas=world_size, rank=rank, seed=5)
            reference.set_epoch(epoch)
            sampler = ResumableSampler(dataset, world_size, rank, seed=5)
            sampler.set_epoch(epoch)
            torch.manual_seed(epoch)  # the global generator plays no part
            assert indices(sampler) == list(reference)
            assert len(sampler) == len(reference)
    epochs = [ResumableSampler(list(range(50)), seed=5).indices(epoch) for epoch in range(3)]
    assert epochs[0] != epochs[1] != epochs[2]


@pytest.mark.parametrize("world_size", [1, 2])
def test_resume_skips_exactly_what_was_consumed(world_size):
    dataset = list(range(11))
    samplers = [ResumableSampler(dataset, world_size, rank, seed=3) for rank in range(world_size)]
    for sampler in samplers:
        sampler.set_epoch(2)
    full = [list(sampler) for sampler in samplers]  # (index, seed) pairs of epoch 2, per rank
    # Rank 0's state (the one a checkpoint keeps) after 2 samples of each rank, whatever was prefetched.
    state = samplers[0].state_dict(consumed=2)
    assert state == {"seed": 3, "epoch": 2, "consumed": 2 * world_size, "num_replicas": world_size, "dataset_size": 11}
    for rank in range(world_size):
        resumed = ResumableSampler(dataset, world_size, rank, seed=3)
        resumed.load_state_dict(state)
        resumed.set_epoch(2)  # Lightning sets the same epoch again: the skip stays
        assert len(resumed) == len(full[rank])  # what Lightning counts the epoch's batches against
        assert list(resumed) == full[rank][2:]
        assert list(resumed) == full[rank]  # the next iteration of the epoch is whole
        resumed.set_epoch(3)
        assert indices(resumed) == resumed.indices(3)
    # Another epoch drops a pending skip.
    resumed = ResumableSampler(dataset, world_size, 0, seed=3)
    resumed.load_state_dict(state)
    resumed.set_epoch(3)
    assert indices(resumed) == resumed.indices(3)


def test_a_finished_epoch_resumes_at_the_next_and_a_changed_world_size_warns():
    sampler = ResumableSampler(list(range(6)), 2, 0, seed=0)
    sampler.set_epoch(4)
    assert sampler.state_dict(consumed=3)["epoch"] == 5 and sampler.state_dict(consumed=3)["consumed"] == 0
    it = iter(sampler)
    next(it), next(it)
    assert sampler.state_dict()["consumed"] == 4  # default: what the iterator handed out (2 of this rank)
    state = sampler.state_dict(consumed=1)
    other = ResumableSampler(list(range(6)), 3, 0, seed=0)
    with pytest.warns(UserWarning, match="world size 2"):
        other.load_state_dict(state)
    assert (other.epoch, other.start) == (4, 0)  # 2 positions of the order, over 3 ranks: none whole


def test_samples_load_under_their_own_seed_and_leave_the_global_streams_alone():
    class Draws:
        def __len__(self) -> int:
            return 4

        def __getitem__(self, index: int) -> tuple:
            return index, float(torch.rand(())), float(np.random.rand()), random.random()

    dataset = SeededDataset(Draws())
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    expected = float(torch.rand(())), float(np.random.rand()), random.random()
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    first = dataset[(2, 123)]
    assert (float(torch.rand(())), float(np.random.rand()), random.random()) == expected
    assert dataset[(2, 123)] == first and dataset[(2, 124)] != first
    assert dataset[1][0] == 1 and len(dataset) == 4  # a plain index loads unseeded

    sampler = ResumableSampler(list(range(8)), 2, 1, seed=7)
    sampler.set_epoch(3)
    assert [seed for _, seed in sampler] == [sampler.sample_seed(3, i) for i in sampler.indices(3)]
    assert sampler.sample_seed(3, 1) != sampler.sample_seed(4, 1)


def test_worker_init_seeds_from_seed_epoch_rank_and_worker():
    def worker_draws(init: WorkerInit, worker_id: int) -> float:
        init(worker_id)
        return float(torch.rand(()))

    sampler = ResumableSampler(list(range(1000)), 2, 1, seed=7)
    sampler.set_epoch(2)
    init = WorkerInit(sampler)
    copy = pickle.loads(pickle.dumps(init))  # what a spawned worker gets: no sampler, no data set
    assert copy.sampler is None and len(pickle.dumps(init)) < 200
    assert worker_draws(init, 1) == worker_draws(copy, 1) != worker_draws(init, 0)
    sampler.set_epoch(3)
    assert worker_draws(WorkerInit(sampler), 1) != worker_draws(copy, 1)


def fake_trainer(world_size: int, rank: int, epoch: int, batches: int, num_batches: int) -> SimpleNamespace:
    """What DataModule.state_dict reads of a Trainer: `batches` of epoch `epoch` processed."""
    progress = SimpleNamespace(
        epoch_progress=SimpleNamespace(current=SimpleNamespace(started=epoch + 1)),
        epoch_loop=SimpleNamespace(batch_progress=SimpleNamespace(current=SimpleNamespace(processed=batches))),
    )
    return SimpleNamespace(
        world_size=world_size,
        global_rank=rank,
        current_epoch=epoch,
        num_training_batches=num_batches,
        fit_loop=progress,
        state=SimpleNamespace(fn="fit"),
    )


def batches(loader, limit: int | None = None) -> list[tuple[list[int], float]]:
    """(image ids, pixel sum) of the loader's batches: the order and the augmentations."""
    out = []
    for batch in loader:
        out.append((list(batch["image_ids"]), float(batch["images"].double().sum())))
        if limit is not None and len(out) == limit:
            break
    return out


@pytest.mark.parametrize("world_size", [1, 2])
def test_datamodule_resumes_its_loaders_where_the_loop_stood(tmp_path, tiny, synthetic_root, world_size):
    """4 images at batch 1: per rank 4 / world_size batches an epoch. A checkpoint after the first batch of
    epoch 1 (workers may have prefetched more): rebuilt data modules continue each rank with its remaining
    batches, with the same augmentations."""
    cfg = tiny.compose_train([*tiny.data_overrides(synthetic_root), "data.batch_size=1"], tmp_path)
    per_rank = 4 // world_size
    straight, resumed = [], []
    for rank in range(world_size):
        datamodule = build_datamodule(cfg)
        datamodule.trainer = fake_trainer(world_size, rank, epoch=1, batches=1, num_batches=per_rank)
        loader = datamodule.train_dataloader()
        loader.sampler.set_epoch(1)
        straight.append(batches(loader))
        state = datamodule.state_dict()
        assert state["train_sampler"]["epoch"] == 1 and state["train_sampler"]["consumed"] == world_size

        again = build_datamodule(cfg)
        again.trainer = fake_trainer(world_size, rank, epoch=0, batches=0, num_batches=per_rank)
        again.load_state_dict(state)  # Lightning: before the loader is built
        again.trainer.current_epoch = 1
        resumed.append(batches(again.train_dataloader()))
        assert resumed[rank] == straight[rank][1:]
    assert sorted(i for rank in straight for ids, _ in rank for i in ids) == [1, 2, 3, 4]  # each image once

    # The end of an epoch is stored as the start of the next.
    datamodule.trainer = fake_trainer(world_size, 0, epoch=1, batches=per_rank, num_batches=per_rank)
    assert datamodule.state_dict()["train_sampler"]["epoch"] == 2
    assert datamodule.state_dict()["train_sampler"]["consumed"] == 0


def test_batches_and_augmentations_do_not_depend_on_the_workers(tmp_path, tiny, synthetic_root):
    """The same batches, pixel for pixel, loaded in the main process and by 2 workers, in two epochs."""
    runs = []
    for workers in (0, 2):
        overrides = [*tiny.data_overrides(synthetic_root), f"data.num_workers={workers}"]
        loader = build_datamodule(tiny.compose_train(overrides, tmp_path)).train_dataloader()
        epochs = []
        for epoch in (0, 1):
            loader.sampler.set_epoch(epoch)
            epochs.append(batches(loader))
        runs.append(epochs)
    assert runs[0] == runs[1]
    assert runs[0][0] != runs[0][1]
