"""Fold-then-run equals run, on random graphs of every pattern the engine supports.

Each example draws a linear op (Conv 1-3-D / ConvTranspose with groups, strides,
dilations, pads; Gemm with transA/transB/alpha/beta/C; MatMul; MatMul+Add), a dtype, a
chain of affine sites after it (BN, per-channel Mul/Add/Sub/Div, optionally behind a
cancelling Transpose pair), optionally a BN before it, Constant-node parameters, a weight
shared with another node, and fan-out of the linear op's output. The folded model must
pass the checker and match the original in onnxruntime (ORT_DISABLE_ALL on both), and
the ledger must fold exactly what is legal. The number of examples comes from the
hypothesis profile (tests/conftest.py): 1,000 per CI run.
"""

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as onh
import onnx_ir as ir
from hypothesis import given
from hypothesis import strategies as st

import bnfold
from builders import GraphBuilder, run

TOLERANCE = {np.float32: (1e-4, 1e-5), np.float64: (1e-9, 1e-10), np.float16: (2e-2, 2e-2)}
SITES = ("bn", "Mul", "Add", "Sub", "Div")


@st.composite
def graphs(draw):
    kind = draw(st.sampled_from(["conv", "convtranspose", "gemm", "matmul", "matmul-add"]))
    matrix = kind in ("gemm", "matmul", "matmul-add")
    dtype = draw(st.sampled_from([np.float32, np.float16] + ([np.float64] if matrix else [])))
    return dict(
        kind=kind, dtype=dtype, seed=draw(st.integers(0, 2**31)),
        dims=draw(st.integers(1, 3)), groups=draw(st.sampled_from([1, 2, 3])),
        in_per_group=draw(st.integers(1, 3)), out_per_group=draw(st.integers(1, 3)),
        kernel=draw(st.integers(1, 3)), stride=draw(st.integers(1, 2)), dilation=draw(st.integers(1, 2)),
        pad=draw(st.integers(0, 1)), bias=draw(st.booleans()),
        trans_a=draw(st.booleans()), trans_b=draw(st.booleans()),
        alpha=draw(st.sampled_from([1.0, 0.5, -1.5])), beta=draw(st.sampled_from([1.0, 0.0, 2.0])),
        sites=draw(st.lists(st.sampled_from(SITES), min_size=1, max_size=3)),
        constant_first=draw(st.booleans()), transpose_pair=draw(st.booleans()) and not matrix,
        bn_before=draw(st.booleans()), constant_nodes=draw(st.booleans()),
        shared_weight=draw(st.booleans()), fan_out=draw(st.booleans()),
    )


class Builder(GraphBuilder):
    """GraphBuilder whose constants can be Constant nodes instead of initializers."""

    def __init__(self, dtype, seed, constant_nodes):
        super().__init__(dtype=dtype, seed=seed)
        self.constant_nodes = constant_nodes

    def const(self, array, base="c"):
        if not self.constant_nodes:
            return super().const(array, base)
        name = self.name(base)
        self.nodes.append(oh.make_node("Constant", [], [name], value=onh.from_array(np.asarray(array), name + "_t")))
        return name


