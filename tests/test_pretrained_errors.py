"""Bad checkpoints give one clear error (ValueError / FileNotFoundError naming the file, key and fix),
never a raw traceback from inside torch, safetensors or huggingface_hub, and never a random backbone."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
import transformers
from safetensors.torch import save_file
from test_pretrained import hf_model, hub_cache, one_thread  # noqa: F401  (fixtures)

from densepred.backbones import AutoBackbone, SwinBackbone, TimmBackbone
from densepred.backbones.hf_conversion import native_backbone_from_hf_config

TINY_SWIN = dict(embed_dim=16, depths=(1, 2, 2, 1), num_heads=(1, 2, 2, 4))


@pytest.fixture
def swin_folder(tmp_path):
    hf_model("swin", out_indices=[1, 2, 3, 4]).save_pretrained(tmp_path / "swin")
    return tmp_path / "swin"


def test_checkpoint_of_another_family_is_refused(tmp_path, swin_folder):
    hf_model("convnext", out_indices=[4]).save_pretrained(tmp_path / "convnext")
    with pytest.raises(ValueError, match=r"transformers 'convnext' checkpoint .*not a SwinBackbone"):
        SwinBackbone(**TINY_SWIN).load_pretrained(tmp_path / "convnext")
    with pytest.raises(ValueError, match=r"holds a transformers 'swin' model, but ResNetBackbone is a resnet backbone"):
        AutoBackbone.from_pretrained(swin_folder / "model.safetensors", architecture="resnet18")
    save_file({"stem.0.weight": torch.zeros(8, 3, 4, 4)}, tmp_path / "convnext_stem.safetensors")
    with pytest.raises(ValueError, match=r"holds no weight of ResNetBackbone: it is another architecture"):
        AutoBackbone.from_pretrained(tmp_path / "convnext_stem.safetensors", architecture="resnet18")


def test_other_depth_is_refused_naming_the_weights(swin_folder):
    deeper = SwinBackbone(embed_dim=16, depths=(1, 2, 3, 1), num_heads=(1, 2, 2, 4))
    before = {k: v.clone() for k, v in deeper.state_dict().items()}
    with pytest.raises(
        ValueError,
        match=r"does not match SwinBackbone.*weights of SwinBackbone are not in the checkpoint: layers\.2\.blocks\.2\.",
    ):
        deeper.load_pretrained(swin_folder)
    # nothing was half-loaded: shapes and keys are checked before any weight is copied
    assert all(torch.equal(v, before[k]) for k, v in deeper.state_dict().items())


def test_shape_mismatch_names_the_first_key_and_both_shapes(swin_folder):
    wider = SwinBackbone(embed_dim=32, depths=(1, 2, 2, 1), num_heads=(1, 2, 2, 4))
    before = wider.patch_embed.proj.weight.clone()
    shapes = (
        r"weight 'patch_embed\.proj\.weight' has shape \(16, 3, 4, 4\) in the checkpoint "
        r"but \(32, 3, 4, 4\) in SwinBackbone"
    )
    with pytest.raises(ValueError, match=shapes):
        wider.load_pretrained(swin_folder)
    assert torch.equal(wider.patch_embed.proj.weight, before)
    with pytest.raises(ValueError, match=r"'patch_embed\.proj\.weight' has shape \(16, 3, 4, 4\).*\(96, 3, 4, 4\)"):
        AutoBackbone.from_config("swin_tiny", pretrained=str(swin_folder))


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"checkpoint '.*nope\.safetensors' not found"):
        AutoBackbone.from_pretrained(tmp_path / "nope.safetensors", architecture="resnet18")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"folder .*empty holds no weights: expected one of \('model\.safetensors'"):
        AutoBackbone.from_pretrained(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="timm weights 'nowhere.pth' not found"):
        TimmBackbone("convnext_atto", pretrained="nowhere.pth")


@pytest.mark.usefixtures("hub_cache")  # an empty cache, offline
def test_weights_missing_offline_name_both_fixes():
    """Offline and not in the cache: the error says how to get the weights and how to train without them."""
    for source, revision in (("someone/not-downloaded", None), ("someone/pinned", "v2")):
        with pytest.raises(ValueError) as error:
            AutoBackbone.from_pretrained(source, revision=revision)
        message = str(error.value)
        command = source + (f" --revision {revision}" if revision else "")
        assert f"Hub repo {source!r} is not in the cache" in message and "HF_HUB_OFFLINE is set" in message
        assert f"`hf download {command}`" in message and f"`huggingface-cli download {command}`" in message
        assert "HF_HUB_OFFLINE unset" in message and "`backbone.pretrained=null`" in message


def test_corrupt_safetensors_file(tmp_path, swin_folder):
    weights = swin_folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated download
    with pytest.raises(
        ValueError, match=r"model\.safetensors is not a valid safetensors file .*download or convert it again"
    ):
        AutoBackbone.from_pretrained(swin_folder)
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(
        ValueError, match="loading pretrained weights .*garbage.safetensors.* into timm model 'convnext_atto' failed"
    ):
        TimmBackbone("convnext_atto", pretrained=str(tmp_path / "garbage.safetensors"))


class _Payload:
    """Unpickling this would run code (create a file): weights_only loading must refuse it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_bin_with_pickled_objects_is_never_unpickled(tmp_path):
    marker = tmp_path / "code_ran"
    with open(tmp_path / "pytorch_model.bin", "wb") as file:
        pickle.dump({"conv1.weight": _Payload(marker)}, file, protocol=2)
    with pytest.raises(
        ValueError, match=r"pytorch_model\.bin holds pickled objects that are not tensors, which are never unpickled"
    ):
        AutoBackbone.from_pretrained(tmp_path / "pytorch_model.bin", architecture="resnet18")
    assert not marker.exists()
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1), "epoch": "ten"}}, tmp_path / "mixed.pth")
    with pytest.raises(ValueError, match=r"mixed\.pth: entry 'epoch' is a str, not a tensor"):
        AutoBackbone.from_pretrained(tmp_path / "mixed.pth", architecture="resnet18")
    (tmp_path / "truncated.bin").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(ValueError, match=r"truncated\.bin is not a readable PyTorch weights file"):
        AutoBackbone.from_pretrained(tmp_path / "truncated.bin", architecture="resnet18")


def test_configs_that_cannot_be_honoured(tmp_path, swin_folder):
    with pytest.raises(
        ValueError, match=r"has no config.json, so its architecture is unknown: pass architecture=<name>"
    ):
        AutoBackbone.from_pretrained(swin_folder / "model.safetensors")
    (swin_folder / "config.json").write_text(
        json.dumps({"densepred_backbone": {"_target_": "os.system", "command": "true"}})
    )
    with pytest.raises(ValueError, match=r"config.json names 'os.system'; loadable backbone classes are"):
        AutoBackbone.from_pretrained(swin_folder)
    absolute = transformers.SwinConfig(use_absolute_embeddings=True).to_dict()
    with pytest.raises(
        ValueError,
        match=r"sets use_absolute_embeddings=True; the native backbone supports only use_absolute_embeddings=False",
    ):
        native_backbone_from_hf_config(absolute)
    with pytest.raises(ValueError, match=r"model_type='vit'; transformers backbones that load natively are"):
        native_backbone_from_hf_config({"model_type": "vit"})
    with pytest.raises(ValueError, match=r"sets downsample_in_bottleneck=True"):
        native_backbone_from_hf_config(transformers.ResNetConfig(downsample_in_bottleneck=True).to_dict())
