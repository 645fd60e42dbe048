"""bnfold.plan's legality and numeric decisions, one promise per test (issue 27: each
test kills mutants of plan.py that the other tests let live)."""

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as onh
import pytest

import bnfold
from bnfold._onnx_ir import ir
from bnfold.errors import InputError
from bnfold.plan import FoldOptions
from builders import GraphBuilder, count_ops, fold_and_compare, ops, run


def entry(result, node: str):
    (found,) = [e for e in result.ledger if e.node == node]
    return found


def x_feed(shape, seed=0):
    return {"x": np.random.default_rng(seed).standard_normal(shape).astype(np.float32)}


def conv_bn(b: GraphBuilder, c_out=4, **bn_attrs) -> str:
    y = b.node("Conv", [b.input([2, 3, 5, 5]), b.random([c_out, 3, 3, 3])], pads=[1, 1, 1, 1])
    return b.bn(y, c_out, name="the_bn", **bn_attrs)


# --- options ---------------------------------------------------------------------------


def test_targets_are_checked():
    assert FoldOptions(targets=("fp16", "int8", "fp16")).targets == ("fp16", "int8")
    with pytest.raises(InputError, match="fp17"):
        FoldOptions(targets=("fp16", "fp17"))


def test_keep_on_request(tmp_path):
    """--keep: a BN that would fold stays, with its reason and its channel count."""
    b = GraphBuilder(seed=1)
    b.output(conv_bn(b))
    result, folded = fold_and_compare(b.model(), x_feed([2, 3, 5, 5]), tmp_path, keep=frozenset({"the_bn"}))
    found = entry(result, "the_bn")
    assert (found.status, found.reason, found.channels) == ("kept", "kept-on-request", 4)
    assert count_ops(folded, "BatchNormalization") == 1


