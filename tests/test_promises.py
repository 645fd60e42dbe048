"""Promises of the README and docs that an audit found no deterministic test for (issue 27).

Each test is written from the promise and compares against onnxruntime (ORT_DISABLE_ALL)
or against what onnxruntime itself reports:

- a BN before a Gemm folds only along the axis the Gemm reads as its input features: with
  ``transA=1`` the BN's channels are the Gemm's rows, so it must be kept (every
  transA/transB combination, square and not, directly and through a Flatten);
- a Concat of linear producers folds only along the channel axis; a valid model with a
  Concat along another axis is kept, never refused as invalid, and runs unchanged;
- verify's reference is ORIGINAL run the way onnxruntime runs it with ORT_DISABLE_ALL, and
  +inf and -inf are different values;
- the channel axis is followed through Transposes with permutations that are not their
  own inverse (3-cycles and longer, ranks 3-5), after a linear op and before one.
"""

from __future__ import annotations

import itertools
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import bnfold
from builders import GraphBuilder, count_ops, fold_and_compare, run
from bnfold.verification import OPTIMIZATION_DEFAULT, OPTIMIZATION_DISABLED, VerifyOptions, compare_arrays, verify
from bnfold.verification.compare import DEFAULT_TOLERANCES, default_tolerance
from cli_runner import invoke


def only_entry(result, op="BatchNormalization"):
    (entry,) = [e for e in result.ledger if e.op == op]
    return entry


def rand(b: GraphBuilder, shape) -> np.ndarray:
    return b.rng.standard_normal(shape).astype(np.float32)


# --- BN before Gemm: every transA / transB --------------------------------------------


@pytest.mark.parametrize("rows, cols", [(3, 3), (2, 5)], ids=["square", "oblong"])
@pytest.mark.parametrize("trans_a, trans_b", list(itertools.product([0, 1], [0, 1])))
@pytest.mark.parametrize("site", ["bn", "mul"])
def test_map_before_gemm_folds_only_along_the_features_the_gemm_reads(tmp_path, rows, cols, trans_a, trans_b, site):
    """x[rows, cols] -> BN (or Mul by a per-column constant) -> Gemm(transA, transB, alpha, beta, C).

    The map's channels are the columns of A. With transA=0 they are the Gemm's input
    features and the map folds into B and C; with transA=1 they are its output rows, which
    no weight of the Gemm can absorb: the map is kept, whatever the shapes (a square A
    must not make it look foldable, an oblong one must not make the model look invalid)."""
    b = GraphBuilder(seed=rows * 10 + 2 * trans_a + trans_b)
    x = b.input([rows, cols])
    if site == "bn":
        y = b.bn(x, cols, name="the_site")
    else:
        y = b.node("Mul", [x, b.const(b.rng.uniform(0.5, 2.0, cols).astype(np.float32))], name="the_site")
    k, m = (rows, cols) if trans_a else (cols, rows)
    n = 4
    weight = b.random([n, k] if trans_b else [k, n])
    y = b.node("Gemm", [y, weight, b.random([m, n])], transA=trans_a, transB=trans_b, alpha=0.75, beta=1.5)
    b.output(y)
    result, folded = fold_and_compare(b.model(), {"x": rand(b, (rows, cols))}, tmp_path, rtol=1e-5, atol=1e-5)
    entry = only_entry(result, "BatchNormalization" if site == "bn" else "Mul")
    if trans_a:
        assert entry.status == "kept" and entry.reason == "channel-axis-mismatch", entry
        assert count_ops(folded, "BatchNormalization" if site == "bn" else "Mul") == 1
    else:
        assert entry.folded and entry.pattern.endswith("gemm"), entry


