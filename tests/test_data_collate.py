"""Collation: padding to a multiple of 32, targets padded per image; the model's normalisation of the raw
images, with the padding mask its image sizes give."""

import torch
from timm.data import IMAGENET_DEFAULT_MEAN as IMAGENET_MEAN
from timm.data import IMAGENET_DEFAULT_STD as IMAGENET_STD

from densepred.data import Collate
from densepred.segmenter import normalize_images, padding_mask

MEAN, STD = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)


def sample(h, w, n, image_id, semantic=False):
    image = torch.full((3, h, w), 200, dtype=torch.uint8)
    masks = torch.zeros(n, h, w, dtype=torch.bool)
    masks[:, : h // 2, : w // 2] = True
    target = {"labels": torch.arange(n), "masks": masks, "boxes": torch.tensor([[0.0, 0, w // 2, h // 2]] * n)}
    if semantic:
        target["sem_seg"] = torch.ones(h, w, dtype=torch.long)
    issues = [("x", f"id {image_id}")]
    return {"image": image, "target": target, "image_id": image_id, "orig_size": (2 * h, 2 * w), "issues": issues}


def test_pads_to_multiple_of_32_with_mask_and_padded_targets():
    batch = Collate()([sample(50, 70, 2, 1, semantic=True), sample(33, 100, 0, 2, semantic=True)])
    assert batch["images"].shape == (2, 3, 64, 128) and batch["images"].dtype == torch.uint8  # raw pixels
    assert (batch["images"][0, :, :50, :70] == 200).all() and (batch["images"][0, :, 50:] == 0).all()
    assert "padding_mask" not in batch  # the model derives it from image_sizes
    mask = padding_mask(batch["image_sizes"], batch["images"].shape[-2:])
    assert mask.shape == (2, 64, 128) and mask.dtype == torch.bool
    assert not mask[0, :50, :70].any() and mask[0, 50:].all() and mask[0, :, 70:].all()
    assert mask.sum().item() == 2 * 64 * 128 - 50 * 70 - 33 * 100
    # The model's normalisation (Segmenter.preprocess) with ImageNet statistics, 0-1 units.
    pixels = normalize_images(batch["images"], batch["image_sizes"], MEAN, STD)
    assert pixels.dtype == torch.float32
    expected = (200 / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(pixels[0, :, 10, 10], expected)
    assert (pixels[0, :, 50:] == 0).all() and (pixels[0, :, :, 70:] == 0).all()  # padding is the mean color
    assert (pixels[1, :, 33:] == 0).all() and (pixels[1, :, :, 100:] == 0).all()
    first, second = batch["targets"]
    assert first["masks"].shape == (2, 64, 128) and first["masks"][:, :25, :35].all()
    assert first["masks"].sum() == 2 * 25 * 35
    assert second["masks"].shape == (0, 64, 128) and second["labels"].shape == (0,)
    assert (first["sem_seg"][:50, :70] == 1).all()
    assert (first["sem_seg"][50:] == 255).all() and (first["sem_seg"][:, 70:] == 255).all()
    assert batch["image_ids"] == [1, 2] and batch["image_sizes"] == [(50, 70), (33, 100)]
    assert batch["orig_sizes"] == [(100, 140), (66, 200)]
    assert batch["data_issues"] == [("x", "id 1"), ("x", "id 2")]


def test_fixed_size_for_lsj():
    batch = Collate(fixed_size=(128, 128))([sample(100, 40, 1, 1)])
    assert batch["images"].shape == (1, 3, 128, 128) and batch["targets"][0]["masks"].shape == (1, 128, 128)
    mask = padding_mask(batch["image_sizes"], batch["images"].shape[-2:])
    assert mask[0, :100, :40].logical_not().all() and mask.sum() == 128 * 128 - 4000


def test_normalisation_matches_float_collation_exactly():
    """uint8 batches normalised by the model give bit for bit what normalising float images in collate gave."""
    generator = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, 40, 50), dtype=torch.uint8, generator=generator)
    batch = Collate()([{**sample(40, 50, 1, 1), "image": image}])
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1) * 255, torch.tensor(IMAGENET_STD).view(3, 1, 1) * 255
    before = torch.zeros(1, 3, 64, 64)
    before[0, :, :40, :50] = (image.float() - mean) / std  # the former Collate
    pixels = normalize_images(batch["images"], batch["image_sizes"], MEAN, STD)
    assert torch.equal(pixels, before)


class _Neck(torch.nn.Module):
    def __init__(self, in_channels, in_strides):
        super().__init__()
        self.out_channels, self.mask_dim = in_channels, 8


class _Head(torch.nn.Module):
    def __init__(self, in_channels, mask_dim, num_classes):
        super().__init__()


def test_segmenter_owns_the_normalisation():
    from densepred.backbones import AutoBackbone, TimmBackbone
    from densepred.segmenter import Segmenter

    native = AutoBackbone.from_config("resnet18", out_features=["stage4"])
    model = Segmenter(native, _Neck, _Head, num_classes=2)
    assert model.normalization == {"pixel_mean": list(IMAGENET_MEAN), "pixel_std": list(IMAGENET_STD)}
    assert torch.equal(model.pixel_mean, MEAN) and not any("pixel" in k for k in model.state_dict())
    images = torch.full((1, 3, 64, 64), 200, dtype=torch.uint8)
    expected = normalize_images(images, [(40, 64)], MEAN, STD)
    assert torch.equal(model.preprocess(images, [(40, 64)]), expected) and (expected[:, :, 40:] == 0).all()

    overridden = Segmenter(native, _Neck, _Head, num_classes=2, pixel_mean=[0.5] * 3, pixel_std=[0.25] * 3)
    assert overridden.normalization == {"pixel_mean": [0.5] * 3, "pixel_std": [0.25] * 3}
    torch.testing.assert_close(overridden.preprocess(images)[0, :, 0, 0], torch.full((3,), (200 / 255 - 0.5) / 0.25))

    # A timm backbone reports its pretrained_cfg's statistics.
    overlay = {"mean": (0.5,) * 3, "std": (0.2,) * 3}
    timm_backbone = TimmBackbone("resnet18", out_indices=[4], pretrained_cfg_overlay=overlay)
    assert (timm_backbone.pixel_mean, timm_backbone.pixel_std) == ((0.5,) * 3, (0.2,) * 3)
    assert TimmBackbone("resnet18", out_indices=[4]).pixel_mean == tuple(IMAGENET_MEAN)