@pytest.mark.parametrize("stats", [["rm", "rv"], ["", ""]], ids=["named-stats", "unnamed-stats"])
@pytest.mark.parametrize("keep", [False, True])
def test_a_training_bn_kept_with_to_inference_is_kept_in_inference_form(tmp_path, keep, stats):
    """--to-inference converts a training-mode BN even where it stays: named by --keep, or
    with nothing linear beside it. The model keeps an inference BN with its one output
    (onnxruntime refuses an inference BN that lists even empty running-stat outputs), and
    the ledger says so."""
    b = GraphBuilder(seed=8)
    x = b.input([2, 3, 4, 4])
    y = b.node("Conv", [x, b.random([3, 3, 1, 1])]) if keep else b.node("Relu", [x])  # a conv: it would fold
    b.nodes.append(oh.make_node("BatchNormalization", [y, *b.bn_params(3)], ["out", *stats], name="the_bn",
                                training_mode=1))
    b.output("out", [2, 3, 4, 4])
    model = b.model(opset=15)
    onnx.save(model, tmp_path / "in.onnx")
    result = bnfold.fold(tmp_path / "in.onnx", to_inference=True, keep=frozenset({"the_bn"} if keep else ()))
    found = entry(result, "the_bn")
    assert (found.status, found.reason) == ("kept", "kept-on-request" if keep else "no-linear-producer")
    assert (found.channels, found.converted_from_training) == (3, True)
    result.save(tmp_path / "out.onnx")
    (bn,) = [n for n in onnx.load(tmp_path / "out.onnx").graph.node if n.op_type == "BatchNormalization"]
    assert list(bn.output) == ["out"] and not bn.attribute
    model.graph.node[-1].ClearField("attribute")
    model.graph.node[-1].output[1:] = []  # the reference: the same BN in inference form
    np.testing.assert_allclose(run(tmp_path / "out.onnx", x_feed([2, 3, 4, 4]))[0], run(model, x_feed([2, 3, 4, 4]))[0],
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("given", [{"is_test": 0}, {}], ids=["is-test-0", "is-test-unset"])
def test_an_opset_6_bn_converted_by_to_inference_gets_is_test(tmp_path, given):
    """BatchNormalization-6 runs in training mode unless is_test=1 (its default is 0): the
    conversion sets it, or adds it (onnxruntime has no BatchNormalization-6 to run, so the
    saved node is read)."""
    b = GraphBuilder(seed=9)
    b.output(b.bn(b.node("Relu", [b.input([2, 3, 4, 4])]), 3, name="the_bn", **given))
    onnx.save(b.model(opset=6), tmp_path / "in.onnx")
    result = bnfold.fold(tmp_path / "in.onnx", to_inference=True)
    assert (entry(result, "the_bn").status, entry(result, "the_bn").converted_from_training) == ("kept", True)
    result.save(tmp_path / "out.onnx")
    (bn,) = [n for n in onnx.load(tmp_path / "out.onnx").graph.node if n.op_type == "BatchNormalization"]
    assert {a.name: oh.get_attribute_value(a) for a in bn.attribute}["is_test"] == 1


def test_a_decomposed_graph_output_keeps_its_type_and_shape():
    """A BN whose output is a graph output, decomposed in memory: the Add that replaces it
    takes the output's name, element type and shape (a serialised graph output needs a type)."""
    b = GraphBuilder(seed=10)
    b.output(b.bn(b.node("Relu", [b.input([2, 3, 4, 4])]), 3, name="the_bn"), shape=[2, 3, 4, 4])
    model = b.model(opset=15)
    result = bnfold.fold(ir.serde.deserialize_model(model), decompose_standalone=True)
    assert entry(result, "the_bn").status == "decomposed"
    out = result.to_proto()
    assert out.graph.output[0] == model.graph.output[0]
    assert ops(out) == ["Relu", "Mul", "Add"]


# --- statistics ------------------------------------------------------------------------


@pytest.mark.parametrize("opset, outputs", [(9, ["out", "rm", "", "", ""]), (15, ["out", "rm", ""])])
def test_a_bn_with_only_its_running_mean_output_is_training_mode(tmp_path, opset, outputs):
    """Any running-stat output, the running mean alone (the variance's left unnamed)
    included, marks a training-form BN: an inference BN has no such outputs to give."""
    b = GraphBuilder(seed=2)
    y = b.node("Conv", [b.input([2, 3, 5, 5]), b.random([4, 3, 3, 3])])
    b.nodes.append(oh.make_node("BatchNormalization", [y, *b.bn_params(4)], outputs, name="the_bn"))
    b.output("out", [2, 4, 3, 3])
    onnx.save(b.model(opset=opset), tmp_path / "in.onnx")
    found = entry(bnfold.fold(tmp_path / "in.onnx"), "the_bn")
    assert (found.status, found.reason, found.detail) == ("kept", "training-mode",
                                                          "running-stat outputs present (unused)")


def test_unnamed_running_stat_outputs_are_absent_and_the_bn_folds(tmp_path):
    """``outputs=["out", "", ""]``: the empty names are absent optional outputs, no training form."""
    b = GraphBuilder(seed=2)
    y = b.node("Conv", [b.input([2, 3, 5, 5]), b.random([4, 3, 3, 3])])
    b.nodes.append(oh.make_node("BatchNormalization", [y, *b.bn_params(4)], ["out", "", ""], name="the_bn"))
    b.output("out", [2, 4, 3, 3])
    model = b.model(opset=15)
    onnx.save(model, tmp_path / "in.onnx")
    result = bnfold.fold(tmp_path / "in.onnx")
    assert entry(result, "the_bn").status == "folded"
    result.save(tmp_path / "out.onnx")
    model.graph.node[-1].output[1:] = []  # the reference: onnxruntime refuses the empty names
    np.testing.assert_allclose(run(tmp_path / "out.onnx", x_feed([2, 3, 5, 5]))[0], run(model, x_feed([2, 3, 5, 5]))[0],
                               rtol=1e-4, atol=1e-5)


def test_zero_variance_with_zero_epsilon_is_kept(tmp_path):
    """var + eps == 0 makes s = gamma / 0: the BN stays even though no var is negative."""
    b = GraphBuilder(seed=2)
    y = b.node("Conv", [b.input([2, 3, 5, 5]), b.random([4, 3, 3, 3])], pads=[1, 1, 1, 1])
    gamma, beta, mean, _ = b.bn_params(4)
    var = b.const(np.float32([0.5, 0.0, 1.0, 2.0]), "var")
    b.output(b.node("BatchNormalization", [y, gamma, beta, mean, var], name="the_bn", epsilon=0.0))
    src = tmp_path / "in.onnx"
    onnx.save(b.model(), src)
    found = entry(bnfold.fold(src), "the_bn")
    assert (found.status, found.reason, found.channels) == ("kept", "negative-variance", 4)


def test_a_bn_whose_statistics_are_not_constants_is_kept_without_a_channel_count(tmp_path):
    """A BN reading its mean from a graph input cannot be planned: kept, and the ledger
    does not claim a channel count it never read."""
    b = GraphBuilder(seed=2)
    y = b.node("Conv", [b.input([2, 3, 5, 5]), b.random([4, 3, 3, 3])])
    gamma, beta, _, var = b.bn_params(4)
    b.inputs.append(oh.make_tensor_value_info("mean", onnx.TensorProto.FLOAT, [4]))
    b.output(b.node("BatchNormalization", [y, gamma, beta, "mean", var], name="the_bn"))
    onnx.save(b.model(), tmp_path / "in.onnx")
    found = entry(bnfold.fold(tmp_path / "in.onnx"), "the_bn")
    assert (found.status, found.channels, found.converted_from_training) == ("kept", None, False)


def test_a_zero_variance_with_a_positive_epsilon_folds(tmp_path):
    """A dead channel (var = 0) is healthy while eps > 0: s = gamma / sqrt(eps)."""
    b = GraphBuilder(seed=2)
    y = b.node("Conv", [b.input([2, 3, 5, 5]), b.random([4, 3, 3, 3])], pads=[1, 1, 1, 1])
    gamma, beta, mean, _ = b.bn_params(4)
    var = b.const(np.float32([0.5, 0.0, 1.0, 2.0]), "var")
    b.output(b.node("BatchNormalization", [y, gamma, beta, mean, var], name="the_bn", epsilon=1e-3))
    result, _ = fold_and_compare(b.model(), x_feed([2, 3, 5, 5]), tmp_path)
    assert entry(result, "the_bn").status == "folded"


@pytest.mark.parametrize("shapes", [[(4,), (4,), (3,), (4,)], [(2, 2)] * 4])
def test_bn_parameters_of_different_lengths_or_not_1d_are_an_invalid_model(tmp_path, shapes):
    """scale, B, mean and var are 1-D, one value per channel: anything else is an invalid
    model (exit 2), never folded by broadcasting."""
    b = GraphBuilder(seed=3)
    y = b.node("Conv", [b.input([2, 3, 5, 5]), b.random([4, 3, 3, 3])])
    params = [b.const(np.full(shape, 0.5 + i, np.float32)) for i, shape in enumerate(shapes)]
    b.output(b.node("BatchNormalization", [y, *params], name="the_bn"))
    model = b.model()
    model.graph.output[0].type.tensor_type.ClearField("shape")  # inference cannot type this BN
    onnx.save(model, tmp_path / "in.onnx")
    with pytest.raises(InputError, match="must be 1-D of one length"):
        bnfold.fold(tmp_path / "in.onnx")


# --- elementwise sites -----------------------------------------------------------------


def mul_before_matmul(const, x_shape, w_shape, between=None, seed=3):
    b = GraphBuilder(seed=seed)
    x = b.input(x_shape)
    y = b.node("Mul", [x, b.const(np.asarray(const, dtype=np.float32))], name="the_mul")
    if between is not None:
        y = b.node(between, [y])
    b.output(b.node("MatMul", [y, b.random(w_shape)]))
    return b


def test_constant_varying_along_two_axes_is_refused(tmp_path):
    b = mul_before_matmul(np.arange(1, 13).reshape(3, 4), [2, 3, 4], [4, 5])
    onnx.save(b.model(), tmp_path / "in.onnx")
    found = entry(bnfold.fold(tmp_path / "in.onnx"), "the_mul")
    assert (found.status, found.reason) == ("kept", "non-channel-constant")


def test_a_vector_constant_on_data_of_unknown_shape_is_refused(tmp_path):
    """x of unknown shape: a [4] constant might stretch an axis of size 1, so the Mul stays."""
    b = GraphBuilder(seed=12)
    b.inputs.append(oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, None))
    y = b.node("Mul", ["x", b.const(np.float32([1.0, -2.0, 3.0, 0.5]))], name="the_mul")
    b.output(b.node("MatMul", [y, b.random([4, 5])]), shape=None)
    onnx.save(b.model(), tmp_path / "in.onnx")
    found = entry(bnfold.fold(tmp_path / "in.onnx"), "the_mul")
    assert (found.status, found.reason) == ("kept", "non-channel-constant")


