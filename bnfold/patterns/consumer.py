"""BatchNormalization before a linear op (input normalisation, BN -> Flatten -> Gemm).

``y = W * (s*x + t) + b = (W (.)_in s) * x + (b + W * t)``. The second term is one value
per output channel only where the op sees every input element with its full weight: always
for Gemm and MatMul, for Conv only without padding (a padded border sees zeros, not t).
With padding the scale still folds exactly and the shift stays as ``x + t/s`` before the
conv, because zero-padding ``x + t/s`` and then scaling by s pads ``s*x + t`` with zeros.
Through ``Flatten(axis=1)`` each BN channel covers ``K / C`` consecutive features.
"""

from __future__ import annotations

from dataclasses import dataclass

from bnfold._onnx_ir import ir
from bnfold.consts import Constants, rank_of
from bnfold.patterns import constant_param, weight_and_bias


@dataclass
class ConsumerMatch:
    pattern: str
    node: ir.Node
    weight_index: int
    weight: ir.TensorProtocol
    in_axis: int
    out_axis: int
    in_channels: int
    bias_node: ir.Node | None
    bias_index: int | None
    bias: ir.TensorProtocol | None
    groups: int = 1
    #: Features per BN channel when a Flatten sits between (K / C), else 1.
    repeat: int = 1
    #: Gemm's alpha multiplies W * t; beta multiplies the old bias.
    shift_factor: float = 1.0
    bias_factor: float = 1.0
    #: False for a padded Conv: only the scale folds, the shift stays as an Add.
    exact_shift: bool = True
    flatten: ir.Node | None = None


def match_consumer(bn_output: ir.Value, consts: Constants) -> ConsumerMatch | tuple[str, str]:
    """The linear op reading ``bn_output``, or (reason, detail)."""
    uses = list(bn_output.uses())
    readers = ", ".join(f"{node.op_type} {node.name!r}" for node, _ in uses) or "nothing"
    if not any(node.op_type in _MATCHERS or node.op_type == "Flatten" for node, _ in uses):
        return "no-linear-producer", f"the BN output is read by {readers}"
    if bn_output.is_graph_output():
        return "graph-output", "the BN output is a graph output"
    if len(uses) != 1:
        return "fan-out", f"the BN output has {len(uses)} readers ({readers})"
    node, index = uses[0]
    flatten = None
    if node.op_type == "Flatten" and node.attributes.get_int("axis", 1) == 1 and index == 0:
        flatten = node
        flat_out = node.outputs[0]
        if flat_out.is_graph_output() or len(flat_out.uses()) != 1:
            return "fan-out", "the Flatten after the BN has other readers"
        node, index = next(iter(flat_out.uses()))
    if node.domain not in ("", "ai.onnx") or index != 0 or node.op_type not in _MATCHERS:
        return "no-linear-producer", f"the BN output is read by {node.op_type} {node.name!r}"
    if flatten is not None and node.op_type not in ("Gemm", "MatMul"):
        return "no-linear-producer", "Flatten after the BN feeds a non-matrix op"
    match = _MATCHERS[node.op_type](node, consts)
    if isinstance(match, tuple):
        return match
    match.flatten = flatten
    if flatten is not None:
        match.pattern = match.pattern.replace("bn-", "bn-flatten-")
    elif node.op_type == "MatMul" and rank_of(bn_output) != 2:
        return "channel-axis-mismatch", "BN before MatMul on an activation that is not proven 2-D"
    return match


def _params(node: ir.Node, consts: Constants):
    params = weight_and_bias(node, consts)
    if isinstance(params, str):
        return params, f"{node.op_type} {node.name!r} weight or bias is not a constant"
    return params


def _conv(node: ir.Node, consts: Constants):
    params = _params(node, consts)
    if isinstance(params[0], str):
        return params
    weight, bias = params
    groups = node.attributes.get_int("group", 1)
    pads = node.attributes.get("pads")
    auto_pad = node.attributes.get_string("auto_pad", "NOTSET")
    unpadded = auto_pad in ("NOTSET", "VALID") and (pads is None or not any(pads.value))
    return ConsumerMatch(
        pattern="bn-conv" if unpadded else "bn-conv-scale",
        node=node, weight_index=1, weight=weight, in_axis=1, out_axis=0,
        in_channels=weight.shape[1] * groups, bias_node=node, bias_index=2, bias=bias,
        groups=groups, exact_shift=unpadded,
    )


def _gemm(node: ir.Node, consts: Constants):
    if node.attributes.get_int("transA", 0):
        return "channel-axis-mismatch", "Gemm with transA=1 reads the BN channels as rows"
    params = _params(node, consts)
    if isinstance(params[0], str):
        return params
    weight, bias = params
    in_axis = 1 if node.attributes.get_int("transB", 0) else 0
    return ConsumerMatch(
        pattern="bn-gemm", node=node, weight_index=1, weight=weight, in_axis=in_axis, out_axis=1 - in_axis,
        in_channels=weight.shape[in_axis], bias_node=node, bias_index=2, bias=bias,
        shift_factor=node.attributes.get_float("alpha", 1.0), bias_factor=node.attributes.get_float("beta", 1.0),
    )


def _matmul(node: ir.Node, consts: Constants):
    weight, reason = constant_param(node, 1, consts)
    if weight is None:
        return reason or "non-constant-weights", f"MatMul {node.name!r} weight is not a constant"
    if len(weight.shape) != 2:
        return "channel-axis-mismatch", f"MatMul {node.name!r} weight is not 2-D"
    bias_node, bias_index, bias = _following_bias(node, weight.shape[1], consts)
    return ConsumerMatch(
        pattern="bn-matmul", node=node, weight_index=1, weight=weight, in_axis=0, out_axis=1,
        in_channels=weight.shape[0], bias_node=bias_node, bias_index=bias_index, bias=bias,
    )


def _following_bias(matmul: ir.Node, channels: int, consts: Constants):
    """A per-channel constant Add right after the MatMul, used as its bias slot."""
    out = matmul.outputs[0]
    uses = list(out.uses())
    if out.is_graph_output() or len(uses) != 1:
        return None, None, None
    add, index = uses[0]
    if add.op_type != "Add" or add.domain not in ("", "ai.onnx"):
        return None, None, None
    bias_index = 1 - index
    bias, _ = consts.tensor(add.inputs[bias_index])
    if bias is None or tuple(bias.shape) not in ((), (1,), (channels,), (1, channels)):
        return None, None, None
    return add, bias_index, bias


_MATCHERS = {"Conv": _conv, "Gemm": _gemm, "MatMul": _matmul}
