"""Full models (backbone + neck + head) against the transformers models carrying the same weights, side by side.

    python bench/model_speed.py --device cpu --size 256 256 --batch 1 --steps 3      # small CPU run
    python bench/model_speed.py --device cuda --size 512 512 --batch 8 --steps 20 --amp bf16

Each model is a transformers `Mask2FormerForUniversalSegmentation` / `MaskFormerForInstanceSegmentation` built
from a config (random weights; Swin-T or ResNet-50 backbone; default head: 100 queries, 9 Mask2Former decoder
layers / 6 MaskFormer decoder layers, 6 deformable encoder layers), saved with `save_pretrained`, converted
with `model.convert_mask2former` / `model.convert_maskformer` and loaded into our `Segmenter` (strict=True).
Before timing, the two models' outputs are compared (max abs difference printed, asserted small).

Timed, alternating ours / transformers (the order flips every step, so machine noise hits both alike),
median of `--steps` steps after `--warmup` steps:
- inference: eval mode, no_grad forward;
- training: train mode forward + backward of the sum of the class and mask logits of the final and every
  auxiliary prediction (no loss, so no loss-implementation difference enters the comparison).
Both sides compute a prediction after every decoder layer (transformers' MaskFormer with
`use_auxiliary_loss=True`, which adds one from the all-zero decoder input). The ResNet BatchNorms of the
transformers backbone are frozen (timm's `freeze_batch_norm_2d`), as the converted backbone's are (the
official fine-tuning setup). With `--device cuda`, peak memory is the step's `torch.cuda.max_memory_allocated`
above what was allocated before it (both models' weights stay resident and are not counted).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from collections.abc import Callable

import torch
import transformers
from backbone_speed import cpu_name  # bench/ is the script's folder
from timm.layers import freeze_batch_norm_2d
from transformers import (
    Mask2FormerConfig,
    Mask2FormerForUniversalSegmentation,
    MaskFormerConfig,
    MaskFormerForInstanceSegmentation,
    ResNetConfig,
    SwinConfig,
)

from densepred.convert.mask2former import convert_mask2former
from densepred.convert.maskformer import convert_maskformer
from densepred.segmenter import Segmenter

STAGES = ["stage1", "stage2", "stage3", "stage4"]
NUM_CLASSES = 133  # COCO panoptic


def swin_tiny_config(out_features: list[str] | None) -> SwinConfig:
    return SwinConfig(
        embed_dim=96,
        depths=[2, 2, 6, 2],
        num_heads=[3, 6, 12, 24],
        window_size=7,
        drop_path_rate=0.3,
        out_features=out_features,
    )


def resnet50_config() -> ResNetConfig:
    return ResNetConfig(
        embedding_size=64,
        hidden_sizes=[256, 512, 1024, 2048],
        depths=[3, 4, 6, 3],
        layer_type="bottleneck",
        out_features=STAGES,
    )


def hf_mask2former(backbone_config) -> Mask2FormerForUniversalSegmentation:
    """Default Mask2Former head: 100 queries, 10 HF decoder layers (9 masked-attention layers), 6 encoder layers."""
    labels = {i: f"class_{i}" for i in range(NUM_CLASSES)}
    return Mask2FormerForUniversalSegmentation(Mask2FormerConfig(backbone_config=backbone_config, id2label=labels))


def hf_maskformer(backbone_config) -> MaskFormerForInstanceSegmentation:
    """Default MaskFormer head: 100 queries, 6 decoder layers; a prediction after every layer."""
    labels = {i: f"class_{i}" for i in range(NUM_CLASSES)}
    config = MaskFormerConfig(backbone_config=backbone_config, id2label=labels, use_auxiliary_loss=True)
    return MaskFormerForInstanceSegmentation(config)


# name -> (transformers model builder, converter)
MODELS: dict[str, tuple[Callable[[], torch.nn.Module], Callable]] = {
    "m2f-swin": (lambda: hf_mask2former(swin_tiny_config(STAGES)), convert_mask2former),
    "m2f-r50": (lambda: hf_mask2former(resnet50_config()), convert_mask2former),
    # transformers' MaskFormer turns a Swin config into MaskFormerSwin (always the four stages)
    "mf-swin": (lambda: hf_maskformer(swin_tiny_config(None)), convert_maskformer),
    "mf-r50": (lambda: hf_maskformer(resnet50_config()), convert_maskformer),
}


def build_pair(name: str) -> tuple[Segmenter, torch.nn.Module]:
    """(ours, transformers) with the same weights: transformers model -> save_pretrained -> convert -> load."""
    build_reference, convert = MODELS[name]
    torch.manual_seed(0)
    reference = build_reference()
    with tempfile.TemporaryDirectory() as folder:
        reference.save_pretrained(folder)
        config, state_dict = convert(folder)
    ours = Segmenter.from_config(config)
    ours.load_state_dict(state_dict, strict=True)
    freeze_batch_norm_2d(reference.model.pixel_level_module.encoder)
    return ours, reference


def ours_logits(model: Segmenter, x: torch.Tensor) -> list[torch.Tensor]:
    """[final class, final mask, aux class, aux mask, ...] logits of our model."""
    out = model(x)
    predictions = [out, *out["aux_outputs"]]
    return [t for p in predictions for t in (p["pred_logits"], p["pred_masks"])]


def reference_logits(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """[final class, final mask, aux class, aux mask, ...] logits of the transformers model."""
    # transformers' MaskFormer needs output_hidden_states=True to build its auxiliary logits
    maskformer = isinstance(model, MaskFormerForInstanceSegmentation)
    out = model(x, output_auxiliary_logits=True, output_hidden_states=maskformer)
    aux = [t for a in out.auxiliary_logits for t in (a["class_queries_logits"], a["masks_queries_logits"])]
    return [out.class_queries_logits, out.masks_queries_logits, *aux]


def check_agreement(name: str, ours: Segmenter, reference: torch.nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """(max abs difference, largest abs logit) of the final class and mask logits (Mask2Former: and of the
    auxiliary ones), in fp32; raises AssertionError where they differ by more than 1e-3 * (1 + largest logit).

    transformers' MaskFormer auxiliary logits are defined differently (they include the all-zero decoder
    input and skip the decoder LayerNorm), so for MaskFormer only the final logits are compared.
    """
    ours.eval()
    reference.eval()
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    with torch.no_grad():
        got, want = ours_logits(ours, x), reference_logits(reference, x)
    torch.backends.cudnn.allow_tf32 = tf32
    if name.startswith("mf-"):
        got, want = got[:2], want[:2]
    if len(got) != len(want):
        raise AssertionError(f"{name}: {len(got) // 2} predictions from ours, {len(want) // 2} from transformers")
    worst = largest = 0.0
    for a, b in zip(got, want, strict=True):
        if a.shape != b.shape:
            raise AssertionError(f"{name}: output shapes differ, ours {tuple(a.shape)} vs {tuple(b.shape)}")
        diff = (a - b).abs().max().item()
        scale = b.abs().max().item()
        if diff > 1e-3 * (1.0 + scale):
            raise AssertionError(f"{name}: outputs differ by {diff:.3g} (largest logit {scale:.3g})")
        worst, largest = max(worst, diff), max(largest, scale)
    return worst, largest


def step_fn(model: torch.nn.Module, logits: Callable, training: bool) -> Callable[[torch.Tensor], None]:
    def infer(x: torch.Tensor) -> None:
        with torch.no_grad():
            logits(model, x)

    def train(x: torch.Tensor) -> None:
        sum(t.float().sum() for t in logits(model, x)).backward()
        model.zero_grad(set_to_none=True)

    return train if training else infer


def timed(step: Callable, x: torch.Tensor, device: torch.device, autocast) -> tuple[float, float]:
    """(seconds, peak MiB above the memory allocated before the step; 0 off CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    start = time.perf_counter()
    with autocast():
        step(x)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated(device) - before) / 2**20 if device.type == "cuda" else 0.0
    return elapsed, peak


