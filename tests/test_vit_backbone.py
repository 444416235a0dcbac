"""Plain ViT backbones: the transformers ViT backbone API, parity with transformers' DINOv2 / DINOv2-with-registers
/ DINOv3-ViT backbones and with timm, the simple feature pyramid, pretrained loading and its refusals, freezing,
activation checkpointing and the layer-wise lr decay groups."""

from __future__ import annotations

import json

import pytest
import timm
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import save_file
from test_pretrained import hub_cache, one_thread, put_in_hub_cache  # noqa: F401  (fixtures, helper)
from torch import nn

from densepred.backbones import AutoBackbone, ViTBackbone
from densepred.engine.optim import param_groups
from densepred.utils.checkpointing import enable_activation_checkpointing

SIZES = [(224, 224), (200, 333)]  # square, and odd sizes that are no multiple of 14 or 16
# Tiny timm architectures of each kind: plain, registers (no_embed_class), RoPE without / with absolute embeddings.
TINY = dict(depth=4, embed_dim=32, num_heads=2)
ARCHITECTURES = {
    "dinov2": ("vit_small_patch14_dinov2", dict(img_size=56)),
    "dinov2_reg": ("vit_small_patch14_reg4_dinov2", dict(img_size=56)),
    "dinov3": ("vit_small_patch16_dinov3_qkvb", dict(img_size=64)),
    "eva02": ("eva02_small_patch14_224", dict(img_size=56)),
}
HF_CONFIG = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, image_size=56)
HF = {
    "dinov2": (transformers.Dinov2Backbone, lambda **kw: transformers.Dinov2Config(**HF_CONFIG, patch_size=14, **kw)),
    "dinov2_with_registers": (
        transformers.Dinov2WithRegistersBackbone,
        lambda **kw: transformers.Dinov2WithRegistersConfig(**HF_CONFIG, patch_size=14, **kw),
    ),
    "dinov3_vit": (
        transformers.DINOv3ViTBackbone,
        lambda **kw: transformers.DINOv3ViTConfig(
            **HF_CONFIG, patch_size=16, intermediate_size=64, num_register_tokens=2, **kw
        ),
    ),
}


