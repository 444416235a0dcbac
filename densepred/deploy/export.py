"""Export a trained or converted model for deployment: ONNX or a torch.export program, plus what runs beside it.

`export_model(checkpoint, format, output)` (what `python export.py` calls) loads the model through the
project's trusted loading (`densepred.engine.loading.load_module`: a `.ckpt` read weights-only, an export
folder's safetensors; the `_target_`s checked against the allowlist, nothing a file names is run), wraps it
as an `ExportableSegmenter` (normalisation and padding inside, raw head outputs out) and writes into
`output`, each file atomically (densepred.utils.io):

- `model.onnx` (format=onnx, onnxruntime-ready) or `model.pt2` (format=torch_export, `torch.export.load`);
  one input `images` (B, 3, H, W), uint8 RGB by default, with dynamic batch, height and width;
- `metadata.json`: classes (names, ids, thing / stuff, colours), the task, the post-processing thresholds
  (a detector's: task "detection", `test_topk`), the normalisation the graph applies, input / output names
  and shapes, the versions, and the verification (the largest difference to the eager model at two sizes,
  see `verify`);
- `postprocess.py`: the NumPy post-processing (densepred/deploy/postprocess.py: masks, or a detector's
  boxes), so a deployment needs numpy + onnxruntime and no PyTorch.

The graph is traced by `torch.export` with every deformable-attention core resolved to the portable
"gather" one (necks/ms_deform_attn_gather.py); the ONNX file is translated from that same program.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from densepred.deploy.model import ExportableSegmenter, raw_output_names
from densepred.engine.loading import load_module
from densepred.necks.ms_deform_attn import MSDeformAttn
from densepred.utils.io import atomic_write, atomic_write_json

log = logging.getLogger(__name__)

FORMATS = {"onnx": "model.onnx", "torch_export": "model.pt2"}
METADATA_FILE = "metadata.json"
POSTPROCESS_FILE = "postprocess.py"
INPUT_NAME = "images"
INPUT_DTYPES = {"uint8": torch.uint8, "float32": torch.float32}
# The tracing example: batch 2 and sizes that are no multiple of the padding, so that no dimension is
# specialised (a size-1 or already-padded example would fix it); then two other sizes for the verification.
TRACE_SIZE = (2, 100, 132)
VERIFY_SIZES = ((1, 96, 64), (2, 70, 90))
DEFAULT_OPSET = 18


def portable(model: torch.nn.Module) -> torch.nn.Module:
    """Switch every deformable-attention module of `model` to the "gather" core (in place); returns `model`."""
    for module in model.modules():
        if isinstance(module, MSDeformAttn):
            module.implementation = "gather"
    return model


def sample_images(size: Sequence[int], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Random (B, 3, H, W) images of `size` (B, H, W), 0-255 values of `dtype`."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (size[0], 3, size[1], size[2]), generator=generator, dtype=torch.uint8).to(dtype)


def trace(model: ExportableSegmenter, example: torch.Tensor, dynamic: bool = True) -> torch.export.ExportedProgram:
    """`torch.export` of `model` on `example`; `dynamic`: batch, height and width symbolic."""
    shapes = None
    if dynamic:
        dim = torch.export.Dim.DYNAMIC
        shapes = {INPUT_NAME: {0: dim, 2: dim, 3: dim}}
    with torch.no_grad():
        return torch.export.export(model, (example,), dynamic_shapes=shapes, strict=False)


def to_onnx(program: torch.export.ExportedProgram, names: Sequence[str], opset: int = DEFAULT_OPSET) -> Any:
    """The ONNX translation (`torch.onnx.export`, optimised) of an exported program -> its ONNXProgram."""
    return torch.onnx.export(
        program, input_names=[INPUT_NAME], output_names=list(names), opset_version=opset, dynamo=True, verbose=False
    )


def max_differences(expected: Sequence[torch.Tensor], got: Sequence[Any]) -> list[float]:
    """The largest absolute difference of each output pair (tensors or arrays)."""
    return [
        float((torch.as_tensor(b) - a.detach()).abs().max()) if a.numel() else 0.0
        for a, b in zip(expected, got, strict=True)
    ]


def runner(path: Path, format: str) -> Any:
    """A callable images (tensor) -> outputs (sequence) of the written model file."""
    if format == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return lambda images: session.run(None, {INPUT_NAME: images.numpy()})
    program = torch.export.load(str(path))
    return lambda images: program.module()(images)


def verify(model: ExportableSegmenter, run: Any, sizes: Iterable[Sequence[int]], dtype: torch.dtype) -> list[dict]:
    """Eager vs written model at each (B, H, W) of `sizes`: [{"size", "max_abs_error": {output: float}}]."""
    report = []
    for index, size in enumerate(sizes, start=1):
        images = sample_images(size, dtype, seed=index)
        with torch.no_grad():
            expected = model(images)
        errors = max_differences(expected, run(images))
        report.append({"size": list(size), "max_abs_error": dict(zip(model.output_names, errors, strict=True))})
    return report


def versions() -> dict[str, str]:
    """Versions of the libraries that made the file."""
    import onnx
    import onnxruntime

    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def deployment_metadata(module: Any, model: ExportableSegmenter, format: str, input_dtype: str) -> dict[str, Any]:
    """metadata.json's content (see the module docstring) for `module` (a SegmentationModule)."""
    postprocess = module.postprocess
    categories = [
        {"id": c["id"], "name": c["name"], "isthing": bool(c["isthing"]), "color": list(c.get("color") or [])}
        for c in module.metadata["categories"]
    ]
    shapes = {  # a detector's class logits are sigmoid ones, without the "no object" column
        "pred_logits": ["batch", "queries", "num_classes" if module.task == "detection" else "num_classes + 1"],
        "pred_masks": ["batch", "queries", "padded_height / 4", "padded_width / 4"],
        "pred_boxes": ["batch", "queries", 4],
    }
    return {
        "format": format,
        "model_file": FORMATS[format],
        "task": module.task,
        "num_classes": int(module.metadata["num_classes"]),
        "categories": categories,
        "thing_classes": [k for k, c in enumerate(categories) if c["isthing"]],
        "input": {
            "name": INPUT_NAME,
            "shape": ["batch", 3, "height", "width"],
            "dtype": input_dtype,
            "description": "RGB pixels 0-255, any height and width; normalised and padded inside the graph",
        },
        "outputs": {name: shapes[name] for name in model.output_names},
        "size_divisibility": model.size_divisibility,
        "mask_stride": 4,
        "normalization": {**module.model.normalization, "applied_in_graph": True, "units": "0-1 of 255"},
        "postprocess": {
            key: getattr(postprocess, key)
            for key in ("object_mask_threshold", "overlap_threshold", "test_topk", "instance_things_only")
            if hasattr(postprocess, key)
        },
    }