@pytest.mark.parametrize("trans_a, trans_b", list(itertools.product([0, 1], [0, 1])))
def test_bn_flatten_gemm_with_trans_a_is_kept(tmp_path, trans_a, trans_b):
    """BN[2, 2, 1, 1] -> Flatten -> Gemm: with transA=1 the flattened channels are rows (K = the batch, 2)."""
    b = GraphBuilder(seed=40 + 2 * trans_a + trans_b)
    y = b.node("Flatten", [b.bn(b.input([2, 2, 1, 1]), 2, name="the_bn")], axis=1)
    k = 2
    y = b.node("Gemm", [y, b.random([3, k] if trans_b else [k, 3])], transA=trans_a, transB=trans_b)
    b.output(y)
    result, _ = fold_and_compare(b.model(), {"x": rand(b, (2, 2, 1, 1))}, tmp_path, rtol=1e-5, atol=1e-5)
    entry = only_entry(result)
    assert entry.folded != bool(trans_a), entry


# --- Concat of linear producers -------------------------------------------------------


def concat_of_convs(axis: int, site_channels: int | None = None, seed: int = 0):
    """x[2, 3, 4, 4] -> Conv_a, Conv_b (2 channels each, 4x4) -> Concat(axis) -> BN."""
    b = GraphBuilder(seed=seed)
    x = b.input([2, 3, 4, 4])
    a = b.node("Conv", [x, b.random([2, 3, 3, 3]), b.random([2])], pads=[1, 1, 1, 1])
    c = b.node("Conv", [x, b.random([2, 3, 1, 1])])
    y = b.node("Concat", [a, c], axis=axis)
    channels = site_channels or (4 if axis % 4 == 1 else 2)
    b.output(b.bn(y, channels, name="the_bn"))
    return b


@pytest.mark.parametrize("axis", [1, -3])
def test_bn_after_a_concat_along_the_channel_axis_folds_into_each_producer(tmp_path, axis):
    b = concat_of_convs(axis, seed=50)
    result, folded = fold_and_compare(b.model(), {"x": rand(b, (2, 3, 4, 4))}, tmp_path)
    entry = only_entry(result)
    assert entry.folded and entry.pattern == "concat(conv+conv)-bn", entry
    assert count_ops(folded, "BatchNormalization") == 0


@pytest.mark.parametrize("axis", [0, 2, 3, -1, -2, -4])
def test_bn_after_a_concat_along_another_axis_folds_into_every_input(tmp_path, axis):
    """Concat(axis=2): every input carries all of the BN's channels, so the map goes whole
    into each producer (a Concat along the channels splits it instead). A valid model:
    never 'invalid model' (exit 2); the fold is exact in onnxruntime."""
    b = concat_of_convs(axis, seed=51)
    x = {"x": rand(b, (2, 3, 4, 4))}
    result, folded = fold_and_compare(b.model(), x, tmp_path)
    entry = only_entry(result)
    assert entry.folded and entry.pattern == "concat(conv+conv)-bn", entry
    assert count_ops(folded, "BatchNormalization") == 0
    out = tmp_path / "cli.onnx"
    cli = invoke("fold", tmp_path / "in.onnx", "-o", out, "--quiet")
    assert cli.exit_code == 0, cli.output
    np.testing.assert_allclose(run(out, x)[0], run(tmp_path / "in.onnx", x)[0], rtol=1e-5, atol=1e-5)


# --- verify's reference run ------------------------------------------------------------


def ort_outputs(path, feeds, level) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, feeds)


