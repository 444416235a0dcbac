"""TimmBackbone: timm's feature_info as stages, outputs equal to timm features_only, always NCHW."""

import pytest
import timm
import torch
import torch.nn.functional as F

from densepred.backbones import TimmBackbone

SWIN = "swin_tiny_patch4_window7_224"


@pytest.mark.parametrize(
    ("name", "stage_names", "channels", "strides"),
    [
        ("resnet18", ["act1", "layer1", "layer2", "layer3", "layer4"], [64, 64, 128, 256, 512], [2, 4, 8, 16, 32]),
        ("convnext_atto", ["stages.0", "stages.1", "stages.2", "stages.3"], [40, 80, 160, 320], [4, 8, 16, 32]),
        (SWIN, ["layers.0", "layers.1", "layers.2", "layers.3"], [96, 192, 384, 768], [4, 8, 16, 32]),
    ],
)
def test_stages_from_feature_info(name, stage_names, channels, strides):
    model = TimmBackbone(name, out_indices=tuple(range(len(stage_names))))
    assert model.stage_names == stage_names
    assert model.out_features == stage_names
    assert model.channels == channels and model.strides == strides
    default = TimmBackbone(name)  # HF's default: the last stage
    assert default.out_features == [stage_names[-1]] and default.out_indices == [len(stage_names) - 1]


@pytest.mark.parametrize(
    ("name", "out_indices", "sizes"),
    [
        ("resnet18", (1, 2, 3, 4), [(224, 224), (225, 301)]),
        ("convnext_atto", (0, 1, 2, 3), [(224, 224), (225, 301)]),
        (SWIN, (0, 1, 2, 3), [(224, 224), (160, 256)]),
    ],
)
def test_outputs_equal_timm_features_only_and_nchw(name, out_indices, sizes):
    torch.manual_seed(0)
    model = TimmBackbone(name, out_indices=out_indices).eval()
    extra = {"dynamic_img_size": True} if name == SWIN else {}
    reference = timm.create_model(name, features_only=True, out_indices=out_indices, **extra).eval()
    reference.load_state_dict({k.removeprefix("model."): v for k, v in model.state_dict().items()})
    for size in sizes:
        x = torch.randn(2, 3, *size)
        with torch.no_grad():
            ours = model(x).feature_maps
            expected = reference(x)
        if name == SWIN:  # timm's Swin features are NHWC
            expected = [e.permute(0, 3, 1, 2) for e in expected]
        assert len(ours) == len(out_indices)
        for a, b, c in zip(ours, expected, model.channels, strict=True):
            assert a.shape[:2] == (2, c)  # NCHW
            torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_swin_family_takes_any_input_size():
    model = TimmBackbone(SWIN, out_indices=(0, 1, 2, 3)).eval()
    x = torch.randn(1, 3, 225, 301)
    with torch.no_grad():
        maps = model(x).feature_maps
        padded = model(F.pad(x, (0, 3, 0, 3))).feature_maps  # what the wrapper does: pad to the patch size
    assert [tuple(m.shape) for m in maps] == [(1, 96, 57, 76), (1, 192, 29, 38), (1, 384, 15, 19), (1, 768, 8, 10)]
    for a, b in zip(maps, padded, strict=True):
        torch.testing.assert_close(a, b)


def test_selection_changes_on_built_timm_backbone():
    model = TimmBackbone("resnet18", out_indices=(1, 2, 3, 4))
    model.out_features = ["layer2", "layer4"]
    assert model.out_indices == [2, 4] and model.channels == [128, 512] and model.strides == [8, 32]
    assert [m.shape[1] for m in model(torch.randn(1, 3, 64, 64)).feature_maps] == [128, 512]
    model.out_indices = [-1]
    assert model.out_features == ["layer4"]


def test_clear_errors():
    with pytest.raises(ValueError, match="out_indices must be a list or tuple, got int 2"):
        TimmBackbone("resnet18", out_indices=2)
    with pytest.raises(ValueError, match=r"\[5\] out of range for 5 stages.*'act1'"):
        TimmBackbone("resnet18", out_indices=(1, 5))
    with pytest.raises(ValueError, match=r"unknown timm model 'resnet181'; did you mean \['resnet18'"):
        TimmBackbone("resnet181")
    with pytest.raises(ValueError, match="'inception_v3' cannot be used as a backbone.*features_only=True"):
        TimmBackbone("inception_v3", aux_logits=True)  # timm has no features_only for this configuration
    with pytest.raises(NotImplementedError, match="freeze_at is available for native backbones"):
        TimmBackbone("resnet18").freeze_stages(1)


def test_fixed_size_model_without_dynamic_size_still_builds():
    model = TimmBackbone("levit_128", out_indices=(0, 1, 2))
    assert model.strides == [16, 32, 64]
    assert [m.shape[1] for m in model(torch.randn(1, 3, 224, 224)).feature_maps] == [128, 256, 384]
