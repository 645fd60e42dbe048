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
from bnfold.errors import InputError
from builders import GraphBuilder, count_ops, fold_and_compare, run

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


def fold(model, tmp_path, shape=SHAPE, checked=True):
    feeds = {"x": np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
    return fold_and_compare(model, feeds, tmp_path, checked=checked)


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


def producer_then(op: str, sign=1.0, channels: int = 4, inputs=(), shift: bool = True, **attrs):
    """``Conv(4 channels) -> op -> BN(channels)``; ``inputs``: the op's constant inputs."""
    def build(b: GraphBuilder):
        y = conv(b, b.input(list(SHAPE)))
        operands = [y] + ["" if v is None else b.const(np.asarray(v)) for v in inputs]
        return bn(b, b.node(op, operands, **attrs), channels, sign, shift=shift)
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
    # the batch named from the end: -4 is the first axis of a rank-4 tensor
    "reducemean-batch-from-the-end": (producer_then("ReduceMean", inputs=[[-4]], keepdims=1), "conv-reducemean-bn"),
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


@pytest.mark.parametrize("gamma, named", [
    ([1.0, -1.0, 2.0, -0.5], "(channel(s) 1, 3)"),
    ([-1.0] * 10, "(channel(s) 0, 1, 2, 3, 4, 5, 6, 7, ... (10 in all))"),  # eight named, then the count
    ([1.0, 0.0, 2.0, 0.5], "(channel(s) 1)"),  # the rule is s > 0, as documented: a zero scale is named too
], ids=["two-of-four", "ten-of-ten", "a-zero-scale"])
def test_negative_scale_names_the_channels(tmp_path, gamma, named):
    b = GraphBuilder(seed=3)
    y = b.node("MaxPool", [conv(b, b.input(list(SHAPE)), c_out=len(gamma))], kernel_shape=[2, 2], name="pool")
    c = len(gamma)
    params = [b.const(np.array(gamma, np.float32))] + [b.const(v.astype(np.float32))
                                                       for v in (np.zeros(c), np.zeros(c), np.ones(c))]
    b.output(b.node("BatchNormalization", [y, *params], name="the_bn"))
    model = b.model(18)
    result, out = fold(model, tmp_path)
    entry = kept(result, out, model, "negative-scale")
    assert "MaxPool 'pool'" in entry.detail and entry.detail.endswith(named)


def test_pure_scale_crosses_a_zero_pad(tmp_path):
    """``s * 0 + t == 0`` with ``t = 0``: a BN without shift crosses a constant zero pad."""
    b = GraphBuilder(seed=4)
    y = b.node("Pad", [conv(b, b.input(list(SHAPE))), b.const(np.array([0, 0, 1, 1, 0, 0, 1, 1]))])
    b.output(bn(b, y, 4, shift=False))
    result, out = fold(b.model(18), tmp_path)
    folded(result, out, "conv-pad-bn")


def test_a_constant_pad_the_map_leaves_in_place_is_crossed(tmp_path):
    """``s*v + t == v`` on every channel (here ``v = 1``, ``t = 1 - s``): the padded border
    comes out of the folded model as the original writes it, so the BN folds."""
    b = GraphBuilder(seed=41)
    y = b.node("Pad", [conv(b, b.input(list(SHAPE))), b.const(np.array([0, 0, 1, 1, 0, 0, 1, 1])),
                       b.const(np.array(1.0, np.float32))])
    gamma = np.array([0.5, 2.0, -1.0, 0.25], np.float32)  # var + eps == 1 and mean == 0: s == gamma, t == beta
    params = [b.const(a) for a in (gamma, 1 - gamma, np.zeros(4, np.float32), np.full(4, 0.75, np.float32))]
    b.output(b.node("BatchNormalization", [y, *params], name="the_bn", epsilon=0.25))
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


# --- each crossing rule's conditions, one case each ------------------------------------
# Conv -> op -> BN where the op is written the way each opset and exporter writes it;
# a fold is checked in onnxruntime, a kept BN leaves the model as it was.

ALL_SPATIAL = np.array([2, 4, 16, 16])
RULE_CASES = {
    # name: (build, pattern that folds or ("kept", reason), opset)
    "dropout-training-mode-true": (producer_then("Dropout", inputs=[np.array(0.0, np.float32), np.array(True)]),
                                   ("kept", "unproven-crossing"), 18),
    "reducemean-noop-without-axes": (producer_then("ReduceMean", noop_with_empty_axes=1), "conv-reducemean-bn", 18),
    "reducemax-of-everything-one-channel": (producer_then("ReduceMax", channels=1), "conv-reducemax-bn", 18),
    "reducemean-axes-attribute": (producer_then("ReduceMean", axes=[2, 3]), "conv-reducemean-bn", 13),
    "resize-of-the-channels": (producer_then("Resize", channels=8, inputs=[None, np.array([1, 2, 1, 1], np.float32)]),
                               ("kept", "channel-axis-mismatch"), 18),
    "upsample-9-scales-input": (producer_then("Upsample", inputs=[SCALES]), "conv-upsample-bn", 9),
    "upsample-7-scales-attribute": (producer_then("Upsample", scales=[1.0, 1.0, 2.0, 2.0]), "conv-upsample-bn", 7),
    "resize-10-scales-input": (producer_then("Resize", inputs=[SCALES]), "conv-resize-bn", 10),
    "resize-spatial-axes": (producer_then("Resize", inputs=[None, np.array([2, 2], np.float32)], axes=[2, 3]),
                            "conv-resize-bn", 18),
    "resize-axes-with-channels": (producer_then("Resize", inputs=[None, np.array([1, 2, 2], np.float32)],
                                                axes=[1, 2, 3]), "conv-resize-bn", 18),
    "resize-sizes": (producer_then("Resize", inputs=[None, None, ALL_SPATIAL]), "conv-resize-bn", 18),
    "resize-sizes-of-the-channels": (producer_then("Resize", channels=8, inputs=[None, None, np.array([2, 8, 8, 8])]),
                                     ("kept", "channel-axis-mismatch"), 18),
    # not_larger scales every axis by the smallest ratio: here the channels halve
    "resize-sizes-not-larger": (producer_then("Resize", channels=2, inputs=[None, None, np.array([2, 4, 4, 4])],
                                              keep_aspect_ratio_policy="not_larger"),
                                ("kept", "channel-axis-mismatch"), 18),
    "slice-to-one-channel": (producer_then("Slice", channels=1, inputs=[[2], [3], [1]]), "conv-slice-bn", 18),
    "slice-1-attributes": (producer_then("Slice", channels=2, starts=[1], ends=[3], axes=[1]), "conv-slice-bn", 9),
    "gather-one-channel": (producer_then("Gather", channels=1, inputs=[np.array([2])], axis=1), "conv-gather-bn", 18),
    "gather-along-a-later-axis": (producer_then("Gather", inputs=[np.array([0, 2, 4])], axis=3), "conv-gather-bn",
                                  18),
    # indices of rank 2 on the batch axis push the channels to axis 2
    "gather-batch-with-2d-indices": (producer_then("Gather", channels=2, inputs=[np.array([[0, 1]])], axis=0),
                                     ("kept", "channel-axis-mismatch"), 18),
    "gather-channels-with-2d-indices": (producer_then("Gather", channels=2, inputs=[np.array([[0, 1], [2, 3]])],
                                                      axis=1), ("kept", "unproven-crossing"), 18),
    "pad-2-attributes-reflect": (producer_then("Pad", pads=[0, 0, 1, 1, 0, 0, 1, 1], mode="reflect"), "conv-pad-bn",
                                 10),
    "pad-2-value-attribute": (producer_then("Pad", pads=[0, 0, 1, 1, 0, 0, 1, 1], value=0.0), ("kept", "pad-value"),
                              10),
    "pad-18-axes-input": (producer_then("Pad", inputs=[[1, 1, 1, 1], None, [2, 3]], mode="edge"), "conv-pad-bn", 18),
    "pad-constant-value-input": (producer_then("Pad", inputs=[[0, 0, 1, 1, 0, 0, 1, 1], np.array(1.5, np.float32)]),
                                 ("kept", "pad-value"), 18),
    # a pure scale keeps 0 but moves 1.5: the value given is the one checked, not 0
    "pad-value-input-pure-scale": (producer_then("Pad", shift=False, inputs=[[0, 0, 1, 1, 0, 0, 1, 1],
                                                                              np.array(1.5, np.float32)]),
                                   ("kept", "pad-value"), 18),
    "pad-2-value-attribute-pure-scale": (producer_then("Pad", shift=False, pads=[0, 0, 1, 1, 0, 0, 1, 1], value=1.5),
                                         ("kept", "pad-value"), 10),
    "pad-2-default-value-pure-scale": (producer_then("Pad", shift=False, pads=[0, 0, 1, 1, 0, 0, 1, 1]),
                                       "conv-pad-bn", 10),
    "dropout-7-has-no-is-test": (producer_then("Dropout"), "conv-dropout-bn", 7),
    # SAME padding and ceil_mode's partial windows pad as well as explicit pads do
    "averagepool-same-upper-counted": (producer_then("AveragePool", kernel_shape=[2, 2], auto_pad="SAME_UPPER",
                                                     count_include_pad=1), ("kept", "shift-not-crossing"), 18),
    "averagepool-ceil-mode-counted": (producer_then("AveragePool", kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1,
                                                    count_include_pad=1), ("kept", "shift-not-crossing"), 18),
    # keepdims defaults to 1: the channels stay on axis 1 of the batch-reduced output
    "reducemean-batch-default-keepdims": (producer_then("ReduceMean", inputs=[[0]]), "conv-reducemean-bn", 18),
    # Dropout's ratio alone, and a training_mode that is a constant false
    "dropout-ratio-input": (producer_then("Dropout", inputs=[np.float32(0.5)]), "conv-dropout-bn", 13),
    "dropout-training-false": (producer_then("Dropout", inputs=[np.float32(0.5), np.array(False)]),
                               "conv-dropout-bn", 13),
    "globalmaxpool-negative-scale": (producer_then("GlobalMaxPool", sign=-1.0), ("kept", "negative-scale"), 18),
    "averagepool-same-lower-counted": (producer_then("AveragePool", kernel_shape=[2, 2], auto_pad="SAME_LOWER",
                                                     count_include_pad=1), ("kept", "shift-not-crossing"), 18),
    # counting padding that is not there: nothing to count
    "averagepool-counted-without-pads": (producer_then("AveragePool", kernel_shape=[2, 2], strides=[2, 2],
                                                       count_include_pad=1), "conv-averagepool-bn", 18),
    "pad-18-negative-axes": (producer_then("Pad", inputs=[[1, 2, 1, 0], None, [-2, -1]], mode="edge"), "conv-pad-bn",
                             18),
    "pad-18-negative-axis-on-channels": (producer_then("Pad", channels=6, inputs=[[1, 1], None, [-3]], mode="edge"),
                                         ("kept", "channel-axis-mismatch"), 18),
    # Slice's axes default to 0, 1, ...: the first three axes, the channels kept whole
    "slice-no-axes": (producer_then("Slice", inputs=[[0, 0, 1], [2, 4, 7]]), "conv-slice-bn", 18),
    "slice-1-no-axes": (producer_then("Slice", channels=2, starts=[0, 1], ends=[2, 3]), "conv-slice-bn", 9),
    "slice-two-axes": (producer_then("Slice", channels=3, inputs=[[1, 1], [4, 7], [1, 2], [1, 2]]), "conv-slice-bn",
                       18),
    "slice-batch-negative-axis": (producer_then("Slice", inputs=[[0], [1], [-4]]), "conv-slice-bn", 18),
    "gather-channels-counted-from-the-end": (producer_then("Gather", channels=2, inputs=[np.array([-4, 3])], axis=1),
                                             "conv-gather-bn", 18),
    # scales as Resize-10's second input, as Upsample-7's attribute; Resize-11 reads roi there
    "resize-10-scales-input": (producer_then("Resize", inputs=[SCALES]), "conv-resize-bn", 10),
    "upsample-7-scales-attribute": (producer_then("Upsample", scales=[1.0, 1.0, 2.0, 2.0]), "conv-upsample-bn", 7),
    "resize-11-roi-then-scales": (producer_then("Resize", inputs=[np.zeros(0, np.float32), SCALES]), "conv-resize-bn",
                                  11),
}


@pytest.mark.parametrize("is_test, expected", [(None, ("kept", "unproven-crossing")), (1, ("folded", None))])
def test_dropout_before_opset_7_crosses_only_with_is_test(tmp_path, is_test, expected):
    """Dropout-6 runs in training mode unless is_test=1 (its default is 0)."""
    b = GraphBuilder(seed=17)
    y = b.node("Dropout", [conv(b, b.input(list(SHAPE)))], **({} if is_test is None else {"is_test": is_test}))
    b.output(b.node("BatchNormalization", [y, *b.bn_params(4)], name="the_bn", is_test=1))
    onnx.save(b.model(opset=6, ir_version=3), tmp_path / "in.onnx")
    entry = the_bn(bnfold.fold(tmp_path / "in.onnx"))
    assert (entry.status, entry.reason) == expected


def test_a_uniform_map_crosses_a_pad(tmp_path):
    """A scalar Mul after ``Conv -> Pad(edge)``: one value on every channel, no channel to follow."""
    b = GraphBuilder(seed=18)
    y = b.node("Pad", [conv(b, b.input(list(SHAPE))), b.const(np.array([1, 1])), b.const(np.array(0, np.float32)),
                       b.const(np.array([-1]))], mode="edge")
    b.output(b.node("Mul", [y, b.const(np.float32(3.0))], name="the_bn"))
    result, out = fold(b.model(18), tmp_path)
    folded(result, out, "conv-pad-mul")


@pytest.mark.parametrize("case", RULE_CASES)
def test_each_crossing_rule(tmp_path, case):
    build, expected, opset = RULE_CASES[case]
    b = GraphBuilder(seed=len(case) + 60)
    b.output(build(b))
    model = b.model(opset)
    result, out = fold(model, tmp_path)
    if isinstance(expected, tuple):
        kept(result, out, model, expected[1])
    else:
        entry = folded(result, out, expected)
        assert entry.route.startswith(f"through {model.graph.node[1].op_type} ")  # the op crossed, named


def split_then(pieces: int, channels: int, opset: int, piece: int = 0, c_out: int = 4, read_others: bool = False,
               axis: int | None = 1, **attrs):
    """``Conv(c_out) -> Split(axis) -> BN(channels) on one piece``; the other pieces are unread
    (``read_others``: each is a graph output, whose numbers a wrong fold would change)."""
    def build(b: GraphBuilder):
        sizes = attrs.pop("sizes", None)
        inputs = [conv(b, b.input(list(SHAPE)), c_out=c_out)] + ([b.const(np.array(sizes))] if sizes is not None
                                                                 else [])
        outs = b.node("Split", inputs, n_out=pieces, **({} if axis is None else {"axis": axis}), **attrs)
        if read_others:
            for i, other in enumerate(outs):
                if i != piece:
                    b.output(other)
        return bn(b, outs[piece], channels, sign=None)
    return build


@pytest.mark.parametrize("case, build, opset", [
    ("one-channel", split_then(2, 1, 18, sizes=[1, 3]), 18),
    ("split-attribute", split_then(2, 3, 11, split=[3, 1]), 11),
    ("equal-parts", split_then(2, 2, 18, num_outputs=2), 18),
    # 5 channels in 2 equal parts: 3 and 2 (the last one smaller)
    ("equal-parts-last-smaller", split_then(2, 2, 18, piece=1, c_out=5, num_outputs=2), 18),
    # sizes as an input, not equal parts: the BN's 3 channels are 0..2, and piece 1 keeps its numbers
    ("sizes-input-other-piece-read", split_then(2, 3, 13, sizes=[3, 1], read_others=True), 13),
    # no axis attribute: axis 0, the batch; every piece keeps all the channels
    ("default-axis-is-the-batch", split_then(2, 4, 13, axis=None, sizes=[1, 1]), 13),
    # the batch named from the end
    ("negative-batch-axis", split_then(2, 4, 13, axis=-4, sizes=[1, 1]), 13),
    # the third of three pieces starts after the first two: channels 2 and 3
    ("third-of-three", split_then(3, 2, 18, piece=2, sizes=[1, 1, 2], read_others=True), 18),
    # 4 channels in 3 equal parts: 2, 2 and an empty last one
    ("equal-parts-last-empty", split_then(3, 2, 18, piece=1, num_outputs=3), 18),
    # a piece of size 0 is a valid piece: the BN's piece still starts at channel 2
    ("an-empty-piece-between", split_then(3, 2, 13, piece=2, sizes=[2, 0, 2]), 13),
])
def test_channel_split_pieces(tmp_path, case, build, opset):
    """Split's sizes as an input, as Split-11's attribute, and as opset 18's equal parts."""
    b = GraphBuilder(seed=len(case) + 70)
    b.output(build(b))
    result, out = fold(b.model(opset), tmp_path)
    folded(result, out, "conv-split-bn")


@pytest.mark.parametrize("op", ["Slice", "Gather", "Pad", "Dropout", "ReduceSum", "Resize", "ResizeChannels",
                                "PadValue"])
def test_op_parameters_fed_at_run_time_stop_the_route(tmp_path, op):
    """Starts, indices, pads, Dropout's training flag, the reduced axes, Resize's scales and
    a Pad's value given as graph inputs: what the op does to the channels (or which value
    it pads with) is unknown, so the BN stays, and the reason names the op."""
    b = GraphBuilder(seed=80)
    y = conv(b, b.input(list(SHAPE)))
    param, value = {"Slice": (("p", [1], np.int64), np.array([0])),
                    "Gather": (("p", [2], np.int64), np.array([0, 1])),
                    "Pad": (("p", [8], np.int64), np.zeros(8, np.int64)),
                    "Dropout": (("p", [], np.bool_), np.array(False)),
                    "ReduceSum": (("p", [1], np.int64), np.array([2])),
                    "Resize": (("p", [4], np.float32), np.array([1, 1, 2, 2], np.float32)),
                    "ResizeChannels": (("p", [1], np.float32), np.array([1], np.float32)),
                    "PadValue": (("p", [], np.float32), np.array(0.0, np.float32))}[op]
    b.inputs.append(onnx.helper.make_tensor_value_info(param[0], {np.int64: onnx.TensorProto.INT64,
                                                                  np.bool_: onnx.TensorProto.BOOL,
                                                                  np.float32: onnx.TensorProto.FLOAT}[param[2]],
                                                       param[1]))
    inputs = {"Slice": [y, b.const(np.array([0])), "p", b.const(np.array([3]))],
              "Gather": [y, "p"], "Pad": [y, "p"], "Dropout": [y, "", "p"], "ReduceSum": [y, "p"],
              "Resize": [y, "", "p"], "ResizeChannels": [y, "", "p"],
              "PadValue": [y, b.const(np.array([0, 0, 1, 1, 0, 0, 1, 1])), "p"]}[op]
    attrs = {"axis": 1} if op == "Gather" else {"keepdims": 1} if op == "ReduceSum" else \
        {"axes": [1]} if op == "ResizeChannels" else {}  # Resize-18 scaling only the channel axis
    op = op.removesuffix("Value").removesuffix("Channels")
    channels = 2 if op == "Gather" else 4
    b.output(bn(b, b.node(op, inputs, **attrs), channels, shift=op != "ReduceSum"), shape=["n", "c", "h", "w"])
    model = b.model(18)
    feeds = {"x": np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32), "p": value}
    result, out = fold_and_compare(model, feeds, tmp_path)
    # Resize's scales may resize the channel axis too
    entry = kept(result, out, model, "channel-axis-mismatch" if op == "Resize" else "unproven-crossing")
    assert entry.detail.startswith(f"{op} ")


