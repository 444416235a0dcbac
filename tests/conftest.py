"""Shared fixtures of the test suite (helpers are reached through these fixtures, never imported).

- `tiny`: the tiny train.py / evaluate.py overrides of the end-to-end tests and the entry-point helpers. Four
  64-96 px synthetic training images at batch 2 make one epoch of 2 steps, so `trainer.max_steps=2` runs one
  validation; narrow, shallow necks and heads keep every run to a few seconds on a CPU.
- `tiny_head`, `tiny_backbone`: parametrized over every head and over a native and a timm backbone.
- `synthetic_root`: one cache folder for the tiny synthetic data set, shared by the whole session.
- `eval_data`: small synthetic data sets in the real on-disk formats, with predictions, for the evaluation tests.
- `pq_reference`: the independent panoptic-quality oracle of tests/reference/panoptic_reference.py.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import lightning
import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from omegaconf import DictConfig
from PIL import Image
from torchvision.ops import masks_to_boxes

from densepred.data.image_io import id2rgb

ROOT = Path(__file__).resolve().parents[1]
HEADS = ("mask2former", "maskformer", "mask2former_small")
# A native backbone, and timm's resnet18 through the timm_resnet50 config.
BACKBONES = {
    "resnet18": ["backbone=resnet18"],
    "timm_resnet18": ["backbone=timm_resnet50", "backbone.model_name=resnet18"],
}


class TinyRun:
    """The tiny synthetic data (4 train / 4 val images), a narrow model and a 2-step CPU run, as overrides."""

    ROOT = ROOT
    HEADS = HEADS
    BACKBONES = BACKBONES

    @staticmethod
    def data_overrides(data_root: str | Path, task: str = "panoptic") -> list[str]:
        """The tiny synthetic data set (4 train / 4 val images) in `data_root`, loaded in the main process."""
        return [
            f"data.root={data_root}",
            f"data.task={task}",
            "data.synthetic.num_train=4",
            "data.synthetic.num_val=4",
            "data.synthetic.min_size=64",
            "data.synthetic.max_size=96",
            "data.train_transform.size=64",
            "data.eval_transform.short=64",
            "data.eval_transform.max_size=96",
            "data.batch_size=2",
            "data.num_workers=0",
        ]

    @staticmethod
    def model_overrides(head: str = "mask2former_small", backbone: str = "resnet18") -> list[str]:
        """A narrow `head` (with the neck and criterion it brings) on a randomly initialised `backbone`."""
        overrides = [
            f"head={head}",
            *BACKBONES[backbone],
            "backbone.pretrained=null",
            "head.hidden_dim=32",
            "head.num_queries=6",
            "head.num_heads=4",
            "head.dim_feedforward=64",
            "head.num_layers=2",
            "neck.conv_dim=32",
            "neck.mask_dim=32",
        ]
        if head != "maskformer":  # the deformable pixel decoder and the point-sampled losses
            overrides += [
                "neck.encoder_layers=1",
                "neck.num_heads=4",
                "neck.dim_feedforward=64",
                "criterion.num_points=256",
            ]
        return overrides

    @staticmethod
    def train_overrides(
        data_root: str | Path, head: str = "mask2former_small", backbone: str = "resnet18", max_steps: int = 2
    ) -> list[str]:
        """Data + model + a `max_steps` CPU run that logs every step."""
        return [
            *TinyRun.data_overrides(data_root),
            *TinyRun.model_overrides(head, backbone),
            "trainer.accelerator=cpu",
            f"trainer.max_steps={max_steps}",
            "trainer.log_every_n_steps=1",
        ]

    @staticmethod
    def predict_args(checkpoint: str | Path, images: str | Path, out: str | Path, hydra_dir: str | Path) -> list[str]:
        """`predict.py` on a folder of `images` at the tiny evaluation size, on the CPU, writing to `out`."""
        return [
            "predict.py",
            f"checkpoint={checkpoint}",
            f"input={images}",
            f"output={out}",
            "short_side=64",
            "max_size=96",
            "device=cpu",
            f"hydra.run.dir={hydra_dir}",
        ]

    @staticmethod
    def compose_train(overrides: list[str], output_dir: str | Path) -> DictConfig:
        """configs/train.yaml with `overrides`; `paths.output_dir` replaces `${hydra:...}` (absent in compose)."""
        from hydra import compose, initialize_config_dir

        with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
            return compose(config_name="train", overrides=[*overrides, f"paths.output_dir={output_dir}"])

    @staticmethod
    def load_script(name: str) -> ModuleType:
        """An entry-point script (train.py, evaluate.py, predict.py) imported as a module."""
        spec = importlib.util.spec_from_file_location(f"densepred_{name}", ROOT / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    @staticmethod
    def run_script(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
        """`python <args>` in the repository root (the real command-line path), output captured."""
        env = {**os.environ, "HYDRA_FULL_ERROR": "0", "PYTHONWARNINGS": "ignore"}
        return subprocess.run(
            [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env
        )

    @staticmethod
    def read_metrics(path: Path) -> dict[str, float | None]:
        return json.loads(path.read_text())

    @staticmethod
    def detection_overrides(
        data_root: str | Path, head: list[str], backbone: str = "resnet18", max_steps: int = 2
    ) -> list[str]:
        """The tiny data as detection, `head` (`head=...` and its narrow sizes) on a random `backbone`, a
        `max_steps` CPU run that logs every step."""
        return [
            *TinyRun.data_overrides(data_root, task="detection"),
            *head,
            *BACKBONES[backbone],
            "backbone.pretrained=null",
            "trainer.accelerator=cpu",
            f"trainer.max_steps={max_steps}",
            "trainer.log_every_n_steps=1",
        ]

    @staticmethod
    def train_detection(cfg: DictConfig, output_dir: Path) -> tuple[dict[str, Any], list[dict[str, str]], set[str]]:
        """Train `cfg` (output in `output_dir`) with train.py's main; check the losses are finite and COCO box AP
        was validated and tested (in [0, 100], the test's equal to the returned one). Returns (the returned
        results, the rows of metrics.csv, the model weights that moved)."""
        from densepred.engine.build import build_datamodule, build_module

        lightning.seed_everything(cfg.seed)
        model = build_module(cfg, build_datamodule(cfg).metadata).model
        initial = {k: v.clone() for k, v in model.state_dict().items()}
        results = TinyRun.load_script("train").main.__wrapped__(cfg)
        rows = list(csv.DictReader((output_dir / "csv" / "metrics.csv").open()))
        losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
        assert len(losses) == cfg.trainer.max_steps and all(math.isfinite(v) and v > 0 for v in losses)
        assert any(r.get("val/bbox/AP") for r in rows)
        step = f"{cfg.trainer.max_steps:07d}"
        test_metrics = TinyRun.read_metrics(output_dir / "eval_test" / f"metrics_step{step}.json")
        box_metrics = {"bbox/AP", "bbox/AP50", "bbox/AP75"}
        assert box_metrics <= set(test_metrics) and not any(k.startswith("segm/") for k in test_metrics)
        assert all(0.0 <= test_metrics[k] <= 100.0 for k in box_metrics)
        assert abs(test_metrics["bbox/AP"] - results["bbox/AP"]) < 1e-6
        state = torch.load(output_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        trained = state["state_dict"]
        moved = {k for k, v in initial.items() if v.is_floating_point() and not torch.equal(v, trained[f"model.{k}"])}
        return results, rows, moved


@pytest.fixture(scope="session")
def tiny() -> TinyRun:
    """The tiny-run override builders and entry-point helpers (`tiny.train_overrides(...)`, `tiny.ROOT`, ...)."""
    import densepred.engine.build  # noqa: F401  (registers the `main_metric` resolver used by configs/train.yaml)

    return TinyRun()


@pytest.fixture(params=HEADS)
def tiny_head(request) -> str:
    """Every head config (parametrizes the test)."""
    return request.param


@pytest.fixture(params=list(BACKBONES))
def tiny_backbone(request) -> str:
    """A native and a timm backbone, keys of `TinyRun.BACKBONES` (parametrizes the test)."""
    return request.param


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """One `data.root` cache folder for the whole session: the tiny synthetic data set is generated once there
    (`ensure_synthetic` keys each parameter set by its own `synthetic-<hash>` folder, under a file lock) and only
    read after. Tests that need other data, or to own the folder, use their own tmp folder."""
    return tmp_path_factory.mktemp("synthetic")


# Evaluation data: each builder takes a folder and a seed and returns the evaluator's arguments plus predictions
# keyed by image id (in the format of docs/architecture.md). Predictions are shifted, relabelled, dropped and
# extra copies of the ground truth, so every matching case is exercised.

INSTANCE_CATEGORIES = [{"id": 1, "name": "cat"}, {"id": 3, "name": "dog"}, {"id": 7, "name": "bird"}]
PANOPTIC_CATEGORIES = [
    {"id": 1, "name": "person", "isthing": 1, "color": [220, 20, 60]},
    {"id": 2, "name": "car", "isthing": 1, "color": [0, 0, 142]},
    {"id": 10, "name": "sky", "isthing": 0, "color": [70, 130, 180]},
    {"id": 11, "name": "road", "isthing": 0, "color": [128, 64, 128]},
]


def _box_mask(h: int, w: int, y0: int, x0: int, bh: int, bw: int) -> np.ndarray:
    mask = np.zeros((h, w), dtype=bool)
    mask[max(y0, 0) : max(y0 + bh, 0), max(x0, 0) : max(x0 + bw, 0)] = True
    return mask


def _shift(mask: np.ndarray, dy: int, dx: int) -> np.ndarray:
    out = np.zeros_like(mask)
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    ys, xs = ys + dy, xs + dx
    keep = (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)
    out[ys[keep], xs[keep]] = True
    return out


def make_coco_instances(folder: Path, seed: int = 0) -> dict[str, Any]:
    """COCO instances JSON (RLE segmentations, one crowd) with small, medium and large objects."""
    rng = np.random.default_rng(seed)
    sizes = [(40, 48), (36, 36), (128, 120), (64, 80), (50, 40)]
    images, annotations, predictions = [], [], {}
    for image_id, (h, w) in enumerate(sizes, start=10):
        images.append({"id": image_id, "height": h, "width": w, "file_name": f"{image_id:012d}.jpg"})
        masks, scores, labels = [], [], []
        for k in range(int(rng.integers(1, 5))):
            bh, bw = int(rng.integers(6, h * 3 // 4)), int(rng.integers(6, w * 3 // 4))
            if h * w > 10000 and k == 0:  # a large object (area > 96^2)
                bh, bw = h - 10, w - 10
            gt = _box_mask(h, w, int(rng.integers(0, h - bh)), int(rng.integers(0, w - bw)), bh, bw)
            label = int(rng.integers(0, 3))
            iscrowd = int(image_id == 11 and k == 0)
            rle = mask_util.encode(np.asfortranarray(gt[:, :, None], dtype=np.uint8))[0]
            segmentation = (
                {"size": [h, w], "counts": _uncompressed_counts(gt)}
                if iscrowd
                else {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
            )
            x, y, bw_, bh_ = mask_util.toBbox(rle).tolist()
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": INSTANCE_CATEGORIES[label]["id"],
                    "segmentation": segmentation,
                    "area": float(gt.sum()),
                    "bbox": [x, y, bw_, bh_],
                    "iscrowd": iscrowd,
                }
            )
            for _ in range(int(rng.integers(0, 3))):  # 0-2 shifted, sometimes relabelled copies
                pred = _shift(gt, int(rng.integers(-4, 5)), int(rng.integers(-4, 5)))
                if pred.any():
                    masks.append(pred)
                    labels.append(label if rng.random() < 0.8 else int(rng.integers(0, 3)))
                    scores.append(float(rng.random()))
        if rng.random() < 0.7:  # a false positive
            masks.append(_box_mask(h, w, 1, 1, 5, 7))
            labels.append(int(rng.integers(0, 3)))
            scores.append(float(rng.random()))
        m = torch.from_numpy(np.stack(masks)) if masks else torch.zeros(0, h, w, dtype=torch.bool)
        predictions[image_id] = {
            "instances": {
                "masks": m,
                "scores": torch.tensor(scores, dtype=torch.float32),
                "labels": torch.tensor(labels),
                "boxes": masks_to_boxes(m) if len(m) else torch.zeros(0, 4),
            }
        }
    folder.mkdir(parents=True, exist_ok=True)
    ann_file = folder / "instances.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": INSTANCE_CATEGORIES}))
    return {
        "ann_file": ann_file,
        "contiguous_to_dataset_id": [c["id"] for c in INSTANCE_CATEGORIES],
        "predictions": predictions,
    }


def _uncompressed_counts(mask: np.ndarray) -> list[int]:
    """COCO's uncompressed RLE of a crowd mask (column-major run lengths, starting with zeros)."""
    flat = mask.T.ravel().astype(np.int8)
    change = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    return np.diff(np.concatenate([[0], change])).tolist()


