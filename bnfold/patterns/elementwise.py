"""Constant per-channel Mul / Div / Add / Sub: affine maps without a BatchNormalization.

Keras and tf2onnx spell BN as ``Mul(scale) -> Add(shift)`` and Dense biases as
``Add(bias)``; ``x * c``, ``x / c``, ``x + c``, ``x - c`` and ``c - x`` are
``s*x + t`` with (s, t) = (c, 0), (1/c, 0), (1, c), (1, -c), (-1, c). They fold like a BN
when the constant varies along the channel axis only: its shape, aligned to the tensor
from the right, is 1 everywhere but (possibly) on the channel axis.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bnfold._onnx_ir import ir
from bnfold.constant_eval import Constants
from bnfold.ledger import NoMatch
from bnfold.patterns.layout import Channel
from bnfold.standard import is_standard

AFFINE_OPS = {"Mul", "Div", "Add", "Sub"}


@dataclass
class ElementwiseSite:
    node: ir.Node
    data_index: int
    constant: np.ndarray


def as_site(node: ir.Node, consts: Constants) -> ElementwiseSite | None:
    """``node`` as an affine site: exactly one operand constant, and not ``c / x``."""
    if not is_standard(node) or node.op_type not in AFFINE_OPS or len(node.inputs) != 2:
        return None
    arrays = [consts.array(v) for v in node.inputs]
    constant_positions = [i for i, a in enumerate(arrays) if a is not None]
    if len(constant_positions) != 1:
        return None
    data_index = 1 - constant_positions[0]
    if node.op_type == "Div" and data_index != 0:
        return None
    constant = arrays[constant_positions[0]]
    if not np.issubdtype(constant.dtype, np.floating) and constant.dtype.kind != "V":
        return None
    return ElementwiseSite(node, data_index, constant)


def channel_vector(constant: np.ndarray, channel: Channel) -> np.ndarray:
    """The constant as one value per channel; NoMatch("non-channel-constant") if it is not.

    Removing the site must not change the output's shape either: the constant may not
    broadcast the tensor to a higher rank, so an unknown rank allows only a scalar.
    """
    shape = constant.shape
    known = channel.normalized()
    if known is None or known.rank is None:
        # Rank unknown: a scalar is safe; a 1-D constant only where the channels are counted
        # from the end (a MatMul output, rank >= 1), and then it must run along the last axis.
        if len(shape) > 1 or (len(shape) == 1 and known is not None):
            _refuse(f"constant of shape {list(shape)} on a tensor of unknown rank")
        if shape and shape[0] not in (1, channel.count):
            _refuse(f"constant of shape {list(shape)} does not match {channel.count} channels")
        if shape and channel.axis != -1 and shape[0] != 1:
            _refuse(f"constant of shape {list(shape)} runs along the last axis, not the channel axis")
    else:
        if len(shape) > known.rank:
            _refuse(f"constant of shape {list(shape)} broadcasts the tensor to a higher rank")
        full = (1,) * (known.rank - len(shape)) + tuple(shape)
        for i, size in enumerate(full):
            if i == known.axis:
                if size not in (1, channel.count):
                    _refuse(f"constant of shape {list(shape)} does not match {channel.count} channels")
            elif size != 1:
                _refuse(f"constant of shape {list(shape)} varies along axis {i}, not only the channel axis")
    values = constant.astype(np.float64).reshape(-1)
    return np.broadcast_to(values if values.size == channel.count else values.reshape(()), (channel.count,)).copy()


def scale_shift(site: ElementwiseSite, vector: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The site as ``(s, t)``; NoMatch if the constant is not finite or divides by zero."""
    if not np.all(np.isfinite(vector)):
        raise NoMatch("non-finite-params", f"the {site.node.op_type} constant holds NaN or infinity")
    op = site.node.op_type
    ones, zeros = np.ones_like(vector), np.zeros_like(vector)
    if op == "Mul":
        return vector, zeros
    if op == "Div":
        if np.any(vector == 0):
            raise NoMatch("non-finite-params", "division by zero")
        return 1.0 / vector, zeros
    if op == "Add":
        return ones, vector
    return (ones, -vector) if site.data_index == 0 else (-ones, vector)


def _refuse(detail: str) -> None:
    raise NoMatch("non-channel-constant", detail)
