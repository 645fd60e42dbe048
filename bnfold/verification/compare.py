"""Comparison of output arrays: pure numpy, no onnxruntime, no model.

An output is judged per element *and* per channel. The element criterion is numpy's
``allclose`` with each channel's own scale for the default atol; the channel criterion
bounds each channel's relative L2 error ``||diff_c|| / ||ref_c||``. A wrong fold is wrong
per channel, so neither test lets large channels hide a small one that is wrong.

Both are widened by the reference's own numerical noise where it is measured (``noise``:
the ORIGINAL run a second time, at another optimisation level): in channel c, by
``noise_factor`` times what that rerun moved channel c (its largest element change, and
its L2 norm). A channel the original computes reproducibly gets nothing; a channel whose
values are rounding noise of cancelling large terms gets room for that noise, and no more.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np


@dataclass(frozen=True)
class Tolerance:
    """What an output is held to.

    Element criterion: ``|a - b| <= atol * scale_c + rtol * |b| + noise_factor * max |d_c|``
    where ``scale_c`` is ``max(1, max |b| over channel c)`` when ``atol_scaled``, else 1.
    Channel criterion: ``||a_c - b_c|| <= channel_rtol * ||b_c|| + channel_atol * sqrt(n_c)
    + noise_factor * ||d_c||``. ``d`` is the reference's own drift (see the module); without
    it, the noise terms are 0.
    """

    rtol: float
    atol: float
    atol_scaled: bool = False
    channel_rtol: float = math.inf
    channel_atol: float = 0.0
    noise_factor: float = 0.0


#: Element defaults by output element type; integer and bool outputs must match exactly.
DEFAULT_TOLERANCES: dict[str, Tolerance] = {
    "float64": Tolerance(rtol=1e-7, atol=1e-9),
    "float32": Tolerance(rtol=1e-4, atol=1e-5),
    "float16": Tolerance(rtol=1e-2, atol=1e-3),
    "bfloat16": Tolerance(rtol=5e-2, atol=1e-2),
}
#: Channel defaults: (channel_rtol, channel_atol). A 1% change of one channel of an fp32
#: output (relative L2 error 1e-2) fails by 10x; rounding noise of correct folds of deep
#: fp32 networks measures below 1e-4 (docs/verify.md).
DEFAULT_CHANNEL_TOLERANCES: dict[str, tuple[float, float]] = {
    "float64": (1e-6, 1e-10),
    "float32": (1e-3, 1e-6),
    "float16": (1e-2, 1e-4),
    "bfloat16": (5e-2, 1e-3),
}
EXACT = Tolerance(rtol=0.0, atol=0.0, channel_rtol=0.0, channel_atol=0.0)
#: How many times the original's own drift a float comparison allows on top (0 for integers
#: and bool: exact). A correct fold changes rounding about as much as onnxruntime's own
#: optimisations do: on models built to cancel, and deep conv stacks, its largest change in
#: a channel measured 0.5-4x the original's drift there (docs/verify.md).
DEFAULT_NOISE_FACTOR = 4.0


def default_tolerance(dtype: str) -> Tolerance:
    """The tolerance an output of numpy dtype name ``dtype`` is held to by default."""
    element = DEFAULT_TOLERANCES.get(dtype)
    if element is None:
        return EXACT
    channel_rtol, channel_atol = DEFAULT_CHANNEL_TOLERANCES[dtype]
    return replace(element, atol_scaled=True, channel_rtol=channel_rtol, channel_atol=channel_atol,
                   noise_factor=DEFAULT_NOISE_FACTOR)


def resolve_tolerance(dtype: str, rtol: float | None, atol: float | None, channel_rtol: float | None,
                      noise_factor: float | None = None) -> Tolerance:
    """The default for ``dtype`` with the user's overrides.

    A given ``atol`` is absolute (not scaled) and is also the channel criterion's per-element
    floor; a given ``rtol`` loosens the channel rtol to at least itself, so that loosening
    the element criterion never leaves the channel one stricter than the user asked. A given
    ``noise_factor`` applies to float outputs only: integers and bool stay exact.
    """
    tolerance = default_tolerance(dtype)
    if noise_factor is not None and tolerance.noise_factor:
        tolerance = replace(tolerance, noise_factor=noise_factor)
    if rtol is not None:
        tolerance = replace(tolerance, rtol=rtol, channel_rtol=max(tolerance.channel_rtol, rtol))
    if atol is not None:
        tolerance = replace(tolerance, atol=atol, atol_scaled=False, channel_atol=max(tolerance.channel_atol, atol))
    if channel_rtol is not None:
        tolerance = replace(tolerance, channel_rtol=channel_rtol)
    return tolerance


@dataclass
class ChannelError:
    """One channel's relative L2 error, for the report's worst channels."""

    channel: int
    rel_diff: float
    rms_reference: float
    max_abs_diff: float
    passed: bool


@dataclass
class Difference:
    """How far a subject's output is from the reference's, Polygraphy style, plus per channel.

    Statistics use element pairs where both values are finite; matching NaNs (and equal
    infinities) count as equal, a non-finite value on one side only fails the element.
    """

    elements: int
    elements_failing: int
    nonfinite_mismatches: int
    max_abs_diff: float
    #: [run, *index] of the largest absolute difference; None when all are equal.
    max_abs_diff_index: list[int] | None
    #: [reference, subject] values at that index (integers exact).
    max_abs_diff_values: list[float | int] | None
    max_rel_diff: float
    mean_abs_diff: float
    cosine_similarity: float
    reference_nan: int
    reference_inf: int
    subject_nan: int
    subject_inf: int
    #: Smallest atol (in the tolerance's units: times each channel's scale when scaled)
    #: that passes with the rtol in force, and smallest rtol with the atol in force.
    min_passing_atol: float
    min_passing_rtol: float
    #: Axis the channels lie along (None: the output is judged as one channel).
    channel_axis: int | None = None
    channels: int = 1
    channels_failing: int = 0
    #: max over channels of ||diff_c|| / ||ref_c|| (0 where both are 0, inf where only ref_c is).
    max_channel_rel_diff: float = 0.0
    max_channel_rel_diff_channel: int | None = None
    #: The atol applied, smallest and largest over channels.
    atol_applied: list[float] = field(default_factory=list)
    #: Up to WORST_CHANNELS channels, worst relative error first.
    worst_channels: list[ChannelError] = field(default_factory=list)
    #: The reference's own drift (None: not measured): max |d| over the output, the element
    #: allowance ``noise_factor * max |d_c|`` applied (smallest and largest over channels),
    #: and the elements and channels that fail without the allowance and pass with it.
    noise_max: float | None = None
    noise_allowance: list[float] = field(default_factory=list)
    elements_within_noise: int = 0
    channels_within_noise: int = 0

    @property
    def passed(self) -> bool:
        return self.elements_failing == 0 and self.channels_failing == 0


WORST_CHANNELS = 3


def output_scale(arrays: Sequence[np.ndarray]) -> float:
    """``max(1, max |reference|)`` over an output (all channels): the scale of its largest channel."""
    largest = max((float(np.max(np.abs(a[np.isfinite(a)]), initial=0.0))
                   for a in arrays if _is_float(a)), default=0.0)
    return max(1.0, largest)


def _is_float(array: np.ndarray) -> bool:
    return np.issubdtype(array.dtype, np.inexact) or array.dtype.kind == "V"


def channel_axis_of(shape: Sequence[int], requested: int | None = 1) -> int | None:
    """The channel axis of an output of ``shape``: ``requested`` (default 1) where it exists."""
    if requested is None or len(shape) < 2:
        return None
    axis = requested + len(shape) if requested < 0 else requested
    return axis if 0 <= axis < len(shape) else None


def pooled_channel_axis(shapes: Sequence[Sequence[int]], axis: int | None) -> int | None:
    """``axis`` where every run has it and the same number of channels along it, else None
    (the output is judged as one channel): an output whose channel count changes from run
    to run (NonZero, Compress along it) has no channel that is the same in every run."""
    if axis is None or not shapes or any(axis >= len(shape) for shape in shapes):
        return None
    return axis if len({shape[axis] for shape in shapes}) == 1 else None


def _by_channel(arrays: Sequence[np.ndarray], axis: int | None) -> np.ndarray:
    """(C, M), in the arrays' own dtype: channel c of every run, flattened and concatenated."""
    rows = []
    for array in arrays:
        array = np.asarray(array)
        if axis is None:
            rows.append(array.reshape(1, array.size))
        else:
            channels = array.shape[axis]
            rows.append(np.moveaxis(array, axis, 0).reshape(channels, array.size // channels if channels else 0))
    return np.concatenate(rows, axis=1)


def _is_exact_type(array: np.ndarray) -> bool:
    """Integers and bool: compared in their own type, never through float64's 53 bits."""
    return array.dtype.kind in "biu"


def _abs_difference(ref: np.ndarray, sub: np.ndarray) -> np.ndarray:
    """|sub - ref| in float64. Integer differences are taken exactly first: ``high - low``
    in uint64 is exact for any two int64 or uint64 values (it is at most 2**64 - 1), so a
    difference of 1 between 2**60 and 2**60 + 1 stays 1."""
    if _is_exact_type(ref) and _is_exact_type(sub):
        ref, sub = (a.astype(np.int8) if a.dtype.kind == "b" else a for a in (ref, sub))
        high, low = np.maximum(ref, sub), np.minimum(ref, sub)
        return (high.astype(np.uint64) - low.astype(np.uint64)).astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        return np.abs(sub.astype(np.float64) - ref.astype(np.float64))


def _value(array: np.ndarray, c: int, m: int) -> float | int:
    """An element for the report: integers as exact Python ints, the rest as floats."""
    return int(array[c, m]) if _is_exact_type(array) else float(array[c, m])


def compare_arrays(
    reference: Sequence[np.ndarray],
    subject: Sequence[np.ndarray],
    tolerance: Tolerance,
    channel_axis: int | None = None,
    noise: Sequence[np.ndarray] | None = None,
) -> Difference:
    """Compare per-run arrays (each run's two arrays of one shape), all runs pooled, per
    channel along ``channel_axis`` (see ``pooled_channel_axis``); floats in float64,
    integers and bool exactly. ``noise``: the reference model's second run (same inputs,
    another optimisation level), whose drift from ``reference`` widens both criteria by
    ``tolerance.noise_factor`` times that drift, channel by channel."""
    shapes = [tuple(np.shape(a)) for a in reference]
    channel_axis = pooled_channel_axis(shapes, channel_axis)
    ref_native = _by_channel(reference, channel_axis)
    sub_native = _by_channel(subject, channel_axis)
    ref = ref_native.astype(np.float64)
    sub = sub_native.astype(np.float64)
    channels = ref.shape[0]
    finite = np.isfinite(ref) & np.isfinite(sub)
    equal_nonfinite = (np.isnan(ref) & np.isnan(sub)) | (np.isinf(ref) & (ref == sub))
    nonfinite_mismatch = ~finite & ~equal_nonfinite
    diff = np.where(finite, _abs_difference(ref_native, sub_native), 0.0)
    magnitude = np.where(finite, np.abs(ref), 0.0)
    if tolerance.atol_scaled:
        scale = np.maximum(1.0, np.max(np.where(np.isfinite(ref), np.abs(ref), 0.0), axis=1, initial=0.0))
    else:
        scale = np.ones(channels)
    atol = (tolerance.atol * scale)[:, None]
    drift = _drift(ref, noise, shapes, channel_axis) if tolerance.noise_factor else None
    noise_max, noise_l2 = (drift.max(axis=1, initial=0.0), _row_norms(drift)) if drift is not None \
        else (np.zeros(channels), np.zeros(channels))
    allowance = (tolerance.noise_factor * noise_max)[:, None]
    failing_alone = (diff > atol + tolerance.rtol * magnitude) | nonfinite_mismatch
    failing = (diff > atol + tolerance.rtol * magnitude + allowance) | nonfinite_mismatch
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(diff == 0, 0.0, diff / magnitude)
        excess = diff - atol
        rtol_needed = np.where(excess <= 0, 0.0, excess / magnitude)
        atol_needed = (diff - tolerance.rtol * magnitude) / scale[:, None]
    any_nonfinite_mismatch = bool(nonfinite_mismatch.any())
    max_abs = float(diff.max(initial=0.0))
    index = values = None
    if max_abs > 0:
        c, m = np.unravel_index(int(np.argmax(diff)), diff.shape)
        index = _run_index(int(c), int(m), shapes, channel_axis)
        values = [_value(ref_native, int(c), int(m)), _value(sub_native, int(c), int(m))]
    # per channel: relative L2 error over the finite pairs
    counts = finite.sum(axis=1)
    diff_norm, ref_norm = _row_norms(diff), _row_norms(magnitude)
    with np.errstate(divide="ignore", invalid="ignore"):
        channel_rel = np.where(diff_norm == 0, 0.0, diff_norm / ref_norm)
    with np.errstate(invalid="ignore"):
        allowed = np.where(ref_norm == 0, 0.0, tolerance.channel_rtol * ref_norm) + tolerance.channel_atol * np.sqrt(counts)
    channel_fails_alone = (diff_norm > allowed) | nonfinite_mismatch.any(axis=1)
    channel_fails = (diff_norm > allowed + tolerance.noise_factor * noise_l2) | nonfinite_mismatch.any(axis=1)
    order = np.argsort(-channel_rel, kind="stable")[:WORST_CHANNELS]
    worst = [
        ChannelError(
            channel=int(c),
            rel_diff=float(channel_rel[c]),
            rms_reference=float(ref_norm[c] / math.sqrt(counts[c])) if counts[c] else 0.0,
            max_abs_diff=float(diff[c].max(initial=0.0)),
            passed=not bool(channel_fails[c]),
        )
        for c in order
        if channel_rel[c] > 0 or channel_fails[c]
    ]
    return Difference(
        elements=int(ref.size),
        elements_failing=int(failing.sum()),
        nonfinite_mismatches=int(nonfinite_mismatch.sum()),
        max_abs_diff=max_abs,
        max_abs_diff_index=index,
        max_abs_diff_values=values,
        max_rel_diff=float(rel.max(initial=0.0)),
        mean_abs_diff=float(diff[finite].mean()) if finite.any() else 0.0,
        cosine_similarity=_cosine_similarity(ref[finite], sub[finite]),
        reference_nan=int(np.isnan(ref).sum()),
        reference_inf=int(np.isinf(ref).sum()),
        subject_nan=int(np.isnan(sub).sum()),
        subject_inf=int(np.isinf(sub).sum()),
        min_passing_atol=math.inf if any_nonfinite_mismatch else max(0.0, float(atol_needed.max(initial=0.0))),
        min_passing_rtol=math.inf if any_nonfinite_mismatch else float(rtol_needed.max(initial=0.0)),
        channel_axis=channel_axis,
        channels=int(channels),
        channels_failing=int(channel_fails.sum()),
        max_channel_rel_diff=float(channel_rel.max(initial=0.0)),
        max_channel_rel_diff_channel=int(np.argmax(channel_rel)) if channels and channel_rel.max() > 0 else None,
        atol_applied=[float(atol.min(initial=math.inf)), float(atol.max(initial=0.0))] if channels else [],
        worst_channels=worst,
        noise_max=None if drift is None else float(noise_max.max(initial=0.0)),
        noise_allowance=[] if drift is None or not channels else
        [float(allowance.min(initial=math.inf)), float(allowance.max(initial=0.0))],
        elements_within_noise=int(failing_alone.sum() - failing.sum()),
        channels_within_noise=int(channel_fails_alone.sum() - channel_fails.sum()),
    )


def _drift(ref: np.ndarray, noise: Sequence[np.ndarray] | None, shapes, channel_axis: int | None) -> np.ndarray | None:
    """(C, M) |second run - reference| where both are finite (0 elsewhere); None when there
    is no second run or it does not have the reference's shapes and types."""
    if noise is None or len(noise) != len(shapes) or any(tuple(np.shape(a)) != s for a, s in zip(noise, shapes)):
        return None
    if any(not _is_float(np.asarray(a)) for a in noise):
        return None
    again = _by_channel(noise, channel_axis).astype(np.float64)
    both = np.isfinite(ref) & np.isfinite(again)
    with np.errstate(invalid="ignore", over="ignore"):
        return np.where(both, np.abs(again - ref), 0.0)


def _run_index(channel: int, flat: int, shapes: Sequence[tuple[int, ...]], axis: int | None) -> list[int]:
    """[run, *index] in the output's own layout of element ``flat`` of channel ``channel``."""
    for run, shape in enumerate(shapes):
        rest = shape if axis is None else shape[:axis] + shape[axis + 1:]
        size = int(np.prod(rest, dtype=np.int64))
        if flat < size:
            index = [int(i) for i in np.unravel_index(flat, rest)] if rest else []
            if axis is not None:
                index.insert(axis, channel)
            return [run, *index]
        flat -= size
    raise IndexError(flat)


def _cosine_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Of the finite pairs; each side divided by its largest magnitude first, so that float64
    outputs beyond 1e154 (whose squares overflow) still give a cosine, not NaN."""
    peak_a, peak_b = float(np.max(np.abs(a), initial=0.0)), float(np.max(np.abs(b), initial=0.0))
    if peak_a == 0 and peak_b == 0:
        return 1.0
    if peak_a == 0 or peak_b == 0:
        return 0.0
    a, b = a / peak_a, b / peak_b
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def _row_norms(x: np.ndarray) -> np.ndarray:
    """L2 norm of each row of a non-negative (C, M) array, scaled by the row's largest value
    so that float64 values beyond 1e154 do not overflow when squared, nor below 1e-154
    vanish."""
    peak = x.max(axis=1, initial=0.0)
    safe = np.where(np.isfinite(peak) & (peak > 0), peak, 1.0)
    with np.errstate(over="ignore"):  # a row holding inf, or a norm beyond float64: inf
        return peak * np.sqrt(((x / safe[:, None]) ** 2).sum(axis=1))


@dataclass
class Top1:
    """Argmax agreement along the class axis: the accuracy view of a classifier's output."""

    axis: int
    #: Positions compared (batch x any spatial positions, all runs).
    predictions: int
    agreeing: int
    #: Disagreements where the reference's top two were within the element tolerance (a near tie).
    near_ties: int

    @property
    def agreement(self) -> float:
        return self.agreeing / self.predictions if self.predictions else 1.0


def top1(reference: Sequence[np.ndarray], subject: Sequence[np.ndarray], axis: int, tolerance: Tolerance) -> Top1:
    """How often the subject's argmax along ``axis`` is the reference's, over every run and position."""
    predictions = agreeing = near_ties = 0
    for ref, sub in zip(reference, subject):
        if ref.ndim <= axis or ref.shape[axis] == 0:
            continue  # no classes in this run (an output with no channels): nothing to predict
        ref64, sub64 = np.asarray(ref, np.float64), np.asarray(sub, np.float64)
        ref_top, sub_top = np.argmax(ref64, axis=axis), np.argmax(sub64, axis=axis)
        same = ref_top == sub_top
        predictions += same.size
        agreeing += int(same.sum())
        if not same.all() and ref64.shape[axis] > 1:
            top2 = np.sort(ref64, axis=axis).take([-2, -1], axis=axis)
            gap = np.abs(top2.take(1, axis=axis) - top2.take(0, axis=axis))
            limit = tolerance.atol + tolerance.rtol * np.abs(top2.take(1, axis=axis))
            near_ties += int(((gap <= 2 * limit) & ~same).sum())
    return Top1(axis=axis, predictions=predictions, agreeing=agreeing, near_ties=near_ties)


# --- verify --precision fp16: did the fold make fp16 worse? --------------------------------

#: A CANDIDATE channel converted to fp16 may drift this many times ORIGINAL's own fp16
#: drift there (or one fp16 rounding of its values, if more) before the fold is said to make
#: fp16 worse. Correct folds of 14 digits-trained models measured at most 2.2x
#: (bench/precision_factor.py, docs/precision.md); a fold that overflows fp16 gives inf/NaN.
PRECISION_FACTOR = 4.0
#: fp16's unit roundoff and smallest normal: the floor of a channel's allowance is one fp16
#: rounding of its values, and no less than a subnormal per element.
FP16_UNIT = 2.0**-11
FP16_SMALLEST_NORMAL = 2.0**-14


@dataclass
class ChannelDrift:
    """One channel's drift from the float32 reference, relative L2 (``||x_c - ref_c|| / ||ref_c||``)."""

    channel: int
    original: float
    candidate: float
    #: Elements that are inf or NaN in the fp16 run and finite in the reference.
    original_nonfinite: int = 0
    candidate_nonfinite: int = 0


@dataclass
class PrecisionDrift:
    """ORIGINAL and CANDIDATE, both converted to a lower precision, against ORIGINAL's
    float32 output: whether the fold made that precision worse, channel by channel."""

    target: str
    factor: float
    channel_axis: int | None
    channels: int
    original_max: float
    candidate_max: float
    original_nonfinite: int
    candidate_nonfinite: int
    #: Channels where CANDIDATE drifts more than ``factor`` x ORIGINAL's drift (or its floor),
    #: or has more non-finite elements.
    channels_worse: int
    #: Up to WORST_CHANNELS, the worst relative to their allowance first.
    worst_channels: list[ChannelDrift] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.channels_worse == 0


def precision_drift(reference: Sequence[np.ndarray], original: Sequence[np.ndarray], candidate: Sequence[np.ndarray],
                    channel_axis: int | None, target: str = "fp16", factor: float = PRECISION_FACTOR) -> PrecisionDrift:
    """Per channel along ``channel_axis`` (all runs pooled): ``||orig_c - ref_c||`` and
    ``||cand_c - ref_c||`` over the elements finite in all three; a channel is worse when
    CANDIDATE's drift exceeds ``factor`` times the largest of ORIGINAL's drift, one fp16
    rounding of the reference (``FP16_UNIT * ||ref_c||``) and a subnormal per element,
    or when CANDIDATE has more non-finite elements there than ORIGINAL."""
    shapes = [tuple(np.shape(a)) for a in reference]
    axis = pooled_channel_axis(shapes, channel_axis)
    ref, orig, cand = (_by_channel(arrays, axis).astype(np.float64) for arrays in (reference, original, candidate))
    known = np.isfinite(ref)
    orig_bad = (known & ~np.isfinite(orig)).sum(axis=1)
    cand_bad = (known & ~np.isfinite(cand)).sum(axis=1)
    usable = known & np.isfinite(orig) & np.isfinite(cand)
    with np.errstate(invalid="ignore", over="ignore"):
        norm = np.sqrt(np.where(usable, ref**2, 0.0).sum(axis=1))
        drift_o = np.sqrt(np.where(usable, (orig - ref) ** 2, 0.0).sum(axis=1))
        drift_c = np.sqrt(np.where(usable, (cand - ref) ** 2, 0.0).sum(axis=1))
    floor = np.maximum(FP16_UNIT * norm, FP16_SMALLEST_NORMAL * np.sqrt(usable.sum(axis=1)))
    allowed = factor * np.maximum(drift_o, floor)
    worse = (drift_c > allowed) | (cand_bad > orig_bad)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel_o = np.where(drift_o == 0, 0.0, drift_o / norm)
        rel_c = np.where(drift_c == 0, 0.0, drift_c / norm)
        score = np.where(cand_bad > orig_bad, np.inf, np.where(allowed > 0, drift_c / allowed, 0.0))
    order = np.argsort(-score, kind="stable")[:WORST_CHANNELS]
    worst = [ChannelDrift(int(c), float(rel_o[c]), float(rel_c[c]), int(orig_bad[c]), int(cand_bad[c]))
             for c in order if worse[c]]
    return PrecisionDrift(target=target, factor=factor, channel_axis=axis, channels=int(ref.shape[0]),
                          original_max=float(rel_o.max(initial=0.0)), candidate_max=float(rel_c.max(initial=0.0)),
                          original_nonfinite=int(orig_bad.sum()), candidate_nonfinite=int(cand_bad.sum()),
                          channels_worse=int(worse.sum()), worst_channels=worst)
