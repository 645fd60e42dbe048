"""Merging parallel branches into one Conv: structural reparameterisation, in the ONNX graph.

RepVGG, MobileOne, ACNet, YOLO's RepConv, RepGhost, RepViT and FastViT train with
parallel branches that read one tensor ``x`` and are summed: convs of different kernels
(their BNs folded by then, or folded here), a BN-only identity branch, ``x`` itself,
per-channel layer scales, differences. Such a sum is a linear map of ``x``, hence one conv:

    Σ_i m_i ⊙ (W_i * x + b_i) + Σ_j m_j ⊙ x + c  =  W * x + b

Every kernel is placed inside the one branch kernel that covers them all, at the offset
its padding gives: ``(begin_pad_ref - begin_pad_i) / dilation`` on each spatial axis
(never "pad the 1x1 by k//2", which is wrong for asymmetric pads: TF's SAME_UPPER at
stride 2); the identity is the kernel ``E[o, o mod (C/g), offset] = 1`` (grouped and
depthwise alike), an average pool that counts its padding the kernel ``1/k`` over its
window. The branch that covers the others becomes the merged Conv; the other convs, the
BNs, Muls and sums disappear.

Refused, each with its own reason: branches whose strides, groups or dilations differ or
whose kernels cannot be placed exactly (``branch-mismatch``); a branch that applies two
convs in sequence (DBB's 1x1 -> BN -> kxk, ``sequential-branch``); an average pool whose
border is no conv (``avgpool-borders``); a branch also read elsewhere (``fan-out``,
``graph-output``); shapes that cannot be proven (``unknown-rank``). A sum whose operands do
not all come from one tensor is no candidate at all.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from bnfold import affine
from bnfold._onnx_ir import ir
from bnfold.constant_eval import Constants, static_dims
from bnfold.folded import compose
from bnfold.ledger import NoMatch
from bnfold.patterns import describe, require_resolved, weight_and_bias
from bnfold.patterns.crossing import cross
from bnfold.patterns.elementwise import channel_vector
from bnfold.patterns.layout import Channel
from bnfold.plan import Context, Keep, Site, _cast, mode_problem, read_stats, release_pages, stats_problem, \
    weight_array
from bnfold.standard import is_standard

#: The most nodes one merged expression may hold.
MAX_NODES = 64
SUMS = {"Add", "Sub", "Sum"}
_OPS = {"Add", "Sub", "Sum", "Mul", "Div", "Neg", "Identity", "Dropout", "BatchNormalization", "Conv", "AveragePool"}


@dataclass(frozen=True)
class Merge:
    """Everything the rewrite needs to turn the branches under ``site`` into ``into``."""

    site: Site
    into: ir.Node
    shape: tuple[int, ...]
    dtype: ir.DataType
    #: (source, factor, offset): the branch kernels, each ``source * factor``, placed at offset.
    kernels: tuple
    #: (multiplier, offset, window): identity and average-pool terms (``affine.merge_rows``).
    diagonals: tuple
    bias: np.ndarray
    #: Every node of the branches but ``into``: they disappear.
    nodes: tuple[ir.Node, ...]
    #: The BNs among them, each folded into the merged conv.
    absorbed: tuple[ir.Node, ...]
    pattern: str
    detail: str
    channels: int
    convert: bool = False
    #: What ``into`` had before the merge (for the precision figures): its weight and bias,
    #: their names and the conv's.
    weight_before: ir.TensorProtocol | None = None
    bias_before: np.ndarray | None = None
    names: tuple[str, str, str] = ("", "", "")


def is_sum(node: ir.Node, consts: Constants) -> bool:
    """An Add/Sub/Sum of non-constant operands: where parallel branches meet."""
    return (is_standard(node) and node.op_type in SUMS and len(node.inputs) >= 2
            and all(v is not None and consts.array(v) is None for v in node.inputs))


class _NotCandidate(Exception):
    """The sum is no merge of branches of one tensor: not a site at all."""


@dataclass
class _Term:
    """A node of the expression under the sum: an op applied to child terms, or a leaf."""

    kind: str  # sum, scale, shift, bn, neg, same; leaves: conv, pool, value
    value: ir.Value
    node: ir.Node | None = None
    children: list[tuple[_Term, float]] = field(default_factory=list)
    constant: np.ndarray | None = None


def plan_merge(site: Site, ctx: Context) -> Merge | Keep | None:
    """The merge at the sum ``site.node``: a Merge, a Keep saying why the branches cannot be
    one conv, or None when the sum is not a merge of branches at all, or when a sum above
    it merges it with more (or is the one to say why it cannot)."""
    above = False
    for root in _roots_above(site.node, ctx.consts):
        try:
            _analyse(root, ctx, Site(root, site.scope, merge=True))
        except _NotCandidate:
            continue
        except NoMatch:
            above = True
            continue
        return None  # the larger expression merges, when its sum is planned
    try:
        merge = _analyse(site.node, ctx, site)
    except _NotCandidate:
        return None
    except NoMatch as no:
        return None if above else Keep(site, no.reason, no.detail)
    # merge.nodes holds the sum itself too: each name once
    named = list(dict.fromkeys(n.name for n in (site.node, merge.into, *merge.nodes)
                               if n.name and n.name in ctx.options.keep))
    if named:
        return Keep(site, "kept-on-request", f"--keep {', '.join(named)}: the branches stay apart", merge.channels)
    return merge


def _roots_above(node: ir.Node, consts: Constants) -> list[ir.Node]:
    """Sums above ``node`` whose expressions would include it (nearest last, farthest first)."""
    found, current = [], node
    for _ in range(MAX_NODES):
        reader = consts.sole_reader(current.outputs[0]) if current.outputs else None
        if reader is None or not is_standard(reader[0]) or \
                reader[0].op_type not in _OPS - {"Conv", "AveragePool"}:
            break
        current = reader[0]
        if is_sum(current, consts):
            found.append(current)
    return found[::-1]


def _analyse(root: ir.Node, ctx: Context, site: Site) -> Merge:
    """The whole merge at ``root``, every condition checked."""
    consts, opset = ctx.consts, site.scope.opset
    count = [0]
    tree = _Term("sum", root.outputs[0], root, [(_child(v, consts, opset, count), -1.0 if root.op_type == "Sub" and i
                                                 else 1.0) for i, v in enumerate(root.inputs)])
    leaves = list(_leaves(tree))
    x = _shared_input(leaves, consts)
    for term in _all_terms(tree):
        if term.node is not None:
            require_resolved(term.node)
    convs = [leaf.node for leaf in leaves if leaf.kind == "conv"]
    first = weight_and_bias(convs[0], consts)[0]
    terms = _Terms(first.shape[0])
    _walk(tree, np.ones(terms.channels), terms, Channel(len(first.shape), 1, terms.channels), ctx, opset)
    geometry = _Geometry(convs, x, consts)
    ref = geometry.reference()
    kernels, diagonals, names = _placed(terms, geometry, ref, consts)
    weight, old_bias = weight_and_bias(ref, consts)
    _require_fits(kernels, diagonals, weight.dtype, root)
    bias = _cast(terms.bias, weight.dtype, "merged bias", root)
    nodes = tuple(t.node for t in _all_terms(tree) if t.node is not None and t.node is not ref)
    absorbed = tuple(n for n in nodes if n.op_type == "BatchNormalization")
    detail = f"merged {len(names)} branches ({', '.join(names)}) into {describe(ref)}"
    return Merge(site, ref, tuple(weight.shape), weight.dtype, tuple(kernels), tuple(diagonals), bias, nodes,
                 absorbed, f"merge({'+'.join(names)})", detail, terms.channels, weight_before=weight,
                 bias_before=None if old_bias is None else np.asarray(old_bias.numpy()),
                 names=(ref.inputs[1].name, ref.inputs[2].name if len(ref.inputs) > 2 and ref.inputs[2] is not None
                        else "", describe(ref)))


def _placed(terms: _Terms, geometry: _Geometry, ref: ir.Node, consts: Constants) -> tuple[list, list, list[str]]:
    """Every term where it goes in ``ref``'s kernel: the convs as ``(source, factor,
    offset)``, the identity (one term, its multipliers summed) and the pools as
    ``(multiplier, offset, window)``; and each branch's name for the ledger."""
    kernels, diagonals, names = [], [], []
    for conv, multiplier in terms.convs:
        weight = weight_and_bias(conv, consts)[0]
        source, factor = compose(weight, affine.output_channel_factor(tuple(weight.shape), multiplier, 0))
        kernels.append((source, factor, geometry.offset(conv, ref)))
        names.append("x".join(str(k) for k in weight.shape[2:]))
    in_channels = weight_and_bias(ref, consts)[0].shape[1] * geometry.groups
    identity = [(None, sum(terms.identity))] if terms.identity else []
    for node, multiplier in identity + terms.pools:
        if in_channels != terms.channels:
            raise NoMatch("branch-mismatch", f"an identity or pool branch needs as many input channels as output "
                                             f"channels ({in_channels} != {terms.channels})")
        offset, window = geometry.diagonal(node, ref)
        diagonals.append((multiplier, offset, window))
        names.append("identity" if node is None else f"avgpool{'x'.join(map(str, window))}")
    return kernels, diagonals, names


