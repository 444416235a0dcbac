"""Multi-scale deformable attention (Deformable DETR), as used by the Mask2Former pixel decoder.

Each query looks at `num_points` learned sampling locations around its reference point on each of
`num_levels` feature maps, per head, and takes a softmax-weighted sum of the bilinearly sampled values.

The sampling itself is a pure function behind a small dispatch point, chosen by name per module:
- "pytorch": `ms_deform_attn_core` (`grid_sample`), the reference;
- "embedding_bag": `ms_deform_attn_bag`, the same values as one sparse product, several times leaner;
- "triton": the fused Triton kernels (`ms_deform_attn_triton`, CUDA tensors);
- "gather": `ms_deform_attn_gather`, bilinear sampling written as gathers, the portable core of exported graphs
  (ONNX, torch.export: no grid_sample, no embedding_bag, symbolic level sizes);
- "auto" (the default): "gather" while exporting (`torch.compiler.is_exporting()`, or an ONNX export), else
  "triton" on CUDA when Triton is installed, else "embedding_bag".
More (e.g. the CUDA op of the original code) can be added with `register_ms_deform_attn_implementation`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from densepred.necks.ms_deform_attn_bag import ms_deform_attn_bag
from densepred.necks.ms_deform_attn_gather import ms_deform_attn_gather
from densepred.utils.recompute import linear_of_sum

MSDeformAttnFn = Callable[
    [torch.Tensor, Sequence[tuple[int, int]], Sequence[int], torch.Tensor, torch.Tensor], torch.Tensor
]


def ms_deform_attn_core(
    value: torch.Tensor,
    spatial_shapes: Sequence[tuple[int, int]],
    level_start_index: Sequence[int],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Sample every level bilinearly (zero padding outside) and take the weighted sum over levels and points.

    value:              (B, S, num_heads, head_dim), the levels flattened one after the other (S = sum h*w)
    spatial_shapes:     (h, w) of each level, Python ints
    level_start_index:  offset of each level in S (the layout CUDA kernels take; here implied by the shapes)
    sampling_locations: (B, Q, num_heads, num_levels, num_points, 2), (x, y) in [0, 1] of each level
    attention_weights:  (B, Q, num_heads, num_levels, num_points), summing to 1 over levels and points
    returns:            (B, Q, num_heads * head_dim)
    """
    batch, _, num_heads, head_dim = value.shape
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    values = value.split([h * w for h, w in spatial_shapes], dim=1)
    grids = 2 * sampling_locations - 1  # grid_sample's [-1, 1] coordinates, align_corners=False
    sampled = []
    for level, (height, width) in enumerate(spatial_shapes):
        # (B, h*w, heads, d) -> (B*heads, d, h, w)
        level_value = values[level].permute(0, 2, 3, 1).reshape(batch * num_heads, head_dim, height, width)
        # (B, Q, heads, P, 2) -> (B*heads, Q, P, 2)
        level_grid = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        sampled.append(
            F.grid_sample(level_value, level_grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        )  # (B*heads, d, Q, P)
    # (B*heads, d, Q, L*P) weighted by (B*heads, 1, Q, L*P)
    weights = attention_weights.transpose(1, 2).reshape(batch * num_heads, 1, num_queries, num_levels * num_points)
    output = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1)
    return output.view(batch, num_heads * head_dim, num_queries).transpose(1, 2)


_IMPLEMENTATIONS: dict[str, MSDeformAttnFn] = {
    "pytorch": ms_deform_attn_core,
    "embedding_bag": ms_deform_attn_bag,
    "gather": ms_deform_attn_gather,
}


def register_ms_deform_attn_implementation(name: str, fn: MSDeformAttnFn) -> None:
    """Make `fn` (same signature and result as `ms_deform_attn_core`) selectable as `implementation=name`."""
    _IMPLEMENTATIONS[name] = fn


def _register_triton() -> bool:
    """Register the Triton kernels as "triton" if Triton is installed; whether they are available."""
    if "triton" not in _IMPLEMENTATIONS:
        from densepred.necks import ms_deform_attn_triton

        if not ms_deform_attn_triton.triton_available():
            return False
        register_ms_deform_attn_implementation("triton", ms_deform_attn_triton.ms_deform_attn_triton)
    return True


def get_ms_deform_attn_implementation(name: str) -> MSDeformAttnFn:
    """The registered sampling function called `name` ("pytorch", "embedding_bag", "gather" are always there)."""
    if name == "triton":
        _register_triton()
    if name not in _IMPLEMENTATIONS:
        raise ValueError(
            f"unknown multi-scale deformable attention implementation {name!r}; registered: "
            f"{sorted(['auto', *_IMPLEMENTATIONS])} (add one with register_ms_deform_attn_implementation)"
        )
    return _IMPLEMENTATIONS[name]


def exporting() -> bool:
    """Whether the model is being traced for export (torch.export, or torch.onnx's TorchScript exporter)."""
    return torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export()


def resolve_ms_deform_attn_implementation(name: str, device: torch.device) -> MSDeformAttnFn:
    """`name`'s function, "auto" meaning the fastest one for `device` (see the module docstring)."""
    if name != "auto":
        return get_ms_deform_attn_implementation(name)
    if exporting():
        return ms_deform_attn_gather
    if device.type == "cuda" and _register_triton():
        return _IMPLEMENTATIONS["triton"]
    return ms_deform_attn_bag


