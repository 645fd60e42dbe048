"""Planning: for every affine site, an immutable ``Fold`` or a ``Keep`` with its reason.

A *site* is a node that applies a per-channel affine map ``y = s*x + t`` to one data
input: every BatchNormalization, and a Mul/Div/Add/Sub with a constant operand that sits
after a linear op. ``plan_site`` decides everything about a site — legality, axes, the
scale and shift, the new bias, and the overflow and finiteness checks of weight, bias and
addend — so that rewriting it (``bnfold.rewrite``) cannot fail or change its mind.
``inspect`` reports these same plans, so inspect and fold agree by construction.

Directions:
- *after*: fold into the linear op that produces the site's input, possibly through
  layout ops that keep each element's channel;
- *before*: fold a BN into the linear op that reads its output;
- *decompose* (opt-in): a BN with no linear neighbour becomes one Mul and one Add.
"""

from __future__ import annotations

import dataclasses
import mmap
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from bnfold import affine
from bnfold._onnx_ir import ir
from bnfold.constant_eval import Constants, element_readers, rank_of, static_dims
from bnfold.errors import InputError
from bnfold.folded import compose
from bnfold.ledger import NoMatch
from bnfold.patterns import LinearMatch, describe, match_producer, require_resolved
from bnfold.patterns.consumer import MATCHERS as CONSUMERS
from bnfold.patterns.consumer import ConsumerMatch, match_consumer, match_reader
from bnfold.patterns.elementwise import ElementwiseSite, as_site, channel_vector, scale_shift
from bnfold.patterns.layout import Channel, is_layout, through
from bnfold.patterns.matmul import bias_operand

DEFAULT_EPSILON = 1e-5
MAX_LAYOUT_CHAIN = 16


@dataclass(frozen=True)
class FoldOptions:
    """Opt-in behaviours of ``fold``; the defaults never change a model's interface."""

    #: Treat initializers that are also graph inputs (IR >= 4) as constants and drop the inputs.
    fold_overridable: bool = False
    #: Rewrite a BN with no linear neighbour into one Mul and one Add.
    decompose_standalone: bool = False
    #: Turn a training-mode BN whose running-stat outputs are unused into its inference form.
    to_inference: bool = False


@dataclass(frozen=True)
class Scope:
    """A graph, function body or subgraph, with a label for the ledger."""

    label: str
    graph: ir.Graph
    opset: int
    in_function: bool = False
    #: IR < 4: every main-graph initializer is listed as an input too; subgraphs get Constant nodes.
    old_ir: bool = False
    is_main: bool = False


@dataclass(frozen=True)
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


@dataclass(frozen=True)
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


@dataclass(frozen=True)
class WeightEdit:
    """``node.inputs[index]`` becomes ``source * factor`` (computed in float64 while saving)."""

    node: ir.Node
    index: int
    source: ir.TensorProtocol
    factor: np.ndarray


@dataclass(frozen=True)
class BiasEdit:
    """The new bias: into ``node.inputs[index]``, or (node None) as an Add after ``after``."""

    values: np.ndarray
    node: ir.Node | None = None
    index: int | None = None
    after: ir.Node | None = None
    #: Gemm: beta was folded into the new C, so it becomes 1.
    reset_beta: bool = False


@dataclass(frozen=True)
class Part:
    """One linear op's share of a fold: its new weight and bias (a Concat feeds several)."""

    weight: WeightEdit
    bias: BiasEdit | None


@dataclass(frozen=True)
class Fold:
    """Everything the rewrite needs for one site; nothing about it is left to decide."""

    site: Site
    direction: str  # "after", "before" or "decompose"
    pattern: str
    channels: int
    scale: np.ndarray
    into: tuple[ir.Node, ...] = ()
    parts: tuple[Part, ...] = ()
    #: Padded Conv after the BN: the shift stays as ``x + t/s``, this constant.
    addend: np.ndarray | None = None
    #: --decompose-standalone: the Mul and Add constants, in the BN's dtype.
    decomposed: tuple[np.ndarray, np.ndarray] | None = None
    chain: tuple[ir.Node, ...] = ()
    convert: bool = False
    detail: str = ""
    #: The axis of the site's data input along which ``scale`` runs (negative: from the end,
    #: the rank unknown); None for a one-channel (scalar) map whose axis was not followed.
    channel_axis: int | None = None


