"""``--target``: what each planned fold does to the next step's precision.

Every tensor a plan writes (a folded weight, a new bias, an addend, a decomposed scale and
shift, a merged kernel) is measured against the tensor it replaces, by ``bnfold.precision``.
A folded weight is measured in the one pass planning reads it in anyway, to prove that the
folded weight fits its dtype (``plan._require_weight_fits``): block by block from where it
lies (memory-mapped for external data), so the figures cost a bounded amount of memory.
Without a target nothing is measured (``FoldOptions.targets``). A site's figures are put
together once the run has planned everything (``prepare``, then ``Pending.finish``), from
names taken while planning, before any rewrite renamed a value.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from bnfold.folded import FoldedTensor, MergedTensor
from bnfold.merge import Merge
from bnfold.patterns import describe
from bnfold.plan import BiasEdit, Fold, release_pages, weight_array
from bnfold.precision import Precision, measure_weight, vector_figures, weight_figures


@dataclass
class Pending:
    """A site's precision block, waiting for its weights' measurements."""

    targets: tuple[str, ...]
    parts: list[Callable[[], tuple]] = field(default_factory=list)

    def finish(self) -> Precision:
        precision = Precision(list(self.targets))
        for part in self.parts:
            figures, problems = part()
            precision.tensors.append(figures)
            precision.problems += problems
        return precision


def prepare(plan: Fold | Merge, targets: Sequence[str]) -> Pending:
    """What the precision block of a planned fold or merge needs, taken while planning (its
    folded weights were measured as planning read them)."""
    targets = tuple(targets)
    pending = Pending(targets)
    if isinstance(plan, Merge):
        _merged(plan, targets, pending)
        return pending
    node = plan.site.node
    where = describe(node)
    if plan.direction == "decompose":
        for role, values in zip(("scale", "shift"), plan.decomposed):
            pending.parts.append(lambda role=role, values=values: vector_figures(
                role, None, values, targets, tensor="", node=node.name, op=node.op_type, index=None, where=where))
        return pending
    for part in plan.parts:
        edit = part.weight
        pending.parts.append(lambda edit=edit: weight_figures(
            edit.measured, targets, edit.scaled_axes, edit.out_axis, tensor=edit.name, node=edit.node.name,
            op=edit.node.op_type, index=edit.index, shape=list(edit.source.shape), scaled=edit.scaled,
            where=edit.label))
        if part.bias is not None:
            pending.parts.append(lambda bias=part.bias: _bias(bias, targets))
    if plan.addend is not None:
        pending.parts.append(lambda: vector_figures("addend", None, plan.addend, targets, tensor="", node=node.name,
                                                    op=node.op_type, index=None, where=f"the Add before {where}"))
    return pending


def _bias(bias: BiasEdit, targets: Sequence[str]) -> tuple:
    node = bias.node if bias.node is not None else bias.after
    return vector_figures("bias", bias.before, bias.values, targets, tensor=bias.name, node=node.name,
                          op=node.op_type, index=bias.index, where=bias.label)


def _merged(plan: Merge, targets: tuple[str, ...], pending: Pending) -> None:
    """The merged kernel against the kernel its conv had; the merged bias likewise."""
    conv = plan.into
    weight_name, bias_name, where = plan.names
    before = plan.weight_before
    source, factor = (before.source, before.factor) if isinstance(before, FoldedTensor) else (before, None)
    array = weight_array(source)
    _, (old,) = measure_weight(array, [factor], 0, targets, done=lambda: release_pages(array))
    _, (new,) = measure_weight(_MergedRows(plan), [None], 0, targets)
    pending.parts.append(lambda: weight_figures(
        [old, new], targets, (), 0, tensor=weight_name, node=conv.name, op=conv.op_type,
        index=1, shape=list(plan.shape), scaled="output", where=where))
    pending.parts.append(lambda: vector_figures("bias", plan.bias_before, plan.bias, targets, tensor=bias_name,
                                                node=conv.name, op=conv.op_type, index=2, where=where))


class _MergedRows:
    """The merged kernel, computed a block of output channels at a time as it is sliced
    (as the save computes it), for a measurement that never holds all of it."""

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
