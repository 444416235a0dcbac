"""Eager PyTorch vs the exported ONNX model run by onnxruntime, side by side, per image on the CPU.

    python bench/export_speed.py --size 512 512 --steps 5 --warmup 1

The model is the default of configs/train.yaml (its backbone, neck and head groups: ResNet-18, the deformable
pixel decoder, the Mask2Former head; random weights, `--num-classes` classes), wrapped as the deployed graph
(`densepred.deploy.model.ExportableSegmenter`: uint8 images in, normalisation and padding inside, class and
mask logits out) and exported as `python export.py format=onnx` does (torch.export with dynamic batch, height
and width, the "gather" deformable-attention core, the optimised ONNX translation). Eager runs the project's
own path (the "auto" core: embedding_bag on CPU). Before timing, the two outputs are compared (max abs
difference printed). Timed alternately (the order flips every step, so machine noise hits both alike): median
of `--steps` steps after `--warmup`, batch 1, both with the same number of threads.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import onnx
import onnxruntime
import torch
from backbone_speed import cpu_name  # bench/ is the script's folder
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from densepred.deploy.export import sample_images, to_onnx, trace
from densepred.deploy.model import ExportableSegmenter
from densepred.segmenter import Segmenter

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def default_model(num_classes: int) -> Segmenter:
    """configs/train.yaml's default backbone, neck and head, randomly initialised."""
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["backbone.pretrained=null", "paths.output_dir=."])
    parts = {key: OmegaConf.to_container(cfg[key], resolve=True) for key in ("backbone", "neck", "head")}
    torch.manual_seed(0)
    return Segmenter.from_config({**parts, "num_classes": num_classes}).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, nargs=2, default=[512, 512], metavar=("H", "W"))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--num-classes", type=int, default=133)
    args = parser.parse_args()

    threads = torch.get_num_threads()
    model = ExportableSegmenter(default_model(args.num_classes)).eval()
    start = time.perf_counter()
    program = trace(model, sample_images((2, 100, 132), torch.uint8))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.onnx"
        to_onnx(program, model.output_names).save(str(path))
        export_seconds = time.perf_counter() - start
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    images = sample_images((1, *args.size), torch.uint8, seed=1)
    array = images.numpy()

    def eager() -> None:
        with torch.no_grad():
            model(images)

    def ort() -> None:
        session.run(None, {"images": array})

    with torch.no_grad():
        expected = model(images)
    got = session.run(None, {"images": array})
    differences = [float((torch.from_numpy(b) - a).abs().max()) for a, b in zip(expected, got, strict=True)]
    print(f"max abs difference onnxruntime vs eager: {dict(zip(model.output_names, differences, strict=True))}")

    times: dict[str, list[float]] = {"eager": [], "onnxruntime": []}
    runs = {"eager": eager, "onnxruntime": ort}
    for step in range(args.warmup + args.steps):
        order = ["eager", "onnxruntime"] if step % 2 == 0 else ["onnxruntime", "eager"]
        for name in order:
            start = time.perf_counter()
            runs[name]()
            if step >= args.warmup:
                times[name].append((time.perf_counter() - start) * 1000)
    eager_ms, ort_ms = statistics.median(times["eager"]), statistics.median(times["onnxruntime"])
    print(
        f"{cpu_name()}, {threads} threads; python {platform.python_version()}, torch {torch.__version__}, "
        f"onnx {onnx.__version__}, onnxruntime {onnxruntime.__version__}; export + translation {export_seconds:.0f} s"
    )
    print("| model | input | eager ms / image | onnxruntime ms / image | onnxruntime / eager |")
    print("|---|---|---|---|---|")
    print(
        f"| Mask2Former R18 (train.yaml default, {args.num_classes} classes) | {args.size[0]}x{args.size[1]} | "
        f"{eager_ms:.1f} | {ort_ms:.1f} | {ort_ms / eager_ms:.2f} |"
    )


if __name__ == "__main__":
    main()
