"""The speed and memory switches compute what the plain model computes: fused AdamW, activation checkpointing,
recomputed norm outputs, channels_last, and a model torch.compile traces as one graph."""

from __future__ import annotations

import copy

import pytest
import torch
from omegaconf import OmegaConf

from densepred.engine.module import SegmentationModule
from densepred.engine.optim import build_adamw

CATEGORIES = [{"id": i + 1, "name": f"class_{i}", "isthing": int(i < 2)} for i in range(3)]


def tiny_module(tiny, tmp_path, head="mask2former_small", **kwargs) -> SegmentationModule:
    cfg = tiny.compose_train(tiny.model_overrides(head), tmp_path)
    parts = {key: OmegaConf.to_container(cfg[key], resolve=True) for key in ("backbone", "neck", "head")}
    criterion = OmegaConf.to_container(cfg.criterion, resolve=True)
    torch.manual_seed(0)
    module = SegmentationModule(
        model=parts, criterion=criterion, metadata={"num_classes": 3, "categories": CATEGORIES}, **kwargs
    )
    with torch.no_grad():  # Deformable DETR's zero-initialised projections would hide the sampling path
        for name, p in module.model.named_parameters():
            if "sampling_offsets.weight" in name or "attention_weights.weight" in name:
                p.normal_(std=0.05)
    return module


def batch(rectangle_targets, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (2, 3, 64, 64), generator=g, dtype=torch.uint8)
    targets = rectangle_targets(g, (2, 3), num_classes=3, box=(24, 20))
    return {"images": images, "image_sizes": [(64, 64), (60, 56)], "targets": targets}


def loss_and_grads(module: SegmentationModule, data: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    module.train()
    torch.manual_seed(1)  # the same random points on both sides
    losses = module.criterion(module._outputs(data), data["targets"])
    loss = sum(losses.values())
    loss.backward()
    grads = {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}
    module.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.parametrize("head", ["mask2former_small", "maskformer"])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(tiny, tmp_path, head, rectangle_targets):
    plain = tiny_module(tiny, tmp_path, head)
    parts = ["backbone", "neck", "head"]
    if head == "maskformer":  # its pixel decoder has no repeated blocks
        with pytest.raises(ValueError, match="'neck' is not a part with repeated blocks"):
            tiny_module(tiny, tmp_path, head, activation_checkpointing=parts)
        parts = ["backbone", "head"]
    checkpointed = tiny_module(tiny, tmp_path, head, activation_checkpointing=parts)
    checkpointed.load_state_dict(plain.state_dict())
    wrapped = [m for m in checkpointed.modules() if getattr(m, "_activation_checkpointing", False)]
    assert len(wrapped) >= 6  # 4 backbone stages, the encoder layer (Mask2Former), 2 decoder layers
    data = batch(rectangle_targets)
    want_loss, want = loss_and_grads(plain, data)
    got_loss, got = loss_and_grads(checkpointed, data)
    torch.testing.assert_close(got_loss, want_loss, atol=1e-5, rtol=1e-5)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("head", ["mask2former_small", "maskformer"])
def test_recomputed_norm_outputs_give_bitwise_the_same_loss_and_gradients(tiny, tmp_path, head, rectangle_targets):
    plain = tiny_module(tiny, tmp_path, head, recompute_norm_outputs=False)
    lean = tiny_module(tiny, tmp_path, head)  # the default
    assert lean.model.recompute_norm_outputs and not plain.model.recompute_norm_outputs
    lean.load_state_dict(plain.state_dict())
    data = batch(rectangle_targets)
    want_loss, want = loss_and_grads(plain, data)
    got_loss, got = loss_and_grads(lean, data)
    assert torch.equal(got_loss, want_loss)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[name], want[name]) for name in want)


def test_unknown_checkpointing_part_and_compile_value_are_clear_errors(tiny, tmp_path):
    with pytest.raises(ValueError, match="activation_checkpointing=\\['optimizer'\\].*choose from"):
        tiny_module(tiny, tmp_path, activation_checkpointing=["optimizer"])
    with pytest.raises(ValueError, match="compile='head': choose false, true"):
        tiny_module(tiny, tmp_path, compile="head")


def test_channels_last_gives_the_same_outputs(tiny, tmp_path, rectangle_targets):
    plain = tiny_module(tiny, tmp_path, channels_last=False).eval()
    assert tiny_module(tiny, tmp_path).model.channels_last  # the default for a convolutional backbone (ResNet)
    nhwc = tiny_module(tiny, tmp_path, channels_last=True).eval()
    nhwc.load_state_dict(plain.state_dict())
    conv = next(m for m in nhwc.model.backbone.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    data = batch(rectangle_targets)
    with torch.no_grad():
        want, got = plain._outputs(data), nhwc._outputs(data)
    torch.testing.assert_close(got["pred_logits"], want["pred_logits"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["pred_masks"], want["pred_masks"], atol=1e-4, rtol=1e-5)


def test_fused_adamw_is_the_default_and_takes_the_same_step():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4))
    twin = copy.deepcopy(model)
    fused, reference = build_adamw(model, lr=1e-2), build_adamw(twin, lr=1e-2, fused=False)
    assert all(group["fused"] for group in fused.param_groups)
    assert not any(group["fused"] for group in reference.param_groups)
    x = torch.randn(32, 8)
    for _ in range(3):
        for net, optimizer in ((model, fused), (twin, reference)):
            net(x).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
    for got, want in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("head", ["mask2former_small", "maskformer"])
def test_the_whole_model_traces_as_one_graph(tiny, tmp_path, head, rectangle_targets):
    """torch.compile (compile=true) sees the Segmenter as one graph: no graph breaks, in training mode."""
    module = tiny_module(tiny, tmp_path, head).train()
    pixels = module.model.preprocess(batch(rectangle_targets)["images"])
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(module.model)(pixels)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
