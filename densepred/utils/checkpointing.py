"""Activation checkpointing of repeated blocks: memory for compute.

A checkpointed block keeps only its inputs during the forward pass and recomputes its activations in the
backward pass (`torch.utils.checkpoint`, non-reentrant), so a deep backbone, encoder or decoder needs the
memory of one block's activations instead of all of them, for about one more forward pass of compute.
Outside autograd (no_grad, eval) the block runs as usual.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def _checkpointed(forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    if torch.is_grad_enabled():
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return forward(*args, **kwargs)


def enable_activation_checkpointing(blocks: Iterable[nn.Module]) -> int:
    """Checkpoint each module of `blocks` (its forward is wrapped in place; parameters and state-dict names
    are unchanged). Returns how many modules were wrapped; a module already wrapped is left as it is."""
    count = 0
    for block in blocks:
        if getattr(block, "_activation_checkpointing", False):
            continue
        block.forward = functools.partial(_checkpointed, block.forward)
        block._activation_checkpointing = True
        count += 1
    return count
