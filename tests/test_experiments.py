"""Experiment presets compose, build their data module and full-size model (not run), and carry the published
Mask2Former recipes; `head=` brings its neck and criterion; a Hydra multirun sweep trains one run per value."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from hydra.utils import instantiate
from omegaconf import OmegaConf

from densepred.data import DataModule
from densepred.engine.build import build_module
from densepred.engine.optim import build_adamw
from densepred.engine.schedules import build_scheduler

ROOT = Path(__file__).resolve().parents[1]
# The Mask2Former presets; the detection presets (coco_detection_*) and the EoMT one (*_eomt_*) are checked by
# their models' tests (tests/test_rtdetr.py, tests/test_eomt.py, ...).
EXPERIMENTS = sorted(
    p.stem
    for p in (ROOT / "configs" / "experiment").glob("*.yaml")
    if not p.stem.startswith("coco_detection_") and "_eomt_" not in p.stem
)

LSJ_1024 = {"recipe": "lsj", "size": 1024, "scale": [0.1, 2.0]}
COCO_EVAL = {"recipe": "resize", "short": 800, "max_size": 1333}
# name -> (task, backbone, classes, things, scheduler, max_steps, monitor, train transform, eval transform)
RECIPES = {
    "coco_panoptic_r50": ("panoptic", "resnet50", 133, 80, "multistep", 368750, "val/PQ", LSJ_1024, COCO_EVAL),
    "coco_panoptic_swin_tiny": ("panoptic", "swin_tiny", 133, 80, "multistep", 368750, "val/PQ", LSJ_1024, COCO_EVAL),
    "coco_panoptic_dinov2_base": (
        "panoptic",
        "dinov2_base",
        133,
        80,
        "multistep",
        368750,
        "val/PQ",
        LSJ_1024,
        COCO_EVAL,
    ),
    "coco_instance_swin_tiny": (
        "instance",
        "swin_tiny",
        80,
        80,
        "multistep",
        368750,
        "val/segm/AP",
        LSJ_1024,
        COCO_EVAL,
    ),
    "ade20k_semantic_r50": (
        "semantic",
        "resnet50",
        150,
        0,
        "poly",
        160000,
        "val/mIoU",
        {"recipe": "ade", "crop": 512, "max_size": 2048},
        {"recipe": "resize", "short": 512, "max_size": 2048},
    ),
}
BACKBONE_BUILDS = {
    "resnet50": ("ResNetBackbone", [256, 512, 1024, 2048]),
    "swin_tiny": ("SwinBackbone", [96, 192, 384, 768]),
    "dinov2_base": ("ViTBackbone", [256, 256, 256, 256]),  # the simple feature pyramid's levels
}


def fake_metadata(num_classes: int, num_things: int) -> SimpleNamespace:
    """Dataset metadata as DataModule.metadata gives it, without reading a dataset."""
    categories = [
        {"id": k + 1, "name": f"class{k}", "color": [k, k, k], "isthing": k < num_things} for k in range(num_classes)
    ]
    return SimpleNamespace(categories=categories, num_classes=num_classes, ignore_index=255)


def test_every_experiment_has_a_recipe_here():
    assert EXPERIMENTS == sorted(RECIPES)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_and_builds_with_the_published_recipe(tmp_path, tiny, name):
    task, backbone, classes, things, schedule, max_steps, monitor, train_tf, eval_tf = RECIPES[name]
    cfg = tiny.compose_train([f"experiment={name}", "backbone.pretrained=null"], tmp_path)

    # Data: the task, the dataset folder (relative, for data.root=...), the recipe's transforms, 2 images per GPU.
    datamodule = instantiate(cfg.data)  # reads nothing until setup / metadata
    assert isinstance(datamodule, DataModule)
    assert datamodule.task == task and not Path(datamodule.root).is_absolute() and datamodule.synthetic is None
    assert datamodule.train_transform == train_tf and datamodule.eval_transform == eval_tf
    assert datamodule.batch_size == 2 and datamodule.eval_batch_size == 1

    # Trainer: DDP on GPUs in bf16, per-iteration schedule, validation every 5000 iterations, clip 0.01.
    trainer = OmegaConf.to_container(cfg.trainer, resolve=True)
    assert trainer["max_steps"] == max_steps and trainer["max_epochs"] == -1
    assert trainer["strategy"] == "ddp" and trainer["accelerator"] == "gpu" and trainer["precision"] == "bf16-mixed"
    assert trainer["gradient_clip_val"] == 0.01 and trainer["gradient_clip_algorithm"] == "norm"
    assert trainer["val_check_interval"] == 5000 and trainer["check_val_every_n_epoch"] is None
    assert cfg.monitor == monitor and cfg.validate_before_fit is False
    assert cfg.callbacks.checkpoint.monitor == monitor
    if backbone == "resnet50":  # ImageNet ResNet-50 with frozen BatchNorm; Swin-T with drop path 0.3
        assert cfg.backbone.norm == "frozen_bn"
    elif backbone == "dinov2_base":  # ViTDet's ViT-B: drop path 0.1, layer decay 0.7, weight decay 0.1
        assert cfg.backbone.drop_path_rate == 0.1 and cfg.backbone.layer_decay == 0.7
    else:
        assert cfg.backbone.drop_path_rate == 0.3

    # The full-size model with random weights: built, not run.
    module = build_module(cfg, fake_metadata(classes, things))
    assert module.task == task and module.model.backbone.strides == [4, 8, 16, 32]
    assert (type(module.model.backbone).__name__, module.model.backbone.channels) == BACKBONE_BUILDS[backbone]
    head = module.model.head
    assert type(head).__name__ == "Mask2FormerHead" and len(head.layers) == 9
    assert head.query_feat.num_embeddings == 100 and head.query_feat.embedding_dim == 256
    assert head.class_embed.out_features == classes + 1
    assert type(module.model.neck).__name__ == "MSDeformAttnPixelDecoder"
    criterion = module.criterion
    assert criterion.mask_loss == "point" and criterion.num_points == 12544 and criterion.matcher.num_points == 12544
    assert criterion.weight_dict == {"loss_ce": 2.0, "loss_mask": 5.0, "loss_dice": 5.0} and criterion.eos_coef == 0.1
    assert (criterion.oversample_ratio, criterion.importance_sample_ratio) == (3.0, 0.75)
    postprocess = module.postprocess
    assert (postprocess.object_mask_threshold, postprocess.overlap_threshold, postprocess.test_topk) == (0.8, 0.8, 100)
    assert (postprocess.panoptic_on, postprocess.instance_on, postprocess.semantic_on) == (
        task == "panoptic",
        task in ("panoptic", "instance"),
        task in ("panoptic", "semantic"),
    )

    # Optimizer: AdamW 1e-4, weight decay 0.05, backbone lr x0.1, no decay on norms and query embeddings.
    optimizer = build_adamw(module.model, **module.optimizer_config)
    groups = {g["name"]: (g["lr"], g["weight_decay"]) for g in optimizer.param_groups}
    expected = {
        "backbone_wd0.05": (1e-5, 0.05),
        "backbone_wd0": (1e-5, 0.0),
        "head_wd0.05": (1e-4, 0.05),
        "head_wd0": (1e-4, 0.0),
    }
    if backbone == "resnet50":  # frozen BatchNorm: no trainable backbone norm
        del expected["backbone_wd0"]
    if backbone == "dinov2_base":  # ViTDet: lr 1e-4 x 0.7^(13 - i) for layer i (0 the embeddings), weight decay 0.1
        expected = {"head_wd0.1": (1e-4, 0.1), "head_wd0": (1e-4, 0.0)}
        for layer in range(14):
            expected |= {f"backbone_layer{layer}_wd{wd:g}": (1e-4 * 0.7 ** (13 - layer), wd) for wd in (0.0, 0.1)}
    assert groups.keys() == expected.keys()
    assert all(groups[name] == pytest.approx(expected[name], rel=1e-12) for name in expected)
    no_decay = {id(p) for g in optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert id(head.query_feat.weight) in no_decay and id(head.decoder_norm.weight) in no_decay
    assert optimizer.defaults["betas"] == (0.9, 0.999)

    # Schedule, per iteration over max_steps.
    scheduler = build_scheduler(optimizer, total_steps=max_steps, **module.scheduler_config)
    factor = scheduler.lr_lambdas[0]
    if schedule == "multistep":  # x0.1 at 88.9% and 96.3% of the run
        assert list(factor.milestones) == [327818, 355106] and factor.gamma == 0.1
        assert [factor(s) for s in (0, 327817, 327818, 355106)] == pytest.approx([1.0, 1.0, 0.1, 0.01])
    else:  # poly 0.9
        assert factor.name == "poly" and factor.power == 0.9
        assert factor(80000) == pytest.approx(0.5**0.9) and factor(160000) == 0.0


@pytest.mark.parametrize(
    ("overrides", "neck", "mask_loss", "num_points"),
    [
        ([], "MSDeformAttnPixelDecoder", "point", 1024),  # the default head=mask2former_small
        (["head=mask2former"], "MSDeformAttnPixelDecoder", "point", 12544),
        (["head=maskformer"], "BasePixelDecoder", "full", None),
        (["head=maskformer", "neck=fpn"], "FPN", "full", None),
        (["head=mask2former", "neck=fpn", "criterion=maskformer"], "FPN", "full", None),
    ],
)
def test_head_brings_its_neck_and_criterion_unless_given(tmp_path, tiny, overrides, neck, mask_loss, num_points):
    cfg = tiny.compose_train(overrides, tmp_path)
    assert cfg.neck._target_.rsplit(".", 1)[1] == neck
    assert cfg.criterion.mask_loss == mask_loss and cfg.criterion.get("num_points") == num_points


@pytest.mark.slow
def test_multirun_sweep_trains_one_run_per_value(tmp_path, tiny, synthetic_root):
    sweep = tmp_path / "sweep"
    result = tiny.run_script(
        [
            "train.py",
            "-m",
            *tiny.train_overrides(synthetic_root),
            "validate_before_fit=false",
            "test_after_fit=false",
            "logger=none",
            "seed=0,1",
            f"hydra.sweep.dir={sweep}",
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    weights = []
    for job, seed in ((0, 0), (1, 1)):
        run = sweep / str(job)
        assert f"seed={seed}" in yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text())
        checkpoint = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        assert checkpoint["global_step"] == 2
        weights.append(checkpoint["state_dict"]["model.head.query_feat.weight"])
        assert (run / "export" / "model.safetensors").is_file()
    assert not torch.equal(*weights)  # each run seeded with its own value
