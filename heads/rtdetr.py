"""RT-DETR's decoder head (v1; transformers' `RTDetrForObjectDetection` after the hybrid encoder).

The neck's maps (fine to coarse; extra coarser levels from 3x3 stride-2 convs) are projected to `hidden_dim`
(1x1 conv + BN) and flattened into the memory. IoU-aware query selection: an encoder head scores every memory
position and regresses a box relative to an anchor (a grid cell's centre, size `anchor_grid_size * 2**level`;
positions near the border masked out); the `num_queries` best-scoring positions give the initial queries
(their memory features, detached) and reference boxes. Each decoder layer (self-attention, deformable
cross-attention around the reference box, FFN; post-norm) is followed by its own class and box heads, the box
refined from the previous (detached) reference: iterative box refinement. In training, contrastive
denoising queries built from the targets run alongside (`heads/denoising.py`), split off in the output.

Output (a plain dict): "pred_logits" (B, Q, K) sigmoid logits, "pred_boxes" (B, Q, 4) (cx, cy, w, h) in [0, 1]
of the padded input, "aux_outputs" (earlier layers, first to last), "enc_outputs" (the selected queries'
encoder-head logits and boxes), and in training with targets "dn_outputs" (every layer, first to last) and
"dn_meta" (transformers' `denoising_meta_values`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from densepred.heads.box_ops import inverse_sigmoid, level_anchor_boxes
from densepred.heads.denoising import contrastive_denoising_group
from densepred.layers import MLP, NeckOutput, multi_head_attention
from densepred.necks.ms_deform_attn import MSDeformAttn, flatten_levels

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


class RTDetrDecoderLayer(nn.Module):
    """Self-attention (query position added to queries and keys), deformable cross-attention around 4-d
    reference boxes, FFN; post-norm. (B, Q, C) -> (B, Q, C)."""

    def __init__(
        self,
        hidden_dim: int = 256,
        num_heads: int = 8,
        dim_feedforward: int = 1024,
        dropout: float = 0.0,
        activation: str = "relu",
        num_levels: int = 3,
        num_points: int = 4,
        layer_norm_eps: float = 1e-5,
        implementation: str = "auto",
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"head.activation={activation!r} is not supported; choose one of {list(ACTIVATIONS)}")
        self.self_attn = nn.MultiheadAttention(hidden_dim, num_heads, dropout=dropout, batch_first=True)
        self.norm1 = nn.LayerNorm(hidden_dim, eps=layer_norm_eps)
        self.cross_attn = MSDeformAttn(hidden_dim, num_levels, num_heads, num_points, implementation)
        self.norm2 = nn.LayerNorm(hidden_dim, eps=layer_norm_eps)
        self.linear1 = nn.Linear(hidden_dim, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, hidden_dim)
        self.norm3 = nn.LayerNorm(hidden_dim, eps=layer_norm_eps)
        self.activation = ACTIVATIONS[activation]()
        self.dropout = nn.Dropout(dropout)

    def forward(
        self,
        queries: torch.Tensor,
        query_pos: torch.Tensor,
        reference_boxes: torch.Tensor,
        memory: torch.Tensor,
        spatial_shapes: Sequence[tuple[int, int]],
        level_start_index: Sequence[int],
        attend: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """queries, query_pos (B, Q, C); reference_boxes (B, Q, 4) in [0, 1]; memory (B, S, C); attend bool
        (Q, Q) or None, True where a query may attend."""
        q = queries + query_pos
        mask = None if attend is None else attend[None, None]
        queries = self.norm1(queries + self.dropout(multi_head_attention(self.self_attn, q, q, queries, mask)))
        attended = self.cross_attn(
            queries, reference_boxes[:, :, None], memory, spatial_shapes, level_start_index, query_pos
        )
        queries = self.norm2(queries + self.dropout(attended))
        ffn = self.linear2(self.dropout(self.activation(self.linear1(queries))))
        return self.norm3(queries + self.dropout(ffn))


def anchors(
    spatial_shapes: Sequence[tuple[int, int]], grid_size: float, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Anchor boxes of every memory position as logits (1, S, 4), and which are valid (1, S, 1) bool: a cell's
    centre (x, y) / (w, h) of its level, size grid_size * 2**level; anchors with any coordinate outside
    (0.01, 0.99) are invalid, their logits the dtype's largest value."""
    boxes = level_anchor_boxes(spatial_shapes, grid_size, device, dtype)[None]
    eps = 1e-2
    valid = ((boxes > eps) & (boxes < 1 - eps)).all(-1, keepdim=True)
    logits = torch.log(boxes / (1 - boxes))
    return torch.where(valid, logits, torch.full((), torch.finfo(dtype).max, dtype=dtype, device=device)), valid


