"""Planning: for every affine site, an immutable ``Fold`` or a ``Keep`` with its reason.

A *site* is a node that applies a per-channel affine map ``y = s*x + t`` to one data
input: every BatchNormalization, and a Mul/Div/Add/Sub with a constant operand that sits
after a linear op. ``plan_site`` decides everything about a site — legality, axes, the
scale and shift, the new bias, and the overflow and finiteness checks of weight, bias and
addend — so that rewriting it (``bnfold.rewrite``) cannot fail or change its mind.
``inspect`` reports these same plans, so inspect and fold agree by construction.

Directions (``bnfold.route`` finds and proves the way there):
- *after*: fold into the linear ops that produce the site's input, across ops the map
  commutes with and over sums;
- *before*: fold into every linear op that reads the site's output, across such ops;
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
from bnfold.constant_eval import Constants, rank_of, static_dims
from bnfold.errors import InputError
from bnfold.folded import FoldedTensor, compose
from bnfold.ledger import NoMatch
from bnfold.patterns import LinearMatch, describe, require_resolved
from bnfold.patterns.elementwise import ElementwiseSite, as_site, channel_vector, scale_shift
from bnfold.patterns.layout import Channel
from bnfold.patterns.matmul import bias_operand
from bnfold.route import Leg, Route, downstream_route, leads_to_linear, trace_downstream, trace_upstream, \
    upstream_route
from bnfold.standard import is_standard

DEFAULT_EPSILON = 1e-5


@dataclass(frozen=True)
class FoldOptions:
    """Opt-in behaviours of ``fold``; the defaults never change a model's interface."""

    #: Treat initializers that are also graph inputs (IR >= 4) as constants and drop the inputs.
    fold_overridable: bool = False
    #: Rewrite a BN with no linear neighbour into one Mul and one Add.
    decompose_standalone: bool = False
    #: Turn a training-mode BN whose running-stat outputs are unused into its inference form.
    to_inference: bool = False
    #: Merge parallel conv branches of one tensor that meet in a sum into one conv (exact).
    merge_branches: bool = True
    #: --target: the next step's formats ("fp16", "bf16", "int8", ``precision.TARGETS``);
    #: each folded tensor gets their figures and problems (``bnfold.assess``). Folding
    #: itself does not change; without a target nothing is measured.
    targets: tuple[str, ...] = ()
    #: --keep: names of sites (BN, Mul/Add/Sub/Div nodes) to leave as they are.
    keep: frozenset[str] = frozenset()

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(dict.fromkeys(self.targets)))
        object.__setattr__(self, "keep", frozenset(self.keep))
        if self.targets:
            from bnfold.precision import TARGETS

            unknown = [t for t in self.targets if t not in TARGETS]
            if unknown:
                raise InputError(f"--target {unknown[0]!r}: expected one of {', '.join(TARGETS)}")


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
    #: A sum where parallel branches may merge into one conv (``bnfold.merge``).
    merge: bool = False

    @property
    def is_bn(self) -> bool:
        return self.elementwise is None and not self.merge

    @property
    def kind(self) -> str:
        return "bn" if self.is_bn else "sum" if self.merge else self.node.op_type.lower()


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
    #: The weight axis of the op's output channels, and which channels this fold scales
    #: ("output" or "input") along which axes of ``factor``'s own (empty: a uniform map).
    out_axis: int = 0
    scaled: str = "output"
    scaled_axes: tuple[int, ...] = ()
    #: With targets: the weight before and after the fold, measured while planning read it
    #: to prove the folded weight fits its dtype (``precision.measure_weight``'s views).
    measured: list | None = None
    #: The input's name of the weight and what the linear op is, for reports.
    name: str = ""
    label: str = ""


