"""Routes: a map travels across the ops it commutes with, over sums and into several readers.

Every case is a small graph built as exporters write it, folded, checked with the full
checker and run in onnxruntime against the original (ORT_DISABLE_ALL on both). Each
crossing is tried where it commutes (the BN goes, the route is named in the ledger) and
where it does not (negative scales through a max, counted padding, a pad value the map
moves, a channel the op mixes, a forked route with a non-linear reader): then the BN stays,
with the reason naming the op, and the model is unchanged.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import bnfold
from builders import GraphBuilder, count_ops, fold_and_compare

SHAPE = (2, 4, 8, 8)
SCALES = np.array([1, 1, 2, 2], np.float32)


def bn(b: GraphBuilder, x: str, c: int, sign: float | None = 1.0, shift: bool = True, name: str = "the_bn") -> str:
    """A BN with realistic statistics; ``sign`` fixes the sign of every scale (None: mixed)."""
    r = b.rng
    gamma = r.uniform(0.5, 2.0, c) * (r.choice([-1, 1], c) if sign is None else sign)
    beta = r.standard_normal(c) if shift else np.zeros(c)
    mean = r.standard_normal(c) if shift else np.zeros(c)
    params = [b.const(a.astype(np.float32)) for a in (gamma, beta, mean, r.uniform(0.5, 2.0, c))]
    return b.node("BatchNormalization", [x, *params], name=name)


def conv(b: GraphBuilder, x: str, c_out: int = 4, c_in: int = 4, k: int = 1, pads=0, name=None) -> str:
    attrs = {"pads": [pads] * 4} if pads else {}
    return b.node("Conv", [x, b.random([c_out, c_in, k, k]), b.random([c_out])], name=name, **attrs)


def fold(model, tmp_path, shape=SHAPE):
    feeds = {"x": np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
    return fold_and_compare(model, feeds, tmp_path)


def the_bn(result):
    (entry,) = [e for e in result.ledger if e.node == "the_bn"]
    return entry


def folded(result, folded_model, pattern: str | None = None):
    entry = the_bn(result)
    assert entry.status == "folded", (entry.reason, entry.detail)
    assert count_ops(folded_model, "BatchNormalization") == 0
    if pattern is not None:
        assert entry.pattern == pattern
    return entry


def kept(result, folded_model, original, reason: str):
    entry = the_bn(result)
    assert (entry.status, entry.reason) == ("kept", reason), entry.detail
    assert entry.detail
    assert [n.op_type for n in folded_model.graph.node] == [n.op_type for n in original.graph.node]
    return entry


# --- crossing upstream: Conv -> op -> BN -------------------------------------------


def producer_then(op: str, sign=1.0, channels: int = 4, inputs=(), **attrs):
    """``Conv(4 channels) -> op -> BN(channels)``; ``inputs``: the op's constant inputs."""
    def build(b: GraphBuilder):
        y = conv(b, b.input(list(SHAPE)))
        operands = [y] + ["" if v is None else b.const(np.asarray(v)) for v in inputs]
        return bn(b, b.node(op, operands, **attrs), channels, sign)
    return build