def perturbed(model: nn.Module) -> nn.Module:
    """Every parameter moved off its initial value (zero biases, unit norms and 1.0 layer scales hide mix-ups)."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
    return model.eval()


def tiny_vit(kind: str, **kwargs) -> ViTBackbone:
    torch.manual_seed(0)
    model_name, extra = ARCHITECTURES[kind]
    return ViTBackbone(model_name, **TINY, **extra, **kwargs)


def hf_vit(model_type: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    cls, config = HF[model_type]
    return perturbed(cls(config(**kwargs)))


def padded(x: torch.Tensor, patch: int) -> torch.Tensor:
    """What the backbone does to an odd-sized input before the patch embedding."""
    return F.pad(x, (0, (-x.shape[-1]) % patch, 0, (-x.shape[-2]) % patch))


def assert_same_maps(ours, reference, atol: float = 1e-4) -> None:
    assert len(ours) == len(reference)
    for a, b in zip(ours, reference, strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=atol, rtol=0)


# ---- the backbone API ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(ARCHITECTURES))
def test_stages_selection_and_shapes(kind):
    model = tiny_vit(kind).eval()
    patch = model.patch_size
    assert model.stage_names == ["stem", "stage1", "stage2", "stage3", "stage4"]
    assert model.out_features == ["stage4"] and model.out_indices == [4]  # transformers' default: the last stage
    assert model.channels == [32] and model.strides == [patch]
    assert model.feature_info[0] == {"name": "stem", "num_chs": 32, "reduction": patch}

    model.out_indices = (0, 2, -1)  # tuples and negative indices, kept as given
    assert model.out_features == ["stem", "stage2", "stage4"] and model.out_indices == [0, 2, -1]
    model.out_features = ["stage1", "stage3"]
    assert model.out_indices == [1, 3] and model.channels == [32, 32] and model.strides == [patch, patch]
    for bad in (dict(out_indices=[3, 1]), dict(out_indices=[5]), dict(out_features=["stage1", "stage1"])):
        with pytest.raises(ValueError, match="valid stage names"):
            model.set_outputs(**bad)
    with pytest.raises(ValueError, match="select different stages"):
        tiny_vit(kind, out_features=["stage1"], out_indices=[2])

    model.out_indices = [0, 1, 2, 3, 4]
    for height, width in SIZES:
        with torch.no_grad():
            maps = model(torch.randn(2, 3, height, width)).feature_maps
        grid = (-(-height // patch), -(-width // patch))  # padded to the patch size: ceil
        assert [tuple(m.shape) for m in maps] == [(2, 32, *grid)] * 5
        assert all(torch.isfinite(m).all() for m in maps)


def test_padding_is_what_the_maps_see():
    """An odd-sized input gives the maps of the same input zero-padded to the patch size by hand."""
    model = tiny_vit("dinov2", out_indices=[2, 4])
    x = torch.randn(1, 3, 200, 333)
    with torch.no_grad():
        assert_same_maps(model(x).feature_maps, model(padded(x, 14)).feature_maps, atol=0)


def test_not_a_vit_is_refused():
    with pytest.raises(ValueError, match="unknown timm model 'vit_smol'"):
        ViTBackbone("vit_smol")
    with pytest.raises(
        ValueError, match="'resnet18' is a model of timm.models.resnet: ViTBackbone takes timm VisionTransformer or Eva"
    ):
        ViTBackbone("resnet18")


# ---- parity with transformers -------------------------------------------------------------------------
@pytest.mark.parametrize("model_type", list(HF))
def test_transformers_checkpoints_give_transformers_feature_maps(tmp_path, model_type):
    """save_pretrained (v4 key names for DINOv2, `layer.N` for DINOv3) and the v5 in-memory names (raw state dict
    + config.json), through a folder and a Hub repo in the offline cache; maps equal at 224 and at 200 x 333."""
    hf = hf_vit(model_type, out_indices=[0, 1, 3])
    hf.save_pretrained(tmp_path / "v4")
    (tmp_path / "v5").mkdir()
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, tmp_path / "v5" / "model.safetensors")
    (tmp_path / "v5" / "config.json").write_text(hf.config.to_json_string())
    patch = hf.config.patch_size
    for folder in ("v4", "v5"):
        ours = AutoBackbone.from_pretrained(tmp_path / folder).eval()
        assert isinstance(ours, ViTBackbone) and ours.out_features == ["stem", "stage1", "stage3"]
        assert ours.stage_names == hf.stage_names and ours.channels == [32, 32, 32]
        assert ours.load_report.missing == [] and ours.load_report.ignored == ["embeddings.mask_token"]
        for size in SIZES:
            x = torch.randn(2, 3, *size)
            with torch.no_grad():
                assert_same_maps(ours(x).feature_maps, hf(padded(x, patch)).feature_maps)


def test_transformers_hub_repo_from_the_offline_cache(tmp_path, hub_cache):  # noqa: F811  (the fixture)
    hf = hf_vit("dinov2", out_indices=[3])
    hf.save_pretrained(tmp_path / "hf")
    put_in_hub_cache(hub_cache, "facebook/dinov2-tiny", {p.name: p for p in (tmp_path / "hf").iterdir()})
    ours = AutoBackbone.from_pretrained("facebook/dinov2-tiny", out_indices=[2, 3]).eval()
    x = torch.randn(1, 3, 70, 98)
    with torch.no_grad():
        hf.out_indices = [2, 3]
        assert_same_maps(ours(x).feature_maps, hf(x).feature_maps)


def test_pretrained_into_a_config_with_a_pyramid_reports_the_new_layers(tmp_path):
    hf_vit("dinov2_with_registers", out_indices=[3]).save_pretrained(tmp_path / "hf")
    backbone = AutoBackbone.from_config(
        "dinov2_small_reg", pretrained=str(tmp_path / "hf"), **TINY | {"depth": 3}, img_size=56, pyramid={}
    )
    assert backbone.pyramid is None  # an empty pyramid setting means none
    backbone = AutoBackbone.from_pretrained(tmp_path / "hf", pyramid={"mode": "simple", "channels": 16})
    report = backbone.load_report
    assert report.missing and all(k.startswith("pyramid.") for k in report.missing)  # fresh, and listed
    assert "not in the checkpoint, freshly initialised: pyramid." in str(report)
    assert backbone.channels == [16] * 4 and backbone.strides == [4, 8, 16, 32]


# ---- parity with timm ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["dinov2_reg", "dinov3", "eva02"])
def test_timm_weights_give_timms_outputs(tmp_path, kind):
    """A timm model's state dict (classifier included) loads with a report, and the maps equal timm's
    `forward_intermediates` (final norm applied), at the model's own size and, with timm's antialiased
    position-embedding resampling, at an odd size (timm padding dynamically)."""
    model_name, extra = ARCHITECTURES[kind]
    torch.manual_seed(0)
    reference = perturbed(
        timm.create_model(
            model_name,
            **TINY,
            **extra,
            num_classes=10,
            global_pool="token",
            dynamic_img_size=True,
            dynamic_img_pad=True,
        )
    )
    save_file(reference.state_dict(), tmp_path / "timm.safetensors")
    ours = ViTBackbone(model_name, **TINY, **extra, out_indices=[1, 2, 4], pos_embed_antialias=True)
    report = ours.load_pretrained(tmp_path / "timm.safetensors")
    assert report.missing == [] and "head.weight" in report.ignored
    ours.eval()
    size = extra["img_size"]
    for shape in [(size, size), (200, 333)]:
        x = torch.randn(2, 3, *shape)
        with torch.no_grad():
            expected = reference.forward_intermediates(x, indices=[0, 1, 3], norm=True, intermediates_only=True)
            assert_same_maps(ours(x).feature_maps, expected)


# ---- refusals -----------------------------------------------------------------------------------------
def test_a_resnet_checkpoint_is_refused_naming_the_first_key(tmp_path):
    torch.save(timm.create_model("resnet18").state_dict(), tmp_path / "resnet18.pth")  # keeps the key order
    model = tiny_vit("dinov2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"'conv1\.weight' is not a weight of ViTBackbone\('vit_small_patch14_dinov2'"):
        model.load_pretrained(tmp_path / "resnet18.pth")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing was copied
    with pytest.raises(ValueError, match=r"'conv1\.weight' is not a weight of ViTBackbone"):
        AutoBackbone.from_pretrained(tmp_path / "resnet18.pth", architecture="dinov2_small")

    torch.manual_seed(0)
    transformers.ResNetModel(transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 8, 8, 8])).save_pretrained(
        tmp_path / "hf_resnet"
    )
    with pytest.raises(ValueError, match=r"transformers 'resnet' checkpoint .*not a ViTBackbone"):
        model.load_pretrained(tmp_path / "hf_resnet")
    with pytest.raises(ValueError, match=r"holds a transformers 'resnet' model, but ViTBackbone is a vit backbone"):
        model.load_pretrained(tmp_path / "hf_resnet" / "model.safetensors")


def test_another_width_or_depth_is_refused(tmp_path):
    hf_vit("dinov2", out_indices=[3]).save_pretrained(tmp_path / "hf")
    with pytest.raises(ValueError, match=r"weight 'vit\.cls_token' has shape \(1, 1, 32\) in the checkpoint"):
        ViTBackbone("vit_small_patch14_dinov2", depth=3, embed_dim=64, num_heads=2, img_size=56).load_pretrained(
            tmp_path / "hf"
        )
    with pytest.raises(ValueError, match=r"weights of ViTBackbone are not in the checkpoint: vit\.blocks\.3\."):
        ViTBackbone("vit_small_patch14_dinov2", **TINY, img_size=56).load_pretrained(tmp_path / "hf")
    config = HF["dinov2"][1](use_swiglu_ffn=True).to_dict()
    (tmp_path / "swiglu").mkdir()
    (tmp_path / "swiglu" / "config.json").write_text(json.dumps(config))
    save_file({"x": torch.zeros(1)}, tmp_path / "swiglu" / "model.safetensors")
    with pytest.raises(ValueError, match="sets use_swiglu_ffn=True; the native backbone supports only"):
        AutoBackbone.from_pretrained(tmp_path / "swiglu")


# ---- saving, freezing, checkpointing --------------------------------------------------------------------
def test_save_pretrained_round_trip_with_the_pyramid(tmp_path):
    model = perturbed(tiny_vit("dinov3", out_indices=[1, 2, 3, 4], pyramid={"mode": "per_block", "channels": 16}))
    model.save_pretrained(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "config.json").read_text())["densepred_backbone"]
    assert config["pyramid"] == {"mode": "per_block", "strides": [4, 8, 16, 32], "channels": 16}
    loaded = AutoBackbone.from_pretrained(tmp_path / "saved").eval()
    assert loaded.load_report.missing == [] and loaded.out_features == ["stage1", "stage2", "stage3", "stage4"]
    x = torch.randn(1, 3, 100, 130)
    with torch.no_grad():
        assert_same_maps(loaded(x).feature_maps, model(x).feature_maps, atol=0)


def test_freeze_at_freezes_the_embeddings_and_the_first_blocks():
    model = tiny_vit("dinov2_reg", freeze_at=2).train()
    vit = model.vit
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert {"vit.cls_token", "vit.reg_token", "vit.pos_embed", "vit.patch_embed.proj.weight"} <= frozen
    assert all(n.startswith(("vit.blocks.0.", "vit.blocks.1.")) for n in frozen if n.startswith("vit.blocks."))
    assert any(n.startswith("vit.blocks.1.") for n in frozen) and vit.blocks[2].attn.qkv.weight.requires_grad
    assert not vit.blocks[1].training and vit.blocks[2].training
    none = tiny_vit("dinov2_reg", freeze_at=-1)
    assert all(p.requires_grad for p in none.parameters())
    unnormed = tiny_vit("dinov2_reg", apply_layernorm=False)  # the final norm, unused, is kept but not trained
    assert not any(p.requires_grad for p in unnormed.vit.norm.parameters())


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 60, 90)
    grads = []
    for checkpointing in (False, True):
        model = tiny_vit("eva02", out_indices=[2, 4]).train()
        if checkpointing:  # every block (rotary embeddings passed as a keyword) recomputed in backward
            assert enable_activation_checkpointing(model.repeated_blocks()) == 4
        sum(m.square().mean() for m in model(x).feature_maps).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5)


def test_drop_path_follows_timms_linear_rule():
    model = tiny_vit("dinov2", drop_path_rate=0.3)
    rates = [getattr(block.drop_path1, "drop_prob", 0.0) for block in model.vit.blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3])


# ---- the pyramid --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["dinov2", "dinov3"])  # patch 14 (resampled levels) and 16 (exact strides)
@pytest.mark.parametrize("mode", ["simple", "per_block"])
def test_pyramid_strides_channels_and_shapes(kind, mode):
    selection = {"out_indices": [1, 2, 3, 4]} if mode == "per_block" else {}
    model = tiny_vit(kind, pyramid={"mode": mode, "strides": [4, 8, 16, 32], "channels": 24}, **selection).eval()
    assert model.strides == [4, 8, 16, 32] and model.channels == [24] * 4
    assert model.pyramid.scales == [2, 1, 0, -1]  # two deconvolutions, one, none, a max-pool
    for height, width in SIZES:
        with torch.no_grad():
            levels = model(torch.randn(1, 3, height, width)).feature_maps
        assert [tuple(m.shape) for m in levels] == [(1, 24, -(-height // s), -(-width // s)) for s in (4, 8, 16, 32)]


def test_pyramid_levels_match_vitdet_on_an_exact_grid():
    """Patch 16 on a 64 x 96 input: each level is the deconvolutions / max-pool of the last map, no resampling."""
    model = tiny_vit("dinov3", pyramid={"channels": 8}).eval()
    x = torch.randn(1, 3, 64, 96)
    pyramid = model.pyramid
    with torch.no_grad():
        model.pyramid = None
        (last,) = model(x).feature_maps  # (1, 32, 4, 6) at stride 16
        levels = [output(resample(last)) for resample, output in zip(pyramid.resample, pyramid.output, strict=True)]
        model.pyramid = pyramid
        assert_same_maps(model(x).feature_maps, levels, atol=0)


def test_pyramid_needs_a_matching_selection():
    with pytest.raises(ValueError, match="'per_block' pyramid takes 4 selected stage"):
        tiny_vit("dinov2", pyramid={"mode": "per_block"})
    model = tiny_vit("dinov2", pyramid={"mode": "simple"})
    with pytest.raises(ValueError, match="'simple' pyramid takes 1 selected stage"):
        model.out_indices = [2, 4]
    assert model.out_features == ["stage4"]  # unchanged after the refusal
    model.out_indices = [2]
    assert model.out_features == ["stage2"] and model.strides == [4, 8, 16, 32]
    with pytest.raises(ValueError, match="pyramid takes the keys mode, strides and channels"):
        tiny_vit("dinov2", pyramid={"levels": 4})
    with pytest.raises(ValueError, match="pyramid mode='fpn' is not supported"):
        tiny_vit("dinov2", pyramid={"mode": "fpn"})


# ---- layer-wise lr decay --------------------------------------------------------------------------------
class Segmenterish(nn.Module):
    """A 4-block ViT with a pyramid as `backbone`, and a head."""

    def __init__(self, **backbone_kwargs) -> None:
        super().__init__()
        self.backbone = tiny_vit("dinov2_reg", pyramid={"channels": 8}, **backbone_kwargs)
        self.head = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))


def test_layer_decay_groups_follow_the_formula():
    decay, lr = 0.75, 1e-4
    model = Segmenterish(layer_decay=decay)  # the backbone brings its rate; the optimizer builder reads it
    groups = param_groups(model, lr, 0.05)
    multipliers = {g["name"]: round(g["lr"] / lr, 12) for g in groups}
    # layer i of L = 4 blocks gets decay ** (L + 1 - i): embeddings i = 0, block k i = k, norm and pyramid i = 5
    assert multipliers == {
        "backbone_layer0_wd0": round(decay**5, 12),  # cls / register tokens, position embeddings: no decay
        "backbone_layer0_wd0.05": round(decay**5, 12),  # patch embedding
        **{f"backbone_layer{i}_wd{wd}": round(decay ** (5 - i), 12) for i in (1, 2, 3, 4) for wd in ("0", "0.05")},
        "backbone_layer5_wd0": 1.0,  # the final norm and the pyramid's norms
        "backbone_layer5_wd0.05": 1.0,  # the pyramid's convolutions
        "head_wd0.05": 1.0,
        "head_wd0": 1.0,
    }
    names = {id(p): n for n, p in model.named_parameters()}
    members = {g["name"]: {names[id(p)] for p in g["params"]} for g in groups}
    assert members["backbone_layer0_wd0"] == {
        "backbone.vit.cls_token",
        "backbone.vit.reg_token",
        "backbone.vit.pos_embed",
    }
    assert members["backbone_layer0_wd0.05"] == {
        "backbone.vit.patch_embed.proj.weight",
        "backbone.vit.patch_embed.proj.bias",
    }
    assert "backbone.vit.blocks.2.norm1.weight" in members["backbone_layer3_wd0"]
    assert "backbone.vit.blocks.2.attn.qkv.weight" in members["backbone_layer3_wd0.05"]
    assert {"backbone.vit.norm.weight", "backbone.pyramid.output.0.1.weight"} <= members["backbone_layer5_wd0"]
    assert sorted(id(p) for g in groups for p in g["params"]) == sorted(id(p) for p in model.parameters())

    # optimizer.layer_decay overrides the backbone's; 1.0 turns it off (the flat backbone multiplier again)
    overridden = [g["lr"] for g in param_groups(model, lr, 0.05, layer_decay=0.5) if "layer0" in g["name"]]
    assert overridden == pytest.approx([lr * 0.5**5] * 2)
    flat = {g["name"]: g["lr"] for g in param_groups(model, lr, 0.05, backbone_lr_multiplier=0.1, layer_decay=1.0)}
    assert flat == {
        "backbone_wd0": pytest.approx(1e-5),
        "backbone_wd0.05": pytest.approx(1e-5),
        "head_wd0.05": lr,
        "head_wd0": lr,
    }


def test_layer_decay_needs_a_backbone_with_layers():
    model = nn.Module()
    model.backbone = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="layer_decay=0.8 needs a backbone with layers"):
        param_groups(model, 1e-4, 0.05, layer_decay=0.8)


# ---- end to end ---------------------------------------------------------------------------------------
# configs/backbone/dinov2_small.yaml (simple pyramid, layer decay) made tiny: 2 blocks of width 48, 56 px position grid.
TINY_DINOV2 = [
    "backbone=dinov2_small",
    "backbone.pretrained=null",
    "backbone.out_features=[stage2]",
    "backbone.pyramid.channels=32",
    "+backbone.depth=2",
    "+backbone.embed_dim=48",
    "+backbone.num_heads=2",
    "+backbone.img_size=56",
]


def tiny_dinov2_overrides(tiny, data_root, head: str, neck: str | None = None) -> list[str]:
    overrides = [o for o in tiny.train_overrides(data_root, head) if o != "backbone=resnet18"] + TINY_DINOV2
    if neck == "fpn":  # the FPN has out_channels instead of the pixel decoders' conv_dim / encoder settings
        overrides = [o for o in overrides if not o.startswith("neck.")]
        overrides += ["neck=fpn", "neck.out_channels=32", "neck.mask_dim=32"]
    return overrides


@pytest.fixture(scope="module")
def train_script(tiny):
    return tiny.load_script("train")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("head", "neck"),
    [(h, None) for h in ("mask2former", "maskformer", "mask2former_small")] + [("mask2former_small", "fpn")],
)
def test_train_runs_dinov2_small_with_every_head(tmp_path, tiny, synthetic_root, train_script, head, neck):
    cfg = tiny.compose_train(
        [*tiny_dinov2_overrides(tiny, synthetic_root, head, neck), "test_after_fit=false"], tmp_path
    )
    results = train_script.main.__wrapped__(cfg)
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 2
    weights = checkpoint["state_dict"]
    assert (
        "model.backbone.pyramid.output.0.0.weight" in weights
        and "model.backbone.vit.blocks.1.attn.qkv.weight" in weights
    )
    assert results is not None
    metrics = tiny.read_metrics(tmp_path / "eval_val" / "metrics_step0000002.json")
    assert {"PQ", "mIoU"} <= set(metrics)
    names = {g["name"] for g in checkpoint["optimizer_states"][0]["param_groups"]}
    assert {"backbone_layer0_wd0", "backbone_layer1_wd0.05", "backbone_layer3_wd0.05", "head_wd0.05"} <= names
