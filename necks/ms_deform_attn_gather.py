"""Multi-scale deformable attention sampled by gathers: the portable core, for exported graphs.

`ms_deform_attn_core` samples with `grid_sample`, `ms_deform_attn_bag` with `embedding_bag` and a hand-written
backward, the Triton core with custom kernels: none of them is an operator every runtime has (ONNX opsets
before 16 have no GridSample, and its 5-d / dynamic-shape support varies between runtimes). Here the
bilinear interpolation is written out with the operators every exporter and runtime knows: per level and
per bilinear corner, the value rows of the corner pixels are gathered (`torch.gather`, ONNX GatherElements)
and weighted by corner weight x attention weight; a corner outside the map gets weight 0, which is
`grid_sample`'s `padding_mode="zeros"` with `align_corners=False`. The level sizes may be symbolic (an
exported graph with dynamic image sizes): they enter only as scalars of the arithmetic, never as Python
tensor constants. Same values and gradients as the reference up to float rounding
(tests/test_ms_deform_attn_gather.py); slower than the other cores, it is what "auto" takes while exporting.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# The four bilinear corners as (dy, dx) offsets from the top-left one.
_CORNERS = ((0, 0), (0, 1), (1, 0), (1, 1))


def ms_deform_attn_gather(
    value: torch.Tensor,
    spatial_shapes: Sequence[tuple[int, int]],
    level_start_index: Sequence[int],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """`ms_deform_attn_core` by gathers (same arguments, same result).

    value (B, S, heads, d); spatial_shapes (h, w) per level (ints, symbolic while exporting);
    sampling_locations (B, Q, heads, levels, points, 2) as (x, y) in [0, 1]; attention_weights
    (B, Q, heads, levels, points) -> (B, Q, heads * d).
    """
    batch, _, num_heads, head_dim = value.shape
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    # (B, S, heads, d) -> (B * heads, S, d); locations and weights -> (B * heads, levels, Q * points, ...)
    table = value.permute(0, 2, 1, 3).flatten(0, 1)
    locations = sampling_locations.permute(0, 2, 3, 1, 4, 5).reshape(batch * num_heads, num_levels, -1, 2)
    weights = attention_weights.permute(0, 2, 3, 1, 4).reshape(batch * num_heads, num_levels, -1)
    output = table.new_zeros(batch * num_heads, num_queries * num_points, head_dim)
    start = 0
    for level, (height, width) in enumerate(spatial_shapes):
        level_table = table[:, start : start + height * width]  # (B * heads, h * w, d)
        start = start + height * width
        # pixel coordinates of align_corners=False: pixel centres at integer + 1/2
        x = locations[:, level, :, 0] * width - 0.5
        y = locations[:, level, :, 1] * height - 0.5
        x0, y0 = x.floor(), y.floor()
        fx, fy = x - x0, y - y0
        bilinear = ((1 - fy) * (1 - fx), (1 - fy) * fx, fy * (1 - fx), fy * fx)
        for (dy, dx), corner_weight in zip(_CORNERS, bilinear, strict=True):
            cx, cy = x0 + dx, y0 + dy
            inside = (cx >= 0) & (cx <= width - 1) & (cy >= 0) & (cy <= height - 1)
            index = (cy.clamp(0, height - 1) * width + cx.clamp(0, width - 1)).long()  # (B * heads, Q * P)
            rows = level_table.gather(1, index[..., None].expand(-1, -1, head_dim))  # (B * heads, Q * P, d)
            weight = corner_weight * weights[:, level] * inside.to(corner_weight.dtype)
            output = output + rows * weight[..., None]
    # sum over points: (B * heads, Q, P, d) -> (B, heads, Q, d) -> (B, Q, heads * d)
    output = output.view(batch * num_heads, num_queries, num_points, head_dim).sum(2)
    return output.view(batch, num_heads, num_queries, head_dim).permute(0, 2, 1, 3).reshape(batch, num_queries, -1)
