"""verify judges each output along the axis the fold scaled, for every producer pattern.

For each pattern fold knows (tests/builders.py graphs: Conv, ConvTranspose, Gemm with
transB 0 and 1, MatMul, MatMul + bias, the constant-first ``W @ x``, Concat, chains
through Transpose, Squeeze, Unsqueeze, Reshape and Flatten, and routes across a MaxPool,
a Resize and a sum), a model whose output is the
site's, with channels of very different sizes, is folded; then

- the axis verify judges the output along is the ledger's ``channel_axis``;
- the correct fold passes;
- a fold whose scale is 1% off on one small channel (the same model with that one
  channel's scale off, folded) fails, in that channel.

A walk that judged along another axis lets that 1% (and 20%, the issue's case) pass, since
each slice along another axis holds large channels too.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import bnfold
from builders import GraphBuilder
from bnfold.verification import verify

SMALL_CHANNEL = 1
WRONG = 1.01


def scales(count: int, wrong_channel: int | None = None) -> np.ndarray:
    """Channel scales alternating 300 and 0.01; ``wrong_channel`` off by 1%."""
    values = np.where(np.arange(count) % 2 == 0, 300.0, 0.01)
    if wrong_channel is not None:
        values[wrong_channel] *= WRONG
    return values.astype(np.float32)


def bn(b: GraphBuilder, x: str, s: np.ndarray) -> str:
    """A BN whose scale is ``s`` (mean 0, beta 0: no shift to blur the scale)."""
    var = b.const(np.full(s.shape, 4.0, np.float32), "var")
    gamma = b.const((s * np.sqrt(np.float32(4.0 + 1e-5))).astype(np.float32), "gamma")
    zeros = b.const(np.zeros(s.shape, np.float32), "zeros")
    return b.node("BatchNormalization", [x, gamma, zeros, zeros, var], epsilon=1e-5)


def mul(shape):
    """A Mul site whose per-channel constant has ``shape`` (the channel count where -1 is)."""
    def site(b: GraphBuilder, x: str, s: np.ndarray) -> str:
        return b.node("Mul", [x, b.const(s.reshape([len(s) if d == -1 else d for d in shape]))])
    return site


C = 6  # channels of every producer (a Concat has two producers of C // 2)


def conv(b, x, c=C):
    return b.node("Conv", [x, b.random([c, 3, 3, 3])], pads=[1, 1, 1, 1])


def matmul(b, x, c=C, k=5):
    return b.node("MatMul", [x, b.random([k, c])])


def constmatmul(b, x, c=C, k=5):
    return b.node("MatMul", [b.random([c, k]), x])


IMAGE, SEQUENCE = [2, 3, 6, 6], [2, 7, 5]

#: (pattern the ledger names, input shape, producer chain, site)
CASES = [
    ("conv-bn", IMAGE, lambda b, x: conv(b, x), bn),
    ("conv-mul", IMAGE, lambda b, x: conv(b, x), mul([1, -1, 1, 1])),
    ("convtranspose-bn", [2, 4, 5, 5],
     lambda b, x: b.node("ConvTranspose", [x, b.random([4, C // 2, 3, 3]), b.random([C])], group=2), bn),
    ("gemm-bn", [6, 5], lambda b, x: b.node("Gemm", [x, b.random([5, C]), b.random([C])]), bn),
    ("gemm-bn", [6, 5], lambda b, x: b.node("Gemm", [x, b.random([C, 5]), b.random([C])], transB=1), bn),
    ("gemm-mul", [6, 5], lambda b, x: b.node("Gemm", [x, b.random([C, 5])], transB=1, alpha=0.5), mul([-1])),
    ("matmul-bn", [6, 5], lambda b, x: matmul(b, x), bn),
    ("matmul-mul", SEQUENCE, lambda b, x: matmul(b, x), mul([-1])),
    ("matmul-add-mul", SEQUENCE, lambda b, x: b.node("Add", [matmul(b, x), b.random([C])]), mul([-1])),
    ("constmatmul-mul", [5, 7], lambda b, x: constmatmul(b, x), mul([-1, 1])),
    ("constmatmul-mul", [2, 5, 7], lambda b, x: constmatmul(b, x), mul([-1, 1])),
    ("constmatmul-mul", [2, 3, 5, 7], lambda b, x: constmatmul(b, x), mul([-1, 1])),
    ("constmatmul-bn", [2, 5, 7], lambda b, x: constmatmul(b, x), bn),
    ("concat(conv+conv)-bn", IMAGE,
     lambda b, x: b.node("Concat", [conv(b, x, C // 2), conv(b, x, C // 2)], axis=1), bn),
    ("concat(matmul+matmul)-mul", SEQUENCE,
     lambda b, x: b.node("Concat", [matmul(b, x, C // 2), matmul(b, x, C // 2)], axis=-1), mul([-1])),
    ("conv-transpose-transpose-bn", IMAGE,
     lambda b, x: b.node("Transpose", [b.node("Transpose", [conv(b, x)], perm=[0, 2, 3, 1])], perm=[0, 3, 1, 2]), bn),
    ("conv-transpose-mul", IMAGE, lambda b, x: b.node("Transpose", [conv(b, x)], perm=[0, 2, 3, 1]), mul([-1])),
    ("matmul-transpose-bn", SEQUENCE, lambda b, x: b.node("Transpose", [matmul(b, x)], perm=[0, 2, 1]), bn),
    ("constmatmul-transpose-mul", [2, 5, 7],
     lambda b, x: b.node("Transpose", [constmatmul(b, x)], perm=[0, 2, 1]), mul([-1])),
    ("conv-squeeze-mul", [2, 3, 9],
     lambda b, x: b.node("Squeeze", [b.node("Conv", [b.node("Unsqueeze", [x, b.const(np.array([2], np.int64))]),
                                                    b.random([C, 3, 1, 3])]), b.const(np.array([2], np.int64))]),
     mul([1, -1, 1])),
    ("conv-unsqueeze-mul", IMAGE,
     lambda b, x: b.node("Unsqueeze", [conv(b, x), b.const(np.array([0], np.int64))]), mul([-1, 1, 1])),
    ("conv-reshape-mul", IMAGE,
     lambda b, x: b.node("Reshape", [conv(b, x), b.const(np.array([2, 1, C, 36], np.int64))]), mul([-1, 1])),
    ("matmul-flatten-mul", SEQUENCE, lambda b, x: b.node("Flatten", [matmul(b, x)], axis=2), mul([-1])),
    # routes: the map crossed a pool, a resize, a sum
    ("conv-maxpool-bn", IMAGE, lambda b, x: b.node("MaxPool", [conv(b, x)], kernel_shape=[2, 2]), bn),
    ("conv-resize-bn", IMAGE, lambda b, x: b.node(
        "Resize", [conv(b, x), "", b.const(np.array([1, 1, 2, 2], np.float32))], mode="nearest"), bn),
    ("add(conv+conv)-mul", IMAGE,
     lambda b, x: b.node("Add", [conv(b, x), conv(b, b.node("Sigmoid", [x]))]), mul([1, -1, 1, 1])),
    ("convtranspose-reshape-bn", [2, 4, 5, 5],
     lambda b, x: b.node("Reshape", [b.node("ConvTranspose", [x, b.random([4, C, 2, 2])], strides=[2, 2]),
                                     b.const(np.array([2, C, 100], np.int64))]), bn),
]


def build(input_shape, producer, site, wrong_channel=None, relu=False):
    b = GraphBuilder(seed=3)
    x = b.input(input_shape)
    y = site(b, producer(b, x), scales(C, wrong_channel))
    if relu:  # layout-keeping ops after the site keep its axis
        y = b.node("Relu", [y])
    b.output(y)
    return b.model()


@pytest.mark.parametrize(("pattern", "input_shape", "producer", "site"), CASES,
                         ids=[f"{case[0]}-{len(case[1])}d-{index}" for index, case in enumerate(CASES)])
def test_verify_judges_along_the_axis_the_fold_scaled(tmp_path, pattern, input_shape, producer, site):
    relu = pattern.endswith("-mul")
    original = tmp_path / "original.onnx"
    onnx.save(build(input_shape, producer, site, relu=relu), original)
    wrong = tmp_path / "wrong.onnx"
    onnx.save(build(input_shape, producer, site, SMALL_CHANNEL, relu=relu), wrong)
    result = bnfold.fold(original)
    (entry,) = result.ledger
    assert entry.folded and entry.pattern == pattern, (entry.pattern, entry.reason, entry.detail)
    result.save(tmp_path / "folded.onnx")
    bnfold.fold(wrong).save(tmp_path / "wrong.folded.onnx")

    report = verify(original, tmp_path / "folded.onnx", providers="cpu")
    failing = verify(original, tmp_path / "wrong.folded.onnx", providers="cpu")

    rank = len(report.comparisons[0].reference_shape)
    assert entry.channel_axis is not None
    assert {c.difference.channel_axis for c in report.comparisons} == {entry.channel_axis % rank}
    assert report.passed, report.summary()
    assert not failing.passed, f"1% on channel {SMALL_CHANNEL} passed: {failing.summary()}"
    for comparison in failing.comparisons:
        difference = comparison.difference
        assert difference.max_channel_rel_diff_channel == SMALL_CHANNEL
        assert difference.max_channel_rel_diff == pytest.approx(WRONG - 1, rel=0.05)


# --- where the channels of an output lie: the walk, case by case --------------------------

import onnx_ir as ir  # noqa: E402

from bnfold.constant_eval import Constants  # noqa: E402
from bnfold.patterns.channels import WALK_LIMIT, channel_of  # noqa: E402
from bnfold.patterns.layout import Channel  # noqa: E402


def walked(build, opset: int = 18):
    """``channel_of`` the graph's first output, analysed as verify analyses it."""
    b = GraphBuilder(seed=0)
    b.output(build(b), shape=None)
    model = ir.serde.deserialize_model(onnx.shape_inference.infer_shapes(b.model(opset)))
    return channel_of(model.graph.outputs[0], Constants(model.ir_version, graphs=[model.graph]))


