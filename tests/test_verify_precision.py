"""``verify --precision fp16``'s judgement, ``bnfold.verification.compare.precision_drift``,
on small arrays: no onnxruntime, no converter, no training (tests/test_precision.py runs the
whole command on trained models).

The promise (docs/precision.md, "bnfold verify --precision fp16"; docs/verify.md): per output
and channel, all runs pooled, over the elements finite in the float32 reference and in both
fp16 runs, a channel of CANDIDATE is *worse* when ``||cand_c - ref_c||`` exceeds 4x the
largest of ORIGINAL's drift ``||orig_c - ref_c||``, one fp16 rounding of the channel
(``2^-11 * ||ref_c||``) and a subnormal per element (``2^-14 * sqrt(n_c)``), or when CANDIDATE
has more inf/NaN there (where the reference is finite) than ORIGINAL. The report gives each
model's largest relative drift ``||x_c - ref_c|| / ||ref_c||``, the non-finite counts, the
number of worse channels and up to 3 of them, the worst relative to its allowance first
(a channel that gains inf/NaN before any other; ties in channel order).

Every expectation here is computed by ``judge`` below, element by element in plain Python,
or written out by hand; the exact-boundary cases use values whose sums are exact.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from bnfold.verification.compare import precision_drift

FACTOR = 4.0
UNIT = 2.0**-11  # one fp16 rounding, relative
SUBNORMAL = 2.0**-14  # per element


def judge(reference, original, candidate, axis, factor=FACTOR):
    """docs/precision.md's rule, element by element: (channel_axis, channels, report fields)."""
    shapes = [np.shape(a) for a in reference]
    if axis is not None and (not shapes or any(axis >= len(s) for s in shapes) or len({s[axis] for s in shapes}) != 1):
        axis = None  # no channel that is the same in every run: the output is one channel
    channels = shapes[0][axis] if axis is not None else 1
    acc = [{"ref2": 0.0, "o2": 0.0, "c2": 0.0, "n": 0, "obad": 0, "cbad": 0} for _ in range(channels)]
    for ref, orig, cand in zip(reference, original, candidate):
        for index in np.ndindex(*np.shape(ref)):
            r, o, c = float(ref[index]), float(orig[index]), float(cand[index])
            if not math.isfinite(r):
                continue  # nothing to drift from
            a = acc[index[axis] if axis is not None else 0]
            a["obad"] += not math.isfinite(o)
            a["cbad"] += not math.isfinite(c)
            if math.isfinite(o) and math.isfinite(c):
                a["ref2"] += r * r
                a["o2"] += (o - r) ** 2
                a["c2"] += (c - r) ** 2
                a["n"] += 1
    rows = []
    for ch, a in enumerate(acc):
        norm, drift_o, drift_c = math.sqrt(a["ref2"]), math.sqrt(a["o2"]), math.sqrt(a["c2"])
        allowed = factor * max(drift_o, UNIT * norm, SUBNORMAL * math.sqrt(a["n"]))
        gains = a["cbad"] > a["obad"]
        worse = drift_c > allowed or gains
        rel = [0.0 if d == 0 else (d / norm if norm else math.inf) for d in (drift_o, drift_c)]
        score = math.inf if gains else (drift_c / allowed if allowed else 0.0)
        rows.append((ch, rel[0], rel[1], a["obad"], a["cbad"], worse, score))
    worst = sorted((r for r in rows if r[5]), key=lambda r: (-r[6], r[0]))[:3]
    return axis, channels, {
        "original_max": max([r[1] for r in rows], default=0.0),
        "candidate_max": max([r[2] for r in rows], default=0.0),
        "original_nonfinite": sum(r[3] for r in rows),
        "candidate_nonfinite": sum(r[4] for r in rows),
        "channels_worse": sum(r[5] for r in rows),
        "worst": [r[:5] for r in worst],
    }


