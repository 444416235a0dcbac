"""EoMT: parity with transformers' EomtForUniversalSegmentation (same weights, converted), the annealing
schedule against tue-mps/eomt's, the converter command, and a tiny end-to-end run (train, evaluate, predict)."""

from __future__ import annotations

import json
import logging
import math
from types import SimpleNamespace

import lightning
import pytest
import torch
from timm.models.vision_transformer import checkpoint_filter_fn
from transformers import EomtConfig, EomtForUniversalSegmentation

from densepred.backbones import ViTBackbone
from densepred.convert.cli import main as convert_main
from densepred.convert.eomt import convert_eomt
from densepred.engine.build import build_datamodule, build_module
from densepred.engine.loading import load_module
from densepred.heads.eomt import EoMTHead, annealing_probability
from densepred.segmenter import Segmenter

IMAGE_SIZE = 80  # transformers' EoMT takes only config.image_size (fixed position embeddings): an odd 5 x 5 grid
NUM_CLASSES = 5


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A random-weight transformers EoMT (4 blocks, the last 2 with queries, 2 registers), saved and converted."""
    config = EomtConfig(
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=16,
        num_blocks=2,
        num_queries=10,
        num_register_tokens=2,
        layerscale_value=0.5,
        id2label={i: f"class{i}" for i in range(NUM_CLASSES)},
    )
    torch.manual_seed(0)
    model = EomtForUniversalSegmentation(config)
    with torch.no_grad():  # every weight random (the init leaves biases, norms and layer scales constant)
        for name, parameter in model.named_parameters():
            parameter.copy_(torch.randn_like(parameter) * (0.2 if parameter.dim() > 1 else 0.5))
            if name.endswith(("norm1.weight", "norm2.weight", "layernorm.weight", "layernorm2d.weight")):
                parameter.add_(1.0)
    folder = tmp_path_factory.mktemp("eomt_hf")
    model.save_pretrained(folder)
    segmenter_config, state_dict = convert_eomt(str(folder))
    ours = Segmenter.from_config(segmenter_config)
    ours.load_state_dict(state_dict, strict=True)
    return model, ours, folder


def _pixels(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(1))


def _record_predictions(model: EomtForUniversalSegmentation) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Patch the reference's `predict` (instance attribute) to record every (mask logits, class logits) it makes."""
    recorded = []
    predict = model.predict

    def recording(tokens):
        recorded.append(predict(tokens))
        return recorded[-1]

    model.predict = recording
    return recorded


