"""AdamW with the Mask2Former parameter groups: backbone lr multiplier, no decay on norms and embeddings."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*, SyncBatchNorm, InstanceNorm*
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
)
try:  # timm's FrozenBatchNorm2d is not a _NormBase; its buffers hold no parameters, but keep it explicit
    from timm.layers import FrozenBatchNorm2d

    NORM_TYPES = (*NORM_TYPES, FrozenBatchNorm2d)
except ImportError:  # pragma: no cover - timm is a hard dependency
    pass

# Parameters (by name) that never get weight decay, as in Mask2Former's build_optimizer.
NO_DECAY_KEYWORDS = ("relative_position_bias_table", "absolute_pos_embed", "query_feat", "query_embed")


def param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    backbone_lr_multiplier: float = 0.1,
    weight_decay_norm: float = 0.0,
    weight_decay_embed: float = 0.0,
    no_decay_keywords: Sequence[str] = NO_DECAY_KEYWORDS,
    backbone_prefix: str = "backbone.",
) -> list[dict]:
    """Split trainable parameters into groups of equal (lr, weight decay), each named for the LR monitor.

    Rules (Mask2Former): parameters under `backbone_prefix` get `lr * backbone_lr_multiplier`; parameters
    of normalisation layers get `weight_decay_norm`, of nn.Embedding `weight_decay_embed`; parameters
    whose name contains one of `no_decay_keywords` get no decay.
    """
    groups: dict[tuple[str, float, float], list[nn.Parameter]] = {}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            full_name = f"{module_name}.{param_name}" if module_name else param_name
            in_backbone = full_name.startswith(backbone_prefix)
            group_lr = lr * backbone_lr_multiplier if in_backbone else lr
            decay = weight_decay
            if isinstance(module, NORM_TYPES):
                decay = weight_decay_norm
            elif isinstance(module, nn.Embedding):
                decay = weight_decay_embed
            if any(keyword in full_name for keyword in no_decay_keywords):
                decay = 0.0
            part = "backbone" if in_backbone else "head"
            groups.setdefault((part, group_lr, decay), []).append(param)
    return [
        {"params": params, "lr": group_lr, "weight_decay": decay, "name": f"{part}_wd{decay:g}"}
        for (part, group_lr, decay), params in groups.items()
    ]


def build_adamw(
    model: nn.Module,
    lr: float = 1e-4,
    weight_decay: float = 0.05,
    betas: tuple[float, float] = (0.9, 0.999),
    backbone_lr_multiplier: float = 0.1,
    weight_decay_norm: float = 0.0,
    weight_decay_embed: float = 0.0,
    no_decay_keywords: Sequence[str] = NO_DECAY_KEYWORDS,
) -> torch.optim.AdamW:
    """AdamW over `param_groups(...)` (Mask2Former: lr 1e-4, weight decay 0.05, backbone x 0.1)."""
    groups = param_groups(
        model, lr, weight_decay, backbone_lr_multiplier, weight_decay_norm, weight_decay_embed, no_decay_keywords
    )
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, betas=tuple(betas))
