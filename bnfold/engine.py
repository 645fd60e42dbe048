"""``fold``: plan every affine site in graph order, rewrite each planned fold, and keep
the edited protobuf for saving.

Sites are planned one at a time on the model as rewritten so far, so chains fold one map
at a time (``Conv -> BN -> BN``, ``MatMul -> Add -> Mul -> Add``). ``inspect`` runs the
same loop (``run``) without saving, so it reports exactly what ``fold`` does.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass

import onnx

from bnfold._onnx_ir import ir
from bnfold.constant_eval import Constants
from bnfold.errors import InputError
from bnfold.health import bn_problems
from bnfold.ledger import Ledger, LedgerEntry
from bnfold.load import as_source, has_external_data
from bnfold.merge import Merge, is_sum, plan_merge
from bnfold.plan import Context, Fold, FoldOptions, Site, as_site_of, iter_scopes, plan_site
from bnfold.rewrite import Editor
from bnfold.save import EditedModel
from bnfold.source import Source, all_graphs
from bnfold.writer import Edited, apply_edits

__all__ = ["FoldOptions", "FoldResult", "fold", "run"]


@dataclass
class FoldResult(EditedModel):
    """The folded model (analysis view), the ledger that explains every site, and the
    edited protobuf that ``save`` writes."""

    model: ir.Model
    ledger: Ledger
    edited: Edited
    external_data: bool = False
    #: Node counts by op type that the fold changed: op -> (before, after), every graph.
    op_changes: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)


def fold(model: Source | ir.Model | onnx.ModelProto | str | os.PathLike, options: FoldOptions = FoldOptions(),
         **flags) -> FoldResult:
    """Fold every legal affine site. A path is loaded; a ModelProto or onnx_ir Model is
    copied first, so what is given is never changed.

    ``flags`` are FoldOptions fields, for convenience: ``fold(path, to_inference=True)``.
    """
    if flags:
        options = FoldOptions(**{**options.__dict__, **flags})
    source = as_source(model)
    external = has_external_data(source)
    before = op_counts(source.proto)
    editor, ledger = run(source, options)
    edited = apply_edits(source, editor.attributes, editor.truncated, external)
    after = op_counts(edited.proto)
    changes = {op: (before.get(op, 0), after.get(op, 0)) for op in sorted(set(before) | set(after))
               if before.get(op, 0) != after.get(op, 0)}
    return FoldResult(model=source.model, ledger=ledger, edited=edited, external_data=external, op_changes=changes)


def op_counts(proto: onnx.ModelProto) -> dict[str, int]:
    """Nodes by op type in every graph of the model (main, subgraphs, functions)."""
    counts: dict[str, int] = {}
    for graph in all_graphs(proto):
        for node in graph.node:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def run(source: Source, options: FoldOptions = FoldOptions(),
        observe: Callable[[Site], None] | None = None) -> tuple[Editor, Ledger]:
    """Plan and rewrite every site of ``source.model`` in graph order, pass after pass
    until nothing more folds: a fold can open another (``BN -> BN -> Conv`` folds the
    second BN first; Keras' ``Mul -> Add -> MatMul`` the Add first). A site kept in one
    pass is planned again in the next; the ledger holds each site's final plan, in the
    order the sites were first met. ``observe(site)`` sees each site once, before any
    rewrite of it.
    """
    model = source.model
    resolve_function_attributes(model)
    scopes = list(iter_scopes(model))
    consts = Constants(model.ir_version, options.fold_overridable, graphs=[scope.graph for scope in scopes])
    editor = Editor(consts, {scope.graph: scope for scope in scopes})
    entries: dict[ir.Node, LedgerEntry] = {}
    seen: dict[ir.Node, tuple[str, list[tuple[str, str]]]] = {}
    # Decomposing is the last resort: only a BN that no pass could fold becomes Mul + Add.
    folding = Context(consts, dataclasses.replace(options, decompose_standalone=False))
    passes = [folding] + ([Context(consts, options)] if options.decompose_standalone else [])
    pending: list = []  # with targets: (entry, assess.Pending), put together once all is planned
    for context in passes:
        _passes(scopes, context, editor, entries, seen, observe, pending)
    for entry, measured in pending:
        entry.precision = measured.finish()
    unknown = sorted(options.keep - {node.name for node in seen})
    if unknown:
        raise InputError(f"--keep {unknown[0]}: no BatchNormalization or affine site has that name "
                         "(`bnfold inspect` lists them)")
    ledger = Ledger(targets=list(options.targets))
    for node in seen:
        if node in entries:
            _retarget(entries[node], editor.targets.get(node, ()), editor.merged)
            ledger.add(entries[node])
    return editor, ledger


def _retarget(entry: LedgerEntry, into: tuple, merged: dict) -> None:
    """A fold into a branch conv that a merge later absorbed now lives in the merged conv."""
    if not any(node in merged for node in into):
        return
    final = []
    for node in into:
        while node in merged:
            node = merged[node]
        final.append(node)
    final = list(dict.fromkeys(final))
    entry.into = ", ".join(n.name for n in final)
    entry.into_op = ", ".join(dict.fromkeys(n.op_type for n in final))


def _passes(scopes, context: Context, editor: Editor, entries: dict, seen: dict, observe, pending: list) -> None:
    """Plan and rewrite every site, pass after pass, until a pass folds nothing."""
    consts = context.consts
    changed = True
    while changed:
        changed = False
        for scope in scopes:
            for index, node in enumerate(list(scope.graph)):
                if node.graph is not scope.graph or node in editor.created:
                    continue  # removed by an earlier fold, or made by one
                site = as_site_of(node, scope, consts)
                if site is None and context.options.merge_branches and is_sum(node, consts):
                    site = Site(node, scope, merge=True)
                if site is None:
                    continue
                if node not in seen:
                    problems = bn_problems(node, scope.opset, consts) if site.is_bn else []
                    seen[node] = (_label(node, index), problems)
                    if observe is not None:
                        observe(site)
                plan = plan_merge(site, context) if site.merge else plan_site(site, context)
                if plan is None:
                    continue
                # With a target: names taken before the rewrite; figures once every site is planned.
                measured = None
                if context.options.targets and isinstance(plan, (Fold, Merge)):
                    from bnfold.assess import prepare

                    measured = prepare(plan, context.options.targets)
                entry = editor.apply(plan)
                if measured is not None:
                    pending.append((entry, measured))
                _record(entries, node, entry, seen)
                if isinstance(plan, Fold):
                    editor.targets[node] = plan.into
                if isinstance(plan, Merge):
                    for bn in plan.absorbed:
                        _record(entries, bn, editor.absorbed(plan, bn), seen)
                    editor.merged.update({n: plan.into for n in plan.nodes})
                changed |= isinstance(plan, (Fold, Merge))


def _record(entries: dict, node: ir.Node, entry: LedgerEntry, seen: dict) -> None:
    entry.label, problems = seen.get(node, (node.name, []))
    entry.problems = [code for code, _ in problems]
    entry.problem_details = [detail for _, detail in problems]
    entries[node] = entry


def _label(node: ir.Node, index: int) -> str:
    """A node's name, or what identifies an unnamed one: op, position, first output."""
    if node.name:
        return node.name
    output = node.outputs[0].name if node.outputs and node.outputs[0] is not None else ""
    return f"{node.op_type}#{index} -> {output!r}"


def resolve_function_attributes(model: ir.Model) -> None:
    """Give attribute references (``ref_attr_name``) in function bodies their value, where
    every call site of the function agrees on it, in the analysis model only.

    References whose call sites disagree, pass references themselves, or that no call
    gives stay as they are; planning keeps the sites that depend on them
    ("attribute-reference").
    """
    calls: dict[tuple, list[ir.Node]] = {}
    for graph in _every_graph(model):
        for node in graph:
            calls.setdefault((node.domain, node.op_type, node.overload), []).append(node)
    for key, function in model.functions.items():
        sites = calls.get(key, [])
        if not sites:
            continue
        for graph in _every_graph_of(function.graph):
            for node in graph:
                for attr in list(node.attributes.values()):
                    if attr.is_ref():
                        _resolve(node, attr, function, sites)


def _resolve(node: ir.Node, attr: ir.Attr, function: ir.Function, sites: list[ir.Node]) -> None:
    values = []
    for call in sites:
        given = call.attributes.get(attr.ref_attr_name)
        if given is None:
            given = function.attributes.get(attr.ref_attr_name)
            if given is not None and given.value is None:
                given = None
        if given is not None and given.is_ref():
            return
        values.append(given)
    keys = {None if v is None else ir.serde.serialize_attribute(ir.Attr("", v.type, v.value)).SerializeToString()
            for v in values}
    if len(keys) != 1:
        return
    value = values[0]
    if value is None:
        node.attributes.pop(attr.name)
    else:
        node.attributes[attr.name] = ir.Attr(attr.name, value.type, value.value)


def _every_graph(model: ir.Model):
    yield from _every_graph_of(model.graph)
    for function in model.functions.values():
        yield from _every_graph_of(function.graph)


def _every_graph_of(graph: ir.Graph):
    pending = [graph]
    while pending:
        current = pending.pop()
        yield current
        for node in current:
            for attr in node.attributes.values():
                if attr.is_ref():
                    continue
                if attr.type == ir.AttributeType.GRAPH:
                    pending.append(attr.value)
                elif attr.type == ir.AttributeType.GRAPHS:
                    pending.extend(attr.value)
