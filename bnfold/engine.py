"""Find every BatchNormalization, decide whether it can be folded, and fold it.

``plan_bn`` is the single place where legality is decided (``inspect`` shows the same
plan); ``apply_fold`` rewrites the graph for a legal plan. New weights are
``onnx_ir.LazyTensor``s for float32/float64, so they are computed while the model is
written, one at a time; half-precision weights are computed up front because an
overflow there is a real risk that must keep the BN rather than fail the save.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir

from bnfold import affine
from bnfold.consts import constant_tensor
from bnfold.errors import BnfoldError, InputError
from bnfold.io import as_model, has_external_data, save_model
from bnfold.ledger import STATUS_FOLDED, STATUS_KEPT, Ledger, LedgerEntry
from bnfold.patterns import LinearMatch, match_producer

LAZY_TYPES = {ir.DataType.FLOAT, ir.DataType.DOUBLE}
DEFAULT_EPSILON = 1e-5


class FoldOverflowError(BnfoldError):
    """A lazily computed float32/float64 weight overflowed while being written."""


@dataclass
class Scope:
    """A graph, function body or subgraph, with a label for the ledger."""

    label: str
    graph: ir.Graph
    opset: int
    in_function: bool = False
    #: IR < 4 requires every initializer of the main graph to be listed as an input too.
    initializers_are_inputs: bool = False


@dataclass
class BNStats:
    """The four BN parameters as float64 arrays, plus epsilon."""

    gamma: np.ndarray
    beta: np.ndarray
    mean: np.ndarray
    var: np.ndarray
    epsilon: float

    @property
    def channels(self) -> int:
        return self.gamma.shape[0]


@dataclass
class Plan:
    """What ``fold`` would do with one BN: a match to apply, or the reason it stays."""

    bn: ir.Node
    scope: Scope
    stats: BNStats | None = None
    match: LinearMatch | None = None
    scale: np.ndarray | None = None
    shift: np.ndarray | None = None
    reason: str | None = None
    detail: str = ""

    @property
    def foldable(self) -> bool:
        return self.match is not None and self.reason is None


@dataclass
class FoldResult:
    """The folded model and the ledger that explains every BN."""

    model: ir.Model
    ledger: Ledger
    source: Path | None = None
    external_data: bool = False
    notes: list[str] = field(default_factory=list)

    def save(self, path: str | os.PathLike, *, external_data: str | None | bool = None, callback=None) -> None:
        """Write atomically. ``external_data``: a file name, True for ``<name>.data``, False
        to embed; None keeps the input's choice (external stays external)."""
        target = Path(path)
        if external_data is None:
            external_data = self.external_data
        if external_data is True:
            external_data = f"{target.name}.data"
        try:
            save_model(self.model, target, external_data=external_data or None, callback=callback)
        except FoldOverflowError as exc:
            raise FoldOverflowError(f"{target}: {exc}") from None


def iter_scopes(model: ir.Model) -> Iterator[Scope]:
    """The main graph, every subgraph (If/Loop/Scan bodies) and model-local functions."""
    default_opset = _default_opset(model.opset_imports)
    main, *subgraphs = _graph_scopes(model.graph, "main", default_opset, False)
    main.initializers_are_inputs = model.ir_version < 4
    yield main
    yield from subgraphs
    for function in model.functions.values():
        opset = _default_opset(function.opset_imports) or default_opset
        label = f"function {function.domain}::{function.name}"
        yield from _graph_scopes(function.graph, label, opset, True)


def _graph_scopes(graph: ir.Graph, label: str, opset: int, in_function: bool) -> Iterator[Scope]:
    yield Scope(label, graph, opset, in_function)
    for node in graph:
        for attr in node.attributes.values():
            subgraphs = [attr.value] if attr.type == ir.AttributeType.GRAPH else (
                list(attr.value) if attr.type == ir.AttributeType.GRAPHS else [])
            for i, sub in enumerate(subgraphs):
                suffix = f"[{i}]" if attr.type == ir.AttributeType.GRAPHS else ""
                # A subgraph's nodes are not a function body even inside one.
                yield from _graph_scopes(sub, f"{label}/{node.name or node.op_type}.{attr.name}{suffix}", opset, False)