def test_a_one_element_vector_on_data_of_unknown_rank_is_refused(tmp_path):
    """x of unknown rank, fed a scalar: ``x * [2]`` is a vector, so removing the Mul would
    hand MatMul a scalar it cannot read. Only a 0-d constant leaves any rank as it was."""
    b = GraphBuilder(seed=13)
    b.inputs.append(oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, None))
    y = b.node("Mul", ["x", b.const(np.float32([2.0]))], name="the_mul")
    b.output(b.node("MatMul", [y, b.random([1, 5])]), shape=None)
    result, _ = fold_and_compare(b.model(), {"x": np.array(1.5, np.float32)}, tmp_path, checked=False)
    found = entry(result, "the_mul")
    assert (found.status, found.reason) == ("kept", "non-channel-constant")


def test_a_0d_constant_on_data_of_unknown_rank_folds(tmp_path):
    b = GraphBuilder(seed=14)
    b.inputs.append(oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, None))
    y = b.node("Mul", ["x", b.const(np.float32(2.0))], name="the_mul")
    b.output(b.node("MatMul", [y, b.random([4, 5])]), shape=None)
    result, folded = fold_and_compare(b.model(), x_feed([3, 4]), tmp_path, checked=False)
    assert entry(result, "the_mul").status == "folded"
    assert count_ops(folded, "Mul") == 0


def test_a_constant_that_would_stretch_a_leading_axis_is_refused(tmp_path):
    """A ``[4, 1]`` constant on ``[2, 1, 1]`` data stretches axis 1 to 4 (the last axis
    matches): removing the Mul would change the shape the MatMul reads."""
    b = GraphBuilder(seed=15)
    y = b.node("Mul", [b.input([2, 1, 1]), b.const(np.float32([[1.0], [-2.0], [3.0], [0.5]]))], name="the_mul")
    b.output(b.node("MatMul", [y, b.random([1, 5])]))
    result, folded = fold_and_compare(b.model(), x_feed([2, 1, 1]), tmp_path)
    found = entry(result, "the_mul")
    assert (found.status, found.reason) == ("kept", "non-channel-constant")
    assert count_ops(folded, "Mul") == 1


def test_a_vector_constant_on_data_of_known_rank_but_unknown_dims_is_refused(tmp_path):
    """In a function the Flatten proves its output has rank 2 but nothing gives the dims:
    a ``[1, 4]`` constant may stretch a ``[2, 1]`` tensor, so the Mul stays (no crash)."""
    local = "local.test"
    body = [oh.make_node("Flatten", ["a"], ["f"]),
            oh.make_node("Constant", [], ["c"], value=onh.from_array(np.float32([[1.0, -2.0, 3.0, 0.5]]))),
            oh.make_node("Mul", ["f", "c"], ["m"], name="the_mul"),
            oh.make_node("Constant", [], ["w"], value=onh.from_array(np.ones((4, 5), np.float32))),
            oh.make_node("MatMul", ["m", "w"], ["b"])]
    function = oh.make_function(local, "F", ["a"], ["b"], body, [oh.make_opsetid("", 17)])
    graph = oh.make_graph([oh.make_node("F", ["x"], ["y"], domain=local)], "g",
                          [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 1])],
                          [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17), oh.make_opsetid(local, 1)],
                          functions=[function])
    model.ir_version = 9
    result, _ = fold_and_compare(model, x_feed([2, 1]), tmp_path, checked=False)
    found = entry(result, "the_mul")
    assert (found.status, found.reason) == ("kept", "non-channel-constant")


def test_a_vector_constant_on_vector_data_folds(tmp_path):
    """1-d data and a constant of its full length: the constant spans the data's every axis."""
    b = mul_before_matmul([1.0, -2.0, 3.0, 0.5], [4], [4, 5], seed=16)
    result, folded = fold_and_compare(b.model(), x_feed([4]), tmp_path)
    assert entry(result, "the_mul").status == "folded"
    assert count_ops(folded, "Mul") == 0


def test_mul_before_dropout_and_matmul_folds(tmp_path):
    """The route from a Mul down to the linear op crosses version-dependent ops (Dropout)."""
    b = mul_before_matmul([1.0, -2.0, 3.0, 0.5], [2, 3, 4], [4, 5], between="Dropout")
    result, folded = fold_and_compare(b.model(), x_feed([2, 3, 4]), tmp_path)
    assert entry(result, "the_mul").status == "folded"
    assert count_ops(folded, "Mul") == 0
    assert count_ops(folded, "Add") == 0  # a pure scale: no zero bias added after the MatMul
    assert not entry(result, "the_mul").converted_from_training


def test_scalar_mul_after_a_flatten_folds_into_the_conv(tmp_path):
    """A 0-d constant is one value everywhere: it crosses a Flatten, which loses the channel axis."""
    b = GraphBuilder(seed=4)
    y = b.node("Flatten", [b.node("Conv", [b.input([2, 3, 5, 5]), b.random([4, 3, 3, 3])])])
    b.output(b.node("Mul", [y, b.const(np.float32(3.0))], name="the_mul"))
    result, folded = fold_and_compare(b.model(), x_feed([2, 3, 5, 5]), tmp_path)
    found = entry(result, "the_mul")
    assert (found.status, found.channels, found.channel_axis) == ("folded", 4, None)  # the conv's 4 channels
    assert count_ops(folded, "Mul") == 0


# --- after: into the producers ----------------------------------------------------------


def test_a_bn_after_a_matmul_reports_its_channels_on_axis_1(tmp_path):
    """MatMul's output channels are its last axis (-1 to the route): the ledger gives the
    axis counted from the front, 1 of a rank-2 output."""
    b = GraphBuilder(seed=6)
    b.output(b.bn(b.node("MatMul", [b.input([2, 3]), b.random([3, 4])]), 4, name="the_bn"))
    result, _ = fold_and_compare(b.model(), x_feed([2, 3]), tmp_path)
    found = entry(result, "the_bn")
    assert (found.status, found.channels, found.channel_axis) == ("folded", 4, 1)


@pytest.mark.parametrize("widths", [(2, 3), (1, 1)])
def test_bn_after_a_concat_counts_every_channel(tmp_path, widths):
    """A BN after a Concat of convs folds a share into each: the fold has all its channels
    (two one-channel convs make a two-channel BN, not a one-channel one)."""
    b = GraphBuilder(seed=5)
    x = b.input([2, 3, 5, 5])
    y = b.node("Concat", [b.node("Conv", [x, b.random([width, 3, 1, 1])]) for width in widths], axis=1)
    b.output(b.bn(y, sum(widths), name="the_bn"))
    result, folded = fold_and_compare(b.model(), x_feed([2, 3, 5, 5]), tmp_path)
    found = entry(result, "the_bn")
    assert (found.status, found.channels, found.channel_axis) == ("folded", sum(widths), 1)
    assert count_ops(folded, "BatchNormalization") == 0


