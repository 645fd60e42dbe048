"""Maps folded into the linear op *after* them (BN -> Gemm/MatMul/Conv, Keras' Mul -> MatMul),
through a Flatten-like Reshape, and the MatMul forms a map meets on either side (``W @ x``,
``x @ W + b``, an Add holding the bias): what folds, exactly, and what stays with which
reason. Every fold is compared with the original in onnxruntime (``fold_and_compare``)."""

import numpy as np
import onnx
import onnx.helper as oh
import pytest

import bnfold
from builders import GraphBuilder, count_ops, feeds, fold_and_compare, ops, run


def with_shapes(model: onnx.ModelProto, shapes: dict[str, list]) -> onnx.ModelProto:
    """``model`` with exactly these intermediate shapes declared: a file with value_info
    is analysed with its own shapes only (no inference), so every other value is unknown."""
    del model.graph.value_info[:]
    for name, shape in shapes.items():
        model.graph.value_info.append(oh.make_tensor_value_info(name, onnx.TensorProto.FLOAT, shape))
    return model


def status_of(result, node: str):
    (entry,) = [e for e in result.ledger if e.node == node]
    return entry.status, (entry.pattern if entry.folded else entry.reason)


# --- BN -> Reshape(N, -1) -> Gemm / MatMul: dynamo's x.view(x.size(0), -1) --------------------


@pytest.mark.parametrize("reader", ["Gemm", "MatMul"])
def test_a_reshape_that_flattens_from_axis_1_folds_like_a_flatten(tmp_path, reader):
    """A Reshape to ``[N, C*H*W]`` proven by the shapes is a Flatten(axis=1): each of the
    C channels covers H*W consecutive features of the matrix op, which takes the whole
    map (batch 2 differs from C = 3, so the batch and channel dims cannot be confused)."""
    b = GraphBuilder(seed=60)
    y = b.bn(b.node("Relu", [b.input([2, 3, 2, 2])]), 3, name="the_bn")
    y = b.node("Reshape", [y, b.const(np.array([2, -1], np.int64))])
    if reader == "Gemm":
        b.output(b.node("Gemm", [y, b.random([12, 5]), b.random([5])]))
    else:
        b.output(b.node("Add", [b.node("MatMul", [y, b.random([12, 5])]), b.random([5])]))
    result, folded = fold_and_compare(b.model(), feeds(b, (2, 3, 2, 2)), tmp_path)
    assert status_of(result, "the_bn") == ("folded", f"bn-reshape-{reader.lower()}")
    assert count_ops(folded, "BatchNormalization") == 0 and count_ops(folded, "Add") == (reader == "MatMul")


def _reshape_model(b: GraphBuilder, target, width: int, reader: str = "Gemm"):
    y = b.bn(b.node("Relu", [b.input([2, 3, 2, 2])]), 3, name="the_bn")
    y = b.node("Reshape", [y, b.const(np.array(target, np.int64))])
    if reader == "Gemm":
        out = b.node("Gemm", [y, b.random([width, 5])])
    else:
        out = b.node("MatMul", [y, b.random([width, 5])])
    b.output(out)
    return y, out


def _shapes_declared(case: str):
    """Models whose Reshape the shapes do not prove to flatten from axis 1."""
    b = GraphBuilder(seed=61)
    if case == "result-of-rank-3":
        # [2, 3, 2, 2] -> [2, 12, 1]: batch kept and 12 features, but a third axis.
        _reshape_model(b, [2, 12, 1], 1, reader="MatMul")
        return b, b.model()
    reshaped, _ = _reshape_model(b, [2, -1], 12)
    model = b.model()
    relu, bn = model.graph.node[0].output[0], model.graph.node[1].output[0]
    shapes = {
        "input-shape-unknown": {relu: [2, 3, 2, 2], reshaped: [2, 12]},
        "output-shape-unknown": {relu: [2, 3, 2, 2], bn: [2, 3, 2, 2]},
        # Spatial dims only named: C*h*w cannot be computed, so nothing proves the 12.
        "symbolic-spatial-dims": {relu: ["N", 3, "h", "w"], bn: ["N", 3, "h", "w"], reshaped: ["N", "f"]},
    }[case]
    return b, with_shapes(model, shapes)


@pytest.mark.parametrize("case", ["result-of-rank-3", "input-shape-unknown", "output-shape-unknown",
                                  "symbolic-spatial-dims"])