def make_panoptic(folder: Path, seed: int = 0, num_images: int = 5) -> dict[str, Any]:
    """COCO panoptic JSON + PNGs with void, crowd regions, and predictions with TPs, FPs, FNs and ignores."""
    rng = np.random.default_rng(seed)
    gt_root, pred_root = folder / "panoptic_gt", folder / "panoptic_pred"
    gt_root.mkdir(parents=True, exist_ok=True)
    pred_root.mkdir(parents=True, exist_ok=True)
    contiguous = {c["id"]: i for i, c in enumerate(PANOPTIC_CATEGORIES)}
    images, gt_anns, pred_anns, predictions = [], [], [], {}
    h, w = 30, 40
    for image_id in range(100, 100 + num_images):
        ids = iter(rng.choice(np.arange(1, 2**24), size=40, replace=False).tolist())
        gt_map, gt_list = np.zeros((h, w), np.int64), []  # (id, category, iscrowd, mask)
        pred_map, pred_list = np.zeros((h, w), np.int64), []  # (id, category)

        horizon = int(rng.integers(8, 20))
        for category, mask in ((10, np.arange(h)[:, None] < horizon), (11, np.arange(h)[:, None] >= horizon)):
            gt_list.append((next(ids), category, 0, np.broadcast_to(mask, (h, w))))
        things = []
        for _ in range(int(rng.integers(1, 5))):
            bh, bw = int(rng.integers(4, 14)), int(rng.integers(4, 16))
            things.append(
                (
                    int(rng.choice([1, 2])),
                    _box_mask(h, w, int(rng.integers(0, h - bh)), int(rng.integers(0, w - bw)), bh, bw),
                )
            )
            gt_list.append((next(ids), things[-1][0], 0, things[-1][1]))
        crowd = None
        if rng.random() < 0.6:
            crowd = (
                int(rng.choice([1, 2])),
                _box_mask(h, w, int(rng.integers(0, h - 8)), int(rng.integers(0, w - 10)), 8, 10),
            )
            gt_list.append((next(ids), crowd[0], 1, crowd[1]))
        for segment_id, _, _, mask in gt_list:
            gt_map[mask] = segment_id
        strip = int(rng.integers(0, w - 4))
        gt_map[:, strip : strip + 3] = 0  # a void strip
        gt_map[rng.random((h, w)) < 0.03] = 0  # scattered void pixels

        shifted = horizon + int(rng.integers(-3, 4))
        for category, mask in ((10, np.arange(h)[:, None] < shifted), (11, np.arange(h)[:, None] >= shifted)):
            if rng.random() < 0.9:
                pred_list.append((next(ids), category, np.broadcast_to(mask, (h, w))))
        for category, mask in things:
            if rng.random() < 0.8:  # else a false negative
                label = category if rng.random() < 0.85 else 3 - category
                pred_list.append((next(ids), label, _shift(mask, int(rng.integers(-3, 4)), int(rng.integers(-3, 4)))))
        if crowd is not None:  # on the crowd region: ignored if same category, else a false positive
            pred_list.append((next(ids), int(rng.choice([1, 2])), _shift(crowd[1], 1, 1)))
        void_ys, void_xs = np.nonzero(gt_map == 0)
        if len(void_ys) and rng.random() < 0.7:  # a segment mostly on void
            m = np.zeros((h, w), bool)
            m[void_ys[:12], void_xs[:12]] = True
            pred_list.append((next(ids), int(rng.choice([1, 2, 10, 11])), m))
        for segment_id, _, mask in pred_list:
            pred_map[mask] = segment_id

        gt_segments = _segments_info(gt_map, [(s, c, crowd_flag) for s, c, crowd_flag, _ in gt_list])
        pred_segments = _segments_info(pred_map, [(s, c, 0) for s, c, _ in pred_list])
        file_name = f"{image_id:012d}.png"
        Image.fromarray(id2rgb(gt_map)).save(gt_root / file_name)
        Image.fromarray(id2rgb(pred_map)).save(pred_root / file_name)
        images.append({"id": image_id, "height": h, "width": w, "file_name": f"{image_id:012d}.jpg"})
        gt_anns.append({"image_id": image_id, "file_name": file_name, "segments_info": gt_segments})
        pred_anns.append({"image_id": image_id, "file_name": file_name, "segments_info": pred_segments})
        segments_info = [
            {"id": s["id"], "label": contiguous[s["category_id"]], "isthing": s["category_id"] < 10, "score": 1.0}
            for s in pred_segments
        ]
        segments_info.append({"id": next(ids), "label": 0, "isthing": True, "score": 0.5})  # no pixels: dropped
        predictions[image_id] = {
            "panoptic_seg": torch.from_numpy(pred_map.astype(np.int32)),
            "segments_info": segments_info,
        }

    gt_json, pred_json = folder / "panoptic_gt.json", folder / "panoptic_pred.json"
    gt_json.write_text(json.dumps({"images": images, "annotations": gt_anns, "categories": PANOPTIC_CATEGORIES}))
    pred_json.write_text(json.dumps({"images": images, "annotations": pred_anns, "categories": PANOPTIC_CATEGORIES}))
    return {
        "panoptic_json": gt_json,
        "panoptic_root": gt_root,
        "categories": PANOPTIC_CATEGORIES,
        "contiguous_to_dataset_id": [c["id"] for c in PANOPTIC_CATEGORIES],
        "predictions": predictions,
        "pred_json": pred_json,
        "pred_root": pred_root,
    }