def check(reference, original, candidate, axis, factor=FACTOR):
    """precision_drift against ``judge``; returns the result for more specific checks."""
    want_axis, want_channels, want = judge(reference, original, candidate, axis, factor)
    got = (precision_drift(reference, original, candidate, axis) if factor == FACTOR else
           precision_drift(reference, original, candidate, axis, "fp16", factor))
    assert (got.target, got.factor, got.channel_axis, got.channels) == ("fp16", factor, want_axis, want_channels)
    assert got.original_max == pytest.approx(want["original_max"], rel=1e-12)
    assert got.candidate_max == pytest.approx(want["candidate_max"], rel=1e-12)
    assert (got.original_nonfinite, got.candidate_nonfinite) == (want["original_nonfinite"],
                                                                 want["candidate_nonfinite"])
    assert got.channels_worse == want["channels_worse"]
    assert got.passed == (want["channels_worse"] == 0)
    assert [(w.channel, w.original, w.candidate, w.original_nonfinite, w.candidate_nonfinite)
            for w in got.worst_channels] == [(c, pytest.approx(o, rel=1e-12), pytest.approx(k, rel=1e-12), ob, cb)
                                             for c, o, k, ob, cb in want["worst"]]
    for w in got.worst_channels:  # the report's types: JSON numbers, exact counts
        assert type(w.channel) is int and type(w.original) is float and type(w.candidate) is float
        assert type(w.original_nonfinite) is int and type(w.candidate_nonfinite) is int
    return got


def f32(*values):
    return np.array(values, np.float32)


# --- the drift rule: factor x ORIGINAL's drift, exceeded --------------------------------


def test_a_channel_is_worse_only_beyond_factor_times_originals_drift():
    """Channel 0: CANDIDATE drifts 3x ORIGINAL's (not worse); channel 1: 5x (worse);
    channel 2: exactly 4x, sums exact (not worse: the rule is *exceeds*); channel 3: just
    beyond 4x (worse)."""
    ref = np.array([[1.0, 2.0, 1.0, 1.0]], np.float32)
    orig = np.array([[1.25, 2.25, 1.25, 1.25]], np.float32)
    cand = np.array([[1.75, 3.25, 2.0, 2.0078125]], np.float32)
    got = check([ref], [orig], [cand], 1)
    assert got.channels_worse == 2 and [w.channel for w in got.worst_channels] == [1, 3]
    # channel 1 drifts 1.25 against 4 x 0.25 = 1 allowed: its relative drifts are 0.25/2 and 1.25/2
    assert (got.worst_channels[0].original, got.worst_channels[0].candidate) == (0.125, 0.625)
    assert got.original_max == 0.25 and got.candidate_max == 1.0078125


def test_a_channel_within_factor_times_originals_drift_passes():
    ref = np.array([[[1.0, -2.0], [3.0, 0.5]]], np.float32)  # channels along axis 1
    orig = ref + np.float32(0.01)
    cand = ref - np.float32(0.03)
    got = check([ref], [orig], [cand], 1)
    assert got.passed and got.worst_channels == [] and got.channels == 2
    assert got.candidate_max == pytest.approx(0.03 * math.sqrt(2) / math.sqrt(5), rel=1e-5)


def test_a_given_factor_is_the_one_applied():
    ref, orig, cand = f32(1.0, 1.0), f32(1.25, 1.0), f32(1.75, 1.0)  # CANDIDATE drifts 3x ORIGINAL
    assert check([ref[None]], [orig[None]], [cand[None]], 1, factor=2.0).channels_worse == 1
    assert check([ref[None]], [orig[None]], [cand[None]], 1, factor=4.0).channels_worse == 0


# --- the floor: one fp16 rounding of the channel, a subnormal per element ----------------


