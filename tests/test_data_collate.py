"""Collation: padding to a multiple of 32, the padding mask, normalisation, targets padded per image."""

import torch

from densepred.data import Collate
from densepred.data.collate import IMAGENET_MEAN, IMAGENET_STD


def sample(h, w, n, image_id, semantic=False):
    image = torch.full((3, h, w), 200, dtype=torch.uint8)
    masks = torch.zeros(n, h, w, dtype=torch.bool)
    masks[:, : h // 2, : w // 2] = True
    target = {"labels": torch.arange(n), "masks": masks, "boxes": torch.tensor([[0.0, 0, w // 2, h // 2]] * n)}
    if semantic:
        target["sem_seg"] = torch.ones(h, w, dtype=torch.long)
    return {"image": image, "target": target, "image_id": image_id, "orig_size": (2 * h, 2 * w), "issues": [("x", f"id {image_id}")]}


def test_pads_to_multiple_of_32_with_mask_and_padded_targets():
    batch = Collate()([sample(50, 70, 2, 1, semantic=True), sample(33, 100, 0, 2, semantic=True)])
    assert batch["images"].shape == (2, 3, 64, 128) and batch["images"].dtype == torch.float32
    assert batch["padding_mask"].shape == (2, 64, 128) and batch["padding_mask"].dtype == torch.bool
    assert not batch["padding_mask"][0, :50, :70].any() and batch["padding_mask"][0, 50:].all() and batch["padding_mask"][0, :, 70:].all()
    assert batch["padding_mask"].sum().item() == 2 * 64 * 128 - 50 * 70 - 33 * 100
    expected = (200 / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(batch["images"][0, :, 10, 10], expected)
    assert (batch["images"][0, :, 50:] == 0).all()  # padding is the mean color
    first, second = batch["targets"]
    assert first["masks"].shape == (2, 64, 128) and first["masks"][:, :25, :35].all() and first["masks"].sum() == 2 * 25 * 35
    assert second["masks"].shape == (0, 64, 128) and second["labels"].shape == (0,)
    assert (first["sem_seg"][:50, :70] == 1).all() and (first["sem_seg"][50:] == 255).all() and (first["sem_seg"][:, 70:] == 255).all()
    assert batch["image_ids"] == [1, 2] and batch["image_sizes"] == [(50, 70), (33, 100)] and batch["orig_sizes"] == [(100, 140), (66, 200)]
    assert batch["data_issues"] == [("x", "id 1"), ("x", "id 2")]


def test_fixed_size_for_lsj():
    batch = Collate(fixed_size=(128, 128))([sample(100, 40, 1, 1)])
    assert batch["images"].shape == (1, 3, 128, 128) and batch["targets"][0]["masks"].shape == (1, 128, 128)
    assert batch["padding_mask"][0, :100, :40].logical_not().all() and batch["padding_mask"].sum() == 128 * 128 - 4000
