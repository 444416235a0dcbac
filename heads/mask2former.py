"""Mask2Former head: the masked-attention transformer decoder (`MultiScaleMaskedTransformerDecoder`).

Learned query features (with learned query position embeddings) are refined by `num_layers` layers, each
masked cross-attention -> self-attention -> FFN (post-norm). Layer i attends the pixel decoder's level
i mod 3 (coarse to fine) and only where the previous prediction's mask is on (sigmoid >= 0.5); a query whose
mask is empty at that level attends everywhere. Each of the num_layers + 1 predictions (the first from the
learned queries themselves) gives class logits (K + 1, the last being "no object") and mask logits
against the mask features.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from densepred.heads.mask_prediction import MaskPrediction
from densepred.layers import MLP, NeckOutput, PositionEmbeddingSine, multi_head_attention
from densepred.utils.recompute import feed_forward


def masked_attention_mask(mask_logits: torch.Tensor, size: tuple[int, int], num_heads: int) -> torch.Tensor:
    """Mask logits (B, Q, H, W) -> bool attention mask (B * num_heads, Q, h * w) for `nn.MultiheadAttention`.

    The original definition: the masks are resized (bilinear) to the attended level's `size`; True (blocked)
    where sigmoid < 0.5, except that a query whose mask is empty at that level is blocked nowhere. The head
    computes the same from the mask embeddings (`attention_mask`).
    """
    mask = F.interpolate(mask_logits.detach(), size=size, mode="bilinear", align_corners=False)
    blocked = mask.sigmoid().flatten(2) < 0.5
    blocked = blocked & ~blocked.all(-1, keepdim=True)
    return blocked.repeat_interleave(num_heads, dim=0)


def attention_mask(mask_embeds: torch.Tensor, level_features: torch.Tensor) -> torch.Tensor:
    """`masked_attention_mask` computed at the attended level, for `multi_head_attention`.

    mask_embeds (B, Q, C); level_features (B, C, h, w), the mask features resized (bilinear) to the level,
    so that their product with the embeddings equals the resized mask logits. -> bool (B, 1, Q, h * w), True
    where a query attends (the complement of the blocked positions), shared by the heads. No gradient.
    """
    logits = torch.einsum("bqc,bchw->bqhw", mask_embeds.detach(), level_features.to(mask_embeds.dtype)).flatten(2)
    blocked = logits.sigmoid() < 0.5
    blocked = blocked & ~blocked.all(-1, keepdim=True)
    return ~blocked[:, None]


class MaskedAttentionDecoderLayer(nn.Module):
    """Masked cross-attention to one feature level, self-attention among queries, FFN; each post-norm."""

    def __init__(self, hidden_dim: int, num_heads: int, dim_feedforward: int, dropout: float) -> None:
        super().__init__()
        self.cross_attn = nn.MultiheadAttention(hidden_dim, num_heads, dropout=dropout, batch_first=True)
        self.cross_attn_norm = nn.LayerNorm(hidden_dim)
        self.self_attn = nn.MultiheadAttention(hidden_dim, num_heads, dropout=dropout, batch_first=True)
        self.self_attn_norm = nn.LayerNorm(hidden_dim)
        self.linear1 = nn.Linear(hidden_dim, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, hidden_dim)
        self.ffn_norm = nn.LayerNorm(hidden_dim)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self,
        queries: torch.Tensor,
        query_pos: torch.Tensor,
        memory: torch.Tensor,
        memory_key: torch.Tensor,
        attend: torch.Tensor,
    ) -> torch.Tensor:
        """queries, query_pos (B, Q, C); memory (B, HW, C) and memory_key, the memory plus its position
        embedding; attend bool (B, 1, Q, HW), True where a query attends -> (B, Q, C)."""
        attended = multi_head_attention(self.cross_attn, queries + query_pos, memory_key, memory, attend)
        queries = self.cross_attn_norm(queries + self.dropout(attended))
        q = queries + query_pos
        attended = multi_head_attention(self.self_attn, q, q, queries)
        queries = self.self_attn_norm(queries + self.dropout(attended))
        if self.dropout.p and self.training:
            ffn = self.linear2(self.dropout(F.relu(self.linear1(queries))))
        else:  # the same FFN, its (B, Q, dim_feedforward) hidden recomputed in backward instead of saved
            ffn = feed_forward(queries, self.linear1, self.linear2, "relu")
        return self.ffn_norm(queries + self.dropout(ffn))


class Mask2FormerHead(nn.Module):
    """Masked-attention decoder head.

    in_channels: channels of the neck's `multi_scale_features` (three maps, coarse to fine); mask_dim:
    channels of its `mask_features`. forward(NeckOutput) -> the final `MaskPrediction` (`pred_logits`
    (B, Q, K+1), `pred_mask_embeds` (B, Q, mask_dim), `mask_features` (B, mask_dim, H/4, W/4); reading
    `pred_masks` (B, Q, H/4, W/4) computes them) with "aux_outputs": the num_layers earlier predictions,
    first to last. The attention masks come from the mask features resized once to each level.
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
        num_layers: int = 9,
        dropout: float = 0.0,
        num_feature_levels: int = 3,
        enforce_input_project: bool = False,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.num_heads = num_heads
        self.num_feature_levels = num_feature_levels
        self.layers = nn.ModuleList(
            MaskedAttentionDecoderLayer(hidden_dim, num_heads, dim_feedforward, dropout) for _ in range(num_layers)
        )
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.position_embedding = PositionEmbeddingSine(hidden_dim // 2, normalize=True)
        self.query_feat = nn.Embedding(num_queries, hidden_dim)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.level_embed = nn.Embedding(num_feature_levels, hidden_dim)
        self.input_proj = nn.ModuleList(
            nn.Conv2d(in_channels, hidden_dim, kernel_size=1)
            if in_channels != hidden_dim or enforce_input_project
            else nn.Identity()
            for _ in range(num_feature_levels)
        )
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The original initialisation: Xavier for the decoder layers' matrices, Caffe2 Xavier for input convs."""
        for layer in self.layers:
            for p in layer.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)
        for proj in self.input_proj:
            if isinstance(proj, nn.Conv2d):
                nn.init.kaiming_uniform_(proj.weight, a=1)
                nn.init.zeros_(proj.bias)

    def repeated_blocks(self) -> list[nn.Module]:
        """The decoder layers, the units of activation checkpointing (`utils.checkpointing`)."""
        return list(self.layers)

    def predict(
        self, queries: torch.Tensor, mask_features: torch.Tensor, level_features: torch.Tensor
    ) -> tuple[MaskPrediction, torch.Tensor]:
        """queries (B, Q, C) -> the prediction and the next layer's attention mask at the level of
        `level_features` (see `attention_mask`)."""
        queries = self.decoder_norm(queries)
        mask_embeds = self.mask_embed(queries)
        prediction = MaskPrediction(
            pred_logits=self.class_embed(queries), pred_mask_embeds=mask_embeds, mask_features=mask_features
        )
        return prediction, attention_mask(mask_embeds, level_features)

    def forward(self, neck_output: NeckOutput) -> dict[str, Any]:
        """NeckOutput (multi_scale_features coarse to fine, mask_features) -> raw predictions (see class doc)."""
        features = neck_output.multi_scale_features
        mask_features = neck_output.mask_features
        if len(features) != self.num_feature_levels:
            raise ValueError(
                f"Mask2FormerHead expects {self.num_feature_levels} multi_scale_features (strides 32, 16, 8) from "
                f"the neck, got {len(features)}; use a Mask2Former-style neck such as MSDeformAttnPixelDecoder"
            )
        memories, memory_keys, level_features = [], [], []
        for i, x in enumerate(features):
            memory = (self.input_proj[i](x).flatten(2) + self.level_embed.weight[i][None, :, None]).transpose(1, 2)
            memories.append(memory)
            memory_keys.append(memory + self.position_embedding(x).flatten(2).transpose(1, 2))
            level_features.append(
                F.interpolate(mask_features.detach(), size=x.shape[-2:], mode="bilinear", align_corners=False)
            )

        batch = mask_features.shape[0]
        queries = self.query_feat.weight[None].expand(batch, -1, -1)
        query_pos = self.query_embed.weight[None].expand(batch, -1, -1)

        prediction, attend = self.predict(queries, mask_features, level_features[0])
        predictions = [prediction]
        for i, layer in enumerate(self.layers):
            level = i % self.num_feature_levels
            queries = layer(queries, query_pos, memories[level], memory_keys[level], attend)
            prediction, attend = self.predict(queries, mask_features, level_features[(i + 1) % self.num_feature_levels])
            predictions.append(prediction)
        final = predictions[-1]
        final["aux_outputs"] = predictions[:-1]
        return final