@dataclass(frozen=True)
class Keep:
    """A site that stays as it is, with a reason from ``ledger.REASONS``."""

    site: Site
    reason: str
    detail: str
    channels: int | None = None
    convert: bool = False


Plan = Fold | Keep


@dataclass
class Context:
    """What planning reads: the constant evaluator and the options."""

    consts: Constants
    options: FoldOptions = field(default_factory=FoldOptions)


# --- finding sites -------------------------------------------------------------------


def iter_scopes(model: ir.Model) -> Iterator[Scope]:
    """The main graph, every subgraph (If/Loop/Scan bodies) and model-local functions."""
    default_opset = _default_opset(model.opset_imports)
    old_ir = model.ir_version < 4
    yield from _graph_scopes(model.graph, "main", default_opset, False, old_ir, True)
    for function in model.functions.values():
        opset = _default_opset(function.opset_imports) or default_opset
        label = f"function {function.domain}::{function.name}"
        yield from _graph_scopes(function.graph, label, opset, True, old_ir, False)


def _graph_scopes(graph: ir.Graph, label: str, opset: int, in_function: bool, old_ir: bool,
                  is_main: bool) -> Iterator[Scope]:
    pending = [(graph, label, in_function, is_main)]
    while pending:
        graph, label, in_function, is_main = pending.pop(0)
        yield Scope(label, graph, opset, in_function, old_ir, is_main)
        for node in graph:
            for attr in node.attributes.values():
                if attr.is_ref():
                    continue
                if attr.type == ir.AttributeType.GRAPH:
                    subgraphs = [(attr.value, "")]
                elif attr.type == ir.AttributeType.GRAPHS:
                    subgraphs = [(sub, f"[{i}]") for i, sub in enumerate(attr.value)]
                else:
                    continue
                for sub, suffix in subgraphs:
                    # A subgraph's nodes are not a function body's, even inside one: they hold initializers.
                    pending.append((sub, f"{label}/{node.name or node.op_type}.{attr.name}{suffix}", False, False))


def _default_opset(opset_imports: dict[str, int]) -> int:
    return opset_imports.get("", opset_imports.get("ai.onnx", 0))


def is_batch_norm(node: ir.Node) -> bool:
    return node.op_type == "BatchNormalization" and node.domain in ("", "ai.onnx")


def as_site_of(node: ir.Node, scope: Scope, consts: Constants) -> Site | None:
    """``node`` as a site: every BN, and a constant Mul/Div/Add/Sub that is not a MatMul's own bias."""
    if is_batch_norm(node):
        return Site(node, scope)
    found = as_site(node, consts)
    if found is None or (node.op_type == "Add" and bias_operand(node) is not None):
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
        used = used_names(extra_outputs)
        what = f"running-stat outputs used: {', '.join(used)}" if used else "running-stat outputs present (unused)"
        return "training-mode", what
    if version <= 8 and not bn.attributes.get_int("spatial", 1):
        return "spatial-0", "spatial=0: per-element statistics"
    return None


def used_names(values: list[ir.Value]) -> list[str]:
    return [v.name for v in values if v.uses() or v.is_graph_output()]


def read_stats(bn: ir.Node, consts: Constants) -> BNStats:
    """The BN parameters as float64; NoMatch if they are not constants.

    Raises InputError for parameters whose shapes make the model invalid.
    """
    if len(bn.inputs) < 5 or any(v is None for v in bn.inputs[1:5]):
        raise InputError(f"BatchNormalization {bn.name!r} lacks scale/B/mean/var inputs")
    arrays = []
    for role, value in zip(("scale", "B", "mean", "var"), bn.inputs[1:5]):
        tensor, reason = consts.tensor(value)
        if tensor is None:
            source = f"computed by {describe(value.producer())}" if value.producer() else "a graph input"
            raise NoMatch(reason, f"{role} {value.name!r} is {source}")
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
            return "non-finite-params", f"{role} is NaN/inf on channel(s) {channel_list(bad)}"
    bad = (stats.var < 0) | (stats.var + stats.epsilon <= 0)
    if bad.any():
        return "negative-variance", f"var < 0 or var + eps <= 0 on channel(s) {channel_list(bad)}"
    return None


