"""Training entry point: `python train.py [group=choice ...]`.

Training itself (data, heads, losses, the Lightning loop) is not built yet. Until it is, this script
composes the configuration, builds the selected backbone, reports its feature pyramid, and exits
with status 1 so that no caller mistakes it for a training run.
"""

from __future__ import annotations

import sys

import hydra
import torch
from omegaconf import DictConfig

from backbones import Backbone


def describe(backbone: Backbone, image_size: tuple[int, int]) -> str:
    """One line per selected stage: name, channels, stride and feature-map shape for `image_size`."""
    backbone.eval()
    with torch.no_grad():
        maps = backbone(torch.zeros(1, backbone.in_channels, *image_size)).feature_maps
    rows = [f"{type(backbone).__name__}: stages {backbone.stage_names}"]
    for name, channels, stride, fmap in zip(backbone.out_features, backbone.channels, backbone.strides, maps):
        rows.append(f"  {name:<10} channels={channels:<5} stride={stride:<3} map={tuple(fmap.shape)}")
    return "\n".join(rows)


@hydra.main(config_path="configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    backbone = hydra.utils.instantiate(cfg.backbone)
    print(describe(backbone, tuple(cfg.image_size)))
    sys.exit("train.py: training is not implemented yet (data, necks, heads and the training loop come next); "
             "the backbone above was built from the config and nothing was trained.")


if __name__ == "__main__":
    main()