def test_verify_reference_is_the_original_as_onnxruntime_runs_it_unoptimised(tmp_path):
    """Conv -> BN, whose output onnxruntime's Conv+BN fusion changes in the last bits.

    The reference verify compares with, and saves with --save-outputs, must be exactly
    what onnxruntime computes with ORT_DISABLE_ALL (not with its default level), and the
    candidate's run at the default level must be the one that differs. With a candidate
    identical to ORIGINAL and every tolerance 0 this is seen bit for bit."""
    from _models import ConvBnParams, conv_bn_model, save

    original = save(conv_bn_model(ConvBnParams.random(np.random.default_rng(0), 4, 3, (3, 3))),
                    tmp_path / "original.onnx")
    candidate = tmp_path / "candidate.onnx"
    shutil.copyfile(original, candidate)
    feeds = {"x": np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)}
    np.savez(tmp_path / "inputs.npz", **feeds)
    unoptimised = ort_outputs(original, feeds, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)[0]
    optimised = ort_outputs(original, feeds, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)[0]
    assert np.any(unoptimised != optimised), "onnxruntime's levels must differ on this model for the test to mean much"

    saved = tmp_path / "reference.npz"
    report = verify(original, candidate, VerifyOptions(providers="cpu", inputs=tmp_path / "inputs.npz", rtol=0,
                                                       atol=0, channel_rtol=0, noise_factor=0, save_outputs=saved))

    with np.load(saved) as reference:
        np.testing.assert_array_equal(reference["y"], unoptimised)
    by_level = {c.subject.optimization: c for c in report.comparisons}
    assert {c.reference.optimization for c in report.comparisons} == {OPTIMIZATION_DISABLED}
    assert by_level[OPTIMIZATION_DISABLED].difference.max_abs_diff == 0
    assert by_level[OPTIMIZATION_DISABLED].passed
    assert by_level[OPTIMIZATION_DEFAULT].difference.max_abs_diff == float(np.abs(optimised - unoptimised).max())
    assert not report.passed


# --- +inf is not -inf -----------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float16", "float64"])
def test_compare_counts_plus_and_minus_infinity_as_different(dtype):
    reference = [np.array([[1.0, np.inf, -np.inf, 2.0]], dtype)]
    flipped = [np.array([[1.0, -np.inf, np.inf, 2.0]], dtype)]
    same = compare_arrays(reference, [reference[0].copy()], default_tolerance(dtype), channel_axis=1)
    differs = compare_arrays(reference, flipped, default_tolerance(dtype), channel_axis=1)

    assert same.passed and same.nonfinite_mismatches == 0
    assert not differs.passed
    assert differs.nonfinite_mismatches == 2 and differs.channels_failing == 2
    assert not compare_arrays(reference, flipped, DEFAULT_TOLERANCES[dtype]).passed


def infinite_scale_model(sign: float, tmp_path, name: str):
    """x[2, 3] -> Mul(c) with c = [1, sign * inf, 1]: the middle column is ±inf (x != 0)."""
    b = GraphBuilder(seed=60)
    x = b.input([2, 3])
    b.output(b.node("Mul", [x, b.const(np.array([1.0, sign * np.inf, 1.0], np.float32))]))
    path = tmp_path / name
    path.write_bytes(b.model().SerializeToString())
    return path


def test_verify_fails_when_an_output_turns_from_plus_to_minus_infinity(tmp_path):
    original = infinite_scale_model(1.0, tmp_path, "plus.onnx")
    flipped = infinite_scale_model(-1.0, tmp_path, "minus.onnx")
    np.savez(tmp_path / "x.npz", x=np.array([[1.0, 2.0, 3.0], [-1.0, 0.5, 2.0]], np.float32))
    options = VerifyOptions(providers="cpu", inputs=tmp_path / "x.npz")

    assert verify(original, original, options).passed
    report = verify(original, flipped, options)
    assert not report.passed
    assert {c.difference.nonfinite_mismatches for c in report.comparisons} == {2}
    cli = invoke("verify", original, flipped, "--providers", "cpu", "--inputs", tmp_path / "x.npz")
    assert cli.exit_code == 1, cli.output


# --- Transposes that are not their own inverse ----------------------------------------