def level_normalizer(spatial_shapes: Sequence[tuple[int, int]], like: torch.Tensor) -> torch.Tensor:
    """(w, h) of every level as a (num_levels, 2) tensor of `like`'s dtype and device.

    Built on the host and copied with non_blocking=True: an asynchronous host-to-device copy, not a
    synchronisation (a device tensor from a Python list would block until the device is idle). While
    exporting, the sizes may be symbolic: they scale a tensor of ones instead (`torch.tensor` would fix them).
    """
    if exporting():
        one = like.new_ones(())
        return torch.stack([torch.stack([one * w, one * h]) for h, w in spatial_shapes])
    shapes = torch.tensor([(w, h) for h, w in spatial_shapes], dtype=like.dtype)
    return shapes.to(like.device, non_blocking=True)


def flatten_levels(maps: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[tuple[int, int]], list[int]]:
    """Maps (B, C, h_l, w_l) -> what `MSDeformAttn` reads as its value: the levels flattened one after the other
    (B, S, C), the (h, w) of each level and the offset of each in S."""
    shapes = [(m.shape[2], m.shape[3]) for m in maps]
    starts = [0]
    for height, width in shapes[:-1]:
        starts.append(starts[-1] + height * width)
    return torch.cat([m.flatten(2).transpose(1, 2) for m in maps], 1), shapes, starts


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention with 2-d reference points (Deformable DETR's `MSDeformAttn`)."""

    def __init__(
        self,
        embed_dim: int = 256,
        num_levels: int = 3,
        num_heads: int = 8,
        num_points: int = 4,
        implementation: str = "auto",
    ) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} must be divisible by num_heads={num_heads}")
        self.embed_dim = embed_dim
        self.num_levels = num_levels
        self.num_heads = num_heads
        self.num_points = num_points
        self.implementation = implementation
        if implementation != "auto":
            get_ms_deform_attn_implementation(implementation)  # unknown names fail at construction
        self.sampling_offsets = nn.Linear(embed_dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(embed_dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(embed_dim, embed_dim)
        self.output_proj = nn.Linear(embed_dim, embed_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Deformable DETR's initialisation: head h starts sampling along direction 2*pi*h/num_heads."""
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(self.num_heads, 1, 1, 2)
        grid = grid.repeat(1, self.num_levels, self.num_points, 1)
        grid = grid * torch.arange(1, self.num_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_levels={self.num_levels}, num_heads={self.num_heads}, "
            f"num_points={self.num_points}, implementation={self.implementation!r}"
        )

    @staticmethod
    def _project(linear: nn.Linear, query: torch.Tensor, query_pos: torch.Tensor | None) -> torch.Tensor:
        """linear(query + query_pos), autograd keeping query and query_pos (kept anyway) instead of their sum."""
        if query_pos is None:
            return linear(query)
        return linear_of_sum(query, query_pos, linear.weight, linear.bias)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        value: torch.Tensor,
        spatial_shapes: Sequence[tuple[int, int]],
        level_start_index: Sequence[int],
        query_pos: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """query (B, Q, C) (plus `query_pos`, its position embedding, when given), reference_points
        (B, Q, num_levels or 1, 2) as (x, y) in [0, 1], or (..., 4) boxes (cx, cy, w, h) whose offsets scale
        with the box (Deformable DETR's refined / two-stage references), value (B, S, C) the flattened levels
        of `spatial_shapes` -> (B, Q, C)."""
        batch, num_queries, _ = query.shape
        heads, levels, points = self.num_heads, self.num_levels, self.num_points
        if len(spatial_shapes) != levels or value.shape[1] != sum(h * w for h, w in spatial_shapes):
            raise ValueError(
                f"MSDeformAttn expects {levels} levels whose sizes add up to the value length {value.shape[1]}, "
                f"got spatial_shapes={list(spatial_shapes)}"
            )
        value = self.value_proj(value).view(batch, -1, heads, self.embed_dim // heads)
        offsets = self._project(self.sampling_offsets, query, query_pos)
        offsets = offsets.view(batch, num_queries, heads, levels, points, 2)
        weights = self._project(self.attention_weights, query, query_pos)
        weights = weights.view(batch, num_queries, heads, levels * points)
        weights = weights.softmax(-1).view(batch, num_queries, heads, levels, points)
        # references and level sizes given for every (level, point), so that the elementwise ops below broadcast
        # over the heads only, an outer dimension (with (levels, 1) operands their inner loop is `points` long:
        # ~10x slower on CPU)
        references = reference_points[:, :, None, :, None, :].expand(-1, -1, -1, levels, points, -1)
        if reference_points.shape[-1] == 4:  # boxes: offsets in units of half the box size / num_points
            centers, sizes = references[..., :2].contiguous(), references[..., 2:].contiguous()
            locations = centers + offsets / points * sizes * 0.5
        else:  # offsets are in pixels of each level: normalise by that level's (w, h)
            normalizer = level_normalizer(spatial_shapes, offsets)[:, None, :].expand(-1, points, -1).contiguous()
            locations = references.contiguous() + offsets / normalizer
        sample = resolve_ms_deform_attn_implementation(self.implementation, value.device)
        output = sample(value, spatial_shapes, level_start_index, locations, weights)
        return self.output_proj(output)
