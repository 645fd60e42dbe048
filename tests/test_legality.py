"""Every legality rule: the BN stays, the ledger names the rule, outputs still match."""

import numpy as np
import onnx
import onnx.helper as oh
import pytest

import bnfold
from builders import GraphBuilder, count_ops, fold_and_compare, run


def conv_bn(b: GraphBuilder, x: str, c_out: int = 4, c_in: int = 3) -> tuple[str, str]:
    y = b.node("Conv", [x, b.random([c_out, c_in, 3, 3])], pads=[1, 1, 1, 1])
    return y, b.bn(y, c_out, name="the_bn")


def feeds_for(b: GraphBuilder, shape=(2, 3, 5, 5)):
    return {"x": b.rng.standard_normal(shape).astype(np.float32)}


def assert_kept(result, reason: str, folded: onnx.ModelProto | None = None):
    (entry,) = [e for e in result.ledger if e.node == "the_bn"]
    assert entry.status == "kept" and entry.reason == reason, entry
    assert entry.detail, "a kept BN must say why in words too"
    if folded is not None:
        assert count_ops(folded, "BatchNormalization") == 1


def test_fan_out(tmp_path):
    b = GraphBuilder(seed=1)
    y, out = conv_bn(b, b.input([2, 3, 5, 5]))
    b.output(out)
    b.output(b.node("Relu", [y]))
    result, folded = fold_and_compare(b.model(), feeds_for(b), tmp_path)
    assert_kept(result, "fan-out", folded)


def test_producer_output_is_graph_output(tmp_path):
    b = GraphBuilder(seed=2)
    y, out = conv_bn(b, b.input([2, 3, 5, 5]))
    b.output(out)
    b.output(y)
    result, folded = fold_and_compare(b.model(), feeds_for(b), tmp_path)
    assert_kept(result, "graph-output", folded)


def test_relu_between_is_not_folded_across(tmp_path):
    b = GraphBuilder(seed=3)
    x = b.input([2, 3, 5, 5])
    y = b.node("Relu", [b.node("Conv", [x, b.random([4, 3, 3, 3])])])
    b.output(b.bn(y, 4, name="the_bn"))
    result, folded = fold_and_compare(b.model(), feeds_for(b), tmp_path)
    assert_kept(result, "no-linear-producer", folded)


def test_bn_on_graph_input(tmp_path):
    b = GraphBuilder(seed=4)
    b.output(b.bn(b.input([2, 3, 5, 5]), 3, name="the_bn"))
    result, folded = fold_and_compare(b.model(), feeds_for(b), tmp_path)
    assert_kept(result, "no-linear-producer", folded)


def test_stats_as_graph_inputs(tmp_path):
    b = GraphBuilder(seed=5)
    x = b.input([2, 3, 5, 5])
    y = b.node("Conv", [x, b.random([4, 3, 3, 3])])
    gamma, beta, mean, _ = b.bn_params(4)
    var = b.input([4], name="running_var")
    b.output(b.node("BatchNormalization", [y, gamma, beta, mean, var], name="the_bn"))
    feeds = {**feeds_for(b), "running_var": np.full(4, 0.5, np.float32)}
    result, folded = fold_and_compare(b.model(), feeds, tmp_path)
    assert_kept(result, "non-constant-params", folded)


def test_stats_computed_in_graph(tmp_path):
    b = GraphBuilder(seed=6)
    x = b.input([2, 3, 5, 5])
    y = b.node("Conv", [x, b.random([4, 3, 3, 3])])
    gamma, beta, _, var = b.bn_params(4)
    mean = b.node("ReduceMean", [y], axes=[0, 2, 3], keepdims=0)
    b.output(b.node("BatchNormalization", [y, gamma, beta, mean, var], name="the_bn"))
    result, folded = fold_and_compare(b.model(), feeds_for(b), tmp_path)
    assert_kept(result, "non-constant-params", folded)


