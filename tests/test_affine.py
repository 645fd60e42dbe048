"""The folding algebra against direct evaluation, with no ONNX involved."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bnfold import affine

channels = st.integers(1, 8)
seeds = st.integers(0, 2**32 - 1)


@given(channels, seeds, st.sampled_from([1e-5, 1e-3, 0.1]))
def test_bn_scale_shift_is_the_bn_map(c, seed, eps):
    rng = np.random.default_rng(seed)
    gamma, beta, mean = rng.standard_normal((3, c))
    var = rng.uniform(0.01, 4.0, c)
    x = rng.standard_normal((5, c))
    s, t = affine.bn_scale_shift(gamma, beta, mean, var, eps)
    direct = gamma * (x - mean) / np.sqrt(var + eps) + beta
    np.testing.assert_allclose(s * x + t, direct, rtol=1e-12, atol=1e-12)


def _convtranspose_channel_of(ci: int, co: int, c_in: int, groups: int, per_group_out: int) -> int:
    return (ci // (c_in // groups)) * per_group_out + co


@given(st.sampled_from([1, 2, 3, 4]), st.integers(1, 3), st.integers(1, 3), seeds)
def test_convtranspose_grouped_scale_uses_the_true_output_channel(groups, in_per_group, out_per_group, seed):
    rng = np.random.default_rng(seed)
    c_in = groups * in_per_group
    weight = rng.standard_normal((c_in, out_per_group, 2, 2))
    scale = rng.standard_normal(groups * out_per_group)
    got = affine.scale_output_channels(weight, scale, axis=1, groups=groups)
    for ci in range(c_in):
        for co in range(out_per_group):
            channel = _convtranspose_channel_of(ci, co, c_in, groups, out_per_group)
            np.testing.assert_allclose(got[ci, co], weight[ci, co] * scale[channel], rtol=1e-15)


@given(st.integers(0, 2), st.integers(1, 4), st.integers(1, 4), seeds)
def test_scale_output_channels_along_axis(axis, n_out, other, seed):
    rng = np.random.default_rng(seed)
    shape = [other, other, other]
    shape[axis] = n_out
    weight = rng.standard_normal(shape)
    scale = rng.standard_normal(n_out)
    got = affine.scale_output_channels(weight, scale, axis=axis)
    expected = np.moveaxis(np.moveaxis(weight, axis, -1) * scale, -1, axis)
    np.testing.assert_allclose(got, expected, rtol=1e-15)


@given(st.sampled_from([None, (), (1,), (4,), (1, 4), (3, 4), (3, 1)]), seeds)
def test_shifted_bias_broadcasts_like_gemm_c(bias_shape, seed):
    rng = np.random.default_rng(seed)
    s, t = rng.standard_normal((2, 4))
    bias = None if bias_shape is None else rng.standard_normal(bias_shape)
    got = affine.shifted_bias(bias, s, t)
    y = rng.standard_normal((3, 4))  # any pre-bias activation
    before = s * (y + (0 if bias is None else bias)) + t
    np.testing.assert_allclose(y * s + got, before, rtol=1e-12, atol=1e-12)


@given(channels, seeds)
@settings(max_examples=50)
def test_max_relative_change_matches_the_weights(c, seed):
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((c, 3)) + 5.0  # keep away from zero for a stable ratio
    scale = rng.uniform(0.1, 3.0, c)
    folded = affine.scale_output_channels(weight, scale, axis=0)
    measured = np.max(np.abs(folded - weight) / np.abs(weight))
    np.testing.assert_allclose(affine.max_relative_change(scale), measured, rtol=1e-12)


def test_cast_checked_refuses_overflow_but_keeps_existing_infinities():
    assert affine.cast_checked(np.array([1.0, 70000.0]), np.float16) is None
    kept = affine.cast_checked(np.array([1.0, np.inf]), np.float16)
    assert kept is not None and kept.dtype == np.float16 and np.isinf(kept[1])
    exact = affine.cast_checked(np.array([0.5, -2.0]), np.float32)
    np.testing.assert_array_equal(exact, np.array([0.5, -2.0], dtype=np.float32))


@given(st.integers(1, 9), st.integers(1, 4), st.integers(1, 50), st.sampled_from([np.float32, np.float16]), seeds)
@settings(max_examples=50)
def test_chunked_factor_application_equals_one_shot(rows, cols, chunk, dtype, seed):
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((rows, cols, 2)).astype(dtype)
    scale = rng.standard_normal(rows)
    factor = affine.output_channel_factor(weight.shape, scale, axis=0)
    chunked = affine.apply_factor(weight, factor, np.dtype(dtype), block_elements=chunk)
    np.testing.assert_array_equal(chunked, (weight.astype(np.float64) * factor).astype(dtype))


@given(st.integers(1, 9), st.integers(1, 4), st.integers(1, 50), st.sampled_from([0, 1, 2]), seeds)
@settings(max_examples=50)
def test_peak_by_factor_bounds_every_folded_cell_exactly(rows, cols, block, axis, seed):
    """max|W| per factor cell times |factor| is the largest magnitude of the folded weight
    in that cell: the planner's overflow test is exact, whatever the block size."""
    rng = np.random.default_rng(seed)
    weight = (rng.standard_normal((rows, cols, 3)) * 10).astype(np.float32)
    scale = rng.standard_normal(weight.shape[axis])
    factor = affine.output_channel_factor(weight.shape, scale, axis=axis)
    peak = affine.peak_by_factor(weight, factor, block_elements=block)
    folded = np.abs(weight.astype(np.float64) * factor)
    np.testing.assert_array_equal(np.broadcast_to(peak * np.abs(factor), folded.shape).max(),
                                  folded.max())
    reduced = tuple(a for a in range(3) if factor.shape[a] == 1)
    np.testing.assert_array_equal(peak * np.abs(factor), folded.max(axis=reduced, keepdims=True))


