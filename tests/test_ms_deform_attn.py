"""Multi-scale deformable attention and the Mask2Former pixel decoder built on it."""

from __future__ import annotations

import pytest
import torch

from densepred.necks.ms_deform_attn import (
    MSDeformAttn,
    get_ms_deform_attn_implementation,
    ms_deform_attn_core,
    register_ms_deform_attn_implementation,
    resolve_ms_deform_attn_implementation,
)
from densepred.necks.ms_deform_attn_bag import ms_deform_attn_bag
from densepred.necks.msdeform_pixel_decoder import MSDeformAttnPixelDecoder

SHAPES = [(3, 5), (2, 3), (1, 2)]


def bilinear_zero_padded(image: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """Value of image (C, H, W) at continuous (x, y) in [0, 1] coordinates of its border (pixel centres at
    (i + 0.5) / size), bilinear between the four neighbouring pixels, reading zero outside the image."""
    channels, height, width = image.shape
    px, py = x * width - 0.5, y * height - 0.5  # position in pixel-index units
    x0, y0 = int(torch.floor(torch.tensor(px))), int(torch.floor(torch.tensor(py)))
    result = torch.zeros(channels, dtype=torch.float64)
    for yi in (y0, y0 + 1):
        for xi in (x0, x0 + 1):
            weight = (1 - abs(px - xi)) * (1 - abs(py - yi))
            if 0 <= yi < height and 0 <= xi < width:
                result += weight * image[:, yi, xi].double()
    return result


def direct_ms_deform_attn(value, spatial_shapes, sampling_locations, attention_weights) -> torch.Tensor:
    """Loop over batch, query, head, level and point: sum of weight * bilinear sample."""
    batch, _, heads, dim = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    out = torch.zeros(batch, queries, heads, dim, dtype=torch.float64)
    start = 0
    maps = []
    for height, width in spatial_shapes:
        maps.append(value[:, start : start + height * width].reshape(batch, height, width, heads, dim))
        start += height * width
    for b in range(batch):
        for q in range(queries):
            for h in range(heads):
                for lvl in range(levels):
                    image = maps[lvl][b, :, :, h].permute(2, 0, 1)  # (dim, H, W)
                    for p in range(points):
                        x, y = sampling_locations[b, q, h, lvl, p].tolist()
                        out[b, q, h] += attention_weights[b, q, h, lvl, p].double() * bilinear_zero_padded(image, x, y)
    return out.reshape(batch, queries, heads * dim)


def random_inputs(batch=2, queries=4, heads=2, dim=3, points=2):
    g = torch.Generator().manual_seed(0)
    total = sum(h * w for h, w in SHAPES)
    value = torch.randn(batch, total, heads, dim, generator=g)
    # locations from -0.3 to 1.3: some fall outside every level, where zero padding matters
    locations = torch.rand(batch, queries, heads, len(SHAPES), points, 2, generator=g) * 1.6 - 0.3
    weights = torch.rand(batch, queries, heads, len(SHAPES), points, generator=g)
    weights = weights / weights.sum((-1, -2), keepdim=True)
    starts = [0, SHAPES[0][0] * SHAPES[0][1], SHAPES[0][0] * SHAPES[0][1] + SHAPES[1][0] * SHAPES[1][1]]
    return value, starts, locations, weights


def test_grid_sample_core_equals_direct_loop():
    value, starts, locations, weights = random_inputs()
    assert ((locations < 0) | (locations > 1)).any() and ((locations > 0) & (locations < 1)).all(-1).any()
    ours = ms_deform_attn_core(value, SHAPES, starts, locations, weights)
    expected = direct_ms_deform_attn(value, SHAPES, locations, weights)
    assert ours.shape == (2, 4, 2 * 3)
    torch.testing.assert_close(ours.double(), expected, atol=1e-5, rtol=0)


def test_sampling_at_a_pixel_centre_reads_that_pixel():
    # one level (2, 3), one head, one point at the centre of pixel (row 1, col 2): the result is that pixel
    value = torch.arange(6.0).view(1, 6, 1, 1)
    locations = torch.tensor([(2 + 0.5) / 3, (1 + 0.5) / 2]).view(1, 1, 1, 1, 1, 2)
    out = ms_deform_attn_core(value, [(2, 3)], [0], locations, torch.ones(1, 1, 1, 1, 1))
    assert out.item() == pytest.approx(5.0)


def test_module_uses_the_registered_implementation_and_offsets_in_pixels():
    calls = []

    def recording(value, spatial_shapes, level_start_index, locations, weights):
        calls.append((list(spatial_shapes), list(level_start_index), locations))
        return ms_deform_attn_core(value, spatial_shapes, level_start_index, locations, weights)

    register_ms_deform_attn_implementation("recording", recording)
    assert get_ms_deform_attn_implementation("recording") is recording
    attn = MSDeformAttn(embed_dim=8, num_levels=3, num_heads=2, num_points=2, implementation="recording")
    total = sum(h * w for h, w in SHAPES)
    query = torch.randn(1, 5, 8)
    refs = torch.rand(1, 5, 3, 2)
    out = attn(query, refs, torch.randn(1, total, 8), SHAPES, [0, 15, 21])
    assert out.shape == (1, 5, 8) and len(calls) == 1
    shapes, starts, locations = calls[0]
    assert shapes == SHAPES and starts == [0, 15, 21]
    # at initialisation the offsets are the bias: head 0 points along +x, k pixels for point k (1-based)
    for level, (height, width) in enumerate(SHAPES):
        dx = (locations[0, :, 0, level, :, 0] - refs[0, :, None, level, 0]) * width
        dy = (locations[0, :, 0, level, :, 1] - refs[0, :, None, level, 1]) * height
        torch.testing.assert_close(dx, torch.tensor([1.0, 2.0]).expand(5, 2))
        torch.testing.assert_close(dy, torch.zeros(5, 2), atol=1e-6, rtol=0)


def test_self_attention_with_one_position_embedding_for_the_batch_keeps_no_query_plus_position_sum():
    # as in the pixel decoder's encoder layers: query = value = src (B, S, C), query_pos (1, S, C) for the batch
    attn = MSDeformAttn(embed_dim=8, num_levels=3, num_heads=2, num_points=2)
    total = sum(h * w for h, w in SHAPES)
    src = torch.randn(2, total, 8, requires_grad=True)
    pos = torch.randn(1, total, 8, requires_grad=True)
    sized_like_src = set()

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage().data_ptr()
        if tensor.numel() == src.numel() and storage != src.untyped_storage().data_ptr():
            sized_like_src.add(storage)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        attn(src, torch.rand(2, total, 3, 2), src, SHAPES, [0, 15, 21], query_pos=pos)
    # besides src itself, only the output projection's input: not src + pos for the offsets and for the weights
    assert len(sized_like_src) == 1


def test_unknown_implementation_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown multi-scale deformable attention implementation 'cuda'.*pytorch"):
        MSDeformAttn(implementation="cuda")


def tiny_decoder(**kwargs) -> MSDeformAttnPixelDecoder:
    return MSDeformAttnPixelDecoder(
        in_channels=[8, 16, 24, 32],
        in_strides=[4, 8, 16, 32],
        conv_dim=32,
        mask_dim=16,
        encoder_layers=2,
        num_heads=4,
        num_points=2,
        dim_feedforward=64,
        num_groups=8,
        **kwargs,
    )


def tiny_features(batch=2, height=64, width=96) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    channels, strides = [8, 16, 24, 32], [4, 8, 16, 32]
    return [torch.randn(batch, c, height // s, width // s, generator=g) for c, s in zip(channels, strides, strict=True)]


def test_pixel_decoder_shapes():
    decoder = tiny_decoder().eval()
    out = decoder(tiny_features())
    assert decoder.mask_dim == 16 and decoder.out_channels == 32
    assert out.mask_features.shape == (2, 16, 16, 24)
    assert [tuple(x.shape) for x in out.multi_scale_features] == [(2, 32, 2, 3), (2, 32, 4, 6), (2, 32, 8, 12)]


def test_pixel_decoder_runs_deformable_attention_in_float32_under_autocast():
    dtypes = []

    def recording(value, spatial_shapes, level_start_index, locations, weights):
        dtypes.append((value.dtype, locations.dtype, weights.dtype))
        return ms_deform_attn_core(value, spatial_shapes, level_start_index, locations, weights)

    register_ms_deform_attn_implementation("dtype_recording", recording)
    decoder = tiny_decoder(implementation="dtype_recording").eval()
    features = tiny_features()
    reference = decoder(features)
    assert len(dtypes) == 2
    dtypes.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = decoder([f.bfloat16() for f in features])
    assert dtypes == [(torch.float32,) * 3] * 2
    assert out.mask_features.dtype == torch.float32
    assert all(x.dtype == torch.float32 for x in out.multi_scale_features)
    # the only difference from the float32 run is the bf16 rounding of the backbone maps
    torch.testing.assert_close(out.mask_features, reference.mask_features, atol=0.05, rtol=0.05)


def test_pixel_decoder_refuses_strides_it_cannot_use():
    with pytest.raises(ValueError, match=r"in_strides=\[8, 16, 32\].*backbone.out_features"):
        MSDeformAttnPixelDecoder(in_channels=[16, 24, 32], in_strides=[8, 16, 32])
    with pytest.raises(ValueError, match="conv_dim=48 must be divisible by num_groups=32"):
        MSDeformAttnPixelDecoder(in_channels=[8, 16, 24, 32], in_strides=[4, 8, 16, 32], conv_dim=48)


def random_bag_inputs(shapes, batch=2, heads=2, head_dim=4, points=3, queries=7, spread=2.0, dtype=torch.float64):
    """Inputs of `ms_deform_attn_core` with locations up to `spread` / 2 outside [0, 1] on each side."""
    g = torch.Generator().manual_seed(0)
    total = sum(h * w for h, w in shapes)
    value = torch.randn(batch, total, heads, head_dim, generator=g, dtype=dtype)
    locations = torch.rand(batch, queries, heads, len(shapes), points, 2, generator=g, dtype=dtype)
    locations = locations * spread - (spread - 1) / 2
    weights = torch.rand(batch, queries, heads, len(shapes), points, generator=g, dtype=dtype)
    return value, locations, weights


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_embedding_bag_core_equals_the_grid_sample_core_values_and_gradients(dtype):
    shapes = [(5, 7), (3, 4), (2, 2), (1, 1)]
    starts = [0, 35, 47, 51]
    value, locations, weights = random_bag_inputs(shapes, dtype=dtype)
    # points a quarter pixel from a centre, on the border and one pixel beyond it (not on a centre, where the
    # location gradient jumps and either one-sided value is right)
    locations[0, 0, 0, 0, :, 0] = torch.tensor([0.75 / 7, 0.0, -1 / 7], dtype=dtype)
    locations[0, 0, 0, 0, :, 1] = torch.tensor([1.25 / 5, 1.0, 1 + 1 / 5], dtype=dtype)
    grad = torch.randn(2, 7, 8, generator=torch.Generator().manual_seed(1), dtype=dtype)
    results = []
    for fn in (ms_deform_attn_core, ms_deform_attn_bag):
        inputs = [t.clone().requires_grad_() for t in (value, locations, weights)]
        out = fn(inputs[0], shapes, starts, inputs[1], inputs[2])
        results.append((out, *torch.autograd.grad(out, inputs, grad)))
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    for expected, got in zip(*results, strict=True):
        torch.testing.assert_close(got, expected, atol=tolerance, rtol=tolerance)


def test_auto_implementation_is_embedding_bag_on_cpu_and_modules_agree():
    assert resolve_ms_deform_attn_implementation("auto", torch.device("cpu")) is ms_deform_attn_bag
    torch.manual_seed(0)
    reference = tiny_decoder(implementation="pytorch").eval()
    fast = tiny_decoder()  # "auto"
    fast.load_state_dict(reference.state_dict())
    features = tiny_features()
    want, got = reference(features), fast.eval()(features)
    torch.testing.assert_close(got.mask_features, want.mask_features, atol=1e-5, rtol=1e-5)