# --- the expression ----------------------------------------------------------------


def _child(value: ir.Value | None, consts: Constants, opset: int, count: list[int]) -> _Term:
    """The term behind one operand: descended into only where the operand is this
    expression's alone (read once, no graph output), so the shared input stays a leaf."""
    if value is None:
        raise _NotCandidate
    producer = value.producer()
    if producer is None or not is_standard(producer) or producer.op_type not in _OPS or \
            consts.is_output(value) or consts.sole_reader(value) is None:
        return _Term("value", value)
    count[0] += 1
    if count[0] > MAX_NODES:
        raise _NotCandidate
    op = producer.op_type
    operands = list(producer.inputs)
    if op == "Conv":
        return _Term("conv", value, producer)
    if op == "AveragePool":
        return _Term("pool", value, producer)
    if op == "BatchNormalization":
        return _Term("bn", value, producer, [(_child(operands[0], consts, opset, count), 1.0)])
    if op in ("Identity", "Dropout"):
        try:
            cross(producer, 0, None, consts, opset)
        except NoMatch:
            return _Term("value", value)
        return _Term("same", value, producer, [(_child(operands[0], consts, opset, count), 1.0)])
    if op == "Neg":
        return _Term("same", value, producer, [(_child(operands[0], consts, opset, count), -1.0)])
    # Sums, Mul and Div: small constant operands only (a weight is never read here: a folded
    # one is computed while saving, not while planning)
    constants = [consts.array(v) if v is not None else None for v in operands]
    if op in SUMS and all(c is None for c in constants):
        signs = [-1.0 if op == "Sub" and i else 1.0 for i in range(len(operands))]
        return _Term("sum", value, producer, [(_child(v, consts, opset, count), s) for v, s in zip(operands, signs)])
    if len(operands) != 2 or sum(c is not None for c in constants) != 1:
        return _Term("value", value)
    data = 0 if constants[1] is not None else 1
    constant = np.asarray(constants[1 - data])
    if op in ("Mul", "Div"):
        if op == "Div" and data == 1:
            return _Term("value", value)
        return _Term("scale", value, producer, [(_child(operands[data], consts, opset, count), 1.0)],
                     constant if op == "Mul" else _reciprocal(constant, producer))
    if op not in ("Add", "Sub"):
        return _Term("value", value)
    sign = -1.0 if op == "Sub" and data == 1 else 1.0
    return _Term("shift", value, producer, [(_child(operands[data], consts, opset, count), sign)],
                 -constant if op == "Sub" and data == 0 else constant)


