"""Building blocks shared by necks and heads (both import them; they import neither)."""

from densepred.layers.attention import multi_head_attention
from densepred.layers.mlp import MLP
from densepred.layers.neck_output import NeckOutput
from densepred.layers.position_embedding import PositionEmbeddingSine

__all__ = ["MLP", "NeckOutput", "PositionEmbeddingSine", "multi_head_attention"]
