"""Every legality rule: the BN stays, the ledger names the rule, outputs still match."""

import numpy as np
import onnx
import onnx.helper as oh
import pytest

import bnfold
from builders import GraphBuilder, count_ops, fold_and_compare


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
