"""Layers whose autograd saves less: inputs one cheap op away from a kept tensor are recomputed in backward.

Autograd saves every operand a backward needs. Two patterns of the models save tensors that are one cheap op
away from another saved tensor:

- `feed_forward`: an MLP's `fc2(act(fc1(x)))`. The activation's backward needs `fc1(x)` (GELU) or its output
  (ReLU), fc2's weight gradient needs the activation's output: one or two hidden-sized tensors per block (the
  largest activations of a Swin block or a deformable encoder layer), while `x` is kept anyway by `fc1`. Here
  only `x` is saved; the hidden activations are recomputed in backward (one more `fc1` product).
- `linear_of_sum`: a projection of `x + pos` (deformable attention's offsets and weights of a query with its
  position embedding), whose weight gradient needs the sum. Here `x` and `pos` are saved (both are kept for
  other uses: `x` by the value projection, `pos` shared by every layer) and the sum is recomputed.
- `scaled_conv2d`: a convolution whose weight is scaled per output channel first (a frozen BatchNorm folded into
  the convolution before it), whose backward needs the scaled weight: here the weight itself (a parameter, kept
  anyway) is saved and the scaled copy recomputed, instead of a second copy of every backbone weight.

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
    needs: tuple[bool, bool], grad: torch.Tensor, inputs: torch.Tensor, dtypes: tuple[torch.dtype, torch.dtype]
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of a linear layer's weight and bias (where `needs` asks, in `dtypes`) from the output gradient
    and the layer's input."""
    grad_weight = grad_bias = None
    if needs[0]:
        grad_weight = (_flat(grad).t() @ _flat(inputs)).to(dtypes[0])
    if needs[1]:
        grad_bias = _flat(grad).sum(0).to(dtypes[1])
    return grad_weight, grad_bias


_GELU_APPROXIMATE = {"gelu": "none", "gelu_tanh": "tanh"}  # feed_forward's GELU names -> F.gelu's `approximate`
_ACTIVATIONS = ("relu", *_GELU_APPROXIMATE)


def _activate(hidden: torch.Tensor, activation: str, reuse: bool = False) -> torch.Tensor:
    """The activation of `hidden`; `reuse`: ReLU may overwrite `hidden` (GELU's backward needs its input)."""
    if activation == "relu":
        return hidden.relu_() if reuse else F.relu(hidden)
    return F.gelu(hidden, approximate=_GELU_APPROXIMATE[activation])


def _activation_backward(grad: torch.Tensor, hidden: torch.Tensor, activated: torch.Tensor, activation: str):
    """The activation's own backward (what autograd runs for it): ReLU's from its output, GELU's from its input."""
    if activation == "relu":
        return torch.ops.aten.threshold_backward(grad, activated, 0)
    return torch.ops.aten.gelu_backward(grad, hidden, approximate=_GELU_APPROXIMATE[activation])


class _FeedForward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight1, bias1, weight2, bias2, activation: str):  # noqa: D102
        dtype = _compute_dtype(x.device.type, x.dtype)
        ctx.x_dtype, ctx.dtypes1, ctx.dtypes2 = x.dtype, (weight1.dtype, bias1.dtype), (weight2.dtype, bias2.dtype)
        ctx.activation, ctx.device_type = activation, x.device.type
        x, weight1, bias1, weight2, bias2 = (t.to(dtype) for t in (x, weight1, bias1, weight2, bias2))
        ctx.save_for_backward(x, weight1, bias1, weight2)
        with torch.autocast(ctx.device_type, enabled=False):
            return F.linear(_activate(F.linear(x, weight1, bias1), activation, reuse=True), weight2, bias2)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        x, weight1, bias1, weight2 = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grad_x = grad_weight1 = grad_bias1 = None
        with torch.autocast(ctx.device_type, enabled=False):
            grad = grad.to(weight2.dtype)
            hidden = F.linear(x, weight1, bias1)  # recomputed: the forward's op on the forward's operands
            activated = _activate(hidden, ctx.activation, reuse=True)  # ReLU's backward reads its output only
            grad_weight2, grad_bias2 = _weight_grads(needs[3:5], grad, activated, ctx.dtypes2)
            if any(needs[:3]):
                grad_hidden = _activation_backward(grad @ weight2, hidden, activated, ctx.activation)
                del hidden, activated
                grad_weight1, grad_bias1 = _weight_grads(needs[1:3], grad_hidden, x, ctx.dtypes1)
                if needs[0]:
                    grad_x = (grad_hidden @ weight1).to(ctx.x_dtype)
        return grad_x, grad_weight1, grad_bias1, grad_weight2, grad_bias2, None


