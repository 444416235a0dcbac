"""The full Mask2Former training step of ours against transformers' with the same weights, side by side.

    python bench/train_speed.py --device cpu --models r50 --size 384 384 --batch 2     # CPU, ResNet-50
    python bench/train_speed.py --device cpu --models swin --size 384 384 --batch 2    # CPU, Swin-T
    python bench/train_speed.py --device cuda --models swin r50 --size 1024 1024 --batch 8 --amp bf16
    python bench/train_speed.py --device cuda --models swin --size 512 512 --batch 16 --amp bf16
    python bench/train_speed.py --device cpu --models r50 --size 128 128 --batch 1 --steps 2 --warmup 1  # smoke

The models are model_speed.py's (`build_pair`): a transformers `Mask2FormerForUniversalSegmentation`
(random weights, seed 0; Swin-T or ResNet-50 backbone, 133 classes, 100 queries, 9 masked-attention
layers, 6 deformable encoder layers), saved with `save_pretrained`, converted with `convert_mask2former`
and loaded into our `Segmenter`; the transformers ResNet's BatchNorms are frozen, as the converted
backbone's are. Both models train (train mode, drop path on).

One training step, each side as its users write it:
- ours: `segmenter(pixels)`, `loss = sum(SetCriterion(num_classes=133)(outputs, targets).values())` (the
  criterion in the tree at run time; Mask2Former defaults: weights and matcher costs 2 / 5 / 5, no-object
  0.1, 12544 points, losses on every auxiliary prediction), `loss.backward()`, then `.step()` and
  `.zero_grad(set_to_none=True)` of `engine.optim.build_adamw(segmenter, lr=1e-4)` (Mask2Former groups);
- transformers: `model(pixel_values=..., mask_labels=..., class_labels=...).loss` (its defaults: the same
  weights, points and no-object weight), `.backward()`, `torch.optim.AdamW(model.parameters(), lr=1e-4,
  weight_decay=0.05)` `.step()` and `.zero_grad(set_to_none=True)`.
`--amp bf16` runs both steps under `torch.autocast(dtype=torch.bfloat16)` (no grad scaler needed).

The batch is the same on both sides (seed 0): random uint8 images normalised once with
`Segmenter.preprocess` (the data pipeline's job; the same pixel values go to both models, as in
model_speed.py), 20 masks per image (random rectangles, 1/8 to 1/2 of each side) at the input size with
random labels in [0, 133): bool masks for ours, the same as float for transformers. The "loss" column is
each side's loss at the first step (same weights, same targets; only the random point sampling differs),
a check that both compute the same losses.

Timed: after one first step per side (it creates the AdamW state and gives the loss column), steps
alternating ours / transformers (the order flips every step), the median of `--steps` steps after
`--warmup` per side. On CPU it also prints each side's median minor page faults and kernel CPU time per step
(`getrusage`): glibc returns freed blocks above its mmap threshold to the OS, and a step that allocates them again
pays a page fault per 4 KiB, which makes a side's step time depend on the machine's page-fault cost.
Memory:
- `--device cpu`: a first child process of this script builds the transformers model, saves it
  (`save_pretrained`), converts it and saves ours (config + safetensors) and the batch; then each side alone,
  in a fresh child, builds its model from those files and runs `MEMORY_STEPS` training steps. "peak" is
  that child's `ru_maxrss`, "+" the peak minus its RSS before the model was built (weights, gradients, AdamW
  state, the step's activations, and what the C allocator keeps of freed blocks). "step" is the peak tensor
  memory of one more step above the tensors allocated before it (`torch.profiler` with `profile_memory=True`,
  its allocation records' running total: the CPU counterpart of the CUDA column, gradients and activations,
  no allocator slack; measured after the RSS peak is read). All
  children run before this process builds any model (a child's `ru_maxrss` starts at its parent's peak).
  `--no-memory` skips them.
- `--device cuda`: the step's peak `torch.cuda.max_memory_allocated` above what was allocated before it
  (both models' weights and AdamW states stay resident and are not counted), and the device-to-host
  synchronisations of one step of each side (an extra step after the timed ones), counted as the warnings
  of `torch.cuda.set_sync_debug_mode("warn")`.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers
from backbone_speed import cpu_name  # bench/ is the script's folder
from model_speed import MODELS as PAIRS
from model_speed import NUM_CLASSES, build_pair, measure
from safetensors.torch import load_file, save_file
from timm.layers import freeze_batch_norm_2d
from transformers import Mask2FormerForUniversalSegmentation

from densepred.engine.optim import build_adamw
from densepred.heads.criterion import SetCriterion
from densepred.segmenter import Segmenter
from densepred.utils.checkpointing import enable_activation_checkpointing

MODELS = {"r50": "m2f-r50", "swin": "m2f-swin"}  # --models name -> model_speed.MODELS key
MASKS_PER_IMAGE = 20
MEMORY_STEPS = 3  # steps of each memory child: the first creates the AdamW state, the next ones run with it


def synthetic_batch(segmenter: Segmenter, batch: int, height: int, width: int, device: torch.device) -> dict:
    """The inputs of both sides (seed 0): `pixels` (B, 3, H, W) normalised by `segmenter.preprocess`;
    `targets` for our criterion ([{"labels": (N,) int64, "masks": (N, H, W) bool}]); `mask_labels`
    ([(N, H, W) float]) and `class_labels` ([(N,) int64]) for transformers, the same masks and labels."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, 3, height, width), dtype=torch.uint8, generator=generator)
    pixels = segmenter.preprocess(images.to(device))
    rows = torch.arange(height)[None, :, None]
    cols = torch.arange(width)[None, None, :]
    targets = []
    for _ in range(batch):
        n = MASKS_PER_IMAGE
        mask_h = torch.randint(max(1, height // 8), max(2, height // 2) + 1, (n,), generator=generator)
        mask_w = torch.randint(max(1, width // 8), max(2, width // 2) + 1, (n,), generator=generator)
        top = (torch.rand(n, generator=generator) * (height - mask_h + 1)).long()
        left = (torch.rand(n, generator=generator) * (width - mask_w + 1)).long()
        masks = (
            (rows >= top[:, None, None])
            & (rows < (top + mask_h)[:, None, None])
            & (cols >= left[:, None, None])
            & (cols < (left + mask_w)[:, None, None])
        )
        labels = torch.randint(0, NUM_CLASSES, (n,), generator=generator)
        targets.append({"labels": labels.to(device), "masks": masks.to(device)})
    return {
        "pixels": pixels,
        "targets": targets,
        "mask_labels": [t["masks"].float() for t in targets],
        "class_labels": [t["labels"] for t in targets],
    }


def ours_step(
    segmenter: Segmenter, data: dict, device: torch.device, first_loss: list, checkpointing: list[str]
) -> Callable:
    """Our training step on `pixels`: forward, SetCriterion, backward, AdamW (Mask2Former groups) step, with
    the repeated blocks of the `checkpointing` parts (backbone, neck, head) activation-checkpointed."""
    for part in checkpointing:
        enable_activation_checkpointing(getattr(segmenter, part).repeated_blocks())
    criterion = SetCriterion(num_classes=NUM_CLASSES).to(device)
    optimizer = build_adamw(segmenter, lr=1e-4)
    targets = data["targets"]
    return training_step(lambda pixels: sum(criterion(segmenter(pixels), targets).values()), optimizer, first_loss)


def hf_step(model: torch.nn.Module, data: dict, first_loss: list) -> Callable:
    """transformers' training step on `pixels`: forward with labels (its loss), backward, AdamW step."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    mask_labels, class_labels = data["mask_labels"], data["class_labels"]

    def loss(pixels: torch.Tensor) -> torch.Tensor:
        return model(pixel_values=pixels, mask_labels=mask_labels, class_labels=class_labels).loss

    return training_step(loss, optimizer, first_loss)


def training_step(
    loss_fn: Callable[[torch.Tensor], torch.Tensor], optimizer: torch.optim.Optimizer, first_loss: list
) -> Callable[[torch.Tensor], None]:
    """One step of either side: loss, backward, optimizer step and zero_grad; the first loss is kept."""

    def step(pixels: torch.Tensor) -> None:
        loss = loss_fn(pixels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if not first_loss:
            first_loss.append(loss.detach())

    return step


def counting_faults(step: Callable, counts: list[tuple[int, float]]) -> Callable:
    """`step` that appends its minor page faults and kernel CPU seconds (this process's `getrusage`) to `counts`:
    on CPU, memory the allocator returned to the OS and takes back costs a page fault per 4 KiB page."""

    def counted(pixels: torch.Tensor) -> None:
        before = resource.getrusage(resource.RUSAGE_SELF)
        step(pixels)
        after = resource.getrusage(resource.RUSAGE_SELF)
        counts.append((after.ru_minflt - before.ru_minflt, after.ru_stime - before.ru_stime))

    return counted


def fault_summary(counts: list[tuple[int, float]]) -> str:
    """ "<median faults> (<median kernel ms> ms)" of `counting_faults`' records."""
    faults = statistics.median(count for count, _ in counts)
    return f"{faults:.0f} ({statistics.median(seconds for _, seconds in counts) * 1000:.0f} ms)"


def count_syncs(step: Callable, pixels: torch.Tensor, device: torch.device, autocast) -> int:
    """Device-to-host synchronisations of one step: warnings of `set_sync_debug_mode("warn")`."""
    torch.cuda.synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with autocast():
                step(pixels)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize(device)
    return sum("synchroniz" in str(w.message) for w in caught)


def rss_mib() -> float:
    """This process's peak resident set size so far (`ru_maxrss`), MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def step_tensor_peak_mib(step: Callable, pixels: torch.Tensor, autocast) -> float:
    """The peak of tensor memory during one `step` above what was allocated before it, MiB: the running total of
    the CPU allocations `torch.profiler` records (`profile_memory=True`), tensors allocated during the step only."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as profiler:
        with autocast():
            step(pixels)
    peak, events = 0, list(profiler.profiler.kineto_results.experimental_event_tree())
    while events:
        event = events.pop()
        if isinstance(event.extra_fields, torch._C._profiler._ExtraFields_Allocation):
            peak = max(peak, event.extra_fields.total_allocated)
        events.extend(event.children)
    return peak / 2**20


def child(args: argparse.Namespace) -> None:
    """A memory child. "prepare": build the pair and the batch, save them under `--folder` (this process's
    memory is not reported). "ours" / "hf": load that side's model and the batch, run `MEMORY_STEPS`
    training steps, print {"before": MiB, "peak": MiB, "step": MiB, "loss": step-1 loss} as JSON ("step":
    `step_tensor_peak_mib` of one more step, after the RSS peak is read)."""
    folder = Path(args.folder)
    device = torch.device(args.device)
    if args.child == "prepare":  # as build_pair, with the files kept: model_speed's MODELS entry
        build_reference, convert = PAIRS[MODELS[args.models[0]]]
        torch.manual_seed(0)
        build_reference(args.size[0]).save_pretrained(folder / "hf")
        config, state_dict = convert(str(folder / "hf"))
        (folder / "ours.json").write_text(json.dumps(config))
        save_file(state_dict, str(folder / "ours.safetensors"))
        ours = Segmenter.from_config(config)
        torch.save(synthetic_batch(ours, args.batch, *args.size, torch.device("cpu")), folder / "batch.pt")
        return
    before = rss_mib()
    # our own files, written by the prepare child a moment ago; each side builds only its own model
    if args.child == "ours":
        model = Segmenter.from_config(json.loads((folder / "ours.json").read_text()))
        model.load_state_dict(load_file(str(folder / "ours.safetensors")), strict=True)
    else:
        model = Mask2FormerForUniversalSegmentation.from_pretrained(folder / "hf")
        freeze_batch_norm_2d(model.model.pixel_level_module.encoder)  # as build_pair
    model = model.to(device).train()
    data = torch.load(folder / "batch.pt", weights_only=True)
    data = {key: to_device(value, device) for key, value in data.items()}
    first_loss: list = []
    if args.child == "ours":
        step = ours_step(model, data, device, first_loss, args.checkpointing)
    else:
        step = hf_step(model, data, first_loss)
    autocast = autocast_fn(args, device)
    for _ in range(MEMORY_STEPS):
        with autocast():
            step(data["pixels"])
    peak = rss_mib()
    tensors = step_tensor_peak_mib(step, data["pixels"], autocast) if device.type == "cpu" else float("nan")
    print(json.dumps({"before": before, "peak": peak, "step": tensors, "loss": first_loss[0].item()}), flush=True)


def to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {key: to_device(v, device) for key, v in value.items()}
    return [to_device(v, device) for v in value]


def run_child(args: argparse.Namespace, side: str, name: str, folder: str) -> dict[str, float]:
    """Run `child` for one side and model in a fresh process of this script; its JSON report (if any)."""
    height, width = args.size
    command = [sys.executable, str(Path(__file__).resolve()), "--child", side, "--models", name, "--folder", folder]
    command += ["--device", args.device, "--size", str(height), str(width), "--batch", str(args.batch)]
    command += ["--amp", args.amp, "--checkpointing", *args.checkpointing]
    result = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode != 0 or (side != "prepare" and not lines):
        sys.stderr.write(result.stdout + result.stderr)
        raise RuntimeError(f"memory child {side} {name} failed (exit status {result.returncode})")
    return json.loads(lines[-1]) if lines else {}


def peak_rss(args: argparse.Namespace, name: str) -> dict[str, dict[str, float]]:
    """side -> the report of its memory child, for model `name`."""
    with tempfile.TemporaryDirectory() as folder:
        run_child(args, "prepare", name, folder)
        return {side: run_child(args, side, name, folder) for side in ("ours", "hf")}


def autocast_fn(args: argparse.Namespace, device: torch.device) -> Callable[[], Any]:
    if args.amp == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--size", type=int, nargs=2, default=[384, 384], metavar=("H", "W"))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10, help="measured steps per side (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", choices=["none", "bf16"], default="none")
    parser.add_argument("--no-memory", action="store_true", help="CPU: skip the peak-RSS child processes")
    parser.add_argument(
        "--checkpointing", nargs="*", default=[], choices=["backbone", "neck", "head"],
        help="ours: activation-checkpoint these parts' repeated blocks (train.py activation_checkpointing=[...])",
    )  # fmt: skip
    parser.add_argument("--child", choices=["prepare", "ours", "hf"], help=argparse.SUPPRESS)  # internal
    parser.add_argument("--folder", help=argparse.SUPPRESS)  # internal: the memory children's files
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to torch; use --device cpu")
    if args.child:
        child(args)
        return

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    autocast = autocast_fn(args, device)
    where = torch.cuda.get_device_name(device) if cuda else f"{cpu_name()}, {torch.get_num_threads()} threads"
    height, width = args.size
    print(
        f"# Mask2Former training step (forward, loss, backward, AdamW step): batch {args.batch}, "
        f"{height}x{width}, {args.device} ({where}), amp={args.amp}, ours checkpointing {args.checkpointing or 'off'}, "
        f"median of {args.steps} steps after "
        f"{args.warmup}, torch {torch.__version__}, transformers {transformers.__version__}",
        flush=True,
    )
    # CPU peak RSS first, while this process is small (a child's ru_maxrss starts at its parent's peak)
    memory = {}
    if not cuda and not args.no_memory:
        memory = {name: peak_rss(args, name) for name in args.models}
        for name, sides in memory.items():  # also in the table below; printed now for a run cut short
            print(
                f"# peak RSS MiB {name}: "
                + ", ".join(
                    f"{side} {r['peak']:.0f} (+{r['peak'] - r['before']:.0f}, step {r['step']:.0f})"
                    for side, r in sides.items()
                ),
                flush=True,
            )

    header = "| setting | ours ms | HF ms | ours / HF | ours img/s | HF img/s | loss ours / HF (step 1) |"
    rule = "|---|---|---|---|---|---|---|"
    if cuda:
        header += " ours MiB | HF MiB | ours / HF | ours syncs | HF syncs |"
        rule += "---|---|---|---|---|"
    elif memory:
        header += " ours peak MiB | HF peak MiB | ours / HF | ours + MiB | HF + MiB | ours / HF |"
        header += " ours step MiB | HF step MiB | ours / HF |"
        rule += "---|---|---|---|---|---|---|---|---|"
    print(header)
    print(rule)
    for name in args.models:
        ours, reference = (m.to(device).train() for m in build_pair(MODELS[name], height))
        data = synthetic_batch(ours, args.batch, height, width, device)
        losses: dict[str, list] = {"ours": [], "hf": []}
        steps = {
            "ours": ours_step(ours, data, device, losses["ours"], args.checkpointing),
            "hf": hf_step(reference, data, losses["hf"]),
        }
        for step in steps.values():  # a first step creates the AdamW state: every step after it is alike
            with autocast():
                step(data["pixels"])
        faults: dict[str, list[tuple[int, float]]] = {key: [] for key in steps}
        if not cuda:
            steps = {key: counting_faults(step, faults[key]) for key, step in steps.items()}
        result = measure(steps, data["pixels"], device, autocast, args.warmup, args.steps)
        (ours_ms, ours_mib), (hf_ms, hf_mib) = result["ours"], result["hf"]
        row = (
            f"| {name} {args.batch}x{height}x{width} {args.amp} | {ours_ms:.0f} | {hf_ms:.0f} | "
            f"{ours_ms / hf_ms:.2f} | {args.batch * 1000 / ours_ms:.2f} | {args.batch * 1000 / hf_ms:.2f} | "
            f"{losses['ours'][0].item():.1f} / {losses['hf'][0].item():.1f} |"
        )
        if cuda:
            syncs = {key: count_syncs(steps[key], data["pixels"], device, autocast) for key in steps}
            row += f" {ours_mib:.0f} | {hf_mib:.0f} | {ours_mib / hf_mib:.2f} | {syncs['ours']} | {syncs['hf']} |"
        elif memory:
            mine, theirs = memory[name]["ours"], memory[name]["hf"]
            grown = {side: report["peak"] - report["before"] for side, report in memory[name].items()}
            row += (
                f" {mine['peak']:.0f} | {theirs['peak']:.0f} | {mine['peak'] / theirs['peak']:.2f} |"
                f" {grown['ours']:.0f} | {grown['hf']:.0f} | {grown['ours'] / grown['hf']:.2f} |"
                f" {mine['step']:.0f} | {theirs['step']:.0f} | {mine['step'] / theirs['step']:.2f} |"
            )
        print(row, flush=True)
        if not cuda:
            print(
                f"# {name} minor page faults per step (median; kernel time): "
                + ", ".join(f"{key} {fault_summary(counts)}" for key, counts in faults.items()),
                flush=True,
            )
        del ours, reference, steps, data
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
