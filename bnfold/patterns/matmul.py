"""MatMul -> affine and MatMul -> Add(bias) -> affine.

With a constant 2-D ``B`` of shape ``(K, N)`` the output channels run along the last axis:
``s * (A @ B + b) + t = A @ (B (.)_1 s) + (s * b + t)``. A BN normalises axis 1, so it
folds directly only on a 2-D activation (or through a Transpose that brings the last axis
to 1). Without an Add the shift is emitted as a new Add; a bias that varies along anything
but the channel axis is not per-channel and stops the fold.
"""

from __future__ import annotations

from bnfold._onnx_ir import ir
from bnfold.constant_eval import Constants, rank_of
from bnfold.ledger import NoMatch
from bnfold.patterns import LinearMatch, constant_param, describe, require_resolved
from bnfold.standard import is_standard


def match(node: ir.Node, consts: Constants) -> LinearMatch:
    first = consts.tensor(node.inputs[0])[0] if node.inputs and node.inputs[0] is not None else None
    second = consts.tensor(node.inputs[1])[0] if len(node.inputs) > 1 and node.inputs[1] is not None else None
    if second is None and first is not None and len(first.shape) == 2:
        # ``W @ x``: the output channels are W's rows, on the second axis from the end.
        return LinearMatch(
            pattern="constmatmul", node=node, weight_index=0, weight=first, out_axis=0, channels=first.shape[0],
            bias_node=None, bias_index=None, bias=None, output=node.outputs[0],
            rank=_rank_at_least_2(rank_of(node.inputs[1])), channel_axis=-2,
        )
    weight = constant_2d_weight(node, consts)
    return LinearMatch(
        pattern="matmul", node=node, weight_index=1, weight=weight, out_axis=1, channels=weight.shape[1],
        bias_node=None, bias_index=None, bias=None, output=node.outputs[0], rank=rank_of(node.inputs[0]),
        channel_axis=-1,
    )


def _rank_at_least_2(rank: int | None) -> int | None:
    return None if rank is None else max(rank, 2)


def bias_operand(add: ir.Node) -> tuple[ir.Node, int] | None:
    """For an Add reading a MatMul's output: the MatMul and the Add's other input index."""
    for mm_index in (0, 1):
        operand = add.inputs[mm_index]
        matmul = operand.producer() if operand is not None else None
        if matmul is not None and matmul.op_type == "MatMul" and is_standard(matmul):
            return matmul, 1 - mm_index
    return None


def match_with_bias(add: ir.Node, consts: Constants) -> LinearMatch:
    found = bias_operand(add)
    if found is None:
        raise NoMatch("no-linear-producer", f"input comes from {describe(add)}, which adds no MatMul bias")
    matmul, bias_index = found
    require_resolved(matmul)
    mm_out = matmul.outputs[0]
    if consts.is_output(mm_out):
        raise NoMatch("graph-output", f"{mm_out.name!r} of {describe(matmul)} is a graph output")
    if consts.sole_reader(mm_out) is None:
        raise NoMatch("fan-out", f"{mm_out.name!r} of {describe(matmul)} has {len(mm_out.uses())} readers")
    weight = constant_2d_weight(matmul, consts)
    bias = constant_param(add, bias_index, consts)
    channels = weight.shape[1]
    if not is_channel_bias(tuple(bias.shape), channels):
        raise NoMatch("non-channel-constant", f"bias of shape {list(bias.shape)} after {describe(matmul)}")
    return LinearMatch(
        pattern="matmul-add", node=matmul, weight_index=1, weight=weight, out_axis=1, channels=channels,
        bias_node=add, bias_index=bias_index, bias=bias, output=add.outputs[0], rank=rank_of(matmul.inputs[0]),
        channel_axis=-1,
    )


def is_channel_bias(shape: tuple[int, ...], channels: int) -> bool:
    """A MatMul bias that is one value per output channel (or one value): ``[N]``, ``[1, N]``,
    ``[1, 1, N]``, ... (the Add stays, with its broadcast, so leading 1s are fine)."""
    return all(d == 1 for d in shape[:-1]) and (not shape or shape[-1] in (1, channels))


def constant_2d_weight(matmul: ir.Node, consts: Constants) -> ir.TensorProtocol:
    weight = constant_param(matmul, 1, consts)  # a MatMul has its two inputs (the loader's check_node)
    if len(weight.shape) != 2:
        raise NoMatch("channel-axis-mismatch", f"{describe(matmul)} weight has shape {list(weight.shape)}, not 2-D")
    return weight
