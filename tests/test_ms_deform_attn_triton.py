"""The Triton multi-scale deformable attention kernels against the PyTorch reference `ms_deform_attn_core`.

Triton picks its interpreter (kernels run by numpy on CPU tensors) when a kernel is decorated, that is when
`densepred.necks.ms_deform_attn_triton` is imported, reading TRITON_INTERPRET then; another test of the same
pytest session may already have imported the module (or triton) without it. So the kernel checks run in a
fresh Python process: this file run as a script with TRITON_INTERPRET=1 in its environment, which prints its
measurements as one JSON line; a module fixture starts it once and the tests below judge its numbers. The
sizes are tiny because the interpreter is slow (the whole file takes a few seconds).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

SHAPES = [(5, 7), (3, 4), (2, 2)]  # odd sizes, a power-of-two width, a 2x2 map
ROOT = Path(__file__).resolve().parents[1]
MODULE_FILE = ROOT / "necks" / "ms_deform_attn_triton.py"
HAS_TRITON = importlib.util.find_spec("triton") is not None

# (x, y) per level where the interpolation has a kink or an edge, exact in float32 both as x * w - 0.5 (the
# kernels) and as grid_sample's unnormalisation of 2x - 1, so both take the same one-sided gradient:
# pixel centres, the image border (x = 0 or 1), the last coordinates before zero padding (px = -1 or w), far out.
SPECIAL_LOCATIONS = [
    [(0.5, 0.5), (0.0, 1.0), (1.0, 0.0), (0.5, 0.0), (-1.0, 0.5), (2.0, 2.0)],
    [(0.125, 0.5), (0.875, 0.5), (-0.125, 0.5), (1.125, 0.0), (0.375, 1.0), (0.625, 0.5)],
    [(0.25, 0.75), (0.75, 0.25), (-0.25, 0.25), (1.25, 0.75), (0.0, 1.0), (0.75, 1.25)],
]


def make_inputs(
    batch: int = 2,
    shapes: list[tuple[int, int]] = SHAPES,
    heads: int = 2,
    head_dim: int = 8,
    points: int = 3,
    queries: int = 11,
    special: bool = True,
    seed: int = 0,
) -> tuple[torch.Tensor, list[tuple[int, int]], list[int], torch.Tensor, torch.Tensor]:
    """Random float32 inputs: value (B, S, heads, d), locations (B, Q, heads, L, P, 2) in [-0.15, 1.15]
    (the first queries on SPECIAL_LOCATIONS), softmax weights (B, Q, heads, L, P)."""
    gen = torch.Generator().manual_seed(seed)
    levels = len(shapes)
    starts = [sum(h * w for h, w in shapes[:i]) for i in range(levels)]
    value = torch.randn(batch, sum(h * w for h, w in shapes), heads, head_dim, generator=gen)
    locations = torch.rand(batch, queries, heads, levels, points, 2, generator=gen) * 1.3 - 0.15
    if special:
        for level in range(levels):
            for i, xy in enumerate(SPECIAL_LOCATIONS[level]):
                query, point = divmod(i, points)
                locations[:, query, :, level, point] = torch.tensor(xy)
    weights = torch.randn(batch, queries, heads, levels * points, generator=gen).softmax(-1)
    return value, shapes, starts, locations, weights.view(batch, queries, heads, levels, points)


def max_errors(
    impl: Any, core: Any, dtype: torch.dtype, relative_to: float | None = None, **sizes: Any
) -> dict[str, float]:
    """Largest |triton - reference| of the output and of the three gradients (for a random upstream gradient),
    the inputs cast to `dtype` and the reference run in float32 on the same (upcast) numbers. With
    `relative_to` = eps, the largest of |error| / (eps * |ref| + 1e-4 * max|ref|) instead (at most 1 when the
    result is the float32 one rounded to `dtype`, i.e. accumulated in float32)."""
    value, shapes, starts, locations, weights = make_inputs(**sizes)
    value, locations, weights = (t.to(dtype) for t in (value, locations, weights))
    inputs = [t.clone().requires_grad_(True) for t in (value, locations, weights)]
    refs = [t.detach().float().requires_grad_(True) for t in (value, locations, weights)]
    out = impl(inputs[0], shapes, starts, inputs[1], inputs[2])
    ref = core(refs[0], shapes, starts, refs[1], refs[2])
    assert out.dtype == dtype and out.shape == ref.shape
    upstream = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    grads = torch.autograd.grad(out, inputs, upstream)
    ref_grads = torch.autograd.grad(ref, refs, upstream.float())
    errors = {}
    for name, got, want in zip(
        ("forward", "grad_value", "grad_locations", "grad_weights"), (out, *grads), (ref, *ref_grads), strict=True
    ):
        assert got.dtype == dtype and got.shape == want.shape, name
        diff = (got.detach().float() - want).abs()
        if relative_to is not None:
            diff = diff / (relative_to * want.abs() + 1e-4 * want.abs().max())
        errors[name] = diff.max().item()
    return errors


def interpreter_checks() -> dict[str, Any]:
    """Run in a process with TRITON_INTERPRET=1: every measurement the tests judge."""
    from densepred.necks import ms_deform_attn_triton as mod
    from densepred.necks.ms_deform_attn import ms_deform_attn_core

    results: dict[str, Any] = {"interpreted": mod._interpreted()}
    impl = mod.ms_deform_attn_triton
    results["fp32"] = max_errors(impl, ms_deform_attn_core, torch.float32)
    # head_dim 6 (masked channels) and 130 (several channel blocks: a second grid column forward, the
    # channel loop backward), two rows of one head
    results["fp32_head_dim_6"] = max_errors(impl, ms_deform_attn_core, torch.float32, head_dim=6, queries=5)
    results["fp32_head_dim_130"] = max_errors(
        impl,
        ms_deform_attn_core,
        torch.float32,
        batch=1,
        shapes=[(2, 3)],
        heads=1,
        head_dim=130,
        points=1,
        queries=2,
        special=False,
    )
    # bf16: one ulp (2**-7 relative), since the interpreter's float32 -> bfloat16 `.to()` truncates (on a GPU it
    # rounds to nearest even, half an ulp); fp16: half an ulp (numpy rounds to nearest even)
    results["bf16"] = max_errors(impl, ms_deform_attn_core, torch.bfloat16, relative_to=2.0**-7)
    results["fp16"] = max_errors(impl, ms_deform_attn_core, torch.float16, relative_to=2.0**-11)
    value, shapes, starts, locations, weights = make_inputs(queries=0, special=False)
    results["empty_shape"] = list(impl(value, shapes, starts, locations, weights).shape)
    # A NaN location samples zero (like the original CUDA op), and reads no memory out of the value
    value, shapes, starts, locations, weights = make_inputs(batch=1, queries=2, special=False)
    locations[0, 0, 0, 0, 0] = float("nan")
    locations[0, 1, 0, 1, 0] = torch.tensor([1e30, -1e30])
    only_bad = torch.zeros_like(weights)
    only_bad[0, 0, 0, 0, 0] = only_bad[0, 1, 0, 1, 0] = 1.0
    results["nan_far_output_abs_max"] = impl(value, shapes, starts, locations, only_bad).abs().max().item()
    return results


@pytest.fixture(scope="module")
def interpreted() -> dict[str, Any]:
    """The measurements of `interpreter_checks`, from a fresh process with TRITON_INTERPRET=1."""
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, f"interpreter checks failed:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_checks_ran_under_the_interpreter(interpreted: dict[str, Any]) -> None:
    """The subprocess really ran the kernels through triton's interpreter, on CPU tensors."""
    assert interpreted["interpreted"] is True


