"""RT-DETR against transformers: the ResNet-vd backbone, the converted whole model in eval (class logits and
boxes of every decoder layer, the query selection's encoder outputs) and its denoising queries in training
(same seed, so both draw the same noise). Random-weight transformers models, saved and converted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from safetensors.torch import save_file
from transformers import RTDetrConfig, RTDetrForObjectDetection, RTDetrResNetConfig
from transformers.models.rt_detr.modeling_rt_detr_resnet import RTDetrResNetBackbone

from densepred.backbones import AutoBackbone
from densepred.convert.cli import main as convert_main
from densepred.convert.rtdetr import convert_rtdetr
from densepred.engine.loading import load_module
from densepred.engine.optim import param_groups
from densepred.export_format import read_export
from densepred.heads.denoising import contrastive_denoising_group
from densepred.segmenter import Segmenter

ROOT = Path(__file__).resolve().parents[1]
# Multiples of 32 (the batches are padded to them; the FPN's 2x upsampling needs it), not square.
HEIGHT, WIDTH = 96, 160


def _randomize_batch_norms(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial statistics and affine parameters for every (frozen) batch norm: random init leaves them 0 / 1."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if "BatchNorm" in type(module).__name__:
            n = module.running_mean.numel()
            module.running_mean.copy_(torch.rand(n, generator=generator) - 0.5)
            module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(n, generator=generator) + 0.5)
            module.bias.data.copy_(torch.rand(n, generator=generator) - 0.5)


def _backbone_config(layer_type: str, **kwargs) -> RTDetrResNetConfig:
    sizes = [32, 48, 64, 96] if layer_type == "bottleneck" else [16, 24, 32, 48]
    return RTDetrResNetConfig(
        embedding_size=16, hidden_sizes=sizes, depths=[1, 2, 1, 1], layer_type=layer_type, **kwargs
    )


@pytest.mark.parametrize("layer_type", ["bottleneck", "basic"])
def test_resnet_vd_backbone_matches_transformers(tmp_path, layer_type):
    config = _backbone_config(layer_type, out_features=["stem", "stage1", "stage2", "stage3", "stage4"])
    torch.manual_seed(0)
    reference = RTDetrResNetBackbone(config).eval()
    with torch.no_grad():
        _randomize_batch_norms(reference)
    reference.save_pretrained(tmp_path)
    ours = AutoBackbone.from_pretrained(str(tmp_path), norm="bn").eval()
    assert ours.config["variant"] == "d" and ours.out_features == config.out_features
    pixels = torch.randn(2, 3, 67, 93)  # odd sizes: the ceil-mode average pools of the shortcuts
    with torch.no_grad():
        expected, got = reference(pixels).feature_maps, ours(pixels).feature_maps
    assert len(got) == 5
    for a, b in zip(expected, got, strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


def _rtdetr(tmp_path, num_feature_levels: int = 3) -> tuple[RTDetrForObjectDetection, Segmenter]:
    """A tiny random RTDetrForObjectDetection and our converted model (same weights)."""
    config = RTDetrConfig(
        backbone_config=_backbone_config("bottleneck", out_indices=[2, 3, 4]),
        encoder_hidden_dim=32,
        encoder_in_channels=[48, 64, 96],
        encoder_ffn_dim=64,
        encoder_attention_heads=4,
        d_model=32,
        decoder_in_channels=[32, 32, 32],
        num_feature_levels=num_feature_levels,
        decoder_ffn_dim=64,
        decoder_layers=3,
        decoder_attention_heads=4,
        decoder_n_points=3,
        num_queries=12,
        num_labels=5,
        num_denoising=10,
    )
    torch.manual_seed(0)
    reference = RTDetrForObjectDetection(config)
    with torch.no_grad():
        _randomize_batch_norms(reference)
        for name, param in reference.named_parameters():
            if "bbox_embed" in name or "sampling_offsets" in name or "attention_weights" in name:
                param.normal_(0, 0.1)  # zero-initialised: would hide layout errors
    reference.save_pretrained(tmp_path)
    model_config, state_dict = convert_rtdetr(str(tmp_path))
    assert model_config["backbone"]["variant"] == "d"
    ours = Segmenter.from_config(model_config)
    ours.load_state_dict(state_dict, strict=True)
    return reference, ours


@pytest.mark.parametrize("num_feature_levels", [3, 4])
def test_converted_rtdetr_matches_transformers(tmp_path, num_feature_levels):
    reference, ours = _rtdetr(tmp_path, num_feature_levels)
    reference.eval(), ours.eval()
    torch.manual_seed(1)
    pixels = torch.randn(2, 3, HEIGHT, WIDTH)
    with torch.no_grad():
        expected = reference(pixel_values=pixels)
        got = ours(pixels)
    assert "dn_outputs" not in got
    torch.testing.assert_close(got["pred_logits"], expected.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got["pred_boxes"], expected.pred_boxes, atol=1e-4, rtol=1e-4)
    assert len(got["aux_outputs"]) == 2
    for layer, aux in enumerate(got["aux_outputs"]):
        torch.testing.assert_close(aux["pred_logits"], expected.intermediate_logits[:, layer], atol=1e-4, rtol=1e-4)
        boxes = expected.intermediate_reference_points[:, layer]
        torch.testing.assert_close(aux["pred_boxes"], boxes, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got["enc_outputs"]["pred_logits"], expected.enc_topk_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got["enc_outputs"]["pred_boxes"], expected.enc_topk_bboxes, atol=1e-4, rtol=1e-4)
    assert got["pred_logits"].shape == (2, 12, 5)


def _targets(seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Two images with 3 and 1 objects (normalised cx, cy, w, h)."""
    generator = torch.Generator().manual_seed(seed)
    targets = []
    for count in (3, 1):
        centers = torch.rand(count, 2, generator=generator) * 0.6 + 0.2
        sizes = torch.rand(count, 2, generator=generator) * 0.3 + 0.05
        labels = torch.randint(0, 5, (count,), generator=generator)
        targets.append({"labels": labels, "boxes_cxcywh": torch.cat([centers, sizes], -1)})
    return targets