@dataclass(frozen=True)
class BiasEdit:
    """The new bias: into ``node.inputs[index]``, or (node None) as an Add after ``after``."""

    values: np.ndarray
    node: ir.Node | None = None
    index: int | None = None
    after: ir.Node | None = None
    #: Gemm: beta was folded into the new C, so it becomes 1.
    reset_beta: bool = False
    #: The bias the linear op had (None: none), its name and the op's, for reports.
    before: np.ndarray | None = None
    name: str = ""
    label: str = ""


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
    #: What the map crossed or split over on its way, in words (see ``route.Route.text``).
    route: str = ""
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
    return node.op_type == "BatchNormalization" and is_standard(node)


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

    Raises InputError for parameters whose shapes make the model invalid (the loader's
    ``onnx.checker.check_node`` has refused a BN without its five inputs).
    """
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
    A site named by ``--keep`` that would fold stays, with the reason "kept-on-request".
    """
    plan = _plan_site(site, ctx)
    if isinstance(plan, Fold) and site.node.name in ctx.options.keep:
        return Keep(site, "kept-on-request", f"--keep {site.node.name}", plan.channels, plan.convert)
    return plan


def _plan_site(site: Site, ctx: Context) -> Plan | None:
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
    """A constant Mul/Add/Sub/Div folds into the linear ops its route reaches before it or,
    failing that, after it; with no linear op either way it is not a site (None)."""
    constant = site.elementwise.constant
    try:
        uniform = constant.ndim == 0
        root = trace_upstream(site.node.inputs[site.data_index], ctx.consts, site.scope.opset, uniform=uniform)
        vector = constant.astype(np.float64).reshape(1) if uniform else channel_vector(constant, root.channel)
        scale, shift = scale_shift(site.elementwise, vector)
        return _plan_after(site, upstream_route(root, scale, shift, site.kind, uniform=uniform), scale,
                           root.channel, measure=ctx.options.targets)
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
    Conv or Gemm: the constant must run along the axis the linear ops read as features."""
    data, out = site.node.inputs[site.data_index], site.node.outputs[0]
    if not leads_to_linear(out):
        raise NoMatch("no-linear-producer", f"no linear op reads the {site.node.op_type} output")
    constant = site.elementwise.constant
    channel = _constant_channel(constant, data, site.node)
    _require_no_broadcast(data, constant.shape, site.node)
    root = trace_downstream(out, channel, ctx.consts, site.scope.opset)
    vector = constant.astype(np.float64).reshape(-1)
    scale, shift = scale_shift(site.elementwise, vector[:1] if channel is None else vector)
    return _fold_down(site, root, scale, shift, ctx, False)


def _constant_channel(constant: np.ndarray, data: ir.Value, node: ir.Node) -> Channel | None:
    """The axis a Mul/Add/... constant runs along, aligned to its data from the right (None:
    one value for every element); NoMatch if it varies along more than one axis or may raise
    the data's rank (removing the site must leave its output's shape). On data of unknown
    rank only a 0-d constant is safe: even a ``[1]`` one makes a scalar a vector."""
    rank = rank_of(data)
    shape = list(constant.shape)
    if constant.ndim > (0 if rank is None else rank):
        raise NoMatch("non-channel-constant", f"the {node.op_type} constant of shape {shape} may broadcast "
                                              f"{data.name!r} to a higher rank")
    varying = [i for i, size in enumerate(shape) if size != 1]
    if not varying:
        return None
    if len(varying) > 1:
        raise NoMatch("non-channel-constant", f"the {node.op_type} constant of shape {shape} varies along more "
                                              "than one axis")
    return Channel(rank, rank - constant.ndim + varying[0], shape[varying[0]])


def _plan_bn(site: Site, stats: BNStats, ctx: Context, convert: bool) -> Plan:
    scale, shift = stats.scale_shift()
    uniform = stats.channels == 1  # one channel: a scalar map, the same s and t everywhere
    try:
        root = trace_upstream(site.node.inputs[0], ctx.consts, site.scope.opset, uniform=uniform)
        if not uniform:
            _require_bn_channels(site, root.channel, stats.channels)
        return _plan_after(site, upstream_route(root, scale, shift, site.kind, uniform=uniform), scale,
                           root.channel, convert, measure=ctx.options.targets)
    except NoMatch as after:
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


def _require_bn_channels(site: Site, channel: Channel, count: int) -> None:
    """A BN normalises axis 1: the producers' channels must arrive there, all of them."""
    where = describe(site.node.inputs[0].producer(), site.node.inputs[0])
    if channel.axis is None:
        raise NoMatch("channel-axis-mismatch", f"{where} carries one channel, the BN normalises {count}")
    known = channel.normalized()
    if known is None:
        raise NoMatch("unknown-rank", f"the rank of {where}'s output cannot be proven")
    if known.axis != 1:
        raise NoMatch("channel-axis-mismatch", f"the producers' channels arrive on axis {known.axis} of "
                                               f"{where}'s output, the BN normalises axis 1")
    if channel.count != count:
        raise InputError(f"BatchNormalization {site.node.name!r} has {count} channels but its input from "
                         f"{where} has {channel.count} output channels: invalid model")


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