#: Cycles of 3 and more axes (perm != its inverse), and for contrast a few involutions.
PERMS = {
    3: [[1, 2, 0], [2, 0, 1], [0, 2, 1], [2, 1, 0]],
    4: [list(p) for p in itertools.permutations(range(4))],
    5: [[0, 2, 3, 4, 1], [0, 4, 1, 2, 3], [0, 1, 3, 4, 2], [0, 3, 4, 1, 2], [1, 2, 3, 4, 0], [4, 0, 1, 2, 3],
        [2, 0, 1, 4, 3], [0, 2, 1, 4, 3], [3, 4, 0, 1, 2]],
}
#: Chains of two transposes (p then q) whose composition is not the identity.
PAIRS = {
    3: [([1, 2, 0], [1, 2, 0]), ([2, 0, 1], [0, 2, 1]), ([1, 2, 0], [1, 0, 2]), ([0, 2, 1], [2, 0, 1])],
    4: [([0, 2, 3, 1], [0, 2, 3, 1]), ([0, 2, 3, 1], [0, 3, 2, 1]), ([0, 3, 1, 2], [0, 2, 1, 3]),
        ([0, 2, 3, 1], [0, 2, 1, 3]), ([0, 3, 1, 2], [0, 3, 1, 2]), ([1, 2, 3, 0], [3, 0, 1, 2]),
        ([2, 3, 0, 1], [0, 2, 3, 1]), ([0, 2, 3, 1], [3, 1, 0, 2])],
    5: [([0, 2, 3, 4, 1], [0, 2, 3, 4, 1]), ([0, 4, 1, 2, 3], [0, 1, 3, 4, 2]), ([0, 2, 3, 4, 1], [0, 4, 2, 3, 1])],
}
CHAINS = [(rank, [p]) for rank, perms in PERMS.items() for p in perms] + \
         [(rank, [p, q]) for rank, pairs in PAIRS.items() for p, q in pairs]
SIDE = 3  # every dim of the tensors below: an axis mix-up could never be caught by a shape


def channel_after(perms, rank: int, axis: int) -> int:
    """Where ``axis`` of a rank-``rank`` tensor lies after these transposes, by numpy's own transpose."""
    marked = np.zeros([7 if i == axis else 1 for i in range(rank)])
    for perm in perms:
        marked = np.transpose(marked, perm)
    return marked.shape.index(7)


def chain_id(chain):
    rank, perms = chain
    return f"r{rank}-" + "-".join("".join(map(str, p)) for p in perms)


@pytest.mark.parametrize("chain", CHAINS, ids=[chain_id(c) for c in CHAINS])
def test_channel_is_followed_through_transposes_after_a_conv(tmp_path, chain):
    """Conv (all dims 3) -> Transpose(s) -> BN, and -> Transpose(s) -> Mul by a constant
    along the axis where the conv's channels now are. The Mul always folds; the BN folds
    exactly when the channels land on axis 1; the outputs match either way."""
    rank, perms = chain
    lands = channel_after(perms, rank, 1)
    for site in ("bn", "mul"):
        b = GraphBuilder(seed=70 + rank)
        x = b.input([SIDE, 2] + [SIDE + 2] * (rank - 2))
        y = b.node("Conv", [x, b.random([SIDE, 2] + [3] * (rank - 2)), b.random([SIDE])])
        for perm in perms:
            y = b.node("Transpose", [y], perm=perm)
        if site == "bn":
            y = b.bn(y, SIDE, name="the_site")
        else:
            constant = b.rng.uniform(0.5, 2.0, SIDE).astype(np.float32).reshape([SIDE] + [1] * (rank - 1 - lands))
            y = b.node("Mul", [y, b.const(constant)], name="the_site")
        b.output(y)
        feeds = {"x": rand(b, [SIDE, 2] + [SIDE + 2] * (rank - 2))}
        (tmp_path / site).mkdir()
        result, _ = fold_and_compare(b.model(), feeds, tmp_path / site)
        entry = only_entry(result, "BatchNormalization" if site == "bn" else "Mul")
        expected = site == "mul" or lands == 1
        assert entry.folded == expected, (site, lands, entry)
        if not expected:
            assert entry.reason == "channel-axis-mismatch", entry