def feed_forward(x: torch.Tensor, fc1: nn.Linear, fc2: nn.Linear, activation: str = "relu") -> torch.Tensor:
    """`fc2(act(fc1(x)))`, (..., D) -> (..., D_out), saving `x` only for backward (no dropout inside).

    `activation`: "relu", "gelu" or "gelu_tanh". The hidden activations are recomputed in backward (one more
    `fc1` product) instead of kept: a (..., hidden) tensor or two per block, the largest of a transformer layer.
    """
    if activation not in _ACTIVATIONS:
        raise ValueError(f"feed_forward activation {activation!r} is not one of {list(_ACTIVATIONS)}")
    if fc1.bias is None or fc2.bias is None or not _needs_autograd(x, *fc1.parameters(), *fc2.parameters()):
        return fc2(_activate(fc1(x), activation))
    return _FeedForward.apply(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias, activation)


class _LinearOfSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, pos, weight, bias):  # noqa: D102
        dtype = _compute_dtype(x.device.type, x.dtype)
        ctx.weight_dtypes, ctx.device_type = (weight.dtype, bias.dtype), x.device.type
        ctx.x_dtype, ctx.pos_dtype, ctx.pos_shape = x.dtype, pos.dtype, pos.shape
        ctx.save_for_backward(x, pos, weight)
        with torch.autocast(ctx.device_type, enabled=False):
            return F.linear((x + pos).to(dtype), weight.to(dtype), bias.to(dtype))

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        x, pos, weight = ctx.saved_tensors
        grad_x = grad_pos = None
        with torch.autocast(ctx.device_type, enabled=False):
            dtype = grad.dtype
            summed = (x + pos).to(dtype)
            grad_weight, grad_bias = _weight_grads(ctx.needs_input_grad[2:4], grad, summed, ctx.weight_dtypes)
            if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
                grad_sum = grad @ weight.to(dtype)
                if ctx.needs_input_grad[0]:
                    grad_x = grad_sum.to(ctx.x_dtype)
                if ctx.needs_input_grad[1]:  # summed over the dimensions pos was broadcast along
                    grad_pos = grad_sum.sum_to_size(ctx.pos_shape).to(ctx.pos_dtype)
        return grad_x, grad_pos, grad_weight, grad_bias


def linear_of_sum(x: torch.Tensor, pos: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """`F.linear(x + pos, weight, bias)` for x (..., D_in) and pos broadcastable to x's shape (e.g. one position
    embedding (1, S, D_in) for a batch (B, S, D_in)), saving `x` and `pos` (not their sum) for backward."""
    if torch.broadcast_shapes(x.shape, pos.shape) != x.shape or not _needs_autograd(x, pos, weight, bias):
        return F.linear(x + pos, weight, bias)
    return _LinearOfSum.apply(x, pos, weight, bias)


def _scaled(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return weight * scale.view(-1, *([1] * (weight.dim() - 1)))


class _ScaledConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, scale, bias, stride, padding, dilation, groups):  # noqa: D102
        dtype = _compute_dtype(x.device.type, x.dtype)
        ctx.conv = stride, padding, dilation, groups
        ctx.dtypes = x.dtype, weight.dtype, None if bias is None else bias.dtype
        x = x.to(dtype)  # what autocast's convolution saves too
        ctx.save_for_backward(x, weight, scale)
        bias = None if bias is None else bias.to(dtype)
        with torch.autocast(x.device.type, enabled=False):
            return F.conv2d(x, _scaled(weight, scale).to(dtype), bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        x, weight, scale = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        needs_x, needs_weight, _, needs_bias = ctx.needs_input_grad[:4]
        scaled = _scaled(weight, scale).to(x.dtype)  # recomputed: the forward's op on the forward's operands
        grad_x, grad_scaled, grad_bias = torch.ops.aten.convolution_backward(
            grad.to(x.dtype),
            x,
            scaled,
            [scaled.shape[0]] if needs_bias else None,
            list(stride),
            list(padding),
            list(dilation),
            False,
            [0, 0],
            groups,
            [needs_x, needs_weight, needs_bias],
        )
        x_dtype, weight_dtype, bias_dtype = ctx.dtypes
        grad_x = None if grad_x is None else grad_x.to(x_dtype)
        grad_weight = None if grad_scaled is None else _scaled(grad_scaled.to(scale.dtype), scale).to(weight_dtype)
        grad_bias = None if grad_bias is None else grad_bias.to(bias_dtype)
        return grad_x, grad_weight, None, grad_bias, None, None, None, None


def scaled_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] = (0, 0),
    dilation: tuple[int, int] = (1, 1),
    groups: int = 1,
) -> torch.Tensor:
    """`F.conv2d(x, weight * scale[:, None, None, None], bias, ...)` (zero padding given as ints), saving `weight`
    (not its scaled copy) for backward. `scale` (C_out,) takes no gradient (a frozen BatchNorm's)."""
    if scale.requires_grad or not _needs_autograd(x, weight, bias):
        return F.conv2d(x, _scaled(weight, scale), bias, stride, padding, dilation, groups)
    return _ScaledConv2d.apply(x, weight, scale, bias, tuple(stride), tuple(padding), tuple(dilation), groups)
