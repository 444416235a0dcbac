"""Mask2Former head: attention-mask rule, output contract, official defaults, gradients, autocast."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from transformers import Mask2FormerConfig
from transformers.models.mask2former.modeling_mask2former import (
    Mask2FormerPixelDecoder,
    Mask2FormerTransformerModule,
)

from densepred.backbones.swin import SwinBackbone
from densepred.heads.mask2former import Mask2FormerHead, masked_attention_mask
from densepred.layers import NeckOutput
from densepred.necks.msdeform_pixel_decoder import MSDeformAttnPixelDecoder
from densepred.segmenter import Segmenter


def test_attention_mask_blocks_below_half_and_opens_empty_rows():
    # 4x4 logits resized to 2x2: bilinear halving averages each 2x2 block
    logits = -torch.ones(1, 3, 4, 4)
    logits[0, 0, :2, :2] = 1.0  # query 0: only the top-left cell is on
    logits[0, 2] = 1.0  # query 2: everything on; query 1: nothing on -> attends everywhere
    mask = masked_attention_mask(logits, (2, 2), num_heads=2)
    expected = torch.tensor([[False, True, True, True], [False, False, False, False], [False, False, False, False]])
    assert mask.dtype == torch.bool and mask.shape == (2, 3, 4)
    assert torch.equal(mask[0], expected) and torch.equal(mask[1], expected)


def test_attention_mask_is_repeated_per_head_batch_major():
    # nn.MultiheadAttention reads a 3-d mask as index b * num_heads + h
    logits = torch.stack([torch.full((1, 2, 2), 1.0), torch.tensor([[[1.0, -1.0], [-1.0, -1.0]]])])
    mask = masked_attention_mask(logits, (2, 2), num_heads=3)
    assert not mask[:3].any()
    assert torch.equal(mask[3:], torch.tensor([[[False, True, True, True]]]).expand(3, 1, 4))


def tiny_head(**kwargs) -> Mask2FormerHead:
    defaults = dict(in_channels=32, mask_dim=16, num_classes=5, hidden_dim=32, num_queries=7, num_heads=4)
    defaults.update(dim_feedforward=64, num_layers=4)
    return Mask2FormerHead(**{**defaults, **kwargs})


def neck_output(batch=2, channels=32, mask_dim=16, height=64, width=96) -> NeckOutput:
    g = torch.Generator().manual_seed(0)
    return NeckOutput(
        mask_features=torch.randn(batch, mask_dim, height // 4, width // 4, generator=g),
        multi_scale_features=[torch.randn(batch, channels, height // s, width // s, generator=g) for s in (32, 16, 8)],
    )


def test_output_contract():
    head = tiny_head().eval()
    out = head(neck_output())
    assert out["pred_logits"].shape == (2, 7, 6)
    assert out["pred_masks"].shape == (2, 7, 16, 24)
    assert len(out["aux_outputs"]) == 4  # the learned-query prediction + 3 of the 4 layers
    for aux in out["aux_outputs"]:
        assert aux["pred_logits"].shape == (2, 7, 6) and aux["pred_masks"].shape == (2, 7, 16, 24)
    # each prediction comes from a different decoder state
    assert not torch.equal(out["aux_outputs"][0]["pred_masks"], out["aux_outputs"][1]["pred_masks"])


def test_input_projection_only_when_channels_differ_or_enforced():
    assert all(isinstance(p, torch.nn.Identity) for p in tiny_head().input_proj)
    assert all(isinstance(p, torch.nn.Conv2d) for p in tiny_head(enforce_input_project=True).input_proj)
    head = tiny_head(in_channels=24)
    assert [p.in_channels for p in head.input_proj] == [24, 24, 24]
    assert head(neck_output(channels=24))["pred_logits"].shape == (2, 7, 6)


def test_wrong_number_of_levels_is_a_clear_error():
    out = neck_output()
    out.multi_scale_features = out.multi_scale_features[:1]
    with pytest.raises(ValueError, match="expects 3 multi_scale_features.*MSDeformAttnPixelDecoder"):
        tiny_head()(out)


def test_defaults_are_the_official_model():
    """With default arguments, neck and head have exactly the parameters of transformers' default
    Mask2Former (feature 256, 6 encoder layers, 8 heads, 4 points, FFN 1024; 100 queries, 9 + 1 decoder
    layers, FFN 2048) on a Swin-T pyramid with 133 classes."""
    channels = [96, 192, 384, 768]
    config = Mask2FormerConfig(num_labels=133)
    neck = MSDeformAttnPixelDecoder(in_channels=channels, in_strides=[4, 8, 16, 32])
    head = Mask2FormerHead(in_channels=neck.out_channels, mask_dim=neck.mask_dim, num_classes=133)

    def count(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    assert count(neck) == count(Mask2FormerPixelDecoder(config, feature_channels=channels))
    class_predictor = 256 * 134 + 134
    assert count(head) == count(Mask2FormerTransformerModule(in_features=256, config=config)) + class_predictor
    assert len(neck.encoder_layers) == 6 and len(head.layers) == config.decoder_layers - 1 == 9
    assert head.query_feat.num_embeddings == 100 and head.layers[0].cross_attn.num_heads == 8
    assert neck.encoder_layers[0].self_attn.num_points == 4 and neck.encoder_layers[0].linear1.out_features == 1024


def tiny_segmenter() -> Segmenter:
    torch.manual_seed(0)
    backbone = SwinBackbone(
        embed_dim=16,
        depths=(1, 1, 2, 1),
        num_heads=(1, 2, 2, 4),
        window_size=4,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    neck = partial(
        MSDeformAttnPixelDecoder,
        conv_dim=32,
        mask_dim=16,
        encoder_layers=2,
        num_heads=4,
        dim_feedforward=64,
        num_groups=8,
    )
    head = partial(Mask2FormerHead, hidden_dim=32, num_queries=6, num_heads=4, dim_feedforward=64, num_layers=3)
    return Segmenter(backbone, neck, head, num_classes=4)


def test_gradients_reach_every_trainable_parameter():
    model = tiny_segmenter().train()
    # Deformable DETR initialises the offset and weight projections to zero, so at initialisation the
    # queries' content (and with it the neck's level embedding) does not yet change the output; move them
    # off zero, as any training step does.
    with torch.no_grad():
        for layer in model.neck.encoder_layers:
            layer.self_attn.sampling_offsets.weight.normal_(std=0.01)
            layer.self_attn.attention_weights.weight.normal_(std=0.01)
    out = model(torch.randn(2, 3, 64, 96))
    predictions = [out, *out["aux_outputs"]]
    loss = sum(p["pred_logits"].logsumexp(-1).mean() + p["pred_masks"].sigmoid().mean() for p in predictions)
    loss.backward()
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == len(list(model.parameters()))
    missing = [name for name, p in trainable if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient reached {missing}"


def test_autocast_runs_neck_in_float32_and_head_in_bfloat16():
    model = tiny_segmenter().eval()
    images = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        reference = model(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            neck_out = model.neck(list(model.backbone(images).feature_maps))
            out = model(images)
    assert neck_out.mask_features.dtype == torch.float32
    assert out["pred_logits"].dtype == torch.bfloat16 and out["pred_masks"].dtype == torch.bfloat16
    torch.testing.assert_close(out["pred_logits"].float(), reference["pred_logits"], atol=0.1, rtol=0.05)