@pytest.mark.parametrize("case", ["fp32", "fp32_head_dim_6", "fp32_head_dim_130"])
def test_float32_matches_reference(interpreted: dict[str, Any], case: str) -> None:
    """float32: forward to 1e-5, the value / location / weight gradients to 1e-4 of grid_sample's."""
    errors = interpreted[case]
    assert errors["forward"] <= 1e-5, errors
    assert errors["grad_value"] <= 1e-4, errors
    assert errors["grad_locations"] <= 1e-4, errors
    assert errors["grad_weights"] <= 1e-4, errors


@pytest.mark.parametrize("case", ["bf16", "fp16"])
def test_half_precision_accumulates_in_float32(interpreted: dict[str, Any], case: str) -> None:
    """bf16 / fp16 inputs: the output and every gradient is the float32 reference (on the same upcast inputs)
    rounded once to the input dtype (within one bf16 ulp, half an fp16 ulp: see `interpreter_checks`); the
    reference itself run in bf16 / fp16 (half-precision accumulation) is some 40 / 11 times further off."""
    errors = interpreted[case]
    assert max(errors.values()) <= 1.0, errors


def test_empty_and_invalid_locations(interpreted: dict[str, Any]) -> None:
    """No query gives an empty (B, 0, heads * d) output; NaN and huge locations sample zero."""
    assert interpreted["empty_shape"] == [2, 0, 16]
    assert interpreted["nan_far_output_abs_max"] == 0.0


def test_register_and_import_contract() -> None:
    """The module imports, "triton" is selectable when Triton is installed, and `triton_available` tells the truth."""
    from densepred.necks import ms_deform_attn_triton as mod
    from densepred.necks.ms_deform_attn import MSDeformAttn, get_ms_deform_attn_implementation

    assert mod.triton_available() is HAS_TRITON
    assert get_ms_deform_attn_implementation("triton") is mod.ms_deform_attn_triton
    MSDeformAttn(embed_dim=16, num_heads=2, implementation="triton")  # a known name: no error


def test_without_triton_import_works_and_call_fails_clearly() -> None:
    """With triton unimportable the module still imports, and calling the kernel raises a clear error."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "from densepred.necks import ms_deform_attn_triton as mod\n"
        "import torch\n"
        "assert not mod.triton_available()\n"
        "try:\n"
        "    mod.ms_deform_attn_triton(torch.zeros(1, 1, 1, 1), [(1, 1)], [0], torch.zeros(1, 1, 1, 1, 1, 2),"
        " torch.zeros(1, 1, 1, 1, 1))\n"
        "except RuntimeError as error:\n"
        "    assert 'triton' in str(error)\n"
        "else:\n"
        "    raise AssertionError('no error')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr


def test_no_host_device_synchronisation_in_source() -> None:
    """The module never reads a device tensor back on the host (.item(), .cpu(), .tolist(), .numpy())."""
    tree = ast.parse(MODULE_FILE.read_text())
    calls = {
        node.func.attr for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
    }
    assert not calls & {"item", "cpu", "tolist", "numpy"}


if __name__ == "__main__":
    # The subprocess of the `interpreted` fixture: TRITON_INTERPRET=1 is already in the environment.
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    print(json.dumps(interpreter_checks()))
