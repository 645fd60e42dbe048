"""Gemm -> BatchNormalization.

``Y = alpha * A' @ B' + beta * C`` with ``B' = B`` (transB=0, channels on axis 1 of B) or
``B.T`` (transB=1, channels on axis 0). Then
``s * Y + t = alpha * A' @ (B' (.)_N s) + (s * beta * C + t)``: alpha stays, beta is
written into the new C (and set to 1), C may be absent, a scalar, ``[1]``, ``[N]``,
``[1, N]`` or ``[M, N]``. transA only touches A, so it does not matter. With beta = 0
onnxruntime ignores C (even a NaN one), so the fold does too.
"""

from __future__ import annotations

from bnfold._onnx_ir import ir
from bnfold.constant_eval import Constants
from bnfold.patterns import LinearMatch, weight_and_bias


def match(node: ir.Node, consts: Constants) -> LinearMatch:
    weight, bias = weight_and_bias(node, consts)
    out_axis = 0 if node.attributes.get_int("transB", 0) else 1
    return LinearMatch(
        pattern="gemm", node=node, weight_index=1, weight=weight, out_axis=out_axis, channels=weight.shape[out_axis],
        bias_node=node, bias_index=2, bias=bias, output=node.outputs[0], rank=2, channel_axis=1,
        bias_factor=node.attributes.get_float("beta", 1.0),
    )