def _plan_after(site: Site, route: Route, scale: np.ndarray, channel: Channel | None, convert: bool = False,
                measure: tuple[str, ...] = ()) -> Fold:
    """``W' = s (.)_out W``, ``b' = s * (beta * b) + t`` for each producer, on its share of
    the map; every result checked before anything changes. ``measure``: the targets each
    folded tensor is measured for (``bnfold.precision``)."""
    parts = tuple(_after_part(leg.match, leg.scale, leg.shift, measure) for leg in route.legs)
    channels = scale.size if scale.size > 1 else max(leg.scale.size for leg in route.legs)
    return Fold(site, "after", route.pattern, channels, scale, into=route.into, parts=parts, route=route.text,
                convert=convert, channel_axis=_axis(channel))


def _axis(channel: Channel | None) -> int | None:
    """The axis a map runs along at the site, for the ledger (None: a uniform map)."""
    return None if channel is None else (channel.normalized() or channel).axis


def _after_part(match: LinearMatch, scale: np.ndarray, shift: np.ndarray, measure: tuple[str, ...] = ()) -> Part:
    weight = match.weight
    _require_nonempty(weight, scale, match.node)
    new = affine.output_channel_factor(tuple(weight.shape), scale, match.out_axis, match.groups)
    source, factor = compose(weight, new)
    measured = _require_weight_fits(match.node, source, factor, _measuring(weight, match.out_axis, measure))
    # beta = 0: onnxruntime ignores C, so the fold must too (0 * inf would be NaN).
    old_bias = None
    if match.bias is not None and match.bias_factor != 0:
        old_bias = _finite(match.bias.numpy().astype(np.float64), match.node, "bias") * match.bias_factor
    bias_dtype = (match.bias if match.bias is not None else weight).dtype
    new_bias = _cast(affine.shifted_bias(old_bias, scale, shift), bias_dtype, "folded bias", match.node)
    edit = _weight_edit(match.node, match.weight_index, source, factor, new, match.out_axis, "output", measured)
    before, name, label = _old_bias(match.bias, match.bias_node, match.bias_index, measure)
    if match.bias_node is not None:
        return Part(edit, BiasEdit(new_bias, match.bias_node, match.bias_index, reset_beta=match.bias_factor != 1.0,
                                   before=before, name=name, label=label))
    if not np.any(new_bias != 0):
        return Part(edit, None)
    # A new Add after the op, shaped to broadcast along its channel axis (counted from the end).
    trailing = -match.channel_axis - 1 if match.channel_axis < 0 else 0
    return Part(edit, BiasEdit(new_bias.reshape([-1] + [1] * trailing), after=match.node,
                               label=describe(match.node) if measure else ""))


