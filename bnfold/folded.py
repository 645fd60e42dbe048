"""A folded weight: its source tensor times a per-channel factor, computed while saving.

Chained folds into one weight (``Conv -> Mul -> Mul -> ...``) multiply factors instead of
stacking lazy tensors, so writing the weight reads its source once, with no recursion.
"""

from __future__ import annotations

import numpy as np

from bnfold import affine
from bnfold._onnx_ir import ir


class FoldedTensor(ir.LazyTensor):
    """``source * factor`` in float64, cast once to the source's dtype on first use.

    Planning has already proved that the result is finite and fits the dtype.
    """

    def __init__(self, source: ir.TensorProtocol, factor: np.ndarray, *, name: str, read, release):
        self.source, self.factor = source, factor
        super().__init__(self._compute, dtype=source.dtype, shape=ir.Shape(source.shape), name=name)
        self._read, self._release = read, release

    def _compute(self) -> ir.Tensor:
        array = self._read(self.source)
        folded = affine.apply_factor(array, self.factor, np.dtype(self.dtype.numpy()),
                                     done=lambda: self._release(array))
        return ir.Tensor(folded, dtype=self.dtype)


def compose(weight: ir.TensorProtocol, factor: np.ndarray) -> tuple[ir.TensorProtocol, np.ndarray]:
    """The original source of ``weight`` and the factor that takes it to ``weight * factor``."""
    if isinstance(weight, FoldedTensor):
        return weight.source, weight.factor * factor
    return weight, factor
