"""Deformable DETR (necks.deformable_detr_encoder + heads.deformable_detr): converted random-weight transformers
models give the same class logits and boxes, final and auxiliary (plain, box refinement, two-stage; a native
and a timm backbone), and the conversion command writes a loadable export."""

from __future__ import annotations

import json

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torchvision import tv_tensors
from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection, ResNetConfig
from transformers.models.deformable_detr.modeling_deformable_detr import inverse_sigmoid

from densepred.convert.cli import main as convert_main
from densepred.convert.deformable_detr import (
    convert_deformable_detr,
    convert_deformable_detr_state_dict,
    segmenter_config_from_hf,
)
from densepred.data.transforms import build_transform
from densepred.engine.optim import build_adamw
from densepred.heads.deformable_detr import DeformableDetrHead, encoder_proposals
from densepred.layers import NeckOutput
from densepred.segmenter import Segmenter

SMALL = dict(
    d_model=32,
    encoder_layers=2,
    decoder_layers=2,
    encoder_ffn_dim=64,
    decoder_ffn_dim=64,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    num_queries=7,
    two_stage_num_proposals=7,
    encoder_n_points=2,
    decoder_n_points=3,
)
VARIANTS = {
    "plain": {},
    "box_refine": {"with_box_refine": True},
    "two_stage": {"with_box_refine": True, "two_stage": True},
}


def resnet_config() -> ResNetConfig:
    return ResNetConfig(
        embedding_size=16,
        hidden_sizes=[16, 24, 32, 40],
        depths=[1, 1, 1, 1],
        layer_type="basic",
        out_features=["stage2", "stage3", "stage4"],
    )


def hf_model(seed: int = 0, backbone: str = "native", **overrides) -> DeformableDetrForObjectDetection:
    """A tiny transformers Deformable DETR with every weight moved off its initial value (zero-initialised
    offsets and attention weights take part), BatchNorm statistics too."""
    torch.manual_seed(seed)
    if backbone == "native":
        kwargs = {"backbone_config": resnet_config()}
    else:  # transformers' own default path: a timm model via use_timm_backbone
        kwargs = {"backbone": "resnet18"}
    labels = {0: "cat", 1: "dog", 2: "car"}
    config = DeformableDetrConfig(id2label=labels, **kwargs, **{**SMALL, **overrides})
    model = DeformableDetrForObjectDetection(config).eval()
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("running_var"):
                tensor.uniform_(0.5, 1.5)
            elif tensor.is_floating_point():
                tensor.add_(torch.randn_like(tensor) * 0.05)
    return model


def converted(tmp_path, reference) -> Segmenter:
    reference.save_pretrained(tmp_path)
    config, state_dict = convert_deformable_detr(str(tmp_path))
    model = Segmenter.from_config(config).eval()
    model.load_state_dict(state_dict, strict=True)
    return model


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def assert_same_predictions(ours, expected, layers: int) -> None:
    assert max_diff(ours["pred_logits"], expected.logits) <= 1e-4
    assert max_diff(ours["pred_boxes"], expected.pred_boxes) <= 1e-4
    assert len(ours["aux_outputs"]) == layers - 1
    # transformers' per-layer outputs: recomputed from its intermediate states with its own prediction heads
    for i, aux in enumerate(ours["aux_outputs"]):
        assert max_diff(aux["pred_logits"], expected.aux_logits[i]) <= 1e-4
        assert max_diff(aux["pred_boxes"], expected.aux_boxes[i]) <= 1e-4


