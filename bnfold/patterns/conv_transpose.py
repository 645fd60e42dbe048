"""ConvTranspose -> BatchNormalization.

ConvTranspose weights are ``(C_in, C_out/group, k...)``: output channels run along axis 1
within each group, so the channel of weight ``(ci, co)`` is
``(ci // (C_in/g)) * (C_out/g) + co`` (``affine.output_channel_factor`` lays that out).
"""

from __future__ import annotations

from bnfold._onnx_ir import ir
from bnfold.constant_eval import Constants
from bnfold.patterns import LinearMatch, weight_and_bias


def match(node: ir.Node, consts: Constants) -> LinearMatch:
    weight, bias = weight_and_bias(node, consts)
    groups = node.attributes.get_int("group", 1)
    return LinearMatch(
        pattern="convtranspose", node=node, weight_index=1, weight=weight, out_axis=1,
        channels=weight.shape[1] * groups, bias_node=node, bias_index=2, bias=bias, output=node.outputs[0],
        rank=len(weight.shape), channel_axis=1, groups=groups,
    )
