"""End-to-end RT-DETR on the synthetic data (data.task=detection): train.py on a native and a timm backbone
trains (the denoising queries too), evaluates COCO box AP and exports a detection model."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow

# A narrow RT-DETR: 32 channels, 6 queries, 2 decoder layers, 8 denoising queries.
HEAD = [
    "head=rtdetr",
    "neck.hidden_dim=32",
    "neck.num_heads=4",
    "neck.dim_feedforward=64",
    "head.hidden_dim=32",
    "head.num_queries=6",
    "head.num_heads=4",
    "head.num_layers=2",
    "head.dim_feedforward=64",
    "head.num_denoising=8",
]


@pytest.mark.parametrize("backbone", ["resnet18", "timm_resnet18"])
def test_rtdetr_trains_evaluates_and_exports(tmp_path, tiny, synthetic_root, backbone):
    cfg = tiny.compose_train(tiny.detection_overrides(synthetic_root, HEAD, backbone), tmp_path)
    assert cfg.monitor == "val/bbox/AP" and cfg.criterion.class_loss == "vfl"
    _, rows, moved = tiny.train_detection(cfg, tmp_path)
    assert any(r.get("train/loss_vfl") for r in rows)
    for part in ("backbone.", "neck.aifi.", "head.layers.", "head.enc_score_head.", "head.denoising_class_embed."):
        assert any(k.startswith(part) for k in moved), part  # the denoising queries trained too
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["task"] == "detection" and config["model"]["head"]["_target_"] == "densepred.heads.rtdetr.RTDetrHead"
