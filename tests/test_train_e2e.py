"""End-to-end: train.py for every head on a native and a timm backbone, the train / evaluate / predict
command lines, fine-tuning with init_from, and the model.convert command line."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import lightning
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torchvision.io import read_image

from densepred.engine.build import build_datamodule, build_module
from densepred.engine.loading import load_module

pytestmark = pytest.mark.slow

METRIC_KEYS = {"PQ", "PQ_th", "PQ_st", "segm/AP", "bbox/AP", "mIoU"}


@pytest.fixture(scope="module")
def train_script(tiny):
    return tiny.load_script("train")


def model_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    return {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}


def assert_metrics(metrics: dict, keys=METRIC_KEYS) -> None:
    assert keys <= set(metrics)
    for key in keys:
        assert metrics[key] is None or 0.0 <= metrics[key] <= 100.0, (key, metrics[key])


def test_train_runs_every_head_on_native_and_timm_backbones(
    tmp_path, tiny, synthetic_root, train_script, tiny_head, tiny_backbone
):
    head, backbone = tiny_head, tiny_backbone
    cfg = tiny.compose_train(tiny.train_overrides(synthetic_root, head, backbone), tmp_path)
    lightning.seed_everything(cfg.seed)
    datamodule = build_datamodule(cfg)
    initial = {k: v.clone() for k, v in build_module(cfg, datamodule.metadata).model.state_dict().items()}

    results = train_script.main.__wrapped__(cfg)  # train.py's main with the composed config

    # Two optimizer steps with finite losses, logged every step.
    rows = list(csv.DictReader((tmp_path / "csv" / "metrics.csv").open()))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) == 2 and all(math.isfinite(v) and v > 0 for v in losses)
    assert any(r.get("val/PQ") for r in rows)
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 2
    trained = model_weights(tmp_path / "checkpoints" / "last.ckpt")
    assert initial.keys() == trained.keys()
    moved = [k for k, v in initial.items() if v.is_floating_point() and not torch.equal(v, trained[k])]
    assert any(k.startswith("backbone.") for k in moved) and any(k.startswith("head.") for k in moved)

    # Evaluation before fit (step 0), after the epoch (step 2), and of the best checkpoint (test).
    assert_metrics(tiny.read_metrics(tmp_path / "eval_val" / "metrics_step0000000.json"))
    assert_metrics(tiny.read_metrics(tmp_path / "eval_val" / "metrics_step0000002.json"))
    test_metrics = tiny.read_metrics(tmp_path / "eval_test" / "metrics_step0000002.json")
    assert_metrics(test_metrics)
    assert test_metrics == {k: (None if v != v else v) for k, v in results.items()}
    assert (tmp_path / "eval_test" / "panoptic_predictions.json").is_file()

    # The export holds the best checkpoint's weights and the settings to rebuild the model.
    best = tmp_path / "checkpoints" / "best-2.ckpt"
    exported = load_file(tmp_path / "export" / "model.safetensors")
    expected = model_weights(best)
    assert exported.keys() == expected.keys() and all(torch.equal(exported[k], expected[k]) for k in expected)
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["task"] == "panoptic" and config["metadata"]["num_classes"] == 7
    assert config["model"]["head"]["_target_"].endswith("MaskFormerHead" if head == "maskformer" else "Mask2FormerHead")

    # Overlays: prediction | ground truth, at the original image size, for both validations.
    val_images = sorted((Path(datamodule.data_root) / "val2017").glob("*.jpg"))[:2]
    for step in (0, 2):
        for index, image_file in enumerate(val_images):
            panel = read_image(str(tmp_path / "val_overlays" / f"step{step:07d}_image{index}.png"))
            width, height = Image.open(image_file).size
            assert tuple(panel.shape) == (3, height, 2 * width)


def test_train_evaluate_predict_command_lines(tmp_path, tiny, synthetic_root, tiny_cli_run):
    assert sorted(p.name for p in (tiny_cli_run / "checkpoints").iterdir()) == ["best-2.ckpt", "last.ckpt"]
    assert (tiny_cli_run / "export" / "model.safetensors").is_file() and (
        tiny_cli_run / "export" / "config.json"
    ).is_file()
    trained = tiny.read_metrics(tiny_cli_run / "eval_test" / "metrics_step0000002.json")

    # evaluate.py on last.ckpt (the only validation saved it with best-2.ckpt): the same numbers as train.py's test.
    out = tmp_path / "evaluate"
    result = tiny.run_script(
        [
            "evaluate.py",
            f"checkpoint={tiny_cli_run / 'checkpoints' / 'last.ckpt'}",
            *tiny.data_overrides(synthetic_root),
            "trainer.accelerator=cpu",
            f"hydra.run.dir={out}",
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    evaluated = tiny.read_metrics(out / "eval_test" / "metrics_step0000002.json")  # the checkpoint's step
    assert evaluated == trained
    assert "PQ" in result.stdout and "mIoU" in result.stdout

    # predict.py on the export and a folder of images: one overlay per image and predictions.json.
    # The tiny data set's folder in the shared cache (which may hold other parameter sets' folders too).
    images = build_datamodule(tiny.compose_train(tiny.train_overrides(synthetic_root), tmp_path)).data_root / "val2017"
    out = tmp_path / "predict"
    result = tiny.run_script(
        [
            "predict.py",
            f"checkpoint={tiny_cli_run / 'export'}",
            f"input={images}",
            f"output={out}",
            "short_side=64",
            "max_size=96",
            "device=cpu",
            f"hydra.run.dir={tmp_path / 'hydra'}",
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    names = sorted(p.name for p in images.glob("*.jpg"))
    assert len(names) == 4
    assert sorted(p.name for p in out.glob("*.png")) == [f"{n}.png" for n in names]  # x.jpg -> x.jpg.png
    for name in names:
        width, height = Image.open(images / name).size
        assert tuple(read_image(str(out / f"{name}.png")).shape) == (3, height, width)
    predictions = json.loads((out / "predictions.json").read_text())
    assert sorted(predictions) == [*names, "skipped"] and predictions.pop("skipped") == {}
    classes = {"circle", "square", "triangle", "diamond", "sky", "ground", "water"}
    for record in predictions.values():
        assert set(record) == {"segments", "instances"}
        assert all(s["category"] in classes and s["area"] > 0 for s in record["segments"])


def test_evaluate_labels_the_checkpoint_step_and_needs_no_train_split(tmp_path, tiny, synthetic_root, tiny_cli_run):
    """evaluate.py on the export (trained 2 steps) with data.root a folder holding only the val split."""
    assert json.loads((tiny_cli_run / "export" / "config.json").read_text())["global_step"] == 2
    source = build_datamodule(tiny.compose_train(tiny.train_overrides(synthetic_root), tmp_path)).data_root
    root = tmp_path / "val_only"
    shutil.copytree(source / "val2017", root / "val2017")
    shutil.copytree(source / "annotations", root / "annotations", ignore=shutil.ignore_patterns("*train*"))
    out = tmp_path / "evaluate"
    result = tiny.run_script(
        [
            "evaluate.py",
            f"checkpoint={tiny_cli_run / 'export'}",
            f"data.root={root}",
            "data.synthetic=null",
            "data.num_workers=0",
            "data.eval_transform.short=64",
            "data.eval_transform.max_size=96",
            "trainer.accelerator=cpu",
            f"hydra.run.dir={out}",
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert [p.name for p in (out / "eval_test").glob("metrics_step*.json")] == ["metrics_step0000002.json"]
    assert "test metrics at step 2" in result.stdout + result.stderr
    assert tiny.read_metrics(out / "eval_test" / "metrics_step0000002.json") == tiny.read_metrics(
        tiny_cli_run / "eval_test" / "metrics_step0000002.json"
    )


def test_evaluate_refuses_a_checkpoint_with_other_classes(tmp_path, tiny, synthetic_root, tiny_cli_run):
    result = tiny.run_script(
        [
            "evaluate.py",
            f"checkpoint={tiny_cli_run / 'export'}",
            *tiny.data_overrides(synthetic_root, task="instance"),
            f"hydra.run.dir={tmp_path}",
        ]
    )
    assert result.returncode != 0
    assert "predicts 7 classes but the data has 4" in result.stderr
    assert "init_from" in result.stderr


def test_init_from_reinitialises_only_the_class_head(tmp_path, tiny, synthetic_root, tiny_cli_run):
    """Fine-tuning the 7-class panoptic export on the 4-class instance task keeps every weight but the class head."""
    overrides = [*tiny.train_overrides(synthetic_root), f"init_from={tiny_cli_run / 'export'}", "data.task=instance"]
    cfg = tiny.compose_train(overrides, tmp_path)
    datamodule = build_datamodule(cfg)
    assert datamodule.metadata.num_classes == 4
    module = build_module(cfg, datamodule.metadata)
    exported = load_file(tiny_cli_run / "export" / "model.safetensors")
    state = module.model.state_dict()
    differing = sorted(
        k for k in state if state[k].shape != exported[k].shape or not torch.equal(state[k], exported[k])
    )
    assert differing == ["head.class_embed.bias", "head.class_embed.weight"]
    assert state["head.class_embed.weight"].shape[0] == 5  # 4 classes + no-object

    # The wrong architecture is refused with the key that is missing.
    cfg = tiny.compose_train([*overrides, "head.num_layers=3"], tmp_path)
    with pytest.raises(ValueError, match=r"init_from=.*lacks \d+ weights .*another backbone/neck/head"):
        build_module(cfg, datamodule.metadata)


def test_convert_command_line_writes_a_loadable_model(tmp_path, tiny):
    from test_convert_mask2former import hf_model, resnet_config

    reference = hf_model(resnet_config())
    reference.save_pretrained(tmp_path / "hf")
    result = tiny.run_script(["-m", "densepred.convert", str(tmp_path / "hf"), str(tmp_path / "converted")])
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "converted").iterdir()) == ["config.json", "model.safetensors"]
    module = load_module(tmp_path / "converted").eval()
    assert [c["name"] for c in module.metadata["categories"]] == ["person", "car", "sky"]
    images = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        expected = reference(images)
        ours = module(images)
    torch.testing.assert_close(ours["pred_logits"], expected.class_queries_logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(ours["pred_masks"], expected.masks_queries_logits, atol=1e-4, rtol=0)