def test_maxpool_whose_indices_are_read_stops_the_route(tmp_path):
    """The argmax indices would move if the map's rounding changed a tie: kept."""
    b = GraphBuilder(seed=81)
    values, indices = b.node("MaxPool", [conv(b, b.input(list(SHAPE)))], n_out=2, kernel_shape=[2, 2])
    b.output(bn(b, values, 4))
    b.output(indices, dtype=np.int64)
    model = b.model(18)
    result, out = fold(model, tmp_path)
    kept(result, out, model, "unproven-crossing")


def test_reduce_sum_over_dims_of_unknown_size(tmp_path):
    """ReduceSum multiplies a shift by the number of elements summed: over symbolic dims
    only a pure scale crosses it."""
    for shift, expected in ((True, "shift-not-crossing"), (False, None)):
        b = GraphBuilder(seed=82)
        y = b.node("ReduceSum", [conv(b, b.input(["N", 4, "H", "W"])), b.const(np.array([2, 3]))], keepdims=1)
        b.output(bn(b, y, 4, shift=shift))
        model = b.model(18)
        result, out = fold(model, tmp_path)
        if expected:
            kept(result, out, model, expected)
        else:
            folded(result, out, "conv-reducesum-bn")


def test_opset_6_dropout_in_training_mode_stops_the_route(tmp_path):
    """Dropout-6 with is_test=0 drops elements: no map crosses it (is_test=1 does)."""
    for is_test, status in ((0, "kept"), (1, "folded")):
        b = GraphBuilder(seed=83)
        y = b.node("Dropout", [conv(b, b.input(list(SHAPE)))], is_test=is_test)
        b.output(b.node("BatchNormalization", [y, *b.bn_params(4)], name="the_bn", is_test=1))
        onnx.save(b.model(6), tmp_path / "m.onnx")
        entry = the_bn(bnfold.fold(tmp_path / "m.onnx"))
        assert entry.status == status, entry.detail
        if status == "kept":
            assert entry.reason == "unproven-crossing" and "training mode" in entry.detail