def relus(b, y, count):
    for _ in range(count):
        y = b.node("Relu", [y])
    return y


def fed(b, name, shape):
    b.inputs.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, shape))
    return name


WALKS = {
    # name: (graph, the channels found; None: the walk cannot tell)
    "graph-input": (lambda b: b.input([2, 6, 4, 4]), None),
    "conv-through-relus": (lambda b: relus(b, conv(b, b.input([2, 3, 4, 4])), 10), Channel(4, 1, C)),
    "conv-beyond-the-walk": (lambda b: relus(b, conv(b, b.input([2, 3, 4, 4])), 70), None),
    "conv-with-weights-fed": (lambda b: b.node("Conv", [b.input([2, 3, 4, 4]), fed(b, "w", [5, 3, 1, 1])]),
                              Channel(4, 1, 5)),
    "gemm-with-weights-fed": (lambda b: b.node("Gemm", [b.input([2, 3]), fed(b, "w", [3, 7])]), Channel(2, 1, 7)),
    "matmul-with-weights-fed": (lambda b: b.node("MatMul", [b.input([2, 3, 4]), fed(b, "w", [4, 7])]),
                                Channel(3, -1, 7)),
    "instance-norm": (lambda b: b.node("InstanceNormalization", [b.input([2, 6, 4]), b.random([6]), b.random([6])]),
                      Channel(3, 1, 6)),
    "concat-of-convs": (lambda b: b.node("Concat", [conv(b, b.input([2, 3, 4, 4])), conv(b, b.input([2, 3, 4, 4], "y"),
                                                                                          c=2)], axis=1),
                        Channel(4, 1, C + 2)),
    "concat-along-another-axis": (lambda b: b.node("Concat", [conv(b, b.input([2, 3, 4, 4])),
                                                              conv(b, b.input([2, 3, 4, 4], "y"))], axis=2), None),
    "concat-with-an-unknown": (lambda b: b.node("Concat", [conv(b, b.input([2, 3, 4, 4])),
                                                           b.input([2, 6, 4, 4], "y")], axis=1), None),
    "concat-of-different-layouts": (lambda b: b.node("Concat", [
        conv(b, b.input([2, 3, 4, 4])), b.node("MatMul", [b.input([2, 6, 4, 4], "y"), b.random([4, 4])])], axis=1),
        None),
    "concat-of-unknown-counts": (lambda b: b.node("Concat", [
        b.node("Conv", [b.input([2, 3, 4, 4]), fed(b, "w", ["M", 3, 1, 1])]), conv(b, b.input([2, 3, 4, 4], "y"))],
        axis=1), Channel(4, 1, -1)),
    "add-of-unknown-rank": (lambda b: b.node("Add", [conv(b, b.input([2, 3, 4, 4])), b.input(None, "y")]),
                            Channel(4, 1, C)),
    "one-channel-transposed-then-added": (lambda b: b.node("Relu", [b.node("Squeeze", [
        conv(b, b.input([2, 3, 4, 4]), c=1), b.const(np.array([1]))])]), Channel(3, None, 1)),
    "broadcast-to-a-higher-rank": (lambda b: b.node("Add", [conv(b, b.input([2, 3, 4, 4])),
                                                            b.input([5, 1, 1, 1, 1], "y")]), Channel(5, 2, C)),
    "first-axis-broadcast-to-a-higher-rank": (lambda b: b.node("Add", [
        b.node("Transpose", [conv(b, b.input([2, 3, 4, 4]))], perm=[1, 0, 2, 3]), b.input([5, 1, 1, 1, 1], "y")]),
        Channel(5, 1, C)),
    # WALK_LIMIT nested Concats are walked, one more is not
    "concats-beyond-the-walk": (lambda b: concats(b, conv(b, b.input([2, 3, 4, 4])), WALK_LIMIT + 1), None),
    "concats-within-the-walk": (lambda b: concats(b, conv(b, b.input([2, 3, 4, 4])), WALK_LIMIT), Channel(4, 1, C)),
    "concat-of-unknown-ranks": (lambda b: b.node("Concat", [b.node("Conv", [fed(b, "x", None), fed(b, "w", None)]),
                                                            b.node("Conv", [fed(b, "y", None), fed(b, "v", None)])],
                                                 axis=1), None),
    # constant weights prove rank and count where shape inference knows nothing
    "conv-of-an-input-of-unknown-shape": (lambda b: conv(b, fed(b, "x", None)), Channel(4, 1, C)),
    "convtranspose-of-an-input-of-unknown-shape": (
        lambda b: b.node("ConvTranspose", [fed(b, "x", None), b.random([3, C, 2, 2])]), Channel(4, 1, C)),
    "gemm-of-an-input-of-unknown-shape": (lambda b: b.node("Gemm", [fed(b, "x", None), b.random([3, C])]),
                                          Channel(2, 1, C)),
    "concat-with-an-empty-part": (lambda b: b.node("Concat", [
        b.node("Conv", [b.input([2, 3, 4, 4]), fed(b, "w", [0, 3, 1, 1])]), conv(b, b.input([2, 3, 4, 4], "y"))],
        axis=1), Channel(4, 1, C)),
    "concat-with-a-missing-input": (lambda b: b.node("Concat", [conv(b, b.input([2, 3, 4, 4])), ""], axis=1), None),
    "elementwise-of-constants": (lambda b: b.node("Relu", [b.random([2, 6])]), None),
    "conv-of-unknown-rank": (lambda b: b.node("Conv", [fed(b, "x", None), fed(b, "w", None)]),
                             Channel(None, 1, -1)),
    "conv-with-a-symbolic-count": (lambda b: b.node("Conv", [b.input([2, 3, 4, 4]), fed(b, "w", ["M", 3, 1, 1])]),
                                   Channel(4, 1, -1)),
    "vector-matmul-with-weights-fed": (lambda b: b.node("MatMul", [b.input([4]), fed(b, "w", [4, 7])]),
                                       Channel(1, -1, 7)),
}


