"""Routes: how a site's affine map travels to the linear ops that absorb it.

A map ``M(x) = s*x + t`` on a tensor's channels folds into a linear op next to it; and
since it commutes with many ops (``patterns.crossing``) and distributes over sums, it may
travel first. The router finds a whole route and proves every step of it before a single
weight is touched:

- *upstream* (into what produced the site's input): back across crossings to linear
  producers. A sum distributes, ``M(a ± b) = M(a) ± s*b`` (``s`` into every operand,
  ``t`` into one); a Concat splits the map into each input's channels (along another axis
  every input carries all of it). Every value on the way changes, so each must be read by
  the next step alone and be no graph output, and no op may be reached twice.
- *downstream* (into what reads the site's output): forward across crossings into every
  reader, all or nothing: each path must end in a linear op (``W' = W (.)_in s``,
  ``b' = b + W t``), and every value on the way is read only along the route. Readers that
  see only a shape (Shape, Size, CastLike's type input) do not count.

A *uniform* map (one-channel BN, scalar constant) is the same on every element: it needs
no channel proof, and each linear op takes it on all of its channels.

``Route`` is the result: the linear ops with the map each one takes (``Leg``), the ledger's
pattern, and a sentence naming what was crossed. Every failure is a ``NoMatch`` naming the
op and the condition that stopped it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from bnfold._onnx_ir import ir
from bnfold.constant_eval import Constants, element_readers, static_dims
from bnfold.errors import InputError
from bnfold.ledger import NoMatch
from bnfold.patterns import LinearMatch, concat_axis, describe, match_producer, require_resolved
from bnfold.patterns.consumer import MATCHERS as CONSUMERS
from bnfold.patterns.consumer import ConsumerMatch, require_channel_on_features, require_flattened
from bnfold.patterns.crossing import IDENTITY, Crossing, Step, cross, is_crossing
from bnfold.patterns.layout import Channel, through
from bnfold.standard import is_standard

#: The most ops one route may take in (a bound on planning time in deep residual graphs).
MAX_ROUTE = 32
#: Sums the map distributes over, upstream.
SUMS = {"Add", "Sub", "Sum"}


@dataclass(frozen=True)
class Leg:
    """One linear op of a route and the map it takes: per output channel (upstream) or
    per input feature (downstream)."""

    match: LinearMatch | ConsumerMatch
    scale: np.ndarray
    shift: np.ndarray


@dataclass(frozen=True)
class Route:
    """A proven route: the linear ops it ends in, its pattern and what it crossed, in words."""

    legs: tuple[Leg, ...]
    pattern: str
    text: str

    @property
    def into(self) -> tuple[ir.Node, ...]:
        return tuple(leg.match.node for leg in self.legs)


def _and(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


class _Budget:
    """Counts the ops a route takes in, and refuses one reached twice."""

    def __init__(self):
        self.seen: set[ir.Node] = set()

    def take(self, node: ir.Node) -> None:
        if node in self.seen:
            raise NoMatch("fan-out", f"the route reaches {describe(node)} twice")
        self.seen.add(node)
        if len(self.seen) > MAX_ROUTE:
            raise NoMatch("no-linear-producer", f"no linear op within {MAX_ROUTE} ops of the site")


# --- upstream ------------------------------------------------------------------------


@dataclass
class Up:
    """A value on an upstream route and where it comes from: a linear producer (``leaf``),
    a crossing, or a join (a sum or a Concat) of several routes."""

    value: ir.Value
    leaf: LinearMatch | None = None
    node: ir.Node | None = None
    children: list[Up] = field(default_factory=list)
    #: Filled in once the whole tree is known (``trace_upstream``).
    channel: Channel | None = None
    crossing: Crossing | None = None
    step: Step | None = None
    note: str = ""

    @property
    def joins(self) -> bool:
        return self.node is not None and (self.node.op_type in SUMS or self.node.op_type == "Concat")


def trace_upstream(value: ir.Value, consts: Constants, opset: int, *, uniform: bool) -> Up:
    """The route from ``value`` (the site's data input) back to its linear producers, with
    the channel layout at each step (``.channel``; None for a uniform map); NoMatch if
    there is none.

    Checked in the order a user reads the reasons: is there a linear producer at all, is
    every value on the way ours to change, can each crossing be proven.
    """
    root = _collect(value, consts, _Budget())
    _require_exclusive(root, consts)
    _lay_out(root, consts, opset, uniform)
    return root


def upstream_route(root: Up, scale: np.ndarray, shift: np.ndarray, site_kind: str, *, uniform: bool) -> Route:
    """The legs for the map ``(scale, shift)`` at the top of ``root``, every crossing's
    condition checked on the map that reaches it."""
    legs: list[Leg] = []
    _hand_down(root, scale, shift, uniform, legs)
    return Route(tuple(legs), f"{_up_pattern(root)}-{site_kind}", "; ".join(_up_notes(root)))


def _collect(value: ir.Value, consts: Constants, budget: _Budget) -> Up:
    producer = value.producer()
    if producer is None or not is_standard(producer):
        raise NoMatch("no-linear-producer", f"input comes from {describe(producer, value)}")
    op = producer.op_type
    joins = op == "Concat" or (op in SUMS and not any(v is not None and consts.array(v) is not None
                                                        for v in producer.inputs))
    if joins or is_crossing(producer):
        budget.take(producer)
        require_resolved(producer)
        data = producer.inputs if joins else producer.inputs[:1]
        if not data or any(v is None for v in data):
            raise NoMatch("no-linear-producer", f"{describe(producer)} has an empty input")
        return Up(value, node=producer, children=[_collect(v, consts, budget) for v in data])
    leaf = match_producer(value, consts)
    budget.take(leaf.node)
    return Up(value, leaf=leaf)


def _require_exclusive(root: Up, consts: Constants) -> None:
    """The fold changes every value below the site: each must be read by its parent alone
    (the top one by the site) and be no graph output."""
    pending = [root]
    while pending:
        node = pending.pop()
        where = describe(node.leaf.node if node.leaf is not None else node.node)
        if consts.is_output(node.value):
            raise NoMatch("graph-output", f"{node.value.name!r} between {where} and the site is a graph output")
        if consts.sole_reader(node.value) is None:
            raise NoMatch("fan-out", f"{node.value.name!r} between {where} and the site has "
                                     f"{len(element_readers(node.value))} readers")
        pending.extend(node.children)


def _lay_out(node: Up, consts: Constants, opset: int, uniform: bool) -> None:
    """The channel layout at every value, from the producers up, each crossing proven."""
    for child in node.children:
        _lay_out(child, consts, opset, uniform)
    if node.leaf is not None:
        node.channel = None if uniform else node.leaf.channel
    elif node.node.op_type in SUMS:
        node.channel = None if uniform else _alike(node)
    elif node.node.op_type == "Concat":
        node.channel = None if uniform else _concatenated(node)
    else:
        crossing = cross(node.node, 0, node.children[0].channel, consts, opset)
        step = next((s for s in crossing.steps if s.output is node.value), None)
        if step is None:  # a side output (MaxPool's indices, Dropout's mask) carries no map
            raise NoMatch("no-linear-producer", f"{node.value.name!r} is not the data output of {describe(node.node)}")
        others = [s.output for s in crossing.steps if s is not step]
        if step.select is None and any(element_readers(v) or consts.is_output(v) for v in others):
            raise NoMatch("fan-out", f"{describe(node.node)} passes the map on to {_and([v.name for v in others])} "
                                     "as well, which other nodes read")
        node.crossing, node.step, node.channel = crossing, step, step.channel


def _alike(node: Up) -> Channel:
    """A sum's operands must carry their channels alike (shapes may broadcast elsewhere)."""
    channels = [child.channel.normalized() if child.channel is not None else None for child in node.children]
    first = channels[0]
    if first is None or first.rank is None or first.axis is None or any(c != first for c in channels):
        raise NoMatch("unproven-layout", f"{describe(node.node)} adds tensors whose channels are not proven to "
                                         "lie alike")
    return first


def _concatenated(node: Up) -> Channel:
    """timm's mixed convolutions concatenate along the channels (each input its slice);
    along another axis every input carries the whole map."""
    channels = [child.channel.normalized() if child.channel is not None else None for child in node.children]
    ranks = {c.rank for c in channels if c is not None}
    axes = {c.axis for c in channels if c is not None}
    if None in channels or len(ranks) != 1 or None in ranks or len(axes) != 1 or None in axes:
        raise NoMatch("unproven-layout", f"the inputs of {describe(node.node)} do not share a proven channel axis")
    rank, axis = ranks.pop(), axes.pop()
    along = concat_axis(node.node)
    if not -rank <= along < rank:
        raise InputError(f"{describe(node.node)} concatenates rank-{rank} tensors along axis {along}: "
                         "invalid model")
    if along % rank == axis:
        return Channel(rank, axis, sum(c.count for c in channels))
    if len({c.count for c in channels}) != 1:
        raise InputError(f"{describe(node.node)} concatenates tensors of different sizes on axis {axis}: "
                         "invalid model")
    return channels[0]


def _hand_down(node: Up, scale: np.ndarray, shift: np.ndarray, uniform: bool, legs: list[Leg]) -> None:
    """Give the map at ``node`` to what produces it."""
    if node.leaf is not None:
        if uniform:
            scale, shift = np.full(node.leaf.channels, scale[0]), np.full(node.leaf.channels, shift[0])
        legs.append(Leg(node.leaf, scale, shift))
        return
    if node.node.op_type in SUMS:
        for i, child in enumerate(node.children):  # s into every operand, t once
            _hand_down(child, scale, shift if i == 0 else np.zeros_like(shift), uniform, legs)
        return
    if node.node.op_type == "Concat":
        start = 0
        for child in node.children:
            if uniform or concat_axis(node.node) % node.channel.rank != node.channel.axis:
                _hand_down(child, scale, shift, uniform, legs)
                continue
            stop = start + child.channel.count
            _hand_down(child, scale[start:stop], shift[start:stop], uniform, legs)
            start = stop
        return
    step = node.step
    if step.select is None:
        below = scale, shift / step.factor
    else:  # channels the op drops take no map; one copied twice must take one map
        count = node.children[0].channel.normalized().count
        below = np.ones(count), np.zeros(count)
        below[0][step.select], below[1][step.select] = scale, shift / step.factor
        if np.any(below[0][step.select] != scale) or np.any(below[1][step.select] != shift / step.factor):
            raise NoMatch("unproven-crossing", f"{describe(node.node)} copies one channel to several that would "
                                               "take different maps")
    problem = node.crossing.condition_problem(*below)
    if problem is not None:
        raise problem
    node.note = node.crossing.note(below[0])
    _hand_down(node.children[0], *below, uniform, legs)


def _up_pattern(node: Up) -> str:
    if node.leaf is not None:
        return node.leaf.pattern
    op = node.node.op_type.lower()
    if node.joins:
        return f"{op}({'+'.join(_up_pattern(c) for c in node.children)})"
    return f"{_up_pattern(node.children[0])}-{op}"


def _up_notes(node: Up) -> list[str]:
    """From the site back: ``through MaxPool 'p' (all 64 scales > 0)``, ``split over Add
    'a' into Conv 'x' and Conv 'y'``."""
    if node.leaf is not None:
        return []
    if node.joins:
        ends = [describe(c.leaf.node) for c in node.children if c.leaf is not None]
        into = f" into {_and(ends)}" if len(ends) == len(node.children) else ""
        return [f"split over {describe(node.node)}{into}"] + [n for c in node.children for n in _up_notes(c)]
    return [f"through {node.note}"] + _up_notes(node.children[0])


# --- downstream ----------------------------------------------------------------------


@dataclass
class _Reader:
    """A linear op reading the map; ``repeat`` features per channel when a Flatten between
    merged each channel with the axes after it; ``via`` is that Flatten."""

    match: ConsumerMatch
    repeat: int = 1
    via: ir.Node | None = None


@dataclass
class Down:
    """A value carrying the map downstream and everything that reads it: linear ops, and
    crossings with the values they pass the map on to."""

    value: ir.Value
    channel: Channel | None
    readers: list[_Reader] = field(default_factory=list)
    crossings: list[tuple[Crossing, list[tuple[Step, Down]]]] = field(default_factory=list)

    def ends(self) -> bool:
        return bool(self.readers) or any(child.ends() for _, steps in self.crossings for _, child in steps)


def trace_downstream(value: ir.Value, channel: Channel | None, consts: Constants, opset: int) -> Down:
    """Every reader of ``value`` (the site's output, channels ``channel``; None: a uniform
    map), onwards until each path ends in a linear op; NoMatch if one cannot."""
    if not leads_to_linear(value):
        names = _and([describe(node) for node, _ in element_readers(value)] or ["nothing"])
        raise NoMatch("no-linear-producer", f"the output is read by {names}")
    root = _follow(value, channel, consts, opset, _Budget())
    if not root.ends():
        raise NoMatch("no-linear-producer", f"the output {value.name!r} leads to no linear op")
    return root


def downstream_route(root: Down, scale: np.ndarray, shift: np.ndarray, site_kind: str) -> Route:
    """The legs for the map ``(scale, shift)`` on the site's output, every crossing's
    condition checked."""
    legs: list[Leg] = []
    notes: list[str] = []
    _hand_on(root, scale, shift, legs, notes)
    if len(legs) > 1:
        notes.insert(0, f"into {len(legs)} readers: {_and([describe(leg.match.node) for leg in legs])}")
    return Route(tuple(legs), f"{site_kind}-{_down_pattern(root)}", "; ".join(notes))


def leads_to_linear(value: ir.Value) -> bool:
    """Whether some path of readers from ``value`` through ops a map could cross reaches a
    linear op: a cheap test before anything about the map itself is worked out."""
    pending, seen = [value], set()
    while pending and len(seen) <= MAX_ROUTE:
        for node, index in element_readers(pending.pop()):
            if node in seen or not is_standard(node):
                continue
            seen.add(node)
            if node.op_type in CONSUMERS and index == 0:
                return True
            if is_crossing(node) or node.op_type == "Concat":
                pending.extend(v for v in node.outputs if v is not None)
    return False


def _follow(value: ir.Value, channel: Channel | None, consts: Constants, opset: int, budget: _Budget) -> Down:
    if consts.is_output(value):
        raise NoMatch("graph-output", f"{value.name!r} is a graph output")
    readers = element_readers(value)
    here = Down(value, channel)
    failures: list[NoMatch] = []
    for node, index in readers:
        try:
            budget.take(node)
            standard = is_standard(node)
            if standard and node.op_type in CONSUMERS and index == 0:
                here.readers.append(_reader(node, channel, consts))
            elif standard and node.op_type in ("Flatten", "Reshape") and index == 0 and _merges(node, channel, consts):
                here.readers.append(_flattened(node, channel, consts, budget))
            else:
                crossing = _concat(node, index, channel) if standard and node.op_type == "Concat" else \
                    cross(node, index, channel, consts, opset)
                here.crossings.append((crossing, [(step, _follow(step.output, step.channel, consts, opset, budget))
                                                  for step in crossing.steps]))
        except NoMatch as no:
            failures.append(no)
    if failures:
        raise _fork_failure(value, readers, failures)
    return here


def _fork_failure(value: ir.Value, readers: list, failures: list[NoMatch]) -> NoMatch:
    """One reader that cannot take the map stops the whole route: with several readers,
    a path that ends in no linear op is fan-out (the map would be needed there too)."""
    first = failures[0]
    if len(readers) < 2 or first.reason != "no-linear-producer":
        return first
    names = _and([describe(node) for node, _ in readers])
    if len(failures) == len(readers) and all(f.reason == "no-linear-producer" for f in failures):
        return NoMatch("no-linear-producer", f"{value.name!r} is read by {names}, and none leads to a linear op")
    return NoMatch("fan-out", f"{value.name!r} is read by {names}: {first.detail}")


def _reader(node: ir.Node, channel: Channel | None, consts: Constants) -> _Reader:
    require_resolved(node)
    match = CONSUMERS[node.op_type](node, consts)
    if channel is not None:
        require_channel_on_features(channel, match, node)
        if match.in_channels != channel.count:
            raise InputError(f"a map over {channel.count} channels feeds {describe(node)}, which reads "
                             f"{match.in_channels} input channels: invalid model")
    return _Reader(match)


def _merges(node: ir.Node, channel: Channel | None, consts: Constants) -> bool:
    """Whether a Flatten/Reshape merges the channel axis with what follows it (one that
    keeps the channel whole is an ordinary layout crossing)."""
    if channel is None:
        return False
    try:
        through(node, channel, consts)
    except NoMatch:
        return True
    return False


def _flattened(node: ir.Node, channel: Channel, consts: Constants, budget: _Budget) -> _Reader:
    """``BN -> Flatten(axis=1) -> Gemm``: each channel covers ``K / C`` consecutive features
    of the matrix op it must lead to directly."""
    require_resolved(node)
    require_flattened(node, channel)
    out = node.outputs[0]
    readers = element_readers(out)
    if consts.is_output(out) or len(readers) != 1:
        raise NoMatch("graph-output" if consts.is_output(out) else "fan-out",
                      f"the flattened map {out.name!r} is not read by one matrix op alone")
    reader, index = readers[0]
    if not is_standard(reader) or reader.op_type not in ("Gemm", "MatMul") or index != 0:
        raise NoMatch("no-linear-producer", f"a flattened map feeds {describe(reader)}, not a matrix op")
    budget.take(reader)
    require_resolved(reader)
    match = CONSUMERS[reader.op_type](reader, consts)
    if match.in_channels % max(channel.count, 1):
        raise InputError(f"a map over {channel.count} channels feeds {describe(reader)}, which reads "
                         f"{match.in_channels} input features: invalid model")
    return _Reader(match, match.in_channels // channel.count if channel.count else 1, node)


def _concat(node: ir.Node, index: int, channel: Channel | None) -> Crossing:
    """A map on one input of a Concat along the channels: that input's channels of the
    output carry it, the other inputs' channels carry none (they are not changed)."""
    require_resolved(node)
    known = channel.normalized() if channel is not None else _uniform_channel(node, index)
    if known is None or known.rank is None or known.axis is None or \
            concat_axis(node) % known.rank != known.axis:
        raise NoMatch("unproven-crossing", f"{describe(node)} joins the map with tensors that do not carry it, "
                                           "along another axis than its channels")
    sizes = []
    for value in node.inputs:
        dims = static_dims(value) if value is not None else None
        size = dims[known.axis] if dims is not None and len(dims) == known.rank else None
        if not isinstance(size, int):
            raise NoMatch("unproven-crossing", f"{describe(node)} joins inputs whose channel counts are not proven")
        sizes.append(size)
    start = sum(sizes[:index])
    select = np.full(sum(sizes), IDENTITY, dtype=np.int64)
    select[start:start + known.count] = np.arange(known.count)
    return Crossing(node, (Step(node.outputs[0], Channel(known.rank, known.axis, int(select.size)), select),),
                    label=describe(node))


def _uniform_channel(node: ir.Node, index: int) -> Channel | None:
    """A uniform map on one input of a Concat lies along the concatenated axis afterwards:
    its part of that axis carries it, the rest does not."""
    dims = static_dims(node.inputs[index])
    if dims is None:
        return None
    axis = concat_axis(node)
    if not -len(dims) <= axis < len(dims) or not isinstance(dims[axis % len(dims)], int):
        return None
    return Channel(len(dims), axis % len(dims), dims[axis % len(dims)])


def _hand_on(node: Down, scale: np.ndarray, shift: np.ndarray, legs: list[Leg], notes: list[str]) -> None:
    """Give the map on ``node.value`` to its readers, checking each crossing."""
    for reader in node.readers:
        count = reader.match.in_channels
        if node.channel is None:  # a uniform map: every feature alike
            legs.append(Leg(reader.match, np.full(count, scale[0]), np.full(count, shift[0])))
        else:
            legs.append(Leg(reader.match, np.repeat(scale, reader.repeat), np.repeat(shift, reader.repeat)))
    for crossing, steps in node.crossings:
        problem = crossing.condition_problem(scale, shift)
        if problem is not None:
            raise problem
        notes.append(f"through {crossing.note(scale)}")
        for step, child in steps:
            if step.select is None:
                _hand_on(child, scale, shift * step.factor, legs, notes)
                continue
            carried = step.select != IDENTITY
            picked = np.where(carried, step.select, 0) if scale.size > 1 else np.zeros_like(step.select)
            _hand_on(child, np.where(carried, scale[picked], 1.0), np.where(carried, shift[picked] * step.factor, 0.0),
                     legs, notes)


def _down_pattern(node: Down) -> str:
    parts = [(f"{r.via.op_type.lower()}-" if r.via is not None else "") + r.match.pattern.removeprefix("bn-")
             for r in node.readers]
    for crossing, steps in node.crossings:
        below = [_down_pattern(child) for _, child in steps if child.ends()]
        op = crossing.node.op_type.lower()
        parts.append(f"{op}-{below[0]}" if len(below) == 1 else f"{op}({'+'.join(below)})")
    return parts[0] if len(parts) == 1 else f"fork({'+'.join(parts)})"
