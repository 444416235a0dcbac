"""EoMT head: the encoder-only mask transformer (Kerssies et al., CVPR 2025, "Your ViT is Secretly an Image
Segmentation Model"), as transformers' `EomtForUniversalSegmentation` and the original tue-mps/eomt define it.

No pixel decoder and no transformer decoder: `num_queries` learned queries join the ViT's tokens before its
last `num_blocks` blocks, which then run on [queries, class / register tokens, patches]. A mask module
predicts from the ViT's final norm of the tokens: class logits (K + 1, the last "no object") from the
queries, mask logits as the product of the queries' MLP embeddings with the patch tokens upscaled by
`num_upscale_blocks` ScaleBlocks (transposed conv x2, GELU, depthwise 3x3 conv, LayerNorm2d: stride
p / 2^num_upscale_blocks, 4 for patch 16).

Training predicts before each of those blocks too (deep supervision, `aux_outputs`), and the prediction is
the next block's attention mask: a query attends to the patches where its mask logits, resized to the patch
grid, are > 0 (always to the queries and the class / register tokens). Mask annealing: block i applies the
mask with probability p_i (per query, drawn each step), 1 before `annealing_start_steps[i]`, 0 after
`annealing_end_steps[i]`, `(1 - progress) ** annealing_power` between, set from the training step by
`set_training_progress` (the LightningModule calls it before each training batch). Inference (eval)
computes no intermediate prediction and applies no mask, as after annealing: no tensor-valued branch, so the
eval forward exports.

The head continues the backbone (`backbone_blocks`): the Segmenter hands it the backbone's
`TokenContinuation` (tokens before the last blocks, those blocks and the final norm) through the identity
neck. Its output is a `MaskPrediction` as the other heads' (matcher, criterion and post-processing
unchanged).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from densepred.heads.mask_prediction import MaskPrediction


def annealing_probability(step: int, start: int, end: int, power: float) -> float:
    """Probability of the masked attention at `step`: 1 before `start`, 0 from `end`, a polynomial decay
    `(1 - (step - start) / (end - start)) ** power` between (tue-mps/eomt's `mask_annealing`)."""
    if step < start:
        return 1.0
    if step >= end:
        return 0.0
    return (1.0 - (step - start) / (end - start)) ** power


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ScaleBlock(nn.Module):
    """x2 upscaling: transposed conv 2x2 stride 2, GELU, depthwise 3x3 conv (no bias), LayerNorm2d."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv1 = nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2)
        self.conv2 = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim, bias=False)
        self.norm = LayerNorm2d(dim, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, C, 2h, 2w)."""
        return self.norm(self.conv2(F.gelu(self.conv1(x))))


class MaskMLP(nn.Module):
    """Three linear layers, GELU between: the queries' mask embeddings."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, dim)
        self.fc2 = nn.Linear(dim, dim)
        self.fc3 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(F.gelu(self.fc2(F.gelu(self.fc1(x)))))


class EoMTHead(nn.Module):
    """Encoder-only mask transformer head on a plain ViT (see the module doc).

    in_channels: the ViT's width D (the identity neck's `out_channels`); mask_dim must equal it (the mask
    embeddings meet the upscaled patch tokens). forward(TokenContinuation) -> the final `MaskPrediction`
    (`pred_logits` (B, Q, K+1), `pred_mask_embeds` (B, Q, D), `mask_features` (B, D, H * s / p, W * s / p) for
    s = 2^num_upscale_blocks; reading `pred_masks` computes them) with "aux_outputs": in training, the
    `num_blocks` predictions made before the blocks, first to last; none in eval.
    """

    def __init__(
        self,
        in_channels: int,
        mask_dim: int,
        num_classes: int,
        num_queries: int = 200,
        num_blocks: int = 4,
        num_upscale_blocks: int = 2,
        annealing_start_steps: Sequence[int] | None = None,
        annealing_end_steps: Sequence[int] | None = None,
        annealing_power: float = 0.9,
    ) -> None:
        """`annealing_start_steps` / `annealing_end_steps`: one training step per block (None: the mask is
        always applied in training, tue-mps/eomt's `attn_mask_annealing_enabled: False`)."""
        super().__init__()
        if mask_dim != in_channels:
            raise ValueError(
                f"EoMTHead: mask_dim={mask_dim} differs from in_channels={in_channels}; the mask embeddings meet the "
                "ViT's own tokens, so use the identity neck (neck=identity) on a ViT without a pyramid"
            )
        starts, ends = annealing_start_steps, annealing_end_steps
        if (starts is None) != (ends is None) or (
            starts is not None and not len(starts) == len(ends) == num_blocks  # type: ignore[arg-type]
        ):
            raise ValueError(
                f"EoMTHead: head.annealing_start_steps={starts} and head.annealing_end_steps={ends} need one step per "
                f"block (num_blocks={num_blocks}) each, or both null (no annealing)"
            )
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.backbone_blocks = num_blocks  # the Segmenter's "head that continues the backbone" protocol
        self.upscale = 2**num_upscale_blocks
        self.annealing = None if starts is None else [(int(s), int(e)) for s, e in zip(starts, ends, strict=True)]
        self.annealing_power = float(annealing_power)
        self.mask_probs = [1.0] * num_blocks  # per block, set by set_training_progress
        self.query = nn.Embedding(num_queries, in_channels)
        self.upscale_blocks = nn.Sequential(*(ScaleBlock(in_channels) for _ in range(num_upscale_blocks)))
        self.mask_head = MaskMLP(in_channels)
        self.class_embed = nn.Linear(in_channels, num_classes + 1)

    def set_training_progress(self, step: int) -> None:
        """Anneal the masked attention to training step `step` (the optimizer steps done)."""
        if self.annealing is not None:
            self.mask_probs = [annealing_probability(step, s, e, self.annealing_power) for s, e in self.annealing]

    def predict(self, tokens: torch.Tensor, features: Any) -> tuple[MaskPrediction, torch.Tensor]:
        """tokens (B, Q + prefix + h * w, D), [queries, prefix, patches] -> the prediction from their norm,
        and the upscaled patch features (B, D, s h, s w) before `_cover_input`."""
        queries = features.norm(tokens[:, : self.num_queries])
        patches = features.norm(tokens[:, self.num_queries + features.num_prefix_tokens :])
        batch, _, dim = patches.shape
        upscaled = self.upscale_blocks(patches.transpose(1, 2).reshape(batch, dim, *features.grid))
        prediction = MaskPrediction(
            pred_logits=self.class_embed(queries),
            pred_mask_embeds=self.mask_head(queries),
            mask_features=self._cover_input(upscaled, features),
        )
        return prediction, upscaled

    def _cover_input(self, upscaled: torch.Tensor, features: Any) -> torch.Tensor:
        """The upscaled patch features (B, D, s h, s w) cover the patch-padded input (h p, w p): cropped to the
        input (H, W) itself, which the mask logits of every head cover (at stride p / s)."""
        (height, width), p, s = features.input_size, features.patch_size, self.upscale
        if (height * s) % p or (width * s) % p:
            raise ValueError(
                f"EoMT: an input of {height} x {width} px is not a whole number of mask pixels at stride "
                f"{p}/{s} (patch size {p}, {s}x upscaling); use backbone.patch_size=16 (the paper's) or pad the "
                f"input to a multiple of {p}"
            )
        return upscaled[..., : height * s // p, : width * s // p]

    def attention_mask(
        self, embeds: torch.Tensor, upscaled: torch.Tensor, features: Any, probability: float
    ) -> torch.Tensor:
        """The next block's bool attention mask (B, 1, T, T), True where a token attends, T = Q + prefix + h w:
        query q attends to patch j where its mask logits (`embeds` (B, Q, D) times the upscaled features, the
        product taken after resizing them, bilinear, to the patch grid) are > 0, or everywhere with
        probability 1 - `probability` (per image and query); every other pair attends. No gradient."""
        grid_features = F.interpolate(upscaled.detach(), size=features.grid, mode="bilinear", align_corners=False)
        logits = torch.einsum("bqc,bchw->bqhw", embeds.detach(), grid_features).flatten(2)
        attend = logits > 0
        if probability < 1:
            unmasked = torch.rand(attend.shape[:2], device=attend.device) > probability
            attend = attend | unmasked[..., None]
        batch, queries, patches = attend.shape
        before = queries + features.num_prefix_tokens
        total = before + patches
        query_rows = torch.cat([attend.new_ones(batch, queries, before), attend], dim=2)
        return torch.cat([query_rows, attend.new_ones(batch, total - queries, total)], dim=1)[:, None]

    def forward(self, features: Any) -> MaskPrediction:
        """features: the backbone's `TokenContinuation` (tokens (B, prefix + h * w, D), the last
        `num_blocks` blocks) -> raw predictions (see the class doc)."""
        if len(features.blocks) != self.backbone_blocks:
            raise ValueError(f"EoMTHead runs {self.backbone_blocks} backbone blocks, got {len(features.blocks)}")
        tokens = features.tokens
        queries = self.query.weight[None].expand(tokens.shape[0], -1, -1).to(tokens.dtype)
        tokens = torch.cat([queries, tokens], dim=1)
        predictions = []
        for block, probability in zip(features.blocks, self.mask_probs, strict=True):
            attn_mask = None
            if self.training:
                prediction, upscaled = self.predict(tokens, features)
                predictions.append(prediction)
                if probability > 0:
                    attn_mask = self.attention_mask(prediction["pred_mask_embeds"], upscaled, features, probability)
            tokens = block(tokens, attn_mask=attn_mask)
        final, _ = self.predict(tokens, features)
        final["aux_outputs"] = predictions
        return final