def _reciprocal(constant: np.ndarray, node: ir.Node) -> np.ndarray:
    values = constant.astype(np.float64)
    if np.any(values == 0):
        raise NoMatch("non-finite-params", f"{describe(node)} divides by zero")
    return 1.0 / values


def _leaves(term: _Term):
    if not term.children:
        yield term
    for child, _ in term.children:
        yield from _leaves(child)


def _all_terms(term: _Term):
    yield term
    for child, _ in term.children:
        yield from _all_terms(child)


def _shared_input(leaves: list[_Term], consts: Constants) -> ir.Value:
    """The one tensor every branch reads; _NotCandidate if there is none, NoMatch where a
    branch would share it but cannot be merged (read elsewhere, two convs in a row)."""
    inputs = Counter(leaf.node.inputs[0] for leaf in leaves if leaf.kind == "conv")
    if not inputs:
        raise _NotCandidate
    x = inputs.most_common(1)[0][0]
    for leaf in leaves:
        data = leaf.node.inputs[0] if leaf.kind in ("conv", "pool") else leaf.value
        if data is x:
            continue
        before = data.producer() if data is not None else None
        if leaf.kind == "conv" and _leads_to_conv_of(data, x):
            raise NoMatch("sequential-branch", f"{describe(leaf.node)} reads {data.name!r}, which another conv "
                                               f"computes from {x.name!r}: two convs in a row are no single kernel")
        shared = consts.is_output(data) or consts.sole_reader(data) is None  # why _child stopped there
        if leaf.kind == "value" and shared and before is not None and before.op_type in _OPS and x in before.inputs:
            where = "a graph output" if consts.is_output(data) else "read elsewhere too"
            raise NoMatch("graph-output" if consts.is_output(data) else "fan-out",
                          f"the branch {describe(before)} reads {x.name!r}, but its output {data.name!r} is {where}")
        raise _NotCandidate
    return x