def test_a_map_read_as_another_input_than_the_data_does_not_cross(tmp_path):
    """``x * 2`` used as a Pad's constant value is no data the map travels with: nothing
    folds into the conv after the Pad (the Mul is no site)."""
    b = GraphBuilder(seed=84)
    s = b.input([], name="s")
    value = b.node("Mul", [s, b.const(np.array(2.0, np.float32))])
    padded = b.node("Pad", [b.input(list(SHAPE)), b.const(np.array([0, 0, 1, 1, 0, 0, 1, 1])), value])
    b.output(conv(b, padded, k=3))
    model = b.model(18)
    feeds = {"x": np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32),
             "s": np.array(0.7, np.float32)}
    result, out = fold_and_compare(model, feeds, tmp_path)
    assert count_ops(out, "Mul") == 1 and not [e for e in result.ledger if e.status == "folded"]


def test_a_map_whose_channel_axis_is_unproven_does_not_cross_axis_ops(tmp_path):
    """A MatMul's channels are its last axis; with its input's rank unknown, a Slice cannot
    be proven to leave them alone: kept."""
    b = GraphBuilder(seed=85)
    x = b.input(None)
    y = b.node("MatMul", [x, b.random([4, 4])])
    y = b.node("Slice", [y, b.const(np.array([0])), b.const(np.array([1])), b.const(np.array([0]))])
    b.output(b.node("Mul", [y, b.const(np.array([1.5, 2.0, 0.5, 3.0], np.float32))], name="the_bn"))
    model = b.model(18)
    onnx.save(model, tmp_path / "m.onnx")  # no shapes at all: onnx's full check would refuse it
    result = bnfold.fold(tmp_path / "m.onnx")
    result.save(tmp_path / "out.onnx")
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)}
    np.testing.assert_allclose(run(tmp_path / "out.onnx", feeds)[0], run(model, feeds)[0], rtol=1e-5)
    kept(result, onnx.load(tmp_path / "out.onnx"), model, "unproven-crossing")


