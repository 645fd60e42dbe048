"""The patterns real exporters emit: affine chains, layout wrappers, BN before a linear op,
constant subgraphs, overridable initializers, standalone and training-mode BNs.

Each is built with onnx.helper as the exporter writes it, folded, and run in onnxruntime
against the original (ORT_DISABLE_ALL on both); each near miss keeps the model unchanged
and names its reason.
"""

import itertools

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as onh
import onnx_ir as ir
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bnfold
from builders import GraphBuilder, count_ops, entries, feeds, fold_and_compare, ops, run

PROPERTY = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
AFFINE_OPS = ("Mul", "Div", "Add", "Sub")


def channel_const(b: GraphBuilder, c: int, shape, positive=False) -> str:
    values = b.rng.uniform(0.5, 2.0, c) if positive else b.rng.standard_normal(c)
    return b.const(values.astype(np.float32).reshape(shape))


# --- 1. affine chains ----------------------------------------------------------------


def test_tf2onnx_dense_bn_chain(tmp_path):
    """MatMul -> Add(bias) -> Mul(scale) -> Add(shift): a Dense+BN from tf2onnx."""
    b = GraphBuilder(seed=1)
    y = b.node("MatMul", [b.input([3, 4]), b.random([4, 5])])
    y = b.node("Add", [y, b.random([5])])
    y = b.node("Mul", [y, channel_const(b, 5, [5])])
    b.output(b.node("Add", [y, channel_const(b, 5, [5])]))
    result, folded = fold_and_compare(b.model(), feeds(b, (3, 4)), tmp_path)
    assert entries(result) == [("Mul", "folded", "matmul-add-mul"), ("Add", "folded", "matmul-add-add")]
    assert ops(folded) == ["MatMul", "Add"]


def test_bias_free_dense_mul_add(tmp_path):
    b = GraphBuilder(seed=2)
    y = b.node("MatMul", [b.input([3, 4]), b.random([4, 5])])
    y = b.node("Mul", [y, channel_const(b, 5, [1, 5])])
    b.output(b.node("Add", [y, channel_const(b, 5, [5])]))
    result, folded = fold_and_compare(b.model(), feeds(b, (3, 4)), tmp_path)
    assert entries(result) == [("Mul", "folded", "matmul-mul")]
    assert ops(folded) == ["MatMul", "Add"]


def test_keras3_conv_mul_add_without_bn_node(tmp_path):
    b = GraphBuilder(seed=3)
    y = b.node("Conv", [b.input([2, 3, 6, 6]), b.random([4, 3, 3, 3]), b.random([4])])
    y = b.node("Mul", [y, channel_const(b, 4, [1, 4, 1, 1])])
    b.output(b.node("Add", [y, channel_const(b, 4, [1, 4, 1, 1])]))
    result, folded = fold_and_compare(b.model(), feeds(b, (2, 3, 6, 6)), tmp_path)
    assert [s for _, s, _ in entries(result)] == ["folded", "folded"]
    assert ops(folded) == ["Conv"]


@pytest.mark.parametrize("constant_first", [False, True])
def test_sub_and_div_chains(tmp_path, constant_first):
    b = GraphBuilder(seed=4)
    y = b.node("Conv", [b.input([2, 3, 6, 6]), b.random([4, 3, 3, 3])])
    c = channel_const(b, 4, [4, 1, 1])
    y = b.node("Sub", [c, y] if constant_first else [y, c])
    b.output(b.node("Div", [y, channel_const(b, 4, [4, 1, 1], positive=True)]))
    result, folded = fold_and_compare(b.model(), feeds(b, (2, 3, 6, 6)), tmp_path)
    assert [s for _, s, _ in entries(result)] == ["folded", "folded"]
    assert ops(folded) == ["Conv"]


def test_bn_then_mul_add_chain(tmp_path):
    b = GraphBuilder(seed=5)
    y = b.node("Conv", [b.input([2, 3, 6, 6]), b.random([4, 3, 3, 3])])
    y = b.node("Mul", [b.bn(y, 4), channel_const(b, 4, [1, 4, 1, 1])])
    b.output(b.node("Add", [y, channel_const(b, 4, [4, 1, 1])]))
    result, folded = fold_and_compare(b.model(), feeds(b, (2, 3, 6, 6)), tmp_path)
    assert [op for op, s, _ in entries(result, "folded")] == ["BatchNormalization", "Mul", "Add"]
    assert ops(folded) == ["Conv"]


def test_spatially_varying_constant_is_left(tmp_path):
    b = GraphBuilder(seed=6)
    y = b.node("Conv", [b.input([2, 3, 6, 6]), b.random([4, 3, 3, 3])])
    b.output(b.node("Mul", [y, b.random([1, 4, 4, 4])]))
    model = b.model()
    result, folded = fold_and_compare(model, feeds(b, (2, 3, 6, 6)), tmp_path)
    assert entries(result) == [("Mul", "kept", "non-channel-constant")]
    assert ops(folded) == ops(model)


def test_mul_unrelated_to_a_linear_op_is_not_a_site(tmp_path):
    b = GraphBuilder(seed=7)
    y = b.node("Relu", [b.node("Conv", [b.input([2, 3, 6, 6]), b.random([4, 3, 3, 3])])])
    b.output(b.node("Mul", [y, channel_const(b, 4, [4, 1, 1])]))
    result, folded = fold_and_compare(b.model(), feeds(b, (2, 3, 6, 6)), tmp_path)
    assert entries(result) == []
    assert ops(folded) == ["Conv", "Relu", "Mul"]


@st.composite
def affine_chains(draw):
    chain = draw(st.lists(st.tuples(st.sampled_from(AFFINE_OPS), st.sampled_from(["C", "C11", "1C11", "scalar"]),
                                    st.booleans()), min_size=1, max_size=4))
    return chain, draw(st.integers(0, 2**16))


@PROPERTY
@given(affine_chains())
def test_random_affine_chains_fold_completely(tmp_path_factory, drawn):
    chain, seed = drawn
    b = GraphBuilder(seed=seed)
    y = b.node("Conv", [b.input([2, 3, 5, 5]), b.random([4, 3, 3, 3]), b.random([4])], pads=[1, 1, 1, 1])
    for op, shape_kind, constant_first in chain:
        shape = {"C": [4, 1, 1], "C11": [4, 1, 1], "1C11": [1, 4, 1, 1], "scalar": []}[shape_kind]
        c = channel_const(b, 4 if shape else 1, shape or [], positive=True)
        operands = [c, y] if constant_first and op != "Div" else [y, c]
        y = b.node(op, operands)
    b.output(y)
    result, folded = fold_and_compare(b.model(), feeds(b, (2, 3, 5, 5)), tmp_path_factory.mktemp("chain"),
                                      rtol=1e-4, atol=1e-4)
    assert len(result.ledger.folded) == len(chain)
    assert ops(folded) == ["Conv"]


# --- 2. layout wrappers --------------------------------------------------------------


