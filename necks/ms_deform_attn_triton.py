"""Multi-scale deformable attention as fused Triton kernels (forward and backward).

`ms_deform_attn_triton` has the signature and the result of the reference `ms_deform_attn_core`
(`densepred.necks.ms_deform_attn`), without its per-level `grid_sample` calls and the (B*heads, d, Q, L*P)
intermediate: one forward kernel gathers the four bilinear corners of every sampling point and accumulates
the weighted sum in float32, and one backward kernel gives the exact gradients of the bilinear interpolation
for the value (float32 atomic adds), the sampling locations and the attention weights, like the original
CUDA op of Deformable DETR (`ms_deform_attn_im2col` / `ms_deform_attn_col2im`).

Sampling follows `grid_sample(mode="bilinear", padding_mode="zeros", align_corners=False)`: a location x in
[0, 1] of a level of width w is at pixel coordinate x * w - 0.5, and corners outside the map read zero. At a
location exactly on a pixel centre (where the interpolation has a kink) the gradient is the one-sided one
that `grid_sample` takes (floor of the coordinate as the lower corner). Unlike `grid_sample`, a NaN location
samples zero (as in the original CUDA op) instead of giving NaN. The value gradient is summed by float32 atomic
adds, so on a GPU its last bits depend on the order of the adds (not bitwise deterministic, like the CUDA op).

Triton is imported guarded: this module imports on any machine, and `ms_deform_attn_triton` raises a clear
error where triton is missing. The kernels need CUDA tensors, or CPU tensors under triton's interpreter
(`TRITON_INTERPRET=1` set before this module is imported, which is when the kernels are decorated).
`densepred.necks.ms_deform_attn` registers it as `implementation="triton"` (and "auto" on CUDA) when triton is
installed.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
from torch.autograd.function import FunctionCtx, once_differentiable

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the machine
    triton = None
    tl = None

# Elements of the (rows, channels) tile each program holds (the row block is this over the channel block), and
# warps per program. Chosen from the sm_90 compile alone (untimed): forward 512 / 4 warps takes 80 registers,
# backward 256 / 4 warps 128 (at 512 it takes 230, at 1024 it spills), for head_dim 8 to 128.
_FWD_TILE_ELEMENTS = 512
_BWD_TILE_ELEMENTS = 256
_MAX_BLOCK_D = 128
_NUM_WARPS = 4


def triton_available() -> bool:
    """Whether triton could be imported (the kernels can then run on CUDA tensors, or under its interpreter)."""
    return triton is not None


if triton is not None:

    @triton.jit
    def _corner_offsets(
        rows_base,
        stride_s,
        start,
        yi,
        xi,
        width,
        height,
        valid,
    ):
        """Offsets (BLOCK_R,) of value[b, start + yi * width + xi, h, 0] and whether that corner is in the map."""
        inside = valid & (xi >= 0) & (xi < width) & (yi >= 0) & (yi < height)
        pixel = (start + yi * width + xi).to(tl.int64)
        return rows_base + pixel * stride_s, inside

    @triton.jit
    def _bilinear_setup(loc_ptr, loc_offsets, row_mask, height, width):
        """Corner indices, interpolation fractions and the guard of one sampling point of each row.

        The guard (coordinate within (-2, size + 1) on both axes, so false for NaN) changes no result: outside
        it all four corners are off the map anyway; it keeps the float -> int conversion in range.
        """
        x = tl.load(loc_ptr + loc_offsets, mask=row_mask, other=0.0).to(tl.float32)
        y = tl.load(loc_ptr + loc_offsets + 1, mask=row_mask, other=0.0).to(tl.float32)
        width_f = width.to(tl.float32)
        height_f = height.to(tl.float32)
        px = x * width_f - 0.5
        py = y * height_f - 0.5
        guard = row_mask & (px > -2.0) & (px < width_f + 1.0) & (py > -2.0) & (py < height_f + 1.0)
        px = tl.where(guard, px, 0.0)
        py = tl.where(guard, py, 0.0)
        x0f = tl.floor(px)
        y0f = tl.floor(py)
        lx = px - x0f
        ly = py - y0f
        return x0f.to(tl.int32), y0f.to(tl.int32), lx, ly, guard

    @triton.jit
    def _ms_deform_attn_fwd_kernel(
        value_ptr,
        meta_ptr,
        loc_ptr,
        attn_ptr,
        out_ptr,
        num_rows,
        rows_per_batch,
        num_heads,
        seq_len,
        head_dim,
        NUM_LEVELS: tl.constexpr,
        NUM_POINTS: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """out[r, d] = sum over levels and points of weight * bilinear sample; a row r is one (b, q, h)."""
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        chans = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        row_mask = rows < num_rows
        chan_mask = chans < head_dim
        rows64 = rows.to(tl.int64)
        batch = rows64 // rows_per_batch
        head = rows64 % num_heads
        stride_s = num_heads * head_dim
        rows_base = (batch * seq_len * num_heads + head) * head_dim  # value[b, 0, h, 0]
        chans2 = chans[None, :]
        chan_mask2 = chan_mask[None, :]
        acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
        for level in range(NUM_LEVELS):
            height = tl.load(meta_ptr + 3 * level)
            width = tl.load(meta_ptr + 3 * level + 1)
            start = tl.load(meta_ptr + 3 * level + 2)
            for point in range(NUM_POINTS):
                lp = level * NUM_POINTS + point
                x0, y0, lx, ly, guard = _bilinear_setup(
                    loc_ptr, rows64 * (NUM_LEVELS * NUM_POINTS * 2) + lp * 2, row_mask, height, width
                )
                weight = tl.load(attn_ptr + rows64 * (NUM_LEVELS * NUM_POINTS) + lp, mask=row_mask, other=0.0)
                weight = weight.to(tl.float32)
                hx = 1.0 - lx
                hy = 1.0 - ly
                off00, in00 = _corner_offsets(rows_base, stride_s, start, y0, x0, width, height, guard)
                off01, in01 = _corner_offsets(rows_base, stride_s, start, y0, x0 + 1, width, height, guard)
                off10, in10 = _corner_offsets(rows_base, stride_s, start, y0 + 1, x0, width, height, guard)
                off11, in11 = _corner_offsets(rows_base, stride_s, start, y0 + 1, x0 + 1, width, height, guard)
                v00 = tl.load(value_ptr + off00[:, None] + chans2, mask=in00[:, None] & chan_mask2, other=0.0)
                v01 = tl.load(value_ptr + off01[:, None] + chans2, mask=in01[:, None] & chan_mask2, other=0.0)
                v10 = tl.load(value_ptr + off10[:, None] + chans2, mask=in10[:, None] & chan_mask2, other=0.0)
                v11 = tl.load(value_ptr + off11[:, None] + chans2, mask=in11[:, None] & chan_mask2, other=0.0)
                acc += (weight * hy * hx)[:, None] * v00.to(tl.float32)
                acc += (weight * hy * lx)[:, None] * v01.to(tl.float32)
                acc += (weight * ly * hx)[:, None] * v10.to(tl.float32)
                acc += (weight * ly * lx)[:, None] * v11.to(tl.float32)
        out_offsets = rows64[:, None] * head_dim + chans2
        tl.store(
            out_ptr + out_offsets,
            acc.to(out_ptr.dtype.element_ty),
            mask=row_mask[:, None] & chan_mask2,
        )

    @triton.jit
    def _ms_deform_attn_bwd_kernel(
        value_ptr,
        meta_ptr,
        loc_ptr,
        attn_ptr,
        grad_out_ptr,
        grad_value_ptr,
        grad_loc_ptr,
        grad_attn_ptr,
        num_rows,
        rows_per_batch,
        num_heads,
        seq_len,
        head_dim,
        NUM_LEVELS: tl.constexpr,
        NUM_POINTS: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """Gradients of the forward for a block of rows, all channels (looped over in BLOCK_D chunks).

        grad_value (float32 buffer) gets weight * corner weight * grad_out by atomic adds; grad_attn is the dot
        product of grad_out with the sample; grad_loc is weight * grad_out . d(sample)/d(x, y), with
        d(pixel coordinate)/dx = width (and height for y).
        """
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_mask = rows < num_rows
        rows64 = rows.to(tl.int64)
        batch = rows64 // rows_per_batch
        head = rows64 % num_heads
        stride_s = num_heads * head_dim
        rows_base = (batch * seq_len * num_heads + head) * head_dim
        for level in range(NUM_LEVELS):
            height = tl.load(meta_ptr + 3 * level)
            width = tl.load(meta_ptr + 3 * level + 1)
            start = tl.load(meta_ptr + 3 * level + 2)
            for point in range(NUM_POINTS):
                lp = level * NUM_POINTS + point
                loc_offsets = rows64 * (NUM_LEVELS * NUM_POINTS * 2) + lp * 2
                x0, y0, lx, ly, guard = _bilinear_setup(loc_ptr, loc_offsets, row_mask, height, width)
                attn_offsets = rows64 * (NUM_LEVELS * NUM_POINTS) + lp
                weight = tl.load(attn_ptr + attn_offsets, mask=row_mask, other=0.0).to(tl.float32)
                hx = 1.0 - lx
                hy = 1.0 - ly
                off00, in00 = _corner_offsets(rows_base, stride_s, start, y0, x0, width, height, guard)
                off01, in01 = _corner_offsets(rows_base, stride_s, start, y0, x0 + 1, width, height, guard)
                off10, in10 = _corner_offsets(rows_base, stride_s, start, y0 + 1, x0, width, height, guard)
                off11, in11 = _corner_offsets(rows_base, stride_s, start, y0 + 1, x0 + 1, width, height, guard)
                grad_weight = tl.zeros((BLOCK_R,), dtype=tl.float32)
                grad_px = tl.zeros((BLOCK_R,), dtype=tl.float32)
                grad_py = tl.zeros((BLOCK_R,), dtype=tl.float32)
                for d0 in range(0, head_dim, BLOCK_D):
                    chans = d0 + tl.arange(0, BLOCK_D)
                    chans2 = chans[None, :]
                    chan_mask2 = (chans < head_dim)[None, :]
                    g = tl.load(
                        grad_out_ptr + rows64[:, None] * head_dim + chans2,
                        mask=row_mask[:, None] & chan_mask2,
                        other=0.0,
                    ).to(tl.float32)
                    m00 = in00[:, None] & chan_mask2
                    m01 = in01[:, None] & chan_mask2
                    m10 = in10[:, None] & chan_mask2
                    m11 = in11[:, None] & chan_mask2
                    v00 = tl.load(value_ptr + off00[:, None] + chans2, mask=m00, other=0.0).to(tl.float32)
                    v01 = tl.load(value_ptr + off01[:, None] + chans2, mask=m01, other=0.0).to(tl.float32)
                    v10 = tl.load(value_ptr + off10[:, None] + chans2, mask=m10, other=0.0).to(tl.float32)
                    v11 = tl.load(value_ptr + off11[:, None] + chans2, mask=m11, other=0.0).to(tl.float32)
                    sample = (hy * hx)[:, None] * v00 + (hy * lx)[:, None] * v01
                    sample += (ly * hx)[:, None] * v10 + (ly * lx)[:, None] * v11
                    grad_weight += tl.sum(g * sample, axis=1)
                    # d(sample)/d(px) and d(sample)/d(py) of the bilinear interpolation
                    grad_px += tl.sum(g * (hy[:, None] * (v01 - v00) + ly[:, None] * (v11 - v10)), axis=1)
                    grad_py += tl.sum(g * (hx[:, None] * (v10 - v00) + lx[:, None] * (v11 - v01)), axis=1)
                    wg = weight[:, None] * g
                    tl.atomic_add(grad_value_ptr + off00[:, None] + chans2, (hy * hx)[:, None] * wg, mask=m00)
                    tl.atomic_add(grad_value_ptr + off01[:, None] + chans2, (hy * lx)[:, None] * wg, mask=m01)
                    tl.atomic_add(grad_value_ptr + off10[:, None] + chans2, (ly * hx)[:, None] * wg, mask=m10)
                    tl.atomic_add(grad_value_ptr + off11[:, None] + chans2, (ly * lx)[:, None] * wg, mask=m11)
                tl.store(
                    grad_attn_ptr + attn_offsets,
                    grad_weight.to(grad_attn_ptr.dtype.element_ty),
                    mask=row_mask,
                )
                grad_x = weight * grad_px * width.to(tl.float32)
                grad_y = weight * grad_py * height.to(tl.float32)
                tl.store(grad_loc_ptr + loc_offsets, grad_x.to(grad_loc_ptr.dtype.element_ty), mask=row_mask)
                tl.store(grad_loc_ptr + loc_offsets + 1, grad_y.to(grad_loc_ptr.dtype.element_ty), mask=row_mask)


def _interpreted() -> bool:
    """Whether the kernels were decorated under triton's interpreter (TRITON_INTERPRET=1 at import)."""
    return type(_ms_deform_attn_fwd_kernel).__name__ == "InterpretedFunction"