# --- planning ------------------------------------------------------------------------


def plan_site(site: Site, ctx: Context) -> Plan | None:
    """Decide, without changing anything, whether and how ``site`` folds.

    None for a Mul/Add with no linear op behind it: that is not a folding site at all.
    """
    convert = False
    channels = None
    try:
        require_resolved(site.node)
        if not site.is_bn:
            return _plan_elementwise(site, ctx)
        problem = mode_problem(site.node, site.scope.opset)
        if problem is not None:
            convert = _convertible(site.node, problem, ctx.options)
            if not convert:
                return Keep(site, *problem)
        stats = read_stats(site.node, ctx.consts)
        channels = stats.channels
        problem = stats_problem(stats)
        if problem is not None:
            raise NoMatch(*problem)
        if channels == 0:
            raise NoMatch("zero-size", "the BN has no channels")
        return _plan_bn(site, stats, ctx, convert)
    except NoMatch as no:
        return Keep(site, no.reason, no.detail, channels, convert)


def _convertible(bn: ir.Node, problem: tuple[str, str], options: FoldOptions) -> bool:
    """--to-inference applies to a training-mode BN whose running-stat outputs nobody reads."""
    if not options.to_inference or problem[0] != "training-mode":
        return False
    extra = [v for v in bn.outputs[1:] if v is not None and v.name]
    if used_names(extra):
        raise NoMatch("training-mode", f"running-stat outputs used ({', '.join(used_names(extra))}): "
                                       "cannot convert to inference form")
    return True


def _plan_elementwise(site: Site, ctx: Context) -> Plan | None:
    """A constant Mul/Add/Sub/Div folds into the linear op before it or, failing that, the
    one after it; with no linear neighbour at all it is not a site (None)."""
    constant = site.elementwise.constant
    try:
        matches, chain, channel = _producer_chain(site, ctx, scalar=constant.ndim == 0)
        scale, shift = scale_shift(site.elementwise, channel_vector(constant, channel))
        return _plan_after(site, matches, chain, channel, scale, shift, ctx)
    except NoMatch as after:
        try:
            return _plan_elementwise_before(site, ctx)
        except NoMatch as before:
            if after.reason != "no-linear-producer":
                raise after from None
            if before.reason == "no-linear-producer":
                return None
            raise


def _plan_elementwise_before(site: Site, ctx: Context) -> Fold:
    """Keras' BN before a Dense (``Mul -> Add -> MatMul``), input normalisation before a
    Conv or Gemm: the constant runs along the axis the op reads as its input features."""
    data, out = site.node.inputs[site.data_index], site.node.outputs[0]
    if not any(n.op_type in CONSUMERS and n.domain in ("", "ai.onnx") for n, _ in element_readers(out)):
        raise NoMatch("no-linear-producer", f"no linear op reads the {site.node.op_type} output")
    node, index = match_reader(out, ctx.consts)
    if node.domain not in ("", "ai.onnx") or index != 0 or node.op_type not in CONSUMERS:
        raise NoMatch("no-linear-producer", f"the {site.node.op_type} output is read by {describe(node)}")
    require_resolved(node)
    consumer = CONSUMERS[node.op_type](node, ctx.consts)
    # The data input, not the site's output, must have the op's input rank: a constant
    # that broadcast the data to a higher rank cannot be folded away.
    want = consumer.input_channel
    rank = rank_of(data)
    if want.axis != -1 and rank != want.rank:
        raise NoMatch("unknown-rank" if rank is None else "channel-axis-mismatch",
                      f"the rank of {data.name!r} read through the {site.node.op_type} is not proven to be {want.rank}")
    _require_no_broadcast(data, site.elementwise.constant.shape, site.node)
    channel = Channel(rank if want.axis == -1 else want.rank,
                      want.axis if want.axis != -1 or rank is None else rank - 1, want.count)
    scale, shift = scale_shift(site.elementwise, channel_vector(site.elementwise.constant, channel))
    if not consumer.exact_shift and np.any(shift != 0):
        raise NoMatch("padded-consumer", f"{describe(node)} pads its input: only a pure scale folds there")
    consumer = dataclasses.replace(consumer, pattern=consumer.pattern.replace("bn-", f"{site.kind}-", 1))
    return _fold_before(site, consumer, scale, shift, consumer.in_channels, ctx, False, channel.axis)


