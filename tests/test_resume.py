"""Resume: a run interrupted and resumed from last.ckpt (same overrides) ends with exactly the weights,
optimizer state, schedule position, data order, augmentations and metrics of the same run left
uninterrupted (CPU, deterministic algorithms): interrupted after its first epoch with the data loaded in the
main process, and interrupted mid-epoch (last.ckpt written by a validation inside the epoch) with two
workers prefetching ahead of the training loop."""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning
import pytest
import torch
from lightning import Callback

from densepred.engine.build import build_datamodule, build_module, build_trainer

pytestmark = pytest.mark.slow


class Crash(RuntimeError):
    pass


class RecordBatches(Callback):
    """Records the image ids and a pixel checksum (the augmentations) of every training batch, and the batch
    index Lightning gives it; optionally crashes before step `crash_at_step`."""

    def __init__(self, crash_at_step: int | None = None) -> None:
        self.crash_at_step = crash_at_step
        self.image_ids: list[list[int]] = []
        self.pixels: list[tuple[list[list[int]], float]] = []
        self.batch_indices: list[int] = []
        self.datamodule = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.datamodule = trainer.datamodule
        if trainer.global_step == self.crash_at_step:
            raise Crash(f"simulated crash before step {self.crash_at_step}")
        self.image_ids.append(list(batch["image_ids"]))
        self.pixels.append(([list(size) for size in batch["image_sizes"]], float(batch["images"].double().sum())))
        self.batch_indices.append(batch_idx)


def fit(
    tiny,
    output_dir: Path,
    data_root: Path,
    recorder: RecordBatches,
    ckpt_path: Path | None = None,
    max_steps: int = 4,
    extra: tuple[str, ...] = (),
) -> None:
    """train.py's fit (poly schedule over `max_steps`, point-sampled losses, dropout, LSJ augmentation);
    by default 2 epochs of 2 steps."""
    overrides = [
        *tiny.train_overrides(data_root, max_steps=max_steps),
        "trainer.deterministic=true",
        "head.dropout=0.1",
        "logger=none",
        "validate_before_fit=false",
        "test_after_fit=false",
        *extra,
    ]
    cfg = tiny.compose_train(overrides, output_dir)
    lightning.seed_everything(cfg.seed, workers=True)
    datamodule = build_datamodule(cfg)
    module = build_module(cfg, datamodule.metadata)
    trainer = build_trainer(cfg)
    trainer.callbacks.append(recorder)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)


