"""BatchNormalization before a linear op (input normalisation, BN -> Flatten -> Gemm).

``y = W * (s*x + t) + b = (W (.)_in s) * x + (b + W * t)``. The second term is one value
per output channel only where the op sees every input element with its full weight: always
for Gemm and MatMul, for Conv only without padding (a padded border sees zeros, not t).
With padding the scale still folds exactly and the shift stays as ``x + t/s`` before the
conv, because zero-padding ``x + t/s`` and then scaling by s pads ``s*x + t`` with zeros.
Through ``Flatten(axis=1)`` each BN channel covers ``K / C`` consecutive features.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from bnfold._onnx_ir import ir
from bnfold.constant_eval import Constants, rank_of
from bnfold.errors import InputError
from bnfold.ledger import NoMatch
from bnfold.patterns import constant_param, describe, require_resolved, weight_and_bias
from bnfold.patterns.matmul import constant_2d_weight


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
    groups: int = 1
    #: Features per BN channel when a Flatten sits between (K / C), else 1.
    repeat: int = 1
    #: Gemm's alpha multiplies W * t; beta multiplies the old bias.
    shift_factor: float = 1.0
    bias_factor: float = 1.0
    #: False for a padded Conv: only the scale folds, the shift stays as an Add.
    exact_shift: bool = True
    flatten: ir.Node | None = None


def match_consumer(bn: ir.Node, channels: int, consts: Constants) -> ConsumerMatch:
    """The linear op reading the BN's output (directly or through Flatten(axis=1)); NoMatch if none."""
    bn_output = bn.outputs[0]
    uses = list(bn_output.uses())
    readers = ", ".join(describe(node) for node, _ in uses) or "nothing"
    if not any(node.op_type in _MATCHERS or node.op_type == "Flatten" for node, _ in uses):
        raise NoMatch("no-linear-producer", f"the BN output is read by {readers}")
    if consts.is_output(bn_output):
        raise NoMatch("graph-output", "the BN output is a graph output")
    if len(uses) != 1:
        raise NoMatch("fan-out", f"the BN output has {len(uses)} readers ({readers})")
    node, index = uses[0]
    flatten = None
    if node.op_type == "Flatten" and node.domain in ("", "ai.onnx") and index == 0:
        require_resolved(node)
        if node.attributes.get_int("axis", 1) != 1:
            raise NoMatch("no-linear-producer", f"{describe(node)} after the BN does not flatten from axis 1")
        flatten = node
        if consts.sole_reader(node.outputs[0]) is None:
            raise NoMatch("fan-out", f"{describe(node)} after the BN has other readers")
        node, index = next(iter(node.outputs[0].uses()))
    if node.domain not in ("", "ai.onnx") or index != 0 or node.op_type not in _MATCHERS:
        raise NoMatch("no-linear-producer", f"the BN output is read by {describe(node)}")
    if flatten is not None and node.op_type not in ("Gemm", "MatMul"):
        raise NoMatch("no-linear-producer", f"Flatten after the BN feeds {describe(node)}, not a matrix op")
    require_resolved(node)
    match = _MATCHERS[node.op_type](node, consts)
    if flatten is None and node.op_type == "MatMul":
        rank = rank_of(bn_output)
        if rank is None:
            raise NoMatch("unknown-rank", f"the rank of the BN output read by {describe(node)} cannot be proven")
        if rank != 2:
            raise NoMatch("channel-axis-mismatch", f"BN before {describe(node)} on a {rank}-D activation")
    if match.in_channels % max(channels, 1) or (flatten is None and match.in_channels != channels):
        raise InputError(f"BatchNormalization {bn.name!r} has {channels} channels but {describe(node)} reads "
                         f"{match.in_channels} input channels: invalid model")
    repeat = match.in_channels // channels if channels else 1
    pattern = match.pattern.replace("bn-", "bn-flatten-") if flatten is not None else match.pattern
    return dataclasses.replace(match, flatten=flatten, repeat=repeat, pattern=pattern)


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
        groups=groups, exact_shift=unpadded,
    )


def _gemm(node: ir.Node, consts: Constants) -> ConsumerMatch:
    if node.attributes.get_int("transA", 0):
        raise NoMatch("channel-axis-mismatch", f"{describe(node)} has transA=1: it reads the BN channels as rows")
    weight, bias = weight_and_bias(node, consts)
    in_axis = 1 if node.attributes.get_int("transB", 0) else 0
    return ConsumerMatch(
        pattern="bn-gemm", node=node, weight_index=1, weight=weight, in_axis=in_axis, out_axis=1 - in_axis,
        in_channels=weight.shape[in_axis], bias_node=node, bias_index=2, bias=bias,
        shift_factor=node.attributes.get_float("alpha", 1.0), bias_factor=node.attributes.get_float("beta", 1.0),
    )


def _matmul(node: ir.Node, consts: Constants) -> ConsumerMatch:
    weight = constant_2d_weight(node, consts)
    bias_node, bias_index, bias = _following_bias(node, weight.shape[1], consts)
    return ConsumerMatch(
        pattern="bn-matmul", node=node, weight_index=1, weight=weight, in_axis=0, out_axis=1,
        in_channels=weight.shape[0], bias_node=bias_node, bias_index=bias_index, bias=bias,
    )


def _following_bias(matmul: ir.Node, channels: int, consts: Constants):
    """A per-channel constant Add right after the MatMul, used as its bias slot."""
    reader = consts.sole_reader(matmul.outputs[0])
    if reader is None:
        return None, None, None
    add, index = reader
    if add.op_type != "Add" or add.domain not in ("", "ai.onnx") or len(add.inputs) != 2:
        return None, None, None
    bias_index = 1 - index
    try:
        bias = constant_param(add, bias_index, consts)
    except NoMatch:
        return None, None, None
    if bias is None or tuple(bias.shape) not in ((), (1,), (channels,), (1, channels)):
        return None, None, None
    return add, bias_index, bias


_MATCHERS = {"Conv": _conv, "Gemm": _gemm, "MatMul": _matmul}
