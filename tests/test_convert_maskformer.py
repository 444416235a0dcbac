"""transformers MaskFormerForInstanceSegmentation checkpoints (random weights, tiny configs, saved locally) convert
to a Segmenter that gives the same class and mask logits, final and auxiliary, on a non-square input."""

import json

import pytest
import torch
from transformers import (
    MaskFormerConfig,
    MaskFormerDetrConfig,
    MaskFormerForInstanceSegmentation,
    ResNetConfig,
    SwinConfig,
)

from densepred.convert.maskformer import convert_maskformer
from densepred.segmenter import Segmenter

STAGES = ["stage1", "stage2", "stage3", "stage4"]
BACKBONES = {
    "resnet": lambda: ResNetConfig(
        embedding_size=16, hidden_sizes=[32, 32, 64, 64], depths=[1, 1, 1, 1], layer_type="basic", out_features=STAGES
    ),
    # transformers' MaskFormer turns a Swin config into MaskFormerSwin (always the four stages).
    "swin": lambda: SwinConfig(embed_dim=16, depths=[2, 2, 2, 2], num_heads=[1, 2, 2, 4], window_size=5),
}


def save_tiny_maskformer(folder, backbone: str) -> MaskFormerForInstanceSegmentation:
    torch.manual_seed(0)
    decoder = MaskFormerDetrConfig(
        d_model=32, decoder_layers=3, decoder_attention_heads=4, decoder_ffn_dim=64, num_queries=7
    )
    config = MaskFormerConfig(
        backbone_config=BACKBONES[backbone](),
        decoder_config=decoder,
        fpn_feature_size=32,
        mask_feature_size=24,
        id2label={0: "cat", 1: "dog", 2: "sky"},
    )
    model = MaskFormerForInstanceSegmentation(config).eval()
    with torch.no_grad():  # non-trivial norm parameters and BN statistics, so that every mapping is checked
        for m in model.modules():
            if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.BatchNorm2d)):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
            if hasattr(m, "relative_position_bias_table"):
                m.relative_position_bias_table.normal_(0, 0.5)
    model.save_pretrained(folder)
    return model


def official_aux_predictions(model: MaskFormerForInstanceSegmentation, outputs) -> list[tuple[torch.Tensor, ...]]:
    """Deep-supervision predictions as the official MaskFormer defines them, from transformers' own modules.

    transformers' `auxiliary_logits` differ from the official ones (they include the all-zero decoder input
    and skip the decoder LayerNorm), so each intermediate decoder output is passed through transformers'
    decoder LayerNorm, class predictor and mask embedder here (DETR: `intermediate.append(self.norm(output))`).
    """
    hidden = outputs.transformer_decoder_hidden_states  # (zeros, layer 1, ..., LayerNorm(last layer))
    predictions = []
    for states in hidden[1:-1]:
        states = model.model.transformer_module.decoder.layernorm(states)
        masks = torch.einsum("bqc,bchw->bqhw", model.mask_embedder(states), outputs.pixel_decoder_last_hidden_state)
        predictions.append((model.class_predictor(states), masks))
    return predictions


@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_converted_model_equals_transformers(tmp_path, backbone):
    reference = save_tiny_maskformer(tmp_path, backbone)
    config, state_dict = convert_maskformer(str(tmp_path))
    assert config["num_classes"] == 3 and config["class_names"] == ["cat", "dog", "sky"]
    model = Segmenter.from_config(config).eval()
    model.load_state_dict(state_dict, strict=True)
    assert model.backbone.out_features == STAGES

    images = torch.randn(2, 3, 97, 130)
    with torch.no_grad():
        want = reference(images, output_hidden_states=True)
        got = model(images)
        aux = official_aux_predictions(reference, want)
    assert got["pred_logits"].shape == (2, 7, 4) and got["pred_masks"].shape == want.masks_queries_logits.shape
    assert (got["pred_logits"] - want.class_queries_logits).abs().max() <= 1e-4
    assert (got["pred_masks"] - want.masks_queries_logits).abs().max() <= 1e-4
    assert len(got["aux_outputs"]) == 2 == len(aux)
    for ours, (logits, masks) in zip(got["aux_outputs"], aux, strict=True):
        assert (ours["pred_logits"] - logits).abs().max() <= 1e-4
        assert (ours["pred_masks"] - masks).abs().max() <= 1e-4


def test_other_checkpoint_kind_is_refused(tmp_path):
    save_tiny_maskformer(tmp_path, "resnet")
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "mask2former"}))
    with pytest.raises(ValueError, match="expected a MaskFormer checkpoint.*model.convert_mask2former"):
        convert_maskformer(str(tmp_path))


def test_unsupported_decoder_setting_is_refused(tmp_path):
    save_tiny_maskformer(tmp_path, "resnet")
    config = json.loads((tmp_path / "config.json").read_text())
    config["decoder_config"]["activation_function"] = "gelu"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="activation_function='gelu'"):
        convert_maskformer(str(tmp_path))
