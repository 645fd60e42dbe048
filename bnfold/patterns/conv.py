"""Conv -> BatchNormalization.

``y = s * (W * x + b) + t = (s (.)_0 W) * x + (s * b + t)``: Conv weights are
``(M, C/group, k...)``, so output channel m is weight slice ``W[m]`` whatever the group,
stride, dilation, padding or auto_pad. A missing bias is zero.
"""

from __future__ import annotations

from bnfold._onnx_ir import ir
from bnfold.constant_eval import Constants
from bnfold.patterns import LinearMatch, weight_and_bias


def match(node: ir.Node, consts: Constants) -> LinearMatch:
    weight, bias = weight_and_bias(node, consts)
    return LinearMatch(
        pattern="conv", node=node, weight_index=1, weight=weight, out_axis=0, channels=weight.shape[0],
        bias_node=node, bias_index=2, bias=bias, output=node.outputs[0], rank=len(weight.shape), channel_axis=1,
    )