def test_a_reshape_not_proven_to_flatten_from_axis_1_stays(tmp_path, case):
    """The Reshape must be proven to produce ``[N, C*H*W]`` from ``[N, C, H, W]``: two axes,
    the batch kept, the rest one row of known size. Without that proof the BN stays,
    unproven-layout, and the model is unchanged."""
    b, model = _shapes_declared(case)
    result, folded = fold_and_compare(model, feeds(b, (2, 3, 2, 2)), tmp_path)
    assert status_of(result, "the_bn") == ("kept", "unproven-layout")
    assert count_ops(folded, "BatchNormalization") == 1


# --- the map's channels must be the axis the MatMul reads as features ---------------------------


@pytest.mark.parametrize("rank_known", [True, False])
def test_a_bn_before_a_matmul_reading_another_axis_stays(tmp_path, rank_known):
    """A BN normalises axis 1; a MatMul reads the last axis. On a rank-3 tensor they differ
    (channel-axis-mismatch); where the rank cannot be proven the fold cannot know
    (unknown-rank). Either way the BN stays."""
    b = GraphBuilder(seed=62)
    x = b.input([2, 4, 4] if rank_known else None)
    b.output(b.node("MatMul", [b.bn(b.node("Relu", [x]), 4, name="the_bn"), b.random([4, 5])]),
             shape=[2, 4, 5] if rank_known else None)
    if rank_known:
        result, folded = fold_and_compare(b.model(), feeds(b, (2, 4, 4)), tmp_path)
        assert count_ops(folded, "BatchNormalization") == 1
    else:  # values without any shape: onnx's full check would refuse the model, the fold does not
        onnx.save(with_shapes(b.model(), {}), tmp_path / "m.onnx")
        result = bnfold.fold(tmp_path / "m.onnx")
    assert status_of(result, "the_bn") == ("kept", "channel-axis-mismatch" if rank_known else "unknown-rank")


# --- Conv, Gemm, MatMul as the reader ----------------------------------------------------------


def test_a_bn_before_an_auto_pad_valid_conv_folds_its_shift_too(tmp_path):
    """auto_pad=VALID pads nothing: every output sees ``s*x + t`` in full, so the shift
    folds into the bias like on an unpadded conv and no Add stays behind."""
    b = GraphBuilder(seed=64)
    y = b.bn(b.node("Relu", [b.input([2, 3, 6, 6])]), 3, name="the_bn")
    b.output(b.node("Conv", [y, b.random([4, 3, 3, 3])], auto_pad="VALID"))
    result, folded = fold_and_compare(b.model(), feeds(b, (2, 3, 6, 6)), tmp_path)
    assert status_of(result, "the_bn") == ("folded", "bn-conv")
    assert ops(folded) == ["Relu", "Conv"]


@pytest.mark.parametrize("bias_first", [False, True])
@pytest.mark.parametrize("bias_shape", [[5], [1, 5], [1]])
def test_the_add_after_a_matmul_holds_its_bias_on_either_side(tmp_path, bias_first, bias_shape):
    """BN -> MatMul -> Add(b): W*t goes into b whichever input of the Add holds it, and a
    one-value bias ([1]) is a bias too (the Add keeps broadcasting it): no Add is added."""
    b = GraphBuilder(seed=65)
    y = b.node("MatMul", [b.bn(b.node("Relu", [b.input([3, 4])]), 4, name="the_bn"), b.random([4, 5])])
    bias = b.random(bias_shape)
    b.output(b.node("Add", [bias, y] if bias_first else [y, bias]))
    result, folded = fold_and_compare(b.model(), feeds(b, (3, 4)), tmp_path)
    assert status_of(result, "the_bn") == ("folded", "bn-matmul")
    assert ops(folded) == ["Relu", "MatMul", "Add"]


# --- the MatMul forms a map meets after it: W @ x, x @ W, x @ W + b -----------------------------


def test_a_constant_weight_on_the_left_takes_a_bn_on_its_rows(tmp_path):
    """``W @ x`` with a constant 2-D W: the output channels are W's rows, on the second axis
    from the end. On a rank-3 ``[N, M, L]`` output that is axis 1, where a BN normalises,
    so the BN folds into W's rows (and a new bias Add)."""
    b = GraphBuilder(seed=66)
    y = b.node("MatMul", [b.random([5, 4]), b.node("Relu", [b.input([2, 4, 3])])])
    b.output(b.bn(y, 5, name="the_bn"))
    result, folded = fold_and_compare(b.model(), feeds(b, (2, 4, 3)), tmp_path)
    assert status_of(result, "the_bn") == ("folded", "constmatmul-bn")
    assert ops(folded) == ["Relu", "MatMul", "Add"]