def _plan_bn(site: Site, stats: BNStats, ctx: Context, convert: bool) -> Plan:
    scale, shift = stats.scale_shift()
    scalar = stats.channels == 1
    try:
        matches, chain, channel = _producer_chain(site, ctx, scalar=scalar)
        match = matches[0]
        if scalar:  # one channel: a scalar map, the same s and t for every producer channel
            scale, shift = np.full(channel.count, scale[0]), np.full(channel.count, shift[0])
        else:
            known = channel.normalized()
            if channel.axis is None:
                raise NoMatch("channel-axis-mismatch", f"{describe(match.node)} has one channel, "
                                                       f"the BN normalises {stats.channels}")
            if known is None:
                raise NoMatch("unknown-rank", f"the rank of {describe(match.node)}'s output cannot be proven")
            if known.axis != 1:
                raise NoMatch("channel-axis-mismatch", f"{describe(match.node)}'s channels are on axis "
                                                       f"{known.axis}, the BN normalises axis 1")
            if channel.count != stats.channels:
                raise InputError(f"BatchNormalization {site.node.name!r} has {stats.channels} channels but its "
                                 f"producer {describe(match.node)} has {channel.count} output channels: invalid model")
        return _plan_after(site, matches, chain, channel, scale, shift, ctx, convert)
    except NoMatch as after:
        scale, shift = stats.scale_shift()
        try:
            return _plan_before(site, stats, scale, shift, ctx, convert)
        except NoMatch as before:
            if after.reason != "no-linear-producer":
                raise after from None
            if before.reason != "no-linear-producer":
                raise before from None
            detail = f"{after.detail}; {before.detail}"
            if ctx.options.decompose_standalone:
                decomposed = _plan_decompose(site, stats, scale, shift, convert, detail, ctx.consts)
                if decomposed is not None:
                    return decomposed
            raise NoMatch("no-linear-producer", detail) from None


def _producer_chain(site: Site, ctx: Context, *, scalar: bool = False):
    """The linear producer(s) behind the site's input, through layout ops, and the channel
    there; every value on the way must be read by the next step alone. A Concat along the
    channel axis of linear producers (each read by the Concat alone) gives several. A
    scalar map commutes with every layout op, so its channel needs no proof."""
    value = site.node.inputs[site.data_index]
    chain: list[ir.Node] = []
    while value.producer() is not None and is_layout(value.producer()) and len(chain) < MAX_LAYOUT_CHAIN:
        chain.insert(0, value.producer())
        value = value.producer().inputs[0]
        if value is None:
            raise NoMatch("no-linear-producer", "a layout op before the site has no data input")
    concat = value.producer()
    if concat is not None and concat.op_type == "Concat" and concat.domain in ("", "ai.onnx"):
        matches, channel = _concat_producers(concat, ctx)
        steps = [value]
    else:
        matches = (match_producer(value, ctx.consts),)
        channel = matches[0].channel
        steps = [matches[0].output]
    where = describe(matches[0].node if len(matches) == 1 else concat)
    for step in [*steps, *(node.outputs[0] for node in chain)]:
        if ctx.consts.is_output(step):
            raise NoMatch("graph-output", f"{step.name!r} between {where} and the site is a graph output")
        if ctx.consts.sole_reader(step) is None:
            raise NoMatch("fan-out", f"{step.name!r} between {where} and the site has {len(step.uses())} readers")
    for node in chain:
        require_resolved(node)
        if not scalar:
            channel = through(node, channel, ctx.consts)
    return matches, tuple(chain), channel