@pytest.mark.parametrize("drift, worse", [(0.0097, False), (0.0098, True)])
def test_floor_is_one_fp16_rounding_of_the_channel(drift, worse):
    """ORIGINAL exact in fp16 (drift 0): CANDIDATE may still drift 4 x 2^-11 x ||ref_c||
    = 4 x 2^-11 x 5 = 0.009765625 in a channel [3, 4]."""
    ref = np.array([[[3.0, 4.0]], [[3.0, 4.0]]], np.float32).transpose(1, 0, 2)  # (1, 2, 2): channels 3,4 and 3,4
    cand = ref.copy()
    cand[0, 1, 0] += np.float32(drift)  # channel 1 only
    got = check([ref], [ref.copy()], [cand], 1)
    assert got.channels_worse == int(worse)


@pytest.mark.parametrize("drift, worse", [(2.4e-4, False), (2.5e-4, True)])
def test_floor_is_a_subnormal_per_element(drift, worse):
    """An all-zero channel of 4 elements computed exactly by ORIGINAL: CANDIDATE may drift
    4 x 2^-14 x sqrt(4) = 4.88e-4 in L2 (here 2 x ``drift``)."""
    ref = np.zeros((1, 2, 4), np.float32)
    cand = ref.copy()
    cand[0, 1, :2] = drift * math.sqrt(2)  # L2 over the channel: 2 x drift
    got = check([ref], [ref.copy()], [cand], 1)
    assert got.channels_worse == int(worse)
    assert got.original_max == 0.0  # exact: 0, not 0/0
    assert got.candidate_max == math.inf  # drift from an all-zero reference


def test_subnormal_floor_counts_only_the_channels_usable_elements():
    """Channel 1 has 4 elements, one NaN in the reference: n = 3, not 4 and not the
    output's 8, so a drift of 4.5e-4 (> 4 x 2^-14 x sqrt 3 = 4.2e-4) is worse."""
    ref = np.zeros((1, 2, 4), np.float32)
    ref[0, 1, 3] = np.nan
    cand = ref.copy()
    cand[0, 1, 0] = 4.5e-4
    got = check([ref], [ref.copy()], [cand], 1)
    assert got.channels_worse == 1 and got.worst_channels[0].channel == 1


# --- which elements count ------------------------------------------------------------


def test_elements_non_finite_in_any_of_the_three_are_left_out_of_the_drift():
    """Reference NaN (ORIGINAL and CANDIDATE finite and far off there), or inf in both fp16
    runs: those elements are not in any norm; the rest drifts within the rule."""
    ref = f32(1.0, np.nan, 2.0, 3.0)[None]
    orig = f32(1.01, 50.0, np.inf, 3.0)[None]
    cand = f32(1.03, -50.0, -np.inf, 3.0)[None]
    got = check([ref], [orig], [cand], 1)
    assert got.passed
    assert (got.original_nonfinite, got.candidate_nonfinite) == (1, 1)  # the inf where the reference is 2.0


def test_an_element_only_one_fp16_run_lost_is_left_out_of_both_drifts():
    """ORIGINAL overflows where CANDIDATE does not (and CANDIDATE's value there is far off):
    the element is in neither drift, and CANDIDATE is not worse for having fewer inf/NaN."""
    ref = f32(1.0, 2.0, 3.0)[None]
    orig = f32(1.01, np.inf, 3.0)[None]
    cand = f32(1.02, 9.0, 3.0)[None]
    got = check([ref], [orig], [cand], 1)
    assert got.passed and (got.original_nonfinite, got.candidate_nonfinite) == (1, 0)


@pytest.mark.parametrize("orig_bad, cand_bad, worse", [((), (), False), ((0,), (0,), False), ((0,), (1,), False),
                                                        ((), (1,), True), ((0,), (0, 2), True)])
def test_more_inf_or_nan_than_original_in_a_channel_is_worse(orig_bad, cand_bad, worse):
    """Counted per channel where the reference is finite; the drift itself is tiny."""
    ref = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], np.float32)  # channels along axis 0 here
    orig, cand = ref.copy(), ref.copy()
    for i in orig_bad:
        orig[1, i] = np.nan
    for i in cand_bad:
        cand[1, i] = np.inf
    got = check([ref], [orig], [cand], 0)
    assert got.channels_worse == int(worse)
    assert (got.original_nonfinite, got.candidate_nonfinite) == (len(orig_bad), len(cand_bad))