def test_a_constant_weight_on_the_left_takes_a_constant_along_its_rows(tmp_path):
    """``(W @ x) * c`` with c of shape [M, 1]: one value per row of the 2-D output, W's rows."""
    b = GraphBuilder(seed=67)
    y = b.node("MatMul", [b.random([5, 4]), b.node("Relu", [b.input([4, 3])])])
    b.output(b.node("Mul", [y, b.const(b.rng.uniform(0.5, 2, (5, 1)).astype(np.float32))], name="scale"))
    result, folded = fold_and_compare(b.model(), feeds(b, (4, 3)), tmp_path)
    assert status_of(result, "scale") == ("folded", "constmatmul-mul")
    assert ops(folded) == ["Relu", "MatMul"]


def test_a_bn_on_the_columns_of_a_2d_constant_weight_product_stays(tmp_path):
    """``W @ x`` of shape [3, 3]: W's rows are axis 0, the BN normalises axis 1 (the columns,
    x's), so nothing in W can take it, even with as many rows as BN channels."""
    b = GraphBuilder(seed=68)
    y = b.node("MatMul", [b.random([3, 4]), b.node("Relu", [b.input([4, 3])])])
    b.output(b.bn(y, 3, name="the_bn"))
    result, folded = fold_and_compare(b.model(), feeds(b, (4, 3)), tmp_path)
    assert status_of(result, "the_bn") == ("kept", "channel-axis-mismatch")
    assert count_ops(folded, "BatchNormalization") == 1


@pytest.mark.parametrize("constant, status", [(np.float32(1.5), ("folded", "constmatmul-mul")),
                                              (np.array([0.5, 2.0], np.float32), ("kept", "non-channel-constant"))])