@pytest.mark.parametrize("chain", CHAINS, ids=[chain_id(c) for c in CHAINS])
def test_channel_is_followed_through_transposes_before_a_matmul(tmp_path, chain):
    """BN (all dims 3) -> Transpose(s) -> MatMul: the BN folds exactly when its channels
    land on the last axis, the one MatMul reads as features; the outputs match either way."""
    rank, perms = chain
    b = GraphBuilder(seed=80 + rank)
    y = b.bn(b.input([SIDE] * rank), SIDE, name="the_bn")
    for perm in perms:
        y = b.node("Transpose", [y], perm=perm)
    b.output(b.node("MatMul", [y, b.random([SIDE, 4])]))
    result, _ = fold_and_compare(b.model(), {"x": rand(b, [SIDE] * rank)}, tmp_path)
    entry = only_entry(result)
    assert entry.folded == (channel_after(perms, rank, 1) == rank - 1), entry


@pytest.mark.parametrize("perms", [[p, q] for p, q in PAIRS[4]] + [[p] for p in PERMS[4] if p[1] != 1],
                         ids=lambda perms: "-".join("".join(map(str, p)) for p in perms))
def test_channel_is_followed_through_transposes_before_a_conv(tmp_path, perms):
    """BN[3, 3, 3, 3] -> Transpose(s) -> Conv: folds exactly when the channels come back to axis 1."""
    b = GraphBuilder(seed=90)
    y = b.bn(b.input([SIDE] * 4), SIDE, name="the_bn")
    for perm in perms:
        y = b.node("Transpose", [y], perm=perm)
    b.output(b.node("Conv", [y, b.random([2, SIDE, 1, 1]), b.random([2])]))
    result, _ = fold_and_compare(b.model(), {"x": rand(b, [SIDE] * 4)}, tmp_path)
    entry = only_entry(result)
    assert entry.folded == (channel_after(perms, 4, 1) == 1), entry


# --- training mode, on its own ---------------------------------------------------------

#: BN attributes that put it in training mode by themselves: one output, nothing else amiss.
TRAINING = {"training_mode=1 (opset 14)": (14, {"training_mode": 1}),
            "training_mode=1 (opset 15)": (15, {"training_mode": 1}),
            "is_test=0 (opset 6)": (6, {"is_test": 0}),
            "is_test unset (opset 6)": (6, {})}


def lone_training_bn(opset: int, attrs: dict, where: str) -> GraphBuilder:
    """A one-output BN whose only problem is its mode, after a Conv, before one, or alone."""
    b = GraphBuilder(seed=95)
    x = b.input([2, 3, 4, 4])
    if where == "after":
        x = b.node("Conv", [x, b.random([4, 3, 1, 1])])
    y = b.bn(x, 4 if where == "after" else 3, name="the_bn", **attrs)
    if where == "before":
        y = b.node("Conv", [y, b.random([2, 3, 1, 1])])
    b.output(y)
    return b


@pytest.mark.parametrize("where", ["after", "before", "alone"])
@pytest.mark.parametrize("mode", list(TRAINING))
def test_a_training_mode_bn_with_one_output_is_kept_not_folded(tmp_path, mode, where):
    """The 3-output training form is refused for its outputs; this BN has one output and
    healthy statistics, so only the mode check stands between it and a fold."""
    opset, attrs = TRAINING[mode]
    model = lone_training_bn(opset, attrs, where).model(opset=opset)
    src = tmp_path / "m.onnx"
    src.write_bytes(model.SerializeToString())
    for flags in ({}, {"decompose_standalone": True}):
        result = bnfold.fold(src, **flags)
        entry = only_entry(result)
        assert entry.status == "kept" and entry.reason == "training-mode", (flags, entry)
        assert entry.problems == ["training-mode"]
        folded = result.to_proto()
        (bn,) = [n for n in folded.graph.node if n.op_type == "BatchNormalization"]
        assert bn == next(n for n in model.graph.node if n.op_type == "BatchNormalization")
    (finding,) = bnfold.inspect(src)
    assert not finding.ok and finding.problems == ["training-mode"] and finding.fold_reason == "training-mode"
    assert invoke("inspect", src, "--quiet").exit_code == 1
    strict = invoke("fold", src, "-o", tmp_path / "out.onnx", "--strict", "--quiet")
    assert strict.exit_code == 1, strict.output
    # what --to-inference is for: the same BN, converted on request, folds
    if where != "alone":
        assert only_entry(bnfold.fold(src, to_inference=True)).folded


