"""Convert a checkpoint once into a native folder: `python -m backbones.convert SRC DST`.

SRC is anything `AutoBackbone.from_pretrained` reads (transformers / timm Hub repo or folder, a weights
file with --architecture, ...). DST receives `config.json` + `model.safetensors`, which load directly
with `AutoBackbone.from_pretrained(DST)` (no layout conversion, no network).
"""

from __future__ import annotations

import argparse
import logging
import sys

from .auto import AutoBackbone


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m backbones.convert", description=__doc__.splitlines()[0])
    parser.add_argument("src", help="Hub repo id, folder or weights file")
    parser.add_argument("dst", help="output folder")
    parser.add_argument("--revision", default=None, help="Hub revision of SRC (branch, tag or commit)")
    parser.add_argument("--architecture", default=None, help="model of a bare weights file (no config.json)")
    parser.add_argument("--out-indices", type=int, nargs="+", default=None, help="stages to select (default: SRC's)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    extra = {"architecture": args.architecture} if args.architecture else {}
    try:
        backbone = AutoBackbone.from_pretrained(args.src, out_indices=args.out_indices, revision=args.revision, **extra)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    folder = backbone.save_pretrained(args.dst)
    print(f"saved {type(backbone).__name__} (stages {backbone.out_features}) to {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