def _weight_edit(node: ir.Node, index: int, source: ir.TensorProtocol, factor: np.ndarray, new: np.ndarray,
                 out_axis: int, scaled: str, measured) -> WeightEdit:
    """The edit; with targets (``measured``: its measurement), what the figures say about
    it: the axes this fold's factor runs along, names."""
    if measured is None:
        return WeightEdit(node, index, source, factor, out_axis=out_axis, scaled=scaled)
    axes = tuple(a for a, size in enumerate(np.shape(new)) if size > 1)
    return WeightEdit(node, index, source, factor, out_axis=out_axis, scaled=scaled, scaled_axes=axes,
                      measured=measured, name=node.inputs[index].name if node.inputs[index] is not None else "",
                      label=describe(node))


def _measuring(weight: ir.TensorProtocol, out_axis: int, targets: tuple[str, ...]) -> tuple | None:
    """What ``_require_weight_fits`` measures the weight for besides: the targets, the
    factor the weight had before this fold, its output axis (None without targets)."""
    if not targets:
        return None
    return targets, weight.factor if isinstance(weight, FoldedTensor) else None, out_axis


def _old_bias(bias: ir.TensorProtocol | None, node: ir.Node | None, index: int | None,
              measure: tuple[str, ...]) -> tuple[np.ndarray | None, str, str]:
    """The bias an op had, its name and the op's, for the precision figures (only when measured)."""
    if not measure:
        return None, "", ""
    value = node.inputs[index] if node is not None and index is not None and index < len(node.inputs) else None
    return (None if bias is None else np.asarray(bias.numpy()), value.name if value is not None else "",
            describe(node) if node is not None else "")


def _plan_before(site: Site, stats: BNStats, scale: np.ndarray, shift: np.ndarray, ctx: Context,
                 convert: bool) -> Fold:
    """A BN before the linear ops its output reaches."""
    bn = site.node
    channel = None if stats.channels == 1 else \
        Channel(rank_of(bn.inputs[0]) or rank_of(bn.outputs[0]), 1, stats.channels)
    root = trace_downstream(bn.outputs[0], channel, ctx.consts, site.scope.opset)
    return _fold_down(site, root, scale, shift, ctx, convert)


def _fold_down(site: Site, root, scale: np.ndarray, shift: np.ndarray, ctx: Context, convert: bool) -> Fold:
    """``W' = W (.)_in s`` and ``b' = beta * b + alpha * W t`` in every linear op the route
    reaches. Where the shift cannot reach one of them (a padded Conv sees zeros at its
    border, not t; a crossing that refuses a shift), the shift stays at the site as
    ``x + t/s`` and only the scale travels: padding ``x + t/s`` and scaling by s pads
    ``s*x + t`` with zeros."""
    shift_refused = None
    measure = ctx.options.targets
    try:
        route = downstream_route(root, scale, shift, site.kind)
        if all(leg.match.exact_shift for leg in route.legs) or not np.any(shift != 0):
            parts = tuple(_before_part(leg, leg.match.exact_shift, measure) for leg in route.legs)
            return Fold(site, "before", route.pattern, scale.size, scale, into=route.into, parts=parts,
                        route=route.text, convert=convert, channel_axis=_axis(root.channel))
        padded = next(leg.match.node for leg in route.legs if not leg.match.exact_shift)
    except NoMatch as no:
        if no.reason not in ("shift-not-crossing", "pad-value"):
            raise
        shift_refused, padded = no, None
    if not site.is_bn:  # a Mul/Add site would only become another Add
        if shift_refused is not None:
            raise shift_refused
        raise NoMatch("padded-consumer", f"{describe(padded)} pads its input: only a pure scale folds there")
    where = describe(padded) if padded is not None else shift_refused.detail
    if np.any(scale == 0):
        raise NoMatch("zero-scale", f"the shift cannot reach every linear op ({where}) and a BN scale is 0, "
                                    "so it cannot stay as an Add")
    route = downstream_route(root, scale, np.zeros_like(shift), site.kind)
    parts = tuple(_before_part(leg, False, measure) for leg in route.legs)
    data = site.node.inputs[site.data_index]
    # A conv reading the site directly knows its input's rank (the site may sit in a function).
    direct = [r.match.input_channel.rank for r in root.readers if r.match.node.op_type == "Conv"]
    rank = rank_of(data) or rank_of(site.node.outputs[0]) or (direct[0] if direct else None)
    if rank is None:
        raise NoMatch("unknown-rank", f"the rank of {data.name!r}, where the shift would stay, cannot be proven")
    dtype = data.dtype or route.legs[0].match.weight.dtype
    addend = _cast((shift / scale).reshape([-1] + [1] * (rank - 2)), dtype, "t / s", site.node)
    detail = f"shift kept as an Add before the route ({where})" if padded is None else \
        "shift kept as an Add before the padded conv"
    return Fold(site, "before", route.pattern, scale.size, scale, into=route.into, parts=parts, addend=addend,
                route=route.text, convert=convert, detail=detail, channel_axis=_axis(root.channel))