def test_a_pool_over_the_channel_axis_stops_the_route(tmp_path):
    """A MatMul's channels on the last axis of a 3-D tensor are what a 1-D MaxPool pools
    over: a per-channel map cannot cross it, even where the pool keeps the size."""
    b = GraphBuilder(seed=86)
    y = b.node("MatMul", [b.input([2, 8, 4]), b.random([4, 4])])
    y = b.node("MaxPool", [y], kernel_shape=[3], pads=[1, 1])
    b.output(b.node("Mul", [y, b.const(np.array([1.5, 2.0, 0.5, 3.0], np.float32))], name="the_bn"))
    model = b.model(18)
    result, out = fold_and_compare(model, {"x": np.random.default_rng(0).standard_normal((2, 8, 4))
                                           .astype(np.float32)}, tmp_path)
    kept(result, out, model, "channel-axis-mismatch")


def relu_bn_then(op: str, c_in: int, inputs=(), **attrs):
    """``Relu -> BN(4) -> op -> Conv(c_in -> 3)``; ``inputs``: the op's constant inputs."""
    def build(b: GraphBuilder):
        y = bn(b, b.node("Relu", [b.input(list(SHAPE))]), 4)
        y = b.node(op, [y] + [b.const(np.asarray(v)) for v in inputs], **attrs)
        return b.node("Conv", [y, b.random([3, c_in, 1, 1])])
    return build


UNRUNNABLE = {
    # name: (build, reason); axes, modes and sizes no valid model has, or no channel left
    "reduce-axis-at-the-rank": (producer_then("ReduceMean", inputs=[[4]]), "unproven-crossing"),
    "resize-mode-area": (producer_then("Resize", inputs=[np.zeros(0, np.float32), SCALES], mode="area"),
                         "unproven-crossing"),
    "pad-mode-mirror": (producer_then("Pad", inputs=[np.zeros(8, np.int64)], mode="mirror"), "unproven-crossing"),
    "gather-axis-past-the-rank": (producer_then("Gather", inputs=[np.array([0])], axis=5), "unproven-crossing"),
    "split-axis-past-the-rank": (lambda b: bn(b, b.node("Split", [conv(b, b.input(list(SHAPE))),
                                                                   b.const(np.array([1, 1]))], n_out=2, axis=5)[0], 4),
                                 "unproven-crossing"),
    "pad-value-of-two-numbers": (producer_then("Pad", shift=False, inputs=[[0, 0, 1, 1, 0, 0, 1, 1],
                                                                            np.zeros(2, np.float32)]),
                                 "unproven-crossing"),
    "split-sizes-past-the-channels": (lambda b: bn(b, b.node("Split", [conv(b, b.input(list(SHAPE))),
                                                                        b.const(np.array([3, 3]))], n_out=2,
                                                              axis=1)[0], 3), "unproven-crossing"),
    "resize-five-scales-for-four-axes": (producer_then("Resize", inputs=[None, np.array([1, 1, 2, 2, 1], np.float32)]),
                                         "channel-axis-mismatch"),
    "split-negative-size": (lambda b: bn(b, b.node("Split", [conv(b, b.input(list(SHAPE))), b.const(np.array([5, -1]))],
                                                    n_out=2, axis=1)[0], 5), "unproven-crossing"),
    "slice-keeps-no-channel": (relu_bn_then("Slice", 0, inputs=[[2], [2], [1]]), "zero-size"),
    "gather-keeps-no-channel": (relu_bn_then("Gather", 0, inputs=[np.zeros(0, np.int64)], axis=1), "zero-size"),
    "slice-step-zero": (producer_then("Slice", inputs=[[0], [2], [1], [0]]), "unproven-crossing"),
    "gather-axis-at-the-rank": (producer_then("Gather", inputs=[np.array([0])], axis=4), "unproven-crossing"),
    "gather-channel-past-the-count": (producer_then("Gather", channels=2, inputs=[np.array([2, 4])], axis=1),
                                      "unproven-crossing"),
    "split-axis-at-the-rank": (lambda b: bn(b, b.node("Split", [conv(b, b.input(list(SHAPE))),
                                                                 b.const(np.array([1, 1]))], n_out=2, axis=4)[0], 4),
                               "unproven-crossing"),
    "slice-axis-at-the-rank": (producer_then("Slice", inputs=[[0], [2], [4]]), "unproven-crossing"),
}


@pytest.mark.parametrize("case", UNRUNNABLE)
def test_ops_onnxruntime_cannot_run_or_that_keep_no_channel_stop_the_route(tmp_path, case):
    """Such an op proves nothing about the channels: the BN stays, for a reason that names
    the op, and the model is unchanged (onnxruntime runs neither, so nothing is compared)."""
    build, reason = UNRUNNABLE[case]
    b = GraphBuilder(seed=len(case) + 100)
    b.output(build(b), shape=None)
    model = b.model(18)
    onnx.save(model, tmp_path / "m.onnx")
    result = bnfold.fold(tmp_path / "m.onnx")
    result.save(tmp_path / "out.onnx")
    entry = kept(result, onnx.load(tmp_path / "out.onnx"), model, reason)
    (op,) = {n.op_type for n in model.graph.node} - {"Relu", "BatchNormalization", "Conv"}
    assert entry.detail.startswith(f"{op} ")


@pytest.mark.parametrize("op", ["Pad", "Split"])
def test_a_scalar_map_crosses_axis_ops(tmp_path, op):
    """``Conv -> op -> x * 0.7``: a scalar map needs no channel proof; Pad-18's axes input
    is read against the input's rank, and the route names the op."""
    b = GraphBuilder(seed=101)
    y = conv(b, b.input(list(SHAPE)))
    if op == "Pad":
        y = b.node("Pad", [y, b.const(np.array([1, 2, 0, 1])), "",
                           b.const(np.array([2, 3]))], mode="edge")
    else:
        y = b.node("Split", [y, b.const(np.array([3, 5]))], n_out=2, axis=2)[0]
    b.output(b.node("Mul", [y, b.const(np.float32(0.7))], name="the_bn"))
    result, out = fold(b.model(18), tmp_path)
    entry = the_bn(result)
    assert entry.status == "folded", (entry.reason, entry.detail)
    assert count_ops(out, "Mul") == 0
    assert entry.route.startswith(f"through {op} ")


def test_pad_1_paddings_attribute(tmp_path):
    """Pad-1 names its amounts ``paddings``: read, a scalar map crosses it (onnxruntime has
    no Pad-1: onnx's reference evaluator checks the numbers)."""
    from onnx.reference import ReferenceEvaluator
    b = GraphBuilder(seed=102)
    y = b.node("Pad", [conv(b, b.input(list(SHAPE)))], paddings=[0, 0, 1, 2, 0, 0, 2, 1], mode="edge")
    b.output(b.node("Mul", [y, b.const(np.float32(0.7))], name="the_bn", broadcast=1))
    model = b.model(1)
    onnx.save(model, tmp_path / "m.onnx")
    result = bnfold.fold(tmp_path / "m.onnx")
    result.save(tmp_path / "out.onnx")
    entry = the_bn(result)
    assert entry.status == "folded" and entry.route.startswith("through Pad "), (entry.reason, entry.detail)
    out = onnx.load(tmp_path / "out.onnx")
    assert count_ops(out, "Mul") == 0
    feeds = {"x": np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)}
    np.testing.assert_allclose(ReferenceEvaluator(out).run(None, feeds)[0],
                               ReferenceEvaluator(model).run(None, feeds)[0], rtol=1e-5, atol=1e-6)


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
    "reducemax": (then_conv("ReduceMax", inputs=[[2, 3]], keepdims=1), "bn-reducemax-conv"),
    "reducemean-noop-without-axes": (then_conv("ReduceMean", noop_with_empty_axes=1), "bn-reducemean-conv"),
    "resize-linear": (then_conv("Resize", inputs=[None, SCALES], mode="linear"), "bn-resize-conv"),
    "slice-spatial": (then_conv("Slice", inputs=[[-1], [0], [3], [-1]]), "bn-slice-conv"),
    "pad-reflect": (then_conv("Pad", inputs=[[0, 0, 1, 1, 0, 0, 1, 1]], mode="reflect"), "bn-pad-conv"),
    "dropout": (then_conv("Dropout"), "bn-dropout-conv"),
}


