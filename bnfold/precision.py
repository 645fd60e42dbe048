"""What a fold does to the next step's precision: fp16, bf16 and int8 figures of folded
tensors, on plain arrays (no ONNX in here; ``bnfold.assess`` feeds it the planned folds).

Folding writes ``W' = s (.) W``: a channel with a tiny running variance has its weights
multiplied by hundreds, and the channels of one tensor end up with ranges orders of
magnitude apart. A fp16 conversion or an int8 quantisation, the usual next steps, then
overflows, flushes to zero or quantises most channels to a few levels. docs/precision.md
explains every figure and threshold.

A weight is read once, block by block along axis 0 (as ``affine.apply_factor`` writes it),
so a huge memory-mapped weight never sits in memory whole. Every figure is computed in the
weight domain: a folded value is ``cast(w * f)`` (float64 product, one rounding to the
model's type, as the save computes it), so ``f / step`` turns each source element into its
quantised position without materialising the folded tensor. Largest magnitudes come from
the per-cell maxima planning already computed (``affine.peak_by_factor``), exactly:
``cast(max|w| * |f|)`` is ``max cast(|w| * |f|)`` because both roundings are monotonic.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

#: The targets ``--target`` takes.
TARGETS = ("fp16", "bf16", "int8")


@dataclass(frozen=True)
class FloatFormat:
    """A 16-bit float format and where a round-to-nearest-even cast changes a value's kind.

    ``|x| >= overflow_from`` becomes inf; ``0 < |x| <= zero_up_to`` (half the smallest
    subnormal: the tie rounds to the even 0) becomes 0; ``zero_up_to < |x| <
    smallest_normal - zero_up_to`` becomes a subnormal (fewer significant bits)."""

    name: str
    largest: float
    overflow_from: float
    zero_up_to: float
    smallest_normal: float
    #: bfloat16 is cast from float32: a float64 value is rounded to float32 first, as
    #: ml_dtypes and onnxruntime cast it.
    via_float32: bool = False

    def classify(self, values: np.ndarray) -> tuple[int, int]:
        """(overflow, underflow) counts of finite ``values`` cast to this format: values that
        become inf, and nonzero values that become 0."""
        values = np.asarray(values)
        rounded = values
        if self.via_float32 and values.dtype == np.float64:
            with np.errstate(over="ignore"):
                rounded = values.astype(np.float32)
        magnitude = np.abs(rounded.astype(np.float64))
        overflow = int(np.count_nonzero(magnitude >= self.overflow_from))
        underflow = int(np.count_nonzero((values != 0) & (magnitude <= self.zero_up_to)))
        return overflow, underflow


#: IEEE half: largest 65504, (65504 + 65536) / 2 = 65520 rounds up to inf; smallest
#: subnormal 2^-24, smallest normal 2^-14.
FP16 = FloatFormat("fp16", 65504.0, 65520.0, 2.0**-25, 2.0**-14)
#: bfloat16: float32's exponent, 8 significant bits: largest (2 - 2^-7) * 2^127 ~ 3.3895e38;
#: smallest subnormal 2^-133, smallest normal 2^-126.
BF16 = FloatFormat("bf16", (2 - 2.0**-7) * 2.0**127, (2 - 2.0**-8) * 2.0**127, 2.0**-134, 2.0**-126, True)
FORMATS = {"fp16": FP16, "bf16": BF16}

#: Symmetric int8: zero point 0, levels -127..127, step max|w| / 127 (onnxruntime's
#: quantiser for symmetric int8 weights; QuantizeLinear rounds half to even).
INT8_LEVELS = 127

#: int8-range-spread: a fold that spreads the ranges of the channels it scales beyond this
#: (largest channel range over the median one) leaves the median channel 127 / 16 ~ 8
#: levels under per-tensor int8. Measured (bench/precision_threshold.py, docs/precision.md):
#: of 134 folded weights of digits-trained models, each quantised alone per tensor, those
#: with a spread up to 6.9 lost at most 1.1 points of test accuracy (median 0), those of
#: 30, 79 and 115 lost 5.3, 4.4 and 15.3 points, and none fell in between: 16 lies in the
#: gap, near its geometric middle (14).
SPREAD_THRESHOLD = 16.0

PROBLEMS: dict[str, str] = {
    "fp16-overflow": "the fold pushes values of a folded tensor to 65520 or beyond: fp16 makes them inf",
    "fp16-underflow": "the fold pushes whole channels of a folded tensor below fp16's normal range (2^-14): "
                      "they keep fewer than 11 bits and values up to 2^-25 become 0",
    "bf16-overflow": "the fold pushes values of a folded tensor beyond bfloat16's range (~3.39e38): they become inf",
    "bf16-underflow": "the fold pushes whole channels of a folded tensor below bfloat16's normal range (2^-126)",
    "int8-range-spread": f"the fold spreads the ranges of the channels it scales beyond {SPREAD_THRESHOLD:g}x "
                         "(largest over median): per-tensor int8 leaves most channels a few levels",
}

#: What to do about each problem, printed once below a report that shows it.
HINTS: dict[str, str] = {
    "fp16-overflow": "fp16-overflow: keep that BN (`fold --keep NAME`), keep the node in fp32 when converting "
                     "(onnxconverter-common's node_block_list), or `bnfold recalibrate` if its variance is wrong",
    "fp16-underflow": "fp16-underflow: keep that BN (`fold --keep NAME`) or keep the node in fp32 when converting; "
                      "a dead channel (gamma ~ 0) can be pruned",
    "bf16-overflow": "bf16-overflow: keep that BN (`fold --keep NAME`), or keep the node in fp32",
    "bf16-underflow": "bf16-underflow: keep that BN (`fold --keep NAME`), or keep the node in fp32",
    "int8-range-spread": "int8-range-spread: quantise weights per channel (spread over output channels), or keep "
                         "that BN (`fold --keep NAME`); `bnfold recalibrate` if tiny variances are wrong",
}


def hints(codes) -> list[str]:
    """The hint lines for these problem codes, in ``HINTS`` order."""
    present = set(codes)
    return [f"hint: {text}" for code, text in HINTS.items() if code in present]


# --- the figures ---------------------------------------------------------------------


@dataclass
class Change:
    """A figure before and after the fold (None: no such tensor, or no value defined)."""

    before: float | int | None
    after: float | int | None


@dataclass
class FloatFigures:
    """Values of a tensor that a cast to a 16-bit float turns into inf (overflow), and
    nonzero values it turns into 0 (underflow)."""

    overflow: Change
    underflow: Change


@dataclass
class Int8Figures:
    """Signal-to-quantisation-noise ratio, in dB, of symmetric int8 quantisation of a
    weight: one scale for the tensor, and one per output channel (None: an all-zero
    weight; inf: quantisation is exact)."""

    per_tensor_sqnr_db: Change
    per_channel_sqnr_db: Change


@dataclass
class TensorFigures:
    """One folded tensor (a weight, a bias, an addend or a decomposed constant)."""

    role: str
    tensor: str
    node: str
    op: str
    input: int | None
    shape: list[int]
    #: Weights: the axis of the per-channel figures (the output channels), and which
    #: channels the spread runs over ("output", "input": the channels the fold scaled).
    channel_axis: int | None = None
    scaled: str | None = None
    growth: float | None = None
    spread: Change | None = None
    fp16: FloatFigures | None = None
    bf16: FloatFigures | None = None
    int8: Int8Figures | None = None


@dataclass
class Problem:
    """A precision problem of one folded tensor: a code from ``PROBLEMS``, the channels
    responsible, the facts and what to do."""

    code: str
    tensor: str
    channels: list[int]
    detail: str


@dataclass
class Precision:
    """The precision block of one folded site: its tensors' figures and problems."""

    targets: list[str]
    tensors: list[TensorFigures] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)