@functools.lru_cache(maxsize=32)
def _level_meta(
    spatial_shapes: tuple[tuple[int, int], ...], level_start_index: tuple[int, ...], device: torch.device
) -> torch.Tensor:
    """int32 (num_levels, 3) of (h, w, start) on `device`, built on the host from Python ints (cached)."""
    rows = [(h, w, s) for (h, w), s in zip(spatial_shapes, level_start_index, strict=True)]
    meta = torch.tensor(rows, dtype=torch.int32)
    # A host -> device copy of a small host tensor: queued on the current stream, not a synchronisation
    # (nothing is read back from the device, so the host never waits for the GPU here).
    return meta.to(device, non_blocking=True)


def _block_sizes(head_dim: int, tile_elements: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_D): a power-of-two channel block up to 128 and the rows that fill the tile."""
    block_d = min(triton.next_power_of_2(head_dim), _MAX_BLOCK_D)
    return max(1, tile_elements // block_d), block_d


class _MSDeformAttnFunction(torch.autograd.Function):
    """Autograd wrapper of the two kernels; the inputs are contiguous and already checked."""

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        value: torch.Tensor,
        meta: torch.Tensor,
        sampling_locations: torch.Tensor,
        attention_weights: torch.Tensor,
    ) -> torch.Tensor:
        """value (B, S, H, D), meta int32 (L, 3), locations (B, Q, H, L, P, 2), weights (B, Q, H, L, P)
        -> (B, Q, H * D) in value's dtype."""
        batch, seq_len, num_heads, head_dim = value.shape
        _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
        num_rows = batch * num_queries * num_heads
        out = torch.empty(batch, num_queries, num_heads * head_dim, dtype=value.dtype, device=value.device)
        block_r, block_d = _block_sizes(head_dim, _FWD_TILE_ELEMENTS)
        grid = (triton.cdiv(num_rows, block_r), triton.cdiv(head_dim, block_d))
        if num_rows:
            _ms_deform_attn_fwd_kernel[grid](
                value,
                meta,
                sampling_locations,
                attention_weights,
                out,
                num_rows,
                num_queries * num_heads,
                num_heads,
                seq_len,
                head_dim,
                NUM_LEVELS=num_levels,
                NUM_POINTS=num_points,
                BLOCK_R=block_r,
                BLOCK_D=block_d,
                num_warps=_NUM_WARPS,
            )
        ctx.save_for_backward(value, meta, sampling_locations, attention_weights)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """grad_output (B, Q, H * D) -> gradients of value, (none for meta), locations and weights."""
        value, meta, sampling_locations, attention_weights = ctx.saved_tensors
        batch, seq_len, num_heads, head_dim = value.shape
        _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
        num_rows = batch * num_queries * num_heads
        grad_output = grad_output.contiguous()
        grad_value = torch.zeros(value.shape, dtype=torch.float32, device=value.device)
        grad_loc = torch.empty_like(sampling_locations)
        grad_attn = torch.empty_like(attention_weights)
        block_r, block_d = _block_sizes(head_dim, _BWD_TILE_ELEMENTS)
        if num_rows:
            _ms_deform_attn_bwd_kernel[(triton.cdiv(num_rows, block_r),)](
                value,
                meta,
                sampling_locations,
                attention_weights,
                grad_output,
                grad_value,
                grad_loc,
                grad_attn,
                num_rows,
                num_queries * num_heads,
                num_heads,
                seq_len,
                head_dim,
                NUM_LEVELS=num_levels,
                NUM_POINTS=num_points,
                BLOCK_R=block_r,
                BLOCK_D=block_d,
                num_warps=_NUM_WARPS,
            )
        needs = ctx.needs_input_grad
        return (
            grad_value.to(value.dtype) if needs[0] else None,
            None,
            grad_loc if needs[2] else None,
            grad_attn if needs[3] else None,
        )


