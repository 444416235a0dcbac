"""Every ready-made backbone config composes, instantiates and yields strides 4, 8, 16, 32."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import InstantiationException
from hydra.utils import instantiate

from densepred.backbones import Backbone

ROOT = Path(__file__).resolve().parents[1]
BACKBONE_CONFIGS = sorted(p.stem for p in (ROOT / "configs" / "backbone").glob("*.yaml"))


def test_the_required_choices_exist():
    required = {"resnet50", "resnet101", "swin_tiny", "swin_small", "swin_base", "convnext_tiny"}
    required |= {"timm_resnet50", "timm_convnext_tiny", "timm_swin_tiny"}
    assert required <= set(BACKBONE_CONFIGS)


@pytest.mark.parametrize("choice", BACKBONE_CONFIGS)
def test_backbone_config_builds_the_four_pyramid_levels(choice):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"backbone={choice}", "backbone.pretrained=null"])
    backbone = instantiate(cfg.backbone)  # random weights: pretrained loading is tested in test_pretrained.py
    assert isinstance(backbone, Backbone)
    assert backbone.strides == [4, 8, 16, 32]
    backbone.eval()
    with torch.no_grad():
        maps = backbone(torch.randn(1, 3, 64, 96)).feature_maps
    assert [tuple(m.shape) for m in maps] == [
        (1, c, -(-64 // s), -(-96 // s)) for c, s in zip(backbone.channels, backbone.strides, strict=True)
    ]


def test_a_key_the_backbone_does_not_take_is_named_with_the_fix():
    # head=eomt sets backbone.pyramid=null, an option of the plain ViTs only: on the default ResNet-18 the error
    # names the backbone, the key and the backbones that take it
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["head=eomt"])
    expected = r"backbone 'resnet18' does not take a config key: .*'pyramid'.*dinov2_small"
    with pytest.raises(InstantiationException, match=expected):
        instantiate(cfg.backbone)
