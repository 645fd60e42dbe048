"""``--target``: what each planned fold does to the next step's precision.

Every tensor a plan writes (a folded weight, a new bias, an addend, a decomposed scale and
shift, a merged kernel) is measured against the tensor it replaces, by ``bnfold.precision``.
A weight is read block by block from where it lies (memory-mapped for external data), once,
after planning has read it for its overflow check; the figures of a big model cost a
bounded amount of memory, and nothing at all without a target (``FoldOptions.targets``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from bnfold import affine
from bnfold.folded import FoldedTensor, MergedTensor
from bnfold.merge import Merge
from bnfold.patterns import describe
from bnfold.plan import BiasEdit, Fold, WeightEdit, release_pages, weight_array
from bnfold.precision import Precision, scan_weight, vector_figures, weight_figures


def assess(plan: Fold | Merge, targets: Sequence[str]) -> Precision:
    """The precision block of a planned fold or merge: each tensor's figures and problems."""
    precision = Precision(list(targets))
    if isinstance(plan, Merge):
        _merged(plan, targets, precision)
        return precision
    node = plan.site.node
    if plan.direction == "decompose":
        for role, values in zip(("scale", "shift"), plan.decomposed):
            _add(precision, vector_figures(role, None, values, targets, tensor="", node=node.name, op=node.op_type,
                                           index=None, where=describe(node)))
        return precision
    for part in plan.parts:
        _weight(precision, part.weight, targets)
        if part.bias is not None:
            _bias(precision, part.bias, targets)
    if plan.addend is not None:
        _add(precision, vector_figures("addend", None, plan.addend, targets, tensor="", node=node.name,
                                       op=node.op_type, index=None, where=f"the Add before {describe(node)}"))
    return precision


def _add(precision: Precision, measured) -> None:
    figures, problems = measured
    precision.tensors.append(figures)
    precision.problems += problems


def _weight(precision: Precision, edit: WeightEdit, targets: Sequence[str]) -> None:
    array = weight_array(edit.source)
    views = scan_weight(array, [edit.prior, edit.factor], edit.peak, edit.out_axis, targets,
                        done=lambda: release_pages(array))
    _add(precision, weight_figures(views, targets, edit.scaled_axes, edit.out_axis, tensor=edit.name,
                                   node=edit.node.name, op=edit.node.op_type, index=edit.index,
                                   shape=list(edit.source.shape), scaled=edit.scaled, where=describe(edit.node)))


def _bias(precision: Precision, bias: BiasEdit, targets: Sequence[str]) -> None:
    node = bias.node if bias.node is not None else bias.after
    _add(precision, vector_figures("bias", bias.before, bias.values, targets, tensor=bias.name, node=node.name,
                                   op=node.op_type, index=bias.index, where=describe(node)))


def _merged(plan: Merge, targets: Sequence[str], precision: Precision) -> None:
    """The merged kernel against the kernel its conv had; the merged bias likewise."""
    conv = plan.into
    before = plan.weight_before
    source, factor = (before.source, before.factor) if isinstance(before, FoldedTensor) else (before, None)
    array = weight_array(source)
    ones = np.ones([1] * array.ndim)
    peak = affine.peak_by_factor(array, ones if factor is None else factor, done=lambda: release_pages(array),
                                 keep=(0,))
    (old,) = scan_weight(array, [factor], peak, 0, targets, done=lambda: release_pages(array))
    merged = _MergedRows(plan)
    peak = affine.peak_by_factor(merged, ones, keep=(0,))
    (new,) = scan_weight(merged, [None], peak, 0, targets)
    name = conv.inputs[1].name if conv.inputs[1] is not None else ""
    _add(precision, weight_figures([old, new], targets, (), 0, tensor=name, node=conv.name, op=conv.op_type,
                                   index=1, shape=list(plan.shape), scaled="output", where=describe(conv)))
    bias_name = conv.inputs[2].name if len(conv.inputs) > 2 and conv.inputs[2] is not None else ""
    _add(precision, vector_figures("bias", plan.bias_before, plan.bias, targets, tensor=bias_name, node=conv.name,
                                   op=conv.op_type, index=2, where=describe(conv)))


class _MergedRows:
    """The merged kernel, computed a block of output channels at a time as it is sliced
    (as the save computes it), for a scan that never holds all of it."""

    def __init__(self, plan: Merge):
        self.shape = plan.shape
        self.ndim = len(plan.shape)
        self.dtype = np.dtype(plan.dtype.numpy())
        self._tensor = MergedTensor(plan.shape, plan.dtype, list(plan.kernels), list(plan.diagonals), name="",
                                    read=weight_array, release=release_pages)

    def __getitem__(self, rows: slice) -> np.ndarray:
        start, stop, _ = rows.indices(self.shape[0])
        sources = [weight_array(source) for source, _, _ in self._tensor.kernels]
        block = self._tensor.rows(sources, start, stop).astype(self.dtype)
        for array in sources:
            release_pages(array)
        return block
