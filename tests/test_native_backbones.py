"""Native ResNet / Swin / ConvNeXt backbones: stages, shapes, selection changes, freezing, equality with timm."""

import copy
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from omegaconf import OmegaConf
from torch import nn

from densepred.backbones import AutoBackbone, Backbone, list_backbones
from densepred.backbones.resnet import FoldedFrozenBatchNorm2d, FrozenBatchNorm2d, FrozenBNConv2d
from densepred.backbones.swin import SwinBackbone

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["stem", "stage1", "stage2", "stage3", "stage4"]
ALL = (0, 1, 2, 3, 4)

# (name, channels per stage, spatial sizes per stage at 225x301)
FAMILIES = {
    "resnet18": ([64, 64, 128, 256, 512], [(57, 76), (57, 76), (29, 38), (15, 19), (8, 10)]),
    "resnet50": ([64, 256, 512, 1024, 2048], [(57, 76), (57, 76), (29, 38), (15, 19), (8, 10)]),
    "swin_tiny": ([96, 96, 192, 384, 768], [(57, 76), (57, 76), (29, 38), (15, 19), (8, 10)]),  # ceil
    "convnext_tiny": ([96, 96, 192, 384, 768], [(56, 75), (56, 75), (28, 37), (14, 18), (7, 9)]),  # floor
}