def test_non_finite_counts_are_per_channel_not_per_output():
    """ORIGINAL loses an element in channel 0, CANDIDATE one in channel 1: channel 1 is
    worse even though both outputs have one inf/NaN."""
    ref = np.ones((2, 2, 3), np.float32)
    orig, cand = ref.copy(), ref.copy()
    orig[0, 0, 0] = np.nan
    cand[1, 1, 2] = np.inf
    got = check([ref], [orig], [cand], 1)
    assert got.channels_worse == 1 and got.worst_channels[0].channel == 1
    assert (got.worst_channels[0].original_nonfinite, got.worst_channels[0].candidate_nonfinite) == (0, 1)


# --- channels: the axis, runs pooled -------------------------------------------------


def test_runs_are_pooled_per_channel():
    """ORIGINAL drifts in run 0, CANDIDATE as much in run 1: pooled, channel 0 is no worse;
    judged run by run, CANDIDATE's run 1 would be (against ORIGINAL's exact run 1)."""
    ref = [np.ones((1, 2, 2), np.float32), np.ones((3, 2, 2), np.float32)]
    orig = [r.copy() for r in ref]
    cand = [r.copy() for r in ref]
    orig[0][0, 0, 0] = 1.5
    cand[1][2, 0, 1] = 2.5  # 3x ORIGINAL's drift of the pooled channel 0
    got = check(ref, orig, cand, 1)
    assert got.passed and got.channels == 2
    cand[1][2, 0, 1] = 3.5  # 5x: worse
    assert check(ref, orig, cand, 1).channels_worse == 1


@pytest.mark.parametrize("axis, shapes, want_axis", [
    (None, [(2, 3)], None),  # no channel axis: one channel
    (1, [(2, 3), (1, 3)], 1),  # same channels in every run
    (1, [(2, 3), (2, 4)], None),  # channel count changes between runs: one channel
    (2, [(2, 3)], None),  # beyond the rank
    (0, [(4, 2)], 0),
])
def test_channel_axis_and_its_channels(axis, shapes, want_axis):
    rng = np.random.default_rng(3)
    ref = [rng.normal(size=s).astype(np.float32) for s in shapes]
    orig = [r + rng.normal(size=r.shape).astype(np.float32) * 1e-3 for r in ref]
    cand = [r + rng.normal(size=r.shape).astype(np.float32) * 1e-3 for r in ref]
    cand[0].flat[0] += 1.0  # worse wherever it is judged
    got = check(ref, orig, cand, axis)
    assert got.channel_axis == want_axis and got.channels_worse == 1


def test_one_channel_output_is_judged_as_a_whole():
    """With no axis, a drift in one place is set against ORIGINAL's drift over the whole
    output: CANDIDATE 1.0 off in one element, ORIGINAL 0.3 off in each of 4: ||.|| 0.6,
    allowance 2.4: not worse (per channel along axis 1 it would be)."""
    ref = np.ones((2, 2), np.float32)
    orig = ref + np.float32(0.3)
    cand = ref.copy()
    cand[1, 1] = 2.0
    assert check([ref], [orig], [cand], None).passed
    assert check([ref], [orig], [cand], 1).passed  # 1.0 vs 4 x 0.42 in channel 1: still within
    cand[1, 1] = 3.0
    assert check([ref], [orig], [cand], 1).channels_worse == 1 and check([ref], [orig], [cand], None).passed


def test_an_output_with_no_channels_passes_with_nothing_to_report():
    empty = [np.zeros((2, 0), np.float32)]
    got = check(empty, empty, empty, 1)
    assert (got.channels, got.original_max, got.candidate_max, got.channels_worse) == (0, 0.0, 0.0, 0)


