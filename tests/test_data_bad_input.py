"""Every bad-input case of the data layer has its documented outcome (docs/data.md): a DataError naming the
file and id, or a skip / drop that is counted and reported once. Never a raw PIL or pycocotools error."""

import io
import json
import logging
import re
import tempfile

import numpy as np
import pytest
from PIL import Image

from densepred.data import (
    BadImageError,
    CocoInstanceDataset,
    CocoPanopticDataset,
    DataError,
    DataModule,
    PanopticGroundTruth,
)
from densepred.data.image_io import IMAGE_SUFFIXES, read_image

SQUARE = [[2, 2, 12, 2, 12, 12, 2, 12]]


def write_images(folder, names, size=(16, 20)):
    for name in names:
        Image.fromarray(np.full((*size, 3), 100, np.uint8)).save(folder / name)


def coco(tmp_path, annotations, images=None, categories=None, name="ann.json"):
    images = images or [{"id": 1, "file_name": "a.png", "height": 16, "width": 20}]
    data = {"images": images, "annotations": annotations, "categories": categories or [{"id": 1, "name": "thing"}]}
    (tmp_path / name).write_text(json.dumps(data))
    return tmp_path / name


def ann(ann_id, segmentation=SQUARE, **extra):
    return {
        "id": ann_id,
        "image_id": 1,
        "category_id": 1,
        "segmentation": segmentation,
        "bbox": [2, 2, 10, 10],
        "iscrowd": 0,
        **extra,
    }


# Images -------------------------------------------------------------------------------------------------


def test_missing_image_is_an_error_at_evaluation_and_a_counted_skip_in_training(tmp_path, caplog):
    write_images(tmp_path, ["b.png"])
    images = [
        {"id": 1, "file_name": "a.png", "height": 16, "width": 20},
        {"id": 2, "file_name": "b.png", "height": 16, "width": 20},
    ]
    path = coco(tmp_path, [ann(1), ann(2, image_id=2)], images)
    with pytest.raises(BadImageError, match=r"a\.png: image file of image id 1 not found"):
        CocoInstanceDataset(path, tmp_path)[0]
    train = CocoInstanceDataset(path, tmp_path, skip_bad_images=True)
    sample = train[0]
    assert sample["image_id"] == 2  # the next image instead
    assert [reason for reason, _ in sample["issues"]] == ["skipped image"] and "a.png" in sample["issues"][0][1]
    # The DataModule counts the skips of a batch and reports them once, as one warning.
    dm = DataModule(
        task="instance",
        train={"img_dir": str(tmp_path), "ann_file": str(path)},
        batch_size=2,
        train_transform={"recipe": "resize", "short": 16, "max_size": 20},
    )
    with caplog.at_level(logging.WARNING):
        for batch in dm.train_dataloader():
            batch = dm.on_before_batch_transfer(batch, 0)
            assert "data_issues" not in batch and batch["image_ids"] == [2, 2]
        text = dm.report_issues()
        assert dm.report_issues() is None
    assert "skipped image: 1" in text and "a.png" in text
    assert sum("skipped image" in r.message for r in caplog.records) == 1


