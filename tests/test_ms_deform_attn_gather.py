"""The portable deformable-attention core (gathers): the reference's values and gradients, its zero padding at
the borders, the registry entry, and "auto" choosing it while exporting."""

from __future__ import annotations

import torch
from test_ms_deform_attn import SHAPES, direct_ms_deform_attn, random_inputs

from densepred.necks.ms_deform_attn import (
    MSDeformAttn,
    get_ms_deform_attn_implementation,
    ms_deform_attn_core,
    resolve_ms_deform_attn_implementation,
)
from densepred.necks.ms_deform_attn_gather import ms_deform_attn_gather


def test_gather_core_equals_the_reference_and_the_direct_loop():
    value, starts, locations, weights = random_inputs()
    ours = ms_deform_attn_gather(value, SHAPES, starts, locations, weights)
    torch.testing.assert_close(ours, ms_deform_attn_core(value, SHAPES, starts, locations, weights), atol=1e-6, rtol=0)
    torch.testing.assert_close(
        ours.double(), direct_ms_deform_attn(value, SHAPES, locations, weights), atol=1e-5, rtol=0
    )


def test_gather_core_reads_zeros_beyond_the_border_like_grid_sample():
    # one level (2, 3) of ones: inside, a point reads 1; half a pixel out of the border, a half-weighted
    # corner; a full pixel out, nothing (grid_sample align_corners=False, padding_mode zeros)
    value = torch.ones(1, 6, 1, 1)
    xs = torch.tensor([0.5, 0.0, -1 / 6, 1.0, 1 + 1 / 6, 0.5, 0.5, 0.5, 0.5])
    ys = torch.tensor([0.5, 0.5, 0.5, 0.5, 0.5, 0.0, 1.0, -0.25, 1.25])
    locations = torch.stack([xs, ys], -1).view(1, 9, 1, 1, 1, 2)
    weights = torch.ones(1, 9, 1, 1, 1)
    ours = ms_deform_attn_gather(value, [(2, 3)], [0], locations, weights).flatten()
    reference = ms_deform_attn_core(value, [(2, 3)], [0], locations, weights).flatten()
    torch.testing.assert_close(ours, torch.tensor([1.0, 0.5, 0.0, 0.5, 0.0, 0.5, 0.5, 0.0, 0.0]))
    torch.testing.assert_close(ours, reference)


def test_gather_core_gradients_equal_the_reference():
    value, starts, locations, weights = random_inputs()
    grad_out = torch.randn(2, 4, 6, generator=torch.Generator().manual_seed(3))

    def grads(core):
        inputs = [t.clone().requires_grad_() for t in (value, locations, weights)]
        (core(inputs[0], SHAPES, starts, inputs[1], inputs[2]) * grad_out).sum().backward()
        return [t.grad for t in inputs]

    for ours, reference, name in zip(grads(ms_deform_attn_gather), grads(ms_deform_attn_core), "vlw", strict=True):
        assert ours.abs().sum() > 0, name
        torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5, msg=name)


def test_gather_is_registered_and_auto_takes_it_while_exporting():
    assert get_ms_deform_attn_implementation("gather") is ms_deform_attn_gather
    assert resolve_ms_deform_attn_implementation("auto", torch.device("cpu")) is not ms_deform_attn_gather
    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen.append(resolve_ms_deform_attn_implementation("auto", x.device))
            return x + 1

    torch.export.export(Probe(), (torch.zeros(2),), strict=False)
    assert seen == [ms_deform_attn_gather]


def test_msdeform_attn_module_with_the_gather_core_exports_with_dynamic_level_sizes():
    torch.manual_seed(0)
    attn = MSDeformAttn(embed_dim=8, num_levels=2, num_heads=2, num_points=2).eval()
    torch.nn.init.normal_(attn.sampling_offsets.weight, std=0.5)

    class Levels(torch.nn.Module):
        """Two levels (h, w) and (h / 2, w / 2) of one map: the level sizes follow the input's."""

        def forward(self, x):  # (B, C, h, w)
            levels = [x, torch.nn.functional.avg_pool2d(x, 2)]
            shapes = [(t.shape[2], t.shape[3]) for t in levels]
            value = torch.cat([t.flatten(2).transpose(1, 2) for t in levels], 1)
            points = value[..., :4].sigmoid().unflatten(-1, (2, 2))  # (B, S, levels, 2)
            return attn(value, points, value, shapes, [0, shapes[0][0] * shapes[0][1]])

    model = Levels()
    dim = torch.export.Dim.DYNAMIC
    program = torch.export.export(model, (torch.randn(2, 8, 6, 8),), dynamic_shapes=({0: dim, 2: dim, 3: dim},))
    for size in [(2, 8, 6, 8), (1, 8, 10, 4)]:
        x = torch.randn(size)
        attn.implementation = "pytorch"
        expected = model(x)
        attn.implementation = "auto"
        torch.testing.assert_close(program.module()(x), expected, atol=1e-5, rtol=0)
