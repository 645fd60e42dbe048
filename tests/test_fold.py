"""Every supported pattern folds, and the folded model matches the original in onnxruntime.

Both sides run with ORT_DISABLE_ALL (see builders.run). Shapes, groups, strides,
dilations, pads, transB, alpha/beta, epsilon and dtypes are drawn by hypothesis.
"""

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as onh
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bnfold
from builders import GraphBuilder, count_ops, fold_and_compare, run

PROPERTY = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
TOLERANCE = {np.float32: (1e-4, 1e-5), np.float64: (1e-9, 1e-10), np.float16: (1e-2, 1e-2)}


def tolerance(dtype, expected_scale: float = 1.0):
    rtol, atol = TOLERANCE[dtype]
    return rtol, atol * max(1.0, expected_scale)


def assert_single_fold(result, pattern: str):
    entries = list(result.ledger)
    assert len(entries) == 1
    entry = entries[0]
    assert entry.status == "folded", entry
    assert entry.pattern == pattern
    assert entry.max_rel_weight_change is not None and entry.max_rel_weight_change >= 0


def compare(model, feeds, tmp_path, dtype=np.float32):
    expected = run(model, feeds)
    scale = max(float(np.max(np.abs(e.astype(np.float64)))) for e in expected)
    rtol, atol = tolerance(dtype, scale)
    result, folded = fold_and_compare(model, feeds, tmp_path, rtol=rtol, atol=atol)
    assert count_ops(folded, "BatchNormalization") == 0
    return result, folded


@st.composite
def conv_configs(draw, transpose: bool = False):
    dims = draw(st.integers(1, 3))
    groups = draw(st.sampled_from([1, 2, 4]))
    in_per_group = draw(st.integers(1, 3))
    out_per_group = draw(st.integers(1, 3))
    if draw(st.booleans()):  # depthwise
        in_per_group = 1
        out_per_group = draw(st.sampled_from([1, 2]))
    kernel = draw(st.lists(st.integers(1, 3), min_size=dims, max_size=dims))
    strides = draw(st.lists(st.integers(1, 2), min_size=dims, max_size=dims))
    dilations = draw(st.lists(st.integers(1, 2), min_size=dims, max_size=dims))
    padding = draw(st.sampled_from(["explicit", "SAME_UPPER", "SAME_LOWER", "VALID"]))
    pads = draw(st.lists(st.integers(0, 2), min_size=2 * dims, max_size=2 * dims))
    if padding.startswith("SAME"):
        dilations = [1] * dims  # onnxruntime rejects dilation with SAME_* auto_pad
    size = [(k - 1) * d + 1 + draw(st.integers(0, 3)) for k, d in zip(kernel, dilations)]
    return dict(
        dims=dims, groups=groups, in_per_group=in_per_group, out_per_group=out_per_group,
        kernel=kernel, strides=strides, dilations=dilations, padding=padding, pads=pads, size=size,
        bias=draw(st.booleans()), epsilon=draw(st.sampled_from([1e-5, 1e-3, 0.1])),
        dtype=draw(st.sampled_from([np.float32, np.float16])), batch=draw(st.integers(1, 2)),
        seed=draw(st.integers(0, 2**16)),
    )


