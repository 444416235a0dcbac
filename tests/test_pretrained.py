"""Pretrained backbones: every supported source loads and gives its reference's features.

References: transformers' `*Backbone` models (same weights, same `out_indices`), timm
`create_model(features_only=True)`, timm's own loader for the original Microsoft Swin layout, and
torchvision's ResNet. Checkpoints are built here with random weights and tiny configs; Hub repos live in
a temporary cache laid out like huggingface_hub's, read with HF_HUB_OFFLINE=1.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
import transformers
from huggingface_hub import constants
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from safetensors.torch import save_file
from timm.models.convnext import checkpoint_filter_fn as timm_convnext_filter
from timm.models.swin_transformer import checkpoint_filter_fn

from densepred.backbones import AutoBackbone, ConvNeXtBackbone, ResNetBackbone, SwinBackbone, TimmBackbone
from densepred.backbones.hf_conversion import native_backbone_from_hf_config, split_hf_backbone_state_dict
from densepred.backbones.inspect import main as inspect_main
from densepred.convert.cli import main as convert_main

ROOT = Path(__file__).resolve().parents[1]
SIZES = [(224, 224), (225, 301)]  # square, and non-square not a multiple of 32
COMMIT = "0123456789abcdef0123456789abcdef01234567"

# Tiny transformers configs of each family (stage 3 has 2 blocks so Swin's shifted windows are exercised).
HF_CONFIGS = {
    "swin": lambda **kw: transformers.SwinConfig(embed_dim=16, depths=[1, 2, 2, 1], num_heads=[1, 2, 2, 4], **kw),
    "resnet": lambda **kw: transformers.ResNetConfig(
        embedding_size=8, hidden_sizes=[16, 16, 32, 32], depths=[1, 2, 1, 1], layer_type="bottleneck", **kw
    ),
    "resnet-basic": lambda **kw: transformers.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16, 16, 32], depths=[1, 2, 1, 1], layer_type="basic", **kw
    ),
    "convnext": lambda **kw: transformers.ConvNextConfig(hidden_sizes=[8, 16, 16, 32], depths=[1, 1, 2, 1], **kw),
}
HF_BACKBONES = {
    "swin": transformers.SwinBackbone,
    "resnet": transformers.ResNetBackbone,
    "resnet-basic": transformers.ResNetBackbone,
    "convnext": transformers.ConvNextBackbone,
}
HF_CLASSIFIERS = {
    "swin": transformers.SwinForImageClassification,
    "resnet": transformers.ResNetForImageClassification,
    "convnext": transformers.ConvNextForImageClassification,
}
NATIVE = {"swin": SwinBackbone, "resnet": ResNetBackbone, "resnet-basic": ResNetBackbone, "convnext": ConvNeXtBackbone}


# ---- helpers --------------------------------------------------------------------------------------
def randomize_norms(model: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial norm parameters and BatchNorm statistics (initial ones would hide a mix-up)."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if re.search(r"(norm|normalization|bn\d?|layernorm\w*|\.1)\.(weight|bias|running_mean)$", name):
                tensor.add_(0.1 * torch.randn(tensor.shape, generator=generator))
            elif name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
            elif name.endswith("layer_scale_parameter") or name.endswith("gamma"):
                tensor.fill_(0.5)
    return model.eval()


def hf_model(family: str, cls=None, **config_kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    config = HF_CONFIGS[family](**config_kwargs)
    return randomize_norms((cls or HF_BACKBONES[family])(config))


def put_in_hub_cache(cache: Path, repo_id: str, files: dict[str, Path]) -> None:
    """Lay `files` out as huggingface_hub's cache does: models--org--name/{refs/main, snapshots/<commit>/}."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for name, path in files.items():
        shutil.copy(path, snapshot / name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one thread is fastest, and keeps a shared machine usable."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache in tmp_path, offline (no network is ever used)."""
    cache = tmp_path / "hf_home" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(cache.parent))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def assert_same_maps(ours, reference, atol: float = 1e-4) -> None:
    assert len(ours) == len(reference)
    for a, b in zip(ours, reference, strict=True):
        assert a.shape == b.shape
        assert (a - b).abs().max().item() <= atol


def compare(ours: torch.nn.Module, reference, sizes=SIZES, nhwc: bool = False) -> None:
    ours.eval()
    for size in sizes:
        x = torch.randn(2, 3, *size)
        with torch.no_grad():
            expected = reference(x)
            expected = expected.feature_maps if hasattr(expected, "feature_maps") else expected
            if nhwc:
                expected = [e.permute(0, 3, 1, 2) for e in expected]
            assert_same_maps(ours(x).feature_maps, expected)


