"""FPN and MaskFormer pixel decoders: shapes from the backbone description, values against torchvision's
FPN formula and transformers' MaskFormer pixel decoder / DETR encoder with the same weights."""

import pytest
import torch
import torch.nn.functional as F
from transformers import DetrConfig
from transformers.models.detr.modeling_detr import DetrEncoderLayer
from transformers.models.maskformer.modeling_maskformer import (
    MaskFormerPixelDecoder,
    MaskFormerSinePositionEmbedding,
)

from densepred.layers import PositionEmbeddingSine
from densepred.necks.fpn import FPN
from densepred.necks.pixel_decoder import BasePixelDecoder, TransformerEncoderPixelDecoder

CHANNELS = [16, 24, 40, 48]
STRIDES = [4, 8, 16, 32]
SIZES = [(25, 33), (13, 17), (7, 9), (4, 5)]  # a 97x129 image, ceil halving


def features(batch: int = 2) -> list[torch.Tensor]:
    torch.manual_seed(0)
    return [torch.randn(batch, c, *hw) for c, hw in zip(CHANNELS, SIZES, strict=True)]


def hf_pixel_decoder_state_dict(neck: BasePixelDecoder) -> dict[str, torch.Tensor]:
    """Our pixel-decoder weights under transformers' MaskFormerPixelDecoder names."""
    last = len(neck.output_convs) - 1
    sd = {f"fpn.stem.{k}": v for k, v in neck.output_convs[last].state_dict().items()}
    for j in range(last):  # transformers' FPN layers run coarse to fine
        sd |= {f"fpn.layers.{j}.proj.{k}": v for k, v in neck.lateral_convs[last - 1 - j].state_dict().items()}
        sd |= {f"fpn.layers.{j}.block.{k}": v for k, v in neck.output_convs[last - 1 - j].state_dict().items()}
    return sd | {f"mask_projection.{k}": v for k, v in neck.mask_features.state_dict().items()}


def randomize_norms(module: torch.nn.Module) -> None:
    """Give GroupNorm / LayerNorm non-trivial affine parameters so that they are checked too."""
    for m in module.modules():
        if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)