def build_conv(cfg, transpose: bool):
    b = GraphBuilder(dtype=cfg["dtype"], seed=cfg["seed"])
    c_in = cfg["groups"] * cfg["in_per_group"]
    c_out = cfg["groups"] * cfg["out_per_group"]
    x = b.input([cfg["batch"], c_in, *cfg["size"]])
    if transpose:
        weight_shape = [c_in, cfg["out_per_group"], *cfg["kernel"]]
    else:
        weight_shape = [c_out, cfg["in_per_group"], *cfg["kernel"]]
    inputs = [x, b.random(weight_shape)] + ([b.random([c_out])] if cfg["bias"] else [])
    attrs = dict(group=cfg["groups"], strides=cfg["strides"], dilations=cfg["dilations"])
    if cfg["padding"] == "explicit":
        attrs["pads"] = cfg["pads"]
        if transpose:  # pads shrink a transposed output; keep it non-empty
            reach = [(k - 1) * d // 2 for k, d in zip(cfg["kernel"], cfg["dilations"])] * 2
            attrs["pads"] = [min(p, r) for p, r in zip(cfg["pads"], reach)]
    elif not (transpose and cfg["padding"] != "VALID"):
        attrs["auto_pad"] = cfg["padding"]
    y = b.node("ConvTranspose" if transpose else "Conv", inputs, **attrs)
    b.output(b.bn(y, c_out, epsilon=cfg["epsilon"]))
    feeds = {"x": b.rng.standard_normal([cfg["batch"], c_in, *cfg["size"]]).astype(cfg["dtype"])}
    return b.model(), feeds


@PROPERTY
@given(conv_configs())
def test_conv_bn_folds(tmp_path_factory, cfg):
    model, feeds = build_conv(cfg, transpose=False)
    result, _ = compare(model, feeds, tmp_path_factory.mktemp("conv"), cfg["dtype"])
    assert_single_fold(result, "conv-bn")


@PROPERTY
@given(conv_configs())
def test_convtranspose_bn_folds(tmp_path_factory, cfg):
    model, feeds = build_conv(cfg, transpose=True)
    result, _ = compare(model, feeds, tmp_path_factory.mktemp("convt"), cfg["dtype"])
    assert_single_fold(result, "convtranspose-bn")


@pytest.mark.parametrize("groups,in_per_group,out_per_group", [(1, 3, 2), (2, 2, 3), (4, 1, 2), (4, 1, 1)])
def test_convtranspose_groups_named_in_the_issue(tmp_path, groups, in_per_group, out_per_group):
    cfg = dict(dims=2, groups=groups, in_per_group=in_per_group, out_per_group=out_per_group,
               kernel=[3, 3], strides=[2, 2], dilations=[1, 1], padding="explicit", pads=[1, 1, 1, 1],
               size=[5, 5], bias=True, epsilon=1e-5, dtype=np.float32, batch=2, seed=groups)
    model, feeds = build_conv(cfg, transpose=True)
    result, _ = compare(model, feeds, tmp_path)
    assert_single_fold(result, "convtranspose-bn")


@PROPERTY
@given(
    trans_a=st.booleans(), trans_b=st.booleans(),
    alpha=st.sampled_from([1.0, 0.5, -2.0]), beta=st.sampled_from([1.0, 0.0, 0.3, 2.5]),
    c_shape=st.sampled_from([None, (), (1,), "N", "1N", "MN", "M1"]),
    m=st.integers(1, 4), k=st.integers(1, 5), n=st.integers(1, 6),
    dtype=st.sampled_from([np.float32, np.float64, np.float16]), seed=st.integers(0, 2**16),
)
def test_gemm_bn_folds(tmp_path_factory, trans_a, trans_b, alpha, beta, c_shape, m, k, n, dtype, seed):
    b = GraphBuilder(dtype=dtype, seed=seed)
    x = b.input([k, m] if trans_a else [m, k])
    shape = {None: None, (): (), (1,): (1,), "N": (n,), "1N": (1, n), "MN": (m, n), "M1": (m, 1)}[c_shape]
    inputs = [x, b.random([n, k] if trans_b else [k, n])] + ([b.random(shape)] if shape is not None else [])
    y = b.node("Gemm", inputs, transA=int(trans_a), transB=int(trans_b), alpha=alpha, beta=beta)
    b.output(b.bn(y, n))
    feeds = {"x": b.rng.standard_normal([k, m] if trans_a else [m, k]).astype(dtype)}
    result, folded = compare(b.model(), feeds, tmp_path_factory.mktemp("gemm"), dtype)
    assert_single_fold(result, "gemm-bn")
    gemm = next(node for node in folded.graph.node if node.op_type == "Gemm")
    assert {a.name: oh.get_attribute_value(a) for a in gemm.attribute}.get("beta", 1.0) == 1.0


@PROPERTY
@given(
    with_bias=st.sampled_from([None, "N", "1N", "scalar", "bias-first"]),
    m=st.integers(1, 4), k=st.integers(1, 5), n=st.integers(1, 6),
    dtype=st.sampled_from([np.float32, np.float64]), seed=st.integers(0, 2**16),
)
def test_matmul_bn_folds(tmp_path_factory, with_bias, m, k, n, dtype, seed):
    b = GraphBuilder(dtype=dtype, seed=seed)
    x = b.input([m, k])
    y = b.node("MatMul", [x, b.random([k, n])])
    if with_bias is not None:
        bias = b.random({"N": [n], "1N": [1, n], "scalar": [], "bias-first": [n]}[with_bias])
        y = b.node("Add", [bias, y] if with_bias == "bias-first" else [y, bias])
    b.output(b.bn(y, n))
    feeds = {"x": b.rng.standard_normal([m, k]).astype(dtype)}
    result, folded = compare(b.model(), feeds, tmp_path_factory.mktemp("mm"), dtype)
    assert_single_fold(result, "matmul-bn" if with_bias is None else "matmul-add-bn")
    assert [node.op_type for node in folded.graph.node] == ["MatMul", "Add"]


def test_parameters_from_constant_nodes(tmp_path):
    """Weights, bias and all four BN parameters given by Constant nodes, not initializers."""
    rng = np.random.default_rng(3)

    def constant(name, array):
        return oh.make_node("Constant", [], [name], value=onh.from_array(array.astype(np.float32), name + "_t"))

    nodes = [
        constant("w", rng.standard_normal((4, 3, 3, 3))), constant("b", rng.standard_normal(4)),
        constant("g", rng.uniform(0.5, 2, 4)), constant("be", rng.standard_normal(4)),
        constant("mu", rng.standard_normal(4)), constant("var", rng.uniform(0.5, 2, 4)),
        oh.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        oh.make_node("BatchNormalization", ["c", "g", "be", "mu", "var"], ["y"], name="bn"),
    ]
    graph = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 5, 5])],
                          [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4, 5, 5])])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=9)
    feeds = {"x": rng.standard_normal((1, 3, 5, 5)).astype(np.float32)}
    result, folded = compare(model, feeds, tmp_path)
    assert_single_fold(result, "conv-bn")
    assert count_ops(folded, "Constant") == 0, "orphaned Constant nodes must be removed"


