"""Segmenter: backbone -> neck -> head, each part built from the description of the part before it.

The Segmenter owns the input normalisation (Detectron2 style): `pixel_mean` / `pixel_std` buffers (RGB,
0-1 units) taken from the backbone's pretrained statistics unless given; `preprocess` turns the batch's
raw images (uint8, or float 0-255) into the normalised `pixel_values` that `forward` takes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from densepred.backbones.base import Backbone
from densepred.utils.recomputed_outputs import RecomputedNormOutputs


def normalize_images(
    images: torch.Tensor, image_sizes: Sequence[tuple[int, int]] | None, mean: torch.Tensor, std: torch.Tensor
) -> torch.Tensor:
    """(B, C, Hp, Wp) raw pixel values (uint8, or float in 0-255) -> float32 `(x - 255 mean) / (255 std)`,
    with the padding (everything right of / below each image's `image_sizes` entry) set to 0, the mean
    color. `mean` / `std`: (C,) in 0-1 units. No `image_sizes`: the whole tensor is image."""
    mean = mean.float().view(-1, 1, 1) * 255
    std = std.float().view(-1, 1, 1) * 255
    pixel_values = (images.float() - mean) / std
    if image_sizes is not None:
        padding = padding_mask(image_sizes, pixel_values.shape[-2:], pixel_values.device)
        pixel_values = pixel_values.masked_fill(padding[:, None], 0.0)
    return pixel_values


def padding_mask(image_sizes: Sequence[tuple[int, int]], size: Sequence[int], device: Any = None) -> torch.Tensor:
    """(B, Hp, Wp) bool, True on the padding of a batch padded bottom/right to `size` (Hp, Wp)."""
    sizes = torch.as_tensor([tuple(s) for s in image_sizes], dtype=torch.long, device=device).view(-1, 2)
    rows = torch.arange(int(size[0]), device=device)
    cols = torch.arange(int(size[1]), device=device)
    inside = (rows[None, :, None] < sizes[:, 0, None, None]) & (cols[None, None, :] < sizes[:, 1, None, None])
    return ~inside


class Segmenter(nn.Module):
    """A MaskFormer-style model.

    `neck` and `head` are factories (Hydra `_partial_` objects or classes): the neck is called with the
    backbone's `channels` and `strides`, the head with the neck's `out_channels`, `mask_dim` and the
    number of classes, so no channel count is written by hand in a config.

    `channels_last` (None: the backbone's `convolutional`) keeps the backbone's weights and its input in NHWC
    memory format, faster for convolutions (6% of a ResNet-50 Mask2Former training step on CPU).

    `pixel_mean` / `pixel_std` (RGB, 0-1 units) override the backbone's pretrained statistics
    (`backbone.pixel_mean` / `pixel_std`). They are non-persistent buffers: state dicts hold no copy, and
    an export records them in its config.json instead (`normalization`).

    `recompute_norm_outputs` (training only): the outputs of the norm layers (and of a ReLU right after one) are
    recomputed in backward from the input the norm keeps instead of saved
    (`utils.recomputed_outputs`): bitwise the same gradients, 12% less saved for backward in a ResNet-50
    Mask2Former step.
    """

    def __init__(
        self,
        backbone: Backbone,
        neck: Callable[..., nn.Module],
        head: Callable[..., nn.Module],
        num_classes: int,
        pixel_mean: Sequence[float] | None = None,
        pixel_std: Sequence[float] | None = None,
        channels_last: bool | None = None,
        recompute_norm_outputs: bool = True,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.backbone = backbone
        self.neck = neck(in_channels=list(backbone.channels), in_strides=list(backbone.strides))
        self.head = head(in_channels=self.neck.out_channels, mask_dim=self.neck.mask_dim, num_classes=num_classes)
        mean = [float(v) for v in (pixel_mean if pixel_mean is not None else backbone.pixel_mean)]
        std = [float(v) for v in (pixel_std if pixel_std is not None else backbone.pixel_std)]
        if len(mean) != len(std) or not mean or min(std) <= 0:
            raise ValueError(f"pixel_mean={mean} and pixel_std={std}: one value per channel, std > 0 (0-1 units)")
        self._normalization = {"pixel_mean": mean, "pixel_std": std}  # as given, for exports
        self.register_buffer("pixel_mean", torch.tensor(mean, dtype=torch.float32), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std, dtype=torch.float32), persistent=False)
        # NHWC backbone weights and inputs (same values): None means on for convolutional backbones
        self.channels_last = bool(backbone.convolutional if channels_last is None else channels_last)
        if self.channels_last:
            self.backbone.to(memory_format=torch.channels_last)
        self.recompute_norm_outputs = recompute_norm_outputs

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Segmenter:
        """Build from a dict with `backbone`, `neck`, `head` (Hydra `_target_` dicts), `num_classes` and
        optionally `pixel_mean` / `pixel_std` (0-1 units)."""
        from hydra.utils import instantiate

        backbone = instantiate(dict(config["backbone"]))
        neck = instantiate(dict(config["neck"]), _partial_=True)
        head = instantiate(dict(config["head"]), _partial_=True)
        return cls(
            backbone,
            neck,
            head,
            num_classes=int(config["num_classes"]),
            pixel_mean=config.get("pixel_mean"),
            pixel_std=config.get("pixel_std"),
            channels_last=config.get("channels_last"),
            recompute_norm_outputs=config.get("recompute_norm_outputs", True),
        )

    @property
    def normalization(self) -> dict[str, list[float]]:
        """{"pixel_mean": [...], "pixel_std": [...]}, RGB in 0-1 units (what an export's config.json records)."""
        return {key: list(values) for key, values in self._normalization.items()}

    def preprocess(self, images: torch.Tensor, image_sizes: Sequence[tuple[int, int]] | None = None) -> torch.Tensor:
        """The batch's raw images (B, 3, Hp, Wp), uint8 or float 0-255, padded bottom/right -> normalised
        float32 pixel values, 0 on the padding (outside each image's `image_sizes`)."""
        return normalize_images(images, image_sizes, self.pixel_mean, self.pixel_std)

    def forward(self, images: torch.Tensor, targets: Sequence[Mapping[str, Any]] | None = None) -> dict[str, Any]:
        """images (B, 3, H, W), normalised (`preprocess`) -> head output (`pred_logits`, `pred_masks` or
        `pred_boxes`, `aux_outputs`). `targets` (training, detection: the normalised targets) go to the head when
        given, for heads that build queries from them (denoising)."""
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        # (not built while torch.compile traces; the context itself does nothing without autograd)
        if self.recompute_norm_outputs and self.training and not torch.compiler.is_compiling():
            with RecomputedNormOutputs(self.modules()):
                return self._forward(images, targets)
        return self._forward(images, targets)

    def _forward(self, images: torch.Tensor, targets: Sequence[Mapping[str, Any]] | None) -> dict[str, Any]:
        # A head that continues the backbone (`backbone_blocks` > 0, e.g. EoMT) runs the backbone's last blocks
        # itself: it gets the tokens before them and the blocks (`Backbone.continuation`) instead of maps.
        blocks = getattr(self.head, "backbone_blocks", 0)
        features = self.backbone.continuation(images, blocks) if blocks else list(self.backbone(images).feature_maps)
        neck_output = self.neck(features)
        return self.head(neck_output) if targets is None else self.head(neck_output, targets)