def _segments_info(id_map: np.ndarray, segments: list[tuple[int, int, int]]) -> list[dict[str, Any]]:
    """segments_info of the segments still visible in `id_map`, with their areas and boxes."""
    info = []
    for segment_id, category_id, iscrowd in segments:
        mask = id_map == segment_id
        if mask.any():
            ys, xs = np.nonzero(mask)
            bbox = [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]
            info.append(
                {
                    "id": segment_id,
                    "category_id": category_id,
                    "iscrowd": iscrowd,
                    "area": int(mask.sum()),
                    "bbox": bbox,
                }
            )
    return info


def make_semantic(seed: int = 0, num_classes: int = 5, num_images: int = 5) -> dict[str, Any]:
    """Ground-truth maps with ignored pixels and score maps that agree with them on ~70% of pixels."""
    rng = np.random.default_rng(seed)
    ground_truth, predictions = {}, {}
    for image_id in range(num_images):
        h, w = int(rng.integers(12, 24)), int(rng.integers(12, 24))
        gt = rng.integers(0, num_classes, size=(h, w))
        gt[rng.random((h, w)) < 0.1] = 255
        scores = rng.random((num_classes, h, w)).astype(np.float32)
        ys, xs = np.nonzero((rng.random((h, w)) < 0.7) & (gt != 255))
        scores[gt[ys, xs], ys, xs] += 1.0
        ground_truth[image_id] = gt
        predictions[image_id] = {"sem_seg": torch.from_numpy(scores)}
    return {
        "num_classes": num_classes,
        "ignore_index": 255,
        "ground_truth": ground_truth,
        "class_names": [f"class{i}" for i in range(num_classes)],
        "predictions": predictions,
    }


