"""An affine map before a linear op: a BN (input normalisation, BN -> Flatten -> Gemm,
BN -> Transpose -> MatMul) or a constant Mul/Add/Sub/Div (Keras' BN before a Dense).

``y = W * (s*x + t) + b = (W (.)_in s) * x + (b + W * t)``. The second term is one value
per output channel only where the op sees every input element with its full weight: always
for Gemm and MatMul, for Conv only without padding (a padded border sees zeros, not t).
With padding the scale still folds exactly and the shift stays as ``x + t/s`` before the
conv, because zero-padding ``x + t/s`` and then scaling by s pads ``s*x + t`` with zeros.
Through ``Flatten(axis=1)`` (or a Reshape that does the same) each BN channel covers
``K / C`` consecutive features; otherwise the channel axis must land on the axis the op
reads as its input features. How a map reaches the op is ``bnfold.route``'s business.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from bnfold._onnx_ir import ir
from bnfold.constant_eval import Constants, rank_of, static_dims
from bnfold.ledger import NoMatch
from bnfold.patterns import constant_param, describe, weight_and_bias
from bnfold.patterns.layout import Channel
from bnfold.patterns.matmul import constant_2d_weight, is_channel_bias
from bnfold.standard import is_standard


@dataclass(frozen=True)
class ConsumerMatch:
    pattern: str
    node: ir.Node
    weight_index: int
    weight: ir.TensorProtocol
    in_axis: int
    out_axis: int
    in_channels: int
    #: The node whose input ``bias_index`` holds the bias; None: insert an Add after ``node``.
    bias_node: ir.Node | None
    bias_index: int | None
    bias: ir.TensorProtocol | None
    #: The channel layout of the op's data input: rank (None if unknown) and the feature axis.
    input_channel: Channel
    groups: int = 1
    #: Gemm's alpha multiplies W * t; beta multiplies the old bias.
    shift_factor: float = 1.0
    bias_factor: float = 1.0
    #: False for a padded Conv: only the scale folds, the shift stays as an Add.
    exact_shift: bool = True


def require_flattened(node: ir.Node, channel: Channel) -> None:
    """Check that ``node`` is a Flatten(axis=1) of the map's output, or a Reshape proven to do
    the same (dynamo's ``x.view(x.size(0), -1)``); NoMatch otherwise. Each channel then
    covers consecutive features, as many as the op reads per channel."""
    known = channel.normalized()
    if known is None or known.axis != 1:
        raise NoMatch("no-linear-producer", f"{describe(node)} does not flatten from the channel axis")
    if node.op_type == "Flatten":
        if node.attributes.get_int("axis", 1) != 1:
            raise NoMatch("no-linear-producer", f"{describe(node)} does not flatten from axis 1")
        return
    dims, after = static_dims(node.inputs[0]), static_dims(node.outputs[0])
    features = None if dims is None else dims[1:]  # one slice: the product is only taken of ints
    if features is None or after is None or len(after) != 2 or after[0] != dims[0] or \
            not all(isinstance(d, int) for d in features) or after[1] != math.prod(features):
        raise NoMatch("unproven-layout", f"{describe(node)} is not proven to flatten from axis 1")


def require_channel_on_features(channel: Channel, match: ConsumerMatch, node: ir.Node) -> None:
    """The map's channels must be the axis the op reads as its input features."""
    want = match.input_channel
    known = channel.normalized()
    if want.axis == -1:  # MatMul: the last axis, whatever the rank
        if known is not None and known.rank is not None and known.axis == known.rank - 1:
            return
        if known is None or known.rank is None:
            raise NoMatch("unknown-rank", f"the rank of the map's output read by {describe(node)} cannot be proven")
        raise NoMatch("channel-axis-mismatch", f"{describe(node)} reads the last axis as features, the map's "
                                               f"channels are on axis {known.axis} of {known.rank}")
    if known is None or known.axis != want.axis or (want.rank is not None and known.rank not in (None, want.rank)):
        raise NoMatch("channel-axis-mismatch", f"{describe(node)} reads axis {want.axis} as its input channels")


def _conv(node: ir.Node, consts: Constants) -> ConsumerMatch:
    weight, bias = weight_and_bias(node, consts)
    groups = node.attributes.get_int("group", 1)
    pads = node.attributes.get("pads")
    auto_pad = node.attributes.get_string("auto_pad", "NOTSET")
    unpadded = auto_pad in ("NOTSET", "VALID") and (pads is None or not any(pads.value))
    return ConsumerMatch(
        pattern="bn-conv" if unpadded else "bn-conv-scale",
        node=node, weight_index=1, weight=weight, in_axis=1, out_axis=0,
        in_channels=weight.shape[1] * groups, bias_node=node, bias_index=2, bias=bias,
        input_channel=Channel(len(weight.shape), 1, weight.shape[1] * groups), groups=groups, exact_shift=unpadded,
    )


def _gemm(node: ir.Node, consts: Constants) -> ConsumerMatch:
    if node.attributes.get_int("transA", 0):
        raise NoMatch("channel-axis-mismatch", f"{describe(node)} has transA=1: it reads the channels as rows")
    weight, bias = weight_and_bias(node, consts)
    in_axis = 1 if node.attributes.get_int("transB", 0) else 0
    return ConsumerMatch(
        pattern="bn-gemm", node=node, weight_index=1, weight=weight, in_axis=in_axis, out_axis=1 - in_axis,
        in_channels=weight.shape[in_axis], bias_node=node, bias_index=2, bias=bias,
        input_channel=Channel(2, 1, weight.shape[in_axis]),
        shift_factor=node.attributes.get_float("alpha", 1.0), bias_factor=node.attributes.get_float("beta", 1.0),
    )


def _matmul(node: ir.Node, consts: Constants) -> ConsumerMatch:
    weight = constant_2d_weight(node, consts)
    bias_node, bias_index, bias = _following_bias(node, weight.shape[1], consts)
    return ConsumerMatch(
        pattern="bn-matmul", node=node, weight_index=1, weight=weight, in_axis=0, out_axis=1,
        in_channels=weight.shape[0], bias_node=bias_node, bias_index=bias_index, bias=bias,
        input_channel=Channel(rank_of(node.inputs[0]), -1, weight.shape[0]),
    )


def _following_bias(matmul: ir.Node, channels: int, consts: Constants):
    """A per-channel constant Add right after the MatMul, used as its bias slot."""
    reader = consts.sole_reader(matmul.outputs[0])
    if reader is None:
        return None, None, None
    add, index = reader
    if add.op_type != "Add" or not is_standard(add):
        return None, None, None
    bias_index = 1 - index
    try:
        bias = constant_param(add, bias_index, consts)
    except NoMatch:
        return None, None, None
    if not is_channel_bias(tuple(bias.shape), channels):
        return None, None, None
    return add, bias_index, bias


MATCHERS = {"Conv": _conv, "Gemm": _gemm, "MatMul": _matmul}
