"""Convert a checkpoint once into our format: `python -m densepred.convert SRC DST`.

SRC is a transformers MaskFormer / Mask2Former / EoMT checkpoint (Hub repo id or folder; config.json model_type
`maskformer` / `mask2former` / `eomt`), which becomes a whole-model export folder (`densepred.convert.model`), or
anything `AutoBackbone.from_pretrained` reads (transformers / timm Hub repo or folder, a weights file
with --architecture, ...), which becomes a backbone folder. DST receives `config.json` +
`model.safetensors`: `evaluate.py checkpoint=DST` / `train.py init_from=DST` read a model,
`AutoBackbone.from_pretrained(DST)` a backbone (no layout conversion, no network).

    python -m densepred.convert facebook/mask2former-swin-tiny-coco-panoptic converted/m2f-swin-t
    python -m densepred.convert my-org/mask2former-my-data converted/mine --categories panoptic_train.json
    python -m densepred.convert tue-mps/coco_panoptic_eomt_large_640 converted/eomt-l
    python -m densepred.convert PekingU/rtdetr_r50vd converted/rtdetr-r50vd  # RTDetrForObjectDetection (rt_detr)
    python -m densepred.convert SenseTime/deformable-detr converted/ddetr  # DeformableDetrForObjectDetection
    python -m densepred.convert microsoft/swin-tiny-patch4-window7-224 weights/swin_tiny [--out-indices 1 2 3 4]
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from densepred.backbones import AutoBackbone
from densepred.backbones.checkpoint import is_hub_id, resolve_checkpoint
from densepred.convert.model import CONVERTERS, convert_model, read_categories_file, save_model


def _model_type(src: str, revision: str | None) -> str | None:
    """config.json's model_type when SRC is a folder or Hub repo that has one, else None."""
    if not (Path(src).expanduser().is_dir() or is_hub_id(src)):
        return None  # a weights file or a timm model name: a backbone
    return (resolve_checkpoint(src, revision).config or {}).get("model_type")


def _convert(args: argparse.Namespace) -> str:
    """Convert and save; returns what to print."""
    model_type = None if args.architecture else _model_type(args.src, args.revision)
    if model_type in CONVERTERS:
        if args.out_indices is not None:
            raise ValueError(f"{args.src} is a whole {model_type} model: --out-indices selects stages of a backbone")
        categories = read_categories_file(args.categories) if args.categories else None
        config, state_dict = convert_model(args.src, args.revision, model_type, categories)
        folder = save_model(config, state_dict, args.dst)
        things = sum(bool(c["isthing"]) for c in config["metadata"]["categories"])
        classes = f"{config['metadata']['num_classes']} classes: {things} things"
        return f"converted {args.src} ({model_type}, {classes}) -> {folder}"
    if args.categories:
        raise ValueError(f"{args.src} is a backbone: --categories sets the classes of a whole MaskFormer model")
    extra = {"architecture": args.architecture} if args.architecture else {}
    backbone = AutoBackbone.from_pretrained(args.src, out_indices=args.out_indices, revision=args.revision, **extra)
    folder = backbone.save_pretrained(args.dst)
    return f"saved {type(backbone).__name__} (stages {backbone.out_features}) to {folder}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m densepred.convert", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("src", help="Hub repo id, folder or weights file")
    parser.add_argument("dst", help="output folder (config.json + model.safetensors)")
    parser.add_argument("--revision", default=None, help="Hub revision of SRC (branch, tag or commit)")
    parser.add_argument("--architecture", default=None, help="backbone of a bare weights file (no config.json)")
    parser.add_argument(
        "--out-indices", type=int, nargs="+", default=None, help="backbone stages to select (default: SRC's)"
    )
    parser.add_argument(
        "--categories",
        default=None,
        help="a COCO panoptic JSON (or a JSON list of its categories: id, name, isthing, color) of the model's "
        "training data: which classes are things and which stuff (default: COCO panoptic's for its 133 labels)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        message = _convert(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(message)
    return 0