def hf_outputs(model, images):
    """transformers' outputs with the per-layer predictions of every layer (its loss's `outputs_class`)."""
    with torch.no_grad():
        out = model(images, pixel_mask=torch.ones(images.shape[0], *images.shape[-2:], dtype=torch.long))
    hidden, init, inter = out.intermediate_hidden_states, out.init_reference_points, out.intermediate_reference_points
    logits, boxes = [], []
    for level in range(hidden.shape[1]):
        reference = inverse_sigmoid(init if level == 0 else inter[:, level - 1])
        delta = model.bbox_embed[level](hidden[:, level])
        if reference.shape[-1] == 4:
            coord = delta + reference
        else:
            coord = torch.cat([delta[..., :2] + reference, delta[..., 2:]], -1)
        logits.append(model.class_embed[level](hidden[:, level]))
        boxes.append(coord.sigmoid())
    out.aux_logits, out.aux_boxes = logits[:-1], boxes[:-1]
    return out


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_converted_model_equals_transformers(tmp_path, variant):
    reference = hf_model(seed=1, **VARIANTS[variant])
    model = converted(tmp_path, reference)
    images = torch.randn(2, 3, 97, 131)  # odd sizes: every level rounds up
    expected = hf_outputs(reference, images)
    with torch.no_grad():
        ours = model(images)
    assert ours["pred_logits"].shape == (2, 7, 3)
    assert_same_predictions(ours, expected, layers=2)
    if variant == "two_stage":
        enc = ours["enc_outputs"]
        assert max_diff(enc["pred_logits"], expected.enc_outputs_class) <= 1e-4
        assert max_diff(enc["pred_boxes"], expected.enc_outputs_coord_logits.sigmoid()) <= 1e-4
    else:
        assert "enc_outputs" not in ours


def test_timm_backbone_equals_transformers(tmp_path):
    """transformers' default backbone (a timm ResNet, `use_timm_backbone`) becomes our TimmBackbone."""
    reference = hf_model(seed=2, backbone="timm", with_box_refine=True)
    model = converted(tmp_path, reference)
    assert type(model.backbone).__name__ == "TimmBackbone"
    images = torch.randn(1, 3, 75, 101)
    expected = hf_outputs(reference, images)
    with torch.no_grad():
        ours = model(images)
    assert_same_predictions(ours, expected, layers=2)


def test_transformers_5_names_convert_the_same(tmp_path):
    """The weights under transformers 5's module names (o_proj, mlp.fc1, backbone.model) convert to the same model."""
    reference = hf_model(seed=3, with_box_refine=True)
    reference.save_pretrained(tmp_path)
    config, v4_weights = convert_deformable_detr(str(tmp_path))
    v5_weights = convert_deformable_detr_state_dict(reference.state_dict(), reference.config.to_dict())
    assert set(v5_weights) == set(v4_weights)
    assert all(torch.equal(v5_weights[k], v4_weights[k]) for k in v4_weights)


def test_convert_command_writes_a_detection_export(tmp_path):
    hf_model(seed=4, **VARIANTS["two_stage"]).save_pretrained(tmp_path / "hf")
    assert convert_main([str(tmp_path / "hf"), str(tmp_path / "out")]) == 0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["criterion"]["_target_"] == "densepred.heads.box_criterion.BoxCriterion"
    assert config["model"]["head"]["two_stage"] is True
    assert [c["name"] for c in config["metadata"]["categories"]] == ["cat", "dog", "car"]


def test_head_rejects_a_neck_with_other_levels():
    head = DeformableDetrHead(32, None, 3, num_queries=4, num_layers=1, num_heads=4, num_feature_levels=4)
    with pytest.raises(ValueError, match="num_feature_levels"):
        head(NeckOutput(None, [torch.zeros(1, 32, 4, 4)] * 3))


def test_encoder_proposals_equal_transformers_with_out_of_range_ones():
    """Large levels put border pixel centres below 0.01: those proposals are inf and their memory zeroed."""
    reference = hf_model(seed=5, **VARIANTS["two_stage"])
    head = converted_head(reference)
    shapes = [(60, 70), (30, 35)]
    memory = torch.randn(2, sum(h * w for h, w in shapes), 32)
    with torch.no_grad():
        query, expected = reference.model.gen_encoder_output_proposals(
            memory, torch.zeros(2, memory.shape[1], dtype=torch.bool), shapes
        )
        proposals, object_query = encoder_proposals(memory, shapes)
        object_query = head.enc_output_norm(head.enc_output(object_query))
    valid = torch.isfinite(expected)
    assert valid.any() and not valid.all()
    assert torch.equal(torch.isfinite(proposals), valid)
    assert max_diff(proposals[valid], expected[valid]) <= 1e-5
    assert max_diff(object_query, query) <= 1e-5