def _leads_to_conv_of(value: ir.Value, x: ir.Value) -> bool:
    """Whether ``value`` is a conv of ``x``, through BNs and Identities (DBB's 1x1 -> BN -> kxk)."""
    for _ in range(8):
        node = value.producer() if value is not None else None
        if node is None or not is_standard(node):
            return False
        if node.op_type == "Conv":
            return node.inputs[0] is x
        if node.op_type not in ("BatchNormalization", "Identity", "Pad"):
            return False
        value = node.inputs[0]
    return False


@dataclass
class _Terms:
    """The expression as a sum of terms, each with its per-output-channel multiplier:
    convs ``(node, m)``, identities (the shared input itself: ``m`` each), average pools
    ``(node, m)``; and the bias."""

    channels: int
    convs: list = field(default_factory=list)
    identity: list = field(default_factory=list)
    pools: list = field(default_factory=list)
    bias: np.ndarray = field(init=False)

    def __post_init__(self):
        self.bias = np.zeros(self.channels)


def _walk(term: _Term, multiplier: np.ndarray, terms: _Terms, channel: Channel, ctx: Context, opset: int) -> None:
    """Hand each term its multiplier: the product of the scales above it."""
    kind, node = term.kind, term.node
    if kind == "conv":
        weight, bias = weight_and_bias(node, ctx.consts)
        if weight.shape[0] != terms.channels:
            raise NoMatch("branch-mismatch", f"{describe(node)} has {weight.shape[0]} output channels, another "
                                             f"branch {terms.channels}")
        terms.convs.append((node, multiplier))
        if bias is not None:
            terms.bias += multiplier * _finite(bias.numpy().astype(np.float64), node)
        return
    if kind == "value":
        terms.identity.append(multiplier)
        return
    if kind == "pool":
        terms.pools.append((node, multiplier))
        return
    if kind == "bn":
        problem = mode_problem(node, opset)
        if problem is not None:
            raise NoMatch(*problem)
        stats = read_stats(node, ctx.consts)
        problem = stats_problem(stats)
        if problem is not None:
            raise NoMatch(*problem)
        scale, shift = stats.scale_shift()
        if stats.channels not in (1, terms.channels):
            raise NoMatch("branch-mismatch", f"{describe(node)} normalises {stats.channels} channels, the branches "
                                             f"have {terms.channels}")
        terms.bias += multiplier * shift
        multiplier = multiplier * scale
    elif kind == "scale":
        multiplier = multiplier * _finite(channel_vector(term.constant, channel), node)
    elif kind == "shift":
        terms.bias += multiplier * _finite(channel_vector(term.constant, channel), node)
    for child, sign in term.children:
        _walk(child, multiplier * sign, terms, channel, ctx, opset)


def _finite(values: np.ndarray, node: ir.Node) -> np.ndarray:
    if not np.all(np.isfinite(values)):
        raise NoMatch("non-finite-params", f"a constant of {describe(node)} holds NaN or infinity")
    return values


# --- where each kernel goes ------------------------------------------------------------