def test_map_crosses_downstream_into_channel_pieces(tmp_path):
    """``BN -> Split(channels 1 + 3) -> Conv, Conv``, ``BN -> Gather(channels 3, 0, 2) -> Conv``
    and ``BN -> Slice(channels 1..2) -> Conv``: each conv takes the map of the channels it reads."""
    b = GraphBuilder(seed=15)
    y = bn(b, b.node("Relu", [b.input(list(SHAPE))]), 4, sign=None)
    first, rest = b.node("Split", [y, b.const(np.array([1, 3]))], n_out=2, axis=1)
    picked = b.node("Gather", [y, b.const(np.array([3, 0, 2]))], axis=1)
    sliced = b.node("Slice", [y, b.const(np.array([1])), b.const(np.array([3])), b.const(np.array([1]))])
    b.output(b.node("Concat", [conv(b, first, c_in=1, name="a"), conv(b, rest, c_in=3, name="b"),
                               conv(b, picked, c_in=3, name="c"), conv(b, sliced, c_in=2, name="d")], axis=1))
    result, out = fold(b.model(18), tmp_path)
    entry = folded(result, out)
    assert entry.into == "a, b, c, d" and count_ops(out, "Add") == 0


@pytest.mark.parametrize("attrs", [{}, {"axis": -4}, {"axis": 3}])
def test_map_crosses_a_gather_off_the_channel_axis_into_a_conv(tmp_path, attrs):
    """``BN -> Gather(batch rows 1, 0 | width columns) -> Conv``: the channels stay on axis 1
    of a rank-4 tensor (Gather's axis defaults to 0, the batch; -4 names it from the end)."""
    b = GraphBuilder(seed=19)
    y = bn(b, b.node("Relu", [b.input(list(SHAPE))]), 4, sign=None)
    y = b.node("Gather", [y, b.const(np.array([1, 0]))], **attrs)
    b.output(conv(b, y, name="c"))
    result, out = fold(b.model(18), tmp_path)
    entry = folded(result, out)
    assert entry.into == "c" and entry.route.startswith("through Gather")


def test_map_crosses_a_batch_gather_into_a_matmul(tmp_path):
    """``BN -> Gather(rows 1, 0) -> MatMul`` on ``[N, C]``: the rank stays 2, so the channels
    are still the last axis, the one MatMul reads."""
    b = GraphBuilder(seed=20)
    y = bn(b, b.node("Relu", [b.input([2, 4])]), 4, sign=None)
    b.output(b.node("MatMul", [b.node("Gather", [y, b.const(np.array([1, 0]))]), b.random([4, 3])], name="mm"))
    result, out = fold(b.model(18), tmp_path, shape=(2, 4))
    assert folded(result, out).into == "mm"


@pytest.mark.parametrize("axes", [[2, 3], [0, 2, 3], [-1, -2]])
def test_map_crosses_a_reduction_that_drops_axes_into_a_matmul(tmp_path, axes):
    """``BN -> ReduceMean(axes, keepdims=0) -> MatMul``: the channels end on the last axis
    of what is left (rank 4 - len(axes), the axis less the dropped axes before it), the
    axis MatMul reads."""
    b = GraphBuilder(seed=16)
    y = bn(b, b.node("Relu", [b.input(list(SHAPE))]), 4, sign=None)
    y = b.node("ReduceMean", [y, b.const(np.array(axes))], keepdims=0)
    b.output(b.node("MatMul", [y, b.random([4, 3])], name="mm"))
    result, out = fold(b.model(18), tmp_path)
    entry = folded(result, out)
    assert entry.into == "mm" and entry.route.startswith("through ReduceMean")


def test_a_reduction_over_every_axis_stops_a_channel_map(tmp_path):
    """``BN -> ReduceMean(no axes) -> Conv``: no axes reduces every axis, the channels
    included (noop_with_empty_axes defaults to 0), so the map cannot reach the conv."""
    b = GraphBuilder(seed=22)
    y = b.node("ReduceMean", [bn(b, b.node("Relu", [b.input(list(SHAPE))]), 4, sign=None)], keepdims=1)
    b.output(conv(b, y, c_in=1))
    model = b.model(18)
    result, out = fold(model, tmp_path)
    kept(result, out, model, "channel-axis-mismatch")


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


# --- the router's own refusals -------------------------------------------------------


@pytest.mark.parametrize("hops, status", [(20, "folded"), (40, "kept")])
def test_routes_are_bounded(tmp_path, hops, status):
    """Planning time is bounded: a map crosses a long chain of ops, but not an unbounded one."""
    b = GraphBuilder(seed=90)
    y = conv(b, b.input(list(SHAPE)))
    for _ in range(hops):
        y = b.node("Identity", [y])
    b.output(bn(b, y, 4))
    model = b.model(18)
    result, out = fold(model, tmp_path)
    if status == "kept":
        kept(result, out, model, "no-linear-producer")
    else:
        folded(result, out)


def channels_last(b: GraphBuilder, x: str) -> str:
    """A MatMul of a (2, 4, 4, 4) tensor: its channels are the last axis, not axis 1."""
    return b.node("MatMul", [x, b.random([4, 4])])


@pytest.mark.parametrize("join", ["Add", "Concat"])
def test_joined_operands_with_channels_on_different_axes_stay(tmp_path, join):
    """A sum or Concat of a conv (channels on axis 1) and a MatMul (channels last): no one
    channel axis for the map to split along."""
    b = GraphBuilder(seed=91)
    x = b.input([2, 4, 4, 4])
    joined = b.node(join, [conv(b, x), channels_last(b, b.node("Relu", [x]))], **({"axis": 1} if join == "Concat"
                                                                                   else {}))
    model_bn = bn(b, joined, 8 if join == "Concat" else 4)
    b.output(model_bn)
    model = b.model(18)
    result, out = fold(model, tmp_path, shape=(2, 4, 4, 4))
    kept(result, out, model, "unproven-layout")


def invalid(tmp_path, build) -> Exception:
    b = GraphBuilder(seed=92)
    b.output(build(b), shape=None)
    onnx.save(b.model(18), tmp_path / "bad.onnx")
    with pytest.raises(InputError) as raised:
        bnfold.fold(tmp_path / "bad.onnx")
    return raised.value


def test_invalid_concats_and_channel_counts_are_refused_as_invalid(tmp_path):
    """Shapes a valid model cannot have are bad input (exit 2), not a reason to keep."""
    x = list(SHAPE)
    assert "invalid model" in str(invalid(tmp_path, lambda b: bn(b, b.node("Concat", [conv(b, b.input(x)),
                                                                                      conv(b, b.input(x, "y"))],
                                                                           axis=4), 4)))
    assert "invalid model" in str(invalid(tmp_path, lambda b: bn(b, b.node("Concat", [
        conv(b, b.input(x)), conv(b, b.input(x, "y"), c_out=8)], axis=2), 4)))
    assert "invalid model" in str(invalid(tmp_path, lambda b: conv(b, bn(b, b.node("Relu", [b.input(x)]), 4),
                                                                   c_in=8)))
    assert "invalid model" in str(invalid(tmp_path, lambda b: b.node("Gemm", [
        b.node("Flatten", [bn(b, b.node("Relu", [b.input([2, 4, 2, 2])]), 4)]), b.random([15, 3])])))


@pytest.mark.parametrize("other", ["graph-output", "two-gemms", "reshape"])
def test_a_flattened_map_must_lead_to_one_matrix_op(tmp_path, other):
    """``BN -> Flatten -> Gemm`` folds only when the flattened features go to that Gemm alone."""
    b = GraphBuilder(seed=93)
    flat = b.node("Flatten", [bn(b, b.node("Relu", [b.input(list(SHAPE))]), 4)])
    if other == "reshape":
        flat = b.node("Reshape", [flat, b.const(np.array([2, 256]))])
    b.output(b.node("Gemm", [flat, b.random([256, 3])]))
    if other == "graph-output":
        b.output(flat)
    elif other == "two-gemms":
        b.output(b.node("Gemm", [flat, b.random([256, 5])]))
    model = b.model(18)
    result, out = fold(model, tmp_path)
    kept(result, out, model, {"graph-output": "graph-output", "two-gemms": "fan-out",
                              "reshape": "no-linear-producer"}[other])