# ---- transformers ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("family", "out_indices"),
    [("swin", [1, 2, 3, 4]), ("resnet", [0, 1, 2, 3, 4]), ("resnet-basic", [1, 3]), ("convnext", [0, 2, 4])],
)
def test_transformers_backbone_checkpoint_gives_the_same_features(tmp_path, family, out_indices):
    reference = hf_model(family, out_indices=out_indices)
    reference.save_pretrained(tmp_path)  # what transformers writes (Swin: reverted to the Hub's v4 names)
    ours = AutoBackbone.from_pretrained(tmp_path)
    assert isinstance(ours, NATIVE[family])
    assert ours.out_indices == out_indices and ours.channels == list(reference.channels)
    assert ours.load_report.missing == [] and ours.load_report.unused == []
    compare(ours, reference)


@pytest.mark.parametrize("family", ["swin", "resnet", "convnext"])
def test_v5_in_memory_layout_loads(tmp_path, family):
    """transformers 5 module names (Swin: `swin.` prefix, q/k/v/o_proj, mlp.fc1) as model.state_dict() holds them."""
    reference = hf_model(family, out_indices=[1, 2, 3, 4])
    reference.config.save_pretrained(tmp_path)
    state_dict = reference.state_dict()
    if family == "swin":
        assert any(".attention.q_proj." in k for k in state_dict) and all(
            k.startswith(("swin.", "hidden")) for k in state_dict
        )
    save_file({k: v.contiguous() for k, v in state_dict.items()}, tmp_path / "model.safetensors")
    compare(AutoBackbone.from_pretrained(tmp_path), reference, sizes=SIZES[1:])


def to_hub_v4_swin(state_dict: dict[str, torch.Tensor], prefix: str = "swin.") -> dict[str, torch.Tensor]:
    """transformers 5 Swin names -> the v4 names of Hub files, with the position-index buffers they carry."""
    rules = [
        (r"\.attention\.([qkv])_proj\.", lambda m: f".attention.self.{dict(q='query', k='key', v='value')[m[1]]}."),
        (
            r"\.attention\.relative_position_bias\.relative_position_bias_table",
            lambda m: ".attention.self.relative_position_bias_table",
        ),
        (r"\.attention\.o_proj\.", lambda m: ".attention.output.dense."),
        (r"\.mlp\.fc1\.", lambda m: ".intermediate.dense."),
        (r"\.mlp\.fc2\.", lambda m: ".output.dense."),
    ]
    out = {}
    for key, value in state_dict.items():
        for pattern, replacement in rules:
            key = re.sub(pattern, replacement, key)
        key = prefix + key.removeprefix("swin.") if key.startswith("swin.") else key
        out[key] = value
        if key.endswith("relative_position_bias_table"):
            out[key.replace("_bias_table", "_index")] = torch.zeros(49, 49, dtype=torch.long)
    return out


def test_hub_v4_classification_checkpoint_from_the_offline_cache(tmp_path, hub_cache):
    """A Hub-style Swin classification repo (v4 names, pytorch_model.bin, `swin.` prefix) by repo id, offline:
    equal to transformers' SwinBackbone loaded from the same repo (output norms fresh on both sides)."""
    classifier = hf_model("swin", cls=transformers.SwinForImageClassification)
    folder = tmp_path / "hub_files"
    classifier.config.save_pretrained(folder)
    torch.save(to_hub_v4_swin(classifier.state_dict()), folder / "pytorch_model.bin")
    put_in_hub_cache(
        hub_cache,
        "someone/swin-tiny-test",
        {"config.json": folder / "config.json", "pytorch_model.bin": folder / "pytorch_model.bin"},
    )

    ours = AutoBackbone.from_pretrained("someone/swin-tiny-test", out_indices=[1, 2, 3, 4])
    assert set(ours.load_report.missing) == {f"out_norms.stage{i}.{p}" for i in range(1, 5) for p in ("weight", "bias")}
    assert "swin.layernorm.weight" in ours.load_report.ignored and "classifier.weight" in ours.load_report.ignored
    assert "freshly initialised: out_norms.stage1.weight" in str(ours.load_report)
    reference = transformers.SwinBackbone.from_pretrained(folder, out_indices=[1, 2, 3, 4]).eval()
    compare(ours, reference)


