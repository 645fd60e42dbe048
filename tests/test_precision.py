"""--target: the precision figures of folded tensors and their problems, against direct
computations, onnxruntime's QuantizeLinear/DequantizeLinear and the fp16 converter.

The hazard models (``bnfold.train.hazards``) are trained on digits once per session."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import threading
import tracemalloc
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import pytest
from hypothesis import given, strategies as st
from onnx import TensorProto, helper, numpy_helper

import bnfold
from bnfold import affine, precision as P
from cli_runner import invoke

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
HEALTHY = ["cnn_ts13", "cnn_dynamo18", "resnet_ts13", "mlp_ts13", "mlp-inputnorm_ts13", "autoencoder_ts13",
           "seq1d_ts13", "clip3d_ts13"]
ALL = ("fp16", "bf16", "int8")


@pytest.fixture(scope="session")
def hazards(tmp_path_factory):
    pytest.importorskip("torch")
    from bnfold.train import hazards as H
    from bnfold.train.data import load_digits_split

    folder = tmp_path_factory.mktemp("hazards")
    digits = load_digits_split()
    return {name: H.build(name, folder, digits=digits) for name in H.HAZARDS}


def problems(result) -> dict[str, list]:
    found: dict[str, list] = {}
    for entry in result.ledger:
        for problem in entry.precision_problems:
            found.setdefault(problem.code, []).append((entry.label, problem))
    return found


# --- the thresholds are what the casts do ------------------------------------------------


@pytest.mark.parametrize("fmt, cast", [(P.FP16, np.float16), (P.BF16, ml_dtypes.bfloat16)])
@pytest.mark.parametrize("source", [np.float32, np.float64])
def test_overflow_and_underflow_thresholds_are_the_casts(fmt, cast, source):
    rng = np.random.default_rng(0)
    edges = []
    for edge in (fmt.overflow_from, fmt.largest, fmt.zero_up_to, 2 * fmt.zero_up_to, fmt.smallest_normal):
        x = source(edge)
        edges += [x, np.nextafter(x, source(0)), np.nextafter(x, source(np.inf))]
    values = np.array(edges + list(rng.standard_normal(20000) * np.exp(rng.uniform(-100, 90, 20000))), dtype=np.float64)
    with np.errstate(over="ignore"):
        values = values.astype(source)
    values = np.concatenate([values[np.isfinite(values)], -values[np.isfinite(values)]])
    with np.errstate(over="ignore"):
        cast_values = values.astype(cast).astype(np.float64)
    expected = (int(np.isinf(cast_values).sum()), int(((cast_values == 0) & (values != 0)).sum()))
    assert expected[0] > 0 and expected[1] > 0
    assert fmt.classify(values) == expected


# --- the scan against a direct computation ------------------------------------------------


def direct(weight: np.ndarray, factor, out_axis: int) -> dict:
    """The figures of ``cast(weight * factor)``, materialised, in float64 with float32 quantisation."""
    values = (weight.astype(np.float64) * (1.0 if factor is None else factor)).astype(weight.dtype).astype(np.float64)
    axes = tuple(a for a in range(values.ndim) if a != out_axis)

    def noise(step):
        step = np.where(step > 0, step, 1.0)
        quantised = np.rint((values / step).astype(np.float32)) * step
        return float(((values - quantised) ** 2).sum())

    return {"signal": float((values ** 2).sum()), "pt": noise(np.abs(values).max() / 127),
            "pc": noise(np.abs(values).max(axis=axes, keepdims=True) / 127),
            "fp16": P.FP16.classify(values), "max": np.abs(values).max(axis=axes)}


CASES = [((16, 8, 3, 3), 0, (16, 1, 1, 1)), ((16, 8, 3, 3), 0, (1, 8, 1, 1)), ((32, 24), 1, (1, 24)),
         ((32, 24), 1, (32, 1)), ((8, 4, 3, 3), 1, (8, 4, 1, 1)), ((40, 1, 3, 3), 0, (40, 1, 1, 1))]


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
@pytest.mark.parametrize("shape, out_axis, factor_shape", CASES)
def test_scan_matches_the_folded_tensor_quantised_directly(dtype, shape, out_axis, factor_shape):
    rng = np.random.default_rng(1)
    weight = (rng.standard_normal(shape) * 0.05).astype(dtype)
    weight.reshape(-1)[:40] *= dtype(1e-4)  # values that fp16 flushes once folded
    prior = rng.uniform(0.5, 2, factor_shape)
    factor = prior * rng.uniform(1e-3, 3000 if dtype != np.float16 else 3, factor_shape)
    peak, views = P.measure_weight(weight, [prior, factor], out_axis, ALL, block_elements=100)
    coarse = np.max(peak, axis=tuple(a for a, size in enumerate(factor_shape) if size == 1), keepdims=True)
    assert np.array_equal(coarse, affine.peak_by_factor(weight, factor))  # planning's overflow check reads it
    for view, f in zip(views, [prior, factor]):
        want = direct(weight, f, out_axis)
        assert view.signal.sum() == pytest.approx(want["signal"], rel=1e-5)
        assert view.pt_noise == pytest.approx(want["pt"], rel=1e-4)
        assert view.pc_noise.sum() == pytest.approx(want["pc"], rel=1e-4, abs=1e-30)
        assert tuple(view.counts["fp16"]) == want["fp16"]
        assert np.array_equal(view.channel_max, want["max"])


@given(st.data())
def test_the_scan_of_any_layout_matches_the_folded_tensor_quantised_directly(data):
    """The scan against the direct computation, composing what it special-cases: rank,
    output axis, factors along it or another axis or none, dtype, block size, a weight at
    an odd byte offset, pruned zeros, values fp16 flushes or overflows, a strided sample,
    and the scratch buffers a weight measured before leaves behind."""
    dtype = data.draw(st.sampled_from([np.float32, np.float64, np.float16]))
    rank = data.draw(st.integers(2, 4))
    shape = tuple(data.draw(st.lists(st.integers(1, 9), min_size=rank, max_size=rank)))
    out_axis = data.draw(st.integers(0, 1))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    weight = rng.standard_normal(shape) * data.draw(st.sampled_from([0.05, 1.0]))
    weight[rng.random(shape) < data.draw(st.sampled_from([0.0, 0.5]))] = 0
    weight.reshape(-1)[rng.random(weight.size) < 0.1] *= 1e-6  # folded, some flush in fp16
    weight = weight.astype(dtype)
    if data.draw(st.booleans()):  # stored at an odd byte offset, as in a file
        shifted = np.zeros(weight.nbytes + 1, dtype=np.uint8)[1:].view(dtype).reshape(shape)
        shifted[...] = weight
        weight = shifted

    def factor_along(axes):
        high = 10.0 if dtype == np.float16 else 1e6  # fp16 overflow from float32 and float64 weights
        return np.exp(rng.uniform(np.log(1e-4), np.log(high), [shape[a] if a in axes else 1 for a in range(rank)]))

    axes = data.draw(st.sampled_from([{out_axis}, {1 - out_axis}, {0, 1}, set()]))
    factors = [data.draw(st.sampled_from([None, "prior"])), "fold"]
    factors = [None if f is None else factor_along({out_axis} if f == "prior" else axes) for f in factors]
    block = data.draw(st.sampled_from([1, 7, 64, 1 << 16]))
    limit = data.draw(st.sampled_from([None, 64]))  # 64: a strided sample of any weight bigger
    if data.draw(st.booleans()):
        P.measure_weight(rng.standard_normal((33, 65)).astype(np.float32), [None, None], 0, ALL)
    _, views = P.measure_weight(weight, factors, out_axis, ALL, block_elements=block, sample_limit=limit)
    sampled = limit is not None and weight.size > limit
    for view, f in zip(views, factors):
        want = direct(np.array(weight), f, out_axis)
        assert tuple(view.counts["fp16"]) == want["fp16"]
        assert np.array_equal(view.channel_max, want["max"])
        assert view.signal.sum() == pytest.approx(want["signal"], rel=2.0**-9 if dtype == np.float16 else 1e-5)
        if not sampled:  # positions w * (f / step) in the weight's type err by ~127 * 2^-23 steps each
            slack = weight.size * 2e-5 * (want["max"].max() / 127) ** 2 + 1e-30
            assert view.pt_noise == pytest.approx(want["pt"], rel=1e-4, abs=slack)
            assert view.pc_noise.sum() == pytest.approx(want["pc"], rel=1e-4, abs=slack)


def _figures(views) -> list:
    return [(v.signal.sum(), v.pt_noise, v.pc_noise.tolist(), v.counts, v.channel_max.tolist()) for v in views]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_weight_stored_at_any_byte_offset_measures_as_an_aligned_one(dtype):
    """Weights embedded in a file sit at any byte offset; the scan copies such blocks before
    its arithmetic (numpy's loops over misaligned data are several times slower), and
    the figures are those of the same values aligned."""
    rng = np.random.default_rng(5)
    weight = (rng.standard_normal((96, 40, 3, 3)) * 0.05).astype(dtype)
    weight.reshape(-1)[::997] = dtype(1e-9)  # underflow candidates in several blocks
    raw = np.zeros(weight.nbytes + 1, dtype=np.uint8)
    misaligned = raw[1:].view(dtype).reshape(weight.shape)
    misaligned[...] = weight
    assert not misaligned.flags.aligned
    factor = rng.uniform(1e-3, 2, (96, 1, 1, 1))
    _, aligned = P.measure_weight(weight, [None, factor], 0, ALL, block_elements=4096, sample_limit=20000)
    _, shifted = P.measure_weight(misaligned, [None, factor], 0, ALL, block_elements=4096, sample_limit=20000)
    assert _figures(shifted) == _figures(aligned)
    assert aligned[1].counts["fp16"][1] > 0


def test_figures_do_not_depend_on_the_block_size_or_the_weight_before():
    """Blocks and the reused scratch buffers are an implementation detail: a weight
    measured after a bigger one, in blocks of any size, gives the same figures."""
    rng = np.random.default_rng(6)
    weight = (rng.standard_normal((64, 300, 5)) * 0.05).astype(np.float32)
    factor = rng.uniform(0.1, 30, (64, 1, 1))
    first = _figures(P.measure_weight(weight, [None, factor], 0, ALL, sample_limit=4000)[1])
    P.measure_weight((rng.standard_normal((300, 900)) * 9).astype(np.float32), [None, None], 0, ALL)
    for block in (1500, 1 << 12, 1 << 20):
        again = _figures(P.measure_weight(weight, [None, factor], 0, ALL, sample_limit=4000, block_elements=block)[1])
        for (signal, pt, pc, counts, peak), want in zip(again, first):
            assert (signal, pt, *pc) == pytest.approx((want[0], want[1], *want[2]), rel=1e-6)  # float32 sums per block
            assert (counts, peak) == (want[3], want[4])


def _in_a_fresh_thread(measure):
    """``measure()`` where no scratch buffer exists yet (they are per thread)."""
    out = []
    thread = threading.Thread(target=lambda: out.append(measure()))
    thread.start()
    thread.join()
    return out[0]


def test_a_float64_weight_after_a_float32_one_of_its_shape_measures_in_float64():
    """The scratch buffers' views are reused by shape and dtype: a float64 weight measured
    after a float32 one of the same shape is read in float64, as on its own."""
    rng = np.random.default_rng(7)
    weight = rng.standard_normal((48, 20, 3, 3)) * (1 + 1e-12)  # values float32 cannot hold
    factor = rng.uniform(0.5, 2, (48, 1, 1, 1))

    def measure():
        return _figures(P.measure_weight(weight, [None, factor], 0, ALL)[1])

    alone = _in_a_fresh_thread(measure)
    P.measure_weight(weight.astype(np.float32), [None, factor], 0, ALL)
    assert measure() == alone


def test_scratch_memory_stays_one_buffer_per_name_as_weights_grow():
    """A weight bigger than any before grows the scratch buffers; the old ones, and the
    views into them, are let go: these 40 slowly growing weights leave 1.7 MiB (28 MiB when
    the views kept the old buffers)."""
    rng = np.random.default_rng(8)
    weights = [(rng.standard_normal((rows, 64, 3, 3)) * 0.05).astype(np.float32) for rows in range(8, 208, 5)]

    def measure():
        tracemalloc.start()
        try:
            for weight in weights:
                P.measure_weight(weight, [None, np.full((weight.shape[0], 1, 1, 1), 1.5)], 0, ALL)
            return tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()

    assert _in_a_fresh_thread(measure) < 8 * 2**20


def test_a_mapped_weights_pages_are_released_as_it_is_read_and_at_the_end():
    """``done()`` (planning releases the mapped pages read so far) runs every
    ``RELEASE_ELEMENTS`` elements or so, and after the last block: a huge mapped weight
    never holds more than that resident."""
    weight = np.ones((10, P.RELEASE_ELEMENTS // 4 + 3), dtype=np.float32)
    read = []

    class Rows:  # a source that records how far it has been read
        shape, dtype = weight.shape, weight.dtype

        def __getitem__(self, rows):
            read.append(rows.stop)
            return weight[rows]

    released = []
    P.measure_weight(Rows(), [None, np.full((10, 1), 2.0)], 0, ALL, done=lambda: released.append(read[-1]))
    assert released[-1] == weight.shape[0]
    gaps = np.diff([0] + released) * weight.shape[1]
    assert len(released) >= 2 and gaps.max() <= P.RELEASE_ELEMENTS + weight.shape[1], released


def test_a_pruned_weights_zeros_are_not_kept_as_candidates():
    """Zeros lie below any underflow bound, but a cast keeps them 0: a pruned weight's
    zeros set aside as candidates would hold memory in proportion to the weight (16 bytes
    each) instead of a few blocks."""
    rng = np.random.default_rng(7)
    weight = (rng.standard_normal((1024, 4096)) * 0.05).astype(np.float32)
    weight[:, ::2] = 0
    weight[3, 1] = 1e-30  # one that does flush to 0
    tracemalloc.start()
    try:
        _, views = P.measure_weight(weight, [None, np.full((1024, 1), 0.5)], 0, ("fp16",))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    want = [list(P.FP16.classify(weight)), list(P.FP16.classify((weight * np.float64(0.5)).astype(np.float32)))]
    assert [v.counts["fp16"] for v in views] == want and want[0][1] >= 1
    assert peak < weight.nbytes // 4, peak


def _sampling_error(shape, out_axis: int, seed: int) -> float:
    """The largest gap, in dB, between the sampled and the whole-tensor int8 SQNR (per
    tensor and per channel, before and after the fold) of a weight with structure a sample
    could miss: channel ranges 30x apart and a fold scaling them up to 55x, input channels
    (rows of the MatMul weight, sampled whole) e^+-1 apart, a centre tap 3x the others in
    each kernel."""
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal(shape) * 0.02
    weight *= np.exp(rng.uniform(0, np.log(30), shape[out_axis])).reshape(
        [-1 if a == out_axis else 1 for a in range(len(shape))])
    weight *= np.exp(rng.uniform(-1, 1, shape[1 - out_axis])).reshape(
        [-1 if a == 1 - out_axis else 1 for a in range(len(shape))])
    if len(shape) == 4:
        weight[:, :, 1, 1] *= 3
    weight = weight.astype(np.float32)
    factor = np.exp(rng.uniform(-2, 2, [shape[a] if a == out_axis else 1 for a in range(len(shape))]))
    _, sampled = P.measure_weight(weight, [None, factor], out_axis, ("int8",))
    _, whole = P.measure_weight(weight, [None, factor], out_axis, ("int8",), sample_limit=weight.size)
    assert sampled[0].pc_noise.sum() != whole[0].pc_noise.sum()  # a sample indeed
    gaps = []
    for a, b in zip(sampled, whole):
        for noise in ("pt_noise", "pc_noise"):
            db = lambda v: P.sqnr_db(float(v.signal.sum()), float(np.sum(getattr(v, noise))))
            gaps.append(abs(db(a) - db(b)))
    return max(gaps)


@pytest.mark.parametrize("shape, out_axis", [((512, 256, 3, 3), 0), ((2048, 640), 1)])
def test_a_big_weights_int8_figures_come_from_a_sample_within_02_db(shape, out_axis):
    """What docs/precision.md states of the sample, on 16 random weights of each kind: every
    SQNR within 0.2 dB of the whole tensor's, 0.05 dB apart on average (a sample of 2^16
    averages 0.07). (With the signal energy taken from the sample too, the conv's SQNR
    erred by 0.05, 0.32, 0.21 and 1.2 dB for seeds 2, 3, 4 and 8.)"""
    gaps = np.array([_sampling_error(shape, out_axis, seed) for seed in range(16)])
    assert gaps.max() < 0.2 and gaps.mean() < 0.06, gaps.round(3)


def test_spread_and_growth():
    assert P.spread(np.array([1.0, 2.0, 0.0, 4.0])) == 2.0  # median of the nonzero ranges
    assert P.spread(np.zeros(3)) is None
    assert P.sqnr_db(1.0, 0.0) == math.inf and P.sqnr_db(0.0, 1.0) is None


@pytest.mark.parametrize("size", [1, 2, 3, 4, 7, 64, 1001])
def test_the_median_is_numpys(size):
    values = np.random.default_rng(size).lognormal(0, 3, size)
    values[::3] = values[0]  # ties
    assert P.median(values) == np.median(values)


# --- the models show their problems, healthy ones none ------------------------------------


@pytest.mark.parametrize("name", HEALTHY)
def test_healthy_zoo_models_have_no_precision_problem(name):
    result = bnfold.fold(MODELS / f"{name}.onnx", targets=ALL)
    assert problems(result) == {}
    measured = [e for e in result.ledger if e.folded and e.is_bn]
    assert measured and all(e.precision is not None and e.precision.tensors for e in measured)


@pytest.mark.train
def test_the_depthwise_stack_spreads_int8_ranges(hazards):
    found = problems(bnfold.fold(hazards["depthwise"]["onnx"], targets=ALL))
    assert set(found) == {"int8-range-spread"}
    (label, problem), = found["int8-range-spread"]
    assert "output channels" in problem.detail and problem.channels


@pytest.mark.train
def test_a_tiny_variance_channel_overflows_fp16(hazards):
    result = bnfold.fold(hazards["tiny-variance"]["onnx"], targets=ALL)
    found = problems(result)
    assert set(found) == {"fp16-overflow", "int8-range-spread"}
    assert "per-channel quantisation does not help" in found["int8-range-spread"][0][1].detail
    assert not problems(bnfold.fold(hazards["tiny-variance"]["onnx"], targets=("bf16", "int8"))).get("fp16-overflow")


@pytest.mark.train
def test_a_dead_channel_underflows_fp16(hazards):
    found = problems(bnfold.fold(hazards["dead-channel"]["onnx"], targets=ALL))
    assert set(found) == {"fp16-underflow"}
    assert len(found["fp16-underflow"][0][1].channels) == 2


def test_the_zoo_dead_pixel_model_spreads_its_input_channels():
    found = problems(bnfold.fold(MODELS / "mlp-deadpixel_dynamo18.onnx", targets=ALL))
    assert set(found) == {"int8-range-spread"}
    assert "input channels" in found["int8-range-spread"][0][1].detail


def test_inspect_reports_the_plan_fold_measures():
    path = MODELS / "mlp-deadpixel_dynamo18.onnx"
    folded = bnfold.fold(path, targets=ALL).ledger
    findings = bnfold.inspect(path, targets=ALL)
    assert [json.dumps(f.to_dict()["precision"], sort_keys=True, default=str) for f in findings] == \
        [json.dumps(e.to_dict()["precision"], sort_keys=True, default=str) for e in folded.batch_norms]


# --- agreement with onnxruntime -------------------------------------------------------------


def ort_sqnr(weight: np.ndarray, axis: int | None) -> float:
    """SQNR of ``weight`` through QuantizeLinear/DequantizeLinear (int8, zero point 0) in onnxruntime."""
    import onnxruntime as ort

    if axis is None:
        scale = np.array(np.abs(weight).max() / 127, dtype=np.float32)
        attrs = {}
    else:
        peak = np.abs(weight).max(axis=tuple(a for a in range(weight.ndim) if a != axis))
        scale = np.where(peak > 0, peak / 127, 1).astype(np.float32)
        attrs = {"axis": axis}
    zero = np.zeros(scale.shape, dtype=np.int8)
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["w", "s", "z"], ["q"], **attrs),
         helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], **attrs)], "qdq",
        [helper.make_tensor_value_info("w", TensorProto.FLOAT, list(weight.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(weight.shape))],
        [numpy_helper.from_array(scale, "s"), numpy_helper.from_array(zero, "z")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    y = session.run(None, {"w": weight.astype(np.float32)})[0].astype(np.float64)
    w = weight.astype(np.float64)
    return 10 * math.log10((w ** 2).sum() / ((w - y) ** 2).sum())


def folded_weights(result):
    """(figures, the folded weight as saved) of every measured weight."""
    proto = result.to_proto()
    initializers = {t.name: t for t in proto.graph.initializer}
    for entry in result.ledger:
        for figures in entry.precision.tensors if entry.precision else []:
            if figures.role == "weight":
                node = next(n for n in proto.graph.node if n.name == figures.node)
                yield figures, numpy_helper.to_array(initializers[node.input[figures.input]])


#: The int8 figures and onnxruntime's QuantizeLinear/DequantizeLinear agree within this
#: (weights below INT8_SAMPLE elements: only float32 rounding of near-ties differs).
INT8_AGREEMENT_DB = 0.01


@pytest.mark.parametrize("name", ["cnn_ts13", "resnet_ts13", "mlp-deadpixel_dynamo18", "seq1d_ts13"])
def test_int8_figures_agree_with_onnxruntime_qdq(name):
    result = bnfold.fold(MODELS / f"{name}.onnx", targets=("int8",))
    checked = 0
    for figures, weight in folded_weights(result):
        for mode, axis in (("per_tensor_sqnr_db", None), ("per_channel_sqnr_db", figures.channel_axis)):
            assert abs(getattr(figures.int8, mode).after - ort_sqnr(weight, axis)) < INT8_AGREEMENT_DB, (figures, mode)
            checked += 1
    assert checked >= 4


@pytest.mark.train
@pytest.mark.parametrize("name", ["depthwise", "tiny-variance", "dead-channel"])
def test_int8_figures_of_the_hazards_agree_with_onnxruntime_qdq(hazards, name):
    result = bnfold.fold(hazards[name]["onnx"], targets=("int8",))
    for figures, weight in folded_weights(result):
        for mode, axis in (("per_tensor_sqnr_db", None), ("per_channel_sqnr_db", figures.channel_axis)):
            value = getattr(figures.int8, mode).after
            assert abs(value - ort_sqnr(weight, axis)) < INT8_AGREEMENT_DB, (figures.tensor, mode)


@pytest.mark.train
@pytest.mark.parametrize("name", ["tiny-variance", "dead-channel", "depthwise"])
def test_fp16_counts_are_what_the_converter_writes(hazards, name, tmp_path):
    """The folded model converted to fp16 (as verify --precision converts it) holds exactly
    the infs and zeros the ledger counts."""
    pytest.importorskip("onnxconverter_common")
    from bnfold.verification.fp16 import convert_fp16

    result = bnfold.fold(hazards[name]["onnx"], targets=("fp16",))
    result.save(tmp_path / "folded.onnx")
    converted = onnx.load(convert_fp16(tmp_path / "folded.onnx", tmp_path, "folded"))
    fp16 = {t.name: numpy_helper.to_array(t) for t in converted.graph.initializer}
    for figures, weight in folded_weights(result):
        node = next(n for n in converted.graph.node if n.name == figures.node)
        half = fp16[node.input[figures.input]].astype(np.float64)
        assert figures.fp16.overflow.after == int(np.isinf(half).sum())
        assert figures.fp16.underflow.after == int(((half == 0) & (weight != 0)).sum())


@pytest.mark.train
def test_verify_precision_agrees_with_the_findings(hazards, tmp_path):
    """A fold that overflows fp16 makes the converted model compute NaN where the original's
    fp16 computes its logits: verify --precision fp16 fails; the healthy zoo model passes."""
    pytest.importorskip("onnxconverter_common")
    built = hazards["tiny-variance"]
    out = tmp_path / "tiny.folded.onnx"
    assert invoke("fold", built["onnx"], "-o", out, "-q").exit_code == 0
    result = invoke("verify", built["onnx"], out, "--inputs", built["inputs"], "--precision", "fp16",
                    "--json", tmp_path / "v.json")
    assert result.exit_code == 1, result.output
    assert "fp16 makes CANDIDATE drift more than ORIGINAL" in result.output
    (comparison,) = json.loads((tmp_path / "v.json").read_text())["precision"]
    assert comparison["drift"]["candidate_nonfinite"] > 0 and comparison["drift"]["original_nonfinite"] == 0
    healthy = tmp_path / "cnn.folded.onnx"
    assert invoke("fold", MODELS / "cnn_ts13.onnx", "-o", healthy, "-q").exit_code == 0
    result = invoke("verify", MODELS / "cnn_ts13.onnx", healthy, "--inputs", MODELS / "cnn_ts13.npz",
                    "--precision", "fp16")
    assert result.exit_code == 0, result.output
    assert "fp16 no worse than ORIGINAL's" in result.output


# --- the command line -------------------------------------------------------------------------


@pytest.mark.train
def test_strict_fails_on_precision_problems_only_with_a_target(hazards, tmp_path):
    model = hazards["dead-channel"]["onnx"]
    out = tmp_path / "out.onnx"
    assert invoke("fold", model, "-o", out, "--strict", "-q").exit_code == 0
    result = invoke("fold", model, "-o", out, "--strict", "--target", "fp16", "--json", tmp_path / "l.json",
                    "--junit", tmp_path / "j.xml")
    assert result.exit_code == 1
    line = "bnfold: FAIL: --strict: 1 folded site(s) with precision problems for fp16 (fp16-underflow)"
    assert line in result.output
    report = json.loads((tmp_path / "l.json").read_text())
    assert report["schema_version"] == 3 and report["targets"] == ["fp16"]
    assert report["summary"]["with_precision_problems"] == 1
    assert report["failures"][0]["message"] == "precision: fp16-underflow"
    assert "fp16-underflow" in (tmp_path / "j.xml").read_text()
    relaxed = invoke("fold", model, "-o", out, "--target", "fp16")
    assert relaxed.exit_code == 0
    assert "warning: 1 folded site(s) with precision problems for fp16 (fp16-underflow)" in relaxed.output
    assert "hint: fp16-underflow:" in relaxed.output


@pytest.mark.train
def test_inspect_fails_on_precision_problems_only_with_a_target(hazards, tmp_path):
    model = hazards["dead-channel"]["onnx"]
    assert invoke("inspect", model).exit_code == 0
    result = invoke("inspect", model, "--target", "fp16", "--json", tmp_path / "i.json")
    assert result.exit_code == 1
    assert "1 planned fold(s) with precision problems for fp16 (fp16-underflow)" in result.output
    report = json.loads((tmp_path / "i.json").read_text())
    assert report["schema_version"] == 2 and report["summary"]["with_precision_problems"] == 1
    assert [p["code"] for f in report["findings"] if f["precision"] for p in f["precision"]["problems"]] == \
        ["fp16-underflow"]


def test_the_json_block_and_plain_lines(tmp_path):
    out = tmp_path / "out.onnx"
    result = invoke("fold", MODELS / "mlp-deadpixel_dynamo18.onnx", "-o", out, "--target", "int8", "--target",
                    "fp16", "--json", "-")
    assert result.exit_code == 0
    report = json.loads(result.stdout)
    block = next(e["precision"] for e in report["entries"] if e["precision"] and e["precision"]["problems"])
    weight = next(t for t in block["tensors"] if t["role"] == "weight")
    assert set(weight) >= {"growth", "spread", "fp16", "int8", "scaled", "channel_axis", "tensor", "node"}
    assert weight["spread"]["after"] > P.SPREAD_THRESHOLD > weight["spread"]["before"]
    assert block["problems"][0]["code"] == "int8-range-spread" and block["problems"][0]["channels"]
    lines = invoke("fold", MODELS / "mlp-deadpixel_dynamo18.onnx", "-o", out, "--target", "int8").output.splitlines()
    measured = [line for line in lines if line.startswith("precision: ")]
    assert len(measured) == sum(len(e["precision"]["tensors"]) for e in report["entries"] if e["precision"])
    assert any(line.startswith("int8-range-spread: ") for line in lines)
    assert any(line.startswith("hint: int8-range-spread: quantise weights per channel") for line in lines)


def test_keep_leaves_the_named_site(tmp_path):
    model = MODELS / "cnn_ts13.onnx"
    name = bnfold.fold(model).ledger[0].node
    result = invoke("fold", model, "-o", tmp_path / "out.onnx", "--keep", name, "--json", tmp_path / "l.json", "-q")
    assert result.exit_code == 0
    entry = json.loads((tmp_path / "l.json").read_text())["entries"][0]
    assert (entry["status"], entry["reason"]) == ("kept", "kept-on-request")
    missing = invoke("fold", model, "-o", tmp_path / "out.onnx", "--keep", "no-such-bn")
    assert missing.exit_code == 2
    assert missing.stderr.strip().splitlines() == [
        "bnfold: error: models/cnn_ts13.onnx: --keep no-such-bn: no BatchNormalization or affine site has that "
        "name (`bnfold inspect` lists them)".replace("models/cnn_ts13.onnx", str(model))]


def test_an_unknown_target_is_one_line_and_exit_2(tmp_path):
    for command in (["fold", MODELS / "cnn_ts13.onnx", "-o", tmp_path / "o.onnx"], ["inspect", MODELS / "cnn_ts13.onnx"]):
        result = invoke(*command, "--target", "int4")
        assert result.exit_code == 2
        assert result.stderr.strip().splitlines() == ["bnfold: error: --target 'int4': expected one of fp16, bf16, int8"]
    assert not (tmp_path / "o.onnx").exists()


def test_verify_precision_without_the_converter_is_one_line_and_exit_2(tmp_path, monkeypatch):
    import importlib.util

    from bnfold import runtime

    real = importlib.util.find_spec
    monkeypatch.setattr(runtime.importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnxconverter_common" else real(name, *a))
    model = MODELS / "cnn_ts13.onnx"
    result = invoke("verify", model, model, "--precision", "fp16")
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        "bnfold: error: --precision fp16 converts the models with onnxconverter-common, which is not installed: "
        "pip install '.[precision]' (onnxconverter-common; from a clone of bnfold)"]
    folded = invoke("fold", model, "-o", tmp_path / "o.onnx", "--verify", "--precision", "fp16")
    assert folded.exit_code == 2 and not (tmp_path / "o.onnx").exists()


def test_without_a_target_nothing_is_measured():
    """Zero cost by default: a fold without a target never loads the precision code."""
    code = ("import sys, bnfold; r = bnfold.fold(sys.argv[1]); "
            "assert all(e.precision is None for e in r.ledger) and r.ledger.targets == []; "
            "assert 'bnfold.precision' not in sys.modules and 'bnfold.assess' not in sys.modules, sorted(sys.modules)")
    done = subprocess.run([sys.executable, "-c", code, str(MODELS / "cnn_ts13.onnx")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