def test_a_map_concatenated_along_another_axis_stays(tmp_path):
    """``Concat(BN(x), y, axis=2) -> Conv``: the conv reads y's rows too, which carry no map."""
    b = GraphBuilder(seed=94)
    x = b.input(list(SHAPE))
    y = b.node("Concat", [bn(b, b.node("Relu", [x]), 4), b.node("Sigmoid", [x])], axis=2)
    b.output(conv(b, y))
    model = b.model(18)
    result, out = fold(model, tmp_path)
    kept(result, out, model, "unproven-crossing")


def test_a_map_concatenated_with_inputs_of_unknown_channel_count_stays(tmp_path):
    """Where the map's channels start in the Concat's output depends on the other inputs'
    channel counts: unknown ones stop the route."""
    b = GraphBuilder(seed=95)
    other = b.input(["N", "C", 8, 8], name="y")
    y = b.node("Concat", [other, bn(b, b.node("Relu", [b.input(list(SHAPE))]), 4)], axis=1)
    b.output(b.node("Conv", [y, b.random([3, 6, 1, 1])]), shape=["N", 3, 8, 8])
    model = b.model(18)
    rng = np.random.default_rng(0)
    feeds = {"x": rng.standard_normal(SHAPE).astype(np.float32), "y": rng.standard_normal((2, 2, 8, 8))
             .astype(np.float32)}
    result, out = fold_and_compare(model, feeds, tmp_path)
    kept(result, out, model, "unproven-crossing")


def test_a_scalar_map_into_a_concat_of_unknown_shape_stays(tmp_path):
    """``x * 2 -> Concat -> Conv`` with x of unknown shape: which channels of the Concat the
    map covers cannot be told."""
    b = GraphBuilder(seed=96)
    x = b.input(None)
    y = b.node("Concat", [b.node("Mul", [x, b.const(np.float32(2.0))], name="the_bn"), b.node("Relu", [x])], axis=1)
    b.output(conv(b, y, c_in=8), shape=None)
    model = b.model(18)
    onnx.save(model, tmp_path / "m.onnx")
    result = bnfold.fold(tmp_path / "m.onnx")
    result.save(tmp_path / "out.onnx")
    feeds = {"x": np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)}
    np.testing.assert_allclose(run(tmp_path / "out.onnx", feeds)[0], run(model, feeds)[0], rtol=1e-5, atol=1e-6)
    kept(result, onnx.load(tmp_path / "out.onnx"), model, "unproven-crossing")


# --- route.py: refusals and crossings each path of the router takes (issue 27) -----------


def test_the_route_names_every_crossing_from_the_site_back(tmp_path):
    """Two crossings, two notes in the ledger, from the site back, as inspect reports them."""
    b = GraphBuilder(seed=100)
    y = b.node("MaxPool", [conv(b, b.input(list(SHAPE)), name="c")], kernel_shape=[2, 2], name="p")
    b.output(bn(b, b.node("Identity", [y], name="i"), 4))
    result, out = fold(b.model(18), tmp_path)
    entry = folded(result, out, "conv-maxpool-identity-bn")
    assert entry.route == "through Identity 'i'; through MaxPool 'p' (all 4 scales > 0)"
    (finding,) = bnfold.inspect(tmp_path / "in.onnx")
    assert entry.route in finding.plan


@pytest.mark.parametrize("join", ["Concat", "Sum"])
def test_a_join_with_an_empty_input_is_kept(tmp_path, join):
    """An empty name among a Concat's or Sum's inputs (the loader lets a variadic input be
    empty): no route through it, the BN stays."""
    b = GraphBuilder(seed=101)
    y = b.node(join, [conv(b, b.input(list(SHAPE))), ""], **({"axis": 1} if join == "Concat" else {}))
    b.output(bn(b, y, 4), shape=None)
    model = b.model(18)
    onnx.save(model, tmp_path / "m.onnx")
    result = bnfold.fold(tmp_path / "m.onnx")
    result.save(tmp_path / "out.onnx")
    entry = kept(result, onnx.load(tmp_path / "out.onnx"), model, "no-linear-producer")
    assert "empty input" in entry.detail


def test_a_side_output_of_a_crossing_carries_no_map(tmp_path):
    """Dropout-9's mask is a float tensor a BN may read; it is no data output, so the map
    does not travel back through it to the conv."""
    b = GraphBuilder(seed=102)
    _, mask = b.node("Dropout", [conv(b, b.input(list(SHAPE)))], n_out=2)
    b.output(bn(b, mask, 4), shape=list(SHAPE))
    model = b.model(9)
    result, out = fold(model, tmp_path)
    entry = kept(result, out, model, "no-linear-producer")
    assert "not the data output of Dropout" in entry.detail


def test_a_route_that_reaches_a_linear_op_only_through_a_side_output_is_kept(tmp_path):
    """``BN -> Dropout-9``: a conv reads the mask, nothing reads the data output. A linear op
    lies beyond, but no map reaches it."""
    b = GraphBuilder(seed=103)
    _, mask = b.node("Dropout", [bn(b, b.node("Relu", [b.input(list(SHAPE))]), 4)], n_out=2)
    b.output(conv(b, mask), shape=list(SHAPE))
    model = b.model(9)
    result, out = fold(model, tmp_path)
    entry = kept(result, out, model, "no-linear-producer")
    assert "leads to no linear op" in entry.detail


def test_a_bn_output_read_by_a_non_linear_op_and_returned_is_kept_for_the_reader(tmp_path):
    """A BN read by a Relu and returned as a graph output: no linear op reads it, which is
    the reason given (not the graph output a route would have to change)."""
    b = GraphBuilder(seed=104)
    y = bn(b, b.node("Relu", [b.input(list(SHAPE))]), 4)
    b.output(y)
    b.output(b.node("Relu", [y]))
    model = b.model(18)
    result, out = fold(model, tmp_path)
    entry = kept(result, out, model, "no-linear-producer")
    assert "Relu" in entry.detail


def test_several_readers_none_of_which_leads_to_a_linear_op_is_kept(tmp_path):
    """``BN -> Relu`` and ``BN -> Flatten -> Reshape -> Gemm`` (the flattened map does not
    reach the Gemm directly): every reader fails for want of a linear op."""
    b = GraphBuilder(seed=105)
    y = bn(b, b.node("Relu", [b.input(list(SHAPE))]), 4)
    b.output(b.node("Relu", [y]))
    flat = b.node("Reshape", [b.node("Flatten", [y]), b.const(np.array([2, 256]))])
    b.output(b.node("Gemm", [flat, b.random([256, 3])]))
    model = b.model(18)
    result, out = fold(model, tmp_path)
    entry = kept(result, out, model, "no-linear-producer")
    assert "none leads to a linear op" in entry.detail


@pytest.mark.parametrize("site", ["scalar-mul", "one-channel-bn"])
def test_a_uniform_map_crosses_a_flatten_into_a_gemm(tmp_path, site):
    """A uniform map has no channel for a Flatten to merge: it crosses like any layout op."""
    b = GraphBuilder(seed=106)
    if site == "scalar-mul":
        x = b.node("Relu", [b.input(list(SHAPE))])
        y, features, pattern = b.node("Mul", [x, b.const(np.float32(1.7))], name="the_bn"), 256, "mul-flatten-gemm"
    else:
        y, features, pattern = bn(b, b.node("Relu", [b.input([2, 1, 8, 8])]), 1), 64, "bn-flatten-gemm"
    b.output(b.node("Gemm", [b.node("Flatten", [y]), b.random([features, 3]), b.random([3])]))
    result, out = fold(b.model(18), tmp_path, shape=SHAPE if site == "scalar-mul" else (2, 1, 8, 8))
    folded(result, out, pattern)


def test_a_reshape_that_keeps_the_channels_whole_is_crossed(tmp_path):
    """``BN -> Reshape(N, C, H*W) -> Conv1d``: the channels stay on axis 1; no flatten."""
    b = GraphBuilder(seed=107)
    y = bn(b, b.node("Relu", [b.input(list(SHAPE))]), 4, sign=None)
    y = b.node("Reshape", [y, b.const(np.array([2, 4, 64]))])
    b.output(b.node("Conv", [y, b.random([3, 4, 1]), b.random([3])]))
    result, out = fold(b.model(18), tmp_path)
    folded(result, out, "bn-reshape-conv")


