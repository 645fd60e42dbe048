"""Find every affine site, decide whether and how it folds, and fold it.

A *site* is a node that applies a per-channel affine map ``y = s*x + t`` to one data
input: every BatchNormalization, and a Mul/Div/Add/Sub with a constant operand that sits
after a linear op. ``plan_site`` is the single place where legality is decided (``inspect``
shows the same plan); the ``_apply_*`` functions rewrite the graph for a legal plan:

- *after*: fold into the linear op that produces the site's input, possibly through
  layout ops that keep each element's channel;
- *before*: fold a BN into the linear op that reads its output;
- *decompose* (opt-in): a BN with no linear neighbour becomes one Mul and one Add.

New weights are ``onnx_ir.LazyTensor``s for float32/float64, computed while the model is
written (``io.save_model``: a few at a time, on worker threads); half-precision weights
are computed up front because an overflow there is a real risk that must keep the BN
rather than fail the save.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bnfold._onnx_ir import ir
from bnfold import affine
from bnfold.consts import Constants, is_evaluated_constant, rank_of
from bnfold.errors import BnfoldError, InputError
from bnfold.io import EmbeddedTensor, as_model, has_external_data, save_model
from bnfold.ledger import STATUS_DECOMPOSED, STATUS_FOLDED, STATUS_KEPT, Ledger, LedgerEntry
from bnfold.patterns import LinearMatch, match_producer
from bnfold.patterns.consumer import ConsumerMatch, match_consumer
from bnfold.patterns.elementwise import ElementwiseSite, as_site, channel_vector, scale_shift
from bnfold.patterns.layout import Channel, is_layout, through
from bnfold.patterns.matmul import bias_operand

LAZY_TYPES = {ir.DataType.FLOAT, ir.DataType.DOUBLE}
DEFAULT_EPSILON = 1e-5
MAX_LAYOUT_CHAIN = 16


class FoldOverflowError(BnfoldError):
    """A lazily computed float32/float64 weight overflowed while being written."""


@dataclass(frozen=True)
class FoldOptions:
    """Opt-in behaviours of ``fold``; the defaults never change a model's interface."""

    #: Treat initializers that are also graph inputs (IR >= 4) as constants and drop the inputs.
    fold_overridable: bool = False
    #: Rewrite a BN with no linear neighbour into one Mul and one Add.
    decompose_standalone: bool = False
    #: Turn a training-mode BN whose running-stat outputs are unused into its inference form.
    to_inference: bool = False


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

    def scale_shift(self) -> tuple[np.ndarray, np.ndarray]:
        return affine.bn_scale_shift(self.gamma, self.beta, self.mean, self.var, self.epsilon)


@dataclass
class Site:
    """A node applying a per-channel affine map to input ``data_index``."""

    node: ir.Node
    scope: Scope
    data_index: int = 0
    elementwise: ElementwiseSite | None = None

    @property
    def is_bn(self) -> bool:
        return self.elementwise is None

    @property
    def kind(self) -> str:
        return "bn" if self.is_bn else self.node.op_type.lower()


@dataclass
class AfterFold:
    match: LinearMatch
    chain: list[ir.Node]


@dataclass
class Plan:
    """What ``fold`` would do with one site: a fold to apply, or the reason it stays."""

    site: Site
    stats: BNStats | None = None
    scale: np.ndarray | None = None
    shift: np.ndarray | None = None
    after: AfterFold | None = None
    before: ConsumerMatch | None = None
    decompose_rank: int | None = None
    #: Multipliers (broadcastable to the weight) that fold the map into it.
    weight_factor: np.ndarray | None = None
    #: The folded weight, computed at planning time for half types (to catch overflow).
    eager_weight: np.ndarray | None = None
    reason: str | None = None
    detail: str = ""

    @property
    def foldable(self) -> bool:
        return self.reason is None and (self.after is not None or self.before is not None)

    def keep(self, reason: str, detail: str) -> Plan:
        self.reason, self.detail = reason, detail
        self.after = self.before = None
        return self


@dataclass
class FoldResult:
    """The folded model and the ledger that explains every BN."""

    model: ir.Model
    ledger: Ledger
    source: Path | None = None
    external_data: bool = False

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