def test_fpn_matches_the_fpn_formula_on_an_odd_size():
    neck = FPN(CHANNELS, STRIDES, out_channels=32, mask_dim=24).eval()
    for p in neck.parameters():
        p.data.normal_(0, 0.1)
    feats = features()
    with torch.no_grad():
        out = neck(feats)
    inner = neck.fpn.inner_blocks
    layer = neck.fpn.layer_blocks

    def conv(block, x):
        return F.conv2d(x, block[0].weight, block[0].bias, padding=block[0].padding)

    expected, top = [], None
    for i in reversed(range(4)):  # lateral 1x1 + nearest-upsampled coarser level, then 3x3 output conv
        lateral = conv(inner[i], feats[i])
        top = lateral if top is None else lateral + F.interpolate(top, size=lateral.shape[-2:], mode="nearest")
        expected.insert(0, conv(layer[i], top))
    mask = F.conv2d(expected[0], neck.mask_features.weight, neck.mask_features.bias)
    assert neck.mask_dim == 24 and neck.out_channels == 32
    assert out.mask_features.shape == (2, 24, 25, 33)
    torch.testing.assert_close(out.mask_features, mask, atol=1e-5, rtol=1e-5)
    assert [tuple(f.shape) for f in out.multi_scale_features] == [(2, 32, 4, 5), (2, 32, 7, 9), (2, 32, 13, 17)]
    for got, want in zip(out.multi_scale_features, expected[:0:-1], strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_base_pixel_decoder_equals_transformers():
    neck = BasePixelDecoder(CHANNELS, STRIDES, conv_dim=32, mask_dim=24).eval()
    randomize_norms(neck)
    reference = MaskFormerPixelDecoder(
        in_features=CHANNELS[-1], lateral_widths=CHANNELS[:-1], feature_size=32, mask_feature_size=24
    ).eval()
    reference.load_state_dict(hf_pixel_decoder_state_dict(neck), strict=True)
    feats = features()
    with torch.no_grad():
        out = neck(feats)
        want = reference([f.clone() for f in feats]).last_hidden_state
    assert neck.out_channels == CHANNELS[-1] and neck.mask_dim == 24
    assert out.mask_features.shape == (2, 24, 25, 33)
    assert (out.mask_features - want).abs().max() <= 1e-5
    assert len(out.multi_scale_features) == 1 and out.multi_scale_features[0] is feats[-1]


def test_position_embedding_equals_transformers():
    x = torch.randn(2, 64, 7, 11)
    ours = PositionEmbeddingSine(32, normalize=True)(x)
    want = MaskFormerSinePositionEmbedding(num_position_features=32, normalize=True)(x.shape, x.device, x.dtype)
    assert ours.shape == (1, 64, 7, 11)
    assert (ours - want).abs().max() <= 1e-6


def test_transformer_encoder_pixel_decoder_equals_detr_encoder_and_transformers_fpn():
    neck = TransformerEncoderPixelDecoder(
        CHANNELS, STRIDES, conv_dim=32, mask_dim=24, encoder_layers=2, num_heads=4, dim_feedforward=48
    ).eval()
    randomize_norms(neck)
    config = DetrConfig(d_model=32, encoder_attention_heads=4, encoder_ffn_dim=48, use_timm_backbone=False)
    encoder = torch.nn.ModuleList(DetrEncoderLayer(config) for _ in range(2)).eval()
    for ours, theirs in zip(neck.encoder_layers, encoder, strict=True):
        q, k, v = ours.self_attn.in_proj_weight.chunk(3)
        qb, kb, vb = ours.self_attn.in_proj_bias.chunk(3)
        theirs.load_state_dict(
            {
                "self_attn.q_proj.weight": q,
                "self_attn.q_proj.bias": qb,
                "self_attn.k_proj.weight": k,
                "self_attn.k_proj.bias": kb,
                "self_attn.v_proj.weight": v,
                "self_attn.v_proj.bias": vb,
                "self_attn.o_proj.weight": ours.self_attn.out_proj.weight,
                "self_attn.o_proj.bias": ours.self_attn.out_proj.bias,
                "self_attn_layer_norm.weight": ours.norm1.weight,
                "self_attn_layer_norm.bias": ours.norm1.bias,
                "mlp.fc1.weight": ours.linear1.weight,
                "mlp.fc1.bias": ours.linear1.bias,
                "mlp.fc2.weight": ours.linear2.weight,
                "mlp.fc2.bias": ours.linear2.bias,
                "final_layer_norm.weight": ours.norm2.weight,
                "final_layer_norm.bias": ours.norm2.bias,
            },
            strict=True,
        )
    fpn = MaskFormerPixelDecoder(
        in_features=32, lateral_widths=CHANNELS[:-1], feature_size=32, mask_feature_size=24
    ).eval()
    fpn.load_state_dict(hf_pixel_decoder_state_dict(neck), strict=True)
    feats = features()
    with torch.no_grad():
        out = neck(feats)
        x = neck.input_proj(feats[-1])
        pos = MaskFormerSinePositionEmbedding(num_position_features=16, normalize=True)(x.shape, x.device, x.dtype)
        hidden = x.flatten(2).transpose(1, 2)
        for layer in encoder:
            hidden = layer(hidden, None, spatial_position_embeddings=pos.flatten(2).transpose(1, 2))
        encoded = hidden.transpose(1, 2).reshape(x.shape)
        want = fpn([*feats[:-1], encoded]).last_hidden_state
    assert neck.out_channels == 32
    (decoder_input,) = out.multi_scale_features
    assert decoder_input.shape == (2, 32, 4, 5)
    assert (decoder_input - encoded).abs().max() <= 1e-5
    assert (out.mask_features - want).abs().max() <= 1e-5


@pytest.mark.parametrize("neck_class", [FPN, BasePixelDecoder, TransformerEncoderPixelDecoder])
def test_bad_backbone_selection_is_refused_naming_the_config_key(neck_class):
    with pytest.raises(ValueError, match=r"stride 4.*backbone\.out_features"):
        neck_class([32, 64], [8, 16])
    with pytest.raises(ValueError, match="same"):
        neck_class([32, 64], [4, 8, 16])


def test_pixel_decoder_refuses_conv_dim_that_group_norm_cannot_split():
    with pytest.raises(ValueError, match="conv_dim=48 must be a multiple of 32"):
        BasePixelDecoder(CHANNELS, STRIDES, conv_dim=48)


def test_wrong_number_of_maps_is_refused():
    neck = BasePixelDecoder(CHANNELS, STRIDES, conv_dim=32, mask_dim=32)
    with pytest.raises(ValueError, match="built for 4 backbone maps"):
        neck(features()[1:])