@pytest.mark.parametrize("kind", ["truncated jpeg", "corrupt png"])
def test_truncated_or_corrupt_files_are_a_clear_error(tmp_path, kind):
    buffer = io.BytesIO()
    if kind == "truncated jpeg":
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
        (tmp_path / "x.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        name = "x.jpg"
    else:
        (tmp_path / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
        name = "x.png"
    with pytest.raises(
        BadImageError, match=rf"{name}: image file of image id 7 cannot be decoded .*truncated or corrupt"
    ):
        read_image(tmp_path / name, 7)


def test_gray_rgba_cmyk_and_16_bit_images_become_rgb(tmp_path):
    gray = np.array([[0, 128, 255]], np.uint8)
    Image.fromarray(gray, "L").save(tmp_path / "gray.png")
    Image.fromarray(np.array([[[10, 20, 30, 0], [40, 50, 60, 255]]], np.uint8), "RGBA").save(tmp_path / "rgba.png")
    Image.new("CMYK", (2, 1), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")  # pure red in CMYK
    Image.fromarray(np.array([[0, 32768, 65535]], np.uint16)).save(tmp_path / "sixteen.png")
    assert read_image(tmp_path / "gray.png", 1).tolist() == [[[0] * 3, [128] * 3, [255] * 3]]
    assert read_image(tmp_path / "rgba.png", 1).tolist() == [[[10, 20, 30], [40, 50, 60]]]
    cmyk = read_image(tmp_path / "cmyk.jpg", 1)
    assert cmyk.shape == (1, 2, 3) and cmyk[..., 0].min() > 200 and cmyk[..., 1:].max() < 50
    assert read_image(tmp_path / "sixteen.png", 1).tolist() == [[[0] * 3, [128] * 3, [255] * 3]]


@pytest.mark.parametrize("suffix", IMAGE_SUFFIXES)
def test_every_listed_image_suffix_is_decoded(tmp_path, suffix):
    pixels = np.zeros((6, 8, 3), np.uint8)
    pixels[:, :4] = 200
    Image.fromarray(pixels).save(tmp_path / f"x{suffix}", quality=100)  # formats without a quality ignore it
    out = read_image(tmp_path / f"x{suffix}", 1, expected_hw=(6, 8))
    assert out.shape == (6, 8, 3) and abs(out[:, :3].astype(int).mean() - 200) < 8 and out[:, 5:].max() < 8


def test_exif_orientation_is_applied(tmp_path):
    pixels = np.zeros((10, 30, 3), np.uint8)
    pixels[:, :5] = 255  # white stripe on the left
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    image.save(tmp_path / "r.jpg", exif=exif, quality=100)
    out = read_image(tmp_path / "r.jpg", 1, expected_hw=(30, 10))
    assert out.shape == (30, 10, 3)
    assert out[:5].mean() > 200 and out[-10:].mean() < 30  # the stripe is now at the top


def test_image_size_disagreeing_with_the_json_is_an_error(tmp_path):
    write_images(tmp_path, ["a.png"], size=(16, 21))
    with pytest.raises(DataError, match=r"a\.png: image id 1 is 16x21 .* the annotation file says 16x20"):
        CocoInstanceDataset(coco(tmp_path, [ann(1)]), tmp_path, skip_bad_images=True)[0]


def test_wrong_image_size_is_found_from_the_headers_when_the_dataset_is_built(tmp_path):
    write_images(tmp_path, ["a.png"])
    write_images(tmp_path, ["b.png"], size=(16, 21))
    pixels = np.zeros((16, 20, 3), np.uint8)  # stored 16x20, shown 20x16 (EXIF "rotate 90 CW")
    exif = Image.fromarray(pixels).getexif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(tmp_path / "r.jpg", exif=exif)
    images = [
        {"id": 1, "file_name": "a.png", "height": 16, "width": 20},
        {"id": 2, "file_name": "b.png", "height": 16, "width": 20},  # the file is 16x21
        {"id": 3, "file_name": "r.jpg", "height": 20, "width": 16},  # the rotated size: right
    ]
    path = coco(tmp_path, [ann(1), ann(2, image_id=2)], images)
    expected = r"ann\.json: 1 image\(s\) differ .*b\.png: image id 2 is 16x21 .* the annotation file says 16x20"
    with pytest.raises(DataError, match=expected):  # at construction, before any image is loaded
        CocoInstanceDataset(path, tmp_path, filter_empty=False, skip_bad_images=True)
    images[2].update(height=16, width=20)  # the stored size, but EXIF rotates the image
    with pytest.raises(DataError, match=r"2 image\(s\) differ .*r\.jpg: image id 3 is 20x16"):
        CocoInstanceDataset(coco(tmp_path, [ann(1)], images), tmp_path)
    # Turned off (e.g. slow network storage): found when the image is loaded, as before.
    dm = DataModule(task="instance", val={"img_dir": str(tmp_path), "ann_file": str(path), "check_image_sizes": False})
    with pytest.raises(DataError, match=r"b\.png: image id 2 is 16x21"):
        dm.val_dataset.load_raw(1)


# Annotations --------------------------------------------------------------------------------------------


def test_bad_annotations_are_dropped_counted_and_reported_once(tmp_path, caplog):
    write_images(tmp_path, ["a.png"])
    annotations = [
        ann(1),
        ann(2, category_id=99),  # category not in categories
        ann(3, segmentation=[[1, 1, 5, 5]]),  # fewer than 3 points
        ann(4, segmentation=[[1, 1, 5, 5, 9, 9]]),  # zero area (collinear)
        ann(5, bbox=[2, 2, -3, 10]),  # negative box width
        ann(6, segmentation=[[0, 0, 1, 1], SQUARE[0]]),  # one bad polygon of two: kept
        ann(7, image_id=5),  # unknown image
        ann(8, segmentation={"size": [3, 3], "counts": [9]}),  # RLE of another size
    ]
    with caplog.at_level(logging.WARNING):
        dataset = CocoInstanceDataset(coco(tmp_path, annotations), tmp_path)
    assert dict(dataset.index_issues.counts) == {
        "unknown category": 1,
        "degenerate polygon": 2,
        "negative box size": 1,
        "annotation of unknown image": 1,
        "RLE size mismatch": 1,
    }
    assert dataset.load_raw(0)["annotation_ids"] == [1, 6]
    warnings = [r.message for r in caplog.records if "dropped at start-up" in r.message]
    assert len(warnings) == 1 and "annotation id 2 (image id 1): category id 99 is not in 'categories'" in warnings[0]


def test_image_without_annotations_is_kept_for_evaluation_and_filtered_from_training(tmp_path):
    write_images(tmp_path, ["a.png", "b.png"])
    images = [
        {"id": 1, "file_name": "a.png", "height": 16, "width": 20},
        {"id": 2, "file_name": "b.png", "height": 16, "width": 20},
    ]
    path = coco(tmp_path, [ann(1)], images)
    evaluation = CocoInstanceDataset(path, tmp_path)
    assert evaluation.image_ids == [1, 2] and len(evaluation[1]["target"]["labels"]) == 0
    assert CocoInstanceDataset(path, tmp_path, filter_empty=True).image_ids == [1]


def test_malformed_json_is_an_error_with_line_and_column(tmp_path):
    (tmp_path / "bad.json").write_text('{"images": [\n  {"id": 1,,}]}')
    with pytest.raises(DataError, match=r"bad\.json: malformed JSON at line 2, column 12"):
        CocoInstanceDataset(tmp_path / "bad.json", tmp_path)
    (tmp_path / "partial.json").write_text('{"images": []}')
    with pytest.raises(
        DataError, match=r"partial\.json: missing or non-list top-level key\(s\) \['annotations', 'categories'\]"
    ):
        CocoInstanceDataset(tmp_path / "partial.json", tmp_path)
    with pytest.raises(DataError, match=r"nothere\.json: annotation file not found"):
        CocoInstanceDataset(tmp_path / "nothere.json", tmp_path)


def test_empty_dataset_after_filtering_is_an_error(tmp_path):
    path = coco(tmp_path, [ann(1, category_id=99)])
    with pytest.raises(
        DataError, match=r"ann\.json: the dataset is empty after filtering \(all 1 images have no usable"
    ):
        CocoInstanceDataset(path, tmp_path, filter_empty=True)


def test_box_only_annotations_say_that_masks_are_missing(tmp_path):
    write_images(tmp_path, ["a.png"])
    box_only = [{k: v for k, v in ann(i).items() if k != "segmentation"} for i in (1, 2)]
    box_only.append(ann(3, segmentation=[]))  # detection files also write an empty list
    path = coco(tmp_path, box_only)
    for filter_empty in (True, False):  # never the suggestion to train on empty targets
        with pytest.raises(DataError) as error:
            CocoInstanceDataset(path, tmp_path, filter_empty=filter_empty)
        message = str(error.value)
        assert "ann.json: 3 of 3 annotations have no 'segmentation'" in message
        assert "segmentation tasks need masks" in message and "filter_empty" not in message
    # Some box-only annotations among ones with masks: dropped and counted, the rest is used.
    dataset = CocoInstanceDataset(coco(tmp_path, [*box_only, ann(4)]), tmp_path, filter_empty=True)
    assert dict(dataset.index_issues.counts) == {"missing segmentation": 3}
    assert dataset.load_raw(0)["annotation_ids"] == [4]


# Panoptic PNGs ------------------------------------------------------------------------------------------


def test_panoptic_ids_missing_on_either_side_are_counted(tmp_path):
    write_images(tmp_path, ["a.png"])
    (tmp_path / "pan").mkdir()
    ids = np.zeros((16, 20), np.int64)
    ids[:8] = 300  # in the JSON
    ids[8:, :10] = 5  # not in the JSON -> void
    png = np.stack([ids % 256, ids // 256, ids * 0], -1).astype(np.uint8)
    Image.fromarray(png).save(tmp_path / "pan" / "a.png")
    segments = [
        {"id": 300, "category_id": 1, "iscrowd": 0},
        {"id": 77, "category_id": 1, "iscrowd": 0},
    ]  # 77 not in the PNG
    (tmp_path / "pan.json").write_text(
        json.dumps(
            {
                "images": [{"id": 1, "file_name": "a.png", "height": 16, "width": 20}],
                "annotations": [{"image_id": 1, "file_name": "a.png", "segments_info": segments}],
                "categories": [{"id": 1, "name": "thing", "isthing": 1}],
            }
        )
    )
    dataset = CocoPanopticDataset(tmp_path / "pan.json", tmp_path / "pan", tmp_path)
    sample = dataset[0]
    reasons = dict(sample["issues"])
    assert set(reasons) == {"PNG id not in JSON", "JSON segment not in PNG"}
    assert "segment id(s) [5]" in reasons["PNG id not in JSON"] and "[77]" in reasons["JSON segment not in PNG"]
    assert sample["target"]["labels"].tolist() == [0] and sample["target"]["masks"][0].sum() == 8 * 20
    assert (PanopticGroundTruth(tmp_path / "pan.json", tmp_path / "pan").semantic(1)[8:] == 255).all()


def test_wrong_panoptic_png_size_or_mode_is_an_error(tmp_path):
    write_images(tmp_path, ["a.png"])
    (tmp_path / "pan").mkdir()
    Image.fromarray(np.zeros((5, 5, 3), np.uint8)).save(tmp_path / "pan" / "a.png")
    Image.fromarray(np.zeros((16, 20), np.uint8)).save(tmp_path / "pan" / "b.png")
    for png, message in (
        ("a.png", r"a\.png: panoptic PNG of image id 1 is 5x5 but the image is 16x20"),
        ("b.png", r"b\.png: panoptic PNG of image id 1 is mode L; it must be RGB-encoded ids"),
    ):
        (tmp_path / "pan.json").write_text(
            json.dumps(
                {
                    "images": [{"id": 1, "file_name": "a.png", "height": 16, "width": 20}],
                    "annotations": [{"image_id": 1, "file_name": png, "segments_info": []}],
                    "categories": [{"id": 1, "name": "thing", "isthing": 1}],
                }
            )
        )
        with pytest.raises(DataError, match=message):
            CocoPanopticDataset(tmp_path / "pan.json", tmp_path / "pan", tmp_path)[0]


# Configuration ------------------------------------------------------------------------------------------


def test_config_mistakes_name_the_key(tmp_path):
    with pytest.raises(DataError, match=r"task=panoptic needs data\.train\.panoptic_json, data\.train\.panoptic_root"):
        _ = DataModule(task="panoptic", root=str(tmp_path), train={"img_dir": "x", "ann_file": "a.json"}).metadata
    with pytest.raises(DataError, match=r"data\.train has unknown key\(s\) \['image_dir'\]"):
        _ = DataModule(task="instance", train={"image_dir": "x"}).metadata
    with pytest.raises(DataError, match=r"data\.task='depth' is not one of"):
        _ = DataModule(task="depth", train={"img_dir": "x"}).metadata


def test_unusable_synthetic_cache_root_names_the_folder_and_the_fix(tmp_path, monkeypatch):
    (tmp_path / "a_file").write_text("in the way")
    settings = {"num_train": 1, "num_val": 1, "min_size": 32, "max_size": 32}
    for root in (tmp_path / "a_file", tmp_path / "a_file" / "below"):
        dm = DataModule(root=str(root), synthetic=settings, train={"img_dir": "train2017"})
        expected = rf"cache folder {re.escape(str(root))} \((FileExistsError|NotADirectoryError).*data\.root="
        with pytest.raises(DataError, match=expected):
            _ = dm.metadata

    def unwritable(*args, **kwargs):  # what a read-only folder gives (the tests may run as root, who can write)
        raise PermissionError(13, "Permission denied", kwargs.get("dir"))

    monkeypatch.setattr(tempfile, "mkdtemp", unwritable)
    with pytest.raises(DataError) as error:
        _ = DataModule(root=str(tmp_path / "ro"), synthetic=settings, train={"img_dir": "train2017"}).metadata
    message = str(error.value)
    assert f"cache folder {tmp_path / 'ro'} (PermissionError" in message and "DENSEPRED_CACHE" in message
    assert "data.root=" in message and "writable folder" in message


def test_label_folder_image_without_label_is_left_out_and_counted(tmp_path):
    from densepred.data import SemanticFolderDataset

    (tmp_path / "img").mkdir(), (tmp_path / "ann").mkdir()
    write_images(tmp_path / "img", ["a.jpg", "b.jpg"])
    Image.fromarray(np.zeros((16, 20), np.uint8)).save(tmp_path / "ann" / "b.png")
    dataset = SemanticFolderDataset(tmp_path / "img", tmp_path / "ann", ["x"])
    assert len(dataset) == 1 and dataset.load_raw(0)["file_name"] == "b.jpg"
    assert dict(dataset.index_issues.counts) == {"image without label file": 1}
    (tmp_path / "ann" / "b.png").unlink()
    with pytest.raises(DataError, match=r"img: no image has a label PNG of the same name in .*ann"):
        SemanticFolderDataset(tmp_path / "img", tmp_path / "ann", ["x"])