# --- finding sites -------------------------------------------------------------------


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
            if attr.type == ir.AttributeType.GRAPH:
                subgraphs = [(attr.value, "")]
            elif attr.type == ir.AttributeType.GRAPHS:
                subgraphs = [(sub, f"[{i}]") for i, sub in enumerate(attr.value)]
            else:
                continue
            for sub, suffix in subgraphs:
                # A subgraph's nodes are not a function body even inside one.
                yield from _graph_scopes(sub, f"{label}/{node.name or node.op_type}.{attr.name}{suffix}", opset, False)


def _default_opset(opset_imports: dict[str, int]) -> int:
    return opset_imports.get("", opset_imports.get("ai.onnx", 0))


def is_batch_norm(node: ir.Node) -> bool:
    return node.op_type == "BatchNormalization" and node.domain in ("", "ai.onnx")


def batch_norms(model: ir.Model) -> list[tuple[Scope, ir.Node]]:
    """Every BatchNormalization node of the model, in graph order, with its scope."""
    return [(scope, node) for scope in iter_scopes(model) for node in scope.graph if is_batch_norm(node)]


def elementwise_site(node: ir.Node, scope: Scope, consts: Constants) -> Site | None:
    """A constant Mul/Div/Add/Sub as a site, unless it is a MatMul's own bias Add."""
    found = as_site(node, consts)
    if found is None:
        return None
    if node.op_type == "Add" and bias_operand(node) is not None:
        return None
    return Site(node, scope, found.data_index, found)


# --- legality ------------------------------------------------------------------------


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
        used = _used_names(extra_outputs)
        what = f"running-stat outputs used: {', '.join(used)}" if used else "running-stat outputs present (unused)"
        return "training-mode", what
    if version <= 8 and not bn.attributes.get_int("spatial", 1):
        return "spatial-0", "spatial=0: per-element statistics"
    return None


def _used_names(values: list[ir.Value]) -> list[str]:
    return [v.name for v in values if v.uses() or v.is_graph_output()]


def read_stats(bn: ir.Node, consts: Constants) -> BNStats | tuple[str, str]:
    """The BN parameters as float64, or (reason, detail) if they are not constants.

    Raises InputError for parameters whose shapes make the model invalid.
    """
    if len(bn.inputs) < 5 or any(v is None for v in bn.inputs[1:5]):
        raise InputError(f"BatchNormalization {bn.name!r} lacks scale/B/mean/var inputs")
    arrays = []
    for role, value in zip(("scale", "B", "mean", "var"), bn.inputs[1:5]):
        tensor, reason = consts.tensor(value)
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


def plan_site(site: Site, consts: Constants, options: FoldOptions = FoldOptions()) -> Plan:
    """Decide, without changing anything, whether and how ``site`` folds."""
    plan = Plan(site=site)
    if site.is_bn:
        return _plan_bn(plan, consts, options)
    after = _plan_after(plan, consts, _elementwise_resolver(site.elementwise))
    if isinstance(after, tuple):
        return plan.keep(*after)
    plan.after = after
    return _prepare_after(plan)


def _plan_bn(plan: Plan, consts: Constants, options: FoldOptions) -> Plan:
    bn = plan.site.node
    problem = mode_problem(bn, plan.site.scope.opset)
    if problem is not None:
        return plan.keep(*problem)
    stats = read_stats(bn, consts)
    if isinstance(stats, tuple):
        return plan.keep(*stats)
    plan.stats = stats
    problem = stats_problem(stats)
    if problem is not None:
        return plan.keep(*problem)
    plan.scale, plan.shift = stats.scale_shift()
    after = _plan_after(plan, consts, _bn_resolver(plan))
    if not isinstance(after, tuple):
        plan.after = after
        return _prepare_after(plan)
    before = match_consumer(bn.outputs[0], consts)
    if isinstance(before, ConsumerMatch):
        plan.before = before
        return _prepare_before(plan)
    reason, detail = after
    if reason == "no-linear-producer":
        reason, detail = before[0], f"{detail}; {before[1]}"
    if reason == "no-linear-producer" and options.decompose_standalone:
        rank = rank_of(bn.inputs[0]) or rank_of(bn.outputs[0])
        if rank is not None:
            plan.decompose_rank = rank
    return plan.keep(reason, detail)