class EvalData:
    """The evaluation tests' synthetic data builders and the panoptic categories they use."""

    INSTANCE_CATEGORIES = INSTANCE_CATEGORIES
    PANOPTIC_CATEGORIES = PANOPTIC_CATEGORIES
    make_coco_instances = staticmethod(make_coco_instances)
    make_panoptic = staticmethod(make_panoptic)
    make_semantic = staticmethod(make_semantic)


@pytest.fixture(scope="session")
def eval_data() -> EvalData:
    """`make_coco_instances(folder, seed)`, `make_panoptic(folder, seed, num_images)`,
    `make_semantic(seed, num_classes, num_images)` and `PANOPTIC_CATEGORIES`."""
    return EvalData()


@pytest.fixture(scope="session")
def pq_reference() -> Callable[..., dict]:
    """`pq_compute_reference(gt_json, pred_json, gt_folder, pred_folder)` of tests/reference/panoptic_reference.py,
    loaded from its file (an independent oracle: not imported as a module of the test folder)."""
    path = Path(__file__).resolve().parent / "reference" / "panoptic_reference.py"
    spec = importlib.util.spec_from_file_location("densepred_tests_panoptic_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.pq_compute_reference


@pytest.fixture(scope="session")
def tiny_cli_run(tmp_path_factory, tiny, synthetic_root) -> Path:
    """`python train.py ...` on the tiny synthetic data, the real command line with Hydra's own output folder:
    a 2-step run with its checkpoints/, export/ and eval_test/ (read, never written, by the tests using it)."""
    out = tmp_path_factory.mktemp("cli_run")
    result = tiny.run_script(
        ["train.py", *tiny.train_overrides(synthetic_root), "validate_before_fit=false", f"hydra.run.dir={out}"]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / ".hydra" / "config.yaml").is_file()
    return out


def _rectangle_targets(
    generator: torch.Generator,
    counts: tuple[int, ...],
    num_classes: int,
    size: int = 64,
    box: tuple[int, int] = (20, 16),
) -> list[dict[str, torch.Tensor]]:
    """Criterion targets: per image `counts[b]` random (h, w) = `box` rectangles in a size x size frame."""
    height, width = box
    targets = []
    for n in counts:
        masks = torch.zeros(n, size, size, dtype=torch.bool)
        for i in range(n):
            y, x = torch.randint(0, size - height, (2,), generator=generator).tolist()
            masks[i, y : y + height, x : x + width] = True
        targets.append({"labels": torch.randint(0, num_classes, (n,), generator=generator), "masks": masks})
    return targets


@pytest.fixture(scope="session")
def rectangle_targets() -> Callable[..., list[dict[str, torch.Tensor]]]:
    """`(generator, counts, num_classes, size=64, box=(20, 16)) -> targets`: random rectangle masks and labels."""
    return _rectangle_targets