def test_a_mul_after_a_dropout_folds_into_the_conv_before_it(tmp_path):
    """The route up from a Mul crosses Dropout, whose rule depends on the opset (is_test
    before 7); the ledger gives the channel axis and, for a Mul, no conversion."""
    b = GraphBuilder(seed=6)
    y = b.node("Dropout", [b.node("Conv", [b.input([2, 3, 5, 5]), b.random([4, 3, 3, 3])])], name="d")
    b.output(b.node("Mul", [y, b.const(np.float32([1.0, -2.0, 3.0, 0.5]).reshape(4, 1, 1))], name="the_mul"))
    result, folded = fold_and_compare(b.model(), x_feed([2, 3, 5, 5]), tmp_path)
    found = entry(result, "the_mul")
    assert (found.status, found.channels, found.channel_axis, found.route) == ("folded", 4, 1, "through Dropout 'd'")
    assert not found.converted_from_training
    assert count_ops(folded, "Mul") == 0


# --- before: into the consumers -------------------------------------------------------------


def bn_then(b: GraphBuilder, between: str, training: bool, **conv_attrs) -> onnx.ModelProto:
    """``x -> BN(3) -> <between> 'i' -> Conv 'conv'``, the BN optionally in training form."""
    x = b.input([2, 3, 6, 6])
    if training:
        b.nodes.append(oh.make_node("BatchNormalization", [x, *b.bn_params(3)], ["t", "rm", "rv"], name="the_bn",
                                    training_mode=1))
        y = "t"
    else:
        y = b.bn(x, 3, name="the_bn")
    y = b.node(between, [y], name="i", **({"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "count_include_pad": 1}
                                          if between == "AveragePool" else {}))
    b.output(b.node("Conv", [y, b.random([4, 3, 3, 3]), b.random([4])], name="conv", **conv_attrs))
    return b.model(opset=15)


def inference_form(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same model with its training-mode BN (node 0) in inference form: the reference."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    copy.graph.node[0].ClearField("attribute")
    copy.graph.node[0].output[1:] = []
    return copy


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_a_bn_before_a_conv_reports_what_it_did(tmp_path, padded, training):
    """The ledger of a BN folded into the Conv after it: the Conv, the route, the channel
    count and axis, the largest relative weight change ``max |s - 1|`` and whether
    --to-inference converted it; before a padded Conv, that the shift stayed as an Add."""
    b = GraphBuilder(seed=17)
    model = bn_then(b, "Identity", training, **({"pads": [1, 1, 1, 1]} if padded else {}))
    onnx.save(model, tmp_path / "in.onnx")
    result = bnfold.fold(tmp_path / "in.onnx", to_inference=training)
    found = entry(result, "the_bn")
    scale, _ = bn_map(model, "the_bn")
    assert (found.status, found.pattern) == ("folded", "bn-identity-conv-scale" if padded else "bn-identity-conv")
    assert (found.into, found.into_op, found.route) == ("conv", "Conv", "through Identity 'i'")
    assert (found.channels, found.channel_axis, found.converted_from_training) == (3, 1, training)
    assert found.max_rel_weight_change == pytest.approx(np.abs(scale - 1).max(), rel=1e-6)
    assert ("shift kept as an Add before the padded conv" in found.detail) == padded
    result.save(tmp_path / "out.onnx")
    folded = onnx.load(tmp_path / "out.onnx")
    assert count_ops(folded, "BatchNormalization") == 0 and count_ops(folded, "Add") == padded
    feeds = x_feed([2, 3, 6, 6])
    np.testing.assert_allclose(run(folded, feeds)[0], run(inference_form(model) if training else model, feeds)[0],
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("training, input_shape", [(False, True), (True, True), (False, False)])
def test_a_shift_an_average_pool_refuses_stays_as_an_add_and_the_scale_folds(tmp_path, training, input_shape):
    """An average counting zero padding does not commute with a shift: the shift stays at
    the BN as ``x + t/s`` and only the scale travels through the pool into the Conv. The
    Add's constant is shaped for the BN's rank: its output's, if its input's is unknown."""
    from bnfold.load import load_source
    from bnfold.plan import is_batch_norm

    b = GraphBuilder(seed=18)
    model = bn_then(b, "AveragePool", training)
    onnx.save(model, tmp_path / "in.onnx")
    source = load_source(tmp_path / "in.onnx")
    if not input_shape:
        next(n for n in source.model.graph if is_batch_norm(n)).inputs[0].shape = None
    result = bnfold.fold(source, to_inference=training)
    found = entry(result, "the_bn")
    assert (found.status, found.into, found.channels, found.channel_axis) == ("folded", "conv", 3, 1)
    assert found.converted_from_training == training
    assert "shift kept as an Add before the route" in found.detail
    result.save(tmp_path / "out.onnx")
    folded = onnx.load(tmp_path / "out.onnx")
    assert ops(folded) == ["Add", "AveragePool", "Conv"]
    feeds = x_feed([2, 3, 6, 6])
    np.testing.assert_allclose(run(folded, feeds)[0], run(inference_form(model) if training else model, feeds)[0],
                               rtol=1e-4, atol=1e-5)


def test_a_one_channel_bn_whose_shift_an_average_pool_refuses_folds_its_scale(tmp_path):
    """A one-channel BN is a uniform map: its scale alone travels through the pool into
    every channel the Conv reads, the shift stays as an Add."""
    b = GraphBuilder(seed=27)
    y = b.node("AveragePool", [b.bn(b.input([2, 1, 6, 6]), 1, name="the_bn")], kernel_shape=[3, 3],
               pads=[1, 1, 1, 1], count_include_pad=1)
    b.output(b.node("Conv", [y, b.random([4, 1, 3, 3])], name="conv"))
    result, folded = fold_and_compare(b.model(), x_feed([2, 1, 6, 6]), tmp_path)
    found = entry(result, "the_bn")
    assert (found.status, found.into) == ("folded", "conv") and "shift kept as an Add" in found.detail
    assert ops(folded) == ["Add", "AveragePool", "Conv"]


def test_a_bn_before_a_matmul_takes_its_rank_from_its_output_if_its_input_has_none(tmp_path):
    """MatMul reads the last axis: the BN's channels (axis 1) are that axis only at rank 2,
    which the BN's output proves when its input's shape is unknown."""
    from bnfold.load import load_source
    from bnfold.plan import is_batch_norm

    b = GraphBuilder(seed=19)
    b.output(b.node("MatMul", [b.bn(b.input([2, 3]), 3, name="the_bn"), b.random([3, 5])]))
    onnx.save(b.model(), tmp_path / "in.onnx")
    source = load_source(tmp_path / "in.onnx")
    next(n for n in source.model.graph if is_batch_norm(n)).inputs[0].shape = None
    result = bnfold.fold(source)
    assert entry(result, "the_bn").status == "folded"
    result.save(tmp_path / "out.onnx")
    feeds = x_feed([2, 3])
    np.testing.assert_allclose(run(tmp_path / "out.onnx", feeds)[0], run(tmp_path / "in.onnx", feeds)[0],
                               rtol=1e-4, atol=1e-5)


def test_a_bn_before_a_weight_without_elements_is_zero_size(tmp_path):
    """A Gemm with no output features: its weight has no element to scale, so the BN
    before it stays (``zero-size``), whatever its channels."""
    b = GraphBuilder(seed=20)
    y = b.bn(b.input([2, 3]), 3, name="the_bn")
    b.output(b.node("Gemm", [y, b.const(np.zeros((0, 3), np.float32)), b.const(np.zeros(0, np.float32))],
                    transB=1))
    result, _ = fold_and_compare(b.model(), x_feed([2, 3]), tmp_path)
    found = entry(result, "the_bn")
    assert (found.status, found.reason) == ("kept", "zero-size")


# --- subgraphs ---------------------------------------------------------------------------


def test_bn_in_each_graph_of_a_graphs_attribute_folds():
    """A node with a list of graphs (a custom op's GRAPHS attribute): each is a scope."""
    def body(seed):
        b = GraphBuilder(seed=seed)
        y = b.node("Conv", [b.input([1, 3, 4, 4], name="sx"), b.random([4, 3, 1, 1])])
        b.output(b.bn(y, 4, name=f"bn{seed}"))
        return oh.make_graph(b.nodes, f"g{seed}", b.inputs, b.outputs, b.initializers)

    b = GraphBuilder(seed=1)
    b.nodes.append(oh.make_node("Branches", [b.input([1, 3, 4, 4])], ["y"], name="br", domain="my.domain",
                                graphs=[body(1), body(2)]))
    b.output("y", [1, 4, 4, 4])
    graph = oh.make_graph(b.nodes, "g", b.inputs, b.outputs, b.initializers)
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17), oh.make_opsetid("my.domain", 1)])
    model.ir_version = 9
    result = bnfold.fold(model)
    assert {(e.node, e.graph, e.status) for e in result.ledger} == {
        ("bn1", "main/br.graphs[0]", "folded"), ("bn2", "main/br.graphs[1]", "folded")}
    assert not [n for g in result.to_proto().graph.node[0].attribute[0].graphs for n in g.node
                if n.op_type == "BatchNormalization"]