def test_revision_and_sharded_safetensors_from_the_cache(tmp_path, hub_cache):
    reference = hf_model("convnext", out_indices=[1, 2, 3, 4])
    folder = tmp_path / "sharded"
    reference.save_pretrained(folder, max_shard_size="20KB")
    files = {p.name: p for p in folder.iterdir()}
    assert "model.safetensors.index.json" in files and len(files) > 3
    put_in_hub_cache(hub_cache, "someone/convnext-sharded", files)
    ours = AutoBackbone.from_pretrained("someone/convnext-sharded", revision=COMMIT)
    compare(ours, reference, sizes=SIZES[:1])
    with pytest.raises(ValueError, match="not in the cache"):
        AutoBackbone.from_pretrained("someone/not-downloaded")


def test_native_config_of_a_maskformer_swin_and_its_weights():
    """MaskFormer's Swin (model_type maskformer-swin, prefix `model.`, list of output norms) equals transformers'."""
    torch.manual_seed(0)
    config = transformers.MaskFormerSwinConfig(
        embed_dim=16, depths=[1, 2, 2, 1], num_heads=[1, 2, 2, 4], out_features=["stage1", "stage2", "stage3", "stage4"]
    )
    reference = randomize_norms(transformers.MaskFormerSwinBackbone(config))
    target, kwargs = native_backbone_from_hf_config(config.to_dict())
    assert target == "densepred.backbones.SwinBackbone"
    ours = SwinBackbone(**kwargs)
    ours.load_state_dict(split_hf_backbone_state_dict(reference.state_dict(), config.model_type)[0], strict=True)
    compare(ours, reference, sizes=SIZES[1:])


def test_from_config_loads_a_transformers_checkpoint_into_a_named_architecture(tmp_path):
    torch.manual_seed(0)
    reference = randomize_norms(
        transformers.ResNetBackbone(
            transformers.ResNetConfig(
                layer_type="basic", hidden_sizes=[64, 128, 256, 512], depths=[2, 2, 2, 2], out_indices=[1, 2, 3, 4]
            )
        )
    )  # microsoft/resnet-18's architecture
    reference.save_pretrained(tmp_path)
    ours = AutoBackbone.from_config("resnet18", out_indices=[1, 2, 3, 4], pretrained=str(tmp_path))
    compare(ours, reference, sizes=[(64, 96)])


# ---- timm -----------------------------------------------------------------------------------------
def timm_reference(name: str = "convnext_atto"):
    """A random timm classification model's weights, and its four stage outputs as reference
    (`forward_intermediates` of the model holding them: no timm loader involved)."""
    torch.manual_seed(0)
    model = randomize_norms(timm.create_model(name))
    return (lambda x: model.forward_intermediates(x, indices=4, intermediates_only=True)), model.state_dict()


def test_timm_weights_file_through_timms_loader(tmp_path):
    reference, weights = timm_reference()
    save_file(weights, tmp_path / "convnext_atto.safetensors")
    ours = AutoBackbone.from_pretrained(
        tmp_path / "convnext_atto.safetensors", architecture="convnext_atto", out_indices=[0, 1, 2, 3]
    )
    assert isinstance(ours, TimmBackbone)
    compare(ours, reference)


def test_timm_hub_repo_and_default_pretrained_name_from_the_offline_cache(tmp_path, hub_cache):
    reference, weights = timm_reference()
    save_file(weights, tmp_path / "model.safetensors")
    timm_config = {
        "architecture": "convnext_atto",
        "num_classes": 1000,
        "pretrained_cfg": {"tag": "test", "num_classes": 1000},
    }
    (tmp_path / "config.json").write_text(json.dumps(timm_config))
    files = {"config.json": tmp_path / "config.json", "model.safetensors": tmp_path / "model.safetensors"}
    put_in_hub_cache(hub_cache, "timm/convnext_atto.test", files)
    put_in_hub_cache(hub_cache, "timm/convnext_atto.d2_in1k", files)  # timm's default weights for convnext_atto

    for source in (
        "timm/convnext_atto.test",
        "convnext_atto",
        "convnext_atto.d2_in1k",
        str(tmp_path),
    ):  # + local folder
        ours = AutoBackbone.from_pretrained(source, out_indices=[0, 1, 2, 3])
        assert isinstance(ours, TimmBackbone)
        compare(ours, reference, sizes=SIZES[1:])
    # and as a config value: TimmBackbone(pretrained=<Hub repo id>)
    compare(
        TimmBackbone("convnext_atto", out_indices=[0, 1, 2, 3], pretrained="timm/convnext_atto.test"),
        reference,
        SIZES[1:],
    )