@pytest.mark.parametrize("name", list_backbones())
def test_every_registered_backbone_follows_the_contract(name):
    """Derived from the registry: whatever registers a backbone gets these checks. Built and run on the meta
    device (shapes only), so the large variants cost no weight initialisation."""
    with torch.device("meta"), torch.no_grad():
        model = AutoBackbone.from_config(name).eval()
        assert isinstance(model, Backbone) and model.family in {"resnet", "swin", "convnext", "vit"}
        assert model.stage_names[0] == "stem" and model.out_features == [model.stage_names[-1]]  # default: last
        model.out_features = model.stage_names
        assert [info["num_chs"] for info in model.feature_info] == model.channels
        maps = model(torch.empty(1, 3, 64, 96)).feature_maps
        if model.family == "vit":  # single-stride maps (ceil(H / patch)); the pyramid gives strides 4..32
            assert set(model.strides) == {model.patch_size}
            assert {(f.shape[2], f.shape[3]) for f in maps} == {
                (-(-64 // model.patch_size), -(-96 // model.patch_size))
            }
            model = AutoBackbone.from_config(name, pyramid={"mode": "simple"}).eval()
            maps = model(torch.empty(1, 3, 64, 96)).feature_maps
        assert model.strides == sorted(model.strides) and model.strides[-1] == 32
    assert [f.shape[1] for f in maps] == model.channels
    assert [(f.shape[2], f.shape[3]) for f in maps] == [(64 // s, 96 // s) for s in model.strides]


def test_every_backbone_config_builds_a_registered_or_timm_backbone():
    for path in sorted((ROOT / "configs" / "backbone").glob("*.yaml")):
        config = OmegaConf.load(path)
        if config._target_.endswith("AutoBackbone.from_config"):
            assert config.name in list_backbones(), path.name


def test_design_card_example():
    model = AutoBackbone.from_config("swin_tiny", out_indices=(1,))
    assert model(torch.randn(1, 3, 224, 224)).feature_maps[0].shape == (1, 96, 56, 56)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_stages_channels_strides_and_shapes(name):
    channels, odd_sizes = FAMILIES[name]
    model = AutoBackbone.from_config(name, out_indices=ALL).eval()
    assert model.stage_names == STAGES
    assert model.out_features == STAGES and model.out_indices == list(ALL)
    assert model.channels == channels
    assert model.strides == [4, 4, 8, 16, 32]
    assert model.out_feature_channels == dict(zip(STAGES, channels, strict=True))
    with torch.no_grad():
        square = model(torch.randn(2, 3, 224, 224)).feature_maps
        odd = model(torch.randn(1, 3, 225, 301)).feature_maps
    assert [tuple(f.shape) for f in square] == [
        (2, c, 224 // s, 224 // s) for c, s in zip(channels, model.strides, strict=True)
    ]
    assert [tuple(f.shape) for f in odd] == [(1, c, *hw) for c, hw in zip(channels, odd_sizes, strict=True)]
    assert all(torch.isfinite(f).all() for f in odd)


def test_default_selection_is_last_stage():
    model = AutoBackbone.from_config("resnet18")
    assert model.out_features == ["stage4"] and model.out_indices == [4]
    assert model.channels == [512] and model.strides == [32]
    (feature,) = model(torch.randn(1, 3, 64, 64)).feature_maps
    assert feature.shape == (1, 512, 2, 2)


@pytest.mark.parametrize("name", ["swin_tiny", "convnext_tiny", "resnet18"])
def test_changing_selection_on_a_built_backbone(name):
    model = AutoBackbone.from_config(name, out_features=["stage1", "stage2"]).eval()
    x = torch.randn(1, 3, 96, 128)
    model.out_features = ["stage2", "stage4"]
    assert model.out_indices == [2, 4]
    maps = model(x).feature_maps
    assert [m.shape[1] for m in maps] == model.channels
    model.out_indices = (-5, -1)
    assert model.out_features == ["stem", "stage4"]
    assert [m.shape[-2:] for m in model(x).feature_maps] == [(24, 32), (3, 4)]
    if hasattr(model, "out_norms"):  # one output norm per selected stage, none unused
        assert sorted(model.out_norms.keys()) == ["stage4", "stem"]
    with pytest.raises(ValueError, match="valid stage names"):
        model.out_indices = [5]
    assert model.out_features == ["stem", "stage4"]  # a rejected change leaves the selection as it was


def test_selection_keeps_kept_output_norm_weights():
    model = AutoBackbone.from_config("swin_tiny", out_features=["stage2", "stage3"])
    with torch.no_grad():
        model.out_norms["stage3"].weight.fill_(2.0)
    model.out_features = ["stage3", "stage4"]
    assert torch.equal(model.out_norms["stage3"].weight, torch.full((384,), 2.0))
    assert torch.equal(model.out_norms["stage4"].weight, torch.ones(768))


def test_only_stages_up_to_the_last_selected_run():
    model = AutoBackbone.from_config("resnet18", out_indices=(1,))
    called = []
    model.layer2.register_forward_hook(lambda *_: called.append("layer2"))
    model(torch.randn(1, 3, 64, 64))
    assert called == []


def _timm_reference(name: str) -> nn.Module:
    return {
        "resnet18": lambda: timm.create_model("resnet18", num_classes=0),
        "convnext_tiny": lambda: timm.create_model("convnext_tiny", num_classes=0),
        # always_partition: pad-and-shift at every size, the official Mask2Former / HF SwinBackbone rule
        "swin_tiny": lambda: timm.create_model("swin_tiny_patch4_window7_224", num_classes=0, always_partition=True),
    }[name]()


@pytest.mark.parametrize("name", ["resnet18", "convnext_tiny", "swin_tiny"])
def test_same_weights_same_features_as_timm(name):
    """Native models use timm's state-dict layout: timm's weights load as they are and give timm's features."""
    torch.manual_seed(0)
    reference = _timm_reference(name).eval()
    model = (
        AutoBackbone.from_config(name, out_indices=(1, 2, 3, 4), norm="bn")
        if "resnet" in name
        else (AutoBackbone.from_config(name, out_indices=(1, 2, 3, 4)))
    )
    model.eval()
    weights = {k: v for k, v in reference.state_dict().items() if not k.startswith(("head.", "fc.", "norm."))}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert unexpected == [] and all(k.startswith("out_norms.") for k in missing)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ours = model(x).feature_maps
        _, levels = reference.forward_intermediates(x, indices=4, intermediates_only=False, norm=False)
    if name == "swin_tiny":  # HF-style output norms (freshly initialised: plain LayerNorm)
        levels = [F.layer_norm(t.permute(0, 2, 3, 1), t.shape[1:2]).permute(0, 3, 1, 2) for t in levels]
    if name == "convnext_tiny":
        levels = [F.layer_norm(t.permute(0, 2, 3, 1), t.shape[1:2], eps=1e-6).permute(0, 3, 1, 2) for t in levels]
    for a, b in zip(ours, levels, strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_frozen_batch_norm_computes_in_its_input_dtype():
    """float32: torchvision's values exactly; bfloat16 stays bfloat16 (Detectron2's), so a ResNet under autocast
    yields bfloat16 maps instead of float32 ones promoted by the statistics."""
    torch.manual_seed(0)
    reference = torchvision.ops.FrozenBatchNorm2d(6)
    for buffer in ("weight", "bias", "running_mean"):
        getattr(reference, buffer).normal_()
    reference.running_var.uniform_(0.5, 2.0)
    ours = FrozenBatchNorm2d(6)
    ours.load_state_dict(reference.state_dict())
    x = torch.randn(2, 6, 5, 5)
    assert torch.equal(ours(x), reference(x))
    low = ours(x.bfloat16())
    assert low.dtype == torch.bfloat16 and reference(x.bfloat16()).dtype == torch.float32
    torch.testing.assert_close(low.float(), reference(x), atol=0.05, rtol=0.02)
    model = AutoBackbone.from_config("resnet18", out_indices=[1, 4])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        maps = model(torch.randn(1, 3, 64, 64)).feature_maps
    assert [m.dtype for m in maps] == [torch.bfloat16] * 2


@pytest.mark.parametrize("name", ["resnet50", "resnet18_vd"])
def test_frozen_batch_norms_folded_into_their_convolutions(name):
    """Every frozen BN is applied by the conv before it: the same outputs and gradients (to float rounding) as
    the same weights with each conv and BN computed apart, under the same state dict keys."""
    torch.manual_seed(0)
    model = AutoBackbone.from_config(name, out_indices=ALL)
    for frozen in model.modules():
        if isinstance(frozen, FrozenBatchNorm2d):
            frozen.weight.uniform_(0.5, 1.5), frozen.bias.normal_(), frozen.running_mean.normal_()
            frozen.running_var.uniform_(0.5, 2.0)
    unfolded = copy.deepcopy(model)
    for module in unfolded.modules():
        if type(module) is FrozenBNConv2d:
            module.__class__ = nn.Conv2d
        elif type(module) is FoldedFrozenBatchNorm2d:
            module.__class__ = FrozenBatchNorm2d
    assert not any(type(m) is FrozenBatchNorm2d for m in model.modules())
    assert sum(type(m) is FrozenBNConv2d for m in model.modules()) == sum(
        type(m) is FrozenBatchNorm2d for m in unfolded.modules()
    )
    assert model.state_dict().keys() == unfolded.state_dict().keys()
    x = torch.randn(2, 3, 64, 64)
    outputs = []
    for net in (model, unfolded):
        maps = net.train()(x).feature_maps
        sum((m * torch.linspace(-1, 1, m.numel()).view_as(m)).sum() for m in maps).backward()
        outputs.append((maps, {n: p.grad for n, p in net.named_parameters()}))
    (maps, grads), (reference_maps, reference_grads) = outputs
    # to 1e-5 of each tensor's largest value (the random statistics make the deep maps large)
    for a, b in zip(maps, reference_maps, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5 * b.abs().max().item(), rtol=1e-5)
    assert grads.keys() == reference_grads.keys()
    for key, grad in grads.items():
        reference = reference_grads[key]
        torch.testing.assert_close(grad, reference, atol=1e-5 * reference.abs().max().item(), rtol=1e-5, msg=key)


def test_resnet_norm_choices():
    def norms(model):
        return {type(m) for m in model.modules() if isinstance(m, (nn.modules.batchnorm._BatchNorm, FrozenBatchNorm2d))}

    # fine-tuning default: frozen, and applied by the convolution before each
    assert norms(AutoBackbone.from_config("resnet18")) == {FoldedFrozenBatchNorm2d}
    assert norms(AutoBackbone.from_config("resnet18", norm="bn")) == {nn.BatchNorm2d}
    assert norms(AutoBackbone.from_config("resnet18", norm="syncbn")) == {nn.SyncBatchNorm}
    frozen = AutoBackbone.from_config("resnet18")
    assert not any("bn" in n for n, _ in frozen.named_parameters())  # frozen BN holds buffers only
    with pytest.raises(ValueError, match="norm='gn'"):
        AutoBackbone.from_config("resnet18", norm="gn")


@pytest.mark.parametrize("name", ["resnet18", "swin_tiny", "convnext_tiny"])
def test_freeze_at(name):
    model = AutoBackbone.from_config(
        name, out_indices=ALL, freeze_at=1, drop_path_rate=0.1, **({"norm": "bn"} if "resnet" in name else {})
    )
    model.train()
    groups = model.stage_modules()
    for position, modules in enumerate(groups):
        params = [p for m in modules for p in m.parameters()]
        assert params and all(p.requires_grad == (position >= 2) for p in params), position
        assert all(m.training == (position >= 2) for module in modules for m in module.modules())
    outputs = model(torch.randn(2, 3, 64, 64)).feature_maps
    sum(o.mean() for o in outputs).backward()
    assert all(p.grad is None for m in groups[0] + groups[1] for p in m.parameters())
    assert all(p.grad is not None for m in groups[2:] for module in m for p in module.parameters())


def test_freeze_at_range_and_nothing_frozen_by_default():
    model = AutoBackbone.from_config("resnet18")
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="freeze_at=5 is out of range"):
        AutoBackbone.from_config("resnet18", freeze_at=5)


def test_every_trainable_parameter_gets_a_gradient():
    model = AutoBackbone.from_config("swin_tiny", out_indices=(1, 2, 3, 4), drop_path_rate=0.2).train()
    sum(f.float().pow(2).mean() for f in model(torch.randn(2, 3, 64, 96)).feature_maps).backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


def test_swin_is_deterministic_in_eval_and_stochastic_in_train_with_drop_path():
    model = AutoBackbone.from_config("swin_tiny", out_indices=(4,), drop_path_rate=0.5)
    x = torch.randn(2, 3, 64, 64)
    model.eval()
    torch.testing.assert_close(model(x).feature_maps[0], model(x).feature_maps[0])
    model.train()
    assert not torch.allclose(model(x).feature_maps[0], model(x).feature_maps[0])


def test_swin_window12_variant_and_custom_tiny_config():
    assert AutoBackbone.from_config("swin_base_window12").layers[0].window_size == 12
    tiny = SwinBackbone(embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 1, 2, 2), out_indices=ALL)
    assert isinstance(tiny, Backbone) and tiny.channels == [16, 16, 32, 64, 128]
    maps = tiny(torch.randn(1, 3, 33, 50)).feature_maps  # smaller than one window at the last stages
    assert [tuple(m.shape[-2:]) for m in maps] == [(9, 13), (9, 13), (5, 7), (3, 4), (2, 2)]


def test_clear_errors():
    with pytest.raises(ValueError, match=r"unknown backbone 'swin_tiyn'.*Did you mean \['swin_tiny'"):
        AutoBackbone.from_config("swin_tiyn")
    with pytest.raises(ValueError, match=r"expects pixel_values of shape \(B, 3, H, W\), got \(1, 4, 32, 32\)"):
        AutoBackbone.from_config("resnet18")(torch.randn(1, 4, 32, 32))
    with pytest.raises(ValueError, match="valid stage names"):
        AutoBackbone.from_config("convnext_tiny", out_features=["res5"])
    with pytest.raises(TypeError, match="from_config"):
        AutoBackbone()