# --- weights, streamed ---------------------------------------------------------------


@dataclass
class View:
    """One version of a weight, ``cast(source * factor)`` (factor None: the source itself),
    and what a scan found in it."""

    factor: np.ndarray | None
    #: max |value| per cell (the peak's shape) and per output channel, in float64.
    cell_max: np.ndarray
    channel_max: np.ndarray
    #: the largest |value|; int8 steps: that over 127 (the tensor's), and each output channel's.
    largest: float
    pt_step: float
    pc_step: np.ndarray
    #: int8, in the value domain: quantisation noise energy of the tensor and per output
    #: channel, and signal energy per output channel.
    pt_noise: float = 0.0
    pc_noise: np.ndarray | None = None
    signal: np.ndarray | None = None
    #: format -> [overflow, underflow] counts.
    counts: dict[str, list[int]] = field(default_factory=dict)


def measure_weight(source, factors: Sequence[np.ndarray | None], out_axis: int, targets: Sequence[str],
                   block_elements: int = 1 << 16, sample_limit: int | None = None,
                   done: Callable[[], None] | None = None) -> tuple[np.ndarray, list[View]]:
    """Read ``source``: ``max |w|`` per cell (shaped to broadcast against the weight and
    the factors: kept along every axis a factor varies along, and along ``out_axis`` unless
    that makes it big; NaN propagates), and every view ``cast(source * factor)`` of
    ``factors`` measured.

    For each view: the largest magnitude per cell and per output channel; for fp16/bf16
    the counts of values a cast turns into inf or 0 (every element: the few candidates one
    comparison with a per-cell bound finds are classified exactly); for int8 the
    quantisation noise and signal energies, on a sample (all of a weight up to
    ``INT8_SAMPLE`` elements: ``_Sample``). ``source`` is only sliced along axis 0 (a
    memory map, or rows computed on demand), in cache-sized blocks through reused buffers;
    ``done()`` runs after every ``RELEASE_ELEMENTS`` or so, and at the end. The first pass
    is the one planning makes anyway to prove that the folded weight fits its dtype
    (``affine.peak_by_factor``).

    Returns the peak and the views.

    float32 and float64 weights are quantised in the source's domain (``w * f / step``:
    the cast of ``w * f`` to the model's type moves a value by at most 2^-24 of itself);
    narrower ones (float16, bfloat16) are folded and cast first, as the save does.
    """
    # Overflow to inf (a cast to a 16-bit float), NaN (a NaN peak) and 0/0 are answers
    # here, not problems: one errstate for the whole measurement.
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        return _measure(source, factors, out_axis, targets, block_elements, sample_limit, done)