@pytest.mark.parametrize("ir_version, listed", [(3, True), (4, False)])
def test_new_constants_are_listed_as_inputs_only_before_ir_4(tmp_path, ir_version, listed):
    """IR 3 lists every initializer as a graph input too, so a fold's new bias is listed
    there; from IR 4 on the inputs stay what the model's were."""
    b = GraphBuilder(seed=23)
    b.output(b.bn(b.node("Conv", [b.input([2, 3, 5, 5]), b.random([4, 3, 1, 1])]), 4, name="the_bn"))
    model = b.model(opset=9, ir_version=ir_version)
    if ir_version < 4:
        model.graph.input.extend(oh.make_tensor_value_info(t.name, onnx.TensorProto.FLOAT, list(t.dims))
                                 for t in model.graph.initializer)
    # onnx's checker asks IR 3 for output shapes that a graph without them lacks
    result, folded = fold_and_compare(model, x_feed([2, 3, 5, 5]), tmp_path, checked=ir_version >= 4)
    assert entry(result, "the_bn").status == "folded"
    inputs = [i.name for i in folded.graph.input]
    assert inputs[0] == "x" and (sorted(inputs[1:]) == sorted(t.name for t in folded.graph.initializer)) == listed
    assert len(inputs) > 1 if listed else inputs == ["x"]
    assert count_ops(folded, "Constant") == 0


def scan_of_conv_bn(num_scan_inputs: onnx.AttributeProto) -> onnx.NodeProto:
    """``Scan(x)`` over ``Conv -> BN`` with ``num_scan_inputs`` listed before ``body``."""
    body = GraphBuilder(seed=24)
    y = body.node("Conv", [body.input([1, 3, 4, 4], name="sx"), body.random([4, 3, 1, 1])])
    body.output(body.bn(y, 4, name="inner_bn"), [1, 4, 4, 4])
    graph = oh.make_graph(body.nodes, "body", body.inputs, body.outputs, body.initializers)
    scan = onnx.NodeProto(op_type="Scan", name="scan", input=["x"], output=["y"])
    scan.attribute.extend([num_scan_inputs, oh.make_attribute("body", graph)])
    return scan


@pytest.mark.parametrize("in_function", [False, "called", "uncalled"])
def test_a_subgraph_behind_another_attribute_is_searched_too(in_function):
    """A node's attributes in any order: a Scan whose ``num_scan_inputs`` (a value, or in a
    function a reference to the function's attribute, which stays one where no call gives
    it) comes before its ``body`` still has its body planned."""
    b = GraphBuilder(seed=24)
    b.input([2, 1, 3, 4, 4])
    b.output("y", [2, 1, 4, 4, 4])
    if not in_function:
        b.nodes.append(scan_of_conv_bn(oh.make_attribute("num_scan_inputs", 1)))
        model, where = b.model(), "main/scan.body"
    else:
        ref = oh.make_attribute_ref("num_scan_inputs", onnx.AttributeProto.INT)
        ref.ref_attr_name = "n"
        function = oh.make_function("local.test", "F", ["x"], ["y"], [scan_of_conv_bn(ref)],
                                    [oh.make_opsetid("", 17)], attributes=["n"])
        b.nodes.append(oh.make_node("F", ["x"], ["y"], domain="local.test", n=1) if in_function == "called" else
                       oh.make_node("Identity", ["x"], ["y"]))
        graph = oh.make_graph(b.nodes, "g", b.inputs, b.outputs)
        model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17), oh.make_opsetid("local.test", 1)],
                              functions=[function])
        model.ir_version, where = 9, "function local.test::F/scan.body"
    result = bnfold.fold(model)
    assert [(e.node, e.graph, e.status) for e in result.ledger] == [("inner_bn", where, "folded")]
    if not in_function:  # a subgraph holds initializers: the new bias is one, not a Constant node
        body = result.to_proto().graph.node[0].attribute[1].g
        assert [n.op_type for n in body.node] == ["Conv"] and len(body.initializer) == 2
    feeds = x_feed([2, 1, 3, 4, 4])
    np.testing.assert_allclose(run(result.to_proto(), feeds)[0], run(model, feeds)[0], rtol=1e-4, atol=1e-5)