def test_cancelling_transposes_between_conv_and_bn(tmp_path):
    b = GraphBuilder(seed=10)
    y = b.node("Conv", [b.input([2, 3, 6, 6]), b.random([4, 3, 3, 3])])
    y = b.node("Transpose", [b.node("Transpose", [y], perm=[0, 2, 3, 1])], perm=[0, 3, 1, 2])
    b.output(b.bn(y, 4))
    result, _ = fold_and_compare(b.model(), feeds(b, (2, 3, 6, 6)), tmp_path)
    assert entries(result) == [("BatchNormalization", "folded", "conv-transpose-transpose-bn")]


@PROPERTY
@given(perm=st.permutations([0, 1, 2, 3]), seed=st.integers(0, 2**16))
def test_transpose_folds_only_when_channel_lands_on_axis_1(tmp_path_factory, perm, seed):
    b = GraphBuilder(seed=seed)
    y = b.node("Conv", [b.input([2, 3, 6, 6]), b.random([4, 3, 3, 3])], pads=[1, 1, 1, 1])
    y = b.node("Transpose", [y], perm=list(perm))
    conv_out_shape = [2, 4, 6, 6]
    bn_channels = conv_out_shape[perm[1]]
    b.output(b.bn(y, bn_channels, name="the_bn"))
    result, folded = fold_and_compare(b.model(), feeds(b, (2, 3, 6, 6)), tmp_path_factory.mktemp("perm"))
    (entry,) = result.ledger
    if perm[1] == 1:
        assert entry.folded
    else:
        assert entry.reason == "channel-axis-mismatch"
        assert count_ops(folded, "BatchNormalization") == 1


def test_single_channel_convtranspose_reshape_bn_sigmoid_reshape(tmp_path):
    b = GraphBuilder(seed=11)
    y = b.node("ConvTranspose", [b.input([2, 3, 4, 4]), b.random([3, 1, 2, 2])], strides=[2, 2])
    y = b.node("Reshape", [y, b.const(np.array([2, 1, 64], np.int64))])
    y = b.node("Sigmoid", [b.bn(y, 1)])
    b.output(b.node("Reshape", [y, b.const(np.array([2, 1, 8, 8], np.int64))]))
    result, _ = fold_and_compare(b.model(), feeds(b, (2, 3, 4, 4)), tmp_path)
    assert entries(result) == [("BatchNormalization", "folded", "convtranspose-reshape-bn")]


def test_tf2onnx_conv1d_unsqueeze_conv_squeeze_affine(tmp_path):
    b = GraphBuilder(seed=12)
    y = b.node("Unsqueeze", [b.input([2, 3, 9]), b.const(np.array([2], np.int64))])
    y = b.node("Conv", [y, b.random([5, 3, 1, 3])])
    y = b.node("Squeeze", [y, b.const(np.array([2], np.int64))])
    y = b.node("Add", [y, channel_const(b, 5, [1, 5, 1])])
    y = b.node("Mul", [y, channel_const(b, 5, [1, 5, 1])])
    b.output(b.node("Add", [y, channel_const(b, 5, [1, 5, 1])]))
    result, folded = fold_and_compare(b.model(), feeds(b, (2, 3, 9)), tmp_path)
    assert [s for _, s, _ in entries(result)] == ["folded"] * 3
    assert ops(folded) == ["Unsqueeze", "Conv", "Squeeze"]


def test_3d_matmul_transpose_bn(tmp_path):
    b = GraphBuilder(seed=13)
    y = b.node("MatMul", [b.input([2, 7, 4]), b.random([4, 5])])
    y = b.node("Transpose", [y], perm=[0, 2, 1])
    b.output(b.bn(y, 5))
    result, _ = fold_and_compare(b.model(), feeds(b, (2, 7, 4)), tmp_path)
    assert entries(result) == [("BatchNormalization", "folded", "matmul-transpose-bn")]


def test_reshape_keeping_the_channel_axis(tmp_path):
    b = GraphBuilder(seed=14)
    x = b.input([2, 3, 6, 6])
    conv = b.node("Conv", [x, b.random([4, 3, 3, 3])], pads=[1, 1, 1, 1])
    y = b.node("Reshape", [conv, b.const(np.array([0, 4, -1], np.int64))])
    b.output(b.bn(y, 4))
    model = b.model()
    model.graph.value_info.append(oh.make_tensor_value_info(conv, onnx.TensorProto.FLOAT, [2, 4, 6, 6]))
    result, _ = fold_and_compare(model, feeds(b, (2, 3, 6, 6)), tmp_path)
    assert entries(result) == [("BatchNormalization", "folded", "conv-reshape-bn")]


def test_flatten_merging_the_channel_is_not_proven(tmp_path):
    b = GraphBuilder(seed=15)
    x = b.input([2, 3, 4, 4])
    conv = b.node("Conv", [x, b.random([4, 3, 3, 3])], pads=[1, 1, 1, 1])
    y = b.node("Flatten", [conv], axis=2)
    b.output(b.bn(y, 16, name="the_bn"))
    model = b.model()
    model.graph.value_info.append(oh.make_tensor_value_info(conv, onnx.TensorProto.FLOAT, [2, 4, 4, 4]))
    result, folded = fold_and_compare(model, feeds(b, (2, 3, 4, 4)), tmp_path)
    assert entries(result) == [("BatchNormalization", "kept", "unproven-layout")]
    assert count_ops(folded, "BatchNormalization") == 1


@pytest.mark.parametrize("batch", ["N", "?"])
@pytest.mark.parametrize("regroup", ["reshape", "flatten"])
def test_a_symbolic_batch_is_no_proof_of_an_unknown_extent(tmp_path, batch, regroup):
    """A dynamic batch (named ``N``, or ``?`` as some exporters write it) folded into the
    leading dim (Reshape to (-1, C, 5), Flatten(axis=2)) regroups the elements: the channel
    axis of the result is not the Conv's, so the BN stays, whatever the batch is named."""
    b = GraphBuilder(seed=17)
    channels, shape = (8, [batch, 3, 3, 5]) if regroup == "reshape" else (64, [batch, 3, 8, 8])
    conv = b.node("Conv", [b.input(shape), b.random([channels, 3, 1, 1])])
    y = (b.node("Reshape", [conv, b.const(np.array([-1, 8, 5], np.int64))]) if regroup == "reshape"
         else b.node("Flatten", [conv], axis=2))
    b.output(b.bn(y, channels))
    model = b.model()
    conv_shape = [batch, channels, *shape[2:]]
    model.graph.value_info.append(oh.make_tensor_value_info(conv, onnx.TensorProto.FLOAT, conv_shape))
    result, folded = fold_and_compare(model, feeds(b, [2, *shape[1:]]), tmp_path)
    assert entries(result) == [("BatchNormalization", "kept", "unproven-layout")]
    assert count_ops(folded, "BatchNormalization") == 1


def test_layout_intermediate_with_fan_out(tmp_path):
    b = GraphBuilder(seed=16)
    y = b.node("Conv", [b.input([2, 3, 6, 6]), b.random([4, 3, 3, 3])])
    t = b.node("Transpose", [y], perm=[0, 2, 3, 1])
    b.output(b.bn(b.node("Transpose", [t], perm=[0, 3, 1, 2]), 4))
    b.output(b.node("Relu", [t]))
    result, _ = fold_and_compare(b.model(), feeds(b, (2, 3, 6, 6)), tmp_path)
    assert entries(result) == [("BatchNormalization", "kept", "fan-out")]