def test_peak_by_factor_finds_overflow_and_non_finite_weights():
    weight = np.full((4, 3), 60000, np.float16)
    factor = affine.output_channel_factor(weight.shape, np.array([1.0, 1.0, 2.0, 1.0]), axis=0)
    peak = affine.peak_by_factor(weight, factor, block_elements=3)
    assert affine.cast_checked(peak * np.abs(factor), np.dtype(np.float16)) is None
    weight[1, 2] = np.inf
    assert not np.all(np.isfinite(affine.peak_by_factor(weight, factor)))


def test_apply_factor_releases_after_every_block():
    weight = np.ones((6, 2), np.float32)
    calls = []
    affine.apply_factor(weight, np.ones((6, 1)), np.dtype(np.float32), block_elements=4, done=lambda: calls.append(1))
    assert len(calls) == 3


@given(st.sampled_from([np.float32, np.float16]), seeds)
@settings(max_examples=20)
def test_the_algebra_runs_in_float64_whatever_the_parameters_dtype(dtype, seed):
    """bnfold computes in float64 and casts once: parameters stored as float32 or float16
    give exactly what their float64 values give, never a float32 computation."""
    rng = np.random.default_rng(seed)
    gamma, beta, mean = (rng.standard_normal((3, 5)) * 3).astype(dtype)
    var = rng.uniform(0.01, 4.0, 5).astype(dtype)
    wide = [np.asarray(a, np.float64) for a in (gamma, beta, mean, var)]
    for got, want in zip(affine.bn_scale_shift(gamma, beta, mean, var, 1e-5), affine.bn_scale_shift(*wide, 1e-5)):
        assert got.dtype == np.float64
        np.testing.assert_array_equal(got, want)
    s, t, b = (rng.standard_normal(5).astype(dtype) for _ in range(3))
    for got, want in [(affine.shifted_bias(None, s, t), t.astype(np.float64)),
                      (affine.shifted_bias(b, s, t), b.astype(np.float64) * s.astype(np.float64) + t)]:
        assert got.dtype == np.float64
        np.testing.assert_array_equal(got, want)
    for factor in (affine.output_channel_factor((5, 2, 3), s, axis=0), affine.input_channel_factor((2, 5), s, 1)):
        assert factor.dtype == np.float64
        np.testing.assert_array_equal(factor.reshape(-1), s.astype(np.float64))
    assert affine.max_relative_change(s) == np.max(np.abs(s.astype(np.float64) - 1.0))


def test_input_scaling_and_shift_of_ungrouped_consumers():
    """``W (.)_in s`` and ``W t`` for a Gemm weight (features on axis 0) and a Conv weight
    (axis 1), against the consumer evaluated on ``s*x`` and on a constant input ``t``."""
    rng = np.random.default_rng(3)
    s, t, x = rng.standard_normal((3, 4))
    gemm = rng.standard_normal((4, 6))  # (K, N): y = x @ W
    np.testing.assert_allclose(x @ affine.scale_input_channels(gemm, s, in_axis=0), (s * x) @ gemm, rtol=1e-12)
    np.testing.assert_allclose(affine.input_shift_bias(gemm, t, in_axis=0, out_axis=1), t @ gemm, rtol=1e-12)
    conv = rng.standard_normal((3, 4, 2, 2))  # (M, C, kh, kw), a 2x2 window with no padding
    window = rng.standard_normal((4, 2, 2))
    scaled = affine.scale_input_channels(conv, s, in_axis=1)
    np.testing.assert_allclose(np.einsum("mchw,chw->m", scaled, window),
                               np.einsum("mchw,chw->m", conv, s[:, None, None] * window), rtol=1e-12)
    np.testing.assert_allclose(affine.input_shift_bias(conv, t, in_axis=1, out_axis=0),
                               np.einsum("mchw,c->m", conv, t), rtol=1e-12)