@pytest.mark.parametrize("gamma, beta", [([1.0, 1.0, 2.0], [0.0, 1.0, 0.0]),  # one scale, two shifts
                                         ([1.0, 2.0, 2.0], [0.5, 0.5, 0.0])])  # two scales, one shift
def test_a_channel_gathered_twice_must_take_one_map_in_scale_and_shift(tmp_path, gamma, beta):
    """``Conv -> Gather([0, 0, 1]) -> BN``: conv channel 0 would take BN channels 0 and 1's
    maps; they differ in the shift alone or in the scale alone, and either keeps the BN."""
    b = GraphBuilder(seed=108)
    y = b.node("Gather", [conv(b, b.input(list(SHAPE))), b.const(np.array([0, 0, 1]))], axis=1)
    params = [b.const(np.asarray(v, np.float32)) for v in (gamma, beta, np.zeros(3), np.ones(3))]
    b.output(b.node("BatchNormalization", [y, *params], name="the_bn", epsilon=0.0))
    model = b.model(18)
    result, out = fold(model, tmp_path)
    kept(result, out, model, "unproven-crossing")


def test_a_concat_with_an_operand_of_unknown_rank_stays(tmp_path):
    """``Concat(Conv, MatMul of unknown rank) -> BN``: where the MatMul's channels lie cannot
    be proven, so the Concat has no shared channel axis."""
    b = GraphBuilder(seed=109)
    x = b.input(list(SHAPE))
    joined = b.node("Concat", [conv(b, x), b.node("MatMul", [b.input(None, name="z"), b.random([8, 8])])], axis=1)
    b.output(bn(b, joined, 8))
    model = b.model(18)
    onnx.save(model, tmp_path / "m.onnx")  # z has no shape: onnx's full check would refuse it
    result = bnfold.fold(tmp_path / "m.onnx")
    result.save(tmp_path / "out.onnx")
    rng = np.random.default_rng(0)
    feeds = {"x": rng.standard_normal(SHAPE).astype(np.float32),
             "z": rng.standard_normal((2, 4, 8, 8)).astype(np.float32)}
    np.testing.assert_allclose(run(tmp_path / "out.onnx", feeds)[0], run(model, feeds)[0], rtol=1e-5, atol=1e-6)
    kept(result, onnx.load(tmp_path / "out.onnx"), model, "unproven-layout")


def as_opset_13(model: onnx.ModelProto) -> onnx.ModelProto:
    """An opset-3 Conv/Concat/Mul graph with the same meaning at opset 13, which onnxruntime
    runs: Concat-1's default axis (1) written out, Mul-1's legacy ``broadcast`` dropped (its
    constant matches a suffix of the data's shape, as numpy broadcasting does)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    model.opset_import[0].version = 13
    for node in model.graph.node:
        if node.op_type == "Concat" and not any(a.name == "axis" for a in node.attribute):
            node.attribute.append(onnx.helper.make_attribute("axis", 1))
        kept_attrs = [a for a in node.attribute if a.name != "broadcast"]
        del node.attribute[:]
        node.attribute.extend(kept_attrs)
    return model


def test_a_concat_1_without_axis_joins_along_axis_1(tmp_path):
    """Concat-1 (opsets 1 to 3) defaults its axis to 1: ``Concat(Conv 4, Conv 2) * c`` with a
    constant per each of the 6 channels folds into both convs (it was refused as an invalid
    model: sizes 4 and 2 concatenated along axis 0)."""
    b = GraphBuilder(seed=110)
    x = b.input([2, 3, 1, 1])
    joined = b.node("Concat", [conv(b, x, c_in=3, c_out=4, name="a"), conv(b, x, c_in=3, c_out=2, name="b")])
    scale = np.array([0.5, -1.0, 2.0, 1.5, -0.25, 3.0], np.float32).reshape(6, 1, 1)
    b.output(b.node("Mul", [joined, b.const(scale)], broadcast=1, name="the_bn"), shape=[2, 6, 1, 1])
    model = b.model(3)
    onnx.save(model, tmp_path / "m.onnx")
    result = bnfold.fold(tmp_path / "m.onnx")
    result.save(tmp_path / "out.onnx")
    out = onnx.load(tmp_path / "out.onnx")
    entry = folded(result, out, "concat(conv+conv)-mul")
    assert entry.into == "a, b" and count_ops(out, "Mul") == 0
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 3, 1, 1)).astype(np.float32)}
    np.testing.assert_allclose(run(as_opset_13(out), feeds)[0], run(as_opset_13(model), feeds)[0], rtol=1e-5,
                               atol=1e-6)


def test_a_scalar_map_into_a_concat_1_without_axis_folds_into_its_channels(tmp_path):
    """Downstream too: ``x * 1.7`` joined by a Concat-1 with no axis (so along axis 1) covers
    its 4 of the conv's 8 input channels (it was taken for the batch axis and kept)."""
    b = GraphBuilder(seed=111)
    x = b.input(list(SHAPE))
    scaled = b.node("Mul", [b.node("Relu", [x]), b.const(np.float32(1.7))], broadcast=1, name="the_bn")
    other = b.node("Sigmoid", [x])
    b.output(conv(b, b.node("Concat", [other, scaled]), c_in=8), shape=[2, 4, 8, 8])
    model = b.model(3)  # onnx infers no shapes past a Concat-1 without axis: they are given
    model.graph.value_info.extend(onnx.helper.make_tensor_value_info(v, onnx.TensorProto.FLOAT, list(SHAPE))
                                  for v in (other, scaled))
    onnx.save(model, tmp_path / "m.onnx")
    result = bnfold.fold(tmp_path / "m.onnx")
    result.save(tmp_path / "out.onnx")
    out = onnx.load(tmp_path / "out.onnx")
    folded(result, out, "mul-concat-conv")
    assert count_ops(out, "Mul") == 0
    feeds = {"x": np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)}
    np.testing.assert_allclose(run(as_opset_13(out), feeds)[0], run(as_opset_13(model), feeds)[0], rtol=1e-5,
                               atol=1e-6)


@pytest.mark.parametrize("case, domain", [("producer", "AI.ONNX"), ("returned", "XXai.onnxXX"),
                                          ("second-reader", "AI.ONNX"), ("crossing", "com.example")])
def test_an_op_of_another_domain_named_like_a_standard_op_is_no_step(tmp_path, case, domain):
    """A custom domain's Concat or Conv (here in domains spelt like 'ai.onnx', which is not
    theirs) is no join and no linear op: a map does not travel through or into it. The
    standard domain is '' or 'ai.onnx' exactly (onnx_ir reads 'ai.onnx' as '')."""
    b = GraphBuilder(seed=112)
    x = b.input(list(SHAPE))
    if case == "producer":
        b.output(bn(b, b.node("Concat", [conv(b, x), conv(b, b.node("Sigmoid", [x]))], axis=1), 8), shape=[2, 8, 8, 8])
        b.nodes[-2].domain = domain
    elif case == "crossing":  # a MaxPool of another domain between the BN and one of its convs
        y = bn(b, b.node("Relu", [x]), 4)
        b.output(conv(b, b.node("MaxPool", [y], kernel_shape=[2, 2])), shape=[2, 4, 7, 7])
        b.nodes[-2].domain = domain
        b.output(conv(b, y), shape=list(SHAPE))
    else:
        y = bn(b, b.node("Relu", [x]), 4)
        b.output(y if case == "returned" else conv(b, y), shape=list(SHAPE))
        b.output(conv(b, y), shape=list(SHAPE))
        b.nodes[-1].domain = domain
    graph = onnx.helper.make_graph(b.nodes, "g", b.inputs, b.outputs, b.initializers)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18),
                                                         onnx.helper.make_opsetid(domain, 1)], ir_version=9)
    onnx.save(model, tmp_path / "m.onnx")  # onnxruntime has no kernel for the custom ops: not run
    result = bnfold.fold(tmp_path / "m.onnx")
    result.save(tmp_path / "out.onnx")
    reason = "fan-out" if case in ("second-reader", "crossing") else "no-linear-producer"
    kept(result, onnx.load(tmp_path / "out.onnx"), model, reason)


