"""The training sampler of an exactly resumable run: epoch-seeded, DDP-sharded, resumable mid-epoch.

- `ResumableSampler` (a `DistributedSampler`, so Lightning keeps it under DDP instead of injecting its own):
  the order of epoch e is DistributedSampler's (`randperm` of a generator seeded `seed + e`, padded by
  repeating its first indices to a multiple of the world size, rank r taking positions r, r + W, ...), a
  function of (seed, epoch, world size) only, never of the global random state. `state_dict(consumed)` /
  `load_state_dict` hold (seed, epoch, samples of the epoch consumed): the next iteration after a load skips
  exactly those. The caller passes what the *training loop* consumed (the DataModule takes it from the fit
  loop's progress); the sampler itself only knows what the DataLoader pulled, which is ahead of the loop by
  the batches prefetched by workers.
- Each index comes with a per-sample seed derived from (seed, epoch, index); `SeededDataset` loads the
  sample with torch's CPU, numpy's and Python's global generators seeded from it and restores them after, so
  an augmentation draws the same numbers in any run, in any worker or in the main process, before or after a
  resume, and data loading never moves the main process's random streams (dropout, point sampling).
- `WorkerInit`: the worker_init_fn seeding each worker's global generators from (seed, epoch at the worker's
  start, rank, worker id), for whatever a worker draws outside a sample.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler


def derive_seed(*values: int) -> int:
    """A 63-bit seed from non-negative integers (numpy's SeedSequence: well mixed, no collisions of nearby
    tuples)."""
    words = np.random.SeedSequence([int(v) % 2**64 for v in values]).generate_state(2, np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


def seed_globals(seed: int) -> None:
    """Seed torch's CPU generator (not CUDA's), numpy's legacy global generator and Python's from `seed`."""
    torch.default_generator.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


class SeededDataset(Dataset):
    """`dataset` indexed by (index, seed) pairs: the sample is loaded under global generators seeded from
    `seed`, which are restored afterwards (the draws of the caller are untouched). A plain index (a sampler
    Lightning put in, e.g. for `overfit_batches`) loads unseeded."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int] | int) -> Any:
        if not isinstance(key, tuple):
            return self.dataset[key]
        index, seed = key
        states = torch.get_rng_state(), np.random.get_state(), random.getstate()
        try:
            seed_globals(seed)
            return self.dataset[index]
        finally:
            torch.set_rng_state(states[0])
            np.random.set_state(states[1])
            random.setstate(states[2])

    def __getattr__(self, name: str) -> Any:  # metadata, ground truth, ... of the wrapped dataset
        if name == "dataset":  # not set yet (unpickling)
            raise AttributeError(name)
        return getattr(self.dataset, name)


