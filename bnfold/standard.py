"""Which nodes bnfold knows the meaning of, asked in one place by every matcher.

ONNX's default operator set, which models name ``""`` or ``"ai.onnx"``, less the
elementwise ops of opsets 1-6 that broadcast from an ``axis``: their second operand lines
up at that axis, not from the right as numpy and opset 7+ have it, and no matcher, route
or constant evaluation models that. Such a node is an op bnfold does not know: nothing
folds through or into it, and nothing is evaluated from it.
"""

from __future__ import annotations

from bnfold._onnx_ir import ir

DEFAULT_DOMAINS = ("", "ai.onnx")

#: Ops whose versions 1-6 take ``broadcast`` and ``axis`` attributes.
_AXIS_BROADCAST = {"Add", "Sub", "Mul", "Div", "Pow", "And", "Or", "Xor", "Equal", "Greater", "Less"}


def is_standard(node: ir.Node) -> bool:
    """``node`` is an op of the default domain whose meaning bnfold models."""
    if node.domain not in DEFAULT_DOMAINS:
        return False
    if node.op_type in _AXIS_BROADCAST and "axis" in node.attributes:
        broadcast = node.attributes.get("broadcast")
        return broadcast is None or (not broadcast.is_ref() and broadcast.value == 0)
    return True
