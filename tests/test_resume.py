"""Resume: a run interrupted after its first epoch and resumed from last.ckpt ends with exactly the weights,
optimizer state, schedule position, data order and metrics of the same run left uninterrupted (CPU,
deterministic algorithms, data loaded in the main process)."""

from __future__ import annotations

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
    """Records the image ids of every training batch; optionally crashes before step `crash_at_step`."""

    def __init__(self, crash_at_step: int | None = None) -> None:
        self.crash_at_step = crash_at_step
        self.image_ids: list[list[int]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.crash_at_step:
            raise Crash(f"simulated crash before step {self.crash_at_step}")
        self.image_ids.append(list(batch["image_ids"]))


def fit(tiny, output_dir: Path, data_root: Path, recorder: RecordBatches, ckpt_path: Path | None = None) -> None:
    """train.py's fit with 2 epochs of 2 steps (poly schedule over 4 steps, point-sampled losses, dropout)."""
    overrides = [
        *tiny.train_overrides(data_root, max_steps=4),
        "trainer.deterministic=true",
        "head.dropout=0.1",
        "logger=none",
        "validate_before_fit=false",
        "test_after_fit=false",
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
    resumed = RecordBatches()
    fit(tiny, tmp_path / "resumed", data_root, resumed, ckpt_path=tmp_path / "resumed" / "checkpoints" / "last.ckpt")

    # The same batches in the same order: epoch 1 before the crash, epoch 2 after the resume.
    assert len(straight.image_ids) == 4
    assert crashed.image_ids == straight.image_ids[:2]
    assert resumed.image_ids == straight.image_ids[2:]

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