def export_model(
    checkpoint: str | Path,
    format: str = "onnx",
    output: str | Path | None = None,
    opset: int = DEFAULT_OPSET,
    dynamic: bool = True,
    input_dtype: str = "uint8",
    size_divisibility: int = 32,
    task: str | None = None,
    check: bool = True,
    postprocess: Mapping[str, Any] | None = None,
    trusted_targets: Iterable[str] = (),
) -> Path:
    """Write the deployment folder of `checkpoint` (module docstring); returns the model file.

    format: "onnx" | "torch_export"; output: the folder (default: `<checkpoint>_<format>` beside it); opset:
    the ONNX opset; dynamic: batch, height and width symbolic (else fixed to the tracing example's); input_dtype:
    "uint8" | "float32" (0-255 either way); task: the post-processing task (default: the checkpoint's);
    check: run the written model against the eager one at two other sizes (recorded in metadata.json) and
    refuse a difference above 1e-3; postprocess: post-processing settings replacing the checkpoint's
    (recorded in metadata.json, as predict.py's `postprocess.*`).
    """
    if format not in FORMATS:
        raise ValueError(f"format={format!r}: choose one of {sorted(FORMATS)}")
    if input_dtype not in INPUT_DTYPES:
        raise ValueError(f"input_dtype={input_dtype!r}: choose one of {sorted(INPUT_DTYPES)}")
    checkpoint = Path(checkpoint).expanduser()
    folder = Path(output) if output is not None else checkpoint.with_name(f"{checkpoint.stem}_{format}")
    module = load_module(checkpoint, task=task, trusted_targets=trusted_targets, postprocess=postprocess).eval()
    dtype = INPUT_DTYPES[input_dtype]
    example = sample_images(TRACE_SIZE, dtype)
    segmenter = portable(module.model)
    with torch.no_grad():
        names = raw_output_names(segmenter(segmenter.preprocess(example[:1, :, :64, :64])))
    model = ExportableSegmenter(segmenter, size_divisibility, names).eval()
    program = trace(model, example, dynamic)
    model_file = folder / FORMATS[format]
    if format == "onnx":
        onnx_program = to_onnx(program, names, opset)
        atomic_write(model_file, lambda tmp: onnx_program.save(str(tmp)))
    else:
        atomic_write(model_file, lambda tmp: torch.export.save(program, str(tmp)))
    metadata = deployment_metadata(module, model, format, input_dtype)
    metadata["opset"] = opset if format == "onnx" else None
    metadata["dynamic"] = bool(dynamic)
    metadata["source"] = {"checkpoint": str(checkpoint), "global_step": module.checkpoint_step}
    metadata["versions"] = versions()
    if check:
        sizes = VERIFY_SIZES if dynamic else [TRACE_SIZE]
        metadata["verification"] = verify(model, runner(model_file, format), sizes, dtype)
        worst = max(e for entry in metadata["verification"] for e in entry["max_abs_error"].values())
        if worst > 1e-3:
            raise RuntimeError(f"{model_file}: differs from the eager model by {worst:.3g}: {metadata['verification']}")
    atomic_write_json(folder / METADATA_FILE, metadata)
    source = Path(__file__).with_name("postprocess.py")
    atomic_write(folder / POSTPROCESS_FILE, lambda tmp: shutil.copyfile(source, tmp))
    log.info(f"wrote {model_file}, {METADATA_FILE} and {POSTPROCESS_FILE} ({json.dumps(metadata.get('verification'))})")
    return model_file