# --- facts the graph leaves open -----------------------------------------------------


@pytest.mark.parametrize("op", ["ReduceMean", "Pad", "Pad-axes"])
def test_the_producers_weight_proves_the_rank_shape_inference_cannot(tmp_path, op):
    """``Conv -> op -> BN`` on an input of unknown shape: nothing is inferred after the
    Conv, but its 4-d weight proves the rank the op's axes are read against (Pad-18's
    axes input counted from the end too)."""
    b = GraphBuilder(seed=120)
    y = conv(b, b.input(None))
    y = {"ReduceMean": lambda: b.node("ReduceMean", [y, b.const(np.array([2, 3]))]),
         "Pad": lambda: b.node("Pad", [y, b.const(np.array([0, 0, 1, 1, 0, 0, 1, 1]))], mode="reflect"),
         "Pad-axes": lambda: b.node("Pad", [y, b.const(np.array([1, 2, 0, 1])), "", b.const(np.array([-2, 3]))],
                                    mode="edge")}[op]()
    b.output(bn(b, y, 4, sign=None), shape=None)
    result, out = fold(b.model(18), tmp_path, checked=False)
    folded(result, out, "conv-pad-bn" if op == "Pad-axes" else f"conv-{op.lower()}-bn")


@pytest.mark.parametrize("shift", [False, True])
def test_a_sum_over_axes_of_unknown_extent_takes_no_shift(tmp_path, shift):
    """``ReduceSum`` multiplies a shift by the number of elements it sums: unknown here (an
    input of unknown shape), so a BN with a shift stays and a pure scale folds."""
    b = GraphBuilder(seed=121)
    y = b.node("ReduceSum", [conv(b, b.input(None)), b.const(np.array([2, 3]))])
    b.output(bn(b, y, 4, sign=None, shift=shift), shape=None)
    model = b.model(18)
    result, out = fold(model, tmp_path, checked=False)
    if shift:
        entry = kept(result, out, model, "shift-not-crossing")
        assert "cannot be proven" in entry.detail
    else:
        folded(result, out, "conv-reducesum-bn")


def test_a_downstream_sum_over_symbolic_axes_takes_a_pure_scale(tmp_path):
    """``BN(no shift) -> ReduceSum(height, width of symbolic size) -> Conv``."""
    b = GraphBuilder(seed=122)
    y = bn(b, b.node("Relu", [b.input(["n", 4, "h", "w"])]), 4, sign=None, shift=False)
    b.output(conv(b, b.node("ReduceSum", [y, b.const(np.array([2, 3]))]), name="c"), shape=None)
    result, out = fold(b.model(18), tmp_path)
    entry = folded(result, out, "bn-reducesum-conv")
    assert entry.into == "c"


@pytest.mark.parametrize("site", ["bn", "scalar-mul"])
def test_a_map_crosses_a_spatial_split_downstream_into_a_conv_per_piece(tmp_path, site):
    """``BN -> Split(height 3 + 5) -> Conv, Conv``: each piece carries every channel."""
    b = GraphBuilder(seed=123)
    x = b.node("Relu", [b.input(list(SHAPE))])
    y = bn(b, x, 4, sign=None) if site == "bn" else b.node("Mul", [x, b.const(np.float32(0.7))], name="the_bn")
    top, bottom = b.node("Split", [y, b.const(np.array([3, 5]))], n_out=2, axis=2)
    b.output(b.node("Concat", [conv(b, top, name="a"), conv(b, bottom, name="b")], axis=2))
    result, out = fold(b.model(18), tmp_path)
    entry = the_bn(result)
    assert (entry.status, entry.into) == ("folded", "a, b"), (entry.reason, entry.detail)
    assert "through Split" in entry.route and count_ops(out, "Split") == 1
    assert count_ops(out, "BatchNormalization") + count_ops(out, "Mul") == 0


def test_channel_pieces_keep_their_rank_for_the_next_crossing(tmp_path):
    """``Conv -> Split(channels) -> Gather(channels) -> Gather(width) -> ReduceMean -> BN``:
    each step says the rank of what it hands on, which the next one's axes need."""
    b = GraphBuilder(seed=124)
    _, y = b.node("Split", [conv(b, b.input(list(SHAPE)), c_out=6), b.const(np.array([2, 4]))], n_out=2, axis=1)
    y = b.node("Gather", [y, b.const(np.array([3, 0, 1]))], axis=1)
    y = b.node("Gather", [y, b.const(np.array([0, 2, 5]))], axis=3)
    b.output(bn(b, b.node("ReduceMean", [y, b.const(np.array([2]))]), 3, sign=None))
    result, out = fold(b.model(18), tmp_path)
    folded(result, out, "conv-split-gather-gather-reducemean-bn")


@pytest.mark.parametrize("site, op", [("scalar-mul", "ReduceMean"), ("scalar-mul", "Pad-axes"),
                                      ("bn", "Slice"), ("bn", "Resize"), ("bn", "ReduceMean")])
def test_axes_on_data_of_unknown_rank_stop_the_route(tmp_path, site, op):
    """On an input of unknown shape a map that must be placed on axes (a reduction's, Pad's
    axes input, a BN's channels met by Slice or Resize downstream) is refused, with the op
    named; nothing is guessed and nothing fails."""
    b = GraphBuilder(seed=125)
    x = b.input(None)
    if site == "bn":
        y = bn(b, b.node("Relu", [x]), 4)
        y = {"Slice": lambda: b.node("Slice", [y, b.const(np.array([1])), b.const(np.array([5])),
                                              b.const(np.array([2]))]),
             "Resize": lambda: b.node("Resize", [y, "", b.const(SCALES)]),
             "ReduceMean": lambda: b.node("ReduceMean", [y, b.const(np.array([2, 3]))])}[op]()
        b.output(conv(b, y), shape=None)
    else:
        y = conv(b, x)
        y = b.node("ReduceMean", [y, b.const(np.array([2, 3]))]) if op == "ReduceMean" else \
            b.node("Pad", [y, b.const(np.array([1, 1])), "", b.const(np.array([-1]))], mode="edge")
        b.output(b.node("Mul", [y, b.const(np.float32(0.7))], name="the_bn"), shape=None)
    model = b.model(18)
    result, out = fold(model, tmp_path, checked=False)
    entry = kept(result, out, model, "channel-axis-mismatch" if op == "Resize" else "unproven-crossing")
    assert entry.detail.startswith(op.removesuffix("-axes") + " ")


def test_a_declared_shape_after_an_input_of_unknown_rank_is_no_channel_proof(tmp_path):
    """``MatMul(x of unknown rank) -> ReduceMean -> BN`` with the MatMul's output shape
    declared: its channels are the last axis of a rank the MatMul does not prove, so the
    reduction's axes cannot be placed against them and the BN stays."""
    b = GraphBuilder(seed=126)
    y = b.node("MatMul", [b.input(None), b.random([4, 3])])
    b.output(bn(b, b.node("ReduceMean", [y, b.const(np.array([0]))]), 3), shape=None)
    model = b.model(18)
    model.graph.value_info.append(onnx.helper.make_tensor_value_info(y, onnx.TensorProto.FLOAT, [2, 3]))
    result, out = fold(model, tmp_path, shape=(2, 4), checked=False)
    entry = kept(result, out, model, "unproven-crossing")
    assert entry.detail.startswith("ReduceMean ") and "not proven" in entry.detail


def test_upsample_scales_that_do_not_match_the_rank_stop_the_route(tmp_path):
    """Upsample-9 with one scale for a rank-4 tensor (an invalid model, which onnxruntime
    refuses to run): the scale of the channel axis is unknown, so the BN stays."""
    b = GraphBuilder(seed=127)
    b.output(producer_then("Upsample", inputs=[np.array([2.0], np.float32)])(b), shape=None)
    model = b.model(9)
    onnx.save(model, tmp_path / "m.onnx")
    result = bnfold.fold(tmp_path / "m.onnx")
    result.save(tmp_path / "out.onnx")
    entry = kept(result, onnx.load(tmp_path / "out.onnx"), model, "channel-axis-mismatch")
    assert entry.detail.startswith("Upsample ")
