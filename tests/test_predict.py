"""predict.py's safety: the output folder may not be (inside) the input folder, overlays are named by the
whole input file name, unreadable images are skipped and reported while the others are predicted; the
pieces in-process, then one real command line on a tiny trained run covering the cases together."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.io import read_image

from densepred.data.image_folder import ImageFolderCollate, ImageFolderDataset
from densepred.engine.prediction import SKIPPED_KEY, check_output_folder, describe, overlay_name


def _image(path: Path, height: int, width: int, seed: int = 0) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def _corrupt(folder: Path) -> list[str]:
    """bad1.jpg: not an image at all; bad2.png: a PNG cut after its first 60 bytes."""
    (folder / "bad1.jpg").write_bytes(b"this is not a JPEG file")
    whole = _image(folder / "bad2.png", 24, 24).read_bytes()
    (folder / "bad2.png").write_bytes(whole[:60])
    return ["bad1.jpg", "bad2.png"]


def test_output_folder_may_be_neither_the_input_folder_nor_inside_it(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for output in (images, images / ".", tmp_path / "x" / ".." / "images", images / "predictions", images / "a" / "b"):
        with pytest.raises(ValueError, match=r"output=.*input=.*Choose an output folder outside") as error:
            check_output_folder(images, output)
        assert f"output={images.parent / 'images_predictions'}" in str(error.value)  # the suggested fix
    (tmp_path / "link").symlink_to(images, target_is_directory=True)
    with pytest.raises(ValueError, match="is the input folder"):
        check_output_folder(images, tmp_path / "link")
    with pytest.raises(ValueError, match="is inside the input folder"):
        check_output_folder(tmp_path / "link", images / "out")
    # A sibling, a parent, a folder whose name starts like the input's: allowed.
    for output in (tmp_path / "predictions", tmp_path, tmp_path / "images_predictions"):
        assert check_output_folder(images, output) == output.resolve()


def test_overlay_names_keep_the_whole_file_name():
    assert [overlay_name(n) for n in ("x.jpg", "x.png", "x.JPG", "dir/y.tar.png")] == [
        "x.jpg.png",
        "x.png.png",
        "x.JPG.png",
        "y.tar.png.png",
    ]


def test_unreadable_images_are_skipped_samples_left_out_of_the_batch(tmp_path):
    _image(tmp_path / "a.jpg", 40, 60)
    bad = _corrupt(tmp_path)
    _image(tmp_path / "c.png", 50, 30, seed=1)
    dataset = ImageFolderDataset(tmp_path, short_side=32, max_size=64)
    assert [p.name for p in dataset.files] == ["a.jpg", *bad, "c.png"]
    samples = [dataset[i] for i in range(len(dataset))]
    assert [sorted(s) for s in samples[1:3]] == [["image_id", "skipped"]] * 2
    assert "bad1.jpg" in samples[1]["skipped"] and "cannot be decoded" in samples[1]["skipped"]
    collate = ImageFolderCollate()
    batch = collate(samples)
    assert batch["image_ids"] == [0, 3] and batch["images"].shape[0] == 2
    assert batch["orig_sizes"] == [(40, 60), (50, 30)]
    assert [image_id for image_id, _ in batch["skipped"]] == [1, 2]
    # A batch of only unreadable images is empty, with the same keys.
    empty = collate(samples[1:3])
    assert empty["images"].shape == (0, 3, 32, 32) and empty["image_ids"] == [] and len(empty["skipped"]) == 2
    assert set(empty) == set(batch)


def test_describe_reads_the_label_map_and_counts_segment_areas():
    categories = [{"name": "cat"}, {"name": "sky"}, {"name": "road"}]
    labels = torch.tensor([[0, 0, 2], [2, 2, 2]], dtype=torch.int32)
    assert describe({"sem_seg_labels": labels, "sem_seg": torch.zeros(3, 1, 1)}, categories, 0.5) == {
        "classes_present": ["cat", "road"]
    }
    panoptic = torch.tensor([[1, 1, 0], [2, 2, 2]], dtype=torch.int32)
    segments = [
        {"id": 1, "label": 0, "isthing": True, "score": 0.9},
        {"id": 2, "label": 1, "isthing": False, "score": 1},
    ]
    record = describe({"panoptic_seg": panoptic, "segments_info": segments}, categories, 0.5)
    assert [(s["category"], s["area"]) for s in record["segments"]] == [("cat", 2), ("sky", 3)]


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


@pytest.mark.slow
def test_predict_command_line_is_safe(tmp_path, tiny, synthetic_root, tiny_cli_run):
    """One folder: `a.jpg` and `a.png` (same stem), two unreadable files (together in one batch of 2: an empty
    batch), and a 400 x 300 `c.jpg` that the bounded post-processing takes (`postprocess.exact_max_pixels`
    below its size, above the others'). output=input is refused with nothing written; then a real run."""
    from densepred.engine.build import build_datamodule

    source = build_datamodule(tiny.compose_train(tiny.train_overrides(synthetic_root), tmp_path)).data_root
    val = sorted((source / "val2017").glob("*.jpg"))
    images = tmp_path / "images"
    images.mkdir()
    Image.open(val[0]).save(images / "a.jpg")
    Image.open(val[1]).save(images / "a.png")
    bad = _corrupt(images)
    Image.open(val[2]).convert("RGB").resize((400, 300)).save(images / "c.jpg")
    sizes = {p.name: Image.open(p).size[::-1] for p in images.iterdir() if p.name not in bad}  # (H, W)
    assert max(h * w for n, (h, w) in sizes.items() if n != "c.jpg") < 20000 < 400 * 300

    common = [
        f"checkpoint={tiny_cli_run / 'export'}",
        f"input={images}",
        "short_side=64",
        "max_size=96",
        "batch_size=2",
        "device=cpu",
        "postprocess.object_mask_threshold=0.0",  # every query that is not no-object: segments to draw
        "postprocess.exact_max_pixels=20000",
        f"hydra.run.dir={tmp_path / 'hydra'}",
    ]
    before = _snapshot(images)
    refused = tiny.run_script(["predict.py", *common, f"output={images}"])
    assert refused.returncode != 0
    assert f"output={images} is the input folder input={images}" in refused.stderr
    assert "Choose an output folder outside the input folder" in refused.stderr
    assert _snapshot(images) == before  # nothing overwritten, nothing added

    out = tmp_path / "predictions"
    result = tiny.run_script(["predict.py", *common, f"output={out}"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert _snapshot(images) == before
    assert sorted(p.name for p in out.iterdir()) == ["a.jpg.png", "a.png.png", "c.jpg.png", "predictions.json"]
    for name, (height, width) in sizes.items():
        assert tuple(read_image(str(out / f"{name}.png")).shape) == (3, height, width), name
    predictions = json.loads((out / "predictions.json").read_text())
    assert list(predictions) == ["a.jpg", "a.png", "c.jpg", SKIPPED_KEY]
    assert sorted(predictions[SKIPPED_KEY]) == bad
    assert all("cannot be decoded" in reason for reason in predictions[SKIPPED_KEY].values())
    logs = result.stdout + result.stderr
    assert all(f"skipped {name}" in logs for name in bad) and "2 unreadable image(s) skipped" in logs
    for name in ("a.jpg", "a.png", "c.jpg"):
        record = predictions[name]
        assert set(record) == {"segments", "instances"}
        assert record["segments"] and all(s["area"] > 0 for s in record["segments"]), name
        assert sum(s["area"] for s in record["segments"]) <= sizes[name][0] * sizes[name][1]
    assert not any(p.name.startswith(".") for p in out.iterdir())  # no temporary files left (atomic writes)
    assert os.listdir(tmp_path / "hydra")  # Hydra's own folder, not the output