def test_resumed_run_equals_the_uninterrupted_one(tmp_path, tiny, synthetic_root):
    data_root = synthetic_root  # the tiny data set, shared (read only) with the other end-to-end tests
    straight = RecordBatches()
    fit(tiny, tmp_path / "straight", data_root, straight)

    crashed = RecordBatches(crash_at_step=2)
    with pytest.raises(Crash):
        fit(tiny, tmp_path / "resumed", data_root, crashed)
    interrupted = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert interrupted["global_step"] == 2
    # Written at the end of epoch 0 (on_train_epoch_end): the order resumes at the start of epoch 1, although
    # Lightning's set_epoch argument runs one ahead on this restart.
    state = interrupted["DataModule"]["train_sampler"]
    assert state == {"seed": 0, "epoch": 1, "consumed": 0, "num_replicas": 1, "dataset_size": 4}
    resumed = RecordBatches()
    fit(tiny, tmp_path / "resumed", data_root, resumed, ckpt_path=tmp_path / "resumed" / "checkpoints" / "last.ckpt")

    # The same batches in the same order: epoch 1 before the crash, epoch 2 after the resume.
    assert len(straight.image_ids) == 4
    assert crashed.image_ids == straight.image_ids[:2]
    assert resumed.image_ids == straight.image_ids[2:]
    assert crashed.pixels + resumed.pixels == straight.pixels  # the same augmentations

    a = torch.load(tmp_path / "straight" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    b = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert a["global_step"] == b["global_step"] == 4 and a["epoch"] == b["epoch"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert not all(torch.equal(a["state_dict"][k], v) for k, v in interrupted["state_dict"].items())

    # Optimizer moments and step counts, and the schedule position (per-iteration poly over 4 steps).
    (opt_a,), (opt_b,) = a["optimizer_states"], b["optimizer_states"]
    assert opt_a["state"].keys() == opt_b["state"].keys()
    for index, state in opt_a["state"].items():
        assert all(torch.equal(state[name], opt_b["state"][index][name]) for name in state)
    assert [g["lr"] for g in opt_a["param_groups"]] == [g["lr"] for g in opt_b["param_groups"]]
    (sched_a,), (sched_b,) = a["lr_schedulers"], b["lr_schedulers"]
    assert sched_a["last_epoch"] == sched_b["last_epoch"] == 4
    assert sched_a["_last_lr"] == sched_b["_last_lr"]
    assert sched_a["_last_lr"][0] == 0.0  # poly reaches zero at the last step: the schedule spans all 4 steps

    # The validation after the resumed epoch scores exactly as the uninterrupted one.
    metrics = "eval_val/metrics_step0000004.json"
    assert tiny.read_metrics(tmp_path / "straight" / metrics) == tiny.read_metrics(tmp_path / "resumed" / metrics)


def assert_same_training_state(a: dict, b: dict) -> None:
    """Weights, optimizer moments and step counts, learning rates and schedule position exactly equal."""
    assert a["global_step"] == b["global_step"] and a["epoch"] == b["epoch"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    (opt_a,), (opt_b,) = a["optimizer_states"], b["optimizer_states"]
    assert opt_a["state"].keys() == opt_b["state"].keys()
    for index, state in opt_a["state"].items():
        assert all(torch.equal(state[name], opt_b["state"][index][name]) for name in state)
    assert [g["lr"] for g in opt_a["param_groups"]] == [g["lr"] for g in opt_b["param_groups"]]
    assert a["lr_schedulers"] == b["lr_schedulers"]


def test_resumed_mid_epoch_with_workers_equals_the_uninterrupted_one(tmp_path, tiny, synthetic_root):
    """6 images at batch 2 (3 steps an epoch), 6 steps validated every 2 steps across epochs (the COCO / ADE
    recipes' `val_check_interval` in an endless epoch): last.ckpt of step 4 lies inside epoch 1, after 1 of
    its 3 batches, while 2 workers (prefetch 2 batches each) have already pulled the whole epoch."""
    extra = (
        "data.synthetic.num_train=6",
        "data.num_workers=2",
        "trainer.check_val_every_n_epoch=null",
        "trainer.val_check_interval=2",
    )
    straight = RecordBatches()
    fit(tiny, tmp_path / "straight", synthetic_root, straight, max_steps=6, extra=extra)

    crashed = RecordBatches(crash_at_step=5)
    with pytest.raises(Crash):
        fit(tiny, tmp_path / "resumed", synthetic_root, crashed, max_steps=6, extra=extra)
    last = tmp_path / "resumed" / "checkpoints" / "last.ckpt"
    interrupted = torch.load(last, map_location="cpu", weights_only=True)
    assert interrupted["global_step"] == 4
    # Where the training loop stood, not where the workers' prefetching did.
    state = interrupted["DataModule"]["train_sampler"]
    assert state == {"seed": 0, "epoch": 1, "consumed": 2, "num_replicas": 1, "dataset_size": 6}
    assert crashed.datamodule.train_sampler.handed_out > 2
    resumed = RecordBatches()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(tiny, tmp_path / "resumed", synthetic_root, resumed, ckpt_path=last, max_steps=6, extra=extra)
    assert not [w for w in caught if "not resumable" in str(w.message)]  # Lightning's mid-epoch warning

    assert len(straight.image_ids) == 6 and sorted(sum(straight.image_ids[3:], [])) == sorted(
        sum(straight.image_ids[:3], [])
    )  # two full epochs, every image once per epoch
    assert crashed.image_ids == straight.image_ids[:5]
    assert resumed.image_ids == straight.image_ids[4:]  # the batch after the one of step 4: epoch 1, batch 1
    assert resumed.pixels == straight.pixels[4:]
    assert resumed.batch_indices == straight.batch_indices[4:] == [1, 2]

    a = torch.load(tmp_path / "straight" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    b = torch.load(last, map_location="cpu", weights_only=True)
    assert a["global_step"] == 6
    assert_same_training_state(a, b)
    metrics = "eval_val/metrics_step0000006.json"
    assert tiny.read_metrics(tmp_path / "straight" / metrics) == tiny.read_metrics(tmp_path / "resumed" / metrics)


def test_ddp_resumed_mid_epoch_equals_the_uninterrupted_one(tmp_path, tiny, synthetic_root):
    """Two gloo processes through train.py: 6 images at batch 1 per rank (3 steps an epoch), validated every
    2 steps; a run stopped by max_steps=2 (last.ckpt inside epoch 0) resumed to step 4 equals the run trained
    to step 4 straight: each rank skips its own consumed shard and continues its own random streams. The
    schedule is constant, so max_steps only stops the run."""
    overrides = [
        *tiny.data_overrides(synthetic_root),
        *tiny.model_overrides(),
        "data.synthetic.num_train=6",
        "data.batch_size=1",
        "data.num_workers=1",
        "head.dropout=0.1",
        "scheduler=multistep",
        "scheduler.milestones=[3]",
        "scheduler.warmup_steps=0",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.strategy=ddp",
        "trainer.deterministic=true",
        "trainer.check_val_every_n_epoch=null",
        "trainer.val_check_interval=2",
        "validate_before_fit=false",
        "test_after_fit=false",
        "logger=none",
    ]

    def train(run: str, max_steps: int, *extra: str) -> dict:
        result = tiny.run_script(
            ["train.py", *overrides, f"trainer.max_steps={max_steps}", *extra, f"hydra.run.dir={tmp_path / run}"],
            timeout=300,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        return torch.load(tmp_path / run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)

    straight = train("straight", 4)
    stopped = train("resumed", 2)
    assert stopped["global_step"] == 2 and len(stopped["rng_states_per_rank"]) == 2
    state = stopped["DataModule"]["train_sampler"]
    assert state == {"seed": 0, "epoch": 0, "consumed": 4, "num_replicas": 2, "dataset_size": 6}
    resumed = train("resumed", 4, f"ckpt_path={tmp_path / 'resumed' / 'checkpoints' / 'last.ckpt'}")

    assert straight["global_step"] == resumed["global_step"] == 4 and straight["epoch"] == resumed["epoch"]
    assert all(torch.equal(straight["state_dict"][k], v) for k, v in resumed["state_dict"].items())
    (opt_a,), (opt_b,) = straight["optimizer_states"], resumed["optimizer_states"]
    for index, values in opt_a["state"].items():
        assert all(torch.equal(values[name], opt_b["state"][index][name]) for name in values)
    assert [g["lr"] for g in opt_a["param_groups"]] == [g["lr"] for g in opt_b["param_groups"]]
    assert straight["DataModule"] == resumed["DataModule"]