class _Geometry:
    """Strides, groups, dilations and explicit pads of the branch convs, and where every
    branch's window lies in the reference conv's."""

    def __init__(self, convs: list[ir.Node], x: ir.Value, consts: Constants):
        self.convs, self.x, self.consts = convs, x, consts
        self.facts = {conv: self._facts(conv) for conv in convs}
        strides = {f["strides"] for f in self.facts.values()}
        groups = {f["group"] for f in self.facts.values()}
        if len(strides) != 1:
            raise NoMatch("branch-mismatch", f"the branches' strides differ ({sorted(strides)})")
        if len(groups) != 1:
            raise NoMatch("branch-mismatch", f"the branches' groups differ ({sorted(groups)})")
        self.strides, self.groups = strides.pop(), groups.pop()
        for axis in range(len(self.strides)):
            used = {f["dilations"][axis] for f in self.facts.values() if f["kernel"][axis] > 1}
            if len(used) > 1:
                raise NoMatch("branch-mismatch", f"the branches' dilations differ on spatial axis {axis} "
                                                 f"({sorted(used)})")

    def _facts(self, conv: ir.Node) -> dict:
        weight = weight_and_bias(conv, self.consts)[0]
        kernel = tuple(int(k) for k in weight.shape[2:])
        spatial = len(kernel)
        strides = tuple(_ints(conv, "strides", spatial, 1))
        dilations = tuple(_ints(conv, "dilations", spatial, 1))
        pads = self._pads(conv, kernel, strides, dilations)
        return {"kernel": kernel, "strides": strides, "dilations": dilations, "pads": pads,
                "group": conv.attributes.get_int("group", 1)}

    def _pads(self, node: ir.Node, kernel, strides, dilations) -> tuple[tuple[int, int], ...]:
        """(begin, end) per spatial axis; SAME padding needs the input's static dims."""
        spatial = len(kernel)
        auto_pad = node.attributes.get_string("auto_pad", "NOTSET")
        if auto_pad in ("NOTSET", ""):
            pads = _ints(node, "pads", 2 * spatial, 0)
            return tuple((pads[a], pads[a + spatial]) for a in range(spatial))
        if auto_pad == "VALID":
            return ((0, 0),) * spatial
        dims = static_dims(self.x)
        if dims is None or len(dims) != spatial + 2 or not all(isinstance(d, int) for d in dims[2:]):
            raise NoMatch("unknown-rank", f"{describe(node)} pads {auto_pad}, and the spatial size of "
                                          f"{self.x.name!r} is not static")
        result = []
        for size, k, s, d in zip(dims[2:], kernel, strides, dilations):
            total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
            small = total // 2
            result.append((small, total - small) if auto_pad == "SAME_UPPER" else (total - small, small))
        return tuple(result)

    def reference(self) -> ir.Node:
        """The branch conv whose window holds every other branch's: it becomes the merge."""
        for conv in sorted(self.convs, key=lambda c: -int(np.prod(self.facts[c]["kernel"]))):
            try:
                for other in self.convs:
                    self.offset(other, conv)
                return conv
            except NoMatch:
                continue
        names = ", ".join("x".join(map(str, self.facts[c]["kernel"])) for c in self.convs)
        raise NoMatch("branch-mismatch", f"no branch's window holds the others' ({names}): merging them would need "
                                         "a larger kernel than any branch")

    def offset(self, conv: ir.Node, ref: ir.Node) -> tuple[int, ...]:
        f = self.facts[conv]
        return self._place(f["kernel"], f["dilations"], f["pads"], ref, describe(conv))

    def diagonal(self, node: ir.Node | None, ref: ir.Node) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Offset and window of an identity (``node`` None) or average-pool branch."""
        spatial = len(self.strides)
        if node is None:
            if any(s != 1 for s in self.strides):
                raise NoMatch("branch-mismatch", f"an identity branch needs stride 1, the convs have {self.strides}")
            window, pads = (1,) * spatial, ((0, 0),) * spatial
        else:
            window = tuple(_ints(node, "kernel_shape", spatial, 1))
            strides = tuple(_ints(node, "strides", spatial, 1))
            pads = self._pads(node, window, strides, (1,) * spatial)
            if strides != self.strides:
                raise NoMatch("branch-mismatch", f"{describe(node)} has strides {strides}, the convs {self.strides}")
            if any(d != 1 for d in _ints(node, "dilations", spatial, 1)):
                raise NoMatch("branch-mismatch", f"{describe(node)} is dilated")
            counted = node.attributes.get_int("count_include_pad", 0)
            if node.attributes.get_int("ceil_mode", 0) or (any(any(p) for p in pads) and not counted):
                raise NoMatch("avgpool-borders", f"{describe(node)} averages its border over fewer elements "
                                                 "(count_include_pad=0 or ceil_mode): no conv computes that")
        label = "the identity branch" if node is None else describe(node)
        return self._place(window, (1,) * spatial, pads, ref, label), window

    def _place(self, kernel, dilations, pads, ref: ir.Node, label: str) -> tuple[int, ...]:
        """Where a window lands in ``ref``'s: ``(begin_pad_ref - begin_pad) / dilation`` on
        each axis, whole and inside, with as many outputs (the same taps then read the same
        input positions, zero padding alike)."""
        r = self.facts[ref]
        offset = []
        for a, (k, d, (begin, end)) in enumerate(zip(kernel, dilations, pads)):
            rk, rd, (rbegin, rend) = r["kernel"][a], r["dilations"][a], r["pads"][a]
            step = rd if rk > 1 else d
            if k > 1 and d != step:
                raise NoMatch("branch-mismatch", f"{label} is dilated {d} on spatial axis {a}, {describe(ref)} {rd}")
            shift = rbegin - begin
            if shift % step or not 0 <= shift // step <= rk - k:
                raise NoMatch("branch-mismatch", f"{label} does not fit inside {describe(ref)}'s window on spatial "
                                                 f"axis {a} (pads {begin},{end} against {rbegin},{rend})")
            if not self._same_size(a, begin + end - step * (k - 1), rbegin + rend - step * (rk - 1)):
                raise NoMatch("branch-mismatch", f"{label}'s end padding on spatial axis {a} does not agree with "
                                                 f"{describe(ref)}'s (pads {begin},{end} against {rbegin},{rend}): "
                                                 "their outputs differ in size")
            offset.append(shift // step)
        return tuple(offset)


    def _same_size(self, axis: int, extra: int, ref_extra: int) -> bool:
        """Whether two windows give as many outputs: ``(L + extra - 1) // stride + 1`` for
        the input's static size L, or, where L is not static, for every L."""
        if extra == ref_extra:
            return True
        dims = static_dims(self.x)
        size = dims[axis + 2] if dims is not None and len(dims) == len(self.strides) + 2 else None
        stride = self.strides[axis]
        return isinstance(size, int) and (size + extra - 1) // stride == (size + ref_extra - 1) // stride


