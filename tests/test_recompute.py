"""The lean linear layers equal the plain ones (values, gradients, autocast) and save less for backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from densepred.utils.recompute import feed_forward, linear_of_sum, scaled_conv2d


def _saved_bytes(fn, kept: tuple[torch.Tensor, ...] = ()) -> tuple[torch.Tensor, int]:
    """Run fn(); the bytes of the distinct storages autograd saved for backward (parameters included), but for
    those of the `kept` tensors."""
    storages: dict[int, int] = {}
    excluded = {tensor.untyped_storage().data_ptr() for tensor in kept}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.untyped_storage().data_ptr() not in excluded:
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = fn()
    return out, sum(storages.values())


def _grads(out: torch.Tensor, grad: torch.Tensor, tensors) -> list[torch.Tensor]:
    return list(torch.autograd.grad(out, tensors, grad))


@pytest.mark.parametrize("activation", ["relu", "gelu", "gelu_tanh"])
def test_feed_forward_equals_the_plain_layers_and_saves_no_hidden(activation):
    torch.manual_seed(0)
    fc1, fc2 = nn.Linear(8, 32).double(), nn.Linear(32, 8).double()
    x = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(2, 5, 8, dtype=torch.float64)
    leaves = [x, fc1.weight, fc1.bias, fc2.weight, fc2.bias]
    act = {"relu": F.relu, "gelu": F.gelu, "gelu_tanh": lambda h: F.gelu(h, approximate="tanh")}[activation]
    plain, plain_bytes = _saved_bytes(lambda: fc2(act(fc1(x))))
    lean, lean_bytes = _saved_bytes(lambda: feed_forward(x, fc1, fc2, activation))
    torch.testing.assert_close(lean, plain, rtol=0, atol=1e-12)
    for ours, reference in zip(_grads(lean, grad, leaves), _grads(plain, grad, leaves), strict=True):
        torch.testing.assert_close(ours, reference, rtol=0, atol=1e-12)
    # both keep x and the weights (lean also fc1's bias, to recompute the hidden); plain keeps the (2, 5, 32)
    # float64 hidden once for ReLU (its output, also fc2's input), twice for GELU (its input and its output)
    hidden_bytes = 2 * 5 * 32 * 8
    assert plain_bytes - lean_bytes == hidden_bytes * (1 if activation == "relu" else 2) - 32 * 8


def test_feed_forward_refuses_an_unknown_activation():
    with pytest.raises(ValueError, match="'silu' is not one of"):
        feed_forward(torch.randn(2, 8), nn.Linear(8, 16), nn.Linear(16, 8), "silu")


@pytest.mark.parametrize("pos_layout", ["contiguous", "strided", "broadcast"])
def test_linear_of_sum_equals_linear_of_the_sum_and_does_not_save_it(pos_layout):
    torch.manual_seed(0)
    x = torch.randn(2, 6, 16, dtype=torch.float64, requires_grad=True)
    # "broadcast": one embedding for the batch, as the pixel decoder's (1, S, C) position embedding
    pos_base = torch.randn(1 if pos_layout == "broadcast" else 2, 16, 6, dtype=torch.float64, requires_grad=True)
    pos = pos_base.transpose(1, 2).contiguous() if pos_layout == "contiguous" else pos_base.transpose(1, 2)
    weight = torch.randn(12, 16, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(12, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(2, 6, 12, dtype=torch.float64)
    leaves = [x, pos_base, weight, bias]
    plain, plain_bytes = _saved_bytes(lambda: F.linear(x + pos, weight, bias))
    lean, lean_bytes = _saved_bytes(lambda: linear_of_sum(x, pos, weight, bias))
    torch.testing.assert_close(lean, plain, rtol=0, atol=1e-12)
    for ours, reference in zip(_grads(lean, grad, leaves), _grads(plain, grad, leaves), strict=True):
        torch.testing.assert_close(ours, reference, rtol=0, atol=1e-12)
    # plain keeps the (2, 6, 16) sum beside the weight; lean keeps x, pos and the weight, both of which the
    # models keep anyway (the value projection's input, the position embedding shared by all layers)
    assert plain_bytes == (2 * 6 * 16 + 12 * 16) * 8
    assert lean_bytes == (2 * 6 * 16 + pos_base.numel() + 12 * 16) * 8


def test_lean_layers_under_bf16_autocast_equal_the_plain_layers_under_it():
    torch.manual_seed(0)
    fc1, projection, fc2 = nn.Linear(8, 32), nn.Linear(8, 8), nn.Linear(32, 8)
    x = torch.randn(4, 8, requires_grad=True)
    pos = torch.randn(4, 8, requires_grad=True)
    grad = torch.randn(4, 8)
    leaves = [x, pos, *fc1.parameters(), *projection.parameters(), *fc2.parameters()]

    def run(lean: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if lean:
                out = feed_forward(x + linear_of_sum(x, pos, projection.weight, projection.bias), fc1, fc2, "gelu")
            else:
                out = fc2(F.gelu(fc1(x + projection(x + pos))))
        assert out.dtype == torch.bfloat16
        return out, _grads(out, grad.bfloat16(), leaves)

    (lean, lean_grads), (plain, plain_grads) = run(True), run(False)
    torch.testing.assert_close(lean, plain, rtol=0, atol=0)
    for ours, reference, leaf in zip(lean_grads, plain_grads, leaves, strict=True):
        assert ours.dtype == leaf.dtype == torch.float32
        torch.testing.assert_close(ours, reference, rtol=0, atol=0)


@pytest.mark.parametrize("with_bias", [False, True])
def test_scaled_conv2d_equals_the_conv_of_the_scaled_weight_and_does_not_save_it(with_bias):
    torch.manual_seed(0)
    x = torch.randn(2, 4, 9, 7, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(6, 2, 3, 3, dtype=torch.float64, requires_grad=True)  # 2 groups
    scale = torch.rand(6, dtype=torch.float64) + 0.5
    bias = torch.randn(6, dtype=torch.float64, requires_grad=True) if with_bias else None
    conv = {"stride": (2, 1), "padding": (1, 0), "dilation": (1, 2), "groups": 2}
    grad = torch.randn(2, 6, 5, 3, dtype=torch.float64)
    leaves = [x, weight] + ([bias] if with_bias else [])

    def plain():
        return F.conv2d(x, weight * scale[:, None, None, None], bias, **conv)

    # what each saves beyond the inputs, which the model keeps anyway
    reference, plain_bytes = _saved_bytes(plain, kept=(x, weight, scale))
    lean, lean_bytes = _saved_bytes(lambda: scaled_conv2d(x, weight, scale, bias, **conv), kept=(x, weight, scale))
    torch.testing.assert_close(lean, reference, rtol=0, atol=1e-12)
    for ours, expected in zip(_grads(lean, grad, leaves), _grads(reference, grad, leaves), strict=True):
        torch.testing.assert_close(ours, expected, rtol=0, atol=1e-12)
    assert (plain_bytes, lean_bytes) == (weight.numel() * 8, 0)  # plain: the scaled copy of the weight


def test_scaled_conv2d_under_bf16_autocast_equals_the_plain_conv_under_it():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    weight = torch.randn(5, 4, 3, 3, requires_grad=True)
    scale, bias = torch.rand(5) + 0.5, torch.randn(5, requires_grad=True)
    grad = torch.randn(2, 5, 8, 8)
    results = []
    for lean in (True, False):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if lean:
                out = scaled_conv2d(x, weight, scale, bias, padding=(1, 1))
            else:
                out = F.conv2d(x, weight * scale[:, None, None, None], bias, padding=(1, 1))
        assert out.dtype == torch.bfloat16
        results.append((out, _grads(out, grad.bfloat16(), [x, weight, bias])))
    (lean, lean_grads), (plain, plain_grads) = results
    torch.testing.assert_close(lean, plain, rtol=0, atol=0)
    for ours, reference, leaf in zip(lean_grads, plain_grads, [x, weight, bias], strict=True):
        assert ours.dtype == leaf.dtype == torch.float32
        torch.testing.assert_close(ours, reference, rtol=0, atol=0)


def test_without_autograd_the_plain_ops_run():
    fc1, fc2 = nn.Linear(8, 32), nn.Linear(32, 8)
    x = torch.randn(3, 8)
    with torch.no_grad():
        out = feed_forward(x, fc1, fc2, "gelu")
        torch.testing.assert_close(out, fc2(F.gelu(fc1(x))), rtol=0, atol=0)
        assert linear_of_sum(x, x, fc1.weight, fc1.bias).grad_fn is None
    assert out.grad_fn is None