@pytest.mark.parametrize("opset", [7, 9, 14, 15])
def test_batchnorm_opset_versions(tmp_path, opset):
    b = GraphBuilder(seed=opset)
    x = b.input([2, 3, 4, 4])
    y = b.node("Conv", [x, b.random([5, 3, 3, 3])])
    b.output(b.bn(y, 5))
    result, _ = compare(b.model(opset=opset), {"x": b.rng.standard_normal((2, 3, 4, 4)).astype(np.float32)}, tmp_path)
    assert_single_fold(result, "conv-bn")


def test_opset6_is_test_bn_folds(tmp_path):
    b = GraphBuilder(seed=6)
    x = b.input([2, 3, 4, 4])
    y = b.node("Conv", [x, b.random([5, 3, 3, 3])])
    b.output(b.bn(y, 5, is_test=1))
    model = b.model(opset=6, ir_version=3)
    result = bnfold.fold(onnx_ir_model(model))
    assert_single_fold(result, "conv-bn")


def onnx_ir_model(model):
    import onnx_ir as ir

    return ir.serde.deserialize_model(model)


def test_shared_weight_is_cloned_not_modified(tmp_path):
    """Two convs share one weight; folding the BN after one must leave the other intact."""
    b = GraphBuilder(seed=11)
    x = b.input([1, 3, 6, 6])
    weight = b.random([4, 3, 3, 3])
    left = b.node("Conv", [x, weight])
    right = b.node("Conv", [x, weight])
    b.output(b.bn(left, 4))
    b.output(right)
    result, folded = compare(b.model(), {"x": b.rng.standard_normal((1, 3, 6, 6)).astype(np.float32)}, tmp_path)
    entry = next(iter(result.ledger))
    assert entry.folded and entry.weight_cloned
    convs = [node for node in folded.graph.node if node.op_type == "Conv"]
    assert convs[0].input[1] != convs[1].input[1]
    assert weight in {init.name for init in folded.graph.initializer}