def _ints(node: ir.Node, name: str, count: int, default: int) -> list[int]:
    attr = node.attributes.get(name)
    values = [default] * count if attr is None else [int(v) for v in attr.value]
    if len(values) != count:
        raise NoMatch("branch-mismatch", f"{describe(node)} has {len(values)} {name}, expected {count}")
    return values


def _require_fits(kernels: list, diagonals: list, dtype: ir.DataType, root: ir.Node) -> None:
    """The merged kernel is finite and fits its dtype: bounded, per output channel, by the
    sum of every term's largest magnitude (a bound, so a fold that might overflow is kept)."""
    bound = 0.0
    for source, factor, _ in kernels:
        array = weight_array(source)
        peak = affine.peak_by_factor(array, factor, done=lambda: release_pages(array))
        if not np.all(np.isfinite(peak)):
            raise NoMatch("non-finite-params", f"a branch kernel of the merge at {describe(root)} holds NaN or "
                                               "infinity")
        cells = peak * np.abs(factor)
        bound = bound + cells.reshape(cells.shape[0], -1).max(axis=1)
    for multiplier, _, window in diagonals:
        bound = bound + np.abs(multiplier) / np.prod(window)
    if affine.cast_checked(np.asarray(bound, dtype=np.float64), np.dtype(dtype.numpy())) is None:
        raise NoMatch("dtype-overflow", f"the merged kernel at {describe(root)} may exceed the range of {dtype.name}")
