"""MatMul -> affine and MatMul -> Add(bias) -> affine.

With a constant 2-D ``B`` of shape ``(K, N)`` the output channels run along the last axis:
``s * (A @ B + b) + t = A @ (B (.)_1 s) + (s * b + t)``. A BN normalises axis 1, so it
folds directly only on a 2-D activation (or through a Transpose that brings the last axis
to 1). Without an Add the shift is emitted as a new Add; a bias that varies along anything
but the channel axis is not per-channel and stops the fold.
"""

from __future__ import annotations

from bnfold._onnx_ir import ir
from bnfold.consts import Constants, rank_of
from bnfold.patterns import LinearMatch, constant_param


def match(node: ir.Node, consts: Constants) -> LinearMatch | str:
    weight, reason = _constant_2d_weight(node, consts)
    if weight is None:
        return reason
    return LinearMatch(
        pattern="matmul",
        node=node,
        weight_index=1,
        weight=weight,
        out_axis=1,
        channels=weight.shape[1],
        bias_node=None,
        bias_index=None,
        bias=None,
        output=node.outputs[0],
        rank=rank_of(node.inputs[0]),
        channel_axis=-1,
    )


def bias_operand(add: ir.Node) -> tuple[ir.Node, int] | None:
    """For an Add reading a MatMul's output: the MatMul and the Add's other input index."""
    for mm_index in (0, 1):
        operand = add.inputs[mm_index]
        matmul = operand.producer() if operand is not None else None
        if matmul is not None and matmul.op_type == "MatMul" and matmul.domain in ("", "ai.onnx"):
            return matmul, 1 - mm_index
    return None


def match_with_bias(add: ir.Node, consts: Constants) -> LinearMatch | str:
    found = bias_operand(add)
    if found is None:
        return "no-linear-producer"
    matmul, bias_index = found
    mm_out = matmul.outputs[0]
    if mm_out.is_graph_output():
        return "graph-output"
    if len(mm_out.uses()) != 1:
        return "fan-out"
    weight, reason = _constant_2d_weight(matmul, consts)
    if weight is None:
        return reason
    bias, reason = constant_param(add, bias_index, consts)
    if bias is None:
        return reason or "non-constant-weights"
    channels = weight.shape[1]
    if tuple(bias.shape) not in ((), (1,), (channels,), (1, channels)):
        return "non-channel-constant"
    return LinearMatch(
        pattern="matmul-add",
        node=matmul,
        weight_index=1,
        weight=weight,
        out_axis=1,
        channels=channels,
        bias_node=add,
        bias_index=bias_index,
        bias=bias,
        output=add.outputs[0],
        rank=rank_of(matmul.inputs[0]),
        channel_axis=-1,
    )


def _constant_2d_weight(matmul: ir.Node, consts: Constants) -> tuple[ir.TensorProtocol | None, str | None]:
    weight, reason = constant_param(matmul, 1, consts)
    if weight is None:
        return None, reason or "non-constant-weights"
    if len(weight.shape) != 2:
        return None, "channel-axis-mismatch"
    return weight, None