# --- decompose ---------------------------------------------------------------------------


@pytest.mark.parametrize("version, decomposed", [(9, True), (14, True), (15, False), (None, False)])
def test_decompose_with_an_untyped_input_takes_the_scale_type_before_bn_15(tmp_path, version, decomposed):
    """--decompose-standalone writes the Mul/Add constants in X's type. Where X's type is
    unknown, BatchNormalization before version 15 gives it (X and scale share one type
    there); from 15 on (and with no version, read as the latest) it is unproven: kept."""
    from bnfold.load import load_source
    from bnfold.plan import is_batch_norm

    b = GraphBuilder(seed=7)
    b.output(b.bn(b.node("Relu", [b.input([2, 3, 4, 4])]), 3, name="the_bn"))
    onnx.save(b.model(), tmp_path / "in.onnx")
    source = load_source(tmp_path / "in.onnx")
    bn = next(n for n in source.model.graph if is_batch_norm(n))
    bn.version = version
    bn.inputs[0].type = None
    bn.outputs[0].type = None
    result = bnfold.fold(source, decompose_standalone=True)
    found = entry(result, "the_bn")
    if not decomposed:
        assert (found.status, found.reason) == ("kept", "no-linear-producer")
        return
    assert (found.status, found.pattern) == ("decomposed", "bn-mul-add")
    result.save(tmp_path / "out.onnx")
    feeds = x_feed([2, 3, 4, 4])
    np.testing.assert_allclose(run(tmp_path / "out.onnx", feeds)[0], run(tmp_path / "in.onnx", feeds)[0],
                               rtol=1e-5, atol=1e-5)


def standalone_bn(b: GraphBuilder, training: bool = False) -> onnx.ModelProto:
    """``x -> Relu -> BN(3)``: nothing linear either side; optionally in training form
    (opset 15, ``training_mode=1``, running-stat outputs nobody reads)."""
    y = b.node("Relu", [b.input([2, 3, 4, 4])])
    if not training:
        b.output(b.bn(y, 3, name="the_bn"))
        return b.model()
    b.nodes.append(oh.make_node("BatchNormalization", [y, *b.bn_params(3)], ["out", "rm", "rv"], name="the_bn",
                                training_mode=1))
    b.output("out", [2, 3, 4, 4])
    return b.model(opset=15)


