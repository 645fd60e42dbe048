"""The ops a per-channel affine map crosses: one rule each, in one table.

A map ``M(x) = s*x + t`` (one ``s_c, t_c`` per channel) commutes with an op that moves,
copies, selects or averages elements within each channel: ``Op(M(x)) = M'(Op(x))``,
where ``M'`` is the same map on the op's output channels. So a map can travel across
such an op, in either direction, until it meets a linear op that absorbs it. Each rule
below proves, for one family of ops, where the channels go and under which condition the
map commutes; it says no with ``NoMatch(reason, detail)``:

| ops | commutes when |
| --- | --- |
| Identity, Dropout (inference) | always |
| Transpose, Reshape, Flatten, Squeeze, Unsqueeze | the channel axis is followed (``layout``) |
| MaxPool, GlobalMaxPool, ReduceMax, ReduceMin | every ``s > 0`` (a negative scale swaps max and min) |
| AveragePool, GlobalAveragePool, ReduceMean | always; a shift only without counted padding |
| ReduceSum | ``t`` becomes ``count * t`` |
| Resize, Upsample | nearest, linear, cubic (weights sum to 1); never ``tf_crop_and_resize`` |
| Slice, Gather, Split | off the channel axis: the same map; on it: each piece its channels |
| Pad | reflect, edge, wrap; constant ``v`` only where ``s*v + t == v`` |

Pools and reductions must leave the channel axis alone. A *uniform* map (one ``s`` and
``t`` for every element: a one-channel BN, a scalar constant) needs no channel proof.
Joins (Concat, Add/Sub/Sum) are the router's own business (``bnfold.route``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from bnfold._onnx_ir import ir
from bnfold.constant_eval import Constants, static_dims
from bnfold.ledger import NoMatch
from bnfold.patterns import describe, require_resolved
from bnfold.patterns.layout import LAYOUT_OPS, Channel, through
from bnfold.standard import is_standard

#: ``select[k] == IDENTITY``: output channel k carries no map (Concat's other inputs).
IDENTITY = -1


@dataclass(frozen=True)
class Step:
    """The map on one output of a crossed op.

    Output channel ``k`` carries the input's channel ``select[k]`` (None: the same
    channels), and its shift is ``factor`` times the input's.
    """

    output: ir.Value
    channel: Channel | None
    select: np.ndarray | None = None
    factor: float = 1.0


@dataclass(frozen=True)
class Crossing:
    """What crossing ``node`` requires of the map and where its channels go."""

    node: ir.Node
    steps: tuple[Step, ...]
    #: max/min: every scale must be > 0.
    positive: bool = False
    #: Why a shift cannot cross (counted padding, an unknown count); None: it can.
    no_shift: str | None = None
    #: Constant Pad: the padding value, which ``s*v + t`` must reproduce on every channel.
    pad_value: float | None = None
    #: Words for the ledger ("MaxPool 'p'").
    label: str = field(default="")

    def condition_problem(self, scale: np.ndarray, shift: np.ndarray) -> NoMatch | None:
        """Why the map ``(scale, shift)`` on the op's input channels cannot cross, if it cannot."""
        if self.positive and np.any(scale <= 0):
            bad = np.flatnonzero(scale <= 0)
            return NoMatch("negative-scale", f"{self.label} takes a max or min, which a scale <= 0 turns around "
                                             f"(channel(s) {_channels(bad)})")
        if self.no_shift is not None and np.any(shift != 0):
            return NoMatch("shift-not-crossing", f"{self.label}: {self.no_shift}, and the map has a shift")
        if self.pad_value is not None:
            with np.errstate(invalid="ignore", over="ignore"):
                moved = scale * self.pad_value + shift != self.pad_value
            if np.any(moved):
                return NoMatch("pad-value", f"{self.label} pads with {self.pad_value:g}, which the map moves on "
                                            f"channel(s) {_channels(np.flatnonzero(moved))}")
        return None

    def note(self, scale: np.ndarray) -> str:
        """The ledger's words for this crossing, with the fact that made it legal."""
        if self.positive:
            return f"{self.label} (all {scale.size} scales > 0)"
        return self.label


def _channels(indices: np.ndarray, limit: int = 8) -> str:
    shown = ", ".join(str(i) for i in indices[:limit])
    return shown + (f", ... ({indices.size} in all)" if indices.size > limit else "")


