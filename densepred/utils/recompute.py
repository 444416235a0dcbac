"""Linear layers whose autograd saves less: a cheap elementwise input recomputed in backward.

Autograd saves every operand a backward needs. Two patterns of the models save a tensor that is one cheap
elementwise op away from another saved tensor:

- `gelu_linear`: an MLP's `fc2(gelu(h))`. GELU's backward needs `h`, fc2's weight gradient needs `gelu(h)`:
  two hidden-sized tensors per block (the largest activations of a Swin or ViT block). Here only `h` is saved
  and `gelu(h)` is recomputed in backward (one elementwise pass).
- `linear_of_sum`: a projection of `x + pos` (deformable attention's offsets and weights of a query with its
  position embedding), whose weight gradient needs the sum. Here `x` and `pos` are saved (both are kept for
  other uses: `x` by the value projection, `pos` shared by every layer) and the sum is recomputed.

Values and gradients equal the plain modules' (the same ops, in the same order; tests/test_recompute.py).
Under autocast the inputs are cast as autocast casts a linear layer's, and the gradients come back in the
inputs' dtypes. Without autograd (no_grad, inference, export) the plain ops run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _needs_autograd(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _compute_dtype(device_type: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype a linear layer computes in here: autocast's lower precision dtype when it is on."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return dtype


def _flat(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(-1, tensor.shape[-1])


def _weight_grads(
    ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor, inputs: torch.Tensor, weight_index: int
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of a linear layer's weight and bias (in their own dtypes) from the output gradient and the
    layer's input."""
    grad_weight = grad_bias = None
    if ctx.needs_input_grad[weight_index]:
        grad_weight = (_flat(grad).t() @ _flat(inputs)).to(ctx.weight_dtype)
    if ctx.needs_input_grad[weight_index + 1]:
        grad_bias = _flat(grad).sum(0).to(ctx.bias_dtype)
    return grad_weight, grad_bias


class _GeluLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, approximate: str):  # noqa: D102
        dtype = _compute_dtype(hidden.device.type, hidden.dtype)
        ctx.weight_dtype, ctx.bias_dtype, ctx.input_dtype = weight.dtype, bias.dtype, hidden.dtype
        ctx.approximate, ctx.device_type = approximate, hidden.device.type
        hidden, weight, bias = hidden.to(dtype), weight.to(dtype), bias.to(dtype)
        ctx.save_for_backward(hidden, weight)
        with torch.autocast(ctx.device_type, enabled=False):
            return F.linear(F.gelu(hidden, approximate=approximate), weight, bias)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        hidden, weight = ctx.saved_tensors
        grad_hidden = None
        with torch.autocast(ctx.device_type, enabled=False):
            grad = grad.to(weight.dtype)
            grad_weight, grad_bias = _weight_grads(ctx, grad, F.gelu(hidden, approximate=ctx.approximate), 1)
            if ctx.needs_input_grad[0]:
                grad_hidden = torch.ops.aten.gelu_backward(grad @ weight, hidden, approximate=ctx.approximate)
                grad_hidden = grad_hidden.to(ctx.input_dtype)
        return grad_hidden, grad_weight, grad_bias, None


def gelu_linear(hidden: torch.Tensor, linear: nn.Linear, approximate: str = "none") -> torch.Tensor:
    """`linear(gelu(hidden))`, (..., D_in) -> (..., D_out), saving `hidden` only for backward."""
    if linear.bias is None or not _needs_autograd(hidden, linear.weight, linear.bias):
        return linear(F.gelu(hidden, approximate=approximate))
    return _GeluLinear.apply(hidden, linear.weight, linear.bias, approximate)


class _LinearOfSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, pos, weight, bias):  # noqa: D102
        dtype = _compute_dtype(x.device.type, x.dtype)
        ctx.weight_dtype, ctx.bias_dtype, ctx.device_type = weight.dtype, bias.dtype, x.device.type
        ctx.x_dtype, ctx.pos_dtype = x.dtype, pos.dtype
        ctx.save_for_backward(x, pos, weight)
        with torch.autocast(ctx.device_type, enabled=False):
            return F.linear((x + pos).to(dtype), weight.to(dtype), bias.to(dtype))

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        x, pos, weight = ctx.saved_tensors
        grad_x = grad_pos = None
        with torch.autocast(ctx.device_type, enabled=False):
            dtype = grad.dtype
            grad_weight, grad_bias = _weight_grads(ctx, grad, (x + pos).to(dtype), 2)
            if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
                grad_sum = grad @ weight.to(dtype)
                if ctx.needs_input_grad[0]:
                    grad_x = grad_sum.to(ctx.x_dtype)
                if ctx.needs_input_grad[1]:
                    grad_pos = grad_sum.to(ctx.pos_dtype)
        return grad_x, grad_pos, grad_weight, grad_bias


def linear_of_sum(x: torch.Tensor, pos: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """`F.linear(x + pos, weight, bias)` for x, pos (..., D_in) of one shape, saving `x` and `pos` (not their
    sum) for backward."""
    if x.shape != pos.shape or not _needs_autograd(x, pos, weight, bias):
        return F.linear(x + pos, weight, bias)
    return _LinearOfSum.apply(x, pos, weight, bias)
