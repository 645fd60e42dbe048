"""`inspect`: each inference-readiness problem is flagged with its own code."""

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import bnfold
from builders import GraphBuilder


def conv_bn_model(var=None, mean=None, opset=17, **bn_attrs) -> tuple[GraphBuilder, onnx.ModelProto]:
    b = GraphBuilder(seed=1)
    x = b.input([2, 3, 5, 5])
    y = b.node("Conv", [x, b.random([4, 3, 3, 3])])
    gamma, beta, mean_name, var_name = b.bn_params(4)
    if var is not None:
        var_name = b.const(np.asarray(var, np.float32))
    if mean is not None:
        mean_name = b.const(np.asarray(mean, np.float32))
    b.output(b.node("BatchNormalization", [y, gamma, beta, mean_name, var_name], name="bn", **bn_attrs))
    return b, b.model(opset=opset)


def only_finding(model):
    (finding,) = bnfold.inspect(ir.serde.deserialize_model(model))
    return finding


def test_healthy_bn_is_ready_and_plans_a_fold():
    _, model = conv_bn_model()
    finding = only_finding(model)
    assert finding.ok and finding.problems == []
    assert finding.plan.startswith("fold into Conv") and finding.fold_reason is None


@pytest.mark.parametrize(
    "var,mean,problem",
    [
        ([1, 1, 1, 1], [0, 0, 0, 0], "untrained-stats"),
        ([0.5, 0.0, 1.0, 1.0], None, "zero-variance"),
        ([0.5, 1e-7, 1.0, 1.0], None, "tiny-variance"),
        ([0.5, -1.0, 1.0, 1.0], None, "negative-variance"),
        ([0.5, np.nan, 1.0, 1.0], None, "non-finite-stats"),
    ],
)
def test_unhealthy_statistics(var, mean, problem):
    _, model = conv_bn_model(var=var, mean=mean)
    finding = only_finding(model)
    assert not finding.ok
    assert problem in finding.problems


def test_partly_zero_mean_with_unit_variance_is_not_untrained():
    _, model = conv_bn_model(var=[1, 1, 1, 1], mean=[0, 0.1, 0, 0])
    assert only_finding(model).ok


def test_training_mode_is_flagged():
    b = GraphBuilder(seed=2)
    x = b.input([2, 3, 5, 5])
    y = b.node("Conv", [x, b.random([4, 3, 3, 3])])
    out, _, _ = b.node("BatchNormalization", [y, *b.bn_params(4)], n_out=3, name="bn", training_mode=1)
    b.output(out)
    finding = only_finding(b.model(opset=15))
    assert "training-mode" in finding.problems
    assert finding.fold_reason == "training-mode"


def test_batch_statistics_computed_in_graph_are_flagged():
    b = GraphBuilder(seed=3)
    x = b.input([2, 3, 5, 5])
    y = b.node("Conv", [x, b.random([4, 3, 3, 3])])
    gamma, beta, _, _ = b.bn_params(4)
    mean = b.node("ReduceMean", [y], axes=[0, 2, 3], keepdims=0)
    centred = b.node("Sub", [y, b.node("Unsqueeze", [mean, b.const(np.array([0, 2, 3], np.int64))])])
    var = b.node("ReduceMean", [b.node("Mul", [centred, centred])], axes=[0, 2, 3], keepdims=0)
    b.output(b.node("BatchNormalization", [y, gamma, beta, mean, var], name="bn"))
    finding = only_finding(b.model())
    assert finding.problems == ["batch-statistics"]
    assert finding.fold_reason == "non-constant-params"


def test_stats_fed_as_graph_inputs_are_flagged():
    b = GraphBuilder(seed=4)
    x = b.input([2, 3, 5, 5])
    y = b.node("Conv", [x, b.random([4, 3, 3, 3])])
    gamma, beta, mean, _ = b.bn_params(4)
    b.output(b.node("BatchNormalization", [y, gamma, beta, mean, b.input([4], name="var")], name="bn"))
    assert only_finding(b.model()).problems == ["stats-as-inputs"]


def test_inspect_agrees_with_fold_on_kept_bns():
    b = GraphBuilder(seed=5)
    x = b.input([2, 3, 5, 5])
    y = b.node("Conv", [x, b.random([4, 3, 3, 3])])
    b.output(b.bn(y, 4, name="bn"))
    b.output(y)  # the conv output is a graph output: the BN cannot fold
    model = ir.serde.deserialize_model(b.model())
    (finding,) = bnfold.inspect(model)
    (entry,) = bnfold.fold(model).ledger
    assert finding.ok and finding.fold_reason == entry.reason == "graph-output"
