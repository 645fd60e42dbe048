"""Constant and rank facts about graph values, as the fold legality rules need them."""

from __future__ import annotations

import onnx_ir as ir

#: Ops whose output has the rank of their first input.
_RANK_PRESERVING = {
    "Relu", "LeakyRelu", "Sigmoid", "Tanh", "Elu", "Selu", "Gelu", "Softplus", "HardSigmoid",
    "HardSwish", "Clip", "Abs", "Neg", "Exp", "Log", "Sqrt", "Identity", "Cast", "Dropout",
    "BatchNormalization", "Softmax", "LogSoftmax",
}


def constant_tensor(value: ir.Value, ir_version: int) -> tuple[ir.TensorProtocol | None, str | None]:
    """The constant behind ``value``, or None with the reason it is not one.

    Initializers also listed as graph inputs are overridable defaults in IR >= 4 and
    plain constants in IR < 4, where every initializer had to be an input.
    """
    if value.is_graph_input():
        if value.const_value is not None and ir_version < 4:
            return value.const_value, None
        return None, "overridable-params" if value.const_value is not None else "non-constant-params"
    tensor = ir.convenience.get_const_tensor(value)
    if tensor is None:
        return None, "non-constant-params"
    return tensor, None


def rank_of(value: ir.Value, depth: int = 0) -> int | None:
    """The rank of ``value`` when its shape or a short chain of producers proves it."""
    if value.shape is not None:
        return len(value.shape)
    producer = value.producer()
    if producer is None or depth > 32:
        return None
    op = producer.op_type
    if op in ("Flatten", "Gemm"):
        return 2
    if op in _RANK_PRESERVING:
        return rank_of(producer.inputs[0], depth + 1)
    if op == "MatMul":
        weight = ir.convenience.get_const_tensor(producer.inputs[1])
        if weight is not None and len(weight.shape) == 2:
            return rank_of(producer.inputs[0], depth + 1)
    if op == "Reshape":
        target = ir.convenience.get_const_tensor(producer.inputs[1])
        if target is not None:
            return len(target.numpy())
    return None
