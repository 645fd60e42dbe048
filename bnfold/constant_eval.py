"""The constant evaluator: constant and shape facts about graph values, as fold legality needs them.

Exporters often produce parameters through small constant subgraphs (a Reshape or
Transpose of an initializer, a Cast, the torch dynamo exporter's ``Expand`` zero bias,
``ConstantOfShape``). ``Constants.tensor`` evaluates those once, in numpy, so the rest of
the engine sees plain constants.
"""

from __future__ import annotations

import numpy as np

from bnfold._onnx_ir import ir
from bnfold.standard import is_standard

#: Ops whose output has the rank of their first input.
_RANK_PRESERVING = {
    "Relu", "LeakyRelu", "Sigmoid", "Tanh", "Elu", "Selu", "Gelu", "Softplus", "HardSigmoid",
    "HardSwish", "Clip", "Abs", "Neg", "Exp", "Log", "Sqrt", "Identity", "Cast", "Dropout",
    "BatchNormalization", "Softmax", "LogSoftmax",
}

#: Ops evaluated when all their inputs are constants.
EVALUATED_OPS = {"Identity", "Cast", "Reshape", "Transpose", "Unsqueeze", "Squeeze", "ConstantOfShape", "Expand",
                 "CastLike", "Shape"}


class Constants:
    """Constant lookup for one model, with the IR-version rule, a cache, and the model's
    graphs (a value's readers may be graph outputs of any of them)."""

    def __init__(self, ir_version: int, fold_overridable: bool = False, graphs: list[ir.Graph] | None = None):
        self.ir_version = ir_version
        self.fold_overridable = fold_overridable
        self.graphs = graphs or []
        # Keyed by the Value itself (identity hash): holding it keeps ids from being reused.
        self._cache: dict[ir.Value, ir.TensorProtocol | None] = {}

    def is_output(self, value: ir.Value) -> bool:
        """Whether ``value`` is an output of any graph (main, subgraph or function body):
        a subgraph may return a value of an enclosing graph."""
        return value.is_graph_output() or any(value is out for graph in self.graphs for out in graph.outputs)

    def sole_reader(self, value: ir.Value) -> tuple[ir.Node, int] | None:
        """The one (node, input index) reading the elements of ``value``, if that is its
        only such use anywhere (Shape and Size readers see only its shape, which no fold
        changes) and it is no graph output."""
        uses = element_readers(value)
        if len(uses) != 1 or self.is_output(value):
            return None
        return uses[0]

    def forget(self, value: ir.Value) -> None:
        """Drop a cached constant whose producer a rewrite changed."""
        self._cache.pop(value, None)

    def tensor(self, value: ir.Value | None) -> tuple[ir.TensorProtocol | None, str | None]:
        """The constant behind ``value``, or None with the reason it is not one.

        Initializers also listed as graph inputs are overridable defaults in IR >= 4
        (constants only with ``fold_overridable``) and plain constants in IR < 4, where
        every initializer had to be an input.
        """
        if value is None:
            return None, "non-constant-params"
        if value.is_graph_input():
            if value.const_value is not None and (self.ir_version < 4 or self.fold_overridable):
                return value.const_value, None
            return None, "overridable-params" if value.const_value is not None else "non-constant-params"
        if value not in self._cache:
            self._fill(value)
        tensor = self._cache[value]
        return (tensor, None) if tensor is not None else (None, "non-constant-params")

    def array(self, value: ir.Value | None) -> np.ndarray | None:
        tensor, _ = self.tensor(value)
        return None if tensor is None else tensor.numpy()

    def _fill(self, value: ir.Value) -> None:
        """Evaluate ``value`` and every uncached constant it depends on, deepest first,
        without recursion (exporters chain hundreds of Identity nodes)."""
        stack = [value]
        while stack:
            current = stack[-1]
            if current in self._cache:
                stack.pop()
                continue
            tensor = constant_tensor(current) if not current.is_graph_input() else None
            if tensor is not None:
                self._cache[current] = tensor
                stack.pop()
                continue
            node = current.producer()
            if node is None or not _evaluable(node):
                self._cache[current] = None
                stack.pop()
                continue
            operands = node.inputs[:1] if node.op_type in ("CastLike", "Shape") else node.inputs
            pending = [v for v in operands if v is not None and v not in self._cache and not v.is_graph_input()]
            if pending:
                stack.extend(pending)
                continue
            stack.pop()
            self._cache[current] = self._evaluate(current, node)

    def _evaluate(self, value: ir.Value, node: ir.Node) -> ir.TensorProtocol | None:
        if node.op_type == "Shape":
            return _shape_of(node)
        operands = node.inputs[:1] if node.op_type == "CastLike" else node.inputs
        inputs = []
        for operand in operands:
            if operand is None:
                inputs.append(None)
                continue
            array = self.array(operand)
            if array is None:
                return None
            inputs.append(array)
        if node.op_type == "CastLike":  # only the dtype of the second input matters
            target = node.inputs[1].dtype
            return None if target is None else ir.Tensor(inputs[0].astype(target.numpy()), name=value.name)
        try:
            result = _EVALUATORS[node.op_type](node, inputs)
        except (ValueError, TypeError, IndexError):  # shapes the op would refuse: not a constant we know
            return None
        return None if result is None else ir.Tensor(np.ascontiguousarray(result), name=value.name)


