"""Deformable DETR's decoder head (Zhu et al. 2021), as transformers' `DeformableDetrForObjectDetection`.

Object queries (a learned content + position embedding each, or with `two_stage` the top-scoring encoder
proposals) pass `num_layers` decoder layers: self-attention, deformable cross-attention on the encoder's
levels around each query's reference point, FFN (post-norm). Every layer predicts sigmoid class logits and a
box (cx, cy, w, h) as an offset to its reference point in inverse-sigmoid space. Options:
- `with_box_refine`: each layer has its own class / box heads and its box becomes (detached) the reference of
  the next layer (iterative bounding box refinement); without it, one class / box head is shared by all layers
  and every layer keeps the initial 2-d reference point.
- `two_stage` (needs `with_box_refine`): every encoder pixel proposes a box (class-agnostic score, box offset
  to a proposal of size 0.05 * 2^level); the top `num_queries` proposals become the queries' 4-d reference
  boxes and, through their sine embedding, their position and content embeddings; the proposals are returned
  as `enc_outputs` for the encoder loss.
Input: a detection neck's `NeckOutput` (maps fine to coarse, e.g. `necks.deformable_detr_encoder`). Boxes are
normalised by the padded input size.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from densepred.heads.box_ops import inverse_sigmoid, level_anchor_boxes
from densepred.layers import MLP, NeckOutput, multi_head_attention
from densepred.necks.ms_deform_attn import MSDeformAttn, flatten_levels

# Encoder proposals are kept only where all four box values lie in this open range (Deformable DETR).
PROPOSAL_RANGE = (0.01, 0.99)


class DeformableDetrDecoderLayer(nn.Module):
    """Self-attention, deformable cross-attention, FFN; each followed by dropout, residual and LayerNorm."""

    def __init__(
        self,
        hidden_dim: int,
        num_heads: int,
        num_points: int,
        num_levels: int,
        dim_feedforward: int,
        dropout: float,
        implementation: str,
    ) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(hidden_dim, num_heads, dropout=0.0, batch_first=True)
        self.self_attn_norm = nn.LayerNorm(hidden_dim)
        self.cross_attn = MSDeformAttn(hidden_dim, num_levels, num_heads, num_points, implementation)
        self.cross_attn_norm = nn.LayerNorm(hidden_dim)
        self.linear1 = nn.Linear(hidden_dim, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, hidden_dim)
        self.ffn_norm = nn.LayerNorm(hidden_dim)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self,
        queries: torch.Tensor,
        query_pos: torch.Tensor,
        reference_points: torch.Tensor,
        memory: torch.Tensor,
        spatial_shapes: Sequence[tuple[int, int]],
        level_start_index: Sequence[int],
    ) -> torch.Tensor:
        """queries, query_pos (B, Q, C); reference_points (B, Q, 1, 2 or 4); memory (B, S, C) -> (B, Q, C)."""
        q = queries + query_pos
        queries = self.self_attn_norm(queries + self.dropout(multi_head_attention(self.self_attn, q, q, queries)))
        attended = self.cross_attn(queries, reference_points, memory, spatial_shapes, level_start_index, query_pos)
        queries = self.cross_attn_norm(queries + self.dropout(attended))
        ffn = self.linear2(self.dropout(F.relu(self.linear1(queries))))
        return self.ffn_norm(queries + self.dropout(ffn))


def encoder_proposals(
    memory: torch.Tensor, spatial_shapes: Sequence[tuple[int, int]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """One proposal per encoder pixel: a box of size 0.05 * 2^level at its centre, in inverse-sigmoid space
    (inf outside `PROPOSAL_RANGE`), and the memory zeroed there. memory (B, S, C) -> (B, S, 4), (B, S, C)."""
    proposals = level_anchor_boxes(spatial_shapes, 0.05, memory.device, memory.dtype)
    proposals = proposals[None].expand(memory.shape[0], -1, -1)
    low, high = PROPOSAL_RANGE
    valid = ((proposals > low) & (proposals < high)).all(-1, keepdim=True)
    proposals = torch.log(proposals / (1 - proposals)).masked_fill(~valid, float("inf"))
    return proposals, memory.masked_fill(~valid, 0.0)


def proposal_position_embedding(proposals: torch.Tensor, hidden_dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Sine embedding of inverse-sigmoid boxes (B, Q, 4) -> (B, Q, 2 * hidden_dim), computed in float32."""
    num_feats = hidden_dim // 2
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=proposals.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)
    pos = proposals.float().sigmoid()[..., None] * (2 * math.pi) / dim_t  # (B, Q, 4, num_feats)
    pos = torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=4).flatten(2)
    return pos.to(proposals.dtype)


