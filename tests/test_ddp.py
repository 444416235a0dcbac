"""Two-process CPU DDP (gloo): train.py trains, validates and tests; the metrics rank 0 writes equal a
single-process evaluate.py of the same checkpoint on the same images, and logging them gives no warning."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.slow

# 5 validation images over 2 ranks, one per batch (as the COCO recipes: a batch pads its images to a common
# size, which changes the predictions): rank 0 scores 3 images, rank 1 2. A zero object-mask threshold keeps
# the barely trained model's low-confidence segments, so PQ is not 0.
SHARED = ["data.synthetic.num_val=5", "data.eval_batch_size=1", "postprocess.object_mask_threshold=0.0"]
# 10 steps at lr 1e-2 (one step per epoch: 4 images, 2 per rank; max_epochs is 10), validated once at the end.
TRAIN = ["optimizer.lr=1e-2", "trainer.check_val_every_n_epoch=10"]


def test_ddp_metrics_equal_a_single_process_evaluation(tmp_path, tiny):
    # Its own data folder: 5 validation images, not the shared tiny data set of `synthetic_root`.
    data_root, run = tmp_path / "data", tmp_path / "ddp"
    result = tiny.run_script(
        [
            "-W",  # warnings shown (run_script ignores them): none may ask for sync_dist on the gathered metrics
            "default",
            "train.py",
            *tiny.train_overrides(data_root, max_steps=10),
            *SHARED,
            *TRAIN,
            "trainer.devices=2",
            "trainer.strategy=ddp",
            "validate_before_fit=false",
            "logger=none",
            f"hydra.run.dir={run}",
        ],
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sync_dist=True" not in result.stderr + result.stdout
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 10

    result = tiny.run_script(
        [
            "evaluate.py",
            f"checkpoint={run / 'checkpoints' / 'last.ckpt'}",
            *tiny.data_overrides(data_root),
            *SHARED,
            "trainer.accelerator=cpu",
            f"hydra.run.dir={tmp_path / 'single'}",
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    single = tiny.read_metrics(tmp_path / "single" / "eval_test" / "metrics_step0000010.json")  # the ckpt's step
    assert single["PQ"] > 0 and single["mIoU"] > 0 and single["segm/AP"] is not None

    validated = tiny.read_metrics(run / "eval_val" / "metrics_step0000010.json")  # rank 0, during fit
    tested = tiny.read_metrics(run / "eval_test" / "metrics_step0000010.json")  # rank 0, trainer.test of the best
    assert validated == single
    assert tested == single