def constant_tensor(value: ir.Value | None) -> ir.TensorProtocol | None:
    """The tensor of an initializer or a Constant node, else None.

    Unlike onnx_ir's ``get_const_tensor`` it never renames the tensor it returns: those
    tensors are the input's own (a Constant that planning merely read keeps its name).
    """
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value
    node = value.producer()
    if (node is None or node.op_type != "Constant" or not is_standard(node) or len(node.outputs) != 1
            or len(node.attributes) != 1):
        return None
    name, attr = next(iter(node.attributes.items()))
    if attr.is_ref():
        return None
    if name in ("value_float", "value_floats"):
        return ir.Tensor(np.array(attr.value, dtype=np.float32), name=value.name)
    if name in ("value_int", "value_ints"):
        return ir.Tensor(np.array(attr.value, dtype=np.int64), name=value.name)
    if name == "value":
        return attr.as_tensor()
    return None  # strings and sparse values: nothing a fold reads


def element_readers(value: ir.Value) -> list[tuple[ir.Node, int]]:
    """The uses of ``value`` that read its elements, not only its shape (Shape, Size) or
    its type (CastLike's second input: the dynamo exporter casts constants like a value)."""
    return [(node, index) for node, index in value.uses()
            if not (is_standard(node) and (node.op_type in ("Shape", "Size")
                                                         or (node.op_type == "CastLike" and index == 1)))]


def _evaluable(node: ir.Node) -> bool:
    return (is_standard(node) and node.op_type in EVALUATED_OPS and len(node.outputs) == 1
            and not has_unresolved_reference(node))


def has_unresolved_reference(node: ir.Node) -> bool:
    """Whether an attribute of ``node`` still refers to a function attribute (``ref_attr_name``)
    whose value differs between call sites, so no single value can be folded with."""
    return any(attr.is_ref() for attr in node.attributes.values())


def is_evaluated_constant(node: ir.Node) -> bool:
    """Whether ``node`` is a Constant or an op ``Constants`` evaluates (so it may be pruned)."""
    return is_standard(node) and (node.op_type == "Constant" or node.op_type in EVALUATED_OPS)


def _shape_of(node: ir.Node) -> ir.Tensor | None:
    """Shape(x) needs only x's static shape: the dynamo exporter sizes zero biases with it."""
    source = node.inputs[0]
    dims = list(source.const_value.shape) if source.const_value is not None else static_dims(source)
    if dims is None or not all(isinstance(d, int) for d in dims):
        return None
    start = node.attributes.get_int("start", 0)
    end = node.attributes.get_int("end", len(dims))
    return ir.Tensor(np.array(dims[slice(start, end)], dtype=np.int64), name=node.outputs[0].name)


def _axes(node: ir.Node, inputs: list, position: int) -> list[int] | None:
    if len(inputs) > position and inputs[position] is not None:
        return [int(a) for a in inputs[position]]
    attr = node.attributes.get("axes")
    return None if attr is None else [int(a) for a in attr.value]


def _reshape(node, inputs):
    data, shape = inputs[0], [int(d) for d in inputs[1]]
    if not node.attributes.get_int("allowzero", 0):
        shape = [data.shape[i] if d == 0 else d for i, d in enumerate(shape)]
    return data.reshape(shape)


def _transpose(node, inputs):
    perm = node.attributes.get("perm")
    return np.transpose(inputs[0], None if perm is None else list(perm.value))


def _unsqueeze(node, inputs):
    axes = _axes(node, inputs, 1)
    if axes is None:
        return None
    rank = inputs[0].ndim + len(axes)
    result = inputs[0]
    for axis in sorted(a % rank for a in axes):
        result = np.expand_dims(result, axis)
    return result


def _squeeze(node, inputs):
    axes = _axes(node, inputs, 1)
    return np.squeeze(inputs[0], axis=None if axes is None else tuple(a % inputs[0].ndim for a in axes))


def _cast(node, inputs):
    return inputs[0].astype(ir.DataType(node.attributes.get_int("to")).numpy())


def _constant_of_shape(node, inputs):
    attr = node.attributes.get("value")
    fill = attr.value.numpy().reshape(()) if attr is not None else np.float32(0)
    return np.full([int(d) for d in inputs[0]], fill, dtype=fill.dtype)


def _expand(node, inputs):
    shape = np.broadcast_shapes(inputs[0].shape, tuple(int(d) for d in inputs[1]))
    return np.broadcast_to(inputs[0], shape)


_EVALUATORS = {
    "Identity": lambda node, inputs: inputs[0],
    "Cast": _cast,
    "Reshape": _reshape,
    "Transpose": _transpose,
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
    "ConstantOfShape": _constant_of_shape,
    "Expand": _expand,
}


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
    if op in ("Add", "Sub", "Mul", "Div") and len(producer.inputs) == 2 and all(producer.inputs):
        ranks = [rank_of(v, depth + 1) for v in producer.inputs]
        return None if None in ranks else max(ranks)
    if op in _RANK_PRESERVING:
        return rank_of(producer.inputs[0], depth + 1)
    if op == "MatMul":
        weight = constant_tensor(producer.inputs[1])
        if weight is not None and len(weight.shape) == 2:
            return rank_of(producer.inputs[0], depth + 1)
    if op in ("Conv", "ConvTranspose"):
        weight = constant_tensor(producer.inputs[1])
        if weight is not None:
            return len(weight.shape)
    if op == "Reshape":
        target = constant_tensor(producer.inputs[1])
        if target is not None:
            return len(target.numpy())
    return None


def static_dims(value: ir.Value) -> list[int | str] | None:
    """Dims of ``value``: ints, or names for symbolic dims; None if any dim is unknown."""
    if value.shape is None:
        return None
    dims = []
    for dim in value.shape:
        if isinstance(dim, int):
            dims.append(dim)
        elif dim is not None and getattr(dim, "value", None):
            dims.append(str(dim.value))
        else:
            return None
    return dims