def _default_opset(opset_imports: dict[str, int]) -> int:
    return opset_imports.get("", opset_imports.get("ai.onnx", 0))


def batch_norms(model: ir.Model) -> list[tuple[Scope, ir.Node]]:
    """Every BatchNormalization node of the model, in graph order, with its scope."""
    return [
        (scope, node)
        for scope in iter_scopes(model)
        for node in scope.graph
        if node.op_type == "BatchNormalization" and node.domain in ("", "ai.onnx")
    ]


def mode_problem(bn: ir.Node, opset: int) -> tuple[str, str] | None:
    """Why this BN is not an inference-form BN at all, as (reason, detail)."""
    version = bn.version or opset
    extra_outputs = [v for v in bn.outputs[1:] if v is not None and v.name]
    if version < 6:
        return "unsupported-opset", f"BatchNormalization-{version}"
    if version >= 14 and bn.attributes.get_int("training_mode", 0):
        return "training-mode", "training_mode=1: the node normalises with batch statistics"
    if version == 6 and not bn.attributes.get_int("is_test", 0):
        return "training-mode", "is_test=0: opset-6 BN in training mode"
    if extra_outputs:
        used = [v.name for v in extra_outputs if v.uses() or v.is_graph_output()]
        what = f"running-stat outputs used: {', '.join(used)}" if used else "running-stat outputs present (unused)"
        return "training-mode", what
    if version <= 8 and not bn.attributes.get_int("spatial", 1):
        return "spatial-0", "spatial=0: per-element statistics"
    return None


def read_stats(bn: ir.Node, ir_version: int) -> BNStats | tuple[str, str]:
    """The BN parameters as float64, or (reason, detail) if they are not constants.

    Raises InputError for parameters whose shapes make the model invalid.
    """
    if len(bn.inputs) < 5 or any(v is None for v in bn.inputs[1:5]):
        raise InputError(f"BatchNormalization {bn.name!r} lacks scale/B/mean/var inputs")
    arrays = []
    for role, value in zip(("scale", "B", "mean", "var"), bn.inputs[1:5]):
        tensor, reason = constant_tensor(value, ir_version)
        if tensor is None:
            producer = value.producer()
            source = f"computed by {producer.op_type} {producer.name!r}" if producer else "a graph input"
            return reason, f"{role} {value.name!r} is {source}"
        arrays.append(tensor.numpy().astype(np.float64))
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise InputError(
            f"BatchNormalization {bn.name!r}: scale/B/mean/var must be 1-D of one length, "
            f"got shapes {[list(a.shape) for a in arrays]}"
        )
    epsilon = bn.attributes.get_float("epsilon", DEFAULT_EPSILON)
    return BNStats(*arrays, epsilon=epsilon)


def stats_problem(stats: BNStats) -> tuple[str, str] | None:
    """Statistics that make ``s`` undefined: the BN is kept, never folded."""
    for role in ("gamma", "beta", "mean", "var"):
        bad = ~np.isfinite(getattr(stats, role))
        if bad.any():
            return "non-finite-params", f"{role} is NaN/inf on channel(s) {_channels(bad)}"
    bad = (stats.var < 0) | (stats.var + stats.epsilon <= 0)
    if bad.any():
        return "negative-variance", f"var < 0 or var + eps <= 0 on channel(s) {_channels(bad)}"
    return None


def plan_bn(bn: ir.Node, scope: Scope, ir_version: int) -> Plan:
    """Decide, without changing anything, whether and how ``bn`` folds."""
    plan = Plan(bn=bn, scope=scope)
    problem = mode_problem(bn, scope.opset)
    if problem is None:
        stats = read_stats(bn, ir_version)
        if isinstance(stats, tuple):
            problem = stats
        else:
            plan.stats = stats
            problem = stats_problem(stats) or _producer_problem(plan, ir_version)
    if problem is not None:
        plan.reason, plan.detail = problem
    return plan


