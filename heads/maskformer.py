"""MaskFormer head: a DETR transformer decoder over one feature map, a class head and a mask-embedding MLP.

Follows the official MaskFormer `TransformerPredictor`: N learned query positions, decoder input zeros,
post-norm decoder layers (self-attention, cross-attention to the map with sine positions, FFN), a shared
LayerNorm on every layer's output; class logits (K+1, the last being no-object) and mask logits (the
3-layer MLP's mask embeddings dotted with the stride-4 mask features) for every decoder layer.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from densepred.heads.mask_prediction import MaskPrediction
from densepred.layers import MLP, NeckOutput, PositionEmbeddingSine


class DetrDecoderLayer(nn.Module):
    """Post-norm DETR decoder layer: self-attention, cross-attention, FFN, each followed by add & LayerNorm.

    Query positions go to the queries and keys of self-attention and to the queries of cross-attention; the
    map's positions go to the keys of cross-attention; values carry no positions.
    """

    def __init__(self, d_model: int, num_heads: int, dim_feedforward: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, num_heads, dropout=dropout, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(d_model, num_heads, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self, tgt: torch.Tensor, memory: torch.Tensor, pos: torch.Tensor, query_pos: torch.Tensor
    ) -> torch.Tensor:
        """tgt (B, Q, C), memory (B, HW, C), pos (1 or B, HW, C), query_pos (1 or B, Q, C) -> (B, Q, C)."""
        q = k = tgt + query_pos
        tgt = self.norm1(tgt + self.dropout(self.self_attn(q, k, tgt, need_weights=False)[0]))
        attended = self.cross_attn(tgt + query_pos, memory + pos, memory, need_weights=False)[0]
        tgt = self.norm2(tgt + self.dropout(attended))
        ffn = self.linear2(self.dropout(F.relu(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout(ffn))


class DetrDecoder(nn.Module):
    """A stack of DETR decoder layers; returns every layer's output through the shared final LayerNorm."""

    def __init__(self, d_model: int, num_heads: int, dim_feedforward: int, dropout: float, num_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            DetrDecoderLayer(d_model, num_heads, dim_feedforward, dropout) for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(d_model)

    def forward(
        self, tgt: torch.Tensor, memory: torch.Tensor, pos: torch.Tensor, query_pos: torch.Tensor
    ) -> torch.Tensor:
        """-> (num_layers, B, Q, C), first layer first."""
        outputs = []
        for layer in self.layers:
            tgt = layer(tgt, memory, pos, query_pos)
            outputs.append(self.norm(tgt))
        return torch.stack(outputs)


class MaskFormerHead(nn.Module):
    """MaskFormer transformer predictor.

    in: NeckOutput with mask_features (B, mask_dim, H/4, W/4) and multi_scale_features[0], the decoder's
    input map (B, in_channels, h, w) (the coarsest backbone map or the pixel-decoder encoder output).
    out: the last decoder layer's `MaskPrediction` (`pred_logits` (B, Q, K+1), `pred_mask_embeds` (B, Q,
    mask_dim), `mask_features`; `pred_masks` (B, Q, H/4, W/4) computed when read), with "aux_outputs": the
    same for decoder layers 1 .. L-1, first layer first.
    """

    def __init__(
        self,
        in_channels: int,
        mask_dim: int,
        num_classes: int,
        hidden_dim: int = 256,
        num_queries: int = 100,
        num_heads: int = 8,
        dim_feedforward: int = 2048,
        num_layers: int = 6,
        dropout: float = 0.1,
        enforce_input_project: bool = False,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.position_embedding = PositionEmbeddingSine(hidden_dim // 2, normalize=True)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        if in_channels != hidden_dim or enforce_input_project:
            self.input_proj = nn.Conv2d(in_channels, hidden_dim, kernel_size=1)
            nn.init.kaiming_uniform_(self.input_proj.weight, a=1)
            nn.init.zeros_(self.input_proj.bias)
        else:
            self.input_proj = nn.Identity()
        self.decoder = DetrDecoder(hidden_dim, num_heads, dim_feedforward, dropout, num_layers)
        for p in self.decoder.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)

    def repeated_blocks(self) -> list[nn.Module]:
        """The decoder layers, the units of activation checkpointing (`utils.checkpointing`)."""
        return list(self.decoder.layers)

    def forward(self, neck_output: NeckOutput) -> dict[str, Any]:
        x = self.input_proj(neck_output.multi_scale_features[0])
        pos = self.position_embedding(x).flatten(2).transpose(1, 2)
        memory = x.flatten(2).transpose(1, 2)
        query_pos = self.query_embed.weight[None].expand(x.shape[0], -1, -1)
        hidden = self.decoder(torch.zeros_like(query_pos), memory, pos, query_pos)  # (L, B, Q, C)
        logits, embeds = self.class_embed(hidden), self.mask_embed(hidden)
        predictions = [
            MaskPrediction(pred_logits=a, pred_mask_embeds=b, mask_features=neck_output.mask_features)
            for a, b in zip(logits, embeds, strict=True)
        ]
        final = predictions[-1]
        final["aux_outputs"] = predictions[:-1]
        return final
