"""Where, in a value, lie the channels of the op a fold scales: walking back from the value.

verify judges each output per channel (docs/verify.md): a wrong fold is wrong in one
output channel of the op it went into, so the channels must be that op's. The walk uses
the fold's own matchers (``match_producer``: Conv, ConvTranspose and Gemm on axis 1,
MatMul on the last axis, a constant-first ``W @ x`` on the second from the end) and its
layout proofs (``layout.through``: Transpose, Squeeze, Unsqueeze, Reshape, Flatten,
Identity), and treats a Concat as planning does. So for every pattern fold knows, the
axis found here is the axis the fold scaled (tests/test_verify_axes.py). Unlike planning,
it needs no legality (fan-out, constant weights): it only says where channels are.
"""

from __future__ import annotations

from bnfold._onnx_ir import ir
from bnfold.constant_eval import Constants, rank_of, static_dims
from bnfold.errors import InputError
from bnfold.ledger import NoMatch
from bnfold.patterns import concat_axis, match_producer
from bnfold.patterns.layout import Channel, is_layout, through
from bnfold.standard import is_standard

#: Ops whose output channels lie along axis 1 (NCHW) whatever their inputs: the linear
#: producers fold does not match (non-constant weights) and ops that make channels there.
CHANNELS_FIRST = {"Conv", "ConvTranspose", "ConvInteger", "QLinearConv", "BatchNormalization",
                  "InstanceNormalization", "Gemm", "MaxPool", "AveragePool", "LpPool", "GlobalAveragePool",
                  "GlobalMaxPool", "GlobalLpPool"}
#: Ops whose output channels lie along the last axis when fold does not match them.
CHANNELS_LAST = {"MatMul", "MatMulInteger", "QLinearMatMul"}
#: Elementwise ops: each output element is computed from the elements at its position, so
#: the channels of their (first non-constant) input stay where they are.
ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Relu", "LeakyRelu", "PRelu", "Sigmoid", "HardSigmoid", "HardSwish",
               "Tanh", "Elu", "Selu", "Celu", "Gelu", "Softplus", "Softsign", "Mish", "Clip", "Dropout", "Cast",
               "Neg", "Abs", "Exp", "Log", "Sqrt", "Erf", "Reciprocal", "Pow"}
#: How far back the walk looks before it gives up.
WALK_LIMIT = 64


def channel_of(value: ir.Value, consts: Constants, depth: int = 0) -> Channel | None:
    """Where the channels of the op that made ``value`` lie in it; None if the walk cannot
    tell (an op that moves elements unprovably, no channel-making op within reach)."""
    path: list[ir.Node] = []
    origin = None
    for _ in range(WALK_LIMIT):
        node = value.producer()
        if node is None or not is_standard(node) or depth > WALK_LIMIT:
            return None
        origin = _origin(value, node, consts, depth)
        if origin is not None:
            break
        data = _data_input(node, consts)
        if data is None:
            return None
        path.append(node)
        value = data
    if origin is None:
        return None
    channel = origin
    for node in reversed(path):  # from the origin out to the value
        if is_layout(node):
            try:
                channel = through(node, channel, consts)
            except NoMatch:
                return None
        else:
            channel = _broadcast(channel, rank_of(node.outputs[0]))
        if channel is None:
            return None
    return channel


def _origin(value: ir.Value, node: ir.Node, consts: Constants, depth: int) -> Channel | None:
    """The channels ``node`` itself makes in ``value``, or None to walk on through it."""
    op = node.op_type
    if op == "Concat":
        return _concat(node, consts, depth)
    if op in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
        try:
            return match_producer(value, consts).channel
        except (NoMatch, InputError):  # not foldable here; its channels are still where the op puts them
            pass
    if op in CHANNELS_FIRST:  # a declared rank without an axis 1 contradicts the op: no channels
        rank = rank_of(value)
        return Channel(rank, 1, _count(value, 1)) if rank is None or rank > 1 else None
    if op in CHANNELS_LAST:
        return Channel(rank_of(value), -1, _count(value, -1))
    return None


def _concat(node: ir.Node, consts: Constants, depth: int) -> Channel | None:
    """A Concat along its inputs' common channel axis (planning's ``concat(...)`` patterns)."""
    channels = [None if value is None else channel_of(value, consts, depth + 1) for value in node.inputs]
    known = [None if channel is None else channel.normalized() for channel in channels]
    if not known or any(c is None or c.rank is None or c.axis is None for c in known):
        return None
    if len({(c.rank, c.axis) for c in known}) != 1:
        return None
    rank, axis = known[0].rank, known[0].axis
    if concat_axis(node) % rank != axis:
        return None
    counts = [c.count for c in known]
    return Channel(rank, axis, sum(counts) if min(counts) >= 0 else -1)


def _data_input(node: ir.Node, consts: Constants) -> ir.Value | None:
    """The input whose channels ``node`` passes on: a layout op's first, an elementwise op's
    first that is not a constant; None for any other op."""
    if is_layout(node):
        return node.inputs[0] if node.inputs else None
    if node.op_type not in ELEMENTWISE:
        return None
    data = [v for v in node.inputs if v is not None and not _is_constant(v, consts)]
    return data[0] if data else None


def _is_constant(value: ir.Value, consts: Constants) -> bool:
    return value.const_value is not None or value.is_initializer() or consts.tensor(value)[0] is not None


def _broadcast(channel: Channel, rank: int | None) -> Channel | None:
    """The channel after an elementwise op whose output has ``rank`` (None: unknown, taken
    as unchanged): broadcasting aligns shapes from the right, so the axis counted from the
    end stays."""
    if rank is None:
        return channel
    if channel.axis is None:
        return Channel(rank, None, channel.count)
    if channel.axis < 0 or channel.rank is None:
        axis = channel.axis + rank if channel.axis < 0 else channel.axis
    else:
        axis = channel.axis - channel.rank + rank
    return Channel(rank, axis, channel.count) if 0 <= axis < rank else None


def _count(value: ir.Value, axis: int) -> int:
    """The static size of ``value`` along ``axis``; -1 when unknown (layout proofs that need
    the channel count then fail, and the walk stops there)."""
    dims = static_dims(value)
    if dims is None or not -len(dims) <= axis < len(dims):
        return -1
    size = dims[axis]
    return size if isinstance(size, int) else -1