def test_a_constant_after_a_left_weight_on_data_of_unknown_rank(tmp_path, constant, status):
    """``(W @ x) * c`` where nothing proves x's rank: a scalar folds into W whatever the
    rank; a [2] constant runs along the last axis, not W's rows (the second axis from the
    end), even when W has 2 rows, so it stays."""
    b = GraphBuilder(seed=69)
    y = b.node("MatMul", [b.random([2, 4]), b.node("Relu", [b.input(None)])])
    b.output(b.node("Mul", [y, b.const(constant)], name="the_bn"), shape=None)
    onnx.save(with_shapes(b.model(), {}), tmp_path / "m.onnx")
    result = bnfold.fold(tmp_path / "m.onnx")
    result.save(tmp_path / "out.onnx")
    feed = feeds(b, (4, 2))
    for want, got in zip(run(tmp_path / "m.onnx", feed), run(tmp_path / "out.onnx", feed)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert status_of(result, "the_bn") == status


def test_a_matmul_of_two_computed_tensors_has_no_weight(tmp_path):
    """``x @ y`` with neither constant holds no weight for the BN after it."""
    b = GraphBuilder(seed=70)
    y = b.node("MatMul", [b.node("Relu", [b.input([3, 4])]), b.input([4, 5], name="z")])
    b.output(b.bn(y, 5, name="the_bn"))
    feed = {**feeds(b, (3, 4)), **feeds(b, (4, 5), "z")}
    result, folded = fold_and_compare(b.model(), feed, tmp_path)
    assert status_of(result, "the_bn") == ("kept", "non-constant-weights")


def test_a_bn_on_a_rank_3_matmul_add_normalises_another_axis_and_stays(tmp_path):
    """``[2, 5, 4] @ [4, 5] + b``: the MatMul's channels are the last axis (5), the BN's are
    axis 1 (also 5): same count, other axis, so the BN stays."""
    b = GraphBuilder(seed=71)
    y = b.node("MatMul", [b.node("Relu", [b.input([2, 5, 4])]), b.random([4, 5])])
    b.output(b.bn(b.node("Add", [y, b.random([5])]), 5, name="the_bn"))
    result, folded = fold_and_compare(b.model(), feeds(b, (2, 5, 4)), tmp_path)
    assert status_of(result, "the_bn") == ("kept", "channel-axis-mismatch")


@pytest.mark.parametrize("bias_shape", [[5], [1]])
def test_a_bn_after_a_matmul_add_with_a_one_value_bias_folds(tmp_path, bias_shape):
    """``MatMul -> Add(b) -> BN`` with b of shape [1] (one value for every channel): the
    Add is the MatMul's bias, b becomes ``s * b + t`` per channel."""
    b = GraphBuilder(seed=72)
    y = b.node("MatMul", [b.node("Relu", [b.input([3, 4])]), b.random([4, 5])])
    b.output(b.bn(b.node("Add", [y, b.random(bias_shape)]), 5, name="the_bn"))
    result, folded = fold_and_compare(b.model(), feeds(b, (3, 4)), tmp_path)
    assert status_of(result, "the_bn") == ("folded", "matmul-add-bn")
    assert ops(folded) == ["Relu", "MatMul", "Add"]


def test_a_bn_after_an_add_that_reads_no_matmul_stays(tmp_path):
    """``Relu(x) + c -> BN -> Relu``: an Add with a constant is a MatMul's bias only when it
    reads a MatMul, and a Relu after the BN is no linear op: the BN has nothing to fold
    into (no-linear-producer)."""
    b = GraphBuilder(seed=73)
    y = b.node("Add", [b.node("Relu", [b.input([2, 3, 4, 4])]), b.random([3, 1, 1])])
    b.output(b.node("Relu", [b.bn(y, 3, name="the_bn")]))
    result, folded = fold_and_compare(b.model(), feeds(b, (2, 3, 4, 4)), tmp_path)
    assert status_of(result, "the_bn") == ("kept", "no-linear-producer")


# --- elementwise maps into Conv / ConvTranspose --------------------------------------------------


@pytest.mark.parametrize("divisor, status", [([1.0, 2.0, 1.0, 0.5], ("folded", "conv-div")),
                                             ([2.0, 0.0, 4.0, 0.5], ("kept", "non-finite-params"))])
def test_a_conv_divided_by_a_channel_constant(tmp_path, divisor, status):
    """``Conv / c`` is a scale 1/c (a divisor of 1 is fine); a zero divisor is no scale."""
    b = GraphBuilder(seed=74)
    y = b.node("Conv", [b.input([2, 3, 5, 5]), b.random([4, 3, 3, 3]), b.random([4])])
    b.output(b.node("Div", [y, b.const(np.array(divisor, np.float32).reshape(4, 1, 1))], name="the_bn"))
    result, folded = fold_and_compare(b.model(), feeds(b, (2, 3, 5, 5)), tmp_path)
    assert status_of(result, "the_bn") == status
    assert count_ops(folded, "Div") == (status[0] == "kept")


def test_a_convtranspose_times_a_channel_constant_folds(tmp_path):
    """``ConvTranspose * c + d`` with c, d of shape [C, 1, 1]: the output rank is the
    weight's, so the constants are per channel on axis 1."""
    b = GraphBuilder(seed=75)
    y = b.node("ConvTranspose", [b.input([2, 3, 4, 4]), b.random([3, 2, 3, 3])], group=1)
    y = b.node("Mul", [y, b.const(b.rng.uniform(0.5, 2, (2, 1, 1)).astype(np.float32))], name="scale")
    b.output(b.node("Add", [y, b.random([2, 1, 1])], name="shift"))
    result, folded = fold_and_compare(b.model(), feeds(b, (2, 3, 4, 4)), tmp_path)
    assert status_of(result, "scale") == ("folded", "convtranspose-mul")
    assert status_of(result, "shift") == ("folded", "convtranspose-add")
    assert ops(folded) == ["ConvTranspose"]


def test_a_constant_weight_on_the_right_is_the_weight_even_with_a_constant_on_the_left(tmp_path):
    """``W1 @ W2`` with both constant (a weight computed in the graph): ``x @ W`` comes
    first, so a constant along the last axis folds into W2's columns."""
    b = GraphBuilder(seed=76)
    y = b.node("MatMul", [b.random([3, 4]), b.random([4, 5])])
    b.output(b.node("Mul", [y, b.random([5])], name="the_bn"))
    result, folded = fold_and_compare(b.model(), {}, tmp_path)
    assert status_of(result, "the_bn") == ("folded", "matmul-mul")
    assert ops(folded) == ["MatMul"]