def converted_head(reference):
    """Our head with the converted weights of `reference` (no backbone run)."""
    config = reference.config.to_dict()
    model = Segmenter.from_config(segmenter_config_from_hf(config)).eval()
    model.load_state_dict(convert_deformable_detr_state_dict(reference.state_dict(), config), strict=True)
    return model.head


@pytest.mark.parametrize("backbone", ["resnet50", "timm_resnet50", "swin_tiny", "dinov2_small"])
def test_any_backbone_feeds_the_detector(tmp_path, tiny, backbone):
    """Channels and strides come from the backbone: native, timm, Swin, a ViT with its simple feature pyramid."""
    overrides = [
        f"backbone={backbone}",
        "backbone.pretrained=null",
        "data.task=detection",
        "head=deformable_detr_small",
    ]
    cfg = tiny.compose_train(overrides, tmp_path)
    model = Segmenter.from_config(
        {**{k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("backbone", "neck", "head")}, "num_classes": 4}
    ).eval()
    assert model.neck.out_strides == [*model.backbone.strides[-3:], 2 * model.backbone.strides[-1]]
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 96))
    assert out["pred_logits"].shape == (1, 30, 4) and out["pred_boxes"].shape == (1, 30, 4)
    assert len(out["aux_outputs"]) == 2


def test_experiment_composes_with_the_published_recipe(tmp_path, tiny):
    cfg = tiny.compose_train(["experiment=coco_detection_deformable_detr_r50", "backbone.pretrained=null"], tmp_path)
    assert cfg.data.task == "detection" and cfg.data.batch_size == 4 and cfg.monitor == "val/bbox/AP"
    assert (cfg.trainer.max_steps, cfg.trainer.gradient_clip_val, cfg.trainer.strategy) == (184850, 0.1, "ddp")
    assert (cfg.optimizer.lr, cfg.optimizer.weight_decay, cfg.optimizer.backbone_lr_multiplier) == (2e-4, 1e-4, 0.1)
    assert list(cfg.scheduler.milestones) == [0.8] and cfg.scheduler.warmup_steps == 0
    model = Segmenter.from_config(
        {**{k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("backbone", "neck", "head")}, "num_classes": 80}
    )
    backbone, neck, head = model.backbone, model.neck, model.head
    assert backbone.strides == [8, 16, 32] and backbone.frozen_stages == 2  # the stem and stage 1
    assert neck.out_strides == [8, 16, 32, 64] and len(neck.encoder_layers) == 6 and neck.hidden_dim == 256
    assert (head.num_queries, len(head.layers), head.num_feature_levels, len(head.class_embed)) == (300, 6, 4, 1)
    assert head.layers[0].cross_attn.num_points == 4 and head.layers[0].linear1.out_features == 1024
    criterion = instantiate(cfg.criterion, num_classes=80)
    assert criterion.weight_dict == {"loss_ce": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0}
    assert (criterion.matcher.cost_class, criterion.matcher.cost_bbox, criterion.matcher.cost_giou) == (2.0, 5.0, 2.0)
    groups = build_adamw(model, **OmegaConf.to_container(cfg.optimizer, resolve=True)).param_groups
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    assert lr_of[id(head.layers[0].cross_attn.sampling_offsets.weight)] == pytest.approx(2e-5)
    assert lr_of[id(head.reference_points.weight)] == pytest.approx(2e-5)
    assert lr_of[id(head.layers[0].linear1.weight)] == pytest.approx(2e-4)
    assert {g["weight_decay"] for g in groups} == {1e-4}
    # DETR's augmentation moves boxes with the image and keeps them inside it
    transform = build_transform(**OmegaConf.to_container(cfg.data.train_transform))
    torch.manual_seed(0)
    for _ in range(4):
        image = tv_tensors.Image(torch.zeros(3, 480, 640, dtype=torch.uint8))
        boxes = tv_tensors.BoundingBoxes([[100, 100, 300, 200]], format="XYXY", canvas_size=(480, 640))
        out = transform({"image": image, "boxes": boxes})
        height, width = out["image"].shape[-2:]
        assert 480 <= min(height, width) <= 800 and max(height, width) <= 1333
        assert out["boxes"].canvas_size == (height, width)