class ResumableSampler(DistributedSampler):
    """DistributedSampler's epoch order and sharding, yielding (index, sample seed) pairs, resumable mid-epoch.

    `len()` is always the full per-rank epoch (what Lightning counts batches against); after
    `load_state_dict` the next iteration yields only the rest of the epoch, later ones the whole epoch.
    `set_epoch` to another epoch drops a pending skip.

    `current_epoch`, when given, is where `set_epoch` takes the epoch from, its argument ignored: the
    DataModule passes `trainer.current_epoch`, because the argument Lightning 2.6 passes (the fit loop's
    `epoch_progress.current.processed`) runs one ahead of the epoch being trained after a resume from a
    checkpoint written at `on_train_epoch_end` (the restarted loop counts the finished epoch as processed
    twice), which would skip an epoch's order.
    """

    def __init__(
        self,
        dataset: Any,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        current_epoch: Callable[[], int] | None = None,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self.current_epoch = current_epoch
        self.start = 0  # samples of this rank in `self.epoch` to skip at the next iteration
        self.handed_out = 0  # samples of the current iteration handed to the DataLoader (prefetching included)

    def set_epoch(self, epoch: int) -> None:
        if self.current_epoch is not None:
            epoch = int(self.current_epoch())
        if epoch != self.epoch:
            self.start = 0
        super().set_epoch(epoch)

    def indices(self, epoch: int | None = None) -> list[int]:
        """This rank's indices of `epoch` (default: the current one), DistributedSampler's exactly."""
        current = self.epoch
        self.epoch = current if epoch is None else epoch
        try:
            return list(super().__iter__())
        finally:
            self.epoch = current

    def sample_seed(self, epoch: int, index: int) -> int:
        """The seed that sample `index` is loaded with in `epoch`."""
        return derive_seed(self.seed, epoch, index)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        # Epoch, order and skip are fixed when the iteration begins, not read again at each `next`.
        epoch, start = self.epoch, self.start
        indices = self.indices()[start:]
        self.start, self.handed_out = 0, start
        return self._iterate(epoch, indices)

    def _iterate(self, epoch: int, indices: list[int]) -> Iterator[tuple[int, int]]:
        for index in indices:
            self.handed_out += 1
            yield index, self.sample_seed(epoch, index)

    def state_dict(self, consumed: int | None = None, epoch: int | None = None) -> dict[str, int]:
        """The position to resume at: `consumed` samples of this rank in `epoch` (defaults: what the current
        iteration handed out, ahead of a training loop by the batches workers prefetched; `self.epoch`).
        Stored world-size independent: `consumed` is the number of positions of the epoch's padded order that
        all ranks together consumed. A finished epoch is stored as the start of the next one."""
        consumed = self.handed_out if consumed is None else consumed
        epoch = self.epoch if epoch is None else epoch
        if consumed >= self.num_samples:
            epoch, consumed = epoch + 1, 0
        return {
            "seed": int(self.seed),
            "epoch": int(epoch),
            "consumed": int(consumed) * self.num_replicas,
            "num_replicas": self.num_replicas,
            "dataset_size": len(self.dataset),
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue where `state` left off: its seed and epoch; the next iteration skips what was consumed.
        Exact with the same data set and world size (else warned, and the skip is approximate)."""
        if int(state["seed"]) != self.seed:
            warnings.warn(
                f"resuming the training order of seed {state['seed']} (the checkpoint's), not {self.seed}",
                stacklevel=2,
            )
        if int(state["dataset_size"]) != len(self.dataset):
            warnings.warn(
                f"the training set has {len(self.dataset)} samples, the checkpoint's run had"
                f" {state['dataset_size']}: the resumed epoch's order and skipped samples differ from that run's",
                stacklevel=2,
            )
        if int(state["num_replicas"]) != self.num_replicas:
            warnings.warn(
                f"resuming a run of world size {state['num_replicas']} with {self.num_replicas}: the order"
                f" differs from the interrupted run's (its first {state['consumed']} positions are skipped)",
                stacklevel=2,
            )
        self.seed, self.epoch = int(state["seed"]), int(state["epoch"])
        self.start = min(int(state["consumed"]) // self.num_replicas, self.num_samples)
        if self.start >= self.num_samples:
            self.epoch, self.start = self.epoch + 1, 0


class WorkerInit:
    """worker_init_fn: seeds a worker's global generators from (seed, epoch, rank, worker id), the epoch being
    the sampler's when the worker starts (its copy is taken then, by fork or by pickling)."""

    def __init__(self, sampler: ResumableSampler) -> None:
        self.sampler = sampler

    def __getstate__(self) -> dict[str, int]:  # what a spawned worker receives: no sampler, no dataset
        return {"seed": self.sampler.seed, "epoch": self.sampler.epoch, "rank": self.sampler.rank}

    def __setstate__(self, state: dict[str, int]) -> None:
        self.sampler = None
        self.__dict__.update(state)

    def __call__(self, worker_id: int) -> None:
        sampler = self.sampler
        seed, epoch, rank = (
            (sampler.seed, sampler.epoch, sampler.rank) if sampler is not None else (self.seed, self.epoch, self.rank)
        )
        seed_globals(derive_seed(seed, epoch, rank, worker_id))


class ResumableDataLoader(DataLoader):
    """The training DataLoader. Its position is its `ResumableSampler`'s, saved by `DataModule.state_dict` from
    the fit loop's progress and set before the loader's first `iter()`. The (empty) `state_dict` /
    `load_state_dict` here only tell Lightning that the loader resumes mid-epoch (else it warns that it does
    not). Lightning's own loader states can come too late: with `max_epochs` set, `configure_optimizers`
    (`estimated_stepping_batches`) builds and iterates the loader before the loop states are restored, while
    the DataModule's state is restored before any loader is built."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass
