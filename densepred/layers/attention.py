"""Multi-head attention through `F.scaled_dot_product_attention` with an `nn.MultiheadAttention`'s weights.

`nn.MultiheadAttention` takes a boolean mask per (batch x head), so a mask shared by the heads must be copied
once per head, and it projects the query and key separately even when they are the same tensor. This
function keeps the module (its parameters and state-dict names stay those of the original checkpoints) and
runs the attention as PyTorch's fused kernel, with one mask broadcast over the heads and one matrix product
for the query and key projections of self-attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def multi_head_attention(
    attn: nn.MultiheadAttention,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attend: torch.Tensor | None = None,
) -> torch.Tensor:
    """`attn(query, key, value, attn_mask=~attend)[0]` for a batch_first module, computed by SDPA.

    query (B, Lq, C), key / value (B, Lk, C); attend: bool (B, 1, Lq, Lk), True where a query may attend
    (SDPA's convention, the opposite of nn.MultiheadAttention's), shared by all heads. When `query is key`
    their projections are one matrix product. -> (B, Lq, C).
    """
    batch, length, channels = query.shape
    heads = attn.num_heads
    weight, bias = attn.in_proj_weight, attn.in_proj_bias
    if query is key:
        q, k = F.linear(query, weight[: 2 * channels], bias[: 2 * channels]).chunk(2, dim=-1)
    else:
        q = F.linear(query, weight[:channels], bias[:channels])
        k = F.linear(key, weight[channels : 2 * channels], bias[channels : 2 * channels])
    v = F.linear(value, weight[2 * channels :], bias[2 * channels :])
    q, k, v = (t.unflatten(-1, (heads, channels // heads)).transpose(1, 2) for t in (q, k, v))  # (B, heads, L, d)
    dropout = attn.dropout if attn.training else 0.0
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attend, dropout_p=dropout)
    return attn.out_proj(out.transpose(1, 2).reshape(batch, length, channels))
