"""Follow the channel axis through layout ops between a linear op and an affine site.

A per-channel map ``y = s*x + t`` commutes with any op that only moves elements, as long
as every element keeps its channel. Transpose, Squeeze, Unsqueeze and Identity move the
channel axis predictably from the rank alone; Reshape and Flatten keep it intact only when
the dims before it are unchanged and it stays whole, which needs the shapes. With a single
channel the map is a scalar and commutes with every layout op.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from bnfold._onnx_ir import ir
from bnfold.constant_eval import Constants, static_dims
from bnfold.ledger import NoMatch
from bnfold.standard import is_standard

LAYOUT_OPS = {"Identity", "Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten"}


@dataclass(frozen=True)
class Channel:
    """Where the producer's output channels are in a tensor.

    ``axis`` is non-negative when ``rank`` is known, negative (from the end) when it is
    not, and None once a single channel has been squeezed or reshaped away.
    """

    rank: int | None
    axis: int | None
    count: int

    def normalized(self) -> Channel | None:
        """With a known rank, the axis as a non-negative index; None if that is impossible."""
        if self.axis is None or self.axis >= 0:
            return self
        if self.rank is None or not -self.rank <= self.axis < 0:
            return None
        return replace(self, axis=self.axis % self.rank)


def is_layout(node: ir.Node) -> bool:
    return is_standard(node) and node.op_type in LAYOUT_OPS


def through(node: ir.Node, channel: Channel, consts: Constants) -> Channel:
    """The channel after ``node``; NoMatch("unproven-layout") saying why it cannot be proven."""
    result = _through(node, channel, consts)
    if isinstance(result, str):
        label = node.name or f"output {node.outputs[0].name!r}"
        raise NoMatch("unproven-layout", f"{result} ({node.op_type} {label})")
    return result


def _through(node: ir.Node, channel: Channel, consts: Constants) -> Channel | str:
    op = node.op_type
    if op == "Identity":
        return channel
    if op == "Transpose":
        perm = node.attributes.get("perm")
        if perm is None:
            if channel.rank is None:
                return "Transpose without perm on a tensor of unknown rank"
            perm_list = list(reversed(range(channel.rank)))
        else:
            perm_list = list(perm.value)
        rank = len(perm_list)
        if sorted(perm_list) != list(range(rank)) or (channel.rank is not None and channel.rank != rank):
            return "Transpose whose perm does not match its input rank"
        if channel.axis is None:
            return Channel(rank, None, channel.count)
        axis = channel.axis % rank
        return Channel(rank, perm_list.index(axis), channel.count)
    if op == "Unsqueeze":
        return _unsqueeze(node, channel, consts)
    if op == "Squeeze":
        return _squeeze(node, channel, consts)
    return _reshape_like(node, channel, consts)


def _axes(node: ir.Node, consts: Constants) -> list[int] | None:
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        array = consts.array(node.inputs[1])
        return None if array is None else [int(a) for a in array]
    attr = node.attributes.get("axes")
    return None if attr is None else [int(a) for a in attr.value]


def _unsqueeze(node: ir.Node, channel: Channel, consts: Constants) -> Channel | str:
    axes = _axes(node, consts)
    known = channel.normalized()
    if axes is None or known is None or known.rank is None:
        return "Unsqueeze with unknown axes or input rank"
    rank = known.rank + len(axes)
    if any(not -rank <= a < rank for a in axes):
        return "Unsqueeze axes outside its output's rank"
    inserted = sorted(a % rank for a in axes)
    if known.axis is None:
        return Channel(rank, None, channel.count)
    kept = [p for p in range(rank) if p not in inserted]
    return Channel(rank, kept[known.axis], channel.count)


def _squeeze(node: ir.Node, channel: Channel, consts: Constants) -> Channel | str:
    axes = _axes(node, consts)
    known = channel.normalized()
    if known is None or known.rank is None:
        return "Squeeze on a tensor of unknown rank"
    if axes is None:
        dims = static_dims(node.inputs[0])
        if dims is None:
            return "Squeeze without axes on a tensor of unknown shape"
        if not all(isinstance(d, int) for d in dims):  # a symbolic dim (the batch) may be 1 at run time
            return "Squeeze without axes on a tensor with symbolic dims"
        axes = [i for i, d in enumerate(dims) if d == 1]
    if any(not -known.rank <= a < known.rank for a in axes):
        return "Squeeze axes outside the rank its input is known to have"
    axes = [a % known.rank for a in axes]
    rank = known.rank - len(axes)
    if known.axis is None or known.axis in axes:
        if channel.count != 1:
            return "Squeeze removes the channel axis"
        return Channel(rank, None, 1)
    return Channel(rank, known.axis - sum(a < known.axis for a in axes), channel.count)


def _reshape_like(node: ir.Node, channel: Channel, consts: Constants) -> Channel | str:
    """Reshape/Flatten: the channel survives if it stays whole and in place (see below)."""
    before = static_dims(node.inputs[0])
    after = _output_dims(node, before, consts)
    if channel.count == 1:  # a scalar map: wherever the one channel goes, it stays whole
        rank = 2 if node.op_type == "Flatten" else (len(after) if after is not None else None)
        return Channel(rank, None, 1)
    if after is None:
        return f"{node.op_type} with shapes that cannot be proven"
    known = channel.normalized()
    if before is None or known is None or known.axis is None:
        return f"{node.op_type} of a tensor whose shape is unknown"
    # An element's channel is (flat index // the product of the dims after the channel axis)
    # % C: it survives if the dims before the axis keep their extent, or those after it do
    # (with symbolic dims, e.g. a dynamic batch, often only the trailing ones are known).
    prefix, suffix = before[: known.axis], before[known.axis + 1:]
    for k in range(len(after)):
        if after[k] == channel.count and (_same_extent(after[:k], prefix) or _static_equal(after[k + 1:], suffix)):
            return Channel(len(after), k, channel.count)
    return f"{node.op_type} merges or splits the channel axis"


def _static_equal(dims_a: list, dims_b: list) -> bool:
    """Both lists static and of one extent."""
    ints = all(isinstance(d, int) and d >= 0 for d in dims_a + dims_b)
    return ints and math.prod(dims_a) == math.prod(dims_b)


def _same_extent(dims_a: list, dims_b: list) -> bool:
    if dims_a == dims_b:
        return True
    if all(isinstance(d, int) and d >= 0 for d in dims_a + dims_b):
        return math.prod(dims_a) == math.prod(dims_b)
    return False


def _output_dims(node: ir.Node, before: list | None, consts: Constants) -> list | None:
    """The output dims as far as they are known: ints, names of symbolic dims, and None for
    an extent that is not (Reshape's -1, a product with a symbolic dim). None, not a name:
    a symbolic dim may be named anything, "?" included, and two equal names are one extent."""
    if node.op_type == "Flatten":
        if before is None:
            return None
        axis = node.attributes.get_int("axis", 1)
        split = axis + len(before) if axis < 0 else axis  # axis == rank is valid: (prod, 1)
        if not 0 <= split <= len(before):
            return None
        return [_product(before[:split]), _product(before[split:])]
    target = consts.array(node.inputs[1])
    if target is None:
        return static_dims(node.outputs[0])
    dims = [int(d) for d in target]
    if not node.attributes.get_int("allowzero", 0) and before is not None:
        dims = [before[i] if d == 0 else d for i, d in enumerate(dims)]
    elif 0 in dims:
        return None
    return [(None if d == -1 else d) for d in dims]


def _product(dims: list):
    if not dims:
        return 1
    if len(dims) == 1:
        return dims[0]
    if all(isinstance(d, int) for d in dims):
        return math.prod(dims)
    return None
