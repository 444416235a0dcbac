"""MaskFormer head: output contract, equality with transformers' MaskFormer (pixel decoder + transformer module
+ predictors, same weights) on the same backbone maps, and gradients reaching every trainable parameter."""

from functools import partial

import pytest
import torch
from transformers import MaskFormerConfig, MaskFormerDetrConfig, MaskFormerForInstanceSegmentation, ResNetConfig

from densepred.backbones.resnet import ResNetBackbone
from densepred.convert.maskformer import convert_maskformer_neck_head
from densepred.heads.maskformer import MaskFormerHead
from densepred.layers import NeckOutput
from densepred.necks.fpn import FPN
from densepred.necks.pixel_decoder import BasePixelDecoder, TransformerEncoderPixelDecoder
from densepred.segmenter import Segmenter

NUM_LAYERS = 3


def tiny_hf_maskformer() -> MaskFormerForInstanceSegmentation:
    torch.manual_seed(0)
    backbone = ResNetConfig(
        embedding_size=16,
        hidden_sizes=[32, 32, 64, 64],
        depths=[1, 1, 1, 1],
        layer_type="basic",
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    decoder = MaskFormerDetrConfig(
        d_model=32, decoder_layers=NUM_LAYERS, decoder_attention_heads=4, decoder_ffn_dim=64, num_queries=7
    )
    config = MaskFormerConfig(
        backbone_config=backbone, decoder_config=decoder, fpn_feature_size=32, mask_feature_size=24, num_labels=5
    )
    model = MaskFormerForInstanceSegmentation(config).eval()
    for m in model.modules():  # non-trivial norms so that every weight mapping is checked
        if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    return model


def test_neck_and_head_equal_transformers_on_the_same_backbone_maps():
    reference = tiny_hf_maskformer()
    neck = BasePixelDecoder([32, 32, 64, 64], [4, 8, 16, 32], conv_dim=32, mask_dim=24).eval()
    head = MaskFormerHead(
        64, 24, 5, hidden_dim=32, num_queries=7, num_heads=4, dim_feedforward=64, num_layers=NUM_LAYERS
    ).eval()
    weights = convert_maskformer_neck_head(reference.state_dict())
    neck.load_state_dict({k[5:]: v for k, v in weights.items() if k.startswith("neck.")}, strict=True)
    head.load_state_dict({k[5:]: v for k, v in weights.items() if k.startswith("head.")}, strict=True)
    images = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        want = reference(images, output_hidden_states=True)
        maps = list(reference.model.pixel_level_module.encoder(images).feature_maps)
        got = head(neck(maps))
        # transformers' `auxiliary_logits` are not the official deep-supervision outputs: they include the
        # all-zero decoder input and skip the decoder LayerNorm. The official ones (DETR's
        # `intermediate.append(self.norm(output))`) are built here from transformers' own modules.
        hidden = want.transformer_decoder_hidden_states  # (zeros, layer 1, ..., LayerNorm(last layer))
        aux = []
        for states in hidden[1:-1]:
            states = reference.model.transformer_module.decoder.layernorm(states)
            embeddings = reference.mask_embedder(states)
            masks = torch.einsum("bqc,bchw->bqhw", embeddings, want.pixel_decoder_last_hidden_state)
            aux.append((reference.class_predictor(states), masks))
    assert got["pred_logits"].shape == (2, 7, 6) and got["pred_masks"].shape == (2, 7, 24, 32)
    assert (got["pred_logits"] - want.class_queries_logits).abs().max() <= 1e-4
    assert (got["pred_masks"] - want.masks_queries_logits).abs().max() <= 1e-4
    assert len(got["aux_outputs"]) == NUM_LAYERS - 1 == len(aux)
    for ours, (logits, masks) in zip(got["aux_outputs"], aux, strict=True):
        assert (ours["pred_logits"] - logits).abs().max() <= 1e-4
        assert (ours["pred_masks"] - masks).abs().max() <= 1e-4


def test_transformers_v4_key_layout_converts_to_the_same_weights():
    state_dict = tiny_hf_maskformer().state_dict()
    v4 = {k.replace("o_proj", "out_proj").replace("mlp.fc", "fc"): v for k, v in state_dict.items()}
    assert v4.keys() != state_dict.keys()
    ours, from_v4 = convert_maskformer_neck_head(state_dict), convert_maskformer_neck_head(v4)
    assert ours.keys() == from_v4.keys()
    assert all(torch.equal(ours[k], from_v4[k]) for k in ours)


def test_unknown_weight_is_refused_naming_it():
    state_dict = dict(tiny_hf_maskformer().state_dict())
    state_dict["model.transformer_module.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"tiny: unexpected weight 'model\.transformer_module\.extra"):
        convert_maskformer_neck_head(state_dict, source="tiny")


def test_output_contract_and_input_projection():
    head = MaskFormerHead(48, 16, 3, hidden_dim=32, num_queries=4, num_heads=4, dim_feedforward=32, num_layers=2)
    same = MaskFormerHead(32, 16, 3, hidden_dim=32, num_queries=4, num_heads=4, dim_feedforward=32, num_layers=2)
    assert isinstance(head.input_proj, torch.nn.Conv2d) and isinstance(same.input_proj, torch.nn.Identity)
    out = head.eval()(NeckOutput(torch.randn(2, 16, 12, 20), [torch.randn(2, 48, 3, 5)]))
    assert out["pred_logits"].shape == (2, 4, 4)
    assert out["pred_masks"].shape == (2, 4, 12, 20)
    aux_shapes = [(a["pred_logits"].shape, a["pred_masks"].shape) for a in out["aux_outputs"]]
    assert aux_shapes == [((2, 4, 4), (2, 4, 12, 20))]


NECKS = {
    "base": partial(BasePixelDecoder, conv_dim=32, mask_dim=32),
    "transformer": partial(
        TransformerEncoderPixelDecoder, conv_dim=32, mask_dim=32, encoder_layers=1, num_heads=4, dim_feedforward=32
    ),
    "fpn": partial(FPN, out_channels=32, mask_dim=32),
}


# With the FPN neck the MaskFormer decoder reads only the coarsest level, so the 3x3 output convs of the
# middle levels (strides 8 and 16) are unused (DDP then needs find_unused_parameters=True).
UNUSED = {"fpn": {f"neck.fpn.layer_blocks.{i}.0.{t}" for i in (1, 2) for t in ("weight", "bias")}}


@pytest.mark.parametrize("neck", list(NECKS))
def test_gradients_reach_every_trainable_parameter(neck):
    torch.manual_seed(0)
    backbone = ResNetBackbone(
        "basic",
        [1, 1, 1, 1],
        stage_channels=[32, 32, 64, 64],
        stem_channels=16,
        norm="bn",
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    head = partial(MaskFormerHead, hidden_dim=32, num_queries=4, num_heads=4, dim_feedforward=32, num_layers=2)
    model = Segmenter(backbone, NECKS[neck], head, num_classes=3).train()
    for p in model.parameters():  # random biases and norm scales: no zero initialisation may hide a broken path
        if p.dim() == 1:
            p.data.uniform_(0.5, 1.5)
    out = model(torch.randn(2, 3, 64, 96))
    assert out["pred_masks"].shape == (2, 4, 16, 24) and len(out["aux_outputs"]) == 1
    terms = [out["pred_logits"], out["pred_masks"]]
    terms += [t for aux in out["aux_outputs"] for t in aux.values()]
    sum((t.sin().sum() for t in terms), torch.zeros(())).backward()  # sin: no parameter's gradient cancels out
    assert all(p.requires_grad for p in model.parameters())
    unused = {name for name, p in model.named_parameters() if p.grad is None}
    assert unused == UNUSED.get(neck, set())
    zero = [name for name, p in model.named_parameters() if p.grad is not None and not p.grad.abs().sum() > 0]
    assert zero == []
