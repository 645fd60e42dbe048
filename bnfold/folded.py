"""Weights computed while saving: a folded weight (its source tensor times a per-channel
factor) and a merged conv kernel (branch kernels placed and summed).

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


class MergedTensor(ir.LazyTensor):
    """A merged conv kernel (``affine.merge_rows``): branch kernels, each its source times a
    factor, placed and summed in float64 with the identity and average-pool terms, cast
    once; computed while saving, a block of output channels at a time.

    Planning has already proved that the result is finite and fits the dtype.
    """

    def __init__(self, shape: tuple[int, ...], dtype: ir.DataType, kernels: list, diagonals: list, *, name: str,
                 read, release, block_elements: int = 1 << 20):
        self.kernels, self.diagonals = kernels, diagonals  # [(source, factor, offset)], [(m, offset, window)]
        super().__init__(self._compute, dtype=dtype, shape=ir.Shape(shape), name=name)
        self._read, self._release, self._block = read, release, block_elements

    def _compute(self) -> ir.Tensor:
        shape = tuple(self.shape.numpy())
        out = np.empty(shape, dtype=np.dtype(self.dtype.numpy()))
        sources = [self._read(source) for source, _, _ in self.kernels]
        rows = max(1, self._block // max(1, int(np.prod(shape[1:]))))
        for start in range(0, shape[0], rows):
            stop = min(shape[0], start + rows)
            out[start:stop] = self.rows(sources, start, stop)  # the one rounding
            for array in sources:
                self._release(array)
        return ir.Tensor(out, dtype=self.dtype)

    def rows(self, sources: list[np.ndarray], start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` (output channels) of the merged kernel, in float64, from the
        branch kernels' arrays ``sources``."""
        kernels = [(np.asarray(array[start:stop], dtype=np.float64) * _rows(factor, start, stop), offset)
                   for array, (_, factor, offset) in zip(sources, self.kernels)]
        diagonals = [(multiplier[start:stop], offset, window) for multiplier, offset, window in self.diagonals]
        return affine.merge_rows(tuple(self.shape.numpy()), start, stop, kernels, diagonals)


def _rows(factor: np.ndarray, start: int, stop: int) -> np.ndarray:
    return factor if factor.shape[0] == 1 else factor[start:stop]