def _plan_after(plan: Plan, consts: Constants, resolve) -> AfterFold | tuple[str, str]:
    """Find the linear producer behind the site's input, through layout ops if any."""
    value = plan.site.node.inputs[plan.site.data_index]
    chain: list[ir.Node] = []
    while value.producer() is not None and is_layout(value.producer()) and len(chain) < MAX_LAYOUT_CHAIN:
        chain.insert(0, value.producer())
        value = value.producer().inputs[0]
    producer = value.producer()
    where = f"{producer.op_type} {producer.name!r}" if producer is not None else f"graph input {value.name!r}"
    match = match_producer(value, consts)
    if isinstance(match, str):
        return match, f"input comes from {where}"
    for step in [match.output, *(node.outputs[0] for node in chain)]:
        if step.is_graph_output():
            return "graph-output", f"{step.name!r} between {where} and the site is a graph output"
        readers = len(step.uses())
        if readers != 1:
            return "fan-out", f"{step.name!r} between {where} and the site has {readers} readers"
    channel = match.channel
    for node in chain:
        channel = through(node, channel, consts)
        if isinstance(channel, str):
            return "unproven-layout", f"{channel} ({node.op_type} {node.name!r})"
    resolved = resolve(channel, where)
    if isinstance(resolved, tuple) and isinstance(resolved[0], str):
        return resolved
    plan.scale, plan.shift = resolved
    return AfterFold(match, chain)


def _bn_resolver(plan: Plan):
    stats = plan.stats

    def resolve(channel: Channel, where: str):
        known = channel.normalized()
        if channel.axis is None:
            if stats.channels != 1:
                return "channel-axis-mismatch", f"{where} has one channel, the BN normalises {stats.channels}"
        elif known is None:
            return "unknown-rank", f"the rank of {where}'s output cannot be proven"
        elif known.axis != 1:
            return "channel-axis-mismatch", f"{where}'s channels are on axis {known.axis}, the BN normalises axis 1"
        elif channel.count != stats.channels:
            raise InputError(
                f"BatchNormalization {plan.site.node.name!r} has {stats.channels} channels but its "
                f"producer {where} has {channel.count} output channels: invalid model"
            )
        return plan.scale, plan.shift

    return resolve


def _elementwise_resolver(site: ElementwiseSite):
    def resolve(channel: Channel, where: str):
        vector = channel_vector(site.constant, channel)
        if isinstance(vector, str):
            return "non-channel-constant", vector
        result = scale_shift(site, vector)
        if isinstance(result, str):
            return "non-finite-params", result
        return result

    return resolve


def _prepare_after(plan: Plan) -> Plan:
    """The weight factor of an after-fold (and the folded weight itself for half types)."""
    match = plan.after.match
    plan.weight_factor = affine.output_channel_factor(match.weight.shape, plan.scale, match.out_axis, match.groups)
    return _eager_if_half(plan, match.weight)


def _prepare_before(plan: Plan) -> Plan:
    """Check a before-fold's channel counts and padding; compute its weight factor."""
    consumer, stats = plan.before, plan.stats
    where = f"{consumer.node.op_type} {consumer.node.name!r}"
    if consumer.in_channels % stats.channels or (consumer.flatten is None and consumer.in_channels != stats.channels):
        raise InputError(
            f"BatchNormalization {plan.site.node.name!r} has {stats.channels} channels but "
            f"{where} reads {consumer.in_channels} input channels: invalid model"
        )
    consumer.repeat = consumer.in_channels // stats.channels
    if not consumer.exact_shift and np.any(plan.scale == 0):
        return plan.keep("zero-scale", f"{where} pads its input and a BN scale is 0, so the shift cannot stay as an Add")
    plan.weight_factor = affine.input_channel_factor(
        consumer.weight.shape, _per_feature(plan.scale, consumer), consumer.in_axis, consumer.groups)
    return _eager_if_half(plan, consumer.weight)


