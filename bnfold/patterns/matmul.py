"""MatMul -> BatchNormalization and MatMul -> Add(bias) -> BatchNormalization.

With a constant 2-D ``B`` of shape ``(K, N)`` the output channels run along the last axis.
BN normalises axis 1, so the two coincide only for a 2-D activation: then
``s * (A @ B + b) + t = A @ (B (.)_1 s) + (s * b + t)``. Without an Add the shift ``t`` is
emitted as a new Add. A bias that varies along anything but the channel axis is not
per-channel and stops the fold.
"""

from __future__ import annotations

import onnx_ir as ir

from bnfold.consts import rank_of
from bnfold.patterns import LinearMatch, constant_param


def match(node: ir.Node, ir_version: int) -> LinearMatch | str:
    weight, reason = _constant_2d_weight(node, ir_version)
    if weight is None:
        return reason
    return LinearMatch(
        pattern="matmul-bn",
        node=node,
        weight_index=1,
        weight=weight,
        out_axis=1,
        channels=weight.shape[1],
        bias_node=None,
        bias_index=None,
        bias=None,
        output=node.outputs[0],
    )


def match_with_bias(add: ir.Node, ir_version: int) -> LinearMatch | str:
    for mm_index in (0, 1):
        matmul = add.inputs[mm_index].producer() if add.inputs[mm_index] is not None else None
        if matmul is not None and matmul.op_type == "MatMul" and matmul.domain in ("", "ai.onnx"):
            break
    else:
        return "no-linear-producer"
    mm_out = matmul.outputs[0]
    if mm_out.is_graph_output():
        return "graph-output"
    if len(mm_out.uses()) != 1:
        return "fan-out"
    weight, reason = _constant_2d_weight(matmul, ir_version)
    if weight is None:
        return reason
    bias_index = 1 - mm_index
    bias, reason = constant_param(add, bias_index, ir_version)
    if bias is None:
        return reason or "non-constant-weights"
    channels = weight.shape[1]
    if tuple(bias.shape) not in ((), (1,), (channels,), (1, channels)):
        return "non-channel-bias"
    return LinearMatch(
        pattern="matmul-add-bn",
        node=matmul,
        weight_index=1,
        weight=weight,
        out_axis=1,
        channels=channels,
        bias_node=add,
        bias_index=bias_index,
        bias=bias,
        output=add.outputs[0],
    )


def _constant_2d_weight(matmul: ir.Node, ir_version: int) -> tuple[ir.TensorProtocol | None, str | None]:
    weight, reason = constant_param(matmul, 1, ir_version)
    if weight is None:
        return None, reason or "non-constant-weights"
    if len(weight.shape) != 2:
        return None, "channel-axis-mismatch"
    rank = rank_of(matmul.inputs[0])
    if rank is None:
        return None, "unknown-rank"
    if rank != 2:
        return None, "channel-axis-mismatch"
    return weight, None