def _gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, S, C), index (B, Q) -> (B, Q, C)."""
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))


class RTDetrHead(nn.Module):
    """RT-DETR decoder with IoU-aware query selection and denoising training (see the module doc)."""

    def __init__(
        self,
        in_channels: int,
        mask_dim: int | None = None,
        num_classes: int = 80,
        hidden_dim: int = 256,
        num_queries: int = 300,
        num_layers: int = 6,
        num_heads: int = 8,
        num_points: int = 4,
        dim_feedforward: int = 1024,
        dropout: float = 0.0,
        activation: str = "relu",
        num_feature_levels: int = 3,
        num_input_levels: int | None = None,
        num_denoising: int = 100,
        label_noise_ratio: float = 0.5,
        box_noise_scale: float = 1.0,
        learn_initial_query: bool = False,
        anchor_grid_size: float = 0.05,
        prior_prob: float = 0.01,
        batch_norm_eps: float = 1e-5,
        layer_norm_eps: float = 1e-5,
        implementation: str = "auto",
    ) -> None:
        """`in_channels`: the neck's channels; `mask_dim`: unused (detection); `num_feature_levels`: decoder
        levels, of which `num_input_levels` (default all) are the neck's maps and the rest 3x3 stride-2 convs
        of the coarsest; `num_denoising`: denoising queries per image (0 disables them); `prior_prob`: the
        initial foreground probability of the class heads."""
        super().__init__()
        num_input_levels = num_feature_levels if num_input_levels is None else num_input_levels
        if not 0 < num_input_levels <= num_feature_levels:
            raise ValueError(
                f"head.num_input_levels={num_input_levels} must be in [1, num_feature_levels={num_feature_levels}]"
            )
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.num_input_levels = num_input_levels
        self.num_feature_levels = num_feature_levels
        self.num_denoising = num_denoising
        self.label_noise_ratio = label_noise_ratio
        self.box_noise_scale = box_noise_scale
        self.anchor_grid_size = anchor_grid_size
        self.prior_prob = prior_prob
        self.input_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(in_channels, hidden_dim, 1, bias=False), nn.BatchNorm2d(hidden_dim, batch_norm_eps))
            for _ in range(num_input_levels)
        )
        for i in range(num_feature_levels - num_input_levels):  # extra levels: 3x3 stride-2 convs
            channels = in_channels if i == 0 else hidden_dim
            self.input_proj.append(
                nn.Sequential(
                    nn.Conv2d(channels, hidden_dim, 3, 2, 1, bias=False), nn.BatchNorm2d(hidden_dim, batch_norm_eps)
                )
            )
        self.denoising_class_embed = (
            nn.Embedding(num_classes + 1, hidden_dim, padding_idx=num_classes) if num_denoising > 0 else None
        )
        self.query_embed = nn.Embedding(num_queries, hidden_dim) if learn_initial_query else None
        self.enc_output = nn.Sequential(nn.Linear(hidden_dim, hidden_dim), nn.LayerNorm(hidden_dim, eps=layer_norm_eps))
        self.enc_score_head = nn.Linear(hidden_dim, num_classes)
        self.enc_bbox_head = MLP(hidden_dim, hidden_dim, 4, 3)
        self.query_pos_head = MLP(4, 2 * hidden_dim, hidden_dim, 2)
        self.layers = nn.ModuleList(
            RTDetrDecoderLayer(
                hidden_dim,
                num_heads,
                dim_feedforward,
                dropout,
                activation,
                num_feature_levels,
                num_points,
                layer_norm_eps,
                implementation,
            )
            for _ in range(num_layers)
        )
        self.class_embed = nn.ModuleList(nn.Linear(hidden_dim, num_classes) for _ in range(num_layers))
        self.bbox_embed = nn.ModuleList(MLP(hidden_dim, hidden_dim, 4, 3) for _ in range(num_layers))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """RT-DETR's initialisation: class biases at the prior probability, last box layers zero, Xavier for the
        encoder output, the query position head and the learned queries."""
        bias = -math.log((1 - self.prior_prob) / self.prior_prob)
        for score, box in [
            (self.enc_score_head, self.enc_bbox_head),
            *zip(self.class_embed, self.bbox_embed, strict=True),
        ]:
            nn.init.constant_(score.bias, bias)
            nn.init.zeros_(box.layers[-1].weight)
            nn.init.zeros_(box.layers[-1].bias)
        nn.init.xavier_uniform_(self.enc_output[0].weight)
        for layer in self.query_pos_head.layers:
            nn.init.xavier_uniform_(layer.weight)
        if self.query_embed is not None:
            nn.init.xavier_uniform_(self.query_embed.weight)

    def repeated_blocks(self) -> list[nn.Module]:
        """The decoder layers, the units of activation checkpointing (`utils.checkpointing`)."""
        return list(self.layers)

    def memory(self, features: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[tuple[int, int]], list[int]]:
        """Neck maps (fine to coarse) -> memory (B, S, C), the (h, w) of each level and where each starts in S."""
        if len(features) != self.num_input_levels:
            raise ValueError(
                f"RTDetrHead expects {self.num_input_levels} maps from the neck (head.num_input_levels), got "
                f"{len(features)}; use a detection neck such as HybridEncoder with neck.num_levels="
                f"{self.num_input_levels}"
            )
        sources = [proj(x) for proj, x in zip(self.input_proj, features, strict=False)]  # the neck's levels
        for proj in self.input_proj[self.num_input_levels :]:  # extra levels, each from the one before
            sources.append(proj(sources[-1] if len(sources) > self.num_input_levels else features[-1]))
        return flatten_levels(sources)

    def predict(self, index: int, queries: torch.Tensor, reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `index`'s class logits (B, Q, K) and refined boxes (B, Q, 4) from its queries and the reference
        boxes (B, Q, 4) it attended around."""
        boxes = (self.bbox_embed[index](queries) + inverse_sigmoid(reference)).sigmoid()
        return self.class_embed[index](queries), boxes

    def forward(
        self, neck_output: NeckOutput, targets: Sequence[Mapping[str, torch.Tensor]] | None = None
    ) -> dict[str, Any]:
        """NeckOutput (maps fine to coarse) and, in training, the targets ([{"labels" (N,), "boxes_cxcywh" (N, 4)
        normalised by the padded size}], for the denoising queries) -> the prediction dict (module doc)."""
        memory, shapes, starts = self.memory(neck_output.multi_scale_features)
        batch = memory.shape[0]
        denoising = None
        if self.training and targets is not None and self.denoising_class_embed is not None:
            denoising = contrastive_denoising_group(
                targets,
                self.num_classes,
                self.num_queries,
                self.denoising_class_embed,
                self.num_denoising,
                self.label_noise_ratio,
                self.box_noise_scale,
            )
        # IoU-aware query selection (anchors in float32, also under autocast: their logits need the range)
        anchor_logits, valid = anchors(shapes, self.anchor_grid_size, memory.device, torch.float32)
        output_memory = self.enc_output(valid.to(memory.dtype) * memory)
        enc_logits = self.enc_score_head(output_memory)
        enc_box_logits = self.enc_bbox_head(output_memory) + anchor_logits
        topk = enc_logits.max(-1).values.topk(self.num_queries, dim=1).indices  # (B, Q)
        reference_logits = _gather(enc_box_logits, topk)
        enc_outputs = {"pred_logits": _gather(enc_logits, topk), "pred_boxes": reference_logits.sigmoid()}
        if self.query_embed is not None:
            queries = self.query_embed.weight[None].expand(batch, -1, -1)
        else:
            queries = _gather(output_memory, topk).detach()
        attend, num_dn = None, 0
        if denoising is not None:
            queries = torch.cat([denoising.queries, queries], 1)
            reference_logits = torch.cat([denoising.reference_logits, reference_logits], 1)
            attend, num_dn = denoising.attend, denoising.meta["dn_num_split"][0]
        # decoder with iterative box refinement
        reference = reference_logits.detach().sigmoid()
        logits, boxes = [], []
        for index, layer in enumerate(self.layers):
            queries = layer(queries, self.query_pos_head(reference), reference, memory, shapes, starts, attend)
            layer_logits, layer_boxes = self.predict(index, queries, reference)
            reference = layer_boxes.detach()
            logits.append(layer_logits)
            boxes.append(layer_boxes)
        outputs = [
            {"pred_logits": c[:, num_dn:], "pred_boxes": b[:, num_dn:]} for c, b in zip(logits, boxes, strict=True)
        ]
        result: dict[str, Any] = {**outputs[-1], "aux_outputs": outputs[:-1], "enc_outputs": enc_outputs}
        if denoising is not None:
            result["dn_outputs"] = [
                {"pred_logits": c[:, :num_dn], "pred_boxes": b[:, :num_dn]} for c, b in zip(logits, boxes, strict=True)
            ]
            result["dn_meta"] = denoising.meta
        return result
