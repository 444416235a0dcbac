"""Multi-scale deformable attention sampled with `embedding_bag`: the fast core on CPU.

The reference `ms_deform_attn_core` samples every level with `grid_sample` and then stacks, weights and sums
the samples, which materialises a (B * heads, head_dim, Q, levels * points) tensor and spends most of its
backward in `grid_sample`'s gradient. Here the bilinear interpolation and the attention-weighted sum are one
sparse product: each (batch, query, head) output row is a weighted sum of `levels * points * 4` rows of the
value table (four bilinear corners per sampling point, corner weight times attention weight), which
`F.embedding_bag(mode="sum", per_sample_weights=...)` computes without materialising the samples.

Each level is padded with one zero pixel on every side, so the four corners of any point within one pixel
of the map are real rows of the table and only a point whose corners all fall outside needs a mask. The
whole product is one `torch.autograd.Function` with a hand-written backward that keeps only its inputs (the
table, the sampling locations, the attention weights) and recomputes the corner rows and weights, cheap
elementwise work, instead of saving them (four times the locations' size, int64 rows included: about 30 MB
per encoder layer of a 384x384 pair of images). The value gradient is the transposed product: the points are
sorted once by their top-left corner's row, which orders the rows of all four corners at once, and four more
`embedding_bag` calls sum the weighted output gradients into the rows. Same values and gradients as the
reference up to float rounding (tests/test_ms_deform_attn.py).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import torch.nn.functional as F

# Offsets of the four bilinear corners in a padded level of width w + 2: (y0, x0), (y0, x0 + 1),
# (y0 + 1, x0), (y0 + 1, x0 + 1), as multiples of (row stride, 1).
_CORNERS = ((0, 0), (0, 1), (1, 0), (1, 1))


def _corners(
    locations: torch.Tensor, sizes: torch.Tensor, layout: torch.Tensor, block: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bilinear corners of every sampling point.

    locations (B, Q, heads, L, P, 2) as (x, y) in [0, 1]; sizes (4, L, P) as (w, h, w - 1, h - 1) of each
    level; layout (2, L, P) as (first table row of the level's block, padded width); block (B, 1, heads, 1, 1),
    the first table row of each (image, head) -> rows (B, Q, heads, L, P, 4) of the four corners in `_CORNERS`
    order (int32 when the table allows), fx, fy (B, Q, heads, L, P) the fractional offsets in [0, 1), and
    `inside`, False for a point whose four corners all fall in the zero padding. The per-level constants are
    given for every point (L, P), contiguous: broadcast over the last dimension only, an elementwise op runs
    ~8x faster than with (L, 1) constants (its inner loop would be P elements long).
    """
    width, height, last_column, last_row = sizes.unbind(0)
    # x and y apart, so that every tensor below is contiguous
    x = locations[..., 0] * width - 0.5  # pixel coordinates
    y = locations[..., 1] * height - 0.5
    x0, y0 = x.floor(), y.floor()
    fx, fy = x - x0, y - y0
    # a point whose top-left corner is outside [-1, w-1] x [-1, h-1] has all four corners in the zeros
    inside = (x0 >= -1) & (x0 <= last_column) & (y0 >= -1) & (y0 <= last_row)
    column = x0.clamp(min=-1).minimum(last_column).to(block.dtype)
    row = y0.clamp(min=-1).minimum(last_row).to(block.dtype)
    start, stride = layout.unbind(0)
    top_left = block + (start + stride + 1) + row * stride + column  # (row + 1, column + 1) padded
    rows = torch.stack([top_left, top_left + 1, top_left + stride, top_left + stride + 1], -1)
    return rows, fx, fy, inside


