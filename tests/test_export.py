"""Deployment export: ONNX (run by onnxruntime) and torch.export programs equal to the eager model at two input
sizes from ONE file (dynamic batch, height and width), for each head and a native, a timm and a ViT backbone,
and a detector (RT-DETR); the NumPy post-processing shipped beside the model equal to the project's PostProcessor
and BoxPostProcessor; the export.py command.

Exporting costs tens of seconds per model on a CPU (torch.export tracing, then the ONNX translation), so the
export tests are marked slow; each model is traced once and both formats come from that one program.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import numpy as np
import onnxruntime
import pytest
import torch
from omegaconf import OmegaConf

from densepred.deploy.export import export_model, portable, sample_images, to_onnx, trace
from densepred.deploy.model import ExportableSegmenter
from densepred.engine.module import SegmentationModule
from densepred.export_format import write_export
from densepred.heads.box_postprocess import BoxPostProcessor
from densepred.heads.postprocess import PostProcessor

CATEGORIES = [{"id": i + 1, "name": f"class_{i}", "isthing": int(i < 2), "color": [10 * i, 20, 30]} for i in range(4)]
THINGS = [0, 1]
# (B, H, W) of the two checks: neither is the tracing example's (2, 100, 132); the first needs no padding to 32,
# the second does, and then none to a ViT's patch 14 (224 = 16 x 14: a branch an export must not fix)
SIZES = [(1, 96, 64), (3, 200, 224)]
VIT = [
    "backbone=dinov2_small",
    "backbone.pretrained=null",
    "+backbone.depth=2",
    "+backbone.embed_dim=32",
    "+backbone.num_heads=2",
    "+backbone.img_size=56",
    "backbone.pyramid.channels=32",
    "backbone.out_features=[stage2]",
]
MODELS = {  # name: (head, backbone overrides)
    "mask2former-resnet": ("mask2former_small", None),
    "maskformer-timm": ("maskformer", "timm_resnet18"),
    "mask2former-vit": ("mask2former_small", VIT),
}


def tiny_module(tiny, tmp_path: Path, head: str, backbone: str | list[str] | None = None) -> SegmentationModule:
    """A narrow randomly initialised model (conftest's tiny overrides), sampling offsets perturbed."""
    if isinstance(backbone, list):
        overrides = [o for o in tiny.model_overrides(head) if not o.startswith("backbone")] + backbone
    else:
        overrides = tiny.model_overrides(head, backbone or "resnet18")
    return module_of(
        tiny.compose_train(overrides, tmp_path), postprocess={"object_mask_threshold": 0.3, "overlap_threshold": 0.5}
    )


def module_of(cfg, task: str = "panoptic", postprocess: dict | None = None) -> SegmentationModule:
    """The composed config's model (seed 0) for CATEGORIES, sampling offsets and class scores perturbed."""
    parts = {key: OmegaConf.to_container(cfg[key], resolve=True) for key in ("backbone", "neck", "head")}
    torch.manual_seed(0)
    module = SegmentationModule(
        model=parts,
        criterion=OmegaConf.to_container(cfg.criterion, resolve=True),
        metadata={"num_classes": len(CATEGORIES), "categories": CATEGORIES},
        task=task,
        postprocess=postprocess,
    )
    with torch.no_grad():  # Deformable DETR's zero-initialised projections would hide the sampling path
        for name, p in module.model.named_parameters():
            if "sampling_offsets.weight" in name or "attention_weights.weight" in name:
                p.normal_(std=0.05)
            if "class_embed" in name:  # confident classes, so that panoptic inference keeps segments
                p.mul_(8)
    return module.eval()


def load_file_module(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"deployed_{path.parent.name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_outputs_equal(expected, got, atol: float = 1e-4) -> None:
    assert len(expected) == len(got) == 2
    for a, b in zip(expected, got, strict=True):
        b = torch.as_tensor(b)
        assert a.shape == b.shape
        torch.testing.assert_close(b, a, atol=atol, rtol=0)


def assert_same_maps(ours: np.ndarray, reference: np.ndarray, name: str) -> None:
    """Equal maps, up to a pixel in 100,000 (a decision on a logit within float rounding of its threshold)."""
    assert ours.shape == reference.shape and ours.dtype == reference.dtype, name
    assert (ours != reference).mean() <= 1e-5, f"{name}: {(ours != reference).sum()} pixels differ"


def assert_same_predictions(ours: dict, reference: dict) -> None:
    """NumPy post-processing (`ours`) == PostProcessor's (`reference`, torch tensors) for each task present."""
    assert ours.keys() == reference.keys()
    if "sem_seg" in reference:
        np.testing.assert_allclose(ours["sem_seg"], reference["sem_seg"].numpy(), atol=1e-5)
        assert_same_maps(ours["sem_seg_labels"], reference["sem_seg_labels"].numpy(), "sem_seg_labels")
    if "panoptic_seg" in reference:
        assert_same_maps(ours["panoptic_seg"], reference["panoptic_seg"].numpy(), "panoptic_seg")
        assert [{**s, "score": round(s["score"], 5)} for s in ours["segments_info"]] == [
            {**s, "score": round(s["score"], 5)} for s in reference["segments_info"]
        ]
    if "instances" in reference:
        instances, expected = ours["instances"], {k: v.numpy() for k, v in reference["instances"].items()}
        assert_same_maps(instances["masks"], expected["masks"], "instance masks")
        np.testing.assert_array_equal(instances["labels"], expected["labels"])
        np.testing.assert_allclose(instances["boxes"], expected["boxes"], atol=1)  # a flipped border pixel
        np.testing.assert_allclose(instances["scores"], expected["scores"], atol=1e-5)


def reference_predictions(task: str, settings: dict, outputs, image_size, orig_size) -> dict:
    """The project's PostProcessor on one image's outputs (pred_logits (1, Q, K+1), pred_masks (1, Q, h, w)),
    with metadata.json-style `settings` (thresholds)."""
    processor = PostProcessor(
        len(CATEGORIES),
        THINGS,
        semantic_on=task in ("semantic", "panoptic"),
        panoptic_on=task == "panoptic",
        instance_on=task in ("instance", "panoptic"),
        object_mask_threshold=settings["object_mask_threshold"],
        overlap_threshold=settings["overlap_threshold"],
    )
    logits, masks = (torch.as_tensor(t) for t in outputs)
    return processor({"pred_logits": logits, "pred_masks": masks}, [image_size], [orig_size])[0]


# ---- the NumPy post-processing ---------------------------------------------------------------------------
@pytest.mark.parametrize("task", ["semantic", "instance", "panoptic"])
@pytest.mark.parametrize("orig_size", [(37, 45), (50, 61), (20, 33)])
def test_numpy_postprocess_equals_the_postprocessor(task, orig_size):
    postprocess = load_file_module(Path(__file__).resolve().parents[1] / "densepred" / "deploy" / "postprocess.py")
    g = torch.Generator().manual_seed(9 + orig_size[0])
    logits = torch.randn(1, 16, len(CATEGORIES) + 1, generator=g) * 4
    # smooth blobs at stride 4 of a padded input (40, 48) holding a (37, 45) image
    masks = torch.nn.functional.interpolate(torch.randn(1, 16, 3, 3, generator=g) * 6, size=(10, 12), mode="bilinear")
    metadata = {
        "task": task,
        "num_classes": len(CATEGORIES),
        "thing_classes": THINGS,
        "postprocess": {"object_mask_threshold": 0.5, "overlap_threshold": 0.3, "test_topk": 100},
    }
    reference = reference_predictions(task, metadata["postprocess"], (logits, masks), (37, 45), orig_size)
    ours = postprocess.postprocess(logits[0].numpy(), masks[0].numpy(), (37, 45), orig_size, metadata)
    if task == "panoptic":
        assert len(reference["segments_info"]) >= 2
    if task != "semantic":
        assert len(reference["instances"]["labels"]) > 0
    assert_same_predictions(ours, reference)


def assert_same_detections(ours: dict, reference: dict) -> None:
    """NumPy box post-processing (`ours`) == BoxPostProcessor's (`reference`, torch tensors), to 1e-4."""
    assert ours.keys() == reference.keys() == {"instances"}
    instances, expected = ours["instances"], {k: v.numpy() for k, v in reference["instances"].items()}
    assert instances.keys() == expected.keys() == {"scores", "labels", "boxes"}
    np.testing.assert_array_equal(instances["labels"], expected["labels"])
    np.testing.assert_allclose(instances["scores"], expected["scores"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(instances["boxes"], expected["boxes"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("orig_size", [(74, 90), (37, 45), (20, 133)])
def test_numpy_box_postprocess_equals_the_box_postprocessor(orig_size):
    """A detector's raw outputs (sigmoid logits, boxes normalised by the padded input (64, 64) holding a (37, 45)
    image) through both post-processings: the same top-k boxes, scores and labels at the original size."""
    postprocess = load_file_module(Path(__file__).resolve().parents[1] / "densepred" / "deploy" / "postprocess.py")
    g = torch.Generator().manual_seed(orig_size[1])
    logits = torch.randn(1, 12, len(CATEGORIES), generator=g) * 3
    boxes = torch.cat([torch.rand(1, 12, 2, generator=g), torch.rand(1, 12, 2, generator=g) * 0.8], -1)
    metadata = {"task": "detection", "num_classes": len(CATEGORIES), "size_divisibility": 32}
    metadata["postprocess"] = {"test_topk": 10}
    reference = BoxPostProcessor(10)({"pred_logits": logits, "pred_boxes": boxes}, (64, 64), [(37, 45)], [orig_size])
    ours = postprocess.postprocess(logits[0].numpy(), boxes[0].numpy(), (37, 45), orig_size, metadata)
    assert_same_detections(ours, reference[0])
    assert len(ours["instances"]["scores"]) == 10 and ours["instances"]["boxes"].max() > 0
    # a box past the image is clipped to it; top-k larger than queries x classes keeps them all
    assert (ours["instances"]["boxes"][:, 2:] <= np.array(orig_size[::-1], dtype=np.float32)).all()
    metadata["postprocess"] = {"test_topk": 100}
    reference = BoxPostProcessor(100)({"pred_logits": logits, "pred_boxes": boxes}, (64, 64), [(37, 45)], [orig_size])
    ours = postprocess.postprocess(logits[0].numpy(), boxes[0].numpy(), (37, 45), orig_size, metadata)
    assert_same_detections(ours, reference[0])
    assert len(ours["instances"]["scores"]) == 12 * len(CATEGORIES)
    with pytest.raises(ValueError, match="task='panoptic': metadata.json's model is for task 'detection'"):
        postprocess.postprocess(logits[0].numpy(), boxes[0].numpy(), (37, 45), orig_size, metadata, task="panoptic")
    with pytest.raises(ValueError, match="pred_logits have 5 classes, metadata.json num_classes = 4"):
        postprocess.postprocess(np.zeros((12, 5)), boxes[0].numpy(), (37, 45), orig_size, metadata)


def test_bad_format_input_dtype_and_checkpoint_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="format='tflite': choose one of \\['onnx', 'torch_export'\\]"):
        export_model(tmp_path, format="tflite")
    with pytest.raises(ValueError, match="input_dtype='float16': choose one of"):
        export_model(tmp_path, input_dtype="float16")
    with pytest.raises(ValueError, match="checkpoint=.*missing: no such file or folder"):
        export_model(tmp_path / "missing")


# ---- export of each head and backbone ----------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name", ["maskformer-timm", "mask2former-vit"])
def test_onnx_and_torch_export_equal_eager_at_two_sizes(tiny, tmp_path, name):
    head, backbone = MODELS[name]
    module = tiny_module(tiny, tmp_path, head, backbone)
    model = ExportableSegmenter(portable(module.model)).eval()
    program = trace(model, sample_images((2, 100, 132), torch.uint8))
    torch.export.save(program, tmp_path / "model.pt2")
    to_onnx(program, model.output_names).save(str(tmp_path / "model.onnx"))
    loaded = torch.export.load(tmp_path / "model.pt2").module()
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    for index, size in enumerate(SIZES):
        images = sample_images(size, torch.uint8, seed=index + 5)
        with torch.no_grad():
            expected = model(images)
            # the eager reference is the project's own path: a collated batch, normalised with padding zeroed
            padded = torch.nn.functional.pad(images, (0, (-size[2]) % 32, 0, (-size[1]) % 32))
            outputs = module._outputs({"images": padded, "image_sizes": [size[1:]] * size[0]})
            assert_outputs_equal(expected, (outputs["pred_logits"], outputs["pred_masks"]), atol=1e-5)
            assert_outputs_equal(expected, loaded(images))
        assert_outputs_equal(expected, session.run(None, {"images": images.numpy()}))


@pytest.mark.slow
def test_export_command_writes_a_deployment_that_predicts_as_the_project(tiny, tmp_path):
    """`python export.py` on an export folder (the default Mask2Former head, a native ResNet): model.onnx equal
    to eager at two sizes, metadata.json, and postprocess.py giving the PostProcessor's segments."""
    module = tiny_module(tiny, tmp_path / "cfg", *MODELS["mask2former-resnet"])
    settings = {k: v for k, v in dict(module.hparams).items() if k != "output_dir"}
    source = write_export(tmp_path / "export", settings, module.model.state_dict(), module.model.normalization).parent
    out = tmp_path / "deploy"
    result = tiny.run_script(
        [
            "export.py",
            f"checkpoint={source}",
            f"output={out}",
            "format=onnx",
            "postprocess.object_mask_threshold=0.3",
            "postprocess.overlap_threshold=0.5",
            f"hydra.run.dir={tmp_path / 'hydra'}",
        ],
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["metadata.json", "model.onnx", "postprocess.py"]
    metadata = json.loads((out / "metadata.json").read_text())
    assert metadata["categories"][2] == {"id": 3, "name": "class_2", "isthing": False, "color": [20, 20, 30]}
    assert metadata["thing_classes"] == THINGS and metadata["task"] == "panoptic"
    assert metadata["postprocess"]["object_mask_threshold"] == 0.3
    assert metadata["normalization"]["pixel_mean"] == pytest.approx(module.model.normalization["pixel_mean"])
    assert [entry["size"] for entry in metadata["verification"]] == [[1, 96, 64], [2, 70, 90]]

    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    postprocess = load_file_module(out / "postprocess.py")
    model = ExportableSegmenter(portable(module.model)).eval()
    for index, size in enumerate(SIZES):
        images = sample_images(size, torch.uint8, seed=index + 7)
        with torch.no_grad():
            expected = model(images)
        got = session.run(None, {"images": images.numpy()})
        assert_outputs_equal(expected, got)
        orig_size = (size[1] * 3 // 2, size[2] + 5)  # as if the photo had been resized for the network
        for task in ("semantic", "panoptic"):
            # the same raw outputs (onnxruntime's) through both post-processings
            reference = reference_predictions(task, metadata["postprocess"], [g[:1] for g in got], size[1:], orig_size)
            ours = postprocess.postprocess(got[0][0], got[1][0], size[1:], orig_size, metadata, task=task)
            assert_same_predictions(ours, reference)
        assert len(reference["segments_info"]) > 0


@pytest.mark.slow
def test_detector_exports_to_onnx_with_its_box_postprocessing(tiny, tmp_path):
    """A tiny RT-DETR (task detection) through `export_model`: metadata.json records the task and `test_topk`,
    model.onnx (pred_logits (B, Q, K), pred_boxes (B, Q, 4)) equals eager at two sizes, and postprocess.py gives
    BoxPostProcessor's boxes, scores and labels on the same raw outputs."""
    cfg = tiny.compose_train(
        [
            "data.task=detection",
            "head=rtdetr_small",
            "head.num_queries=20",
            "backbone=resnet18",
            "backbone.pretrained=null",
        ],
        tmp_path / "cfg",
    )
    module = module_of(cfg, task="detection", postprocess={"test_topk": 30})
    settings = {k: v for k, v in dict(module.hparams).items() if k != "output_dir"}
    source = write_export(tmp_path / "export", settings, module.model.state_dict(), module.model.normalization).parent
    model_file = export_model(source, output=tmp_path / "deploy")
    metadata = json.loads((tmp_path / "deploy" / "metadata.json").read_text())
    assert metadata["task"] == "detection" and metadata["postprocess"] == {"test_topk": 30}
    assert metadata["outputs"] == {
        "pred_logits": ["batch", "queries", "num_classes"],
        "pred_boxes": ["batch", "queries", 4],
    }
    assert max(e for entry in metadata["verification"] for e in entry["max_abs_error"].values()) < 1e-4

    session = onnxruntime.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    postprocess = load_file_module(tmp_path / "deploy" / "postprocess.py")
    model = ExportableSegmenter(portable(module.model), output_names=("pred_logits", "pred_boxes")).eval()
    for index, size in enumerate(SIZES):
        images = sample_images(size, torch.uint8, seed=index + 11)
        with torch.no_grad():
            expected = model(images)
        got = session.run(None, {"images": images.numpy()})
        assert [tuple(g.shape) for g in got] == [(size[0], 20, len(CATEGORIES)), (size[0], 20, 4)]
        assert_outputs_equal(expected, got)
        padded = (size[1] + (-size[1]) % 32, size[2] + (-size[2]) % 32)
        orig_size = (size[1] * 3 // 2, size[2] + 5)  # as if the photo had been resized for the network
        outputs = {"pred_logits": torch.as_tensor(got[0][:1]), "pred_boxes": torch.as_tensor(got[1][:1])}
        reference = BoxPostProcessor(30)(outputs, padded, [size[1:]], [orig_size])[0]
        ours = postprocess.postprocess(got[0][0], got[1][0], size[1:], orig_size, metadata)
        assert_same_detections(ours, reference)
        assert len(ours["instances"]["labels"]) == 30 and ours["instances"]["boxes"].max() > 0