def _eager_if_half(plan: Plan, weight: ir.TensorProtocol) -> Plan:
    """Half-precision folds are computed now, so that an overflow keeps the site."""
    if weight.dtype in LAZY_TYPES:
        return plan
    plan.eager_weight = affine.apply_factor(weight.numpy(), plan.weight_factor, weight.dtype.numpy())
    if plan.eager_weight is None:
        return plan.keep("dtype-overflow", f"folded weight exceeds the range of {weight.dtype.name}")
    return plan


def _per_feature(vector: np.ndarray, consumer: ConsumerMatch) -> np.ndarray:
    return np.repeat(vector, consumer.repeat)


# --- rewriting -----------------------------------------------------------------------


@dataclass
class Rewriter:
    """What the rewriting steps share: names, constants and options of one fold run."""

    model: ir.Model
    consts: Constants
    options: FoldOptions
    names: NameAllocator = field(init=False)

    def __post_init__(self):
        self.names = NameAllocator(self.model)

    def constant(self, scope: Scope, base: str, tensor: ir.TensorProtocol, before: ir.Node) -> ir.Value:
        """A fresh constant: an initializer in graphs, a Constant node in function bodies."""
        name = self.names.fresh(base)
        tensor.name = name
        if scope.in_function:
            node = ir.Node("", "Constant", [], attributes=[ir.AttrTensor("value", tensor)],
                           outputs=[ir.Value(name=name)])
            scope.graph.insert_before(before, node)
            return node.outputs[0]
        value = ir.Value(name=name, const_value=tensor)
        scope.graph.register_initializer(value)
        if scope.initializers_are_inputs:
            value.type, value.shape = ir.TensorType(tensor.dtype), ir.Shape(tensor.shape)
            scope.graph.inputs.append(value)
        return value

    def replace_weight(self, plan: Plan, scope: Scope, node: ir.Node, index: int,
                       source: ir.TensorProtocol) -> ir.Value:
        """Give ``node`` the folded weight as a new constant; returns the replaced value."""
        old = node.inputs[index]
        node.replace_input_with(index, self.constant(scope, f"{old.name}_bnfold", _folded_weight(plan, source, node), node))
        return old

    def set_bias(self, scope: Scope, node: ir.Node, bias_node: ir.Node | None, bias_index: int | None,
                 new_bias: np.ndarray, bias_factor: float, base: str) -> ir.Value | None:
        """Write ``new_bias`` into the bias slot; returns the replaced bias value, if any.

        Without a slot (a bare MatMul) the bias becomes an Add after ``node``, unless it is
        all zero. A Gemm's beta was folded into the bias, so it is reset to 1.
        """
        if bias_node is None:
            if np.any(new_bias != 0):
                self.add_after(scope, node, node.outputs[0], new_bias, base)
            return None
        old = bias_node.inputs[bias_index] if bias_index < len(bias_node.inputs) else None
        if bias_index >= len(bias_node.inputs):
            bias_node.resize_inputs(bias_index + 1)
        name = old.name if old is not None else f"{node.name or 'node'}_bias"
        bias_node.replace_input_with(bias_index, self.constant(scope, f"{name}_bnfold", ir.tensor(new_bias), bias_node))
        if bias_factor != 1.0:
            bias_node.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
        return old

    def add_after(self, scope: Scope, node: ir.Node, value: ir.Value, addend: np.ndarray, base: str) -> ir.Value:
        """Insert ``value + addend`` after ``node`` and make every reader of ``value`` read it."""
        readers = list(value.uses())
        constant = self.constant(scope, f"{base}_bnfold_shift", ir.tensor(addend), before=node)
        add = ir.Node("", "Add", [value, constant], outputs=[ir.Value(name=self.names.fresh(f"{base}_bnfold_add"))])
        scope.graph.insert_after(node, add)
        for reader, index in readers:
            reader.replace_input_with(index, add.outputs[0])
        return add.outputs[0]