def _corner_weights(fx: torch.Tensor, fy: torch.Tensor, point: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The bilinear corner weights (1-fy)(1-fx), (1-fy)fx, fy(1-fx), fy fx, each times `point`, in `_CORNERS`
    order (each of fx's shape)."""
    top, bottom = (1 - fy) * point, fy * point
    return top * (1 - fx), top * fx, bottom * (1 - fx), bottom * fx


class _DeformableBag(torch.autograd.Function):
    """out[n] = sum over the points k of bag n and their corners c of weight[n, k, c] * table[row[n, k, c]].

    table (R, D); locations (B, Q, heads, L, P, 2); attention (B, Q, heads, L, P); sizes, layout, block as in
    `_corners` -> (B * Q * heads, D).
    """

    @staticmethod
    def forward(ctx, table, locations, attention, sizes, layout, block):
        ctx.save_for_backward(table, locations, attention, sizes, layout, block)
        rows, fx, fy, inside = _corners(locations, sizes, layout, block)
        weights = torch.stack(_corner_weights(fx, fy, attention * inside), -1).to(table.dtype)
        bags = rows.shape[0] * rows.shape[1] * rows.shape[2]
        return F.embedding_bag(rows.view(bags, -1), table, per_sample_weights=weights.view(bags, -1), mode="sum")

    @staticmethod
    def backward(ctx, grad):
        table, locations, attention, sizes, layout, block = ctx.saved_tensors
        rows, fx, fy, inside = _corners(locations, sizes, layout, block)
        point = attention * inside
        grad = grad.contiguous()
        num_bags = grad.shape[0]
        grad_table = grad_locations = grad_attention = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            # d out[n] / d weight[n, k, c] = table[row[n, k, c]]: the dot products by embedding_bag's own backward
            # op (called directly: autograd.grad inside a backward would stop torch.compile's tracing)
            per_bag = rows.numel() // num_bags
            flat_rows = rows.flatten()
            bag_of_sample = torch.arange(num_bags, device=grad.device, dtype=flat_rows.dtype)
            bag_of_sample = bag_of_sample[:, None].expand(-1, per_bag).flatten()
            offsets = torch.arange(0, num_bags * per_bag, per_bag, device=grad.device, dtype=flat_rows.dtype)
            g00, g01, g10, g11 = (
                torch.ops.aten._embedding_bag_per_sample_weights_backward(
                    grad, table, flat_rows, offsets, bag_of_sample, 0
                )
                .view_as(rows)
                .to(locations.dtype)
                .unbind(-1)
            )
            top = (1 - fx) * g00 + fx * g01  # d/d(top row weight)
            bottom = (1 - fx) * g10 + fx * g11
            grad_fx = point * ((1 - fy) * (g01 - g00) + fy * (g11 - g10))
            grad_fy = point * (bottom - top)
            grad_locations = torch.stack([grad_fx * sizes[0], grad_fy * sizes[1]], -1)
            grad_attention = ((1 - fy) * top + fy * bottom) * inside
        if ctx.needs_input_grad[0]:
            num_points = rows.numel() // (4 * num_bags)
            top_left = rows[..., 0].flatten()
            order = top_left.argsort()  # one sort for all four corners
            bags = order // num_points  # output row of each sorted point
            # the sorted corners' rows from the sorted top-left ones and their level's row stride: 1-d gathers
            # (gathering the (points, 4) rows and transposing them costs ~3x more); each is non-decreasing
            top_left = top_left.index_select(0, order)
            stride = layout[1].expand(rows.shape[:-1]).flatten().index_select(0, order)
            shifts = (0, 1, stride, stride + 1)
            table_rows = torch.arange(table.shape[0], device=table.device, dtype=rows.dtype)
            grad_table = torch.zeros_like(table)
            for shift, weights in zip(shifts, _corner_weights(fx, fy, point), strict=True):
                corner_rows = top_left + shift
                corner_weights = weights.flatten().index_select(0, order).to(table.dtype)
                offsets = torch.searchsorted(corner_rows, table_rows)  # first point of each row (static shape)
                grad_table += F.embedding_bag(bags, grad, offsets, per_sample_weights=corner_weights, mode="sum")
        return grad_table, grad_locations, grad_attention, None, None, None


def ms_deform_attn_bag(
    value: torch.Tensor,
    spatial_shapes: Sequence[tuple[int, int]],
    level_start_index: Sequence[int],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """`ms_deform_attn_core` computed as one sparse product (same arguments, same result).

    value (B, S, heads, d); sampling_locations (B, Q, heads, levels, points, 2) as (x, y) in [0, 1];
    attention_weights (B, Q, heads, levels, points) -> (B, Q, heads * d).
    """
    batch, _, num_heads, head_dim = value.shape
    num_queries, num_levels = sampling_locations.shape[1], sampling_locations.shape[3]
    padded_sizes = [(h + 2) * (w + 2) for h, w in spatial_shapes]
    padded_length = sum(padded_sizes)

    # The table: every level padded by one zero pixel, (B, heads, S_padded, d) -> rows (B * heads * S_padded, d)
    levels = []
    per_level = value.split([h * w for h, w in spatial_shapes], dim=1)
    for level, (height, width) in zip(per_level, spatial_shapes, strict=True):
        level = level.view(batch, height, width, num_heads, head_dim).permute(0, 3, 1, 2, 4)
        levels.append(F.pad(level, (0, 0, 1, 1, 1, 1)).flatten(2, 3))
    table = torch.cat(levels, dim=2).reshape(batch * num_heads * padded_length, head_dim)

    # Per-level constants for every (level, point), broadcast over (B, Q, heads): built on the host and copied
    # with non_blocking=True, an asynchronous copy (not a synchronisation); int32 rows when the table allows
    device = value.device
    index_dtype = torch.int32 if table.shape[0] < 2**31 else torch.int64
    num_points = sampling_locations.shape[4]
    starts = [0, *itertools.accumulate(padded_sizes)][:-1]
    sizes = torch.tensor([(w, h, w - 1, h - 1) for h, w in spatial_shapes], dtype=sampling_locations.dtype)
    sizes = sizes.t()[:, :, None].expand(4, num_levels, num_points).contiguous()
    sizes = sizes.to(device, non_blocking=True)
    layout = torch.tensor([(start, w + 2) for (h, w), start in zip(spatial_shapes, starts, strict=True)])
    layout = layout.t()[:, :, None].expand(2, num_levels, num_points).contiguous()
    layout = layout.to(device, index_dtype, non_blocking=True)
    block = torch.arange(batch * num_heads, device=device, dtype=index_dtype) * padded_length
    block = block.view(batch, 1, num_heads, 1, 1)
    output = _DeformableBag.apply(table, sampling_locations, attention_weights, sizes, layout, block)
    return output.view(batch, num_queries, num_heads * head_dim)