# ---- original layouts -----------------------------------------------------------------------------
def to_microsoft_swin(timm_state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm Swin weights -> the original Microsoft release: patch merging at the end of stage N, `head`,
    `attn_mask` / `relative_position_index` buffers, wrapped in {"model": ...}."""
    out = {}
    for key, value in timm_state_dict.items():
        key = re.sub(r"^layers\.(\d+)\.downsample\.", lambda m: f"layers.{int(m[1]) - 1}.downsample.", key)
        out[key.replace("head.fc.", "head.")] = value
        if key.endswith("attn.relative_position_bias_table"):
            out[key.replace("relative_position_bias_table", "relative_position_index")] = torch.zeros(
                49, 49, dtype=torch.long
            )
            out[key.replace("attn.relative_position_bias_table", "attn_mask")] = torch.zeros(4, 49, 49)
    return out


def test_original_microsoft_swin_checkpoint(tmp_path):
    torch.manual_seed(0)
    kwargs = dict(embed_dim=16, depths=(1, 2, 2, 1), num_heads=(1, 2, 2, 4))
    timm_swin = randomize_norms(timm.create_model("swin_tiny_patch4_window7_224", always_partition=True, **kwargs))
    original = to_microsoft_swin(timm_swin.state_dict())
    # the layout built here is the one timm's own converter reads back into timm's model
    filtered = checkpoint_filter_fn(dict(original), timm_swin)
    assert {k: v.shape for k, v in filtered.items()} == {k: v.shape for k, v in timm_swin.state_dict().items()}
    torch.save({"model": original}, tmp_path / "swin_tiny_patch4_window7_224.pth")

    ours = SwinBackbone(**kwargs, out_indices=[1, 2, 3, 4])
    report = ours.load_pretrained(tmp_path / "swin_tiny_patch4_window7_224.pth")
    assert "head.weight" in report.ignored and "norm.weight" in report.ignored
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        levels = timm_swin.eval().forward_intermediates(x, indices=4, intermediates_only=True)  # NCHW
        expected = [
            F.layer_norm(t.permute(0, 2, 3, 1), t.shape[1:2]).permute(0, 3, 1, 2) for t in levels
        ]  # fresh out_norms
        assert_same_maps(ours.eval()(x).feature_maps, expected)


def test_original_facebook_convnext_checkpoint(tmp_path):
    torch.manual_seed(0)
    kwargs = dict(depths=(1, 1, 2, 1), dims=(8, 16, 16, 32))
    timm_convnext = randomize_norms(timm.create_model("convnext_tiny", **kwargs))
    original = {}
    for key, value in timm_convnext.state_dict().items():  # timm -> Facebook's release layout
        key = key.replace("stem.", "downsample_layers.0.").replace("head.fc.", "head.").replace("head.norm.", "norm.")
        key = re.sub(r"stages\.(\d+)\.downsample\.", r"downsample_layers.\1.", key)
        key = re.sub(r"stages\.(\d+)\.blocks\.(\d+)\.", r"stages.\1.\2.", key)
        original[key.replace("conv_dw", "dwconv").replace("mlp.fc", "pwconv")] = value
    filtered = timm_convnext_filter({"model": dict(original)}, timm_convnext)  # timm's converter reads it back
    assert all(torch.equal(filtered[k], v) for k, v in timm_convnext.state_dict().items())
    torch.save({"model": original}, tmp_path / "convnext_tiny_1k_224.pth")
    ours = ConvNeXtBackbone(**kwargs, out_indices=[1, 2, 3, 4])
    assert ours.load_pretrained(tmp_path / "convnext_tiny_1k_224.pth").ignored == [
        "norm.weight",
        "norm.bias",
        "head.weight",
        "head.bias",
    ]
    x = torch.randn(2, 3, 225, 301)
    with torch.no_grad():
        levels = timm_convnext.forward_intermediates(x, indices=4, intermediates_only=True)
        expected = [F.layer_norm(t.permute(0, 2, 3, 1), t.shape[1:2], eps=1e-6).permute(0, 3, 1, 2) for t in levels]
        assert_same_maps(ours.eval()(x).feature_maps, expected)


def test_mask2former_swin_backbone_checkpoint_with_output_norms(tmp_path):
    """Detectron2 / Mask2Former Swin: `backbone.` prefix, patch merging at stage ends, `norm0..norm3` output norms."""
    torch.manual_seed(0)
    source = SwinBackbone(embed_dim=16, depths=(1, 2, 2, 1), num_heads=(1, 2, 2, 4), out_indices=[1, 2, 3, 4])
    randomize_norms(source)
    original = {}
    for key, value in source.state_dict().items():
        key = re.sub(r"^layers\.(\d+)\.downsample\.", lambda m: f"layers.{int(m[1]) - 1}.downsample.", key)
        key = re.sub(r"^out_norms\.stage(\d)\.", lambda m: f"norm{int(m[1]) - 1}.", key)
        original["backbone." + key] = value
    original["sem_seg_head.predictor.class_embed.weight"] = torch.zeros(3, 4)
    torch.save({"model": original, "iteration": 5}, tmp_path / "model_final.pth")
    ours = SwinBackbone(embed_dim=16, depths=(1, 2, 2, 1), num_heads=(1, 2, 2, 4), out_indices=[1, 2, 3, 4])
    report = ours.load_pretrained(tmp_path / "model_final.pth")
    assert report.missing == [] and report.ignored == ["sem_seg_head.predictor.class_embed.weight"]
    compare(ours, source.eval(), sizes=SIZES[1:])


def test_torchvision_resnet_state_dict(tmp_path):
    torch.manual_seed(0)
    reference = randomize_norms(torchvision.models.resnet18())
    torch.save(reference.state_dict(), tmp_path / "resnet18-f37072fd.pth")
    ours = AutoBackbone.from_pretrained(
        tmp_path / "resnet18-f37072fd.pth", architecture="resnet18", out_indices=[1, 2, 3, 4]
    )
    assert ours.load_report.ignored == ["fc.weight", "fc.bias"]
    extractor = torchvision.models.feature_extraction.create_feature_extractor(
        reference, return_nodes=["layer1", "layer2", "layer3", "layer4"]
    )
    compare(ours, lambda x: list(extractor(x).values()), sizes=[(96, 130)])


# ---- save_pretrained, CLI, Hydra ------------------------------------------------------------------
@pytest.mark.parametrize(
    "make",
    [
        lambda: SwinBackbone(embed_dim=16, depths=(1, 2, 2, 1), num_heads=(1, 2, 2, 4), out_indices=[2, 4]),
        lambda: AutoBackbone.from_config("resnet18", out_indices=[1, 4], norm="bn"),
        lambda: ConvNeXtBackbone((1, 1, 2, 1), (8, 16, 16, 32), out_indices=[0, 3], layer_scale_init_value=None),
        lambda: TimmBackbone("convnext_atto", out_indices=[1, 3]),
    ],
)
def test_save_pretrained_round_trip(tmp_path, make):
    torch.manual_seed(0)
    model = randomize_norms(make())
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]  # no temp files left
    loaded = AutoBackbone.from_pretrained(tmp_path)
    assert type(loaded) is type(model) and loaded.out_features == model.out_features
    assert loaded.config == model.config
    compare(loaded, model, sizes=[(64, 96)])
    assert AutoBackbone.from_pretrained(tmp_path, out_indices=[-1]).out_indices == [-1]


def test_convert_cli_then_inspect_cli(tmp_path, capsys):
    hf_model("swin", out_indices=[1, 2, 3, 4]).save_pretrained(tmp_path / "hf")
    assert convert_main([str(tmp_path / "hf"), str(tmp_path / "native")]) == 0
    assert (
        json.loads((tmp_path / "native" / "config.json").read_text())["densepred_backbone"]["_target_"]
        == "densepred.backbones.SwinBackbone"
    )
    assert inspect_main([str(tmp_path / "native"), "--size", "64", "96"]) == 0
    out = capsys.readouterr().out
    assert (
        "* stage3             64     16  (1, 64, 4, 6)" in out
        and "  stem               16      4  (1, 16, 16, 24)" in out
    )
    assert convert_main([str(tmp_path / "missing"), str(tmp_path / "x")]) == 2
    assert "not found" in capsys.readouterr().err


@pytest.mark.slow
def test_inspect_runs_as_a_module():
    result = subprocess.run(
        [sys.executable, "-m", "densepred.backbones.inspect", "resnet50", "--size", "512"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "* stage4           2048     32  (1, 2048, 16, 16)" in result.stdout


def test_every_backbone_config_takes_pretrained_and_loads_offline_from_the_cache(tmp_path, hub_cache):
    configs = {p.stem: p.read_text() for p in (ROOT / "configs" / "backbone").glob("*.yaml")}
    assert all(re.search(r"^pretrained: ", text, re.M) for text in configs.values())
    torch.manual_seed(0)
    hf = transformers.ResNetForImageClassification(transformers.ResNetConfig())  # microsoft/resnet-50's architecture
    hf.save_pretrained(tmp_path / "r50")
    put_in_hub_cache(hub_cache, "microsoft/resnet-50", {p.name: p for p in (tmp_path / "r50").iterdir()})
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["backbone=resnet50"])
    assert cfg.backbone.pretrained == "microsoft/resnet-50"
    backbone = instantiate(cfg.backbone)
    torch.testing.assert_close(
        backbone.layer4[2].conv3.weight, hf.resnet.encoder.stages[3].layers[2].layer[2].convolution.weight
    )