UP_FOLDS = {
    "maxpool": (producer_then("MaxPool", kernel_shape=[2, 2], strides=[2, 2]), "conv-maxpool-bn"),
    "maxpool-padded": (producer_then("MaxPool", kernel_shape=[3, 3], pads=[1, 1, 1, 1]), "conv-maxpool-bn"),
    "globalmaxpool": (producer_then("GlobalMaxPool"), "conv-globalmaxpool-bn"),
    "averagepool": (producer_then("AveragePool", kernel_shape=[2, 2], strides=[2, 2]), "conv-averagepool-bn"),
    "averagepool-uncounted-pads": (producer_then("AveragePool", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
                                   "conv-averagepool-bn"),
    "globalaveragepool": (producer_then("GlobalAveragePool"), "conv-globalaveragepool-bn"),
    "reducemean": (producer_then("ReduceMean", inputs=[[2, 3]], keepdims=1), "conv-reducemean-bn"),
    "reducesum": (producer_then("ReduceSum", inputs=[[2]], keepdims=1), "conv-reducesum-bn"),
    "reducemax": (producer_then("ReduceMax", inputs=[[3]], keepdims=1), "conv-reducemax-bn"),
    "resize-nearest": (producer_then("Resize", inputs=[None, SCALES], mode="nearest"), "conv-resize-bn"),
    "resize-linear": (producer_then("Resize", inputs=[None, SCALES], mode="linear"), "conv-resize-bn"),
    "resize-cubic": (producer_then("Resize", inputs=[None, SCALES], mode="cubic"), "conv-resize-bn"),
    "slice-spatial": (producer_then("Slice", inputs=[[1], [7], [2]]), "conv-slice-bn"),
    "pad-reflect": (producer_then("Pad", inputs=[[0, 0, 1, 1, 0, 0, 1, 1]], mode="reflect"), "conv-pad-bn"),
    "pad-edge": (producer_then("Pad", inputs=[[0, 0, 2, 0, 0, 0, 0, 1]], mode="edge"), "conv-pad-bn"),
    "identity": (producer_then("Identity"), "conv-identity-bn"),
}


@pytest.mark.parametrize("case", UP_FOLDS)
def test_map_crosses_upstream(tmp_path, case):
    build, pattern = UP_FOLDS[case]
    b = GraphBuilder(seed=len(case))
    b.output(build(b))
    result, out = fold(b.model(18), tmp_path)
    entry = folded(result, out, pattern)
    assert entry.route.startswith("through ")


UP_KEEPS = {
    "maxpool-negative-scale": (producer_then("MaxPool", sign=None, kernel_shape=[2, 2]), "negative-scale"),
    "reducemin-negative-scale": (producer_then("ReduceMin", sign=-1.0, inputs=[[2]]), "negative-scale"),
    "averagepool-counted-pads": (producer_then("AveragePool", kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                                               count_include_pad=1), "shift-not-crossing"),
    "pad-constant-zero": (producer_then("Pad", inputs=[[0, 0, 1, 1, 0, 0, 1, 1]]), "pad-value"),
    "reduce-over-channels": (producer_then("ReduceMean", channels=8, inputs=[[1]], keepdims=0),
                             "channel-axis-mismatch"),
    "pad-channels": (producer_then("Pad", channels=5, inputs=[[0, 1, 0, 0, 0, 0, 0, 0]], mode="edge"),
                     "channel-axis-mismatch"),
    "resize-tf-crop": (producer_then("Resize", inputs=[np.array([0, 0, 0, 0, 1, 1, 1, 1], np.float32), SCALES],
                                     coordinate_transformation_mode="tf_crop_and_resize"), "unproven-crossing"),
}


@pytest.mark.parametrize("case", UP_KEEPS)
def test_map_does_not_cross_upstream(tmp_path, case):
    build, reason = UP_KEEPS[case]
    b = GraphBuilder(seed=len(case))
    b.output(build(b))
    model = b.model(18)
    result, out = fold(model, tmp_path)
    entry = kept(result, out, model, reason)
    assert entry.detail.split(" ")[0] in {"MaxPool", "ReduceMin", "AveragePool", "Pad", "ReduceMean", "Resize"}


def test_map_crosses_a_wrapping_pad(tmp_path):
    b = GraphBuilder(seed=2)
    y = b.node("Pad", [conv(b, b.input(list(SHAPE))), b.const(np.array([0, 0, 1, 2, 0, 0, 2, 1]))], mode="wrap")
    b.output(bn(b, y, 4, sign=None))
    result, out = fold_and_compare(b.model(19), {"x": np.random.default_rng(1).standard_normal(SHAPE)
                                                 .astype(np.float32)}, tmp_path)
    folded(result, out, "conv-pad-bn")


def test_negative_scale_names_the_channels(tmp_path):
    b = GraphBuilder(seed=3)
    y = b.node("MaxPool", [conv(b, b.input(list(SHAPE)))], kernel_shape=[2, 2], name="pool")
    gamma = b.const(np.array([1.0, -1.0, 2.0, -0.5], np.float32))
    params = [gamma] + [b.const(v.astype(np.float32)) for v in (np.zeros(4), np.zeros(4), np.ones(4))]
    b.output(b.node("BatchNormalization", [y, *params], name="the_bn"))
    model = b.model(18)
    result, out = fold(model, tmp_path)
    entry = kept(result, out, model, "negative-scale")
    assert "MaxPool 'pool'" in entry.detail and "channel(s) 1, 3" in entry.detail


def test_pure_scale_crosses_a_zero_pad(tmp_path):
    """``s * 0 + t == 0`` with ``t = 0``: a BN without shift crosses a constant zero pad."""
    b = GraphBuilder(seed=4)
    y = b.node("Pad", [conv(b, b.input(list(SHAPE))), b.const(np.array([0, 0, 1, 1, 0, 0, 1, 1]))])
    b.output(bn(b, y, 4, shift=False))
    result, out = fold(b.model(18), tmp_path)
    folded(result, out, "conv-pad-bn")


def test_channel_slice_and_gather_fold_their_channels(tmp_path):
    """Slice and Gather on the channel axis: each kept channel takes its map, the dropped
    ones none; a channel gathered twice takes one map."""
    b = GraphBuilder(seed=5)
    y = conv(b, b.input(list(SHAPE)), c_out=6)
    y = b.node("Slice", [y, b.const(np.array([5])), b.const(np.array([0])), b.const(np.array([1])),
                         b.const(np.array([-2]))])  # channels 5, 3, 1
    y = b.node("Gather", [y, b.const(np.array([2, 0, 1]))], axis=1)  # 1, 5, 3
    b.output(bn(b, y, 3, sign=None))
    result, out = fold(b.model(18), tmp_path)
    folded(result, out, "conv-slice-gather-bn")


def test_gathering_one_channel_twice_with_two_maps_is_kept(tmp_path):
    b = GraphBuilder(seed=6)
    y = b.node("Gather", [conv(b, b.input(list(SHAPE))), b.const(np.array([0, 0, 1]))], axis=1)
    model_b = bn(b, y, 3)
    b.output(model_b)
    model = b.model(18)
    result, out = fold(model, tmp_path)
    kept(result, out, model, "unproven-crossing")


def test_channel_split_folds_one_piece(tmp_path):
    """Split along the channels: the BN on one piece folds into its channels of the conv;
    the other piece (read elsewhere) is untouched."""
    b = GraphBuilder(seed=7)
    first, second = b.node("Split", [conv(b, b.input(list(SHAPE)), c_out=6), b.const(np.array([2, 4]))],
                           n_out=2, axis=1)
    b.output(bn(b, second, 4, sign=None))
    b.output(b.node("Relu", [first]))
    result, out = fold(b.model(18), tmp_path)
    folded(result, out, "conv-split-bn")


def test_spatial_split_with_another_piece_read_is_kept(tmp_path):
    b = GraphBuilder(seed=8)
    first, second = b.node("Split", [conv(b, b.input(list(SHAPE))), b.const(np.array([4, 4]))], n_out=2, axis=2)
    b.output(bn(b, second, 4))
    b.output(b.node("Relu", [first]))
    model = b.model(18)
    result, out = fold(model, tmp_path)
    kept(result, out, model, "fan-out")


# --- sums --------------------------------------------------------------------------


def test_bn_after_a_sum_of_convs_splits_into_both(tmp_path):
    b = GraphBuilder(seed=9)
    x = b.input(list(SHAPE))  # the convs read two tensors: no merge, the map splits
    total = b.node("Add", [conv(b, x, name="a"), conv(b, b.node("Sigmoid", [x]), k=3, pads=1, name="c")], name="sum")
    b.output(bn(b, total, 4, sign=None))
    result, out = fold(b.model(18), tmp_path)
    entry = folded(result, out, "add(conv+conv)-bn")
    assert entry.route == "split over Add 'sum' into Conv 'a' and Conv 'c'"
    assert entry.into == "a, c"


def test_nary_sums_and_differences_distribute(tmp_path):
    """``BN((a - b) + Sum(c, d))``: s into every operand, t once; a pooled operand too."""
    b = GraphBuilder(seed=10)
    x = b.input(list(SHAPE))
    xs = [x] + [b.node(op, [x]) for op in ("Sigmoid", "Tanh", "Relu", "Softsign")]
    diff = b.node("Sub", [conv(b, xs[0]), b.node("MaxPool", [conv(b, xs[1])], kernel_shape=[3, 3], pads=[1, 1, 1, 1])])
    total = b.node("Add", [diff, b.node("Sum", [conv(b, xs[2]), conv(b, xs[3]), conv(b, xs[4])])])
    b.output(bn(b, total, 4))
    result, out = fold(b.model(18), tmp_path)
    folded(result, out, "add(sub(conv+conv-maxpool)+sum(conv+conv+conv))-bn")


@pytest.mark.parametrize("other", ["relu", "graph-input", "read-elsewhere"])
def test_a_sum_with_an_operand_that_cannot_take_the_map_is_kept(tmp_path, other):
    b = GraphBuilder(seed=11)
    x = b.input(list(SHAPE))
    y = conv(b, b.node("Sigmoid", [x]))  # not x's conv: a sum of branches of x would merge instead
    operand = {"relu": lambda: b.node("Relu", [conv(b, x)]), "graph-input": lambda: x,
               "read-elsewhere": lambda: y}[other]()
    b.output(bn(b, b.node("Add", [conv(b, x) if other == "read-elsewhere" else y, operand]), 4))
    if other == "read-elsewhere":
        b.output(b.node("Relu", [y]))
    model = b.model(18)
    result, out = fold(model, tmp_path)
    kept(result, out, model, "fan-out" if other == "read-elsewhere" else "no-linear-producer")


def test_the_same_conv_reached_twice_is_kept(tmp_path):
    """``Split -> (a, b) -> Add`` reaches one conv along two paths: refused, never folded twice."""
    b = GraphBuilder(seed=12)
    first, second = b.node("Split", [conv(b, b.input(list(SHAPE)), c_out=8), b.const(np.array([4, 4]))],
                           n_out=2, axis=1)
    b.output(bn(b, b.node("Add", [first, second]), 4))
    model = b.model(18)
    result, out = fold(model, tmp_path)
    kept(result, out, model, "fan-out")


# --- downstream: BN -> op -> linear ops ---------------------------------------------


def then_conv(op: str, sign=1.0, inputs=(), **attrs):
    """``Relu -> BN -> op -> Conv 1x1``; ``inputs``: the op's constant inputs."""
    def build(b: GraphBuilder):
        y = bn(b, b.node("Relu", [b.input(list(SHAPE))]), 4, sign)
        operands = [y] + ["" if v is None else b.const(np.asarray(v)) for v in inputs]
        return conv(b, b.node(op, operands, **attrs))
    return build


DOWN_FOLDS = {
    "maxpool": (then_conv("MaxPool", kernel_shape=[2, 2], strides=[2, 2]), "bn-maxpool-conv"),
    "averagepool": (then_conv("AveragePool", kernel_shape=[3, 3], pads=[1, 1, 1, 1]), "bn-averagepool-conv"),
    "globalmaxpool": (then_conv("GlobalMaxPool"), "bn-globalmaxpool-conv"),
    "reducesum": (then_conv("ReduceSum", inputs=[[2, 3]], keepdims=1), "bn-reducesum-conv"),
    "reducemean": (then_conv("ReduceMean", inputs=[[3]], keepdims=1), "bn-reducemean-conv"),
    "resize-linear": (then_conv("Resize", inputs=[None, SCALES], mode="linear"), "bn-resize-conv"),
    "slice-spatial": (then_conv("Slice", inputs=[[-1], [0], [3], [-1]]), "bn-slice-conv"),
    "pad-reflect": (then_conv("Pad", inputs=[[0, 0, 1, 1, 0, 0, 1, 1]], mode="reflect"), "bn-pad-conv"),
    "dropout": (then_conv("Dropout"), "bn-dropout-conv"),
}


@pytest.mark.parametrize("case", DOWN_FOLDS)
def test_map_crosses_downstream(tmp_path, case):
    build, pattern = DOWN_FOLDS[case]
    b = GraphBuilder(seed=len(case) + 30)
    b.output(build(b))
    result, out = fold(b.model(18), tmp_path)
    entry = folded(result, out, pattern)
    assert entry.route.startswith("through ") and count_ops(out, "Add") == 0


def test_inception_fork_folds_into_every_reader(tmp_path):
    """A BN read by three 1x1 convs and a MaxPool -> 1x1 conv: all four take it."""
    b = GraphBuilder(seed=13)
    y = bn(b, b.node("Relu", [b.input(list(SHAPE))]), 4)
    branches = [conv(b, y, name=f"c{i}") for i in range(3)]
    branches.append(conv(b, b.node("MaxPool", [y], kernel_shape=[3, 3], pads=[1, 1, 1, 1]), name="c3"))
    b.output(b.node("Concat", branches, axis=1))
    result, out = fold(b.model(18), tmp_path)
    entry = folded(result, out, "bn-fork(conv+conv+conv+maxpool-conv)")
    assert entry.route.startswith("into 4 readers: Conv 'c0', Conv 'c1', Conv 'c2' and Conv 'c3'")
    assert count_ops(out, "Add") == 0


def test_fork_with_a_padded_reader_keeps_the_shift_once(tmp_path):
    b = GraphBuilder(seed=14)
    y = bn(b, b.node("Relu", [b.input(list(SHAPE))]), 4, sign=None)
    b.output(b.node("Concat", [conv(b, y), conv(b, y, k=3, pads=1)], axis=1))
    result, out = fold(b.model(18), tmp_path)
    entry = folded(result, out, "bn-fork(conv+conv-scale)")
    assert "shift kept as an Add" in entry.detail
    assert count_ops(out, "Add") == 1


def test_fork_with_a_non_linear_reader_is_kept(tmp_path):
    b = GraphBuilder(seed=15)
    y = bn(b, b.node("Relu", [b.input(list(SHAPE))]), 4)
    b.output(conv(b, y))
    b.output(b.node("Relu", [y]))
    model = b.model(18)
    result, out = fold(model, tmp_path)
    entry = kept(result, out, model, "fan-out")
    assert "Relu" in entry.detail


def test_classifier_head_bn_gap_flatten_gemm(tmp_path):
    b = GraphBuilder(seed=16)
    y = bn(b, b.node("Relu", [b.input(list(SHAPE))]), 4, sign=None)
    y = b.node("Flatten", [b.node("GlobalAveragePool", [y])], axis=1)
    b.output(b.node("Gemm", [y, b.random([10, 4]), b.random([10])], transB=1))
    result, out = fold(b.model(18), tmp_path)
    folded(result, out, "bn-globalaveragepool-flatten-gemm")


def test_bn_maxpool_flatten_gemm(tmp_path):
    """A VGG-style head: each channel covers the pooled pixels of the flattened features."""
    b = GraphBuilder(seed=17)
    y = bn(b, b.node("Relu", [b.input(list(SHAPE))]), 4)
    y = b.node("Flatten", [b.node("MaxPool", [y], kernel_shape=[2, 2], strides=[2, 2])], axis=1)
    b.output(b.node("Gemm", [y, b.random([64, 10])]))
    result, out = fold(b.model(18), tmp_path)
    folded(result, out, "bn-maxpool-flatten-gemm")


def test_bn_before_a_zero_pad_keeps_the_shift(tmp_path):
    """TF's explicit ``Pad(0) -> Conv``: the scale crosses the pad, the shift stays as an Add."""
    b = GraphBuilder(seed=18)
    y = bn(b, b.node("Relu", [b.input(list(SHAPE))]), 4)
    y = b.node("Pad", [y, b.const(np.array([0, 0, 1, 1, 0, 0, 1, 1]))])
    b.output(conv(b, y, k=3))
    result, out = fold(b.model(18), tmp_path)
    entry = folded(result, out, "bn-pad-conv")
    assert "shift kept as an Add" in entry.detail and "Pad" in entry.detail


def test_bn_into_one_input_of_a_channel_concat(tmp_path):
    """DenseNet-like ``Concat(BN(x), y) -> Conv``: the map covers its channels of the conv."""
    b = GraphBuilder(seed=19)
    x = b.input(list(SHAPE))
    y = bn(b, b.node("Relu", [x]), 4, sign=None)
    b.output(conv(b, b.node("Concat", [b.node("Sigmoid", [x]), y], axis=1), c_in=8))
    result, out = fold(b.model(18), tmp_path)
    folded(result, out, "bn-concat-conv")


def test_scalar_affine_into_a_channel_concat_and_a_conv(tmp_path):
    """HGNetV2's learnable affine block: ``Relu -> x * a + b`` (scalars) read by the next conv
    and by a Concat along the channels before the aggregation conv: a fork, and through the
    Concat the map covers that input's channels only."""
    b = GraphBuilder(seed=24)
    x = b.input(list(SHAPE))
    y = b.node("Add", [b.node("Mul", [b.node("Relu", [conv(b, x)]), b.const(np.float32(1.7))]),
                       b.const(np.float32(-0.3))])
    nxt = b.node("Relu", [conv(b, y)])
    b.output(conv(b, b.node("Concat", [x, y, nxt], axis=1), c_in=12))
    result, out = fold(b.model(18), tmp_path)
    sites = [e for e in result.ledger if e.op in ("Mul", "Add")]
    assert [(e.status, e.pattern) for e in sites] == [("folded", "mul-fork(conv+concat-conv)"),
                                                      ("folded", "add-fork(conv+concat-conv)")]
    assert count_ops(out, "Mul") == 0 and count_ops(out, "Add") == 0


def test_bn_downstream_negative_scale_through_maxpool_is_kept(tmp_path):
    b = GraphBuilder(seed=20)
    y = bn(b, b.node("Relu", [b.input(list(SHAPE))]), 4, sign=-1.0)
    b.output(conv(b, b.node("MaxPool", [y], kernel_shape=[2, 2])))
    model = b.model(18)
    result, out = fold(model, tmp_path)
    kept(result, out, model, "negative-scale")


def test_bn_downstream_through_an_intermediate_graph_output_is_kept(tmp_path):
    b = GraphBuilder(seed=21)
    y = bn(b, b.node("Relu", [b.input(list(SHAPE))]), 4)
    pooled = b.node("MaxPool", [y], kernel_shape=[2, 2])
    b.output(conv(b, pooled))
    b.output(pooled)
    model = b.model(18)
    result, out = fold(model, tmp_path)
    kept(result, out, model, "graph-output")


def test_shape_and_castlike_readers_do_not_block_a_route(tmp_path):
    """The dynamo exporter reads a value's shape and type beside its real reader."""
    b = GraphBuilder(seed=22)
    y = b.node("MaxPool", [conv(b, b.input(list(SHAPE)))], kernel_shape=[2, 2])
    shape = b.node("Shape", [y])
    zero = b.node("CastLike", [b.const(np.array(0.0, np.float64)), y])
    out = bn(b, y, 4)
    b.output(b.node("Add", [out, zero]))
    b.output(shape, dtype=np.int64)
    result, folded_model = fold(b.model(18), tmp_path)
    folded(result, folded_model, "conv-maxpool-bn")


def test_inspect_reports_the_route_fold_takes(tmp_path):
    b = GraphBuilder(seed=23)
    y = b.node("MaxPool", [conv(b, b.input(list(SHAPE)), name="c")], kernel_shape=[2, 2], name="p")
    b.output(bn(b, y, 4))
    model = b.model(18)
    onnx.save(model, tmp_path / "m.onnx")
    (finding,) = bnfold.inspect(tmp_path / "m.onnx")
    entry = the_bn(bnfold.fold(tmp_path / "m.onnx"))
    assert entry.route == "through MaxPool 'p' (all 4 scales > 0)"
    assert entry.route in finding.plan