class DeformableDetrHead(nn.Module):
    """Deformable DETR decoder + prediction heads on a detection neck's maps (see the module docstring).

    Output (the detection head contract): `pred_logits` (B, Q, K), `pred_boxes` (B, Q, 4) normalised
    (cx, cy, w, h), `aux_outputs` (earlier layers, first to last) and with `two_stage` `enc_outputs` (the
    proposals of every encoder pixel, (B, S, K) and (B, S, 4)).
    """

    def __init__(
        self,
        in_channels: int,
        mask_dim: int | None,
        num_classes: int,
        num_queries: int = 300,
        num_layers: int = 6,
        num_heads: int = 8,
        num_points: int = 4,
        num_feature_levels: int = 4,
        dim_feedforward: int = 1024,
        dropout: float = 0.1,
        with_box_refine: bool = False,
        two_stage: bool = False,
        implementation: str = "auto",
    ) -> None:
        """`in_channels` is the neck's `out_channels` (the decoder width); `mask_dim` is unused (None for a
        detection neck); `num_feature_levels` must be the neck's."""
        super().__init__()
        if two_stage and not with_box_refine:
            raise ValueError("head two_stage=true needs with_box_refine=true (as Deformable DETR)")
        self.hidden_dim, self.num_classes, self.num_queries = in_channels, num_classes, num_queries
        self.num_feature_levels = num_feature_levels
        self.with_box_refine, self.two_stage = with_box_refine, two_stage
        hidden = in_channels
        self.layers = nn.ModuleList(
            DeformableDetrDecoderLayer(
                hidden, num_heads, num_points, num_feature_levels, dim_feedforward, dropout, implementation
            )
            for _ in range(num_layers)
        )
        num_heads_out = num_layers if with_box_refine else 1
        self.class_embed = nn.ModuleList(nn.Linear(hidden, num_classes) for _ in range(num_heads_out))
        self.bbox_embed = nn.ModuleList(MLP(hidden, hidden, 4, 3) for _ in range(num_heads_out))
        if two_stage:
            self.enc_output = nn.Linear(hidden, hidden)
            self.enc_output_norm = nn.LayerNorm(hidden)
            self.enc_class_embed = nn.Linear(hidden, num_classes)
            self.enc_bbox_embed = MLP(hidden, hidden, 4, 3)
            self.pos_trans = nn.Linear(2 * hidden, 2 * hidden)
            self.pos_trans_norm = nn.LayerNorm(2 * hidden)
        else:
            self.query_embed = nn.Embedding(num_queries, 2 * hidden)
            self.reference_points = nn.Linear(hidden, 2)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Deformable DETR's initialisation: Xavier for the decoder layers and reference points, the deformable
        attention's own, class bias for a prior probability of 0.01, zero last box layer (the first head's
        height / width bias -2 unless two-stage)."""
        bias = -math.log((1 - 0.01) / 0.01)
        for layer in self.layers:
            for p in layer.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)
            layer.cross_attn.reset_parameters()
        heads = [*zip(self.class_embed, self.bbox_embed, strict=True)]
        if self.two_stage:
            heads.append((self.enc_class_embed, self.enc_bbox_embed))
        for class_embed, bbox_embed in heads:
            nn.init.constant_(class_embed.bias, bias)
            nn.init.zeros_(bbox_embed.layers[-1].weight)
            nn.init.zeros_(bbox_embed.layers[-1].bias)
        if not self.two_stage:
            nn.init.constant_(self.bbox_embed[0].layers[-1].bias[2:], -2.0)
        if not self.two_stage:
            nn.init.xavier_uniform_(self.reference_points.weight)
            nn.init.zeros_(self.reference_points.bias)

    def repeated_blocks(self) -> list[nn.Module]:
        """The decoder layers, the units of activation checkpointing (`utils.checkpointing`)."""
        return list(self.layers)

    def _heads(self, layer: int) -> tuple[nn.Module, nn.Module]:
        index = layer if self.with_box_refine else 0
        return self.class_embed[index], self.bbox_embed[index]

    def forward(
        self, features: NeckOutput, targets: Sequence[Mapping[str, torch.Tensor]] | None = None
    ) -> dict[str, Any]:
        """features: the neck's maps (B, C, h_l, w_l), fine to coarse; `targets` unused (no denoising)."""
        maps = features.multi_scale_features
        if len(maps) != self.num_feature_levels:
            raise ValueError(
                f"DeformableDetrHead has num_feature_levels={self.num_feature_levels} but the neck gives {len(maps)} "
                "maps; set head.num_feature_levels to the neck's num_feature_levels"
            )
        memory, spatial_shapes, level_start_index = flatten_levels(maps)  # (B, S, C)
        batch = memory.shape[0]
        outputs: dict[str, Any] = {}
        if self.two_stage:
            proposals, object_query = encoder_proposals(memory, spatial_shapes)
            object_query = self.enc_output_norm(self.enc_output(object_query))
            enc_logits = self.enc_class_embed(object_query)  # (B, S, K)
            enc_coords = self.enc_bbox_embed(object_query) + proposals  # inverse-sigmoid boxes
            outputs["enc_outputs"] = {"pred_logits": enc_logits, "pred_boxes": enc_coords.sigmoid()}
            top = enc_logits[..., 0].topk(min(self.num_queries, enc_logits.shape[1]), dim=1).indices
            top_coords = enc_coords.gather(1, top[..., None].expand(-1, -1, 4)).detach()
            reference = top_coords.sigmoid()
            embedding = self.pos_trans_norm(self.pos_trans(proposal_position_embedding(top_coords, self.hidden_dim)))
            query_pos, queries = embedding.split(self.hidden_dim, dim=2)
        else:
            query_pos, queries = self.query_embed.weight.split(self.hidden_dim, dim=1)
            query_pos = query_pos[None].expand(batch, -1, -1)
            queries = queries[None].expand(batch, -1, -1)
            reference = self.reference_points(query_pos).sigmoid()  # (B, Q, 2)
        predictions = []
        for index, layer in enumerate(self.layers):
            queries = layer(queries, query_pos, reference[:, :, None], memory, spatial_shapes, level_start_index)
            class_embed, bbox_embed = self._heads(index)
            delta = bbox_embed(queries)
            reference_logits = inverse_sigmoid(reference)
            if reference.shape[-1] == 4:
                box_logits = delta + reference_logits
            else:
                box_logits = torch.cat([delta[..., :2] + reference_logits, delta[..., 2:]], -1)
            boxes = box_logits.sigmoid()
            predictions.append({"pred_logits": class_embed(queries), "pred_boxes": boxes})
            if self.with_box_refine:
                reference = boxes.detach()
        outputs.update(predictions[-1])
        outputs["aux_outputs"] = predictions[:-1]
        return outputs