def test_a_reader_the_fold_removes_shares_no_weight():
    """torch.export (dynamo) builds a Conv's zero bias from Shape(weight): that Shape reads
    the weight, but the fold replaces the bias and the Shape goes with it, so nothing in
    the output shares the old weight and nothing was cloned."""
    from pathlib import Path

    model = Path(__file__).resolve().parent.parent / "models" / "resnet_dynamo18.onnx"
    assert any(n.op_type == "Shape" for n in onnx.load(model).graph.node)
    result = bnfold.fold(model)
    assert result.ledger.summary()["folded"] == 6
    assert [e.weight_cloned for e in result.ledger] == [False] * 6
    assert not any("cloned" in e.detail for e in result.ledger)
    folded = result.to_proto()
    used = {name for node in folded.graph.node for name in node.input}
    assert not [t.name for t in folded.graph.initializer if t.name not in used]


def test_the_ledger_is_a_sequence():
    result = bnfold.fold(conv_bn_model())
    ledger = result.ledger
    assert ledger[0] is ledger.entries[0] and ledger[-1] is ledger.entries[-1]
    assert ledger[0:1] == ledger.entries[0:1] and ledger[0] in ledger and list(reversed(ledger)) == ledger.entries[::-1]
    with pytest.raises(IndexError):
        ledger[len(ledger)]


def conv_bn_model():
    b = GraphBuilder(seed=13)
    b.output(b.bn(b.node("Conv", [b.input([1, 3, 6, 6]), b.random([4, 3, 3, 3])]), 4))
    return b.model()


def test_bn_output_that_is_a_graph_output_keeps_its_name(tmp_path):
    b = GraphBuilder(seed=12)
    x = b.input([2, 3])
    y = b.node("Gemm", [x, b.random([3, 4]), b.random([4])])
    out = b.bn(y, 4)
    b.output(out)
    _, folded = compare(b.model(), {"x": b.rng.standard_normal((2, 3)).astype(np.float32)}, tmp_path)
    assert folded.graph.output[0].name == out
    assert folded.graph.node[-1].output[0] == out


def test_chain_of_two_bns_folds_both(tmp_path):
    b = GraphBuilder(seed=13)
    x = b.input([2, 3, 5, 5])
    y = b.node("Conv", [x, b.random([4, 3, 3, 3])], pads=[1, 1, 1, 1])
    b.output(b.bn(b.bn(y, 4), 4))
    result, _ = fold_and_compare(b.model(), {"x": b.rng.standard_normal((2, 3, 5, 5)).astype(np.float32)}, tmp_path)
    assert [e.status for e in result.ledger] == ["folded", "folded"]


def test_unused_parameters_are_removed(tmp_path):
    b = GraphBuilder(seed=14)
    x = b.input([1, 3, 5, 5])
    y = b.node("Conv", [x, b.random([4, 3, 3, 3]), b.random([4])])
    b.output(b.bn(y, 4))
    _, folded = compare(b.model(), {"x": b.rng.standard_normal((1, 3, 5, 5)).astype(np.float32)}, tmp_path)
    used = {name for node in folded.graph.node for name in node.input}
    assert {init.name for init in folded.graph.initializer} == used - {"x"}
    assert len(folded.graph.initializer) == 2


