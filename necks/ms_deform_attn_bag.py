"""Multi-scale deformable attention sampled with `embedding_bag`: the fast core on CPU.

The reference `ms_deform_attn_core` samples every level with `grid_sample` and then stacks, weights and sums
the samples, which materialises a (B * heads, head_dim, Q, levels * points) tensor and spends most of its
backward in `grid_sample`'s gradient. Here the bilinear interpolation and the attention-weighted sum are one
sparse product: each (batch, query, head) output row is a weighted sum of `levels * points * 4` rows of the
value table (four bilinear corners per sampling point, corner weight times attention weight), which
`F.embedding_bag(mode="sum", per_sample_weights=...)` computes without materialising the samples.

Each level is padded with one zero pixel on every side, so the four corners of any point within one pixel
of the map are real rows of the table and only a point whose corners all fall outside needs a mask. Its
backward (a hand-written `torch.autograd.Function`) gives the value gradient as the transposed product: the
points are sorted once by their top-left corner's row, which orders the rows of all four corners at once, and
four more `embedding_bag` calls sum the weighted output gradients into the rows. Same values and gradients as
the reference up to float rounding (tests/test_ms_deform_attn.py).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import torch.nn.functional as F

# Offsets of the four bilinear corners in a padded level of width w + 2: (y0, x0), (y0, x0 + 1),
# (y0 + 1, x0), (y0 + 1, x0 + 1), as multiples of (row stride, 1).
_CORNERS = ((0, 0), (0, 1), (1, 0), (1, 1))


class _CornerWeights(torch.autograd.Function):
    """Bilinear corner weights times the point weight, in `_CORNERS` order, with a hand-written backward.

    fx, fy (...,): fractional pixel offsets in [0, 1); point (...,): attention weight of the point ->
    (..., 4): (1-fy)(1-fx), (1-fy)fx, fy(1-fx), fy fx, each times `point` (autograd's broadcasting version
    spends its backward in reductions over the corner dimensions).
    """

    @staticmethod
    def forward(ctx, fx: torch.Tensor, fy: torch.Tensor, point: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(fx, fy, point)
        low_x, low_y = 1 - fx, 1 - fy
        top, bottom = low_y * point, fy * point
        return torch.stack([top * low_x, top * fx, bottom * low_x, bottom * fx], -1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        fx, fy, point = ctx.saved_tensors
        g00, g01, g10, g11 = grad.unbind(-1)
        low_x, low_y = 1 - fx, 1 - fy
        top = low_x * g00 + fx * g01  # d/d(top row weight)
        bottom = low_x * g10 + fx * g11
        grad_fx = point * (low_y * (g01 - g00) + fy * (g11 - g10))
        grad_fy = point * (bottom - top)
        grad_point = low_y * top + fy * bottom
        return grad_fx, grad_fy, grad_point


class _BagSum(torch.autograd.Function):
    """out[n] = sum_k weights[n, k] * table[rows[n, k]] with the transposed product as the table's gradient.

    table (R, D); rows (N, points, 4) int64, the table rows of each point's four corners (`_CORNERS` order)
    such that sorting the points by their top-left row orders the rows of every corner (one padded block per
    level, see the module docstring); weights (N, points, 4). Returns (N, D).
    """

    @staticmethod
    def forward(ctx, table: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(table, rows, weights)
        return F.embedding_bag(rows.flatten(1), table, per_sample_weights=weights.flatten(1), mode="sum")

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, torch.Tensor | None]:
        table, rows, weights = ctx.saved_tensors
        grad = grad.contiguous()
        grad_table = grad_weights = None
        if ctx.needs_input_grad[2]:
            # d out[n] / d weights[n, k] = table[rows[n, k]]: the dot products by embedding_bag's own backward op
            # (called directly: autograd.grad inside a backward would stop torch.compile's tracing)
            num_bags, per_bag = rows.shape[0], rows.shape[1] * rows.shape[2]
            bag_of_sample = torch.arange(num_bags, device=rows.device)[:, None].expand(-1, per_bag).flatten()
            offsets = torch.arange(0, num_bags * per_bag, per_bag, device=rows.device)
            grad_weights = torch.ops.aten._embedding_bag_per_sample_weights_backward(
                grad, table, rows.flatten(), offsets, bag_of_sample, 0
            ).view_as(weights)
        if ctx.needs_input_grad[0]:
            num_points = rows.shape[1]
            order = rows[..., 0].flatten().argsort()  # one sort for all four corners
            bags = order // num_points  # output row of each sorted point
            sorted_rows = rows.view(-1, 4).index_select(0, order).t().contiguous()  # (4, points) non-decreasing
            sorted_weights = weights.view(-1, 4).index_select(0, order).t().contiguous()
            table_rows = torch.arange(table.shape[0], device=table.device)
            grad_table = torch.zeros_like(table)
            for corner_rows, corner_weights in zip(sorted_rows, sorted_weights, strict=True):
                offsets = torch.searchsorted(corner_rows, table_rows)  # first point of each row (static shape)
                grad_table += F.embedding_bag(bags, grad, offsets, per_sample_weights=corner_weights, mode="sum")
        return grad_table, None, grad_weights


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
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    padded_sizes = [(h + 2) * (w + 2) for h, w in spatial_shapes]
    padded_length = sum(padded_sizes)

    # The table: every level padded by one zero pixel, (B, heads, S_padded, d) -> rows (B * heads * S_padded, d)
    levels = []
    per_level = value.split([h * w for h, w in spatial_shapes], dim=1)
    for level, (height, width) in zip(per_level, spatial_shapes, strict=True):
        level = level.view(batch, height, width, num_heads, head_dim).permute(0, 3, 1, 2, 4)
        levels.append(F.pad(level, (0, 0, 1, 1, 1, 1)).flatten(2, 3))
    table = torch.cat(levels, dim=2).reshape(batch * num_heads * padded_length, head_dim)

    # Per-level constants, broadcast over (B, Q, heads, levels, points): built on the host and copied with
    # non_blocking=True, an asynchronous copy (not a synchronisation)
    device = value.device
    starts = [0, *itertools.accumulate(padded_sizes)][:-1]
    sizes = torch.tensor([(w, h, w - 1, h - 1) for h, w in spatial_shapes], dtype=sampling_locations.dtype)
    sizes = sizes.to(device, non_blocking=True).view(num_levels, 1, 4)
    layout = torch.tensor([(start, w + 2) for (h, w), start in zip(spatial_shapes, starts, strict=True)])
    layout = layout.to(device, non_blocking=True).view(num_levels, 1, 2)
    block = torch.arange(batch * num_heads, device=device).view(batch, 1, num_heads, 1, 1) * padded_length

    pixels = sampling_locations * sizes[..., :2] - 0.5  # (x, y) pixel coordinates, (B, Q, heads, L, P, 2)
    corner = pixels.detach().floor()
    frac = pixels - corner
    # a point whose top-left corner is outside [-1, w-1] x [-1, h-1] has all four corners in the zeros
    inside = ((corner >= -1) & (corner <= sizes[..., 2:])).all(-1)
    column, row = (corner.clamp(min=-1).minimum(sizes[..., 2:]).long() + 1).unbind(-1)
    stride = layout[..., 1]
    top_left = block + layout[..., 0] + row * stride + column  # (B, Q, heads, L, P)
    corner_offsets = torch.stack([torch.zeros_like(stride), torch.ones_like(stride), stride, stride + 1], -1)
    rows = top_left[..., None] + corner_offsets  # (B, Q, heads, L, P, 4) in `_CORNERS` order
    fx, fy = frac.unbind(-1)
    weights = _CornerWeights.apply(fx, fy, attention_weights * inside)  # (B, Q, heads, L, P, 4)
    # bags (B * Q * heads, levels * points, 4)
    rows = rows.view(batch * num_queries * num_heads, num_levels * num_points, 4)
    weights = weights.view(batch * num_queries * num_heads, num_levels * num_points, 4)
    output = _BagSum.apply(table, rows, weights.to(table.dtype))
    return output.view(batch, num_queries, num_heads * head_dim)
