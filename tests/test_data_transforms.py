"""Transforms keep image and masks aligned: a known red square is followed through every recipe."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from densepred.data import CocoInstanceDataset, DataError, build_transform
from densepred.data.transforms import LargeScaleJitter

H, W = 120, 160
SQUARE = (20, 50, 30, 70)  # y1, y2, x1, x2 (exclusive) of the red square, a thing; a blue bar at the right edge


def write_dataset(tmp_path):
    image = np.full((H, W, 3), 128, np.uint8)
    y1, y2, x1, x2 = SQUARE
    image[y1:y2, x1:x2] = (230, 20, 20)
    image[:, 150:] = (20, 20, 230)
    Image.fromarray(image).save(tmp_path / "img.png")
    square = [x1, y1, x2, y1, x2, y2, x1, y2]
    bar = [150, 0, 160, 0, 160, H, 150, H]
    data = {
        "images": [{"id": 1, "file_name": "img.png", "height": H, "width": W}],
        "annotations": [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 1,
                "segmentation": [square],
                "bbox": [x1, y1, x2 - x1, y2 - y1],
                "iscrowd": 0,
            },
            {"id": 2, "image_id": 1, "category_id": 2, "segmentation": [bar], "bbox": [150, 0, 10, H], "iscrowd": 0},
        ],
        "categories": [{"id": 1, "name": "red"}, {"id": 2, "name": "blue"}],
    }
    (tmp_path / "ann.json").write_text(json.dumps(data))
    return tmp_path / "ann.json"


def assert_aligned(sample, photometric=False):
    """Every target mask covers pixels of its own color in the image.

    With photometric jitter (colors change, channels may be permuted) the mask's interior must be one
    uniform color instead.
    """
    image = sample["image"].float()
    target = sample["target"]
    assert len(target["labels"]) == len(target["masks"])
    for label, mask in zip(target["labels"], target["masks"], strict=True):
        assert mask.any()
        channel = 0 if label == 0 else 2
        interior = ~torch.nn.functional.max_pool2d((~mask).float()[None], 3, 1, 1)[0].bool()
        if photometric:
            pixels = image[:, interior]
            assert (pixels.amax(1) - pixels.amin(1)).max() <= 8, "mask interior is not one object"
            continue
        assert (image[channel][interior] > 150).all(), "mask not on its object"
        ys, xs = torch.nonzero(mask, as_tuple=True)
        touches_border = (
            ys.min() == 0 or xs.min() == 0 or ys.max() == mask.shape[0] - 1 or xs.max() == mask.shape[1] - 1
        )
        if label == 0 and not touches_border:
            # The whole square: its color appears nowhere outside the mask beyond the resize's blur rim.
            scale = (xs.max() + 1 - xs.min()) / (SQUARE[3] - SQUARE[2])
            rim = int(torch.ceil(scale)) + 1
            near = torch.nn.functional.max_pool2d(mask.float()[None], 2 * rim + 1, 1, rim)[0].bool()
            red = (image[0] > 150) & (image[1] < 100)
            assert not (red & ~near).any(), "square pixels outside the mask"


@pytest.mark.parametrize(
    "recipe, repeats",
    [
        ({"recipe": "lsj", "size": 96, "scale": [0.5, 2.0]}, 12),
        ({"recipe": "lsj", "size": 1024, "scale": [0.1, 2.0]}, 2),
        ({"recipe": "ade", "crop": 64, "max_size": 400}, 12),
        ({"recipe": "resize", "short": 200, "max_size": 250}, 1),
    ],
)
def test_masks_follow_the_image(tmp_path, recipe, repeats):
    dataset = CocoInstanceDataset(write_dataset(tmp_path), tmp_path, build_transform(**recipe))
    torch.manual_seed(0)
    for _ in range(repeats):
        assert_aligned(dataset[0], photometric=recipe["recipe"] == "ade")


def test_flip_moves_the_square_to_the_other_side(tmp_path):
    dataset = CocoInstanceDataset(write_dataset(tmp_path), tmp_path, build_transform("lsj", size=160, scale=[1.0, 1.0]))
    torch.manual_seed(0)
    lefts = set()
    for _ in range(16):
        sample = dataset[0]
        assert tuple(sample["image"].shape[1:]) == (H, W)  # scale 1 of a 160 target: no resize, no crop
        ys, xs = torch.nonzero(sample["target"]["masks"][sample["target"]["labels"] == 0][0], as_tuple=True)
        box = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]  # the square, x2 / y2 exclusive
        y1, y2, x1, x2 = SQUARE
        assert box in ([x1, y1, x2, y2], [W - x2, y1, W - x1, y2])
        lefts.add(box[0])
    assert lefts == {30, W - 70}  # both flipped and not flipped happened


def test_lsj_scale_and_crop_sizes():
    image = tv_tensors.Image(torch.zeros(3, 480, 640, dtype=torch.uint8))
    mask = tv_tensors.Mask(torch.zeros(480, 640, dtype=torch.uint8))
    mask[100:200, 100:300] = 1
    for scale in (0.5, 1.0, 2.0):
        out = LargeScaleJitter(1024, (scale, scale))({"image": image, "m": mask})
        expected = (min(1024, int(480 * 1.6 * scale)), min(1024, int(640 * 1.6 * scale)))
        assert tuple(out["image"].shape[1:]) == tuple(out["m"].shape) == expected
        if scale <= 1.0:  # whole image kept: the object scales exactly
            assert abs(int(out["m"].sum()) - 100 * 200 * (1.6 * scale) ** 2) < 0.02 * 100 * 200 * (1.6 * scale) ** 2


def test_segments_emptied_by_a_crop_are_dropped(tmp_path):
    dataset = CocoInstanceDataset(write_dataset(tmp_path), tmp_path, build_transform("lsj", size=48, scale=[2.0, 2.0]))
    torch.manual_seed(0)
    counts = set()
    for _ in range(30):
        sample = dataset[0]
        assert_aligned(sample)
        counts.add(len(sample["target"]["labels"]))
    assert 0 in counts and max(counts) >= 1


def test_eval_resize_short_800_long_at_most_1333():
    resize = build_transform("resize")
    for (h, w), expected in {(480, 640): (800, 1066), (400, 1200): (444, 1333), (800, 600): (1066, 800)}.items():
        out = resize({"image": tv_tensors.Image(torch.zeros(3, h, w, dtype=torch.uint8))})
        assert tuple(out["image"].shape[1:]) == expected


def test_unknown_recipe_or_setting_is_a_clear_error():
    with pytest.raises(DataError, match="recipe 'lsjj' is unknown"):
        build_transform("lsjj")
    with pytest.raises(DataError, match="bad settings"):
        build_transform("lsj", crop=3)