def _if_model(rng):
    """An If whose then-branch holds Conv+BN, reading the outer x and outer weights."""
    then_b = GraphBuilder(seed=21)
    conv = then_b.node("Conv", ["x", "w_outer"], name="then_conv")
    out = then_b.bn(conv, 4, name="then_bn")
    then_graph = oh.make_graph(then_b.nodes, "then", [], [oh.make_tensor_value_info(out, onnx.TensorProto.FLOAT, [1, 4, 3, 3])],
                               then_b.initializers)
    else_graph = oh.make_graph([oh.make_node("Conv", ["x", "w_outer"], ["e"], name="else_conv")], "else", [],
                               [oh.make_tensor_value_info("e", onnx.TensorProto.FLOAT, [1, 4, 3, 3])])
    nodes = [oh.make_node("If", ["cond"], ["y"], name="if", then_branch=then_graph, else_branch=else_graph)]
    graph = oh.make_graph(
        nodes, "g",
        [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 5, 5]),
         oh.make_tensor_value_info("cond", onnx.TensorProto.BOOL, [])],
        [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4, 3, 3])],
        [onh.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w_outer")],
    )
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=9)


@pytest.mark.parametrize("cond", [True, False])
def test_subgraph_bn_folds(tmp_path, cond):
    rng = np.random.default_rng(5)
    model = _if_model(rng)
    feeds = {"x": rng.standard_normal((1, 3, 5, 5)).astype(np.float32), "cond": np.array(cond)}
    result, folded = fold_and_compare(model, feeds, tmp_path)
    (entry,) = result.ledger
    assert entry.folded and entry.graph == "main/if.then_branch"
    then_branch = folded.graph.node[0].attribute[0].g
    assert not any(node.op_type == "BatchNormalization" for node in then_branch.node)


def test_function_body_bn_folds_with_constant_nodes(tmp_path):
    rng = np.random.default_rng(6)

    def constant(name, array):
        return oh.make_node("Constant", [], [name], value=onh.from_array(array.astype(np.float32), name))

    body = [
        constant("w", rng.standard_normal((4, 3, 3, 3))),
        constant("g", rng.uniform(0.5, 2, 4)), constant("be", rng.standard_normal(4)),
        constant("mu", rng.standard_normal(4)), constant("var", rng.uniform(0.5, 2, 4)),
        oh.make_node("Conv", ["a", "w"], ["c"], name="fconv"),
        oh.make_node("BatchNormalization", ["c", "g", "be", "mu", "var"], ["b"], name="fbn"),
    ]
    function = oh.make_function("local", "ConvBN", ["a"], ["b"], body, [oh.make_opsetid("", 17)])
    graph = oh.make_graph([oh.make_node("ConvBN", ["x"], ["y"], domain="local", name="call")], "g",
                          [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 5, 5])],
                          [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4, 3, 3])])
    model = oh.make_model(graph, functions=[function], ir_version=9,
                          opset_imports=[oh.make_opsetid("", 17), oh.make_opsetid("local", 1)])
    result, folded = fold_and_compare(model, {"x": rng.standard_normal((1, 3, 5, 5)).astype(np.float32)}, tmp_path)
    (entry,) = result.ledger
    assert entry.folded and entry.graph == "function local::ConvBN"
    assert not any(node.op_type == "BatchNormalization" for node in folded.functions[0].node)


def test_external_data_model_folds_and_stays_external(tmp_path):
    b = GraphBuilder(seed=31)
    x = b.input([1, 8, 6, 6])
    y = b.node("Conv", [x, b.random([16, 8, 3, 3])])
    b.output(b.bn(y, 16))
    model = b.model()
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    onnx.save(model, src_dir / "m.onnx", save_as_external_data=True, location="m.weights", size_threshold=0)
    out = tmp_path / "out" / "f.onnx"
    out.parent.mkdir()
    result = bnfold.fold(src_dir / "m.onnx")
    result.save(out)
    assert (out.parent / "f.onnx.data").is_file()
    folded = onnx.load(out, load_external_data=False)
    assert any(init.data_location == onnx.TensorProto.EXTERNAL for init in folded.graph.initializer)
    feeds = {"x": b.rng.standard_normal((1, 8, 6, 6)).astype(np.float32)}
    np.testing.assert_allclose(run(out, feeds)[0], run(src_dir / "m.onnx", feeds)[0], rtol=1e-4, atol=1e-5)