def _producer_problem(plan: Plan, ir_version: int) -> tuple[str, str] | None:
    x = plan.bn.inputs[0]
    match = match_producer(x, ir_version)
    producer = x.producer()
    where = f"{producer.op_type} {producer.name!r}" if producer is not None else f"graph input {x.name!r}"
    if isinstance(match, str):
        return match, f"input comes from {where}"
    if match.output.is_graph_output():
        return "graph-output", f"{where} output {match.output.name!r} is a graph output"
    readers = len(match.output.uses())
    if readers != 1:
        return "fan-out", f"{where} output {match.output.name!r} has {readers} readers"
    if match.channels != plan.stats.channels:
        raise InputError(
            f"BatchNormalization {plan.bn.name!r} has {plan.stats.channels} channels but its "
            f"producer {where} has {match.channels} output channels: invalid model"
        )
    plan.match = match
    return _overflow_problem(plan)


def _overflow_problem(plan: Plan) -> tuple[str, str] | None:
    """Half-precision folds are computed now so that an overflow keeps the BN."""
    match, stats = plan.match, plan.stats
    plan.scale, plan.shift = affine.bn_scale_shift(stats.gamma, stats.beta, stats.mean, stats.var, stats.epsilon)
    dtype = match.weight.dtype
    if dtype in LAZY_TYPES:
        return None
    new_weight = affine.scale_output_channels(match.weight.numpy(), plan.scale, match.out_axis, match.groups)
    if affine.cast_checked(new_weight, dtype.numpy()) is None:
        return "dtype-overflow", f"folded weight exceeds the range of {dtype.name}"
    return None


def apply_fold(plan: Plan, names: NameAllocator) -> LedgerEntry:
    """Rewrite the graph for a foldable plan and return its ledger entry."""
    match, stats, bn, scope = plan.match, plan.stats, plan.bn, plan.scope
    scale, shift = plan.scale, plan.shift
    graph = scope.graph
    weight_dtype = match.weight.dtype

    bias_dtype = match.bias.dtype if match.bias is not None else weight_dtype
    old_bias = None if match.bias is None else match.bias.numpy() * match.bias_factor
    new_bias = affine.cast_checked(affine.shifted_bias(old_bias, scale, shift), bias_dtype.numpy())
    if new_bias is None:
        return _kept(plan, "dtype-overflow", f"folded bias exceeds the range of {bias_dtype.name}")

    old_weight_value = match.node.inputs[match.weight_index]
    new_weight_value = _new_constant(
        graph, scope, names, f"{old_weight_value.name}_bnfold",
        _folded_weight(match, scale), before=match.node,
    )
    match.node.replace_input_with(match.weight_index, new_weight_value)

    if match.bias_node is None:
        bias_value = _new_constant(graph, scope, names, f"{bn.name or 'bn'}_bnfold_shift", ir.tensor(new_bias), before=bn)
        add = ir.Node("", "Add", [match.output, bias_value], outputs=[ir.Value(name=names.fresh(f"{bn.name or 'bn'}_bnfold_add"))])
        graph.insert_after(match.node, add)
        output = add.outputs[0]
        old_bias_value = None
    else:
        old_bias_value = (match.bias_node.inputs[match.bias_index]
                          if match.bias_index < len(match.bias_node.inputs) else None)
        base = old_bias_value.name if old_bias_value is not None else f"{match.node.name or 'node'}_bias"
        bias_value = _new_constant(graph, scope, names, f"{base}_bnfold", ir.tensor(new_bias), before=match.bias_node)
        if match.bias_index >= len(match.bias_node.inputs):
            match.bias_node.resize_inputs(match.bias_index + 1)
        match.bias_node.replace_input_with(match.bias_index, bias_value)
        if match.bias_factor != 1.0:
            match.bias_node.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
        output = match.output

    bn_output = bn.outputs[0]
    bn_output_name = bn_output.name
    if output.type is None:
        output.type = bn_output.type
    if output.shape is None:
        output.shape = bn_output.shape
    bn_output.replace_all_uses_with(output, replace_graph_outputs=True)
    stale = [old_weight_value, old_bias_value, *bn.inputs[1:]]
    graph.remove(bn, safe=True)
    output.name = bn_output_name  # downstream and graph-output names stay as they were
    weight_cloned = bool(old_weight_value.uses())
    for value in stale:
        _drop_if_unused(value)

    return LedgerEntry(
        bn=bn.name, graph=scope.label, status=STATUS_FOLDED, pattern=match.pattern,
        into=match.node.name, channels=stats.channels,
        max_rel_weight_change=affine.max_relative_change(scale), weight_cloned=weight_cloned,
        detail="shared weight cloned" if weight_cloned else "",
    )