def test_denoising_and_training_loss_match_transformers(tmp_path):
    """Training mode, the same seed: the denoising queries' outputs of every layer, the matching queries' and,
    with the shipped RT-DETR criterion (configs/criterion/rtdetr.yaml), transformers' total training loss."""
    reference, ours = _rtdetr(tmp_path)
    reference.train(), ours.train()
    targets = _targets()
    labels = [{"class_labels": t["labels"], "boxes": t["boxes_cxcywh"]} for t in targets]
    pixels = torch.randn(2, 3, HEIGHT, WIDTH)
    torch.manual_seed(7)
    expected = reference(pixel_values=pixels, labels=labels)
    torch.manual_seed(7)
    got = ours(pixels, targets)
    meta, expected_meta = got["dn_meta"], expected.denoising_meta_values
    num_dn = meta["dn_num_split"][0]
    assert meta["dn_num_split"] == expected_meta["dn_num_split"] == [18, 12]  # 10 // 3 = 3 groups of 2 x 3
    assert meta["dn_num_group"] == expected_meta["dn_num_group"] == 3
    for a, b in zip(meta["dn_positive_idx"], expected_meta["dn_positive_idx"], strict=True):
        assert torch.equal(a, b)
    assert len(got["dn_outputs"]) == 3
    for layer, dn in enumerate(got["dn_outputs"]):
        logits, boxes = expected.intermediate_logits[:, layer], expected.intermediate_reference_points[:, layer]
        torch.testing.assert_close(dn["pred_logits"], logits[:, :num_dn], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(dn["pred_boxes"], boxes[:, :num_dn], atol=1e-4, rtol=1e-4)
        prediction = got if layer == 2 else got["aux_outputs"][layer]
        torch.testing.assert_close(prediction["pred_logits"], logits[:, num_dn:], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(prediction["pred_boxes"], boxes[:, num_dn:], atol=1e-4, rtol=1e-4)
    criterion = instantiate(OmegaConf.load(ROOT / "configs" / "criterion" / "rtdetr.yaml"), num_classes=5)
    losses = criterion(got, targets)
    assert len(losses) == len(expected.loss_dict) == 21  # 3 layers + encoder + 3 denoising layers, x 3 losses
    torch.testing.assert_close(sum(losses.values()), expected.loss, atol=1e-4, rtol=1e-4)


def test_denoising_groups_see_only_themselves():
    embed = torch.nn.Embedding(6, 8, padding_idx=5)
    group = contrastive_denoising_group(_targets(), num_classes=5, num_queries=4, class_embed=embed, num_denoising=7)
    # 7 // 3 = 2 groups of 3 positives + 3 negatives; then the 4 matching queries
    assert group.queries.shape == (2, 12, 8) and group.reference_logits.shape == (2, 12, 4)
    attend = group.attend
    assert attend.shape == (16, 16)
    assert attend[:6, :6].all() and attend[6:12, 6:12].all()  # within a group
    assert not attend[:6, 6:12].any() and not attend[6:12, :6].any()  # across groups
    assert attend[:12, 12:].all()  # denoising queries see the matching ones
    assert not attend[12:, :12].any() and attend[12:, 12:].all()  # matching queries see only themselves
    assert [idx.tolist() for idx in group.meta["dn_positive_idx"]] == [[0, 1, 2, 6, 7, 8], [0, 6]]
    # padding slots (image 2 has one object) keep the padding label's (zero) embedding
    assert torch.equal(group.queries[1, 1], torch.zeros(8))
    assert (
        contrastive_denoising_group(
            [{"labels": torch.zeros(0, dtype=torch.long), "boxes_cxcywh": torch.zeros(0, 4)}], 5, 4, embed
        )
        is None
    )


# transformers 5 names -> the Hub files' (transformers 4) names of RT-DETR checkpoints (e.g. PekingU/rtdetr_r50vd).
V4_NAMES = [(".o_proj.", ".out_proj."), (".mlp.fc1.", ".fc1."), (".mlp.fc2.", ".fc2."), (".aifi.", ".encoder.")]


def test_command_converts_a_hub_layout_checkpoint_into_an_export(tmp_path):
    reference, _ = _rtdetr(tmp_path / "hf")
    weights = {}
    for key, value in reference.state_dict().items():
        for new, old in V4_NAMES:
            key = key.replace(new, old)
        weights[key] = value.contiguous()
    assert "model.encoder.encoder.0.layers.0.self_attn.out_proj.weight" in weights
    assert "model.decoder.layers.0.fc1.weight" in weights
    save_file(weights, str(tmp_path / "hf" / "model.safetensors"), metadata={"format": "pt"})
    assert convert_main([str(tmp_path / "hf"), str(tmp_path / "out")]) == 0
    config, _ = read_export(tmp_path / "out")
    assert config["source"]["model_type"] == "rt_detr"
    assert config["criterion"]["_target_"] == "densepred.heads.box_criterion.BoxCriterion"
    assert config["criterion"]["class_loss"] == "vfl"
    assert config["model"]["pixel_mean"] == [0.0, 0.0, 0.0] and config["model"]["pixel_std"] == [1.0, 1.0, 1.0]
    assert config["task"] == "detection"
    # evaluate.py's loading: raw 0-255 pixels are only divided by 255, as RTDetrImageProcessor does
    module = load_module(tmp_path / "out").eval()
    assert module.task == "detection"
    images = torch.randint(0, 256, (1, 3, HEIGHT, WIDTH), dtype=torch.uint8)
    batch = {"images": images, "image_sizes": [(HEIGHT, WIDTH)], "orig_sizes": [(2 * HEIGHT, 2 * WIDTH)]}
    reference.eval()
    with torch.no_grad():
        expected = reference(pixel_values=images.float() / 255)
        got = module._outputs(batch)
        (prediction,) = module.predict(batch)
    torch.testing.assert_close(got["pred_boxes"], expected.pred_boxes, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got["pred_logits"], expected.logits, atol=1e-4, rtol=1e-4)
    instances = prediction["instances"]
    assert instances["boxes"].shape[1] == 4 and len(instances["scores"]) == len(instances["labels"]) > 0
    assert instances["boxes"][:, 2:].max() <= 2 * WIDTH  # at the original size


def test_unsupported_settings_are_refused_by_name(tmp_path):
    reference, _ = _rtdetr(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "decoder_n_points": [4, 4, 4]}))
    with pytest.raises(ValueError, match="decoder_n_points"):
        convert_rtdetr(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({**config, "decoder_in_channels": [32, 32, 64]}))
    with pytest.raises(ValueError, match="decoder_in_channels"):
        convert_rtdetr(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(config))
    weights = {**reference.state_dict(), "model.extra.weight": torch.zeros(1)}
    save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="model.extra.weight"):
        convert_rtdetr(str(tmp_path))