def measure(
    steps: dict[str, Callable], x: torch.Tensor, device: torch.device, autocast, warmup: int, iters: int
) -> dict[str, tuple[float, float]]:
    """key -> (median ms, peak MiB), the keys' steps alternating, their order flipped every step."""
    times: dict[str, list[float]] = {key: [] for key in steps}
    memory = dict.fromkeys(steps, 0.0)
    keys = list(steps)
    for i in range(warmup + iters):
        for key in keys if i % 2 == 0 else keys[::-1]:
            elapsed, peak = timed(steps[key], x, device, autocast)
            memory[key] = max(memory[key], peak)
            if i >= warmup:
                times[key].append(elapsed)
    return {key: (statistics.median(times[key]) * 1000, memory[key]) for key in steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--size", type=int, nargs=2, default=[512, 512], metavar=("H", "W"))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10, help="measured steps (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", choices=["none", "bf16"], default="none")
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to torch; use --device cpu")

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    bf16 = args.amp == "bf16"
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    where = torch.cuda.get_device_name(device) if cuda else f"{cpu_name()}, {torch.get_num_threads()} threads"
    height, width = args.size
    print(
        f"# batch {args.batch}, {height}x{width}, {args.device} ({where}), amp={args.amp}, "
        f"median of {args.steps} steps after {args.warmup}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}"
    )
    header = (
        "| model | max abs diff (of largest logit) | infer ours ms | infer HF ms | ours / HF "
        "| train ours ms | train HF ms | ours / HF |"
    )
    rule = "|---|---|---|---|---|---|---|---|"
    if cuda:
        header += " infer ours MiB | infer HF MiB | train ours MiB | train HF MiB |"
        rule += "---|---|---|---|"
    print(header)
    print(rule)
    for name in args.models:
        ours, reference = (m.to(device) for m in build_pair(name))
        torch.manual_seed(0)
        x = torch.randn(args.batch, 3, height, width, device=device)
        diff, largest = check_agreement(name, ours, reference, x)
        infer = measure(
            {"ours": step_fn(ours, ours_logits, False), "hf": step_fn(reference, reference_logits, False)},
            x,
            device,
            autocast,
            args.warmup,
            args.steps,
        )
        ours.train()
        reference.train()
        train = measure(
            {"ours": step_fn(ours, ours_logits, True), "hf": step_fn(reference, reference_logits, True)},
            x,
            device,
            autocast,
            args.warmup,
            args.steps,
        )
        row = f"| {name} | {diff:.1e} (of {largest:.2g}) |"
        for result in (infer, train):
            row += f" {result['ours'][0]:.1f} | {result['hf'][0]:.1f} | {result['ours'][0] / result['hf'][0]:.2f} |"
        if cuda:
            row += "".join(f" {result[key][1]:.0f} |" for result in (infer, train) for key in ("ours", "hf"))
        print(row, flush=True)
        del ours, reference
        if cuda:
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