def test_grouped_conv_output_channels_are_the_weight_rows():
    """A grouped Conv's output channel m is its weight row m whatever the groups (only
    ConvTranspose lays its output channels out per group)."""
    rng = np.random.default_rng(4)
    weight, scale = rng.standard_normal((6, 2, 3, 3)), rng.standard_normal(6)
    np.testing.assert_array_equal(affine.scale_output_channels(weight, scale, axis=0, groups=3),
                                  weight * scale[:, None, None, None])


@pytest.mark.parametrize(("rows", "block_elements"), [(5, 6), (7, 9), (9, 8)])
def test_chunked_factor_application_with_a_short_last_block(rows, block_elements):
    """Rows that do not divide into whole blocks (a last block of 1 or 2 rows of 3) are
    written exactly as the one-shot product (the hypothesis test's examples are few under
    mutation testing's profile: this pins the case)."""
    rng = np.random.default_rng(rows)
    weight = rng.standard_normal((rows, 3)).astype(np.float32)
    factor = affine.output_channel_factor(weight.shape, rng.standard_normal(rows), axis=0)
    chunked = affine.apply_factor(weight, factor, np.dtype(np.float32), block_elements=block_elements)
    np.testing.assert_array_equal(chunked, (weight.astype(np.float64) * factor).astype(np.float32))


def test_chunked_factor_application_along_a_later_axis():
    """A weight folded along an axis other than 0 (a Gemm's N, a consumer Conv's input
    channels) written in many blocks equals the one-shot product."""
    rng = np.random.default_rng(5)
    weight = rng.standard_normal((7, 3, 2)).astype(np.float32)
    factor = affine.input_channel_factor(weight.shape, rng.standard_normal(3), in_axis=1)
    chunked = affine.apply_factor(weight, factor, np.dtype(np.float32), block_elements=6)
    np.testing.assert_array_equal(chunked, (weight.astype(np.float64) * factor).astype(np.float32))


def test_peak_by_factor_reads_every_block_along_a_later_axis():
    """The overflow check sees the weight's largest element even when it lies in the last
    of two blocks and the factor runs along another axis than the blocks."""
    weight = np.ones((4, 3), np.float16)
    weight[3, 1] = 40000
    factor = affine.input_channel_factor(weight.shape, np.array([1.0, 2.0, 1.0]), in_axis=1)
    peak = affine.peak_by_factor(weight, factor, block_elements=6)  # 2 rows a block: two blocks
    np.testing.assert_array_equal(peak, [[1.0, 40000.0, 1.0]])
    assert affine.cast_checked(peak * np.abs(factor), np.dtype(np.float16)) is None


def test_merged_kernel_rows_computed_in_blocks_equal_the_whole():
    """A merged conv kernel written a block of output channels at a time (large kernels)
    equals the kernel computed at once: kernel terms, the identity and an average pool."""
    rng = np.random.default_rng(6)
    shape = (6, 3, 3, 3)  # groups 2: 6 output channels, 3 input channels per group
    kernel, small = rng.standard_normal(shape), rng.standard_normal((6, 3, 1, 1))
    identity, pool = rng.standard_normal(6), rng.standard_normal(6)

    def rows(start, stop):
        return affine.merge_rows(shape, start, stop, [(kernel[start:stop], (0, 0)), (small[start:stop], (1, 1))],
                                 [(identity[start:stop], (1, 1), (1, 1)), (pool[start:stop], (0, 0), (3, 3))])

    whole = rows(0, 6)
    np.testing.assert_array_equal(np.concatenate([rows(0, 2), rows(2, 5), rows(5, 6)]), whole)
    expected = kernel.copy()
    expected[:, :, 1:2, 1:2] += small
    for o in range(6):
        expected[o, o % 3, 1, 1] += identity[o]
        expected[o, o % 3] += pool[o] / 9
    np.testing.assert_allclose(whole, expected, rtol=1e-12)