def _apply_after(plan: Plan, rw: Rewriter) -> LedgerEntry:
    site, scope, match = plan.site, plan.site.scope, plan.after.match
    bias_dtype = match.bias.dtype if match.bias is not None else match.weight.dtype
    old_bias = None if match.bias is None else match.bias.numpy() * match.bias_factor
    new_bias = affine.cast_checked(affine.shifted_bias(old_bias, plan.scale, plan.shift), bias_dtype.numpy())
    if new_bias is None:
        return _kept(plan.keep("dtype-overflow", f"folded bias exceeds the range of {bias_dtype.name}"))

    old_weight = rw.replace_weight(plan, scope, match.node, match.weight_index, match.weight)
    old_bias_value = rw.set_bias(scope, match.node, match.bias_node, match.bias_index, new_bias,
                                 match.bias_factor, site.node.name or "site")

    _remove_site(site, site.node.inputs[site.data_index])
    weight_cloned = bool(old_weight.uses())
    for value in (old_weight, old_bias_value):
        _drop_if_unused(value)
    chain = "".join(f"-{node.op_type.lower()}" for node in plan.after.chain)
    return _entry(plan, STATUS_FOLDED, pattern=f"{match.pattern}{chain}-{site.kind}", into=match.node.name,
                  weight_cloned=weight_cloned, detail="shared weight cloned" if weight_cloned else "")


def _apply_before(plan: Plan, rw: Rewriter) -> LedgerEntry:
    site, scope, consumer = plan.site, plan.site.scope, plan.before
    bn = site.node
    dtype = consumer.weight.dtype
    if consumer.exact_shift:
        extra = affine.input_shift_bias(consumer.weight.numpy(), _per_feature(plan.shift, consumer),
                                        consumer.in_axis, consumer.out_axis, consumer.groups)
        old_bias = 0.0 if consumer.bias is None else consumer.bias.numpy().astype(np.float64) * consumer.bias_factor
        bias_dtype = consumer.bias.dtype if consumer.bias is not None else dtype
        new_bias = affine.cast_checked(old_bias + consumer.shift_factor * extra, bias_dtype.numpy())
        if new_bias is None:
            return _kept(plan.keep("dtype-overflow", f"folded bias exceeds the range of {bias_dtype.name}"))
    else:
        shape = [plan.stats.channels] + [1] * (len(consumer.weight.shape) - 2)
        addend = affine.cast_checked((plan.shift / plan.scale).reshape(shape), dtype.numpy())
        if addend is None:
            return _kept(plan.keep("dtype-overflow", f"t / s exceeds the range of {dtype.name}"))

    old_weight = rw.replace_weight(plan, scope, consumer.node, consumer.weight_index, consumer.weight)

    old_bias_value = None
    if not consumer.exact_shift:
        constant = rw.constant(scope, f"{bn.name or 'bn'}_bnfold_shift", ir.tensor(addend), bn)
        shifted = ir.Node("", "Add", [bn.inputs[0], constant],
                          outputs=[ir.Value(name=rw.names.fresh(f"{bn.name or 'bn'}_bnfold_add"))])
        scope.graph.insert_before(bn, shifted)
        _remove_site(site, shifted.outputs[0])
    else:
        old_bias_value = rw.set_bias(scope, consumer.node, consumer.bias_node, consumer.bias_index, new_bias,
                                     consumer.bias_factor, bn.name or "bn")
        bn.outputs[0].replace_all_uses_with(bn.inputs[0])
        stale = list(bn.inputs[1:])
        scope.graph.remove(bn, safe=True)
        for value in stale:
            _drop_if_unused(value)
    for value in (old_weight, old_bias_value):
        _drop_if_unused(value)
    weight_cloned = bool(old_weight.uses())
    detail = "" if consumer.exact_shift else "shift kept as an Add before the padded conv"
    return _entry(plan, STATUS_FOLDED, pattern=consumer.pattern, into=consumer.node.name,
                  weight_cloned=weight_cloned, detail="; ".join(filter(None, [detail, "shared weight cloned" if weight_cloned else ""])))