def cross(node: ir.Node, index: int, channel: Channel | None, consts: Constants, opset: int) -> Crossing:
    """How a map entering ``node`` at input ``index`` comes out (``channel`` None: a uniform
    map); NoMatch when ``node`` is no crossing or its facts cannot be proven."""
    rule = RULES.get(node.op_type) if is_standard(node) else None
    if rule is None:
        raise NoMatch("no-linear-producer", f"the map meets {describe(node)}, which it cannot cross")
    if index != 0:
        raise NoMatch("no-linear-producer", f"{describe(node)} reads the map as input {index}, not as its data")
    require_resolved(node)
    return rule(node, channel, consts, node.version or opset)


def is_crossing(node: ir.Node) -> bool:
    return is_standard(node) and node.op_type in RULES


# --- the rules -----------------------------------------------------------------------


def _same(node: ir.Node, channel: Channel | None, consts: Constants, opset: int) -> Crossing:
    """Identity, and Dropout in inference: the output is the input."""
    if node.op_type == "Dropout":
        if opset < 7 and not node.attributes.get_int("is_test", 0):
            raise _refuse(node, "runs in training mode (is_test=0)")
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            flag = consts.array(node.inputs[2])
            if flag is None or bool(np.asarray(flag).reshape(-1)[0]):
                raise _refuse(node, "may run in training mode (training_mode is not a constant false)")
    return _one(node, channel)


def _layout(node: ir.Node, channel: Channel | None, consts: Constants, opset: int) -> Crossing:
    """Ops that only move elements: the channel axis is followed (``layout.through``)."""
    return _one(node, None if channel is None else through(node, channel, consts))


def _pool(node: ir.Node, channel: Channel | None, consts: Constants, opset: int) -> Crossing:
    """Pools work on each (batch, channel) plane: channels stay on axis 1."""
    _require_axis_1(node, channel)
    label = describe(node)
    if node.op_type in ("MaxPool", "GlobalMaxPool"):
        if len(node.outputs) > 1 and node.outputs[1] is not None and (node.outputs[1].uses()
                                                                      or node.outputs[1].is_graph_output()):
            raise _refuse(node, "also returns the argmax indices, which rounding of the map could change")
        return Crossing(node, (Step(node.outputs[0], channel),), positive=True, label=label)
    no_shift = None
    if node.op_type == "AveragePool" and node.attributes.get_int("count_include_pad", 0) and _pads(node):
        no_shift = "its average counts the zero padding, which a shift does not reach"
    return Crossing(node, (Step(node.outputs[0], channel),), no_shift=no_shift, label=label)


def _pads(node: ir.Node) -> bool:
    """Whether a pool may pad: explicit pads, SAME padding, or ceil_mode's partial windows."""
    pads = node.attributes.get("pads")
    auto_pad = node.attributes.get_string("auto_pad", "NOTSET")
    return bool((pads is not None and any(pads.value)) or auto_pad in ("SAME_UPPER", "SAME_LOWER")
                or node.attributes.get_int("ceil_mode", 0))


def _reduce(node: ir.Node, channel: Channel | None, consts: Constants, opset: int) -> Crossing:
    """ReduceMax/Min/Mean/Sum over axes other than the channel axis."""
    dims = static_dims(node.inputs[0])
    rank = channel.normalized().rank if channel is not None and channel.normalized() is not None else \
        (len(dims) if dims is not None else None)
    axes = _reduce_axes(node, consts)
    if axes is None or rank is None:
        raise _refuse(node, "reduces axes that cannot be proven")
    if not axes:  # no axes: everything, unless noop_with_empty_axes
        if node.attributes.get_int("noop_with_empty_axes", 0):
            return Crossing(node, (Step(node.outputs[0], channel),), label=describe(node))
        axes = list(range(rank))
    if any(not -rank <= a < rank for a in axes):
        raise _refuse(node, "reduces an axis outside its input's rank")
    axes = sorted({a % rank for a in axes})
    out_channel = None
    if channel is not None:
        known = _known(node, channel)
        if known.axis in axes:
            raise _refuse(node, "reduces over the channel axis", "channel-axis-mismatch")
        kept = bool(node.attributes.get_int("keepdims", 1))
        out_channel = Channel(rank if kept else rank - len(axes),
                              known.axis if kept else known.axis - sum(a < known.axis for a in axes), known.count)
    op, label = node.op_type, describe(node)
    if op in ("ReduceMax", "ReduceMin"):
        return Crossing(node, (Step(node.outputs[0], out_channel),), positive=True, label=label)
    if op == "ReduceMean":
        return Crossing(node, (Step(node.outputs[0], out_channel),), label=label)
    sizes = [dims[a] for a in axes] if dims is not None else None
    if sizes is None or not all(isinstance(d, int) for d in sizes):
        return Crossing(node, (Step(node.outputs[0], out_channel),), label=label,
                        no_shift="it sums a number of elements that cannot be proven")
    count = math.prod(sizes)
    return Crossing(node, (Step(node.outputs[0], out_channel, factor=float(count)),),
                    label=f"{label} (shift x {count})")