def _before_part(leg: Leg, with_shift: bool, measure: tuple[str, ...] = ()) -> Part:
    """One linear op's share of a map before it: the scale into its input axis and, with
    the shift, ``W t`` into its bias."""
    consumer = leg.match
    weight = consumer.weight
    _require_nonempty(weight, leg.scale, consumer.node)
    new = affine.input_channel_factor(tuple(weight.shape), leg.scale, consumer.in_axis, consumer.groups)
    source, factor = compose(weight, new)
    measured = _require_weight_fits(consumer.node, source, factor, _measuring(weight, consumer.out_axis, measure))
    edit = _weight_edit(consumer.node, consumer.weight_index, source, factor, new, consumer.out_axis, "input",
                        measured)
    if not with_shift:
        return Part(edit, None)
    weight_values = _finite(np.asarray(weight.numpy(), dtype=np.float64), consumer.node, "weight")
    extra = affine.input_shift_bias(weight_values, leg.shift, consumer.in_axis, consumer.out_axis, consumer.groups)
    old_bias = 0.0
    if consumer.bias is not None and consumer.bias_factor != 0:
        old_bias = _finite(consumer.bias.numpy().astype(np.float64), consumer.node, "bias") * consumer.bias_factor
    bias_dtype = (consumer.bias if consumer.bias is not None else weight).dtype
    new_bias = _cast(old_bias + consumer.shift_factor * extra, bias_dtype, "folded bias", consumer.node)
    before, name, label = _old_bias(consumer.bias, consumer.bias_node, consumer.bias_index, measure)
    if consumer.bias_node is not None:
        return Part(edit, BiasEdit(new_bias, consumer.bias_node, consumer.bias_index,
                                   reset_beta=consumer.bias_factor != 1.0, before=before, name=name, label=label))
    return Part(edit, BiasEdit(new_bias, after=consumer.node, label=describe(consumer.node) if measure else "")
                if np.any(new_bias != 0) else None)


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


def _require_weight_fits(node: ir.Node, weight: ir.TensorProtocol, factor: np.ndarray,
                         measure: tuple | None = None):
    """The folded weight is finite and fits its dtype: decided from the largest magnitude
    per factor cell, so nothing can overflow later while the weight is written. With
    ``measure`` (``_measuring``), the same read measures the weight before and after the
    fold for the targets: the measurement is returned."""
    source = weight_array(weight)
    measured = None
    if measure is None:
        peak = affine.peak_by_factor(source, factor, done=lambda: release_pages(source))
    else:
        from bnfold.precision import measure_weight

        targets, prior, out_axis = measure
        peak, measured = measure_weight(source, [prior, factor], out_axis, targets, done=lambda: release_pages(source))
    if not np.all(np.isfinite(peak)):
        raise NoMatch("non-finite-params", f"the weight of {describe(node)} holds NaN or infinity")
    if affine.cast_checked(peak * np.abs(factor), np.dtype(weight.dtype.numpy())) is None:
        raise NoMatch("dtype-overflow", f"the folded weight of {describe(node)} exceeds the range of {weight.dtype.name}")
    return measured


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
