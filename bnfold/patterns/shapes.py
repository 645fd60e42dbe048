"""The weight and bias shapes ONNX requires of a Conv, ConvTranspose or Gemm.

Checked at load (``bnfold.load.check_linear_shapes``) for weights given as constants,
and again at matching (``require_valid_shapes``) for weights the loader could not size.
"""

from __future__ import annotations

from bnfold._onnx_ir import ir


def linear_shape_problem(node: ir.Node, weight: tuple[int, ...], bias: tuple[int, ...] | None) -> str | None:
    """What is wrong with a Conv/ConvTranspose/Gemm weight and bias shape, if anything."""
    op = node.op_type
    if op == "Gemm":
        if len(weight) != 2:
            return f"Gemm weight B has shape {list(weight)}, a Gemm needs a 2-D B"
        n = weight[0] if node.attributes.get_int("transB", 0) else weight[1]
        if bias is not None and (len(bias) > 2 or (bias and bias[-1] not in (1, n))):
            return f"Gemm bias C of shape {list(bias)} does not broadcast to (M, {n})"
        return None
    group = node.attributes.get_int("group", 1)
    if len(weight) < 3 or group < 1 or weight[0] % group:
        return (f"{op} weight has shape {list(weight)} and group {group}: it needs rank >= 3 "
                "(channels, channels per group, kernel) and a group >= 1 dividing its first axis")
    channels = weight[0] if op == "Conv" else weight[1] * group
    if bias is not None and tuple(bias) != (channels,):
        return f"{op} bias has shape {list(bias)}, it needs [{channels}] (one per output channel)"
    return None