def _reduce_axes(node: ir.Node, consts: Constants) -> list[int] | None:
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        array = consts.array(node.inputs[1])
        return None if array is None else [int(a) for a in np.asarray(array).reshape(-1)]
    attr = node.attributes.get("axes")
    return [] if attr is None else [int(a) for a in attr.value]


def _resize(node: ir.Node, channel: Channel | None, consts: Constants, opset: int) -> Crossing:
    """Resize/Upsample: each output element is a weighted mean of input elements of its
    own channel, with weights that sum to 1 (nearest: one weight), unless it extrapolates."""
    mode = node.attributes.get_string("mode", "nearest")
    if mode not in ("nearest", "linear", "cubic"):
        raise _refuse(node, f"uses mode {mode!r}")
    if node.attributes.get_string("coordinate_transformation_mode", "half_pixel") == "tf_crop_and_resize":
        raise _refuse(node, "crops with tf_crop_and_resize, which fills with an extrapolation value")
    if channel is not None:
        known = channel.normalized()
        if known is None or known.rank is None or known.axis is None or \
                _resize_factor(node, known, consts, opset) != 1:
            raise _refuse(node, "may resize the channel axis", "channel-axis-mismatch")
    return _one(node, channel)


def _resize_factor(node: ir.Node, channel: Channel, consts: Constants, opset: int) -> float | None:
    """The factor Resize/Upsample applies to the channel axis (None: unproven)."""
    if node.op_type == "Upsample" or opset < 11:
        if len(node.inputs) > 1 and node.inputs[1] is not None:
            scales = consts.array(node.inputs[1])
        else:
            attr = node.attributes.get("scales")
            scales = None if attr is None else np.asarray(attr.value)
        if scales is None or np.asarray(scales).size != channel.rank:
            return None
        return float(np.asarray(scales).reshape(-1)[channel.axis])
    axes_attr = node.attributes.get("axes")
    axes = list(range(channel.rank)) if axes_attr is None else [a % channel.rank for a in axes_attr.value]
    if channel.axis not in axes:
        return 1.0
    position = axes.index(channel.axis)
    sizes = consts.array(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else None
    if sizes is not None and np.asarray(sizes).size:
        if np.asarray(sizes).size != len(axes):
            return None
        if node.attributes.get_string("keep_aspect_ratio_policy", "stretch") != "stretch":
            return None
        return 1.0 if int(np.asarray(sizes).reshape(-1)[position]) == channel.count else None
    scales = consts.array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
    if scales is None or np.asarray(scales).size != len(axes):
        return None
    return float(np.asarray(scales).reshape(-1)[position])


def _slice(node: ir.Node, channel: Channel | None, consts: Constants, opset: int) -> Crossing:
    """Slice: on the channel axis the output keeps the sliced channels, elsewhere all."""
    if channel is None:
        return _one(node, None)
    known = _known(node, channel)
    spec = _slice_spec(node, consts, known.rank)
    if spec is None:
        raise _refuse(node, "slices with starts, ends, axes or steps that are not constants")
    if known.axis not in spec:
        return _one(node, known)
    select = np.arange(known.count)[spec[known.axis]]
    if select.size == 0:
        raise NoMatch("zero-size", f"{describe(node)} keeps no channel")
    return Crossing(node, (Step(node.outputs[0], Channel(known.rank, known.axis, select.size), select),),
                    label=describe(node))


def _slice_spec(node: ir.Node, consts: Constants, rank: int) -> dict[int, slice] | None:
    """axis -> python slice (ONNX's clamping is numpy's)."""
    if len(node.inputs) > 1:  # Slice-10 and later: starts, ends, axes, steps are inputs
        given = [node.inputs[i] if i < len(node.inputs) else None for i in range(1, 5)]
        starts, ends, axes, steps = (None if v is None else consts.array(v) for v in given)
        if any(v is not None and a is None for v, a in zip(given, (starts, ends, axes, steps))) or \
                given[0] is None or given[1] is None:
            return None
    else:
        attrs = [node.attributes.get(k) for k in ("starts", "ends", "axes")]
        if attrs[0] is None or attrs[1] is None:
            return None
        starts, ends, axes = (None if a is None else np.asarray(a.value) for a in attrs)
        steps = None
    starts, ends = np.asarray(starts).reshape(-1), np.asarray(ends).reshape(-1)
    axes = np.arange(starts.size) if axes is None else np.asarray(axes).reshape(-1)
    steps = np.ones(starts.size, dtype=np.int64) if steps is None else np.asarray(steps).reshape(-1)
    if not starts.size == ends.size == axes.size == steps.size or np.any(steps == 0):
        return None
    if np.any((axes < -rank) | (axes >= rank)):
        return None
    return {int(a) % rank: slice(int(b), int(e), int(s)) for a, b, e, s in zip(axes, starts, ends, steps)}


def _gather(node: ir.Node, channel: Channel | None, consts: Constants, opset: int) -> Crossing:
    """Gather with constant indices: on the channel axis it selects channels."""
    if channel is None:
        return _one(node, None)
    known = _known(node, channel)
    indices = consts.array(node.inputs[1]) if len(node.inputs) > 1 else None
    if indices is None:
        raise _refuse(node, "gathers with indices that are not constants")
    indices = np.asarray(indices)
    axis = node.attributes.get_int("axis", 0)
    if not -known.rank <= axis < known.rank:
        raise _refuse(node, "gathers along an axis outside its input's rank")
    axis %= known.rank
    rank = known.rank - 1 + indices.ndim
    if axis > known.axis:
        return _one(node, Channel(rank, known.axis, known.count))
    if axis < known.axis:
        return _one(node, Channel(rank, known.axis + indices.ndim - 1, known.count))
    if indices.ndim != 1 or np.any((indices < -known.count) | (indices >= known.count)):
        raise _refuse(node, "gathers channels with indices that are not a list of valid channels")
    select = indices.astype(np.int64) % known.count
    if select.size == 0:
        raise NoMatch("zero-size", f"{describe(node)} keeps no channel")
    return Crossing(node, (Step(node.outputs[0], Channel(known.rank, known.axis, select.size), select),),
                    label=describe(node))


def _pad(node: ir.Node, channel: Channel | None, consts: Constants, opset: int) -> Crossing:
    """Pad copies elements (reflect, edge, wrap) or adds a constant: never on the channel axis."""
    mode = node.attributes.get_string("mode", "constant")
    if mode not in ("constant", "reflect", "edge", "wrap"):
        raise _refuse(node, f"pads in mode {mode!r}")
    dims = static_dims(node.inputs[0])
    rank = channel.normalized().rank if channel is not None and channel.normalized() is not None else \
        (len(dims) if dims is not None else None)
    pads = _pad_amounts(node, consts, rank)
    if pads is None:
        raise _refuse(node, "pads by amounts that are not constants")
    if channel is not None:
        known = _known(node, channel)
        if pads.get(known.axis, (0, 0)) != (0, 0):
            raise _refuse(node, "pads the channel axis", "channel-axis-mismatch")
    value = None
    if mode == "constant":
        value = _pad_value(node, consts)
        if value is None:
            raise _refuse(node, "pads with a value that is not a constant")
    return Crossing(node, (Step(node.outputs[0], None if channel is None else channel.normalized()),),
                    pad_value=value, label=describe(node))


def _pad_amounts(node: ir.Node, consts: Constants, rank: int | None) -> dict[int, tuple[int, int]] | None:
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        pads = consts.array(node.inputs[1])
    else:
        attr = node.attributes.get("pads") or node.attributes.get("paddings")
        pads = None if attr is None else np.asarray(attr.value)
    if pads is None:
        return None
    pads = [int(p) for p in np.asarray(pads).reshape(-1)]
    if len(node.inputs) > 3 and node.inputs[3] is not None:
        axes = consts.array(node.inputs[3])
        if axes is None or rank is None:
            return None
        axes = [int(a) % rank for a in np.asarray(axes).reshape(-1)]
    else:
        axes = list(range(len(pads) // 2))
    if len(pads) != 2 * len(axes):
        return None
    return {a: (pads[i], pads[i + len(axes)]) for i, a in enumerate(axes)}


def _pad_value(node: ir.Node, consts: Constants) -> float | None:
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        value = consts.array(node.inputs[2])
        return None if value is None or np.asarray(value).size != 1 else float(np.asarray(value).reshape(-1)[0])
    if len(node.inputs) > 1:
        return 0.0
    return node.attributes.get_float("value", 0.0)


def _split(node: ir.Node, channel: Channel | None, consts: Constants, opset: int) -> Crossing:
    """Split: along the channel axis each output keeps its channels; elsewhere all of them."""
    outputs = [v for v in node.outputs if v is not None]
    if channel is None:
        return Crossing(node, tuple(Step(v, None) for v in outputs), label=describe(node))
    known = _known(node, channel)
    axis = node.attributes.get_int("axis", 0)
    if not -known.rank <= axis < known.rank:
        raise _refuse(node, "splits along an axis outside its input's rank")
    if axis % known.rank != known.axis:
        return Crossing(node, tuple(Step(v, known) for v in outputs), label=describe(node))
    sizes = _split_sizes(node, consts, known.count, len(node.outputs))
    if sizes is None:
        raise _refuse(node, "splits the channels in sizes that cannot be proven")
    steps, start = [], 0
    for value, size in zip(node.outputs, sizes):
        if value is not None:
            steps.append(Step(value, Channel(known.rank, known.axis, size), np.arange(start, start + size)))
        start += size
    return Crossing(node, tuple(steps), label=describe(node))


def _split_sizes(node: ir.Node, consts: Constants, total: int, count: int) -> list[int] | None:
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        array = consts.array(node.inputs[1])
        if array is None:  # given, but not as a constant we can read
            return None
        sizes = [int(d) for d in np.asarray(array).reshape(-1)]
    else:
        attr = node.attributes.get("split")
        sizes = None if attr is None else [int(d) for d in attr.value]
    if sizes is None:  # not given: equal parts, the last one smaller (opset 18's num_outputs)
        size = -(-total // count)
        sizes = [min(size, max(0, total - i * size)) for i in range(count)]
    if len(sizes) != count or sum(sizes) != total or min(sizes) < 0:
        return None
    return sizes


# --- helpers ---------------------------------------------------------------------------


def _one(node: ir.Node, channel: Channel | None) -> Crossing:
    return Crossing(node, (Step(node.outputs[0], channel),), label=describe(node))


def _known(node: ir.Node, channel: Channel) -> Channel:
    known = channel.normalized()
    if known is None or known.rank is None or known.axis is None:
        raise _refuse(node, "works on axes, and the channel axis of its input is not proven")
    return known


def _require_axis_1(node: ir.Node, channel: Channel | None) -> None:
    if channel is None:
        return
    known = channel.normalized()
    if known is None or known.axis != 1:
        raise _refuse(node, "pools (batch, channel, ...) planes, and the map's channels are not on axis 1",
                      "channel-axis-mismatch")


def _refuse(node: ir.Node, what: str, reason: str = "unproven-crossing") -> NoMatch:
    return NoMatch(reason, f"{describe(node)} {what}")


RULES = {
    "Identity": _same, "Dropout": _same,
    **{op: _layout for op in LAYOUT_OPS if op != "Identity"},
    "MaxPool": _pool, "GlobalMaxPool": _pool, "AveragePool": _pool, "GlobalAveragePool": _pool,
    "ReduceMax": _reduce, "ReduceMin": _reduce, "ReduceMean": _reduce, "ReduceSum": _reduce,
    "Resize": _resize, "Upsample": _resize,
    "Slice": _slice, "Gather": _gather, "Split": _split, "Pad": _pad,
}