def _concat_producers(concat: ir.Node, ctx: Context) -> tuple[tuple[LinearMatch, ...], Channel]:
    """timm's mixed convolutions: ``Split -> Conv_i -> Concat(axis=1)``. Each input's
    channels are one slice of the Concat's, so the map folds slice by slice."""
    require_resolved(concat)
    matches = []
    for value in concat.inputs:
        if value is None:
            raise NoMatch("no-linear-producer", f"{describe(concat)} has an empty input")
        match = match_producer(value, ctx.consts)
        if ctx.consts.is_output(match.output) or ctx.consts.sole_reader(match.output) is None:
            raise NoMatch("fan-out", f"{match.output.name!r} of {describe(match.node)} is read by more than "
                                     f"{describe(concat)}")
        matches.append(match)
    if len({id(m.node) for m in matches}) != len(matches):
        raise NoMatch("fan-out", f"{describe(concat)} reads one producer twice")
    channels = [m.channel.normalized() for m in matches]
    ranks = {c.rank for c in channels if c is not None}
    axes = {c.axis for c in channels if c is not None}
    if None in channels or len(ranks) != 1 or None in ranks or len(axes) != 1:
        raise NoMatch("unproven-layout", f"the inputs of {describe(concat)} do not share a proven channel axis")
    rank, axis = ranks.pop(), axes.pop()
    if concat.attributes.get_int("axis", 0) % rank != axis:
        raise NoMatch("channel-axis-mismatch", f"{describe(concat)} does not concatenate along the channel axis")
    return tuple(matches), Channel(rank, axis, sum(m.channels for m in matches))


def _require_no_broadcast(data: ir.Value, shape: tuple[int, ...], node: ir.Node) -> None:
    """Removing the site must leave its output's shape: the constant may not stretch any
    axis of the data (a ``[3]`` constant on a ``[.., 1]`` tensor makes it ``[.., 3]``)."""
    dims = static_dims(data)
    for offset, size in enumerate(reversed(shape), start=1):
        if size == 1:
            continue
        if dims is None or offset > len(dims) or dims[-offset] != size:
            raise NoMatch("non-channel-constant", f"the {node.op_type} constant of shape {list(shape)} may broadcast "
                                                  f"{data.name!r} to a larger shape")


def _plan_after(site: Site, matches: tuple[LinearMatch, ...], chain: tuple, channel: Channel, scale: np.ndarray,
                shift: np.ndarray, ctx: Context, convert: bool = False) -> Fold:
    """``W' = s (.)_out W``, ``b' = s * (beta * b) + t`` for each producer, on its slice of the
    channels; every result checked before anything changes."""
    parts, start = [], 0
    for match in matches:
        stop = start + match.channels
        parts.append(_after_part(match, scale[start:stop], shift[start:stop]))
        start = stop
    producers = matches[0].pattern if len(matches) == 1 else f"concat({'+'.join(m.pattern for m in matches)})"
    pattern = f"{producers}{''.join(f'-{node.op_type.lower()}' for node in chain)}-{site.kind}"
    known = channel.normalized() or channel
    return Fold(site, "after", pattern, scale.shape[0], scale, into=tuple(m.node for m in matches),
                parts=tuple(parts), chain=chain, convert=convert, channel_axis=known.axis)


def _after_part(match: LinearMatch, scale: np.ndarray, shift: np.ndarray) -> Part:
    weight = match.weight
    _require_nonempty(weight, scale, match.node)
    source, factor = compose(weight, affine.output_channel_factor(tuple(weight.shape), scale, match.out_axis,
                                                                  match.groups))
    _require_weight_fits(match.node, source, factor)
    # beta = 0: onnxruntime ignores C, so the fold must too (0 * inf would be NaN).
    old_bias = None
    if match.bias is not None and match.bias_factor != 0:
        old_bias = _finite(match.bias.numpy().astype(np.float64), match.node, "bias") * match.bias_factor
    bias_dtype = (match.bias if match.bias is not None else weight).dtype
    new_bias = _cast(affine.shifted_bias(old_bias, scale, shift), bias_dtype, "folded bias", match.node)
    edit = WeightEdit(match.node, match.weight_index, source, factor)
    if match.bias_node is not None:
        return Part(edit, BiasEdit(new_bias, match.bias_node, match.bias_index, reset_beta=match.bias_factor != 1.0))
    if not np.any(new_bias != 0):
        return Part(edit, None)
    # A new Add after the op, shaped to broadcast along its channel axis (counted from the end).
    trailing = -match.channel_axis - 1 if match.channel_axis < 0 else 0
    return Part(edit, BiasEdit(new_bias.reshape([-1] + [1] * trailing), after=match.node))