# --- 3. BN before a linear op --------------------------------------------------------


def test_input_normalisation_bn_before_gemm(tmp_path):
    b = GraphBuilder(seed=20)
    y = b.bn(b.input([3, 6]), 6)
    b.output(b.node("Gemm", [y, b.random([5, 6]), b.random([5])], transB=1, alpha=0.7, beta=1.5))
    result, folded = fold_and_compare(b.model(), feeds(b, (3, 6)), tmp_path)
    assert entries(result) == [("BatchNormalization", "folded", "bn-gemm")]
    assert ops(folded) == ["Gemm"]


def test_bn_flatten_gemm(tmp_path):
    b = GraphBuilder(seed=21)
    y = b.node("Relu", [b.input([2, 3, 2, 2])])
    y = b.node("Flatten", [b.bn(y, 3)], axis=1)
    b.output(b.node("Gemm", [y, b.random([12, 5])]))
    result, folded = fold_and_compare(b.model(), feeds(b, (2, 3, 2, 2)), tmp_path)
    assert entries(result) == [("BatchNormalization", "folded", "bn-flatten-gemm")]
    assert ops(folded) == ["Relu", "Flatten", "Gemm"]


@pytest.mark.parametrize("groups,pads", [(1, [0, 0]), (3, [0, 0]), (1, [1, 1]), (3, [2, 1])])
def test_bn_on_graph_input_before_conv1d(tmp_path, groups, pads):
    b = GraphBuilder(seed=22)
    y = b.bn(b.input([2, 6, 9]), 6)
    b.output(b.node("Conv", [y, b.random([6, 6 // groups, 3]), b.random([6])], group=groups, pads=pads))
    result, folded = fold_and_compare(b.model(), feeds(b, (2, 6, 9)), tmp_path)
    padded = any(pads)
    assert entries(result) == [("BatchNormalization", "folded", "bn-conv-scale" if padded else "bn-conv")]
    assert ops(folded) == (["Add", "Conv"] if padded else ["Conv"])


def test_bn_before_matmul_uses_the_following_bias(tmp_path):
    b = GraphBuilder(seed=23)
    y = b.node("MatMul", [b.bn(b.input([3, 4]), 4), b.random([4, 5])])
    b.output(b.node("Add", [y, b.random([5])]))
    result, folded = fold_and_compare(b.model(), feeds(b, (3, 4)), tmp_path)
    assert entries(result) == [("BatchNormalization", "folded", "bn-matmul")]
    assert ops(folded) == ["MatMul", "Add"]


def test_never_folds_across_a_nonlinearity(tmp_path):
    b = GraphBuilder(seed=24)
    y = b.node("Relu", [b.bn(b.input([2, 3, 6, 6]), 3, name="the_bn")])
    b.output(b.node("Conv", [y, b.random([4, 3, 3, 3])]))
    model = b.model()
    result, folded = fold_and_compare(model, feeds(b, (2, 3, 6, 6)), tmp_path)
    assert entries(result) == [("BatchNormalization", "kept", "no-linear-producer")]
    assert ops(folded) == ops(model)


def test_zero_scale_before_padded_conv_is_kept(tmp_path):
    b = GraphBuilder(seed=25)
    gamma, beta, mean, var = b.bn_params(3)
    b.initializers = [i if i.name != gamma else onnx.numpy_helper.from_array(np.array([1, 0, 1], np.float32), gamma)
                      for i in b.initializers]
    y = b.node("BatchNormalization", [b.input([2, 3, 6, 6]), gamma, beta, mean, var], name="the_bn")
    b.output(b.node("Conv", [y, b.random([4, 3, 3, 3])], pads=[1, 1, 1, 1]))
    result, _ = fold_and_compare(b.model(), feeds(b, (2, 3, 6, 6)), tmp_path)
    assert entries(result) == [("BatchNormalization", "kept", "zero-scale")]


# --- 4. constant subgraphs -----------------------------------------------------------


def test_parameters_behind_constant_subgraphs(tmp_path):
    """Transposed Gemm weight, dynamo's Expand zero bias, BN params through Reshape/Cast."""
    b = GraphBuilder(seed=30)
    weight = b.node("Transpose", [b.random([5, 4])], perm=[1, 0])
    zero_bias = b.node("Expand", [b.node("ConstantOfShape", [b.const(np.array([1], np.int64))],
                                         value=onnx.numpy_helper.from_array(np.zeros(1, np.float32))),
                                  b.const(np.array([5], np.int64))])
    y = b.node("Gemm", [b.input([3, 4]), weight, zero_bias])
    gamma, beta, mean, var = b.bn_params(5)
    gamma = b.node("Reshape", [b.node("Unsqueeze", [gamma, b.const(np.array([0], np.int64))]),
                               b.const(np.array([5], np.int64))])
    var = b.node("Cast", [b.node("Identity", [var])], to=onnx.TensorProto.FLOAT)
    b.output(b.node("BatchNormalization", [y, gamma, beta, mean, var]))
    result, folded = fold_and_compare(b.model(), feeds(b, (3, 4)), tmp_path)
    assert entries(result) == [("BatchNormalization", "folded", "gemm-bn")]
    assert ops(folded) == ["Gemm"], "the constant subgraphs must be pruned once folded"


# --- 5. overridable initializers -----------------------------------------------------


def overridable_model():
    b = GraphBuilder(seed=40)
    y = b.node("Conv", [b.input([2, 3, 6, 6]), b.random([4, 3, 3, 3])])
    b.output(b.bn(y, 4, name="the_bn"))
    model = b.model()
    for init in model.graph.initializer:
        model.graph.input.append(oh.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    return b, model


def test_overridable_initializers_fold_only_when_asked(tmp_path):
    b, model = overridable_model()
    x = feeds(b, (2, 3, 6, 6))
    result = bnfold.fold(ir.serde.deserialize_model(model))
    assert entries(result) == [("BatchNormalization", "kept", "overridable-params")]
    result = bnfold.fold(ir.serde.deserialize_model(model), fold_overridable=True)
    assert entries(result) == [("BatchNormalization", "folded", "conv-bn")]
    out = tmp_path / "f.onnx"
    result.save(out)
    folded = onnx.load(out)
    assert [i.name for i in folded.graph.input] == ["x"], "folded overridable inputs are dropped"
    np.testing.assert_allclose(run(out, x)[0], run(model, x)[0], rtol=1e-4, atol=1e-5)


# --- 6. standalone BN ----------------------------------------------------------------


def test_standalone_bn_kept_by_default_and_decomposed_on_request(tmp_path):
    b = GraphBuilder(seed=50)
    x = b.input([2, 3, 4, 4])
    y = b.node("Concat", [x, b.node("Relu", [x])], axis=1)
    b.output(b.bn(y, 6, name="the_bn"))
    model = b.model()
    x_feed = feeds(b, (2, 3, 4, 4))
    result, _ = fold_and_compare(model, x_feed, tmp_path)
    assert entries(result) == [("BatchNormalization", "kept", "no-linear-producer")]
    src = tmp_path / "in.onnx"
    result = bnfold.fold(src, decompose_standalone=True)
    (entry,) = result.ledger
    assert entry.status == "decomposed" and entry.reason == "no-linear-producer"
    assert result.ledger.summary()["decomposed"] == 1
    out = tmp_path / "d.onnx"
    result.save(out)
    decomposed = onnx.load(out)
    onnx.checker.check_model(decomposed, full_check=True)
    assert ops(decomposed) == ["Relu", "Concat", "Mul", "Add"]
    np.testing.assert_allclose(run(out, x_feed)[0], run(model, x_feed)[0], rtol=1e-5, atol=1e-5)


# --- 7. training-mode BN -------------------------------------------------------------


def training_pair(used_stats: bool):
    """A training-mode BN and the same BN in inference form, sharing their parameters."""
    b = GraphBuilder(seed=60)
    y = b.node("Conv", [b.input([2, 3, 6, 6]), b.random([4, 3, 3, 3])])
    params = b.bn_params(4)
    inference = b.model(opset=15)
    inference.graph.node.append(oh.make_node("BatchNormalization", [y, *params], ["out"], name="the_bn"))
    inference.graph.output.append(oh.make_tensor_value_info("out", onnx.TensorProto.FLOAT, [2, 4, 4, 4]))
    training = onnx.ModelProto()
    training.CopyFrom(inference)
    del training.graph.node[-1]
    training.graph.node.append(oh.make_node("BatchNormalization", [y, *params], ["out", "rm", "rv"],
                                            name="the_bn", training_mode=1))
    if used_stats:
        training.graph.output.append(oh.make_tensor_value_info("rm", onnx.TensorProto.FLOAT, [4]))
    return b, training, inference


def test_training_mode_converted_with_to_inference(tmp_path):
    b, training, inference = training_pair(used_stats=False)
    assert entries(bnfold.fold(ir.serde.deserialize_model(training))) == [
        ("BatchNormalization", "kept", "training-mode")]
    result = bnfold.fold(ir.serde.deserialize_model(training), to_inference=True)
    (entry,) = result.ledger
    assert entry.folded and entry.converted_from_training
    out = tmp_path / "f.onnx"
    result.save(out)
    x = feeds(b, (2, 3, 6, 6))
    np.testing.assert_allclose(run(out, x)[0], run(inference, x)[0], rtol=1e-4, atol=1e-5)


def test_a_training_bn_converted_in_one_pass_and_folded_in_the_next_says_so(tmp_path):
    """``x -> BN(training) -> BN -> Conv``: the first pass converts the training BN and
    keeps it (a BN is not linear), folds the second; the next pass folds the converted
    one. Its entry must still say it was converted, or --strict reports it training-mode."""
    b = GraphBuilder(seed=61)
    x = b.input([2, 3, 5, 5])
    b.nodes.append(oh.make_node("BatchNormalization", [x, *b.bn_params(3)], ["t", "rm", "rv"], name="the_bn",
                                training_mode=1))
    y = b.bn("t", 3, name="second_bn")
    b.output(b.node("Conv", [y, b.random([4, 3, 3, 3])]))
    training = b.model(opset=15)
    inference = onnx.ModelProto()
    inference.CopyFrom(training)
    inference.graph.node[0].ClearField("attribute")
    inference.graph.node[0].output[1:] = []
    from bnfold.verdict import outstanding_problems

    result = bnfold.fold(ir.serde.deserialize_model(training), to_inference=True)
    found = {e.node: e for e in result.ledger}
    assert (found["the_bn"].status, found["the_bn"].converted_from_training) == ("folded", True)
    assert "converted from training mode" in found["the_bn"].detail
    assert result.ledger.summary()["folded"] == 2
    assert outstanding_problems(found["the_bn"]) == []
    out = tmp_path / "f.onnx"
    result.save(out)
    x_feed = feeds(b, (2, 3, 5, 5))
    np.testing.assert_allclose(run(out, x_feed)[0], run(inference, x_feed)[0], rtol=1e-4, atol=1e-5)


def test_training_mode_with_used_running_stats_is_not_converted():
    _, training, _ = training_pair(used_stats=True)
    (entry,) = bnfold.fold(ir.serde.deserialize_model(training), to_inference=True).ledger
    assert entry.status == "kept" and entry.reason == "training-mode" and "used" in entry.detail


def test_all_transposes_of_rank_3_through_pairs():
    """Every pair perm, inverse(perm) cancels, so the BN folds whatever perm is."""
    for perm in itertools.permutations([0, 1, 2]):
        inverse = list(np.argsort(perm))
        b = GraphBuilder(seed=70)
        y = b.node("Conv", [b.input([2, 3, 7]), b.random([4, 3, 3])])
        y = b.node("Transpose", [b.node("Transpose", [y], perm=list(perm))], perm=inverse)
        b.output(b.bn(y, 4))
        (entry,) = bnfold.fold(ir.serde.deserialize_model(b.model())).ledger
        assert entry.folded, (perm, entry)



# --- 7. the layout proofs, one op at a time ----------------------------------------------
# ``layout.through``: where a tensor's channel axis lies after a layout op, or why that
# cannot be proven (the fold then keeps the BN: a wrong axis would scale the wrong elements).

from bnfold.constant_eval import Constants  # noqa: E402
from bnfold.ledger import NoMatch  # noqa: E402
from bnfold.patterns import elementwise, layout  # noqa: E402
from bnfold.patterns.layout import Channel  # noqa: E402


def one_op(op: str, shape, inputs=(), opset: int = 18, **attrs):
    """The node of a one-op graph (``x`` of ``shape``, constant ``inputs``; "p": an int64
    graph input), analysed as fold analyses it, with its Constants."""
    b = GraphBuilder(seed=0)
    x = b.input(shape)
    operands = [x] + ["" if v is None else (v if isinstance(v, str) else b.const(np.asarray(v))) for v in inputs]
    if "p" in inputs:
        b.inputs.append(oh.make_tensor_value_info("p", onnx.TensorProto.INT64, [None]))
    b.output(b.node(op, operands, **attrs), shape=None)
    model = ir.serde.deserialize_model(onnx.shape_inference.infer_shapes(b.model(opset)))
    node = next(n for n in model.graph if n.op_type == op)
    return node, Constants(model.ir_version, graphs=[model.graph])


LAYOUT_CASES = {
    # name: (op, input shape, constant inputs, attributes, channel in, channel out; None: unproven)
    "identity": ("Identity", [2, 8, 3], (), {}, Channel(3, 1, 8), Channel(3, 1, 8)),
    "transpose-no-perm": ("Transpose", [2, 8, 3, 5], (), {}, Channel(4, 1, 8), Channel(4, 2, 8)),
    "transpose-no-perm-rank-unknown": ("Transpose", [2, 8, 3, 5], (), {}, Channel(None, -3, 8), None),
    "transpose-perm-of-another-rank": ("Transpose", [2, 8, 3, 5], (), {"perm": [0, 2, 1]}, Channel(4, 1, 8), None),
    "transpose-one-channel": ("Transpose", [2, 1, 3, 5], (), {"perm": [0, 2, 3, 1]}, Channel(4, None, 1),
                              Channel(4, None, 1)),
    "transpose-cycle": ("Transpose", [2, 8, 3, 5], (), {"perm": [2, 0, 3, 1]}, Channel(4, 1, 8), Channel(4, 3, 8)),
    "unsqueeze-front": ("Unsqueeze", [2, 8, 3], ([0],), {}, Channel(3, 1, 8), Channel(4, 2, 8)),
    "unsqueeze-negative": ("Unsqueeze", [2, 8, 3], ([-1, 1],), {}, Channel(3, 1, 8), Channel(5, 2, 8)),
    "unsqueeze-outside": ("Unsqueeze", [2, 8, 3], ([5],), {}, Channel(3, 1, 8), None),
    "unsqueeze-axes-fed": ("Unsqueeze", [2, 8, 3], ("p",), {}, Channel(3, 1, 8), None),
    "unsqueeze-rank-unknown": ("Unsqueeze", [2, 8, 3], ([0],), {}, Channel(None, -2, 8), None),
    "unsqueeze-one-channel": ("Unsqueeze", [2, 1, 3], ([0],), {}, Channel(3, None, 1), Channel(4, None, 1)),
    "unsqueeze-11-attribute": ("Unsqueeze", [2, 8, 3], (), {"axes": [3], "opset": 11}, Channel(3, 1, 8),
                               Channel(4, 1, 8)),
    "squeeze": ("Squeeze", [2, 8, 1, 3], ([2],), {}, Channel(4, 1, 8), Channel(3, 1, 8)),
    "squeeze-before-the-channels": ("Squeeze", [1, 8, 1, 3], ([0, -2],), {}, Channel(4, 1, 8), Channel(2, 0, 8)),
    "squeeze-static-ones": ("Squeeze", [1, 8, 1, 3], (), {}, Channel(4, 1, 8), Channel(2, 0, 8)),
    "squeeze-symbolic-dim": ("Squeeze", ["N", 8, 1, 3], (), {}, Channel(4, 1, 8), None),  # N may be 1
    "squeeze-outside": ("Squeeze", [2, 8, 1, 3], ([4],), {}, Channel(4, 1, 8), None),
    "squeeze-rank-unknown": ("Squeeze", [2, 8, 1, 3], ([2],), {}, Channel(None, -3, 8), None),
    "squeeze-one-channel": ("Squeeze", [2, 1, 1, 3], ([1],), {}, Channel(4, 1, 1), Channel(3, None, 1)),
    "squeeze-the-channels": ("Squeeze", [2, 1, 1, 3], ([1],), {}, Channel(4, 1, 4), None),
    "reshape-trailing": ("Reshape", [2, 8, 3, 5], ([2, 8, 15],), {}, Channel(4, 1, 8), Channel(3, 1, 8)),
    "reshape-symbolic-batch": ("Reshape", ["N", 8, 3, 5], ([-1, 8, 15],), {}, Channel(4, 1, 8), Channel(3, 1, 8)),
    "reshape-zero-copies": ("Reshape", [2, 8, 3, 5], ([0, 0, -1],), {}, Channel(4, 1, 8), Channel(3, 1, 8)),
    "reshape-allowzero": ("Reshape", [2, 8, 3, 5], ([2, 0, 8, 15],), {"allowzero": 1}, Channel(4, 1, 8), None),
    "reshape-merging": ("Reshape", [2, 8, 3, 5], ([16, 15],), {}, Channel(4, 1, 8), None),
    "reshape-inserting": ("Reshape", [2, 8, 3, 5], ([2, 1, 8, 15],), {}, Channel(4, 1, 8), Channel(4, 2, 8)),
    "reshape-target-fed": ("Reshape", [2, 8, 3, 5], ("p",), {}, Channel(4, 1, 8), None),
    "reshape-one-channel": ("Reshape", [2, 1, 3, 5], ([2, 3, 5],), {}, Channel(4, None, 1), Channel(3, None, 1)),
    "flatten-head": ("Flatten", [2, 8, 1, 1], (), {"axis": 1}, Channel(4, 1, 8), Channel(2, 1, 8)),
    "flatten-merging": ("Flatten", [2, 8, 3, 5], (), {"axis": 2}, Channel(4, 1, 8), None),
    "flatten-negative-axis": ("Flatten", [8, 3, 5], (), {"axis": -2}, Channel(3, 0, 8), Channel(2, 0, 8)),
    "flatten-axis-past-the-rank": ("Flatten", [2, 8, 3, 5], (), {"axis": 5}, Channel(4, 1, 8), None),
    "flatten-symbolic": ("Flatten", ["N", 8, 3, 5], (), {"axis": 1}, Channel(4, 1, 8), None),
    "flatten-one-channel": ("Flatten", [2, 1, 3, 5], (), {"axis": 1}, Channel(4, 1, 1), Channel(2, None, 1)),
    # the edges of each op's axis range, its defaults, and dims that are unknown, symbolic or 0
    "unsqueeze-most-negative-axis": ("Unsqueeze", [2, 8, 3], ([-4],), {}, Channel(3, 1, 8), Channel(4, 2, 8)),
    "unsqueeze-axis-equal-to-output-rank": ("Unsqueeze", [2, 8, 3], ([4],), {}, Channel(3, 1, 8), None),
    "squeeze-most-negative-axis": ("Squeeze", [1, 8, 1, 3], ([-4],), {}, Channel(4, 1, 8), Channel(3, 0, 8)),
    "reshape-symbolic-batch-regrouped": ("Reshape", ["N", 8, 3, 5], ([-1, 8, 5],), {}, Channel(4, 1, 8), None),
    "reshape-symbolic-batch-and-spatial": ("Reshape", ["N", 8, "H", 5], ([-1, 8, 5],), {}, Channel(4, 1, 8), None),
    "reshape-unknown-dim-written-as-minus-1": ("Reshape", [-1, 8, 3, 5], ([-1, 8, 5],), {}, Channel(4, 1, 8), None),
    "reshape-input-shape-unknown": ("Reshape", None, ([2, 8, 15],), {}, Channel(4, 1, 8), None),
    "reshape-channel-rank-unknown": ("Reshape", [2, 8, 3, 5], ([2, 8, 15],), {}, Channel(None, -3, 8), None),
    "reshape-one-channel-target-fed": ("Reshape", [2, 1, 3, 5], ("p",), {}, Channel(4, 1, 1), Channel(None, None, 1)),
    "reshape-empty-prefix-of-another-shape": ("Reshape", [0, 8, 3, 5], ([0, 1, 8, 16],), {}, Channel(4, 1, 8),
                                              Channel(4, 2, 8)),
    "reshape-empty-suffix": ("Reshape", [2, 8, 0], ([3, 8, 0],), {}, Channel(3, 1, 8), Channel(3, 1, 8)),
    "flatten-default-axis": ("Flatten", [2, 8, 1, 1], (), {}, Channel(4, 1, 8), Channel(2, 1, 8)),
    "flatten-axis-0": ("Flatten", [1, 2], (), {"axis": 0}, Channel(2, 1, 2), Channel(2, 1, 2)),
    "flatten-axis-equal-to-rank": ("Flatten", [1, 8], (), {"axis": 2}, Channel(2, 1, 8), Channel(2, 0, 8)),
    "flatten-one-channel-shape-unknown": ("Flatten", None, (), {"axis": 1}, Channel(None, -1, 1),
                                          Channel(2, None, 1)),
}


@pytest.mark.parametrize("case", LAYOUT_CASES)
def test_layout_op_moves_the_channel_axis(case):
    op, shape, inputs, attrs, channel, expected = LAYOUT_CASES[case]
    node, consts = one_op(op, shape, inputs, **attrs)
    if expected is None:
        with pytest.raises(NoMatch) as refused:
            layout.through(node, channel, consts)
        assert refused.value.reason == "unproven-layout"
    else:
        assert layout.through(node, channel, consts) == expected


# --- 8. constant Mul / Div / Add / Sub as (s, t), and which constants are per channel ----


def site_of(op: str, constant, constant_first: bool = False, shape=(2, 4, 3, 3)):
    b = GraphBuilder(seed=0)
    x, c = b.input(list(shape)), b.const(np.asarray(constant))
    b.output(b.node(op, [c, x] if constant_first else [x, c]))
    model = ir.serde.deserialize_model(b.model())
    node = next(iter(model.graph))
    return elementwise.as_site(node, Constants(model.ir_version, graphs=[model.graph]))


@pytest.mark.parametrize("op, first, expected", [
    ("Mul", False, lambda c: (c, 0 * c)), ("Mul", True, lambda c: (c, 0 * c)),
    ("Div", False, lambda c: (1 / c, 0 * c)),
    ("Add", False, lambda c: (1 + 0 * c, c)), ("Add", True, lambda c: (1 + 0 * c, c)),
    ("Sub", False, lambda c: (1 + 0 * c, -c)), ("Sub", True, lambda c: (-1 + 0 * c, c)),
])
def test_elementwise_sites_are_affine_maps(op, first, expected):
    """``x*c, c*x, x/c, x+c, c+x, x-c, c-x`` are ``s*x + t`` with these (s, t), checked on values."""
    c = np.array([0.5, -2.0, 3.0, 1.5])
    site = site_of(op, c.astype(np.float32), first)
    assert site.data_index == (1 if first else 0)
    s, t = elementwise.scale_shift(site, c)
    x = np.linspace(-3, 3, 4)
    direct = {"Mul": x * c, "Div": x / c, "Add": x + c, "Sub": c - x if first else x - c}[op]
    np.testing.assert_allclose(s * x + t, direct, rtol=1e-15)
    for got, want in zip((s, t), expected(c)):
        np.testing.assert_allclose(got, want, rtol=1e-15)


def test_what_is_no_elementwise_site():
    """``c / x`` is no affine map of x; an integer constant is no scale of floats."""
    assert site_of("Div", np.float32(2.0), constant_first=True) is None
    assert site_of("Mul", np.array([1, 2, 3, 4]).reshape(1, 4, 1, 1)) is None
    assert site_of("Mul", np.float32(2.0)) is not None


@pytest.mark.parametrize("constant", [np.array([1.0, 0.0, 2.0, 1.0]), np.array([1.0, np.nan, 2.0, 1.0])])
def test_a_division_by_zero_or_a_nan_constant_is_no_map(constant):
    with pytest.raises(NoMatch) as refused:
        elementwise.scale_shift(site_of("Div", constant.astype(np.float32)), constant)
    assert refused.value.reason == "non-finite-params"


CHANNEL_VECTOR_CASES = {
    # name: (constant shape, channel, per-channel vector or None: not one value per channel)
    "scalar": ((), Channel(4, 1, 4), True),
    "channel-first-layout": ((4, 1, 1), Channel(4, 1, 4), True),
    "full-rank": ((1, 4, 1, 1), Channel(4, 1, 4), True),
    "one-value": ((1, 1, 1), Channel(4, 1, 4), True),
    "along-the-last-axis": ((4,), Channel(4, 1, 4), None),
    "another-count": ((2, 1, 1), Channel(4, 1, 4), None),
    "higher-rank": ((1, 1, 4, 1, 1), Channel(4, 1, 4), None),
    "two-axes": ((4, 3, 1), Channel(4, 1, 4), None),
    "last-axis-rank-unknown": ((4,), Channel(None, -1, 4), True),
    "last-axis-rank-unknown-one-value": ((1,), Channel(None, -1, 4), True),
    "last-axis-rank-unknown-another-count": ((3,), Channel(None, -1, 4), None),
    "rank-unknown-two-dims": ((1, 4), Channel(None, -1, 4), None),
    "second-to-last-rank-unknown": ((4,), Channel(None, -2, 4), None),
    "axis-1-rank-unknown": ((4,), Channel(None, 1, 4), None),
    "scalar-rank-unknown": ((), Channel(None, 1, 4), True),
}


@pytest.mark.parametrize("case", CHANNEL_VECTOR_CASES)
def test_a_constant_is_per_channel_only_along_the_channel_axis(case):
    shape, channel, ok = CHANNEL_VECTOR_CASES[case]
    constant = np.arange(1, 1 + int(np.prod(shape)), dtype=np.float32).reshape(shape)
    if ok is None:
        with pytest.raises(NoMatch) as refused:
            elementwise.channel_vector(constant, channel)
        assert refused.value.reason == "non-channel-constant"
    else:
        vector = elementwise.channel_vector(constant, channel)
        np.testing.assert_array_equal(vector, np.broadcast_to(constant.reshape(-1), (4,)))


# --- 9. MatMul biases and flattened maps: where the fold must stop -----------------------


@pytest.mark.parametrize("reader", ["graph-output", "another-reader"])
def test_a_matmul_bias_add_whose_matmul_output_is_read_elsewhere(tmp_path, reader):
    """``MatMul -> Add(bias) -> BN``: folding changes the MatMul's weight, so its own output
    must be read by the bias Add alone."""
    b = GraphBuilder(seed=40)
    mm = b.node("MatMul", [b.input([3, 4]), b.random([4, 5])])
    b.output(b.bn(b.node("Add", [mm, b.random([5])]), 5, name="the_bn"))
    b.output(mm if reader == "graph-output" else b.node("Relu", [mm]))
    result, folded = fold_and_compare(b.model(), feeds(b, (3, 4)), tmp_path)
    (entry,) = [e for e in result.ledger if e.node == "the_bn"]
    assert (entry.status, entry.reason) == ("kept", "graph-output" if reader == "graph-output" else "fan-out")
    assert count_ops(folded, "BatchNormalization") == 1


def test_a_batched_matmul_weight_is_no_channel_weight(tmp_path):
    """A 3-D MatMul weight holds one matrix per batch: no single output-channel axis."""
    b = GraphBuilder(seed=41)
    y = b.node("MatMul", [b.input([2, 3, 4]), b.random([2, 4, 5])])
    b.output(b.node("Mul", [y, channel_const(b, 5, [5])], name="the_bn"))
    result, folded = fold_and_compare(b.model(), feeds(b, (2, 3, 4)), tmp_path)
    assert ("Mul", "kept", "channel-axis-mismatch") in entries(result)
    assert count_ops(folded, "Mul") == 1


@pytest.mark.parametrize("bias", ["graph-input", "not-per-channel"])
def test_an_add_after_a_matmul_that_is_no_bias_slot(tmp_path, bias):
    """BN -> MatMul -> Add: the Add holds the MatMul's bias only if it is a per-channel
    constant; otherwise W t goes into a new Add and the old one stays as it was."""
    b = GraphBuilder(seed=42)
    y = b.node("MatMul", [b.bn(b.input([3, 4]), 4), b.random([4, 5])])
    other = b.input([3, 5], name="z") if bias == "graph-input" else b.random([3, 5])
    b.output(b.node("Add", [y, other]))
    model = b.model()
    feed = {**feeds(b, (3, 4)), **({"z": b.rng.standard_normal((3, 5)).astype(np.float32)} if bias == "graph-input"
                                   else {})}
    result, folded = fold_and_compare(model, feed, tmp_path)
    assert entries(result)[0] == ("BatchNormalization", "folded", "bn-matmul")
    assert ops(folded) == ["MatMul", "Add", "Add"]


FLATTEN_CASES = {
    # name: (what flattens the map, reason it stays)
    "flatten-axis-2": (lambda b, y: b.node("Flatten", [y], axis=2), "no-linear-producer"),
    "reshape-merging-the-batch": (lambda b, y: b.node("Reshape", [y, b.const(np.array([4, 8]))]),
                                  "unproven-layout"),
}


@pytest.mark.parametrize("case", FLATTEN_CASES)
def test_a_map_flattened_other_than_from_the_channel_axis_stays(tmp_path, case):
    """``BN -> Flatten/Reshape -> Gemm`` folds only when each channel becomes consecutive
    features of one row (Flatten(axis=1) or a Reshape proven to be one)."""
    flatten, reason = FLATTEN_CASES[case]
    b = GraphBuilder(seed=43)
    y = flatten(b, b.bn(b.node("Relu", [b.input([2, 4, 2, 2])]), 4, name="the_bn"))
    width = 4 if case == "flatten-axis-2" else 8
    b.output(b.node("Gemm", [y, b.random([width, 3])]))
    result, folded = fold_and_compare(b.model(), feeds(b, (2, 4, 2, 2)), tmp_path)
    assert ("BatchNormalization", "kept", reason) in entries(result)
    assert count_ops(folded, "BatchNormalization") == 1


def test_a_map_along_the_last_axis_flattened_into_a_gemm_stays(tmp_path):
    """``x * c`` with c along the last axis, then Flatten(axis=1) -> Gemm: the channels
    interleave in the features, which the fold does not lay out: the Mul stays."""
    b = GraphBuilder(seed=44)
    y = b.node("Mul", [b.node("Relu", [b.input([2, 2, 2, 4])]), channel_const(b, 4, [4])], name="the_bn")
    b.output(b.node("Gemm", [b.node("Flatten", [y]), b.random([16, 3])]))
    result, folded = fold_and_compare(b.model(), feeds(b, (2, 2, 2, 4)), tmp_path)
    assert not [e for e in result.ledger if e.status == "folded"]
    assert count_ops(folded, "Mul") == 1


def test_a_weight_computed_in_the_graph_with_an_invalid_shape_is_refused(tmp_path):
    """A Conv weight from a constant subgraph (the loader cannot size it) of rank 2: bad
    input, one line, exit 2 (InputError)."""
    from bnfold.errors import InputError

    b = GraphBuilder(seed=45)
    weight = b.node("Identity", [b.random([4, 3])])
    b.output(b.bn(b.node("Conv", [b.input([2, 3, 5, 5]), weight]), 4), shape=None)
    onnx.save(b.model(), tmp_path / "m.onnx")
    with pytest.raises(InputError, match="invalid node"):
        bnfold.fold(tmp_path / "m.onnx")


def test_a_gemm_bias_that_does_not_broadcast_is_refused(tmp_path):
    from bnfold.errors import InputError

    b = GraphBuilder(seed=46)
    b.output(b.bn(b.node("Gemm", [b.input([3, 4]), b.random([4, 5]), b.random([7])]), 5), shape=None)
    onnx.save(b.model(), tmp_path / "m.onnx")
    with pytest.raises(InputError, match="does not broadcast"):
        bnfold.fold(tmp_path / "m.onnx")


# --- 10. the matchers' edges: which ops, which axes, which refusals ------------------------

from bnfold.errors import InputError  # noqa: E402
from bnfold.patterns import match_producer  # noqa: E402


@pytest.mark.parametrize("rank", [1, 3, 4])
def test_a_negative_channel_axis_counts_from_the_end_of_a_known_rank(rank):
    """``Channel.normalized``: every axis in [-rank, rank) names one axis, -rank the first;
    any other, or a negative axis of an unknown rank, names none."""
    for axis in range(-rank, rank):
        assert Channel(rank, axis, 8).normalized() == Channel(rank, axis % rank, 8)
    assert Channel(rank, -rank - 1, 8).normalized() is None
    assert Channel(None, -1, 8).normalized() is None
    assert Channel(None, 2, 8).normalized() == Channel(None, 2, 8)
    assert Channel(rank, None, 1).normalized() == Channel(rank, None, 1)


def test_only_standard_layout_ops_are_followed_as_layout():
    """``is_layout``: the six ONNX ops that only move elements; not another op, and not a
    custom-domain op that happens to share a name."""
    for op in sorted(layout.LAYOUT_OPS):
        assert layout.is_layout(ir.Node("", op, inputs=[])), op
        assert layout.is_layout(ir.Node("ai.onnx", op, inputs=[])), op  # the same domain, spelt out
        assert not layout.is_layout(ir.Node("com.example", op, inputs=[])), op
    for op in ("Relu", "Conv", "Concat", "Softmax"):
        assert not layout.is_layout(ir.Node("", op, inputs=[])), op


def test_no_linear_producer_behind_a_graph_input_or_a_custom_op():
    """``match_producer`` matches ONNX's own Conv, never a custom-domain op of that name
    (its weights mean what its domain says), and nothing behind a graph input."""
    x = oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3, 4, 4])
    w = onh.from_array(np.ones((4, 3, 1, 1), np.float32), "w")
    nodes = [oh.make_node("Conv", ["x", "w"], ["onnx_conv"], name="onnx_conv"),
             oh.make_node("Conv", ["x", "w"], ["custom_conv"], name="custom_conv", domain="com.example")]
    outputs = [oh.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in ("onnx_conv", "custom_conv")]
    proto = oh.make_model(oh.make_graph(nodes, "g", [x], outputs, [w]),
                          opset_imports=[oh.make_opsetid("", 17), oh.make_opsetid("com.example", 1)])
    model = ir.serde.deserialize_model(proto)
    consts = Constants(model.ir_version, graphs=[model.graph])
    values = {v.name: v for v in model.graph.outputs}
    assert match_producer(values["onnx_conv"], consts).node.name == "onnx_conv"
    for value in (values["custom_conv"], model.graph.inputs[0]):
        with pytest.raises(NoMatch) as refused:
            match_producer(value, consts)
        assert refused.value.reason == "no-linear-producer"


def unnamed(model: onnx.ModelProto) -> onnx.ModelProto:
    for node in model.graph.node:
        node.name = ""
    return model


def test_refusals_name_an_unnamed_node_by_its_output():
    """Exporters often leave nodes unnamed: a refusal then names the op and its first
    output (or none, for an op with no outputs) instead of failing to say where."""
    b = GraphBuilder(seed=47)  # a producer that is no linear op
    relu = b.node("Relu", [b.node("Conv", [b.input([2, 3, 4, 4]), b.random([4, 3, 1, 1])])])
    b.output(b.bn(relu, 4))
    (entry,) = bnfold.fold(ir.serde.deserialize_model(unnamed(b.model()))).ledger
    assert entry.reason == "no-linear-producer" and f"input comes from Relu (output {relu!r})" in entry.detail

    b = GraphBuilder(seed=48)  # a layout op whose proof fails
    conv = b.node("Conv", [b.input([2, 3, 4, 4]), b.random([4, 3, 3, 3])], pads=[1, 1, 1, 1])
    flat = b.node("Flatten", [conv], axis=2)
    b.output(b.bn(flat, 16))
    model = unnamed(b.model())
    model.graph.value_info.append(oh.make_tensor_value_info(conv, onnx.TensorProto.FLOAT, [2, 4, 4, 4]))
    (entry,) = bnfold.fold(ir.serde.deserialize_model(model)).ledger
    assert entry.reason == "unproven-layout"
    assert entry.detail.endswith(f"merges or splits the channel axis (Flatten output {flat!r})"), entry.detail

    b = GraphBuilder(seed=49)  # a standalone BN read by a custom op with no outputs
    y = b.bn(b.input([2, 3, 4]), 3)
    b.output(y)
    model = unnamed(b.model())
    model.graph.node.append(oh.make_node("Sink", [y], [], domain="com.example"))
    model.opset_import.append(oh.make_opsetid("com.example", 1))
    (entry,) = bnfold.fold(ir.serde.deserialize_model(model)).ledger
    assert entry.reason == "no-linear-producer" and "read by Sink (output '')" in entry.detail


def test_an_overridable_weight_is_named_as_such(tmp_path):
    """A Conv weight that is also a graph input (IR >= 4) may be overridden by the caller:
    the BN stays, for that reason, unless overridable initializers are folded on request."""
    b = GraphBuilder(seed=50)
    weight = b.random([4, 3, 3, 3])
    b.output(b.bn(b.node("Conv", [b.input([2, 3, 6, 6]), weight]), 4))
    model = b.model()
    model.graph.input.append(oh.make_tensor_value_info(weight, onnx.TensorProto.FLOAT, [4, 3, 3, 3]))
    (entry,) = bnfold.fold(ir.serde.deserialize_model(model)).ledger
    assert (entry.status, entry.reason) == ("kept", "overridable-params")
    (entry,) = bnfold.fold(ir.serde.deserialize_model(model), fold_overridable=True).ledger
    assert (entry.status, entry.pattern) == ("folded", "conv-bn")


INVALID_PARAMETERS = {
    # name: (op, input shape, weight shape, bias shape or None, attributes, what the refusal says)
    "conv-bias-of-another-count": ("Conv", [2, 3, 5, 5], [4, 3, 1, 1], [5], {}, r"bias has shape \[5\]"),
    "conv-bias-of-rank-2": ("Conv", [2, 3, 5, 5], [4, 3, 1, 1], [1, 4], {}, r"bias has shape \[1, 4\]"),
    "conv-group-not-dividing": ("Conv", [2, 3, 5, 5], [4, 1, 1, 1], None, {"group": 3}, "group 3"),
    "conv-group-0": ("Conv", [2, 3, 5, 5], [4, 3, 1, 1], None, {"group": 0}, "group 0"),
    "gemm-weight-of-rank-3": ("Gemm", [3, 4], [1, 4, 5], None, {}, r"B has shape \[1, 4, 5\]"),
    "gemm-bias-of-rank-3": ("Gemm", [3, 4], [4, 5], [1, 1, 5], {}, r"C of shape \[1, 1, 5\]"),
}


@pytest.mark.parametrize("computed", [False, True])
@pytest.mark.parametrize("case", INVALID_PARAMETERS)
def test_parameters_of_shapes_onnx_forbids_are_refused(tmp_path, case, computed):
    """A weight or bias of a shape ONNX forbids for the op (given as a constant, or computed
    in the graph where the loader cannot size it) is bad input: InputError, saying which
    shape, before any fold could write a wrong one."""
    op, shape, weight_shape, bias_shape, attrs, says = INVALID_PARAMETERS[case]
    b = GraphBuilder(seed=51)
    params = [b.random(weight_shape)] + ([] if bias_shape is None else [b.random(bias_shape)])
    if computed:
        params = [b.node("Identity", [p]) for p in params]
    y = b.node(op, [b.input(shape), *params], **attrs)
    b.output(b.bn(y, weight_shape[0] if op == "Conv" else weight_shape[-1]), shape=None)
    onnx.save(b.model(), tmp_path / "m.onnx")
    with pytest.raises(InputError, match=says):
        bnfold.fold(tmp_path / "m.onnx")


def test_a_bfloat16_mul_constant_folds_like_any_float(tmp_path):
    """bfloat16 (ml_dtypes, numpy kind 'V') is a float: MatMul -> Mul(bf16 per-column
    constant) folds into the weight, computed in float64 and cast once to bfloat16."""
    import ml_dtypes

    bf16 = ml_dtypes.bfloat16
    rng = np.random.default_rng(11)
    weight = rng.standard_normal((4, 5)).astype(bf16)
    scale = rng.uniform(0.5, 2.0, 5).astype(bf16)
    graph = oh.make_graph(
        [oh.make_node("MatMul", ["x", "w"], ["y"]), oh.make_node("Mul", ["y", "s"], ["z"])], "bf16",
        [oh.make_tensor_value_info("x", onnx.TensorProto.BFLOAT16, [3, 4])],
        [oh.make_tensor_value_info("z", onnx.TensorProto.BFLOAT16, [3, 5])],
        [onh.from_array(weight, "w"), onh.from_array(scale, "s")])
    result = bnfold.fold(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)]))
    assert entries(result) == [("Mul", "folded", "matmul-mul")]
    result.save(tmp_path / "folded.onnx")
    folded = onnx.load(tmp_path / "folded.onnx")
    assert ops(folded) == ["MatMul"]
    (new_weight,) = [onh.to_array(t) for t in folded.graph.initializer]
    expected = (weight.astype(np.float64) * scale.astype(np.float64)).astype(bf16)
    assert new_weight.dtype == bf16 and np.array_equal(new_weight.view(np.uint16), expected.view(np.uint16))
