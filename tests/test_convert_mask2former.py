"""transformers Mask2FormerForUniversalSegmentation -> our Segmenter: same outputs, clear errors."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import save_file
from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, ResNetConfig, SwinConfig

from densepred.convert.cli import main as convert_main
from densepred.convert.mask2former import convert_mask2former
from densepred.convert.model import coco_panoptic_categories, convert_model
from densepred.heads.mask2former import masked_attention_mask
from densepred.segmenter import Segmenter

STAGES = ["stage1", "stage2", "stage3", "stage4"]
DECODER = dict(
    feature_size=32,
    mask_feature_size=32,
    hidden_dim=32,
    encoder_feedforward_dim=64,
    encoder_layers=2,
    decoder_layers=4,
    num_attention_heads=4,
    dim_feedforward=64,
    num_queries=6,
)


def hf_model(backbone_config, seed: int = 0, labels=None, **overrides) -> Mask2FormerForUniversalSegmentation:
    """A tiny transformers Mask2Former with every weight moved off its initial value, so that zero-initialised
    parts (deformable offsets, attention weights) and BatchNorm statistics take part in the comparison."""
    torch.manual_seed(seed)
    labels = labels or {0: "person", 1: "car", 2: "sky"}
    config = Mask2FormerConfig(backbone_config=backbone_config, id2label=labels, **{**DECODER, **overrides})
    model = Mask2FormerForUniversalSegmentation(config).eval()
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("running_var"):
                tensor.uniform_(0.5, 1.5)
            elif tensor.is_floating_point() and "criterion" not in name:
                tensor.add_(torch.randn_like(tensor) * 0.05)
    return model


def swin_config() -> SwinConfig:
    return SwinConfig(embed_dim=16, depths=[1, 1, 2, 1], num_heads=[1, 2, 2, 4], window_size=4, out_features=STAGES)


def resnet_config() -> ResNetConfig:
    return ResNetConfig(
        embedding_size=16, hidden_sizes=[16, 24, 32, 40], depths=[1, 1, 1, 1], layer_type="basic", out_features=STAGES
    )


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


@pytest.mark.parametrize("backbone_config", [swin_config, resnet_config], ids=["swin", "resnet"])
def test_converted_model_equals_transformers(tmp_path, backbone_config):
    reference = hf_model(backbone_config())
    reference.save_pretrained(tmp_path)
    config, state_dict = convert_mask2former(str(tmp_path))
    assert config["num_classes"] == 3 and config["class_names"] == ["person", "car", "sky"]
    model = Segmenter.from_config(config).eval()
    model.load_state_dict(state_dict, strict=True)

    images = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        expected = reference(images, output_auxiliary_logits=True)
        ours = model(images)
    assert ours["pred_masks"].shape == (2, 6, 24, 32)
    assert max_diff(ours["pred_logits"], expected.class_queries_logits) <= 1e-4
    assert max_diff(ours["pred_masks"], expected.masks_queries_logits) <= 1e-4
    assert len(ours["aux_outputs"]) == len(expected.auxiliary_logits) == 3
    for aux, expected_aux in zip(ours["aux_outputs"], expected.auxiliary_logits, strict=True):
        assert max_diff(aux["pred_logits"], expected_aux["class_queries_logits"]) <= 1e-4
        assert max_diff(aux["pred_masks"], expected_aux["masks_queries_logits"]) <= 1e-4
    # masked attention is exercised: the predictions feeding layers 1..3 block part of their level
    sizes = [(3, 4), (6, 8), (12, 16)]
    for i, aux in enumerate(ours["aux_outputs"]):
        blocked = masked_attention_mask(aux["pred_masks"], sizes[i % 3], num_heads=4)
        assert blocked.any() and not blocked.all()


V4_SWIN_NAMES = [  # transformers 5 name -> the name in Hub files written by transformers 4
    (".swin.embeddings.", ".embeddings."),
    (".swin.encoder.", ".encoder."),
    ("attention.q_proj", "attention.self.query"),
    ("attention.k_proj", "attention.self.key"),
    ("attention.v_proj", "attention.self.value"),
    ("attention.o_proj", "attention.output.dense"),
    ("attention.relative_position_bias.relative_position_bias_table", "attention.self.relative_position_bias_table"),
    ("mlp.fc1", "intermediate.dense"),
    ("mlp.fc2", "output.dense"),
]


def test_hub_file_layout_converts_the_same(tmp_path):
    """Hub checkpoints (e.g. facebook/mask2former-swin-tiny-coco-panoptic) hold transformers 4 Swin names."""
    reference = hf_model(swin_config(), seed=1)
    reference.save_pretrained(tmp_path)
    weights = {}
    for key, value in reference.state_dict().items():
        if key.startswith("model.pixel_level_module.encoder."):
            for new, old in V4_SWIN_NAMES:
                key = key.replace(new, old)
        weights[key] = value.contiguous()
    assert "model.pixel_level_module.encoder.encoder.layers.0.blocks.0.attention.self.query.weight" in weights
    save_file(weights, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    config, state_dict = convert_mask2former(str(tmp_path))
    model = Segmenter.from_config(config).eval()
    model.load_state_dict(state_dict, strict=True)
    images = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        assert max_diff(model(images)["pred_masks"], reference(images).masks_queries_logits) <= 1e-4


def test_config_mirrors_the_checkpoint(tmp_path):
    hf_model(swin_config(), enforce_input_projection=True, common_stride=4).save_pretrained(tmp_path)
    config, state_dict = convert_mask2former(str(tmp_path))
    assert config["neck"] == {
        "_target_": "densepred.necks.msdeform_pixel_decoder.MSDeformAttnPixelDecoder",
        "conv_dim": 32,
        "mask_dim": 32,
        "encoder_layers": 2,
        "num_heads": 4,
        "dim_feedforward": 64,
        "dropout": 0.0,
        "common_stride": 4,
    }
    assert config["head"] == {
        "_target_": "densepred.heads.mask2former.Mask2FormerHead",
        "hidden_dim": 32,
        "num_queries": 6,
        "num_heads": 4,
        "dim_feedforward": 64,
        "num_layers": 3,
        "dropout": 0.0,
        "enforce_input_project": True,
    }
    assert "head.input_proj.2.weight" in state_dict
    Segmenter.from_config(config).load_state_dict(state_dict, strict=True)


def rewrite_config(folder, **changes) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_other_model_type_is_refused(tmp_path):
    hf_model(swin_config()).save_pretrained(tmp_path)
    rewrite_config(tmp_path, model_type="maskformer")
    with pytest.raises(ValueError, match=r"model_type 'mask2former'\), got 'maskformer'.*convert_maskformer"):
        convert_mask2former(str(tmp_path))


def test_pre_norm_is_refused(tmp_path):
    hf_model(swin_config()).save_pretrained(tmp_path)
    rewrite_config(tmp_path, pre_norm=True)
    with pytest.raises(ValueError, match="pre_norm=True"):
        convert_mask2former(str(tmp_path))


def test_foreign_weight_is_named(tmp_path):
    model = hf_model(swin_config())
    model.save_pretrained(tmp_path)
    weights = {k: v.contiguous() for k, v in model.state_dict().items()}
    weights["model.transformer_module.decoder.extra_layer.weight"] = torch.zeros(2)
    save_file(weights, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="decoder.extra_layer.weight"):
        convert_mask2former(str(tmp_path))


def test_thing_stuff_split_comes_from_the_dataset_categories(tmp_path, caplog):
    """A transformers config has no thing/stuff split: COCO panoptic's for its 133 labels, --categories else."""
    coco = coco_panoptic_categories()
    assert len(coco) == 133 and sum(c["isthing"] for c in coco) == 80
    labels = {k: c["name"] for k, c in enumerate(coco)}
    hf_model(resnet_config(), labels=labels).save_pretrained(tmp_path / "coco")
    config, _ = convert_model(str(tmp_path / "coco"))
    categories = config["metadata"]["categories"]
    assert [c["isthing"] for c in categories] == [True] * 80 + [False] * 53
    assert categories[0] == {"id": 1, "name": "person", "isthing": True, "color": [220, 20, 60]}
    assert categories[-1] == {"id": 200, "name": "rug-merged", "isthing": False, "color": [250, 141, 255]}

    # Other labels: the categories of a COCO panoptic JSON given with --categories (sorted by id).
    hf_model(resnet_config()).save_pretrained(tmp_path / "hf")  # person, car, sky
    panoptic = {
        "images": [],
        "annotations": [],
        "categories": [
            {"id": 7, "name": "sky", "isthing": 0, "color": [70, 130, 180]},
            {"id": 1, "name": "person", "isthing": 1, "color": [220, 20, 60]},
            {"id": 3, "name": "car", "isthing": 1},
        ],
    }
    (tmp_path / "panoptic.json").write_text(json.dumps(panoptic))
    args = [str(tmp_path / "hf"), str(tmp_path / "out"), "--categories", str(tmp_path / "panoptic.json")]
    assert convert_main(args) == 0
    saved = json.loads((tmp_path / "out" / "config.json").read_text())["metadata"]["categories"]
    expected = [(1, "person", True), (3, "car", True), (7, "sky", False)]
    assert [(c["id"], c["name"], c["isthing"]) for c in saved] == expected
    panoptic["categories"].pop()
    (tmp_path / "panoptic.json").write_text(json.dumps(panoptic))
    assert convert_main(args) == 2  # 2 categories for 3 classes: refused

    # Neither known: every class a thing, with a warning that names the fix.
    with caplog.at_level(logging.WARNING, logger="densepred.convert.model"):
        config, _ = convert_model(str(tmp_path / "hf"))
    assert all(c["isthing"] for c in config["metadata"]["categories"])
    assert any("thing/stuff split" in r.message and "--categories" in r.message for r in caplog.records)