def test_overridable_initializer_is_not_folded_in_ir4(tmp_path):
    b = GraphBuilder(seed=7)
    _, out = conv_bn(b, b.input([2, 3, 5, 5]))
    b.output(out)
    model = b.model()
    mean = model.graph.node[-1].input[3]
    model.graph.input.append(oh.make_tensor_value_info(mean, onnx.TensorProto.FLOAT, [4]))
    result, folded = fold_and_compare(model, feeds_for(b), tmp_path)
    assert_kept(result, "overridable-params", folded)


def test_ir3_initializers_listed_as_inputs_are_constants(tmp_path):
    b = GraphBuilder(seed=8)
    _, out = conv_bn(b, b.input([2, 3, 5, 5]))
    b.output(out, shape=[2, 4, 5, 5])  # IR 3 shape inference cannot see initializers
    model = b.model(opset=8, ir_version=3)
    for init in model.graph.initializer:
        model.graph.input.append(oh.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    result, folded = fold_and_compare(model, feeds_for(b), tmp_path)
    assert result.ledger.entries[0].folded
    names = {i.name for i in folded.graph.input}
    assert names == {"x"} | {init.name for init in folded.graph.initializer}, "stale inputs must be dropped"


def test_weight_as_graph_input(tmp_path):
    b = GraphBuilder(seed=9)
    x = b.input([2, 3, 5, 5])
    w = b.input([4, 3, 3, 3], name="w")
    b.output(b.bn(b.node("Conv", [x, w]), 4, name="the_bn"))
    feeds = {**feeds_for(b), "w": b.rng.standard_normal((4, 3, 3, 3)).astype(np.float32)}
    result, folded = fold_and_compare(b.model(), feeds, tmp_path)
    assert_kept(result, "non-constant-weights", folded)


def test_training_mode_bn_is_never_folded():
    b = GraphBuilder(seed=10)
    x = b.input([2, 3, 5, 5])
    y = b.node("Conv", [x, b.random([4, 3, 3, 3])])
    out, _, _ = b.node("BatchNormalization", [y, *b.bn_params(4)], n_out=3, name="the_bn", training_mode=1)
    b.output(out)
    result = bnfold.fold(_ir(b.model(opset=15)))
    assert_kept(result, "training-mode")


def test_opset9_running_stat_outputs_mean_training():
    b = GraphBuilder(seed=11)
    x = b.input([2, 3, 5, 5])
    y = b.node("Conv", [x, b.random([4, 3, 3, 3])])
    out, running_mean, *_ = b.node("BatchNormalization", [y, *b.bn_params(4)], n_out=5, name="the_bn")
    b.output(out)
    b.output(running_mean, shape=[4])
    result = bnfold.fold(_ir(b.model(opset=9)))
    assert_kept(result, "training-mode")
    assert "used" in result.ledger.entries[0].detail


def test_spatial_0_is_refused(tmp_path):
    b = GraphBuilder(seed=12)
    y, out = conv_bn(b, b.input([2, 3, 5, 5]))
    b.nodes[-1].attribute.append(oh.make_attribute("spatial", 0))
    b.output(out)
    result = bnfold.fold(_ir(b.model(opset=7)))
    assert_kept(result, "spatial-0")


@pytest.mark.parametrize("bad", ["nan-mean", "inf-gamma"])
def test_non_finite_params(tmp_path, bad):
    b = GraphBuilder(seed=13)
    _, out = conv_bn(b, b.input([2, 3, 5, 5]))
    b.output(out)
    model = b.model()
    role = {"nan-mean": 3, "inf-gamma": 1}[bad]
    _poison(model, model.graph.node[-1].input[role], np.nan if bad == "nan-mean" else np.inf)
    result = bnfold.fold(_ir(model))
    assert_kept(result, "non-finite-params")


def test_negative_variance_keeps_bn(tmp_path):
    b = GraphBuilder(seed=14)
    _, out = conv_bn(b, b.input([2, 3, 5, 5]))
    b.output(out)
    model = b.model()
    _poison(model, model.graph.node[-1].input[4], -0.5)
    result = bnfold.fold(_ir(model))
    assert_kept(result, "negative-variance")


def test_matmul_3d_activation_channel_is_not_bn_channel(tmp_path):
    b = GraphBuilder(seed=15)
    x = b.input([2, 3, 4])
    y = b.node("MatMul", [x, b.random([4, 3])])
    b.output(b.bn(y, 3, name="the_bn"))
    result, folded = fold_and_compare(b.model(), feeds_for(b, (2, 3, 4)), tmp_path)
    assert_kept(result, "channel-axis-mismatch", folded)


def test_matmul_rank_unknown_is_not_guessed(tmp_path):
    b = GraphBuilder(seed=16)
    x = b.input(None)
    y = b.node("MatMul", [x, b.random([4, 3])])
    b.output(b.bn(y, 3, name="the_bn"), shape=[2, 3])
    result = bnfold.fold(_ir(b.model()))
    assert_kept(result, "unknown-rank")


def test_matmul_bias_varying_along_rows_is_not_per_channel(tmp_path):
    b = GraphBuilder(seed=17)
    x = b.input([2, 4])
    y = b.node("Add", [b.node("MatMul", [x, b.random([4, 3])]), b.random([2, 3])])
    b.output(b.bn(y, 3, name="the_bn"))
    result, folded = fold_and_compare(b.model(), feeds_for(b, (2, 4)), tmp_path)
    assert_kept(result, "non-channel-constant", folded)


def test_fp16_fold_that_would_overflow_keeps_bn(tmp_path):
    b = GraphBuilder(dtype=np.float16, seed=18)
    x = b.input([1, 3, 5, 5])
    y = b.node("Conv", [x, b.const(np.full((4, 3, 3, 3), 60000, np.float16))])
    gamma, beta, mean, _ = b.bn_params(4)
    var = b.const(np.full(4, 1e-4, np.float16))
    b.output(b.node("BatchNormalization", [y, gamma, beta, mean, var], name="the_bn"))
    model = b.model()
    result = bnfold.fold(_ir(model))
    assert_kept(result, "dtype-overflow")


def test_kept_bns_leave_the_model_unchanged(tmp_path):
    """With nothing foldable, the saved model has the same nodes and initializers."""
    b = GraphBuilder(seed=20)
    y, out = conv_bn(b, b.input([2, 3, 5, 5]))
    b.output(out)
    b.output(y)
    model = b.model()
    _, folded = fold_and_compare(model, feeds_for(b), tmp_path)
    assert [n.op_type for n in folded.graph.node] == [n.op_type for n in model.graph.node]
    assert sorted(i.name for i in folded.graph.initializer) == sorted(i.name for i in model.graph.initializer)


def _ir(model: onnx.ModelProto):
    import onnx_ir as ir

    return ir.serde.deserialize_model(model)


def _poison(model: onnx.ModelProto, name: str, value: float) -> None:
    init = next(i for i in model.graph.initializer if i.name == name)
    array = onnx.numpy_helper.to_array(init).copy()
    array[0] = value
    init.CopyFrom(onnx.numpy_helper.from_array(array, name))


def fold_and_run(model: onnx.ModelProto, feeds, tmp_path):
    """Fold a model onnx's full check would refuse (values with no shape at all), and
    compare the outputs in onnxruntime."""
    onnx.save(model, tmp_path / "m.onnx")
    result = bnfold.fold(tmp_path / "m.onnx")
    result.save(tmp_path / "out.onnx")
    for want, got in zip(run(tmp_path / "m.onnx", feeds), run(tmp_path / "out.onnx", feeds)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    return result, onnx.load(tmp_path / "out.onnx")


@pytest.mark.parametrize("role", ["weight", "bias"])
def test_non_finite_linear_parameters_keep_the_bn(tmp_path, role):
    """A fold would write NaN or infinity into the weights: the BN stays."""
    b = GraphBuilder(seed=30)
    y = b.node("Conv", [b.input([2, 3, 5, 5]), b.random([4, 3, 3, 3]), b.random([4])], pads=[1, 1, 1, 1])
    b.output(b.bn(y, 4, name="the_bn"))
    model = b.model()
    conv = model.graph.node[0]
    _poison(model, conv.input[1] if role == "weight" else conv.input[2], np.inf if role == "weight" else np.nan)
    assert_kept(bnfold.fold(_ir(model)), "non-finite-params")


def test_a_producer_whose_one_channel_was_squeezed_away(tmp_path):
    """``Conv(1 channel) -> Squeeze(1) -> BN(8)``: the BN normalises what was the height."""
    b = GraphBuilder(seed=31)
    y = b.node("Conv", [b.input([2, 3, 8, 8]), b.random([1, 3, 1, 1])])
    y = b.node("Squeeze", [y, b.const(np.array([1]))])
    b.output(b.bn(y, 8, name="the_bn"))
    result, folded = fold_and_compare(b.model(), feeds_for(b, (2, 3, 8, 8)), tmp_path)
    assert_kept(result, "channel-axis-mismatch", folded)


def test_a_constant_add_whose_shift_cannot_cross_stays(tmp_path):
    """``x + c`` before an AveragePool that counts its zero padding and a conv: the shift
    would not reach the border, and a Mul/Add site cannot leave it behind as an Add."""
    b = GraphBuilder(seed=32)
    y = b.node("Add", [b.input([2, 3, 5, 5]), b.const(np.arange(1, 4, dtype=np.float32).reshape(1, 3, 1, 1))],
               name="the_bn")
    y = b.node("AveragePool", [y], kernel_shape=[3, 3], pads=[1, 1, 1, 1], count_include_pad=1)
    b.output(b.node("Conv", [y, b.random([4, 3, 1, 1])]))
    result, folded = fold_and_compare(b.model(), feeds_for(b), tmp_path)
    assert_kept(result, "shift-not-crossing")
    assert count_ops(folded, "Add") == 1


def positive_bn(b: GraphBuilder, x: str, c: int) -> str:
    params = [b.const(a.astype(np.float32)) for a in (b.rng.uniform(0.5, 2, c), b.rng.standard_normal(c),
                                                      b.rng.standard_normal(c), b.rng.uniform(0.5, 2, c))]
    return b.node("BatchNormalization", [x, *params], name="the_bn")


def test_the_shift_left_behind_needs_a_known_rank(tmp_path):
    """``BN -> MaxPool -> padded Conv`` on a tensor of unknown rank: the shift would stay
    as an Add shaped for that rank, which cannot be proven: the BN stays."""
    b = GraphBuilder(seed=33)
    y = b.node("MaxPool", [positive_bn(b, b.input(None), 3)], kernel_shape=[2, 2])
    b.output(b.node("Conv", [y, b.random([4, 3, 3, 3])], pads=[1, 1, 1, 1]), shape=None)
    result, _ = fold_and_run(b.model(), feeds_for(b, (2, 3, 6, 6)), tmp_path)
    assert_kept(result, "unknown-rank")


def test_decompose_needs_the_rank(tmp_path):
    """--decompose-standalone writes constants shaped for the BN's input rank: with the rank
    unknown the BN is kept, never decomposed with a guessed shape."""
    b = GraphBuilder(seed=34)
    b.output(b.node("Relu", [b.bn(b.node("Relu", [b.input(None)]), 3, name="the_bn")]), shape=None)
    model = b.model()
    onnx.save(model, tmp_path / "m.onnx")
    assert_kept(bnfold.fold(tmp_path / "m.onnx", decompose_standalone=True), "no-linear-producer")
    b2 = GraphBuilder(seed=34)
    b2.output(b2.node("Relu", [b2.bn(b2.node("Relu", [b2.input([2, 3, 4, 4])]), 3, name="the_bn")]))
    result, folded = fold_and_compare(b2.model(), feeds_for(b2, (2, 3, 4, 4)), tmp_path)
    assert count_ops(folded, "BatchNormalization") == 1  # decomposing is opt-in
    onnx.save(b2.model(), tmp_path / "m2.onnx")
    (entry,) = [e for e in bnfold.fold(tmp_path / "m2.onnx", decompose_standalone=True).ledger if e.node == "the_bn"]
    assert entry.status == "decomposed"


def test_a_channel_constant_on_a_tensor_of_unknown_rank_before_a_matmul_stays(tmp_path):
    """``x * c -> MatMul`` with ``c`` of shape [4] and ``x`` of unknown rank: ``x`` may be
    ``[.., 1]`` and the Mul broadcast it to ``[.., 4]``, so removing the Mul could change the
    output's shape: the Mul stays (a scalar constant folds)."""
    for constant, status in ((np.array([0.5, 2.0, -1.5, 3.0], np.float32), "kept"), (np.float32(1.5), "folded")):
        b = GraphBuilder(seed=35)
        y = b.node("Mul", [b.input(None), b.const(constant)], name="the_bn")
        b.output(b.node("MatMul", [y, b.random([4, 3])]), shape=None)
        result, folded = fold_and_run(b.model(), feeds_for(b, (5, 4)), tmp_path)
        (entry,) = [e for e in result.ledger if e.node == "the_bn"]
        assert entry.status == status, entry.detail
        assert count_ops(folded, "Mul") == (status == "kept")
        if status == "kept":
            assert entry.reason == "non-channel-constant"


def _legacy_scaled_matmul(**broadcast):
    """Opset 6: ``x[2,4,4] @ W * c[4]`` with Mul-6's ``broadcast`` attributes."""
    b = GraphBuilder(seed=91)
    y = b.node("MatMul", [b.input([2, 4, 4]), b.random([4, 4])])
    b.output(b.node("Mul", [y, b.const(np.arange(1, 5, dtype=np.float32))], name="scale", **broadcast))
    return b.model(6)


def test_an_opset_6_broadcast_from_an_axis_is_no_channel_map(tmp_path):
    """Mul-6 with ``broadcast=1, axis=1`` lines ``c[4]`` up with axis 1 (a row scale of each
    matrix), not with the last axis as numpy does: folding it into the MatMul's columns would
    be wrong, so the Mul is an op bnfold does not know and the model stays as it is.
    Without ``axis`` the constant lines up from the right, a column scale, and folds."""
    onnx.save(_legacy_scaled_matmul(broadcast=1, axis=1), tmp_path / "axis.onnx")
    result = bnfold.fold(tmp_path / "axis.onnx")
    assert [e for e in result.ledger if e.status == "folded"] == []
    result.save(tmp_path / "axis.out.onnx")
    assert count_ops(onnx.load(tmp_path / "axis.out.onnx"), "Mul") == 1
    onnx.save(_legacy_scaled_matmul(broadcast=1), tmp_path / "suffix.onnx")
    result = bnfold.fold(tmp_path / "suffix.onnx")
    assert [e.status for e in result.ledger if e.node == "scale"] == ["folded"]


@pytest.mark.parametrize("broadcast", [{"broadcast": 0}, {}])
def test_an_opset_6_axis_without_broadcasting_is_a_channel_map(tmp_path, broadcast):
    """An ``axis`` without ``broadcast=1`` broadcasts nothing (Mul-6 then needs equal
    shapes): ``y[1,4] * c[1,4]`` scales y's columns, and folds into the MatMul."""
    b = GraphBuilder(seed=92)
    y = b.node("MatMul", [b.input([1, 3]), b.random([3, 4])])
    b.output(b.node("Mul", [y, b.const(np.arange(1, 5, dtype=np.float32).reshape(1, 4))], name="scale", axis=0,
                    **broadcast))
    onnx.save(b.model(6), tmp_path / "m.onnx")
    result = bnfold.fold(tmp_path / "m.onnx")
    assert [e.status for e in result.ledger if e.node == "scale"] == ["folded"]