def _apply_decompose(plan: Plan, rw: Rewriter) -> LedgerEntry:
    """Replace a BN that has no linear neighbour by ``x * s + t`` with precomputed constants."""
    scope, bn = plan.site.scope, plan.site.node
    scale, shift = plan.stats.scale_shift()
    dtype = ir.DataType(bn.inputs[0].dtype) if bn.inputs[0].dtype is not None else None
    np_dtype = dtype.numpy() if dtype is not None else np.float32
    shape = [plan.stats.channels] + [1] * (plan.decompose_rank - 2)
    s_cast = affine.cast_checked(scale.reshape(shape), np_dtype)
    t_cast = affine.cast_checked(shift.reshape(shape), np_dtype)
    if s_cast is None or t_cast is None:
        return _kept(plan.keep("dtype-overflow", "decomposed constants exceed the BN's dtype"))
    base = bn.name or "bn"
    scaled = ir.Node("", "Mul", [bn.inputs[0], rw.constant(scope, f"{base}_bnfold_scale", ir.tensor(s_cast), bn)],
                     outputs=[ir.Value(name=rw.names.fresh(f"{base}_bnfold_mul"))])
    scope.graph.insert_before(bn, scaled)
    shifted = ir.Node("", "Add", [scaled.outputs[0], rw.constant(scope, f"{base}_bnfold_shift", ir.tensor(t_cast), bn)],
                      outputs=[ir.Value(name=rw.names.fresh(f"{base}_bnfold_add"))])
    scope.graph.insert_before(bn, shifted)
    reason, detail = plan.reason, plan.detail
    _remove_site(plan.site, shifted.outputs[0])
    return LedgerEntry(op=bn.op_type, node=bn.name, graph=scope.label, status=STATUS_DECOMPOSED, pattern="bn-mul-add",
                       reason=reason, detail=detail, channels=plan.stats.channels)


def _remove_site(site: Site, replacement: ir.Value) -> None:
    """Drop the site node; ``replacement`` takes over its output, name included."""
    node = site.node
    output = node.outputs[0]
    name = output.name
    if replacement.type is None:
        replacement.type = output.type
    if replacement.shape is None:
        replacement.shape = output.shape
    output.replace_all_uses_with(replacement, replace_graph_outputs=True)
    stale = [v for i, v in enumerate(node.inputs) if i != site.data_index]
    site.scope.graph.remove(node, safe=True)
    replacement.name = name  # downstream and graph-output names stay as they were
    for value in stale:
        _drop_if_unused(value)


def _folded_weight(plan: Plan, source: ir.TensorProtocol, node: ir.Node) -> ir.TensorProtocol:
    """The folded weight: computed while saving for float32/float64, already for half types."""
    if plan.eager_weight is not None:
        return ir.Tensor(plan.eager_weight)
    dtype, factor = source.dtype, plan.weight_factor

    def materialise() -> ir.Tensor:
        folded = affine.apply_factor(_source_array(source), factor, dtype.numpy())
        if folded is None:
            raise FoldOverflowError(f"folded weight of {node.name!r} overflows {dtype.name}")
        return ir.Tensor(folded)

    return ir.LazyTensor(materialise, dtype=dtype, shape=ir.Shape(source.shape))


def _source_array(source: ir.TensorProtocol) -> np.ndarray:
    """A weight's values; data that lies in a file (external data, or a large weight left in
    the model file at load) through a private read-only map of just that tensor.

    The map is unmapped when the array goes, so its pages count against memory only while
    this one tensor is folded, and concurrent folds (the save folds on two workers) never
    share or close one another's mapping. io.load_model has checked the file and range.
    """
    if isinstance(source, EmbeddedTensor):
        source.check_source()
    if isinstance(source, ir.ExternalTensor) and source.size:
        little_endian = np.dtype(source.dtype.numpy()).newbyteorder("<")
        return np.memmap(source.path, dtype=little_endian, mode="r", offset=source.offset or 0,
                         shape=tuple(source.shape.numpy()))
    return source.numpy()


def _drop_if_unused(value: ir.Value | None) -> None:
    """Remove a parameter the fold orphaned, and the constant subgraph that produced it."""
    if value is None or value.uses() or value.is_graph_output():
        return
    if value.is_initializer():
        owner = value.graph
        if value.is_graph_input():
            owner.inputs.remove(value)
        owner.initializers.pop(value.name)
        return
    producer = value.producer()
    if producer is not None and is_evaluated_constant(producer) and not any(v.uses() for v in producer.outputs):
        inputs = list(producer.inputs)
        producer.graph.remove(producer, safe=True)
        for operand in inputs:
            _drop_if_unused(operand)