def _folded_weight(match: LinearMatch, scale: np.ndarray) -> ir.TensorProtocol:
    source, dtype = match.weight, match.weight.dtype
    axis, groups = match.out_axis, match.groups

    def compute() -> ir.Tensor:
        folded = affine.scale_output_channels(source.numpy(), scale, axis, groups)
        if isinstance(source, ir.ExternalTensor):
            source.release()  # the mapped pages of the source are no longer needed
        cast = affine.cast_checked(folded, dtype.numpy())
        if cast is None:
            raise FoldOverflowError(f"folded weight of {match.node.name!r} overflows {dtype.name}")
        return ir.Tensor(cast)

    if dtype in LAZY_TYPES:
        return ir.LazyTensor(compute, dtype=dtype, shape=ir.Shape(source.shape))
    return compute()


def _new_constant(graph: ir.Graph, scope: Scope, names: NameAllocator, base: str,
                  tensor: ir.TensorProtocol, before: ir.Node) -> ir.Value:
    """A fresh constant: an initializer in graphs, a Constant node in function bodies."""
    name = names.fresh(base)
    tensor.name = name
    if scope.in_function:
        node = ir.Node("", "Constant", [], attributes=[ir.AttrTensor("value", tensor)],
                       outputs=[ir.Value(name=name)])
        graph.insert_before(before, node)
        return node.outputs[0]
    value = ir.Value(name=name, const_value=tensor)
    graph.register_initializer(value)
    if scope.initializers_are_inputs:
        value.type, value.shape = ir.TensorType(tensor.dtype), ir.Shape(tensor.shape)
        graph.inputs.append(value)
    return value


def _drop_if_unused(value: ir.Value | None) -> None:
    """Remove a parameter the fold orphaned: its initializer, input entry or Constant node."""
    if value is None or value.uses() or value.is_graph_output():
        return
    if value.is_initializer():
        owner = value.graph
        if value.is_graph_input():
            owner.inputs.remove(value)
        owner.initializers.pop(value.name)
        return
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant" and not any(v.uses() for v in producer.outputs):
        producer.graph.remove(producer, safe=True)


class NameAllocator:
    """Unique value names across the whole model, for the tensors a fold creates."""

    def __init__(self, model: ir.Model):
        self.taken: set[str] = set()
        graphs = [scope.graph for scope in iter_scopes(model)]
        for graph in graphs:
            self.taken.update(v.name for v in graph.inputs if v.name)
            self.taken.update(graph.initializers)
            for node in graph:
                self.taken.update(v.name for v in node.outputs if v is not None and v.name)

    def fresh(self, base: str) -> str:
        name, counter = base, 1
        while name in self.taken:
            counter += 1
            name = f"{base}_{counter}"
        self.taken.add(name)
        return name


def _kept(plan: Plan, reason: str, detail: str) -> LedgerEntry:
    return LedgerEntry(bn=plan.bn.name, graph=plan.scope.label, status=STATUS_KEPT, reason=reason,
                       detail=detail, channels=plan.stats.channels if plan.stats else None)


def fold(model_or_path: ir.Model | str | os.PathLike) -> FoldResult:
    """Fold every legal BatchNormalization; a path is loaded, a Model is changed in place."""
    source = None if isinstance(model_or_path, ir.Model) else Path(model_or_path)
    model = as_model(model_or_path)
    external = has_external_data(model)
    ledger = Ledger()
    names = NameAllocator(model)
    for scope, bn in batch_norms(model):
        plan = plan_bn(bn, scope, model.ir_version)
        ledger.add(apply_fold(plan, names) if plan.foldable else _kept(plan, plan.reason, plan.detail))
    return FoldResult(model=model, ledger=ledger, source=source, external_data=external)


def _channels(mask: np.ndarray, limit: int = 8) -> str:
    idx = np.flatnonzero(mask)
    shown = ", ".join(str(i) for i in idx[:limit])
    return shown + (f", ... ({idx.size} in all)" if idx.size > limit else "")
