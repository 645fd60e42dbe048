"""The folding algebra on plain arrays: no ONNX in here.

A BatchNormalization in inference is the per-channel affine map ``y = s * x + t`` with
``s = gamma / sqrt(var + eps)`` and ``t = beta - mean * s``. Folding it into a linear
producer ``x = W * in + b`` scales W along the producer's output-channel axis by ``s``
and replaces the bias with ``s * b + t``. Everything is computed in float64; callers
cast the result once to the model's dtype.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def bn_scale_shift(
    gamma: np.ndarray, beta: np.ndarray, mean: np.ndarray, var: np.ndarray, eps: float
) -> tuple[np.ndarray, np.ndarray]:
    """BatchNormalization parameters as the affine map ``(s, t)``, in float64."""
    gamma, beta, mean, var = (np.asarray(a, dtype=np.float64) for a in (gamma, beta, mean, var))
    scale = gamma / np.sqrt(var + np.float64(eps))
    return scale, beta - mean * scale


def output_channel_factor(shape: tuple[int, ...], scale: np.ndarray, axis: int, groups: int = 1) -> np.ndarray:
    """Per-element multipliers, broadcastable to a weight of ``shape``, for ``W (.)_out s``.

    ``axis`` is the weight axis that indexes output channels within a group. With
    ``groups > 1`` and ``axis == 1`` (ConvTranspose, weight ``(C_in, C_out/g, k...)``)
    the output channel of ``(ci, co)`` is ``(ci // (C_in/g)) * (C_out/g) + co``, so the
    factor is laid out per group along axis 0 as well. The factor holds one value per
    channel (pair), never per kernel element, so it stays small.
    """
    scale = np.asarray(scale, dtype=np.float64)
    if axis == 1 and groups > 1:
        return _grouped_factor(shape, scale, groups)
    factor_shape = [1] * len(shape)
    factor_shape[axis] = scale.shape[0]
    return scale.reshape(factor_shape)


def input_channel_factor(shape: tuple[int, ...], scale: np.ndarray, in_axis: int, groups: int = 1) -> np.ndarray:
    """Per-element multipliers for ``W (.)_in s``: the weight of ``W * (s * x)``.

    Grouped Conv weights are ``(M, C/g, k...)``: weight ``[m, j]`` reads input channel
    ``(m // (M/g)) * (C/g) + j``. Other ops (groups 1) read input channel ``i`` along
    ``in_axis``.
    """
    scale = np.asarray(scale, dtype=np.float64)
    if groups > 1:
        return _grouped_factor(shape, scale, groups)
    factor_shape = [1] * len(shape)
    factor_shape[in_axis] = scale.shape[0]
    return scale.reshape(factor_shape)


def _grouped_factor(shape: tuple[int, ...], scale: np.ndarray, groups: int) -> np.ndarray:
    """Factor for weight ``[a, b]`` = ``scale[(a // (shape[0]/g)) * shape[1] + b]``."""
    rows, per_group = shape[0], shape[1]
    grid = np.broadcast_to(scale.reshape(groups, 1, per_group), (groups, rows // groups, per_group))
    return grid.reshape(rows, per_group, *([1] * (len(shape) - 2)))


def scale_output_channels(weight: np.ndarray, scale: np.ndarray, axis: int, groups: int = 1) -> np.ndarray:
    """``W (.)_out s`` in float64."""
    weight = np.asarray(weight, dtype=np.float64)
    return weight * output_channel_factor(weight.shape, scale, axis, groups)


def scale_input_channels(weight: np.ndarray, scale: np.ndarray, in_axis: int, groups: int = 1) -> np.ndarray:
    """``W (.)_in s`` in float64."""
    weight = np.asarray(weight, dtype=np.float64)
    return weight * input_channel_factor(weight.shape, scale, in_axis, groups)


def apply_factor(source: np.ndarray, factor: np.ndarray, dtype: np.dtype, block_elements: int = 1 << 17,
                 done: Callable[[], None] | None = None) -> np.ndarray:
    """``source * factor`` computed in float64 block by block, cast once to ``dtype``.

    Blocks along axis 0 go through one reused, cache-sized float64 buffer, so folding a
    huge tensor costs one output-sized buffer and little else; ``done()`` runs after each
    block (to let go of a mapped source's pages). The caller has checked, with
    ``peak_by_factor``, that the result fits ``dtype``.
    """
    dtype = np.dtype(dtype)
    out = np.empty(source.shape, dtype=dtype)
    row = max(1, source[0].size)
    rows = max(1, block_elements // row)
    buffer = np.empty((rows, *source.shape[1:]), dtype=np.float64)
    for start in range(0, source.shape[0], rows):
        stop = min(source.shape[0], start + rows)
        part = buffer[: stop - start]
        part[...] = source[start:stop]
        np.multiply(part, factor if factor.shape[0] == 1 else factor[start:stop], out=part)
        out[start:stop] = part  # the single rounding to the model's dtype
        if done is not None:
            done()
    return out


def peak_by_factor(weight: np.ndarray, factor: np.ndarray, block_elements: int = 1 << 20,
                   done: Callable[[], None] | None = None) -> np.ndarray:
    """``max |W|`` over the elements that share one value of ``factor``, shaped to broadcast
    with it. ``max |W| * |factor|`` is then the largest magnitude of each folded cell, so
    one small array decides whether the folded weight fits its dtype (NaN propagates).

    ``max |W|`` is ``max(max W, -min W)``, exact in the weight's own dtype: no float64 copy
    of the weight is made. Read in blocks along axis 0, so a huge weight is touched one
    block at a time; ``done()`` runs after each block.
    """
    axes = tuple(a for a in range(weight.ndim) if factor.shape[a] == 1)
    rows = max(1, block_elements // max(1, weight[0].size))
    parts = []
    for start in range(0, weight.shape[0], rows):
        block = weight[start:start + rows]
        with np.errstate(invalid="ignore"):  # a NaN is the answer here, not a problem
            high, low = block.max(axis=axes, keepdims=True), block.min(axis=axes, keepdims=True)
        parts.append(np.maximum(high.astype(np.float64), -low.astype(np.float64)))
        if done is not None:
            done()
    if 0 in axes:
        return np.maximum.reduce(parts) if len(parts) > 1 else parts[0]
    return np.concatenate(parts, axis=0)


def shifted_bias(bias: np.ndarray | None, scale: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """New bias ``s * b + t`` for a producer whose old bias is ``b`` (None: zero).

    ``b`` may be any shape that broadcasts against the channel vector (Gemm's C can be
    a scalar, ``[N]``, ``[1, N]`` or ``[M, N]``); the result has the broadcast shape.
    """
    if bias is None:
        return np.asarray(shift, dtype=np.float64).copy()
    return np.asarray(bias, dtype=np.float64) * scale + shift


def max_relative_change(scale: np.ndarray) -> float:
    """Largest relative change a fold writes into the weights: ``max |s - 1|``.

    Every weight element is multiplied by one ``s``, so its relative change is exactly
    ``|s - 1|`` whatever its value; no need to read the weights to report it.
    """
    return float(np.max(np.abs(np.asarray(scale, dtype=np.float64) - 1.0)))


def cast_checked(values: np.ndarray, dtype: np.dtype) -> np.ndarray | None:
    """Cast float64 ``values`` to ``dtype`` once; None if a finite value overflows it."""
    with np.errstate(over="ignore"):
        cast = values.astype(dtype)
    if not np.all(np.isfinite(cast.astype(np.float64)) | ~np.isfinite(values)):
        return None
    return cast


def input_shift_bias(weight: np.ndarray, shift: np.ndarray, in_axis: int, out_axis: int, groups: int = 1) -> np.ndarray:
    """``W * t`` for a shift ``t`` constant over space: one value per output channel.

    Summing the weight times the input-channel shift over every axis but the output one
    is the contribution of ``t`` to each output, exact whenever no padding is involved.
    """
    weight = np.asarray(weight, dtype=np.float64)
    weighted = scale_input_channels(weight, shift, in_axis, groups)
    axes = tuple(a for a in range(weight.ndim) if a != out_axis)
    return weighted.sum(axis=axes)


def merge_rows(shape: tuple[int, ...], start: int, stop: int,
               kernels: list[tuple[np.ndarray, tuple[int, ...]]],
               diagonals: list[tuple[np.ndarray, tuple[int, ...], tuple[int, ...]]]) -> np.ndarray:
    """Rows ``start:stop`` (output channels) of a merged conv kernel of ``shape``, in float64.

    Parallel branches that read one tensor and are summed are one conv whose kernel is the
    sum of theirs, each placed inside the largest. A kernel term ``(rows, offset)`` adds its
    (already scaled) rows at ``offset`` along the spatial axes. A diagonal term
    ``(multiplier_rows, offset, window)`` adds ``m_o / prod(window)`` to input channel
    ``o mod shape[1]`` of each output channel ``o`` over ``window`` at ``offset``: the
    identity (window all 1s, grouped or depthwise alike) and an average pool.
    """
    out = np.zeros((stop - start, *shape[1:]), dtype=np.float64)
    for rows, offset in kernels:
        place = tuple(slice(o, o + k) for o, k in zip(offset, rows.shape[2:]))
        out[(slice(None), slice(None), *place)] += rows
    channels = np.arange(start, stop)
    for multiplier, offset, window in diagonals:
        place = tuple(slice(o, o + k) for o, k in zip(offset, window))
        block = out[(slice(None), slice(None), *place)]
        block[np.arange(stop - start), channels % shape[1]] += (multiplier / np.prod(window)).reshape(
            [-1] + [1] * len(window))
    return out
