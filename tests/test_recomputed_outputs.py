"""Norm outputs recomputed in backward: bitwise the same values and gradients, and less saved for backward."""

from __future__ import annotations

import weakref

import pytest
import torch
from torch import nn

from densepred.necks.msdeform_pixel_decoder import MSDeformAttnEncoderLayer, reference_points
from densepred.utils.checkpointing import enable_activation_checkpointing
from densepred.utils.recomputed_outputs import RecomputedNormOutputs


class Counting(RecomputedNormOutputs):
    """Records the bytes of the distinct storages saved as they are, and of those replaced by a recipe."""

    def __init__(self, modules):
        super().__init__(modules)
        self.kept: dict[int, int] = {}
        self.replaced: dict[int, int] = {}

    def _pack(self, tensor):
        packed = super()._pack(tensor)
        storage = tensor.untyped_storage()
        (self.kept if packed is tensor else self.replaced)[storage.data_ptr()] = storage.nbytes()
        return packed


def run(model: nn.Module, inputs: tuple, grad: torch.Tensor, recompute: bool):
    """Output, input and parameter gradients of model(*inputs) with or without recomputation; the counter."""
    counter = Counting(model.modules())
    if recompute:
        with counter:
            out = model(*inputs)
    else:
        out = model(*inputs)
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad] + list(model.parameters())
    grads = torch.autograd.grad(out, leaves, grad)
    return out.detach(), grads, counter


def assert_bitwise_equal(got, want):
    (out, grads), (want_out, want_grads) = got, want
    assert torch.equal(out, want_out)
    assert len(grads) == len(want_grads)
    for g, w in zip(grads, want_grads, strict=True):
        assert torch.equal(g, w)