def test_experiment_composes_with_the_published_recipe(tmp_path, tiny):
    cfg = tiny.compose_train(["experiment=coco_detection_rtdetr_r50", "backbone.pretrained=null"], tmp_path)
    assert cfg.data.task == "detection" and cfg.data.batch_size == 4
    assert (cfg.trainer.max_epochs, cfg.trainer.gradient_clip_val, cfg.trainer.strategy) == (72, 0.1, "ddp")
    assert (cfg.optimizer.lr, cfg.optimizer.weight_decay, cfg.optimizer.backbone_lr_multiplier) == (1e-4, 1e-4, 0.1)
    assert list(cfg.optimizer.no_decay_keywords) == ["bias"] and cfg.optimizer.weight_decay_embed == 1e-4
    assert list(cfg.scheduler.milestones) == [] and cfg.scheduler.warmup_steps == 2000
    assert cfg.postprocess.test_topk == 300
    # The full-size model with random weights, built from the parts' descriptions (not run).
    model = Segmenter.from_config({"backbone": cfg.backbone, "neck": cfg.neck, "head": cfg.head, "num_classes": 80})
    backbone, neck, head = model.backbone, model.neck, model.head
    assert type(backbone).__name__ == "ResNetBackbone" and backbone.config["variant"] == "d"
    assert backbone.strides == [4, 8, 16, 32] and backbone.frozen_stages == 1
    assert neck.in_channels == [512, 1024, 2048] and neck.out_strides == [8, 16, 32] and neck.aifi_levels == [2]
    assert len(neck.aifi[0]) == 1 and neck.aifi[0][0].linear1.out_features == 1024
    assert (head.num_queries, len(head.layers), head.num_denoising, head.num_feature_levels) == (300, 6, 100, 3)
    assert head.layers[0].cross_attn.num_points == 4 and head.class_embed[0].out_features == 80
    assert dict(cfg.data.train_transform) == {"recipe": "lsj", "size": 640, "scale": [0.1, 2.0]}
    settings = {k: cfg.optimizer[k] for k in ("lr", "weight_decay", "backbone_lr_multiplier", "weight_decay_embed")}
    groups = param_groups(model, **settings, no_decay_keywords=list(cfg.optimizer.no_decay_keywords))
    decay = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    assert decay[id(head.layers[0].linear1.weight)] == decay[id(head.denoising_class_embed.weight)] == (1e-4, 1e-4)
    assert decay[id(neck.aifi[0][0].linear1.bias)] == decay[id(head.layers[0].norm1.weight)] == (1e-4, 0.0)
    assert decay[id(backbone.layer4[0].conv1.weight)] == pytest.approx((1e-5, 1e-4))
    criterion = instantiate(cfg.criterion, num_classes=80)
    assert criterion.class_loss == "vfl" and not criterion.enc_class_agnostic
    assert criterion.weight_dict == {"loss_vfl": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0}
    assert (criterion.matcher.cost_class, criterion.matcher.cost_bbox, criterion.matcher.cost_giou) == (2.0, 5.0, 2.0)
    assert (criterion.focal_alpha, criterion.matcher.focal_alpha) == (0.75, 0.25)


def test_small_preset_is_the_measured_synthetic_run(tmp_path, tiny):
    """head=rtdetr_small is the README's synthetic learning run (64 channels, 100 queries, 3 layers)."""
    cfg = tiny.compose_train(["data.task=detection", "head=rtdetr_small"], tmp_path)
    assert cfg.neck._target_.endswith("HybridEncoder") and cfg.criterion.class_loss == "vfl"
    assert (cfg.neck.hidden_dim, cfg.neck.num_heads, cfg.neck.dim_feedforward) == (64, 4, 256)
    head = cfg.head
    assert (head.hidden_dim, head.num_queries, head.num_layers, head.num_heads, head.num_denoising) == (
        64,
        100,
        3,
        4,
        50,
    )