def test_eval_matches_transformers(reference):
    model, ours, _ = reference
    model.eval()
    ours.eval()
    with torch.no_grad():
        model.attn_mask_probs.zero_()  # annealed: transformers then applies no mask and predicts only at the end
        expected = model(pixel_values=_pixels())
        model.attn_mask_probs.fill_(1.0)
        out = ours(_pixels())
    assert out["aux_outputs"] == []
    assert out["pred_logits"].shape == (2, 10, NUM_CLASSES + 1)
    assert out["pred_masks"].shape == (2, 10, IMAGE_SIZE // 4, IMAGE_SIZE // 4)
    torch.testing.assert_close(out["pred_logits"], expected.class_queries_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out["pred_masks"], expected.masks_queries_logits, atol=1e-4, rtol=1e-4)


def test_masked_attention_matches_transformers_final_and_intermediate(reference):
    """transformers' training-mode forward with attn_mask_probs 1 (the mask always applied; no dropout, no
    drop path) against ours in training mode at step 0 (probability 1): every block's prediction equal."""
    model, ours, _ = reference
    recorded = _record_predictions(model)
    model.train()
    ours.train()
    try:
        with torch.no_grad():
            expected = model(pixel_values=_pixels())
            out = ours(_pixels())
            ours.eval()
            unmasked = ours(_pixels())
    finally:
        del model.predict
    assert ours.head.mask_probs == [1.0, 1.0]
    assert len(recorded) == 3 and len(out["aux_outputs"]) == 2  # before each of the 2 blocks, and the final one
    ours_all = [*out["aux_outputs"], out]
    for prediction, (mask_logits, class_logits) in zip(ours_all, recorded, strict=True):
        torch.testing.assert_close(prediction["pred_logits"], class_logits, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(prediction["pred_masks"], mask_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out["pred_masks"], expected.masks_queries_logits, atol=1e-4, rtol=1e-4)
    # The mask changed the result (it is applied), and eval's unmasked first prediction is the same.
    assert (out["pred_masks"] - unmasked["pred_masks"]).abs().max() > 1e-2


def test_any_input_size_gives_masks_covering_it(reference):
    _, ours, _ = reference
    ours.eval()
    with torch.no_grad():
        out = ours(torch.randn(1, 3, 84, 100))  # padded to 96 x 112 patches; masks cropped to the input
    assert out["pred_masks"].shape == (1, 10, 21, 25)
    with pytest.raises(ValueError, match="whole number of mask pixels"):
        ours(torch.randn(1, 3, 82, 80))


class Logits(torch.nn.Module):
    """The segmenter's final (class, mask) logits as a tuple, what torch.export takes as an output."""

    def __init__(self, model: Segmenter) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(x)
        return out["pred_logits"], out["pred_masks"]


def test_eval_forward_exports(reference):
    """No data-dependent branch in eval: torch.export traces it, and the exported program gives the same logits."""
    _, ours, _ = reference
    model = Logits(ours.eval())
    x = _pixels(1)
    exported = torch.export.export(model, (x,)).module()
    for got, want in zip(exported(x), model(x), strict=True):
        torch.testing.assert_close(got, want)


# Copied from tue-mps/eomt training/lightning_module.py (LightningModule.mask_annealing), self -> arguments.
def original_mask_annealing(start_iter, current_iter, final_iter, poly_power=0.9, dtype=torch.float32):
    if current_iter < start_iter:
        return torch.ones(1, dtype=dtype)
    elif current_iter >= final_iter:
        return torch.zeros(1, dtype=dtype)
    else:
        progress = (current_iter - start_iter) / (final_iter - start_iter)
        progress = torch.tensor(progress, dtype=dtype)
        return (1.0 - progress).pow(poly_power)


def test_annealing_matches_the_original_schedule():
    starts, ends = [14782, 29564, 44346, 59128], [29564, 44346, 59128, 73910]  # the paper's COCO schedule
    head = EoMTHead(16, 16, 3, num_queries=4, annealing_start_steps=starts, annealing_end_steps=ends)
    for step in (0, 14781, 14782, 20000, 29563, 29564, 37000, 50000, 59127, 73909, 73910, 90000):
        head.set_training_progress(step)
        expected = [float(original_mask_annealing(s, step, e)) for s, e in zip(starts, ends, strict=True)]
        assert head.mask_probs == pytest.approx(expected, abs=1e-6), step
    assert annealing_probability(22173, 14782, 29564, 0.9) == pytest.approx(0.5**0.9)
    with pytest.raises(ValueError, match="annealing_start_steps"):
        EoMTHead(16, 16, 3, num_blocks=4, annealing_start_steps=[1, 2], annealing_end_steps=[3, 4])


def test_annealed_masks_are_applied_to_a_fraction_of_queries():
    """With probability p, a query's mask is kept with probability p (per image and query)."""
    head = EoMTHead(8, 8, 3, num_queries=2000, num_blocks=1)
    features = type("F", (), {"grid": (2, 2), "num_prefix_tokens": 1})()
    embeds, upscaled = -torch.ones(1, 2000, 8), torch.ones(1, 8, 8, 8)  # every mask logit < 0: nothing attended
    torch.manual_seed(0)
    mask = head.attention_mask(embeds, upscaled, features, probability=0.3)
    assert mask.shape == (1, 1, 2005, 2005) and mask[0, 0, 2000:].all() and mask[0, 0, :, :2001].all()
    kept = (~mask[0, 0, :2000, 2001:]).all(-1).float().mean()
    assert abs(float(kept) - 0.3) < 0.05


def test_convert_command_and_mask_probability_warning(reference, tmp_path, caplog):
    model, ours, folder = reference
    assert convert_main([str(folder), str(tmp_path / "export")]) == 0
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["model"]["head"]["_target_"] == "densepred.heads.eomt.EoMTHead"
    assert config["criterion"]["class_weight"] == 2.0 and config["metadata"]["num_classes"] == NUM_CLASSES
    module = load_module(tmp_path / "export")
    module.eval()
    ours.eval()
    with torch.no_grad():
        torch.testing.assert_close(module.model(_pixels())["pred_masks"], ours(_pixels())["pred_masks"])
    with caplog.at_level(logging.WARNING):  # the saved attn_mask_probs are transformers' initial 1s
        convert_eomt(str(folder))
    assert "applies masked attention at inference" in caplog.text


def tiny_eomt_overrides(tiny, data_root, max_steps: int = 2) -> list[str]:
    """`backbone=dinov2_small head=eomt` made tiny: 4 blocks of width 64 at patch 16 (the paper's patch), the
    queries in the last 2, annealed over steps 1-2 and 2-3."""
    return [
        *tiny.data_overrides(data_root),
        "backbone=dinov2_small",
        "head=eomt",
        "backbone.pretrained=null",
        "backbone.out_features=[stage4]",
        "backbone.drop_path_rate=0.0",
        "+backbone.patch_size=16",
        "+backbone.img_size=64",
        "+backbone.depth=4",
        "+backbone.embed_dim=64",
        "+backbone.num_heads=4",
        "head.num_queries=6",
        "head.num_blocks=2",
        "head.annealing_start_steps=[1,2]",
        "head.annealing_end_steps=[2,3]",
        "criterion.num_points=256",
        "trainer.accelerator=cpu",
        f"trainer.max_steps={max_steps}",
        "trainer.log_every_n_steps=1",
    ]


@pytest.mark.slow
def test_train_evaluate_predict_dinov2_small_eomt(tmp_path, tiny, synthetic_root):
    cfg = tiny.compose_train(tiny_eomt_overrides(tiny, synthetic_root), tmp_path)
    lightning.seed_everything(cfg.seed)
    results = tiny.load_script("train").main.__wrapped__(cfg)
    assert {"PQ", "segm/AP", "mIoU"} <= set(results)
    assert all(v != v or 0.0 <= v <= 100.0 for v in results.values())  # NaN (nothing predicted) or a score
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["model"]["head"]["_target_"] == "densepred.heads.eomt.EoMTHead" and config["global_step"] == 2
    assert (tmp_path / "eval_test" / "panoptic_predictions.json").is_file()

    images = build_datamodule(cfg).data_root / "val2017"
    out = tmp_path / "predict"
    result = tiny.run_script(tiny.predict_args(tmp_path / "export", images, out, tmp_path / "hydra"))
    assert result.returncode == 0, result.stderr[-3000:]
    predictions = json.loads((out / "predictions.json").read_text())
    assert len(predictions) == 5 and predictions.pop("skipped") == {}
    assert all(set(record) == {"segments", "instances"} for record in predictions.values())


def test_loss_falls_and_annealing_follows_the_step(tmp_path, tiny, synthetic_root):
    """25 AdamW steps on one tiny batch: the summed loss (final + 2 block predictions) falls; the module hands
    the head the step before each batch (`on_train_batch_start`)."""
    cfg = tiny.compose_train(tiny_eomt_overrides(tiny, synthetic_root), tmp_path)
    lightning.seed_everything(0)
    datamodule = build_datamodule(cfg)
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    module = build_module(cfg, datamodule.metadata)
    module.train()
    optimizer = torch.optim.AdamW(module.parameters(), lr=2e-3)
    losses, probabilities = [], []
    for step in range(25):
        module._trainer = SimpleNamespace(global_step=step)  # what the Trainer's global_step reads
        module.on_train_batch_start(batch, step)
        probabilities.append(list(module.model.head.mask_probs))
        module._trainer = None
        outputs = module.model(module.model.preprocess(batch["images"], batch["image_sizes"]))
        assert len(outputs["aux_outputs"]) == 2
        loss = torch.stack(list(module.criterion(outputs, batch["targets"]).values())).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert probabilities[:4] == [[1.0, 1.0], [1.0, 1.0], [0.0, 1.0], [0.0, 0.0]]  # annealed over 1-2 and 2-3
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5, losses


def test_pretrained_vit_resampled_to_patch_16_as_timm_does(tmp_path):
    """EoMT's recipe loads DINOv2 (14 px patches) into a 16 px ViT: the patch and position embeddings equal
    timm's own loader's resampling (`checkpoint_filter_fn`), the other weights are copied."""
    kwargs = {"depth": 2, "embed_dim": 32, "num_heads": 2}
    torch.manual_seed(0)
    source = ViTBackbone("vit_small_patch14_reg4_dinov2", img_size=56, **kwargs)
    with torch.no_grad():
        for parameter in source.parameters():
            parameter.normal_()
    source.save_pretrained(tmp_path / "p14")
    target = ViTBackbone("vit_small_patch14_reg4_dinov2", img_size=64, patch_size=16, **kwargs)
    target.load_pretrained(tmp_path / "p14")
    expected = checkpoint_filter_fn(source.vit.state_dict(), target.vit)
    assert target.vit.patch_embed.proj.weight.shape == (32, 3, 16, 16) and target.vit.pos_embed.shape == (1, 16, 32)
    for key, value in target.vit.state_dict().items():
        torch.testing.assert_close(value, expected[key], msg=key)


@pytest.mark.slow  # builds the full-size ViT-L
def test_experiment_is_the_papers_recipe(tmp_path, tiny):
    cfg = tiny.compose_train(["experiment=coco_panoptic_eomt_vit_large", "backbone.pretrained=null"], tmp_path)
    assert cfg.data.train_transform == {"recipe": "lsj", "size": 640, "scale": [0.1, 2.0]}
    assert cfg.data.batch_size == 4 and cfg.trainer.max_steps == 88692 and cfg.trainer.precision == "bf16-mixed"
    assert (cfg.optimizer.lr, cfg.optimizer.weight_decay, cfg.scheduler.name, cfg.scheduler.power) == (
        1e-4,
        0.05,
        "poly",
        0.9,
    )
    categories = [{"id": k, "name": f"c{k}", "color": [k, k, k], "isthing": k < 80} for k in range(133)]
    module = build_module(cfg, SimpleNamespace(categories=categories, num_classes=133, ignore_index=255))
    backbone, head = module.model.backbone, module.model.head
    assert type(backbone).__name__ == "ViTBackbone" and backbone.num_layers == 24 and backbone.channels == [1024]
    assert backbone.patch_size == 16 and backbone.vit.reg_token.shape[1] == 4 and backbone.layer_decay == 0.8
    assert type(module.model.neck).__name__ == "IdentityNeck" and type(head).__name__ == "EoMTHead"
    assert head.query.num_embeddings == 200 and head.backbone_blocks == 4 and head.class_embed.out_features == 134
    head.set_training_progress(29564 + 7391)  # half-way through block 2's annealing
    assert head.mask_probs == pytest.approx([0.0, 0.5**0.9, 1.0, 1.0])
    assert module.criterion.num_points == 12544 and module.criterion.eos_coef == 0.1
