"""Forward+backward time of each native backbone against the same timm architecture, side by side.

    python bench/backbone_speed.py                                   # every native model, 224x224, batch 2
    python bench/backbone_speed.py --models resnet50 swin_tiny --size 512 --batch 8 --device cuda --amp bf16

Both sides compute the four pyramid levels (strides 4-32) and back-propagate the sum of their means.
ResNets use trainable BatchNorm on both sides; the timm Swin is built for the benchmark size with
`always_partition=True` (the same arithmetic as ours, with timm's precomputed masks). The plain ViTs
(`dinov2_*`, `dinov3_*`, `eva02_*`) return the maps of four evenly spaced blocks after the final norm on
both sides (ours without the pyramid, timm's `forward_intermediates(norm=True)` with `dynamic_img_size`).
Runs of the two models alternate so that machine noise hits both alike; the median of `--iters` steps is reported.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import time

import timm
import torch

from densepred.backbones import AutoBackbone, list_backbones

SWIN_TIMM = {
    "swin_tiny": "swin_tiny_patch4_window7_224",
    "swin_small": "swin_small_patch4_window7_224",
    "swin_base": "swin_base_patch4_window7_224",
    "swin_large": "swin_large_patch4_window7_224",
    "swin_base_window12": "swin_base_patch4_window12_384",
    "swin_large_window12": "swin_large_patch4_window12_384",
}


def build_pair(name: str, size: int) -> tuple[torch.nn.Module, torch.nn.Module, int | list[int]]:
    """(native, timm) models of the same architecture, both returning the stride 4-32 maps (ViTs: four blocks'
    maps), and the `indices` of timm's `forward_intermediates`."""
    native = AutoBackbone.from_config(name, **({"norm": "bn"} if name.startswith("resnet") else {}))
    if native.family == "vit":
        depth = native.num_layers
        blocks = [depth // 4, depth // 2, 3 * depth // 4, depth]
        native.out_indices = blocks
        reference = timm.create_model(native.config["model_name"], num_classes=0, global_pool="", dynamic_img_size=True)
        return native, reference, [b - 1 for b in blocks]
    native.out_indices = [1, 2, 3, 4]
    if name.startswith("swin"):
        reference = timm.create_model(SWIN_TIMM[name], num_classes=0, img_size=size, always_partition=True)
    else:
        reference = timm.create_model(name, num_classes=0)
    return native, reference, 4


def step_fn(model: torch.nn.Module, is_native: bool, indices: int | list[int] = 4):
    norm = {"norm": True} if isinstance(indices, list) else {}  # the ViTs' final norm on each map

    def step(x: torch.Tensor) -> None:
        if is_native:
            maps = model(x).feature_maps
        else:
            maps = model.forward_intermediates(x, indices=indices, intermediates_only=True, **norm)
        sum(m.float().mean() for m in maps).backward()

    return step


def timed(step, x: torch.Tensor, device: torch.device, autocast) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with autocast():
        step(x)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list_backbones())
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none")
    args = parser.parse_args()

    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else contextlib.nullcontext
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    print(
        f"# forward+backward, batch {args.batch}, {args.size}x{args.size}, {args.device} ({where}), "
        f"{torch.get_num_threads()} threads, amp={args.amp}, torch {torch.__version__}, timm {timm.__version__}"
    )
    print(
        "| model | native ms | timm ms | native / timm |"
        + (" native MiB | timm MiB |" if device.type == "cuda" else "")
    )
    print("|---|---|---|---|" + ("---|---|" if device.type == "cuda" else ""))
    for name in args.models:
        torch.manual_seed(0)
        native, reference, indices = build_pair(name, args.size)
        native, reference = native.to(device).train(), reference.to(device).train()
        x = torch.randn(args.batch, 3, args.size, args.size, device=device)
        steps = {"native": step_fn(native, True), "timm": step_fn(reference, False, indices)}
        times: dict[str, list[float]] = {"native": [], "timm": []}
        memory: dict[str, float] = {}
        for i in range(args.warmup + args.iters):
            for key, step in steps.items():
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                elapsed = timed(step, x, device, autocast)
                if device.type == "cuda":
                    memory[key] = torch.cuda.max_memory_allocated(device) / 2**20
                if i >= args.warmup:
                    times[key].append(elapsed)
            native.zero_grad(set_to_none=True)
            reference.zero_grad(set_to_none=True)
        ours, theirs = (statistics.median(times[k]) * 1000 for k in ("native", "timm"))
        row = f"| {name} | {ours:.1f} | {theirs:.1f} | {ours / theirs:.2f} |"
        if device.type == "cuda":
            row += f" {memory['native']:.0f} | {memory['timm']:.0f} |"
        print(row, flush=True)
        del native, reference


if __name__ == "__main__":
    main()
