"""Print a backbone's stages: `python -m densepred.backbones.inspect NAME_OR_PATH [--size H [W]]`.

NAME_OR_PATH is a native name (`resnet50`, random weights), a timm model name (random weights), or any
source `AutoBackbone.from_pretrained` reads (Hub repo id, folder, or weights file with --architecture).
Every stage is computed for a zero image of the given size; `*` marks the stages the checkpoint selects.
"""

from __future__ import annotations

import argparse
import sys

import timm
import torch

from ._registry import family_class, list_backbones
from .auto import AutoBackbone
from .base import Backbone


def build(name_or_path: str, revision: str | None = None, architecture: str | None = None) -> Backbone:
    """Native or timm names give random weights (nothing is downloaded); anything else is loaded."""
    if name_or_path in list_backbones():
        return AutoBackbone.from_config(name_or_path)
    if timm.is_model(name_or_path):
        return family_class("timm")(name_or_path)
    extra = {"architecture": architecture} if architecture else {}
    return AutoBackbone.from_pretrained(name_or_path, revision=revision, **extra)


def describe(backbone: Backbone, size: tuple[int, int]) -> str:
    """One row per stage: name, channels, stride and the feature-map shape for a (1, C, *size) input."""
    selected = backbone.out_features
    backbone.out_indices = list(range(len(backbone.stage_names)))
    backbone.eval()
    with torch.no_grad():
        maps = backbone(torch.zeros(1, backbone.in_channels, *size)).feature_maps
    backbone.out_features = selected
    rows = [f"{type(backbone).__name__}  input (1, {backbone.in_channels}, {size[0]}, {size[1]})  (* = selected)"]
    rows.append(f"  {'stage':<12} {'channels':>8} {'stride':>6}  feature map")
    for name, fmap in zip(backbone.stage_names, maps, strict=True):
        mark = "*" if name in selected else " "
        channels, stride = backbone.out_feature_channels[name], backbone.out_feature_strides[name]
        rows.append(f"{mark} {name:<12} {channels:>8} {stride:>6}  {tuple(fmap.shape)}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m densepred.backbones.inspect", description=__doc__.splitlines()[0])
    parser.add_argument("name_or_path")
    parser.add_argument("--size", type=int, nargs="+", default=[224], metavar="H [W]", help="input size (default 224)")
    parser.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    parser.add_argument("--architecture", default=None, help="model of a bare weights file (no config.json)")
    args = parser.parse_args(argv)
    if len(args.size) > 2:
        parser.error("--size takes H or H W")
    size = (args.size[0], args.size[-1])
    try:
        backbone = build(args.name_or_path, args.revision, args.architecture)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(describe(backbone, size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