def _plan_before(site: Site, stats: BNStats, scale: np.ndarray, shift: np.ndarray, ctx: Context,
                 convert: bool) -> Fold:
    """A BN before the linear op that reads its output (through layout ops if any)."""
    bn = site.node
    channel = Channel(rank_of(bn.inputs[0]) or rank_of(bn.outputs[0]), 1, stats.channels)
    consumer = match_consumer(bn.outputs[0], channel, ctx.consts, scalar=stats.channels == 1)
    if not consumer.exact_shift and np.any(scale == 0):
        raise NoMatch("zero-scale", f"{describe(consumer.node)} pads its input and a BN scale is 0, "
                                    "so the shift cannot stay as an Add")
    return _fold_before(site, consumer, scale, shift, stats.channels, ctx, convert, 1)


def _fold_before(site: Site, consumer: ConsumerMatch, scale: np.ndarray, shift: np.ndarray, channels: int,
                 ctx: Context, convert: bool, channel_axis: int | None) -> Fold:
    """``W' = W (.)_in s`` and ``b' = beta * b + alpha * W t`` (or ``x + t/s`` kept before a padded Conv)."""
    weight = consumer.weight
    per_feature_scale = np.repeat(scale, consumer.repeat)
    _require_nonempty(weight, scale, consumer.node)
    source, factor = compose(weight, affine.input_channel_factor(tuple(weight.shape), per_feature_scale,
                                                                 consumer.in_axis, consumer.groups))
    _require_weight_fits(consumer.node, source, factor)
    dtype = weight.dtype
    edit = WeightEdit(consumer.node, consumer.weight_index, source, factor)
    if not consumer.exact_shift:
        addend = None
        if np.any(shift != 0):
            shape = [channels] + [1] * (len(weight.shape) - 2)
            addend = _cast((shift / scale).reshape(shape), dtype, "t / s", consumer.node)
        return Fold(site, "before", consumer.pattern, channels, scale, into=(consumer.node,),
                    parts=(Part(edit, None),), addend=addend, chain=consumer.chain, convert=convert,
                    detail="shift kept as an Add before the padded conv" if addend is not None else "",
                    channel_axis=channel_axis)
    weight_values = _finite(np.asarray(weight.numpy(), dtype=np.float64), consumer.node, "weight")
    extra = affine.input_shift_bias(weight_values, np.repeat(shift, consumer.repeat), consumer.in_axis,
                                    consumer.out_axis, consumer.groups)
    old_bias = 0.0
    if consumer.bias is not None and consumer.bias_factor != 0:
        old_bias = _finite(consumer.bias.numpy().astype(np.float64), consumer.node, "bias") * consumer.bias_factor
    bias_dtype = (consumer.bias if consumer.bias is not None else weight).dtype
    new_bias = _cast(old_bias + consumer.shift_factor * extra, bias_dtype, "folded bias", consumer.node)
    if consumer.bias_node is not None:
        bias = BiasEdit(new_bias, consumer.bias_node, consumer.bias_index, reset_beta=consumer.bias_factor != 1.0)
    else:
        bias = BiasEdit(new_bias, after=consumer.node) if np.any(new_bias != 0) else None
    return Fold(site, "before", consumer.pattern, channels, scale, into=(consumer.node,), parts=(Part(edit, bias),),
                chain=consumer.chain, convert=convert, channel_axis=channel_axis)


