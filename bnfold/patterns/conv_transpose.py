"""ConvTranspose -> BatchNormalization.

ConvTranspose weights are ``(C_in, C_out/group, k...)``: the output channel of weight
slice ``(ci, co)`` is ``(ci // (C_in/group)) * (C_out/group) + co``. Folding scales each
slice by the ``s`` of that channel (not ``s[co]``, the mistake peers ship for group > 1)
and sets ``b' = s * b + t``.
"""

from __future__ import annotations

from bnfold._onnx_ir import ir
from bnfold.consts import Constants
from bnfold.patterns import LinearMatch, weight_and_bias


def match(node: ir.Node, consts: Constants) -> LinearMatch | str:
    params = weight_and_bias(node, consts)
    if isinstance(params, str):
        return params
    weight, bias = params
    groups = node.attributes.get_int("group", 1)
    return LinearMatch(
        pattern="convtranspose",
        node=node,
        weight_index=1,
        weight=weight,
        out_axis=1,
        channels=weight.shape[1] * groups,
        bias_node=node,
        bias_index=2,
        bias=bias,
        output=node.outputs[0],
        rank=len(weight.shape),
        channel_axis=1,
        groups=groups,
    )
