"""One matcher per linear producer a BatchNormalization can be folded into.

A matcher looks at the value a BN reads and returns either a ``LinearMatch`` (where the
weight and bias live, and along which axis the output channels run) or the ledger reason
it does not apply. The engine applies every match the same way:
``W' = s (.)_out W`` and ``b' = s * (factor * b) + t``.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir


@dataclass
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
    groups: int = 1
    #: Gemm's ``beta``: the bias enters as ``beta * C``; the fold writes beta into C.
    bias_factor: float = 1.0


def match_producer(value: ir.Value, ir_version: int) -> LinearMatch | str:
    """The linear producer of ``value`` as a LinearMatch, or the reason there is none."""
    from bnfold.patterns import conv, conv_transpose, gemm, matmul

    producer = value.producer()
    matchers = {
        "Conv": conv.match,
        "ConvTranspose": conv_transpose.match,
        "Gemm": gemm.match,
        "MatMul": matmul.match,
        "Add": matmul.match_with_bias,
    }
    if producer is None or producer.domain not in ("", "ai.onnx") or producer.op_type not in matchers:
        return "no-linear-producer"
    return matchers[producer.op_type](producer, ir_version)


def constant_param(node: ir.Node, index: int, ir_version: int) -> tuple[ir.TensorProtocol | None, str | None]:
    """Input ``index`` of ``node`` as a constant; (None, None) when the input is absent."""
    from bnfold.consts import constant_tensor

    if index >= len(node.inputs) or node.inputs[index] is None:
        return None, None
    tensor, reason = constant_tensor(node.inputs[index], ir_version)
    if reason == "non-constant-params":
        reason = "non-constant-weights"
    return tensor, reason
