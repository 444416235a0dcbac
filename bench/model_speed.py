"""Full models (backbone + neck + head) against the transformers models carrying the same weights, side by side.

    python bench/model_speed.py --device cpu --size 256 256 --batch 1 --steps 3      # small CPU run
    python bench/model_speed.py --device cuda --size 512 512 --batch 8 --steps 20 --amp bf16

Each model is a transformers `Mask2FormerForUniversalSegmentation` / `MaskFormerForInstanceSegmentation` built
from a config (random weights; Swin-T or ResNet-50 backbone; default head: 100 queries, 9 Mask2Former decoder
layers / 6 MaskFormer decoder layers, 6 deformable encoder layers) or an `EomtForUniversalSegmentation` (ViT-S
or the paper's ViT-L, patch 16, 4 registers, 200 queries in the last 4 blocks; its `image_size` the input's,
which must be square: transformers' EoMT takes no other size), saved with `save_pretrained`, converted with
`model.convert_mask2former` / `model.convert_maskformer` / `convert.eomt.convert_eomt` and loaded into our
`Segmenter` (strict=True). `rtdetr-r50`: transformers' `RTDetrForObjectDetection` (RTDetrConfig defaults, ResNet-50-vd,
80 classes; class logits and boxes for the masks; no targets, so no denoising queries), `convert.rtdetr`.
Before timing, the two models' outputs are compared (max abs difference printed, asserted small).

Timed, alternating ours / transformers (the order flips every step, so machine noise hits both alike),
median of `--steps` steps after `--warmup` steps:
- inference: eval mode, no_grad forward;
- training: train mode forward + backward of the sum of the class and mask logits of the final and every
  auxiliary prediction (no loss, so no loss-implementation difference enters the comparison).
Both sides compute a prediction after every decoder layer (transformers' MaskFormer with
`use_auxiliary_loss=True`, which adds one from the all-zero decoder input). EoMT: inference as a trained model
(mask annealing done: transformers' `attn_mask_probs` 0, no masked attention, one prediction), training as at
step 0 (the masked attention always applied, a prediction before each of the 4 blocks, on both sides). The
ResNet BatchNorms of the
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
    DeformableDetrConfig,
    DeformableDetrForObjectDetection,
    EomtConfig,
    EomtForUniversalSegmentation,
    Mask2FormerConfig,
    Mask2FormerForUniversalSegmentation,
    MaskFormerConfig,
    MaskFormerForInstanceSegmentation,
    ResNetConfig,
    RTDetrConfig,
    RTDetrForObjectDetection,
    RTDetrResNetConfig,
    SwinConfig,
)

from densepred.convert.deformable_detr import convert_deformable_detr
from densepred.convert.eomt import convert_eomt
from densepred.convert.mask2former import convert_mask2former
from densepred.convert.maskformer import convert_maskformer
from densepred.convert.rtdetr import convert_rtdetr
from densepred.heads.box_ops import inverse_sigmoid
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


def hf_eomt(image_size: int, **sizes) -> EomtForUniversalSegmentation:
    """EoMT (EomtConfig defaults: ViT-L/16, 4 registers, 200 queries in the last 4 blocks) at `image_size`."""
    labels = {i: f"class_{i}" for i in range(NUM_CLASSES)}
    return EomtForUniversalSegmentation(EomtConfig(image_size=image_size, id2label=labels, **sizes))


def hf_rtdetr() -> RTDetrForObjectDetection:
    """RT-DETR R50-vd (RTDetrConfig defaults: 300 queries, 6 decoder layers; frozen backbone BatchNorm), 80 classes."""
    labels = {i: f"class_{i}" for i in range(80)}
    backbone = RTDetrResNetConfig(out_indices=[2, 3, 4])
    return RTDetrForObjectDetection(RTDetrConfig(backbone_config=backbone, id2label=labels))


def hf_deformable_detr(**flags) -> DeformableDetrForObjectDetection:
    """Deformable DETR R50 (DeformableDetrConfig defaults: timm ResNet-50 with frozen BatchNorm, 300 queries, 6 + 6
    layers, 4 levels), 80 classes; `flags` with_box_refine / two_stage."""
    labels = {i: f"class_{i}" for i in range(80)}
    return DeformableDetrForObjectDetection(DeformableDetrConfig(id2label=labels, **flags))


def deformable_detr_logits(model: DeformableDetrForObjectDetection, x: torch.Tensor) -> list[torch.Tensor]:
    """[final class, final boxes, layer 0 class, boxes, ...] of transformers' Deformable DETR, which returns only the
    final ones without labels: the earlier layers' are recomputed from its per-layer states with its own heads, as
    its forward computes them (the prediction heads run twice on the earlier layers: a small part of the model)."""
    out = model(pixel_values=x)
    hidden, references = out.intermediate_hidden_states, out.intermediate_reference_points
    logits = [out.logits, out.pred_boxes]
    for level in range(hidden.shape[1] - 1):
        reference = inverse_sigmoid(out.init_reference_points if level == 0 else references[:, level - 1])
        delta = model.bbox_embed[level](hidden[:, level])
        if reference.shape[-1] == 4:
            boxes = delta + reference
        else:
            boxes = torch.cat([delta[..., :2] + reference, delta[..., 2:]], -1)
        logits += [model.class_embed[level](hidden[:, level]), boxes.sigmoid()]
    return logits


# name -> (transformers model builder of the (square) input size, converter)
MODELS: dict[str, tuple[Callable[[int], torch.nn.Module], Callable]] = {
    "m2f-swin": (lambda size: hf_mask2former(swin_tiny_config(STAGES)), convert_mask2former),
    "m2f-r50": (lambda size: hf_mask2former(resnet50_config()), convert_mask2former),
    # transformers' MaskFormer turns a Swin config into MaskFormerSwin (always the four stages)
    "mf-swin": (lambda size: hf_maskformer(swin_tiny_config(None)), convert_maskformer),
    "mf-r50": (lambda size: hf_maskformer(resnet50_config()), convert_maskformer),
    "eomt-s": (
        lambda size: hf_eomt(size, hidden_size=384, num_hidden_layers=12, num_attention_heads=6),
        convert_eomt,
    ),
    "eomt-l": (hf_eomt, convert_eomt),
    # boxes instead of masks; no targets, so no denoising queries on either side
    "rtdetr-r50": (lambda size: hf_rtdetr(), convert_rtdetr),
    "ddetr-r50": (lambda size: hf_deformable_detr(), convert_deformable_detr),
    "ddetr-r50-2stage": (
        lambda size: hf_deformable_detr(with_box_refine=True, two_stage=True),
        convert_deformable_detr,
    ),
}


def build_pair(name: str, image_size: int) -> tuple[Segmenter, torch.nn.Module]:
    """(ours, transformers) with the same weights: transformers model -> save_pretrained -> convert -> load."""
    build_reference, convert = MODELS[name]
    torch.manual_seed(0)
    reference = build_reference(image_size)
    with tempfile.TemporaryDirectory() as folder:
        reference.save_pretrained(folder)
        config, state_dict = convert(folder)
    ours = Segmenter.from_config(config)
    ours.load_state_dict(state_dict, strict=True)
    if isinstance(reference, DeformableDetrForObjectDetection):  # transformers' backbone BatchNorms are frozen
        ours.backbone.model = freeze_batch_norm_2d(ours.backbone.model)
    elif not isinstance(reference, (EomtForUniversalSegmentation, RTDetrForObjectDetection)):  # RT-DETR's are frozen
        freeze_batch_norm_2d(reference.model.pixel_level_module.encoder)
    return ours, reference


def ours_logits(model: Segmenter, x: torch.Tensor) -> list[torch.Tensor]:
    """[final class, final mask, aux class, aux mask, ...] logits of our model (detectors: boxes for masks)."""
    out = model(x)
    predictions = [out, *out["aux_outputs"]]
    second = "pred_boxes" if "pred_boxes" in out else "pred_masks"
    return [t for p in predictions for t in (p["pred_logits"], p[second])]


def eomt_logits(model: EomtForUniversalSegmentation, x: torch.Tensor) -> list[torch.Tensor]:
    """[final class, final mask, per-block class, mask, ...] logits of transformers' EoMT, which returns only the
    final ones: its `predict` recorded (the per-block predictions: in training, or while attn_mask_probs > 0)."""
    recorded = []
    predict = model.predict
    model.predict = lambda tokens: recorded.append(predict(tokens)) or recorded[-1]
    try:
        model(x)
    finally:
        del model.predict
    return [t for masks, classes in [recorded[-1], *recorded[:-1]] for t in (classes, masks)]


def set_mode(model: torch.nn.Module, training: bool) -> None:
    """Train / eval mode; transformers' EoMT as a trained model in eval (annealed: no masked attention) and as
    at step 0 in training (always masked), as ours."""
    model.train(training)
    if isinstance(model, EomtForUniversalSegmentation):
        model.attn_mask_probs.fill_(float(training))


def reference_logits(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """[final class, final mask, aux class, aux mask, ...] logits of the transformers model."""
    if isinstance(model, EomtForUniversalSegmentation):
        return eomt_logits(model, x)
    if isinstance(model, DeformableDetrForObjectDetection):
        return deformable_detr_logits(model, x)
    if isinstance(model, RTDetrForObjectDetection):  # [final class, final boxes, layer 0 class, boxes, ...]
        out = model(pixel_values=x)
        aux = range(out.intermediate_logits.shape[1] - 1)
        return [
            out.logits,
            out.pred_boxes,
            *(t for i in aux for t in (out.intermediate_logits[:, i], out.intermediate_reference_points[:, i])),
        ]
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
    set_mode(reference, False)
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
    if any(name.startswith("eomt") for name in args.models) and height != width:
        parser.error(f"--size {height} {width}: transformers' EoMT takes square inputs only (its image_size)")
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
        ours, reference = (m.to(device) for m in build_pair(name, height))
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
        set_mode(reference, True)
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