def build(cfg):
    dtype = cfg["dtype"]
    b = Builder(dtype, cfg["seed"], cfg["constant_nodes"])
    rng = b.rng
    groups = cfg["groups"]
    c_in, c_out = groups * cfg["in_per_group"], groups * cfg["out_per_group"]
    if cfg["kind"] in ("conv", "convtranspose"):
        dims, k, d = cfg["dims"], cfg["kernel"], cfg["dilation"]
        shape = [2, c_in] + [(k - 1) * d + 2] * dims
        x = b.input(shape)
        transpose = cfg["kind"] == "convtranspose"
        weight_shape = [c_in, cfg["out_per_group"]] if transpose else [c_out, cfg["in_per_group"]]
        weight = b.random(weight_shape + [k] * dims)
        attrs = dict(group=groups, strides=[cfg["stride"]] * dims, dilations=[d] * dims)
        attrs["pads"] = [0 if transpose else cfg["pad"]] * (2 * dims)
        op, channels, rank = ("ConvTranspose" if transpose else "Conv"), c_out, dims + 2
    else:
        m, k_dim = 3, c_in
        shape = [k_dim, m] if cfg["kind"] == "gemm" and cfg["trans_a"] else [m, k_dim]
        x = b.input(shape)
        trans_b = cfg["kind"] == "gemm" and cfg["trans_b"]
        weight = b.random([c_out, k_dim] if trans_b else [k_dim, c_out])
        attrs = {}
        if cfg["kind"] == "gemm":
            attrs = dict(transA=int(cfg["trans_a"]), transB=int(trans_b), alpha=cfg["alpha"], beta=cfg["beta"])
        op, channels, rank = ("Gemm" if cfg["kind"] == "gemm" else "MatMul"), c_out, 2

    data = x
    bn_before = cfg["bn_before"] and not (cfg["kind"] == "gemm" and cfg["trans_a"]) and cfg["kind"] != "convtranspose"
    if bn_before:
        data = b.bn(x, shape[1])
    inputs = [data, weight]
    if cfg["bias"] and op != "MatMul":
        inputs.append(b.random([c_out]))
    y = b.node(op, inputs, **attrs)
    if cfg["kind"] == "matmul-add":
        y = b.node("Add", [y, b.random([c_out])])
    if cfg["shared_weight"]:
        other = b.node(op, [x, weight] + inputs[2:], **attrs)
        b.output(other, dtype=dtype)
    if cfg["fan_out"]:
        b.output(b.node("Relu", [y]), dtype=dtype)
    if cfg["transpose_pair"]:
        perm = list(range(rank))
        perm[1], perm[-1] = perm[-1], perm[1]
        y = b.node("Transpose", [b.node("Transpose", [y], perm=perm)], perm=perm)
    site_shape = [channels] + [1] * (rank - 2)
    for site in cfg["sites"]:
        if site == "bn":
            y = b.bn(y, channels)
            continue
        values = rng.uniform(0.5, 2.0, channels) * (rng.choice([-1, 1], channels) if site != "Div" else 1)
        c = b.const(values.astype(dtype).reshape(site_shape))
        y = b.node(site, [c, y] if cfg["constant_first"] and site != "Div" else [y, c])
    b.output(y, dtype=dtype)
    feeds = {"x": rng.standard_normal(shape).astype(dtype)}
    return b.model(), feeds, bn_before


@given(graphs())
def test_fold_then_run_equals_run(cfg):
    model, feeds, bn_before = build(cfg)
    expected = run(model, feeds)
    result = bnfold.fold(ir.serde.deserialize_model(model))
    folded = ir.to_proto(result.model)
    onnx.checker.check_model(folded, full_check=True)
    actual = run(folded, feeds)
    rtol, atol = TOLERANCE[cfg["dtype"]]
    for e, a in zip(expected, actual):
        scale = max(1.0, float(np.max(np.abs(e.astype(np.float64)))))
        np.testing.assert_allclose(a, e, rtol=rtol, atol=atol * scale)

    entries = list(result.ledger)
    kept = [e for e in entries if e.status == "kept"]
    if cfg["fan_out"]:
        # The first site after the linear op stays; what follows it has no linear neighbour.
        assert {e.reason for e in kept} <= {"fan-out", "no-linear-producer"}, kept
    elif cfg["dtype"] != np.float16:  # half precision may legitimately refuse an overflowing fold
        assert kept == [], kept
        assert not any(node.op_type == "BatchNormalization" for node in folded.graph.node)
        assert len(entries) >= cfg["sites"].count("bn") + bn_before
    if bn_before and cfg["dtype"] != np.float16:
        assert entries[0].folded and entries[0].pattern.startswith("bn-"), entries[0]