def _measure(source, factors, out_axis: int, targets, block_elements: int, sample_limit: int | None,
             done: Callable[[], None] | None) -> tuple[np.ndarray, list[View]]:
    dtype = np.dtype(source.dtype)
    shape = tuple(source.shape)
    ndim = len(shape)
    formats = [FORMATS[t] for t in targets if t in FORMATS]
    work = np.result_type(dtype, np.float32)  # what QuantizeLinear computes in, for this weight
    factors = [None if f is None else np.asarray(f, dtype=np.float64) for f in factors]
    counts = [{fmt.name: [0, 0] for fmt in formats} for _ in factors]
    varying = {a for f in factors if f is not None for a, size in enumerate(f.shape) if size > 1}
    cells = tuple(shape[a] if a in varying | {out_axis} else 1 for a in range(ndim))
    size = math.prod(shape)
    # A factor along other axes than the output channels (a BN before a Gemm: K, and channels
    # along N) would make the cells the whole weight: then each view's channel maxima are
    # taken in the pass instead.
    by_cells = out_axis in varying or not varying or math.prod(cells) <= max(size // 8, 1 << 16)
    if not by_cells:
        cells = tuple(shape[a] if a in varying else 1 for a in range(ndim))
    reduced = tuple(a for a in range(ndim) if cells[a] == 1)
    others = tuple(a for a in range(ndim) if a != out_axis)
    peak = np.zeros(cells)
    channel_max = [np.zeros(shape[out_axis]) for _ in factors] if not by_cells else None
    found: list = []  # (flat index, value) of the elements that may underflow, block by block
    small = _Bound(factors, cells, max(fmt.zero_up_to for fmt in formats) * (1 + 1e-3), True, work) \
        if formats else None
    sample = _Sample(shape, out_axis, INT8_SAMPLE if sample_limit is None else sample_limit, work) \
        if "int8" in targets else None
    # int8 on a sample: the signal energy per cell over every element. A strided sample is
    # faithful to the quantisation noise (nearly uniform within a channel) but not to the
    # energy of a few dominant channels: from the sample, the SQNR of a weight whose channel
    # ranges lie 30x apart erred by up to 1.2 dB (tests/test_precision.py).
    energy = np.zeros(cells) if sample is not None and by_cells and sample.stride > 1 else None
    row = math.prod(shape[1:])
    rows = max(1, block_elements // max(1, row))
    magnitude = _scratch("magnitude", (rows, *shape[1:]), work)
    mask = _scratch("mask", (rows, *shape[1:]), bool) if formats else None
    # A cell per row (the output channels on axis 0, the factors along them: a BN after a
    # conv): the block is read as rows, a dot product and a maximum per row.
    by_rows = cells[0] == shape[0] > 1 and math.prod(cells) == shape[0]
    if by_rows:
        as_flat, starts = magnitude.reshape(-1), np.arange(0, rows * row, row)
        as_rows = magnitude.reshape(rows, row)
        left, right = as_rows[:, None, :], as_rows[:, :, None]  # a dot product per row: matmul, half einsum's time
        peak_rows, energy_rows = peak.reshape(-1), None if energy is None else energy.reshape(-1)
    energy_kept = [a for a in range(ndim) if a not in reduced]
    # Every figure depends on |w| only (each rounding is symmetric), so the scan reads |w|.
    for start, stop, block in _magnitudes(source, rows, work, magnitude, done):
        if by_rows:
            n = stop - start
            if sample is not None:
                sample.take(block, start)
                if energy is not None:
                    energy_rows[start:stop] = np.matmul(left[:n], right[:n]).reshape(n)
            # reduceat: 1.4-1.8x a row-wise reduce, whose per-row cost tells on short rows
            peak_rows[start:stop] = np.maximum.reduceat(as_flat[:n * row], starts[:n])
        else:
            if sample is not None:
                sample.take(block, start)
                if energy is not None:
                    sums = _square_sums(block, energy_kept)
                    if cells[0] > 1:
                        energy[start:stop] += sums
                    else:
                        energy += sums
            local = np.maximum.reduce(block, axis=reduced, keepdims=True) if reduced else block
            if cells[0] > 1:
                peak[start:stop] = local
            else:
                np.maximum(peak, local, out=peak)
            if channel_max is not None:
                for factor, most in zip(factors, channel_max):
                    scaled = block if factor is None else block * np.abs(_rows(factor, start, stop))
                    _max_into(most, np.max(scaled, axis=others), start, stop, out_axis == 0)
        if small is not None and small.may_cross(block, start, stop):
            small.collect(block, mask[:stop - start], start, found)
    views = [_view(f, peak, out_axis, dtype, None if channel_max is None else most)
             for f, most in zip(factors, channel_max or [None] * len(factors))]
    for view, tally in zip(views, counts):
        view.counts = tally
    if formats:
        _classify(found, 1, shape, factors, counts, formats, cells, dtype)
    limit = min((fmt.overflow_from for fmt in formats), default=math.inf)
    if formats and any(view.largest >= limit for view in views):
        # A value may overflow: a second pass counts them (only here, where the fold's own
        # dtype could hold it but a 16-bit float cannot).
        large = _Bound(factors, cells, limit * (1 - 1e-3), False, work)
        found = []
        for start, stop, block in _magnitudes(source, rows, work, magnitude, done):
            if large.may_cross(block, start, stop):
                large.collect(block, mask[:stop - start], start, found)
        _classify(found, 0, shape, factors, counts, formats, cells, dtype)
    if sample is not None:
        _Int8(views, peak, shape, out_axis, work, dtype, sample).run(energy)
    return peak, views


def _magnitudes(source, rows: int, work, out: np.ndarray, done: Callable[[], None] | None):
    """``(start, stop, |block|)`` for every ``rows`` rows of ``source``: |w| in the ``work``
    type, written into ``out`` (reused, aligned: numpy's loops over misaligned data, a
    weight stored at any byte offset of the file, buffer every operation at several times
    the cost, so the one read that converts is the only one that pays it). ``done()`` runs
    after every ``RELEASE_ELEMENTS`` or so and after the last block."""
    if isinstance(source, np.ndarray):
        source = source.view(np.ndarray)  # a memory map slices through Python code: a plain view does not
    unreleased, total = 0, source.shape[0]
    for start in range(0, total, rows):
        stop = start + rows if start + rows < total else total
        block = np.abs(source[start:stop], out=out[:stop - start], dtype=work)
        yield start, stop, block
        unreleased += block.size
        if done is not None and (unreleased >= RELEASE_ELEMENTS or stop == total):
            done()
            unreleased = 0


def _square_sums(block: np.ndarray, kept: list[int]) -> np.ndarray:
    """``sum w^2`` over the axes of a block not ``kept``, keeping them as size 1 (in the
    block's type: a block's sums are short, the caller adds them up in float64)."""
    subscripts = list(range(block.ndim))
    sums = np.einsum(block, subscripts, block, subscripts, kept)
    return sums.reshape([block.shape[a] if a in kept else 1 for a in range(block.ndim)])


#: A mapped weight's pages are released (``done()``) after about this many elements: a
#: call per block would cost more than small blocks save.
RELEASE_ELEMENTS = 1 << 18

#: The int8 noise of a weight with more elements than this comes from an evenly strided
#: sample of about this many: every ``stride``-th element of each output channel (or every
#: ``stride``-th row where the channels lie on another axis), the stride a prime that
#: divides none of the dimensions it steps over, so that it visits every kernel position
#: and input channel alike (the signal energy is every element's, not the sample's).
#: On weights whose channel ranges lie 30x apart and are scaled up to 55x apart by the
#: fold, with input channels e^+-1 apart and a centre tap 3x the others, the SQNR is
#: 0.05 dB from the whole tensor's on average and within 0.2 dB (40 random weights of a
#: conv and of a MatMul: tests/test_precision.py, docs/precision.md).
INT8_SAMPLE = 1 << 17


def int8_stride(size: int, period: int, limit: int = INT8_SAMPLE) -> int:
    """1 for a weight of at most ``limit`` elements, else the smallest prime at least
    ``size / limit`` that does not divide ``period`` (the length it steps along)."""
    if size <= limit:
        return 1
    stride = max(2, -(-size // limit))
    while period % stride == 0 or any(stride % d == 0 for d in range(2, math.isqrt(stride) + 1)):
        stride += 1
    return stride


class _Sample:
    """The elements of a weight the int8 figures are computed on, set aside block by block
    into ``values``: with the output channels along axis 0 (and many elements each), every
    ``stride``-th element of each channel, a row each; otherwise every ``stride``-th row."""

    def __init__(self, shape: tuple[int, ...], out_axis: int, limit: int, dtype):
        self.shape, self.out_axis = shape, out_axis
        self.row = math.prod(shape[1:])
        size = math.prod(shape)
        stride = int8_stride(size, self.row, limit)
        self.by_columns = out_axis == 0 and (stride == 1 or self.row >= 4 * stride)
        self.stride = stride if self.by_columns else int8_stride(size, shape[0], limit)
        if self.by_columns:
            self.values = _scratch("sample", (shape[0], -(-self.row // self.stride)), dtype)
        else:
            self.values = _scratch("sample", (-(-shape[0] // self.stride), *shape[1:]), dtype)

    def take(self, block: np.ndarray, start: int) -> None:
        n = block.shape[0]
        if self.by_columns:
            self.values[start:start + n] = block.reshape(n, -1)[:, ::self.stride]
            return
        first = (-start) % self.stride  # global rows 0, stride, 2 stride, ...
        if first < n:
            picked = block[first::self.stride]
            at = (start + first) // self.stride
            self.values[at:at + picked.shape[0]] = picked

    def pick(self, array):
        """``array`` (broadcasting against the weight) at the sampled elements, laid out as
        ``values``."""
        if self.by_columns:
            return _columns(array, self.stride, self.shape)
        return array[::self.stride] if np.ndim(array) and np.shape(array)[0] > 1 else array


class _Int8:
    """Symmetric int8 quantisation of every view, per tensor and per output channel, on the
    sample the pass set aside.

    Each quantisation is a *lane*: a multiplier per cell that takes a value to its position
    in steps (``f / step``), so that ``t - round(t)`` is its error in steps. Lanes read the
    source itself, or (float16/bfloat16 weights) each view folded and cast first."""

    def __init__(self, views: list[View], peak: np.ndarray, shape: tuple[int, ...], out_axis: int, work,
                 dtype: np.dtype, sample: _Sample):
        self.views, self.shape, self.out_axis, self.work, self.dtype, self.sample = \
            views, shape, out_axis, work, dtype, sample
        ndim = len(shape)
        self.materialise = dtype.itemsize < 4  # float16/bfloat16: fold and cast first, as the save does
        for view in views:
            view.pt_noise, view.pc_noise = 0.0, np.zeros(shape[out_axis])
        self.signal = [0.0] * len(views)

        def per_channel(steps):  # 1 / step of each element's output channel, broadcasting
            return _axis_array(_inverse(steps), out_axis, ndim)

        lanes = []  # (view folded first or None, kind, view index, multiplier broadcasting to the weight)
        shared = not self.materialise and all(_along(v.factor, out_axis) for v in views)
        for i, view in enumerate(views):
            f = np.float64(1.0) if view.factor is None or self.materialise else view.factor
            source = i if self.materialise else None
            lanes.append((source, "tensor", i, f * (1.0 / view.pt_step if view.pt_step > 0 else 0.0)))
            if not shared:
                lanes.append((source, "channel", i, f * per_channel(view.pc_step)))
        if shared:
            # A view whose factor runs along the output axis only has its per-channel
            # quantisation put each element where the source's own puts it (the same
            # w / step, up to a sign): one lane, in steps, serves every such view. (Such
            # factors keep the output axis in the peak's cells.)
            lanes.append((None, "shared", None, per_channel(_channel_max(peak, out_axis) / INT8_LEVELS)))

        def laid_out(m):  # the multiplier in the work type, a scalar or laid out as the sample
            m = np.asarray(m, dtype=work)
            return m.reshape(()) if m.size == 1 else sample.pick(m.reshape((1,) * (ndim - m.ndim) + m.shape))

        self.lanes = [(source, kind, i, laid_out(m)) for source, kind, i, m in lanes]

    def run(self, energy: np.ndarray | None) -> None:
        """Quantise the whole sample at once: it is small, and per-block calls would cost more
        than the arithmetic. The sample is every sampled element of each row (columns), or rows
        0, stride, 2 stride, ... of the weight (rows).

        The noise of a sample stands for the whole weight's in proportion to the elements it
        holds (in each channel alike); the signal is every element's (``energy`` per cell,
        ``sum w^2``), else the sample's in the same proportion."""
        x = self.sample.values
        if not x.size:
            return
        self._add(x, sample_signal=energy is None)
        scale = math.prod(self.shape) / x.size
        for view, signal in zip(self.views, self.signal):
            view.pt_noise *= scale
            view.pc_noise *= scale
            if energy is not None:  # sum (w f)^2: within 2^-10 of the cast values' (float16 weights)
                weighted = energy if view.factor is None else energy * np.square(view.factor)
                view.signal = np.asarray([float(weighted.sum())])
            else:
                view.signal = np.asarray([signal * scale])

    def _add(self, x: np.ndarray, sample_signal: bool) -> None:
        sample, pick = self.sample, self.sample.pick
        folded = {}
        t, whole = _scratch("steps", x.shape, x.dtype), _scratch("rounded", x.shape, x.dtype)
        for source, kind, i, multiplier in self.lanes:
            if source is None:
                values = x
            else:
                if source not in folded:
                    f = self.views[source].factor
                    values = x.astype(np.float64) if f is None else x.astype(np.float64) * pick(f)
                    folded[source] = values.astype(self.dtype).astype(self.work)
                values = folded[source]
            np.multiply(values, multiplier, out=t)
            view = None if i is None else self.views[i]
            if kind == "tensor":
                if view.pt_step > 0:
                    if sample_signal:
                        self.signal[i] += _energy(t) * view.pt_step ** 2  # (w f / step)^2 step^2
                    t -= np.rint(t, out=whole)  # round half to even, as QuantizeLinear
                    view.pt_noise += _energy(t) * view.pt_step ** 2
                continue
            t -= np.rint(t, out=whole)
            noise = self._per_channel(t)
            # the channels of the sampled rows (all of them when sampled by columns)
            where = slice(None, None, sample.stride) if not sample.by_columns and self.out_axis == 0 else slice(None)
            for target in (self.views if kind == "shared" else [view]):
                target.pc_noise[where] += noise * target.pc_step[where] ** 2

    def _per_channel(self, t: np.ndarray) -> np.ndarray:
        """``sum t^2`` per output channel of a sampled block, in float64."""
        if self.sample.by_columns:
            return np.matmul(t[:, None, :], t[:, :, None]).reshape(-1).astype(np.float64)
        subscripts = list(range(t.ndim))
        return np.einsum(t, subscripts, t, subscripts, [self.out_axis]).astype(np.float64)


#: Scratch buffers up to this size are kept for the next weight (per thread).
SCRATCH_BYTES = 1 << 21
_scratch_buffers = threading.local()


def _scratch(name: str, shape, dtype) -> np.ndarray:
    """A buffer of this shape and dtype, contents undefined, reused from weight to weight:
    a fresh array of a few hundred KiB is fresh pages, and faulting them in cost a weight
    more than the arithmetic on them. (Nothing measured keeps a reference to one.) The
    views handed out are kept too, until the buffer grows: layers repeat their shapes."""
    pool = _scratch_buffers.__dict__
    buffer, views = pool.get(name, (None, {}))
    view = views.get((shape, dtype))
    if view is not None:
        return view
    dtype_ = np.dtype(dtype)
    need = math.prod(shape) * dtype_.itemsize
    if need > SCRATCH_BYTES:
        return np.empty(shape, dtype=dtype_)
    if buffer is None or buffer.size < need:
        buffer, views = np.empty(max(need, 1 << 16), dtype=np.uint8), {}
        pool[name] = buffer, views
    view = views[shape, dtype] = buffer[:need].view(dtype_).reshape(shape)
    return view


def _columns(rows, stride: int, block_shape) -> np.ndarray:
    """Every ``stride``-th element of each row of ``rows`` (a block of the weight, or an
    array broadcasting against it), as a 2-D (rows, sampled) array; an array that does not
    vary along the rows' other axes stays a column (rows, 1), or a scalar."""
    rows = np.asarray(rows)
    if rows.ndim == 0:
        return rows
    if rows.size == rows.shape[0]:
        return rows.reshape(rows.shape[0], 1)
    full = np.broadcast_to(rows, (rows.shape[0] if rows.shape[0] > 1 else block_shape[0], *block_shape[1:]))
    flat = full.reshape(full.shape[0], -1)
    return flat if stride == 1 else flat[:, ::stride]


def _energy(t: np.ndarray) -> float:
    flat = t.reshape(-1)
    return float(np.dot(flat, flat))


def _view(factor, peak: np.ndarray, out_axis: int, dtype: np.dtype, channel_max: np.ndarray | None = None) -> View:
    """A view's largest magnitudes, from the peak (``cast(max|w| * |f|)`` is
    ``max cast(|w| * |f|)``: both roundings are monotonic), or per output channel as
    measured (``max |w| * |f|``, cast). (Under ``measure_weight``'s errstate: a cast may
    overflow to inf.)"""
    peak = np.asarray(peak, dtype=np.float64)
    if factor is None:
        cell_max = peak
    else:
        factor = np.asarray(factor, dtype=np.float64)
        cell_max = (peak * np.abs(factor)).astype(dtype).astype(np.float64)
    if channel_max is None:
        channel_max = _channel_max(cell_max, out_axis)
    else:
        channel_max = np.asarray(channel_max, dtype=np.float64).astype(dtype).astype(np.float64)
    largest = float(np.maximum.reduce(channel_max, axis=None))
    return View(factor=factor, cell_max=cell_max, channel_max=channel_max, largest=largest,
                pt_step=largest / INT8_LEVELS, pc_step=channel_max / INT8_LEVELS)


def _max_into(total: np.ndarray, part: np.ndarray, start: int, stop: int, by_rows: bool) -> None:
    if by_rows:
        total[start:stop] = np.maximum(total[start:stop], part)
    else:
        np.maximum(total, part, out=total)


def _channel_max(cells: np.ndarray, out_axis: int) -> np.ndarray:
    """The largest of the cells of each output channel (read-only: it may be ``cells``)."""
    return _max_keeping(cells, (out_axis,))


def _max_keeping(cells: np.ndarray, keep: tuple[int, ...]) -> np.ndarray:
    """The largest of ``cells`` over every axis not in ``keep``, flat (read-only: it may be
    ``cells`` itself)."""
    cells = np.asarray(cells, dtype=np.float64)
    axes = tuple(a for a in range(cells.ndim) if a not in keep and cells.shape[a] > 1)
    return (np.maximum.reduce(cells, axis=axes) if axes else cells).reshape(-1)


def _along(factor, out_axis: int) -> bool:
    """Whether ``factor`` is None or varies along ``out_axis`` only."""
    shape = np.shape(factor)
    return factor is None or math.prod(shape) == (shape[out_axis] if out_axis < len(shape) else 1)


def _inverse(values) -> np.ndarray:
    """1 / values, and 0 where a value is 0 (an all-zero channel quantises to 0, exactly)."""
    values = np.asarray(values, dtype=np.float64)
    return np.where(values > 0, 1.0 / np.where(values > 0, values, 1.0), 0.0)


def _axis_array(vector: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    shape = [1] * ndim
    shape[axis] = np.size(vector)
    return np.asarray(vector).reshape(shape)


def _rows(array, start: int, stop: int):
    """Rows ``start:stop`` (along the weight's axis 0) of an array broadcasting against the
    weight, or all of it where it does not vary along that axis."""
    array = np.asarray(array)
    return array if array.ndim == 0 or array.shape[0] == 1 else array[start:stop]


# --- float formats: the rare candidates one comparison finds, classified exactly -------


class _Bound:
    """Per cell, ``limit / |f|`` combined over the factors (None: 1; the loosest with
    ``below``, the tightest without): a bound on |w| past which a view's value may cross
    ``limit``, below it (``below``: underflow) or at or above it (overflow). Bounds within
    16x of each other become one scalar, the loosest (a comparison with a scalar is faster,
    and the few extra elements it lets through are classified exactly anyway). Built under
    ``measure_weight``'s errstate: ``limit / |f|`` may overflow or divide by 0."""

    def __init__(self, factors: list, cells, limit: float, below: bool, work):
        self.below = below
        magnitudes = [np.abs(f) for f in factors if f is not None] + ([1.0] if any(f is None for f in factors) else [])
        low = min(float(np.minimum.reduce(m, axis=None)) for m in magnitudes)
        high = max(float(np.maximum.reduce(m, axis=None)) for m in magnitudes)
        if 0 < low and high <= 16 * low:  # the usual case, read off the factors' range
            bounds = np.full([1] * len(cells), limit / (low if below else high))
        else:
            bounds = self._per_cell(factors, cells, limit, below)
        self.values = bounds.astype(work)
        #: the one bound, when they are all one
        self.edge = float(self.values.flat[0]) if self.values.size == 1 else None

    @staticmethod
    def _per_cell(factors: list, cells, limit: float, below: bool) -> np.ndarray:
        empty, combine = (0.0, np.maximum) if below else (np.inf, np.minimum)
        bounds = None
        for factor in factors:
            if factor is None:
                bound = np.float64(limit)
            else:
                f = np.abs(factor)
                bound = np.where(f > 0, limit / np.where(f > 0, f, 1.0), empty)
            bounds = bound if bounds is None else combine(bounds, bound)
        bounds = np.broadcast_to(bounds, cells)
        finite = bounds[np.isfinite(bounds) & (bounds > 0)]
        if finite.size == bounds.size and finite.size and finite.max() <= 16 * finite.min():
            return np.full([1] * len(cells), finite.max() if below else finite.min())
        return bounds

    def may_cross(self, magnitude: np.ndarray, start: int, stop: int) -> bool:
        """Whether some |w| of this block (rows ``start:stop``) may cross: usually one
        reduction shows none can, the smallest |w| at least the loosest bound, or the largest
        below the tightest. A block holding zeros (which stay 0 in any format) is judged by
        its smallest nonzero |w|, or every block of a pruned weight would set aside its zeros
        only to drop them: for fp16, a conv weight with 1% zeros took 2.4x planning's pass
        and a 50%-pruned one 5x; judged so, about 1.9x whatever the share of zeros (1.15x
        without zeros)."""
        if self.below:
            edge = self.edge if self.edge is not None else _rows(self.values, start, stop).max()
            low = np.minimum.reduce(magnitude, axis=None)
            return bool(low < edge and (low > 0 or _smallest_nonzero(magnitude) < edge))
        edge = self.edge if self.edge is not None else _rows(self.values, start, stop).min()
        return bool(np.maximum.reduce(magnitude, axis=None) >= edge)

    def collect(self, magnitude: np.ndarray, mask: np.ndarray, start: int, found: list) -> None:
        """Set aside the elements of this block that lie below the per-cell bound (nonzero
        ones: 0 stays 0) or at or above it: (flat index in the weight, |w|). (Zeros are left
        out as they are found, or a pruned weight would keep half its elements here.)"""
        bound = _rows(self.values, start, start + magnitude.shape[0])
        (np.less if self.below else np.greater_equal)(magnitude, bound, out=mask)
        flat = np.flatnonzero(mask)
        values = magnitude.reshape(-1)[flat]
        if self.below:
            keep = values != 0
            flat, values = flat[keep], values[keep]
        if flat.size:
            found.append((flat + start * (magnitude.size // magnitude.shape[0]), values.astype(np.float64)))


def _smallest_nonzero(magnitude: np.ndarray) -> float:
    """The smallest nonzero of these |w| (inf if none): read as unsigned integers, whose
    order is the floats' for values >= 0, less 1, so that 0 wraps round to the largest."""
    bits = magnitude.view(np.dtype(f"u{magnitude.itemsize}"))
    less = np.subtract(bits, 1, out=_scratch("bits", bits.shape, bits.dtype))
    smallest = int(np.minimum.reduce(less, axis=None)) + 1
    if smallest == 1 << (8 * magnitude.itemsize):  # every one was 0
        return math.inf
    return float(np.array(smallest, dtype=bits.dtype).view(magnitude.dtype))


def _classify(found: list, kind: int, shape, factors: list, counts: list, formats: list[FloatFormat], cells,
              dtype: np.dtype) -> None:
    """Add the set-aside elements' overflow (``kind`` 0) or underflow (1) counts to every
    view and format, each element folded and cast as the save computes it (under
    ``measure_weight``'s errstate: a cast may overflow to inf)."""
    if not found:
        return
    flat = np.concatenate([f for f, _ in found])
    values = np.concatenate([v for _, v in found])
    index = np.unravel_index(flat, shape)
    for factor, tally in zip(factors, counts):
        folded = values
        if factor is not None:
            f = np.broadcast_to(factor, cells)
            cell = tuple(i if f.shape[a] > 1 else 0 for a, i in enumerate(index))
            folded = (values * f[cell]).astype(dtype).astype(np.float64)
        for fmt in formats:
            tally[fmt.name][kind] += fmt.classify(folded)[kind]


# --- from scans to figures and problems -----------------------------------------------


def sqnr_db(signal: float, noise: float) -> float | None:
    """``10 log10(signal / noise)``; None without signal, inf without noise."""
    if signal <= 0:
        return None
    if noise <= 0:
        return math.inf
    return 10.0 * math.log10(signal / noise)


def spread(ranges: np.ndarray) -> float | None:
    """Largest range over the median of the nonzero ones (dead channels quantise exactly);
    None when every range is 0."""
    ranges = np.asarray(ranges, dtype=np.float64).reshape(-1)
    alive = ranges if ranges.size and np.minimum.reduce(ranges, axis=None) > 0 else ranges[ranges > 0]
    if alive.size == 0:
        return None
    return float(alive.max() / median(alive))


def median(values: np.ndarray) -> float:
    """``np.median`` of a non-empty 1-D array, without the ~6 ms import of ``numpy.ma``
    that ``np.median`` pays on its first call (a fold is timed as a whole process)."""
    half = values.size // 2
    if values.size % 2:
        return float(np.partition(values, half)[half])
    low, high = np.partition(values, (half - 1, half))[half - 1:half + 1]
    return float((low + high) / 2)


def scaled_ranges(cell_max: np.ndarray, scaled_axes: tuple[int, ...], out_axis: int) -> np.ndarray:
    """The range of each channel the fold scaled: the cells' maxima over every other axis
    (the output channels when the fold scaled nothing per channel)."""
    return _max_keeping(cell_max, scaled_axes or (out_axis,))


def weight_figures(views: list[View], targets: Sequence[str], scaled_axes: tuple[int, ...], out_axis: int, *,
                   tensor: str, node: str, op: str, index: int | None, shape: Sequence[int],
                   scaled: str, where: str) -> tuple[TensorFigures, list[Problem]]:
    """The figures of a weight from its scan (views: before, after) and its problems."""
    before, after = views
    ranges = (scaled_ranges(before.cell_max, scaled_axes, out_axis), scaled_ranges(after.cell_max, scaled_axes, out_axis))
    peak_before, peak_after = before.largest, after.largest
    figures = TensorFigures("weight", tensor, node, op, index, list(shape), channel_axis=out_axis, scaled=scaled,
                            growth=peak_after / peak_before if peak_before > 0 else None,
                            spread=Change(spread(ranges[0]), spread(ranges[1])))
    for name in ("fp16", "bf16"):
        if name in targets:
            b, a = before.counts[name], after.counts[name]
            setattr(figures, name, FloatFigures(Change(b[0], a[0]), Change(b[1], a[1])))
    if "int8" in targets:
        signal = float(before.signal.sum()), float(after.signal.sum())
        figures.int8 = Int8Figures(
            Change(sqnr_db(signal[0], before.pt_noise), sqnr_db(signal[1], after.pt_noise)),
            Change(sqnr_db(signal[0], float(before.pc_noise.sum())), sqnr_db(signal[1], float(after.pc_noise.sum()))))
    return figures, _weight_problems(figures, before, after, ranges, targets, where)


def _weight_problems(figures: TensorFigures, before: View, after: View, ranges, targets, where: str) -> list[Problem]:
    problems = []
    what = f"{where} weight" + (f" {figures.tensor!r}" if figures.tensor else "")
    for name in ("fp16", "bf16"):
        if name not in targets:
            continue
        fmt, counts = FORMATS[name], getattr(figures, name)
        grown = np.flatnonzero((after.channel_max >= fmt.overflow_from) & ~(before.channel_max >= fmt.overflow_from)) \
            if after.largest >= fmt.overflow_from else ()
        if counts.overflow.after > counts.overflow.before and len(grown):
            problems.append(Problem(f"{name}-overflow", figures.tensor, grown.tolist(),
                                    f"{what}: {counts.overflow.after} value(s) become inf in {name} "
                                    f"(max |w| {after.largest:.4g} > {fmt.largest:.6g}; "
                                    f"{counts.overflow.before} before the fold) in channel(s) {channel_list(grown)}"))
        if not np.minimum.reduce(after.channel_max, axis=None) < fmt.smallest_normal:
            continue  # (NaN: no channel sank either)
        sunk = np.flatnonzero((after.channel_max > 0) & (after.channel_max < fmt.smallest_normal)
                              & ~((before.channel_max > 0) & (before.channel_max < fmt.smallest_normal)))
        if sunk.size:
            problems.append(Problem(f"{name}-underflow", figures.tensor, sunk.tolist(),
                                    f"{what}: channel(s) {channel_list(sunk)} lie below {name}'s normal range "
                                    f"({fmt.smallest_normal:.3g}; largest |w| there "
                                    f"{after.channel_max[sunk].max():.3g}), where fp16 keeps fewer than 11 bits; "
                                    f"{counts.underflow.after} value(s) become 0 ({counts.underflow.before} "
                                    "before the fold)"))
    if "int8" in targets and figures.spread.after is not None:
        wide_before = figures.spread.before or 0.0
        if figures.spread.after > SPREAD_THRESHOLD and figures.spread.after > wide_before * (1 + 1e-6):
            alive = ranges[1][ranges[1] > 0]
            widest = np.flatnonzero(ranges[1] > SPREAD_THRESHOLD * median(alive))
            sqnr = figures.int8.per_tensor_sqnr_db
            problems.append(Problem("int8-range-spread", figures.tensor, widest.tolist(),
                                    f"{what}: the {figures.scaled} channels' ranges spread "
                                    f"{figures.spread.after:.3g}x (largest over median; {wide_before:.3g}x before "
                                    f"the fold, threshold {SPREAD_THRESHOLD:g}x), widest: channel(s) {channel_list(widest)}; "
                                    f"per-tensor int8 SQNR {_db(sqnr.after)} ({_db(sqnr.before)} before)"
                                    + ("; per-channel quantisation does not help: the spread runs along the "
                                       "input channels" if figures.scaled == "input" else "")))
    return problems


def vector_figures(role: str, before: np.ndarray | None, after: np.ndarray, targets: Sequence[str], *, tensor: str,
                   node: str, op: str, index: int | None, where: str) -> tuple[TensorFigures, list[Problem]]:
    """A bias, an addend or a decomposed constant: growth and the float targets' counts
    (int8 deployments keep biases in int32, scaled by input and weight scales)."""
    after = np.asarray(after, dtype=np.float64)
    old = None if before is None else np.asarray(before, dtype=np.float64)
    peak_before = float(np.max(np.abs(old), initial=0.0)) if old is not None else 0.0
    figures = TensorFigures(role, tensor, node, op, index, list(after.shape),
                            growth=float(np.max(np.abs(after), initial=0.0)) / peak_before if peak_before > 0 else None)
    problems = []
    what = f"{where} {role}" + (f" {tensor!r}" if tensor else "")
    for name in ("fp16", "bf16"):
        if name not in targets:
            continue
        fmt = FORMATS[name]
        b = fmt.classify(old) if old is not None else (0, 0)
        a = fmt.classify(after)
        counts = FloatFigures(Change(b[0], a[0]), Change(b[1], a[1]))
        setattr(figures, name, counts)
        flat = after.reshape(-1)
        if a[0] > b[0]:
            where = np.flatnonzero(np.abs(flat) >= fmt.overflow_from)
            problems.append(Problem(f"{name}-overflow", tensor, where.tolist(),
                                    f"{what}: {a[0]} value(s) become inf in {name} (max |v| "
                                    f"{np.abs(flat).max():.4g}; {b[0]} before the fold) in channel(s) {channel_list(where)}"))
        # A scale multiplies whole channels: one below the normal range loses them. (A bias
        # or shift adds; one flushed errs by at most zero_up_to, below any rounding of the sum.)
        if role == "scale":
            low = np.flatnonzero((flat != 0) & (np.abs(flat) < fmt.smallest_normal))
            if low.size:
                problems.append(Problem(f"{name}-underflow", tensor, low.tolist(),
                                        f"{what}: channel(s) {channel_list(low)} scale by less than {name}'s smallest "
                                        f"normal ({fmt.smallest_normal:.3g})"))
    return figures, problems


def channel_list(indices, limit: int = 8) -> str:
    indices = [int(i) for i in np.asarray(indices).reshape(-1)]
    shown = ", ".join(str(i) for i in indices[:limit])
    return shown + (f", ... ({len(indices)} in all)" if len(indices) > limit else "")


def _db(value: float | None) -> str:
    if value is None:
        return "n/a"
    return "exact" if math.isinf(value) else f"{value:.1f} dB"