def _plan_decompose(site: Site, stats: BNStats, scale: np.ndarray, shift: np.ndarray, convert: bool,
                    reason_detail: str, consts: Constants) -> Fold | None:
    """``x * s + t`` with constants shaped for the BN's input rank, in the BN's dtype."""
    bn = site.node
    rank = rank_of(bn.inputs[0]) or rank_of(bn.outputs[0])
    dtype = bn.inputs[0].dtype or bn.outputs[0].dtype or _param_dtype(bn, consts)
    if rank is None or dtype is None:
        return None
    shape = [stats.channels] + [1] * (rank - 2)
    scale_cast = _cast(scale.reshape(shape), dtype, "decomposed scale", bn)
    shift_cast = _cast(shift.reshape(shape), dtype, "decomposed shift", bn)
    return Fold(site, "decompose", "bn-mul-add", stats.channels, scale, decomposed=(scale_cast, shift_cast),
                convert=convert, detail=reason_detail, channel_axis=1)


def _param_dtype(bn: ir.Node, consts: Constants) -> ir.DataType | None:
    """Before BatchNormalization-15, X and scale share one type: the scale's is X's."""
    if (bn.version or 15) >= 15:
        return None
    tensor, _ = consts.tensor(bn.inputs[1])
    return None if tensor is None else tensor.dtype


# --- checks shared by the directions -------------------------------------------------


def _require_nonempty(weight: ir.TensorProtocol, scale: np.ndarray, node: ir.Node) -> None:
    if scale.shape[0] == 0 or weight.size == 0:
        raise NoMatch("zero-size", f"the weight of {describe(node)} has shape {list(weight.shape)}")


def _require_weight_fits(node: ir.Node, weight: ir.TensorProtocol, factor: np.ndarray) -> None:
    """The folded weight is finite and fits its dtype: decided from the largest magnitude
    per factor cell, so nothing can overflow later while the weight is written."""
    source = weight_array(weight)
    peak = affine.peak_by_factor(source, factor, done=lambda: release_pages(source))
    if not np.all(np.isfinite(peak)):
        raise NoMatch("non-finite-params", f"the weight of {describe(node)} holds NaN or infinity")
    if affine.cast_checked(peak * np.abs(factor), np.dtype(weight.dtype.numpy())) is None:
        raise NoMatch("dtype-overflow", f"the folded weight of {describe(node)} exceeds the range of {weight.dtype.name}")


def weight_array(tensor: ir.TensorProtocol) -> np.ndarray:
    """A weight's values; data in a file is read through a private read-only map."""
    if isinstance(tensor, ir.ExternalTensor) and tensor.size:
        check = getattr(tensor, "check_source", None)
        if check is not None:
            check()
        little_endian = np.dtype(tensor.dtype.numpy()).newbyteorder("<")
        return np.memmap(tensor.path, dtype=little_endian, mode="r", offset=tensor.offset or 0,
                         shape=tuple(tensor.shape.numpy()))
    return tensor.numpy()


def release_pages(array: np.ndarray) -> None:
    """Drop the resident pages of a mapped weight (they are re-read from the page cache if
    touched again), so reading a huge weight block by block never holds all of it."""
    mapping = getattr(array, "_mmap", None)
    if mapping is not None and hasattr(mmap, "MADV_DONTNEED"):
        mapping.madvise(mmap.MADV_DONTNEED)


def _finite(values: np.ndarray, node: ir.Node, role: str) -> np.ndarray:
    if not np.all(np.isfinite(values)):
        raise NoMatch("non-finite-params", f"the {role} of {describe(node)} holds NaN or infinity")
    return values


def _cast(values: np.ndarray, dtype: ir.DataType, what: str, node: ir.Node) -> np.ndarray:
    cast = affine.cast_checked(values, np.dtype(dtype.numpy()))
    if cast is None:
        raise NoMatch("dtype-overflow", f"{what} for {describe(node)} exceeds the range of {dtype.name}")
    return cast


def channel_list(mask: np.ndarray, limit: int = 8) -> str:
    idx = np.flatnonzero(mask)
    shown = ", ".join(str(i) for i in idx[:limit])
    return shown + (f", ... ({idx.size} in all)" if idx.size > limit else "")