class PostNormBlock(nn.Module):
    """x -> LN(x + fc(x)) -> LN(y + fc2(y)): the encoder layers' pattern, two norm outputs saved by linears."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x + self.fc1(x))
        return self.fc1(self.norm2(y + self.fc2(y)))


def test_post_norm_block_is_bitwise_equal_and_saves_no_norm_output():
    torch.manual_seed(0)
    block = PostNormBlock().double()
    x = torch.randn(3, 7, 16, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(3, 7, 16, dtype=torch.float64)
    plain_out, plain_grads, _ = run(block, (x,), grad, recompute=False)
    out, grads, counter = run(block, (x,), grad, recompute=True)
    assert_bitwise_equal((out, grads), (plain_out, plain_grads))
    # both norm outputs (each saved by the linear after it) are replaced by recipes: 2 x (3, 7, 16) float64
    assert sum(counter.replaced.values()) == 2 * 3 * 7 * 16 * 8


def conv_norm_relu_conv(inplace: bool = False) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU(inplace), nn.Conv2d(8, 8, 1))


@pytest.mark.parametrize("inplace", [False, True])
def test_group_norm_relu_conv_keeps_only_the_norm_input(inplace):
    """Conv -> GroupNorm -> ReLU -> conv (the pixel decoder's output convolution): the ReLU saves its output,
    the next conv its input; both are that one tensor, recomputed from the GroupNorm's input (an in-place ReLU
    too: its recipe runs the norm and the ReLU)."""
    torch.manual_seed(0)
    model = conv_norm_relu_conv(inplace).double()
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    grad = torch.randn(2, 8, 6, 6, dtype=torch.float64)
    want = run(model, (x,), grad, recompute=False)[:2]
    out, grads, counter = run(model, (x,), grad, recompute=True)
    assert_bitwise_equal((out, grads), want)
    assert list(counter.replaced.values()) == [2 * 8 * 6 * 6 * 8]


def test_encoder_layer_is_bitwise_equal_and_keeps_two_tensors_fewer():
    torch.manual_seed(0)
    layer = MSDeformAttnEncoderLayer(embed_dim=32, dim_feedforward=64, num_levels=2, num_heads=4, num_points=2)
    with torch.no_grad():
        layer.self_attn.sampling_offsets.weight.normal_(std=0.05)
        layer.self_attn.attention_weights.weight.normal_(std=0.05)
    shapes, starts = [(6, 6), (3, 3)], [0, 36]
    src = torch.randn(2, 45, 32, requires_grad=True)
    pos = torch.randn(1, 45, 32)
    points = reference_points(shapes, 2, src.device)

    class TwoLayers(nn.Module):  # the second layer saves the first one's output (a norm output)
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList([layer, layer])

        def forward(self, x):
            for block in self.layers:
                x = block(x, pos, points, shapes, starts)
            return x

    model = TwoLayers()
    grad = torch.randn(2, 45, 32)
    want = run(model, (src,), grad, recompute=False)[:2]
    out, grads, counter = run(model, (src,), grad, recompute=True)
    assert_bitwise_equal((out, grads), want)
    # per layer norm1's output (the FFN's input); the first layer's norm2 output (the second layer's input)
    assert sorted(counter.replaced.values()) == [2 * 45 * 32 * 4] * 3


def test_autocast_bfloat16_recomputes_in_the_forwards_dtype():
    """The ReLU after a GroupNorm saves its output, recomputed under the forward's autocast state (CPU autocast
    runs this GroupNorm in bfloat16). A float32 norm output that a linear casts is not saved at all."""
    torch.manual_seed(0)
    model = conv_norm_relu_conv()
    x = torch.randn(2, 4, 6, 6)
    grad = torch.randn(2, 8, 6, 6, dtype=torch.bfloat16)
    results = []
    for recompute in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results.append(run(model, (x,), grad, recompute))
    assert list(results[1][2].replaced.values()) == [2 * 8 * 6 * 6 * 2]  # the ReLU's bfloat16 output
    assert_bitwise_equal(results[1][:2], results[0][:2])


def test_checkpointed_blocks_keep_their_behaviour_and_nothing_is_held():
    torch.manual_seed(0)
    plain = nn.Sequential(PostNormBlock(), PostNormBlock())
    checkpointed = nn.Sequential(PostNormBlock(), PostNormBlock())
    checkpointed.load_state_dict(plain.state_dict())
    enable_activation_checkpointing(list(checkpointed))
    x = torch.randn(3, 7, 16, requires_grad=True)
    grad = torch.randn(3, 7, 16)
    want = run(plain, (x,), grad, recompute=False)[:2]
    out, grads, counter = run(checkpointed, (x,), grad, recompute=True)
    assert_bitwise_equal((out, grads), want)
    assert not counter.replaced  # inside the checkpointed blocks the checkpoint's own hooks save

    # a recorded norm output that is never saved through these hooks holds its input weakly
    norm = nn.LayerNorm(16)
    inner = torch.randn(3, 16, requires_grad=True) * 2
    with RecomputedNormOutputs([norm]) as context:
        with torch.autograd.graph.saved_tensors_hooks(lambda t: None, lambda t: t):  # an inner hook saves nothing
            out = norm(inner)
        source = weakref.ref(inner)
        del inner
        assert source() is None and len(context._recipes) == 1  # recorded, and its input already freed
    assert out.requires_grad


def test_an_input_modified_in_place_after_the_forward_is_a_clear_error():
    block = PostNormBlock()
    x = torch.randn(3, 7, 16, requires_grad=True)
    with RecomputedNormOutputs(block.modules()):
        hidden = x * 1.0
        norm_input = hidden + block.fc1(hidden)
        out = block.fc2(block.norm1(norm_input))
    with torch.no_grad():
        norm_input.add_(1.0)  # the LayerNorm's saved input changes after its output was recorded
    with pytest.raises(RuntimeError, match="modified in place after the forward pass.*recompute_norm_outputs=false"):
        out.sum().backward()


def test_nothing_is_hooked_without_autograd():
    block = PostNormBlock()
    with torch.no_grad(), RecomputedNormOutputs(block.modules()) as context:
        block(torch.randn(2, 16))
        assert context._saved_hooks is None and not context._handles
    assert not block.norm1._forward_hooks