def ms_deform_attn_triton(
    value: torch.Tensor,
    spatial_shapes: Sequence[tuple[int, int]],
    level_start_index: Sequence[int],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """`ms_deform_attn_core` with the Triton kernels: same arguments, same result, differentiable.

    value:              (B, S, num_heads, head_dim), float32 / bfloat16 / float16, the levels flattened
    spatial_shapes:     (h, w) of each level, Python ints
    level_start_index:  offset of each level in S, Python ints
    sampling_locations: (B, Q, num_heads, num_levels, num_points, 2), (x, y) in [0, 1] of each level
    attention_weights:  (B, Q, num_heads, num_levels, num_points)
    returns:            (B, Q, num_heads * head_dim) in value's dtype (accumulated in float32)
    """
    if triton is None:
        raise RuntimeError(
            "ms_deform_attn_triton needs the `triton` package, which is not importable here; "
            "use the 'pytorch' implementation (ms_deform_attn_core) instead"
        )
    if value.device.type != "cuda" and not _interpreted():
        raise RuntimeError(
            f"ms_deform_attn_triton runs on CUDA tensors, got value on {value.device}; on the CPU set "
            "TRITON_INTERPRET=1 before importing densepred.necks.ms_deform_attn_triton (tests only: it is slow)"
        )
    spatial_shapes = tuple((int(h), int(w)) for h, w in spatial_shapes)
    level_start_index = tuple(int(s) for s in level_start_index)
    if value.dim() != 4 or sampling_locations.dim() != 6 or attention_weights.dim() != 5:
        raise ValueError(
            "expected value (B, S, heads, head_dim), sampling_locations (B, Q, heads, levels, points, 2) and "
            f"attention_weights (B, Q, heads, levels, points), got {tuple(value.shape)}, "
            f"{tuple(sampling_locations.shape)} and {tuple(attention_weights.shape)}"
        )
    batch, seq_len, num_heads, _ = value.shape
    num_levels, num_points = sampling_locations.shape[3:5]
    if (
        sampling_locations.shape[0] != batch
        or sampling_locations.shape[2] != num_heads
        or sampling_locations.shape[-1] != 2
        or attention_weights.shape != sampling_locations.shape[:-1]
    ):
        raise ValueError(
            f"inconsistent shapes: value {tuple(value.shape)}, sampling_locations "
            f"{tuple(sampling_locations.shape)}, attention_weights {tuple(attention_weights.shape)}"
        )
    if len(spatial_shapes) != num_levels or len(level_start_index) != num_levels:
        raise ValueError(
            f"{num_levels} levels in sampling_locations but spatial_shapes={list(spatial_shapes)} and "
            f"level_start_index={list(level_start_index)}"
        )
    if sum(h * w for h, w in spatial_shapes) != seq_len or any(
        start + h * w > seq_len for (h, w), start in zip(spatial_shapes, level_start_index, strict=True)
    ):
        raise ValueError(
            f"spatial_shapes={list(spatial_shapes)} / level_start_index={list(level_start_index)} do not fit "
            f"the value length {seq_len}"
        )
    meta = _level_meta(spatial_shapes, level_start_index, value.device)
    return _MSDeformAttnFunction.apply(
        value.contiguous(), meta, sampling_locations.contiguous(), attention_weights.contiguous()
    )