def concats(b, y, count):
    for _ in range(count):
        y = b.node("Concat", [y], axis=1)
    return y


@pytest.mark.parametrize("case", WALKS)
def test_the_walk_finds_the_channels_or_says_it_cannot(case):
    build, expected = WALKS[case]
    assert walked(build) == expected


def test_the_walk_says_it_cannot_through_a_layout_op_without_input():
    """A malformed layout op (no data input; shape inference rejects it, so ``walked``
    cannot build it): the walk stops there instead of failing."""
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", [], ["y"])], "g", [],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)])
    model = ir.serde.deserialize_model(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)]))
    assert channel_of(model.graph.outputs[0], Constants(model.ir_version, graphs=[model.graph])) is None


@pytest.mark.parametrize("case, declared, expected", [
    # a Conv of unknown rank (channels on its axis 1) added to a vector, the sum declared of
    # rank 1 (shape inference cannot refute it): no axis 1 there, so no channels, not axis 1
    ("sum-declared-narrower", [C], None),
    # added to a rank-4 tensor, the sum declared so: the channels stay on axis 1
    ("sum-declared-of-rank-4", [2, C, 4, 4], Channel(4, 1, -1)),
    # the Conv itself declared of rank 1: it has no axis 1 for its channels
    ("conv-declared-of-rank-1", [C], None),
])
def test_the_walk_reads_declared_shapes_of_outputs_inference_cannot_refute(case, declared, expected):
    b = GraphBuilder(seed=0)
    y = b.node("Conv", [fed(b, "x", None), fed(b, "w", None)])
    if case.startswith("sum"):
        y = b.node("Add", [y, b.input(declared, "y")])
    b.output(y, shape=declared)
    model = ir.serde.deserialize_model(onnx.shape_inference.infer_shapes(b.model()))
    assert channel_of(model.graph.outputs[0], Constants(model.ir_version, graphs=[model.graph])) == expected


def test_an_opset_3_concat_without_axis_joins_the_channels():
    """Concat-1 (opsets 1 to 3) has no required axis and joins along axis 1, as fold's routes
    read it: verify's walk finds the joined channels there."""
    def build(b):
        return b.node("Concat", [conv(b, b.input([2, 3, 4, 4])), conv(b, b.input([2, 3, 4, 4], "y"), c=2)])
    assert walked(build, opset=3) == Channel(4, 1, C + 2)