@pytest.mark.parametrize("training", [False, True])
def test_a_decomposed_bn_reports_its_channels_axis_and_conversion(tmp_path, training):
    """The ledger of a decomposed BN says how many channels it had, that they run along
    axis 1, why it was decomposed, and whether --to-inference converted it first."""
    b = GraphBuilder(seed=8)
    model = standalone_bn(b, training)
    onnx.save(model, tmp_path / "in.onnx")
    result = bnfold.fold(tmp_path / "in.onnx", decompose_standalone=True, to_inference=training)
    found = entry(result, "the_bn")
    assert (found.status, found.pattern, found.reason) == ("decomposed", "bn-mul-add", "no-linear-producer")
    assert (found.channels, found.channel_axis, found.converted_from_training) == (3, 1, training)
    assert "input comes from Relu" in found.detail
    if training:  # the reference: the same BN in inference form
        model.graph.node[-1].ClearField("attribute")
        model.graph.node[-1].output[1:] = []
    result.save(tmp_path / "out.onnx")
    feeds = x_feed([2, 3, 4, 4])
    np.testing.assert_allclose(run(tmp_path / "out.onnx", feeds)[0], run(model, feeds)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("known", ["input", "output"])
def test_decompose_takes_the_rank_and_type_from_either_side_of_the_bn(tmp_path, known):
    """The Mul/Add constants need the BN's rank and type: its input's or, failing that, its
    output's (a BN inside a function may know only one of them)."""
    from bnfold.load import load_source
    from bnfold.plan import is_batch_norm

    b = GraphBuilder(seed=9)
    onnx.save(standalone_bn(b), tmp_path / "in.onnx")
    source = load_source(tmp_path / "in.onnx")
    bn = next(n for n in source.model.graph if is_batch_norm(n))
    unknown = [bn.outputs[0]] if known == "input" else [bn.inputs[0], bn.inputs[0].producer().inputs[0]]
    for value in unknown:  # the input's rank would also follow from the Relu's input
        value.type, value.shape = None, None
    result = bnfold.fold(source, decompose_standalone=True)
    assert entry(result, "the_bn").status == "decomposed"
    result.save(tmp_path / "out.onnx")
    feeds = x_feed([2, 3, 4, 4])
    np.testing.assert_allclose(run(tmp_path / "out.onnx", feeds)[0], run(tmp_path / "in.onnx", feeds)[0],
                               rtol=1e-5, atol=1e-5)


# --- --target: the figures of each folded tensor ------------------------------------------


def spread_of(ranges) -> float:
    alive = np.asarray(ranges, dtype=np.float64)[np.asarray(ranges) > 0]
    return float(alive.max() / np.median(alive))


def peak(array) -> float:
    return float(np.abs(np.asarray(array, dtype=np.float64)).max())


def bn_map(model: onnx.ModelProto, bn_name: str):
    """The BN's s and t in float64, as the promise computes them."""
    init = {t.name: onh.to_array(t).astype(np.float64) for t in model.graph.initializer}
    bn = next(n for n in model.graph.node if n.name == bn_name)
    gamma, beta, mean, var = (init[name] for name in bn.input[1:5])
    eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
    scale = gamma / np.sqrt(var + np.float64(np.float32(eps)))
    return scale, beta - mean * scale


def check_figures(figures, role, tensor, node, op, index, shape=None, growth=None, spread=None, scaled=None,
                  out_axis=0):
    assert (figures.role, figures.node, figures.op, figures.input) == (role, node, op, index)
    # the name the tensor had when this fold replaced it (an earlier fold may have renamed it)
    assert figures.tensor.startswith(tensor) and (figures.tensor == "") == (tensor == "")
    if shape is not None:
        assert figures.shape == shape
    if role == "weight":
        assert (figures.channel_axis, figures.scaled) == (out_axis, scaled)
        assert figures.spread.before == pytest.approx(spread[0], rel=1e-6)
        assert figures.spread.after == pytest.approx(spread[1], rel=1e-6)
    assert (figures.growth is None) == (growth is None)
    if growth is not None:
        assert figures.growth == pytest.approx(growth, rel=1e-6)


def test_target_figures_of_folds_after_a_conv(tmp_path):
    """Conv (no bias) -> BN -> Mul: both fold into the conv, one after the other; each fold's
    figures compare the conv's weight and bias before and after that fold."""
    b = GraphBuilder(seed=8)
    y = b.node("Conv", [b.input([2, 3, 5, 5]), b.random([4, 3, 3, 3])], name="conv")
    c = np.float32([1, -2, 3, 0.5])
    b.output(b.node("Mul", [b.bn(y, 4, name="the_bn"), b.const(c.reshape(4, 1, 1))], name="the_mul"))
    model = b.model()
    result, folded = fold_and_compare(model, x_feed([2, 3, 5, 5]), tmp_path, targets=("fp16",))
    w_name = model.graph.node[0].input[1]
    w = onh.to_array(next(t for t in model.graph.initializer if t.name == w_name)).astype(np.float64)
    s, t = bn_map(model, "the_bn")
    w1 = (w * s[:, None, None, None]).astype(np.float32)
    w2 = (w * (s * c)[:, None, None, None]).astype(np.float32)
    rows = lambda a: np.abs(a).reshape(4, -1).max(axis=1)  # noqa: E731
    b1, b2 = t.astype(np.float32), (c * t).astype(np.float32)
    conv = next(n for n in folded.graph.node if n.op_type == "Conv")
    assert len(conv.input) == 3  # the BN gave the conv a bias, which the Mul then scaled

    weight, bias = entry(result, "the_bn").precision.tensors
    check_figures(weight, "weight", w_name, "conv", "Conv", 1, [4, 3, 3, 3], growth=peak(w1) / peak(w),
                  spread=(spread_of(rows(w)), spread_of(rows(w1))), scaled="output")
    check_figures(bias, "bias", "", "conv", "Conv", 2, [4])  # the conv had no bias: no growth

    weight, bias = entry(result, "the_mul").precision.tensors
    check_figures(weight, "weight", w_name, "conv", "Conv", 1, [4, 3, 3, 3], growth=peak(w2) / peak(w1),
                  spread=(spread_of(rows(w1)), spread_of(rows(w2))), scaled="output")
    check_figures(bias, "bias", conv.input[2].split("_bnfold")[0], "conv", "Conv", 2, [4], growth=peak(b2) / peak(b1))


def test_target_figures_of_folds_before_a_conv(tmp_path):
    """``Mul a -> Mul b -> Conv``: both constants fold into the conv's input channels, b
    first (a reaches the conv only once b is gone); a's figures start from the weight b left."""
    b = GraphBuilder(seed=11)
    c, d = np.float32([1, -2, 3]), np.float32([0.5, 4, -1])
    y = b.node("Mul", [b.input([2, 3, 5, 5]), b.const(c.reshape(3, 1, 1))], name="mul_a")
    y = b.node("Mul", [y, b.const(d.reshape(3, 1, 1))], name="mul_b")
    b.output(b.node("Conv", [y, b.random([4, 3, 3, 3])], name="conv"))
    model = b.model()
    result, _ = fold_and_compare(model, x_feed([2, 3, 5, 5]), tmp_path, targets=("fp16",))
    w_name = model.graph.node[-1].input[1]
    w = onh.to_array(next(t for t in model.graph.initializer if t.name == w_name)).astype(np.float64)
    w1 = (w * d[None, :, None, None]).astype(np.float32)
    w2 = (w * (c * d)[None, :, None, None]).astype(np.float32)
    cols = lambda a: np.abs(a).max(axis=(0, 2, 3))  # noqa: E731
    for name, before, after in (("mul_b", w, w1), ("mul_a", w1, w2)):
        weight = entry(result, name).precision.tensors[0]
        check_figures(weight, "weight", w_name, "conv", "Conv", 1, [4, 3, 3, 3], growth=peak(after) / peak(before),
                      spread=(spread_of(cols(before)), spread_of(cols(after))), scaled="input")


def test_target_figures_of_a_grouped_conv_transpose(tmp_path):
    """ConvTranspose(group=2), weight [in, out/group, kh, kw]: output channel ``g*3 + j`` is
    column j of group g's rows, so the factor runs along both leading axes and the spread is
    over their cells, not over the 3 columns alone."""
    b = GraphBuilder(seed=12)
    b.output(b.bn(b.node("ConvTranspose", [b.input([2, 4, 5, 5]), b.random([4, 3, 3, 3])], name="ct", group=2),
                  6, name="the_bn"))
    model = b.model()
    result, _ = fold_and_compare(model, x_feed([2, 4, 5, 5]), tmp_path, targets=("fp16",))
    w_name = model.graph.node[0].input[1]
    w = onh.to_array(next(t for t in model.graph.initializer if t.name == w_name)).astype(np.float64)
    s, _ = bn_map(model, "the_bn")
    factor = s.reshape(2, 1, 3).repeat(2, axis=1).reshape(4, 3)  # row i is in group i // 2
    w1 = (w * factor[:, :, None, None]).astype(np.float32)
    cells = lambda a: np.abs(a).max(axis=(2, 3)).reshape(-1)  # noqa: E731
    weight = entry(result, "the_bn").precision.tensors[0]
    check_figures(weight, "weight", w_name, "ct", "ConvTranspose", 1, [4, 3, 3, 3], growth=peak(w1) / peak(w),
                  spread=(spread_of(cells(w)), spread_of(cells(w1))), scaled="output", out_axis=1)


def test_target_figures_of_a_uniform_fold(tmp_path):
    """A scalar Mul scales every channel alike: the spread runs over the output channels."""
    b = GraphBuilder(seed=10)
    y = b.node("Conv", [b.input([2, 3, 5, 5]), b.random([4, 3, 3, 3])], name="conv")
    b.output(b.node("Mul", [y, b.const(np.float32(-2.5))], name="the_mul"))
    model = b.model()
    result, _ = fold_and_compare(model, x_feed([2, 3, 5, 5]), tmp_path, targets=("fp16",))
    w_name = model.graph.node[0].input[1]
    w = onh.to_array(next(t for t in model.graph.initializer if t.name == w_name)).astype(np.float64)
    rows = np.abs(w).reshape(4, -1).max(axis=1)
    weight = entry(result, "the_mul").precision.tensors[0]
    check_figures(weight, "weight", w_name, "conv", "Conv", 1, [4, 3, 3, 3], growth=2.5,
                  spread=(spread_of(rows), spread_of(rows)), scaled="output")


def test_target_problem_names_the_output_channel_that_overflows(tmp_path):
    """fp16: the one output channel the fold scales past fp16's range is the one named."""
    b = GraphBuilder(seed=11)
    y = b.node("Conv", [b.input([2, 3, 5, 5]), b.random([4, 3, 3, 3])], name="conv")
    c = np.float32([1, 1, 1e6, 1]).reshape(4, 1, 1)
    b.output(b.node("Mul", [y, b.const(c)], name="the_mul"))
    src = tmp_path / "in.onnx"
    onnx.save(b.model(), src)
    (problem,) = entry(bnfold.fold(src, targets=("fp16",)), "the_mul").precision.problems
    assert (problem.code, problem.channels) == ("fp16-overflow", [2])


@pytest.mark.parametrize("op, features", [("Gemm", 3), ("Gemm", 2), ("MatMul", 3)])
def test_target_figures_of_a_fold_before_a_linear_op(tmp_path, op, features):
    """BN -> Gemm (weight [out, in]) or MatMul (weight [in, out], no bias: the shift becomes
    an Add after it): the scale runs along the weight's input channels, the spread over them."""
    b = GraphBuilder(seed=9)
    y = b.bn(b.input([2, features]), features, name="the_bn")
    if op == "Gemm":
        b.output(b.node("Gemm", [y, b.random([4, features]), b.random([4])], name="lin", transB=1))
    else:
        b.output(b.node("MatMul", [y, b.random([features, 4])], name="lin"))
    model = b.model()
    result, _ = fold_and_compare(model, x_feed([2, features]), tmp_path, targets=("fp16",))
    lin = model.graph.node[-1]
    init = {t.name: onh.to_array(t).astype(np.float64) for t in model.graph.initializer}
    s, t = bn_map(model, "the_bn")
    w = init[lin.input[1]] if op == "Gemm" else init[lin.input[1]].T  # as [out, in]
    w1 = (w * s[None, :]).astype(np.float32)
    cols = lambda a: np.abs(a).max(axis=0)  # noqa: E731
    weight, bias = entry(result, "the_bn").precision.tensors
    shape = [4, features] if op == "Gemm" else [features, 4]
    check_figures(weight, "weight", lin.input[1], "lin", op, 1, shape, growth=peak(w1) / peak(w),
                  spread=(spread_of(cols(w)), spread_of(cols(w1))), scaled="input",
                  out_axis=0 if op == "Gemm" else 1)
    if op == "Gemm":
        c = init[lin.input[2]]
        c1 = (c + w @ t).astype(np.float32)
        check_figures(bias, "bias", lin.input[2], "lin", "Gemm", 2, [4], growth=peak(c1) / peak(c))
    else:
        check_figures(bias, "bias", "", "lin", "MatMul", None, [4])


def test_target_figures_of_a_fold_before_a_padded_conv(tmp_path):
    """Before a padded Conv only the scale folds: the weight is measured all the same (its
    input channels scaled), and the shift kept as an Add has its own figures."""
    b = GraphBuilder(seed=17)
    model = bn_then(b, "Identity", False, pads=[1, 1, 1, 1])
    result, _ = fold_and_compare(model, x_feed([2, 3, 6, 6]), tmp_path, targets=("fp16", "int8"))
    conv = model.graph.node[-1]
    w = {t.name: onh.to_array(t).astype(np.float64) for t in model.graph.initializer}[conv.input[1]]
    s, _ = bn_map(model, "the_bn")
    w1 = (w * s[None, :, None, None]).astype(np.float32)
    in_ranges = lambda a: np.abs(a).max(axis=(0, 2, 3))  # noqa: E731
    weight, addend = entry(result, "the_bn").precision.tensors
    check_figures(weight, "weight", conv.input[1], "conv", "Conv", 1, [4, 3, 3, 3], growth=peak(w1) / peak(w),
                  spread=(spread_of(in_ranges(w)), spread_of(in_ranges(w1))), scaled="input")
    check_figures(addend, "addend", "", "the_bn", "BatchNormalization", None, [3, 1, 1])


# --- weights read from the model file -----------------------------------------------------


@pytest.mark.parametrize("offset", [0, 64])
def test_a_weight_in_an_external_file_is_read_from_its_offset(tmp_path, offset):
    """External data is mapped from its offset (0: the file's start) to check the fold."""
    from builders import external

    w = np.random.default_rng(21).standard_normal((4, 3, 3, 3)).astype(np.float32)
    (tmp_path / "w.bin").write_bytes(b"\x7f" * offset + w.tobytes())
    b = GraphBuilder(seed=21)
    y = b.node("Conv", [b.input([2, 3, 5, 5]), "w"])
    b.output(b.bn(y, 4, name="the_bn"))
    b.initializers.append(external("w", [4, 3, 3, 3], offset, "w.bin"))
    model = b.model()
    onnx.save(model, tmp_path / "in.onnx")
    result = bnfold.fold(tmp_path / "in.onnx")
    assert entry(result, "the_bn").status == "folded"
    result.save(tmp_path / "out.onnx")
    feeds = x_feed([2, 3, 5, 5])
    np.testing.assert_allclose(run(tmp_path / "out.onnx", feeds)[0], run(tmp_path / "in.onnx", feeds)[0],
                               rtol=1e-4, atol=1e-5)


def test_a_weight_in_a_file_is_read_through_a_read_only_map(tmp_path):
    """Planning reads external weights through a map that cannot write to the user's file."""
    from bnfold.load import load_source
    from bnfold.plan import weight_array
    from builders import external

    w = np.arange(12, dtype=np.float32).reshape(4, 3, 1, 1)
    (tmp_path / "w.bin").write_bytes(w.tobytes())
    b = GraphBuilder(seed=22)
    b.output(b.node("Conv", [b.input([2, 3, 5, 5]), "w"]))
    b.initializers.append(external("w", [4, 3, 1, 1], 0, "w.bin"))
    onnx.save(b.model(), tmp_path / "in.onnx")
    conv = next(iter(load_source(tmp_path / "in.onnx").model.graph))
    array = weight_array(conv.inputs[1].const_value)
    np.testing.assert_array_equal(array, w)
    assert not array.flags.writeable


def test_a_model_file_replaced_before_planning_is_an_error_not_wrong_weights(tmp_path):
    """Large weights are read from the model file while planning: a file replaced since it
    was loaded is refused, never read as the weights."""
    from bnfold.load import load_source

    def model(seed):
        b = GraphBuilder(seed=seed)
        y = b.node("Conv", [b.input([1, 16, 4, 4]), b.random([16, 16, 9, 9])], pads=[4, 4, 4, 4])
        b.output(b.bn(y, 16, name="the_bn"))
        return b.model()

    path = tmp_path / "in.onnx"
    onnx.save(model(1), path)
    source = load_source(path)
    onnx.save(model(2), tmp_path / "other.onnx")
    (tmp_path / "other.onnx").replace(path)
    with pytest.raises(InputError, match="changed after it was loaded"):
        bnfold.fold(source)