def test_a_channel_with_no_usable_element_is_not_judged_by_drift():
    """Channel 1's reference is NaN everywhere: no drift, no allowance; nothing is worse."""
    ref = np.array([[1.0, 2.0], [np.nan, np.nan]], np.float32)
    got = check([ref], [ref + np.float32(0.001)], [ref - np.float32(0.002)], 0)
    assert got.passed and got.channels == 2


# --- the report: worst channels first -------------------------------------------------


def test_worst_channels_are_the_worst_relative_to_their_allowance_first():
    """Drift ratios to the allowance 2 (ch 0), 8 (ch 1), 5 (ch 2), 3 (ch 3), and ch 4 gains a
    NaN with a tiny drift: reported 4, 1, 2; all five are worse."""
    ref = np.full((5, 2), 0.5, np.float32)  # channels along axis 0, small values: allowances < 1
    orig = ref.copy()
    orig[:, 0] += np.float32(0.0625)  # ORIGINAL drift 1/16 per channel: allowance 1/4
    cand = ref.copy()
    for ch, ratio in enumerate((2, 8, 5, 3)):
        cand[ch, 0] += np.float32(ratio * 0.25)
    cand[4, 1] = np.nan
    got = check([ref], [orig], [cand], 0)
    assert got.channels_worse == 5 and [w.channel for w in got.worst_channels] == [4, 1, 2]


def test_worst_channels_are_ordered_by_their_own_allowance_not_by_drift():
    """Channel 0 drifts 3.0 against an allowance of 1 (3x), channel 1 drifts 1.0 against an
    allowance of 0.25 (4x): channel 1 is the worse of the two."""
    ref = np.array([[1.0, 1.0], [1.0, 1.0]], np.float32)  # channels along axis 0
    orig = ref + np.array([[0.25, 0.0], [0.0625, 0.0]], np.float32)
    cand = ref + np.array([[3.0, 0.0], [1.0, 0.0]], np.float32)
    got = check([ref], [orig], [cand], 0)
    assert [w.channel for w in got.worst_channels] == [1, 0]


def test_worst_channels_tied_are_reported_in_channel_order():
    """40 channels, every other one gaining a NaN: the first three of them, 1, 3, 5."""
    ref = np.ones((1, 40, 3), np.float32)
    cand = ref.copy()
    cand[0, 1::2, 0] = np.nan
    got = check([ref], [ref.copy()], [cand], 1)
    assert got.channels_worse == 20 and [w.channel for w in got.worst_channels] == [1, 3, 5]


# --- everything together, on random outputs ---------------------------------------------


@pytest.mark.parametrize("seed", range(12))
def test_random_outputs_follow_the_rule(seed):
    """Several runs, channels of different magnitudes, ORIGINAL drifting like fp16 and
    CANDIDATE 0.5x to 10x that in some channels, inf/NaN sprinkled into all three."""
    rng = np.random.default_rng(seed)
    channels, runs = int(rng.integers(1, 6)), int(rng.integers(1, 4))
    axis = int(rng.integers(0, 3))
    ref, orig, cand = [], [], []
    for _ in range(runs):
        shape = [int(rng.integers(1, 4)) for _ in range(3)]
        shape[axis] = channels
        r = rng.normal(size=shape) * 10.0 ** rng.integers(-3, 3, size=channels).reshape(
            [channels if i == axis else 1 for i in range(3)])
        o = r + r * rng.normal(size=shape) * 2.0**-11
        k = 10.0 ** rng.uniform(-0.3, 1.0, size=channels).reshape([channels if i == axis else 1 for i in range(3)])
        c = r + (o - r) * k * rng.choice([-1.0, 1.0], size=shape)
        for a in (r, o, c):
            a[rng.random(shape) < 0.08] = rng.choice([np.nan, np.inf, -np.inf])
        ref.append(r.astype(np.float32))
        orig.append(o.astype(np.float32))
        cand.append(c.astype(np.float32))
    check(ref, orig, cand, axis)