# --- Shape and Size read no elements ----------------------------------------------------


@pytest.mark.parametrize("reader", ["Shape", "Size"])
def test_shape_and_size_readers_are_no_fan_out(tmp_path, reader):
    """README: "Shape/Size readers are no fan-out". Conv -> BN with the Conv's output also
    read by Shape (or Size), and BN -> Gemm with the BN's output also read so: both fold,
    and the Shape/Size outputs are what they were."""
    b = GraphBuilder(seed=97)
    y = b.node("Conv", [b.input([2, 3, 4, 4]), b.random([4, 3, 1, 1])])
    sizes = [b.node(reader, [y])]
    y = b.node("Flatten", [b.bn(y, 4, name="after")], axis=1)
    z = b.bn(y, 64, name="before")
    sizes.append(b.node(reader, [z]))
    b.outputs += [onnx.helper.make_tensor_value_info(name, onnx.TensorProto.INT64, None) for name in sizes]
    b.output(b.node("Gemm", [z, b.random([64, 5])]))
    result, folded = fold_and_compare(b.model(), {"x": rand(b, (2, 3, 4, 4))}, tmp_path)
    patterns = {e.node: e.pattern for e in result.ledger}
    assert patterns == {"after": "conv-bn", "before": "bn-gemm"}, list(result.ledger)
    assert count_ops(folded, "BatchNormalization") == 0


# --- reasons no test named ------------------------------------------------------------------


@pytest.mark.parametrize("op, kept", [("Sub", True), ("Add", True), ("Mul", False), ("Div", False)])
def test_a_shift_before_a_padded_conv_is_kept_and_a_scale_folds(tmp_path, op, kept):
    """docs/patterns.md: a constant Add/Sub before a Conv that pads its input is kept
    (padded-consumer: the border would see zeros, not the shift); a Mul/Div still folds."""
    b = GraphBuilder(seed=98)
    constant = b.const(b.rng.uniform(0.5, 2.0, 3).astype(np.float32).reshape(3, 1, 1))
    y = b.node(op, [b.input([2, 3, 5, 5]), constant], name="the_site")
    b.output(b.node("Conv", [y, b.random([4, 3, 3, 3]), b.random([4])], pads=[1, 1, 1, 1]))
    result, _ = fold_and_compare(b.model(), {"x": rand(b, (2, 3, 5, 5))}, tmp_path, rtol=0 if kept else 1e-4,
                                 atol=0 if kept else 1e-5)
    entry = only_entry(result, op)
    if kept:
        assert (entry.status, entry.reason) == ("kept", "padded-consumer"), entry
    else:
        assert entry.folded and entry.pattern == f"{op.lower()}-conv-scale", entry


def test_a_bn_older_than_version_6_is_kept_as_unsupported_opset():
    """docs/ledger.md: BatchNormalization before version 6 (the consumed_inputs form) is kept."""
    b = GraphBuilder(seed=99)
    y = b.node("Conv", [b.input([2, 3, 4, 4]), b.random([4, 3, 1, 1])])
    b.output(b.bn(y, 4, name="old", consumed_inputs=[0, 0, 0, 1, 1]))
    entry = only_entry(bnfold.fold(b.model(opset=5)))
    assert (entry.status, entry.reason) == ("kept", "unsupported-opset"), entry
