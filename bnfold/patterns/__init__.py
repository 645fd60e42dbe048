"""Matchers for the linear ops an affine map can be folded into.

Producer matchers (one module per op) look at the value an affine site reads and return a
``LinearMatch``: where the weight and bias live, along which weight axis the output
channels run, and where those channels are in the output tensor. Planning applies every
match the same way: ``W' = s (.)_out W`` and ``b' = s * (factor * b) + t``.
``consumer`` matches the other direction (BN before a linear op), ``layout`` follows the
channel axis through Transpose/Reshape/..., and ``elementwise`` turns constant
Mul/Div/Add/Sub into (s, t). Every matcher says no the same way: ``NoMatch(reason, detail)``.
"""

from __future__ import annotations

from dataclasses import dataclass

from bnfold._onnx_ir import ir
from bnfold.constant_eval import Constants, has_unresolved_reference
from bnfold.ledger import NoMatch
from bnfold.patterns.layout import Channel
from bnfold.patterns.shapes import linear_shape_problem
from bnfold.standard import is_standard


@dataclass(frozen=True)
class LinearMatch:
    """A foldable linear producer, described by where its parameters are."""

    pattern: str
    node: ir.Node
    weight_index: int
    weight: ir.TensorProtocol
    out_axis: int
    channels: int
    #: The node whose input ``bias_index`` holds the bias; None: append an Add for it.
    bias_node: ir.Node | None
    bias_index: int | None
    bias: ir.TensorProtocol | None
    output: ir.Value
    #: Rank of ``output`` (None if unknown) and the axis of its channels there.
    rank: int | None
    channel_axis: int
    groups: int = 1
    #: Gemm's ``beta``: the bias enters as ``beta * C``; the fold writes beta into C.
    bias_factor: float = 1.0

    @property
    def channel(self) -> Channel:
        return Channel(self.rank, self.channel_axis, self.channels)


def concat_axis(node: ir.Node) -> int:
    """A Concat's axis: required from Concat-4 on; Concat-1 (opsets 1 to 3) defaults to 1."""
    return node.attributes.get_int("axis", 1)


def describe(node: ir.Node | None, value: ir.Value | None = None) -> str:
    """A label for messages, even for unnamed nodes: name, else op and output name."""
    if node is None:
        return f"graph input {value.name!r}" if value is not None else "nothing"
    if node.name:
        return f"{node.op_type} {node.name!r}"
    output = node.outputs[0].name if node.outputs and node.outputs[0] is not None else ""
    return f"{node.op_type} (output {output!r})"


def require_resolved(node: ir.Node) -> None:
    """Refuse a node whose attributes still refer to a function attribute of unknown value."""
    if has_unresolved_reference(node):
        names = ", ".join(a.name for a in node.attributes.values() if a.is_ref())
        raise NoMatch("attribute-reference", f"{describe(node)} takes {names} from its function's call sites, which disagree")


def match_producer(value: ir.Value, consts: Constants) -> LinearMatch:
    """The linear producer of ``value``; NoMatch if there is none to fold into."""
    from bnfold.patterns import conv, conv_transpose, gemm, matmul

    producer = value.producer()
    matchers = {
        "Conv": conv.match,
        "ConvTranspose": conv_transpose.match,
        "Gemm": gemm.match,
        "MatMul": matmul.match,
        "Add": matmul.match_with_bias,
    }
    if producer is None or not is_standard(producer) or producer.op_type not in matchers:
        raise NoMatch("no-linear-producer", f"input comes from {describe(producer, value)}")
    require_resolved(producer)
    return matchers[producer.op_type](producer, consts)


def require_valid_shapes(node: ir.Node, weight: ir.TensorProtocol, bias: ir.TensorProtocol | None) -> None:
    """Weights may come from constant subgraphs the loader could not size: check them here."""
    from bnfold.errors import InputError

    problem = linear_shape_problem(node, tuple(weight.shape), None if bias is None else tuple(bias.shape))
    if problem:
        raise InputError(f"invalid node {node.name or node.op_type!r}: {problem}")


def weight_and_bias(node: ir.Node, consts: Constants) -> tuple[ir.TensorProtocol, ir.TensorProtocol | None]:
    """A Conv/ConvTranspose/Gemm's constant weight (input 1) and optional bias (input 2),
    shapes checked; NoMatch if they are not constants."""
    weight = constant_param(node, 1, consts)  # input 1 is required (the loader's check_node)
    bias = constant_param(node, 2, consts)
    require_valid_shapes(node, weight, bias)
    return weight, bias


def constant_param(node: ir.Node, index: int, consts: Constants) -> ir.TensorProtocol | None:
    """Input ``index`` of ``node`` as a constant; None when the input is absent."""
    if index >= len(node.inputs) or node.inputs[index] is None:
        return None
    tensor, reason = consts.tensor(node.inputs[index])
    if tensor is None:
        reason = "non-constant-weights" if reason == "non-constant-params" else reason
        raise NoMatch(reason, f"input {index} ({node.inputs[index].name!r}) of {describe(node)} is not a constant")
    return tensor