def _convert_to_inference(bn: ir.Node, opset: int) -> str | None:
    """Make a training-mode BN an inference BN if its running-stat outputs are unused."""
    extra = [v for v in bn.outputs[1:] if v is not None and v.name]
    used = _used_names(extra)
    if used:
        return f"running-stat outputs used ({', '.join(used)}): cannot convert to inference form"
    bn.resize_outputs(1)
    if "training_mode" in bn.attributes:
        bn.attributes.pop("training_mode")
    if (bn.version or opset) == 6:
        bn.attributes["is_test"] = ir.AttrInt64("is_test", 1)
    return None


class NameAllocator:
    """Unique value names across the whole model, for the tensors a fold creates."""

    def __init__(self, model: ir.Model):
        self.taken: set[str] = set()
        for scope in iter_scopes(model):
            graph = scope.graph
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


def _entry(plan: Plan, status: str, **fields) -> LedgerEntry:
    return LedgerEntry(
        op=plan.site.node.op_type, node=plan.site.node.name, graph=plan.site.scope.label, status=status,
        channels=plan.stats.channels if plan.stats else (plan.scale.shape[0] if plan.scale is not None else None),
        max_rel_weight_change=affine.max_relative_change(plan.scale) if status == STATUS_FOLDED else None,
        **fields,
    )


def _kept(plan: Plan) -> LedgerEntry:
    return _entry(plan, STATUS_KEPT, reason=plan.reason, detail=plan.detail)


def fold(model_or_path: ir.Model | str | os.PathLike, options: FoldOptions = FoldOptions(), **flags) -> FoldResult:
    """Fold every legal affine site; a path is loaded, a Model is changed in place.

    ``flags`` are FoldOptions fields, for convenience: ``fold(path, to_inference=True)``.
    """
    if flags:
        options = FoldOptions(**{**options.__dict__, **flags})
    source = None if isinstance(model_or_path, ir.Model) else Path(model_or_path)
    model = as_model(model_or_path)
    external = has_external_data(model)
    consts = Constants(model.ir_version, fold_overridable=options.fold_overridable)
    rw = Rewriter(model, consts, options)
    ledger = Ledger()
    for scope in list(iter_scopes(model)):
        for node in list(scope.graph):
            if node.graph is not scope.graph:
                continue  # removed by an earlier fold
            entry = _fold_node(node, scope, rw)
            if entry is not None:
                ledger.add(entry)
    return FoldResult(model=model, ledger=ledger, source=source, external_data=external)


def _fold_node(node: ir.Node, scope: Scope, rw: Rewriter) -> LedgerEntry | None:
    converted = None
    if is_batch_norm(node):
        site = Site(node, scope)
        problem = mode_problem(node, scope.opset)
        if rw.options.to_inference and problem is not None and problem[0] == "training-mode":
            refusal = _convert_to_inference(node, scope.opset)
            converted = refusal is None
            if refusal is not None:
                return _entry(Plan(site=site).keep("training-mode", refusal), STATUS_KEPT,
                              reason="training-mode", detail=refusal)
    else:
        site = elementwise_site(node, scope, rw.consts)
        if site is None:
            return None
    plan = plan_site(site, rw.consts, rw.options)
    if not site.is_bn and plan.reason == "no-linear-producer":
        return None  # a Mul/Add with no linear op behind it is not a folding site at all
    if plan.foldable:
        entry = _apply_after(plan, rw) if plan.after is not None else _apply_before(plan, rw)
    elif plan.decompose_rank is not None:
        entry = _apply_decompose(plan, rw)
    else:
        entry = _kept(plan)
    if converted:
        entry.converted_from_training = True
        entry.detail = "; ".join(filter(None, ["converted from training mode", entry.detail]))
    return entry


def _channels(mask: np.ndarray, limit: int = 8) -> str:
    idx = np.flatnonzero(mask)
    shown = ", ".join(str(i) for i in idx[:limit])
    return shown + (f", ... ({idx.size} in all)" if idx.size > limit else "")
