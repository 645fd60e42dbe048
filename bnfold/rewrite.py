"""Rewriting: apply a planned ``Fold`` to the analysis model through a few primitives.

Every change goes through ``Editor``; the one that matters is ``replace_value``: it moves
*every* use of a value — node inputs in every nested graph and the outputs of every graph
— to another value, which takes over the old one's name. Removing a BN after a Conv is
then "the Conv's output takes the BN output's name"; inserting a bias Add after a MatMul
is "the Add's output takes the MatMul output's name". No reader anywhere has to change,
which is what makes the edit exact in the protobuf the writer edits (``bnfold.writer``
derives node and list changes from this model; attribute and output-count changes are
recorded here).

New constants go to the graph of the node that reads them: initializers (also listed as
inputs in an IR < 4 main graph), or Constant nodes in function bodies and IR < 4 subgraphs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from bnfold import affine
from bnfold._onnx_ir import ir
from bnfold.constant_eval import Constants, is_evaluated_constant
from bnfold.folded import FoldedTensor, MergedTensor
from bnfold.ledger import STATUS_DECOMPOSED, STATUS_FOLDED, STATUS_KEPT, STATUS_MERGED, LedgerEntry
from bnfold.merge import Merge
from bnfold.patterns import describe
from bnfold.plan import BiasEdit, Fold, Keep, Scope, WeightEdit, release_pages, weight_array


@dataclass
class Editor:
    """Applies plans to one model; remembers what the writer cannot derive from it."""

    consts: Constants
    scopes: dict[ir.Graph, Scope]
    #: Attributes set (or removed: None) on nodes, in the order they were changed.
    attributes: dict[ir.Node, dict[str, ir.Attr | None]] = field(default_factory=dict)
    #: Nodes whose trailing outputs were dropped (a training-mode BN converted).
    truncated: set[ir.Node] = field(default_factory=set)
    #: Training-mode BNs converted to inference form: a BN kept in one pass and folded,
    #: merged or decomposed in a later one is planned as the inference BN it has become.
    converted: set[ir.Node] = field(default_factory=set)
    #: Nodes a fold inserted: never sites themselves.
    created: set[ir.Node] = field(default_factory=set)
    #: The linear ops each folded site went into, and where a merge moved each branch node.
    targets: dict[ir.Node, tuple[ir.Node, ...]] = field(default_factory=dict)
    merged: dict[ir.Node, ir.Node] = field(default_factory=dict)
    names: NameAllocator = field(init=False)

    def __post_init__(self):
        self.names = NameAllocator(self.scopes)

    # --- primitives ----------------------------------------------------------------

    def replace_value(self, old: ir.Value, new: ir.Value, *, skip: ir.Node | None = None, rename: bool = True) -> None:
        """Every use of ``old`` (but ``skip``'s) reads ``new``, which takes ``old``'s name
        (with ``rename``; without it, ``old`` must not be a graph output)."""
        for graph in self.consts.graphs:
            for i, output in enumerate(graph.outputs):
                if output is old:
                    graph.outputs[i] = new
        for node, index in list(old.uses()):
            if node is not skip:
                node.replace_input_with(index, new)
        self.consts.forget(old)
        if not rename:
            return
        name = old.name
        old.name = self.names.fresh(f"{name}_bnfold_pre")
        new.name = name
        if new.type is None:
            new.type = old.type
        if new.shape is None:
            new.shape = old.shape

    def constant(self, reader: ir.Node, base: str, tensor: ir.TensorProtocol) -> ir.Value:
        """A fresh constant in the graph of ``reader`` (inserted before it if it is a node)."""
        scope = self.scopes[reader.graph]
        name = self.names.fresh(base)
        tensor.name = name
        if scope.in_function or (scope.old_ir and not scope.is_main):
            node = self.node("Constant", [], name, attributes=[ir.AttrTensor("value", tensor)])
            scope.graph.insert_before(reader, node)
            return node.outputs[0]
        value = ir.Value(name=name, const_value=tensor, type=ir.TensorType(tensor.dtype), shape=ir.Shape(tensor.shape))
        scope.graph.register_initializer(value)
        if scope.old_ir:  # IR < 4: every main-graph initializer is an input too
            scope.graph.inputs.append(value)
        return value

    def node(self, op: str, inputs: list[ir.Value], output: str, attributes=()) -> ir.Node:
        """A new standard-domain node with one output (the caller inserts it)."""
        node = ir.Node("", op, inputs, attributes=list(attributes), outputs=[ir.Value(name=output)])
        self.created.add(node)
        return node

    def set_attribute(self, node: ir.Node, attr: ir.Attr) -> None:
        node.attributes[attr.name] = attr
        self.attributes.setdefault(node, {})[attr.name] = attr

    def remove_attribute(self, node: ir.Node, name: str) -> None:
        if name in node.attributes:
            node.attributes.pop(name)
            self.attributes.setdefault(node, {})[name] = None

    def remove_node(self, node: ir.Node) -> None:
        """Remove ``node`` (its outputs must be unused) and the parameters only it used."""
        inputs = list(node.inputs)
        node.graph.remove(node, safe=True)
        self.drop_unused(inputs)

    def drop_unused(self, values) -> None:
        """Remove initializers and constant subgraphs that nothing reads any more (no recursion)."""
        pending = [v for v in values if v is not None]
        while pending:
            value = pending.pop()
            if value.uses() or self.consts.is_output(value):
                continue
            if value.is_initializer():
                owner = value.graph
                if value.is_graph_input():
                    owner.inputs.remove(value)
                owner.initializers.pop(value.name)
                continue
            producer = value.producer()
            if producer is not None and is_evaluated_constant(producer) and not any(
                    v.uses() or self.consts.is_output(v) for v in producer.outputs):
                pending.extend(v for v in producer.inputs if v is not None)
                producer.graph.remove(producer, safe=True)

    def add_after(self, node: ir.Node, addend: np.ndarray, base: str) -> None:
        """``node``'s output plus ``addend``, read by everything that read the output."""
        out = node.outputs[0]
        add = self.node("Add", [out], self.names.fresh(f"{base}_bnfold_add"))
        node.graph.insert_after(node, add)
        add.resize_inputs(2)
        add.replace_input_with(1, self.constant(add, f"{base}_bnfold_shift", ir.tensor(addend)))
        self.replace_value(out, add.outputs[0], skip=add)

    # --- applying plans ----------------------------------------------------------------

    def apply(self, plan: Fold | Merge | Keep) -> LedgerEntry:
        if plan.convert:
            self.convert_to_inference(plan.site.node, plan.site.scope.opset)
        if isinstance(plan, Keep):
            return self._entry(plan, STATUS_KEPT, reason=plan.reason, detail=plan.detail, channels=plan.channels)
        if isinstance(plan, Merge):
            return self._merge(plan)
        if plan.direction == "decompose":
            return self._decompose(plan)
        site = plan.site.node
        old_weights = []
        for part in plan.parts:
            old_weights.append(self._fold_weight(part.weight))
            if part.bias is not None:
                self._set_bias(part.bias, site.name or "site")
        if plan.addend is not None:  # padded Conv after the BN: x + t/s stays
            base = site.name or "bn"
            add = self.node("Add", [site.inputs[plan.site.data_index]], self.names.fresh(f"{base}_bnfold_add"))
            site.graph.insert_before(site, add)
            add.resize_inputs(2)
            add.replace_input_with(1, self.constant(add, f"{base}_bnfold_shift", ir.tensor(plan.addend)))
            self.replace_value(site.outputs[0], add.outputs[0])
        elif plan.direction == "after":
            self._bypass(site, site.inputs[plan.site.data_index])
        else:  # the consumer reads the BN's input, which keeps its name and its other readers
            self.replace_value(site.outputs[0], site.inputs[plan.site.data_index], rename=False)
        self.remove_node(site)
        # Judged once the fold is complete: a reader of the old weight that the fold itself
        # removed (a Shape in the old bias's constant subgraph, as dynamo exports) shares nothing.
        cloned = any(old.uses() or self.consts.is_output(old) for old in old_weights)
        details = [plan.detail, "converted from training mode" if site in self.converted else "",
                   "shared weight cloned" if cloned else ""]
        return self._entry(plan, STATUS_FOLDED, pattern=plan.pattern, into=", ".join(n.name for n in plan.into),
                           into_op=", ".join(dict.fromkeys(n.op_type for n in plan.into)), route=plan.route,
                           weight_cloned=cloned,
                           detail="; ".join(d for d in details if d), channels=plan.channels,
                           channel_axis=plan.channel_axis, max_rel_weight_change=affine.max_relative_change(plan.scale))

    def _bypass(self, site: ir.Node, data: ir.Value) -> None:
        """The site's output is replaced by its data input (same graph), or by an Identity of it
        (the producer lies in an enclosing graph, whose values the site's graph may only read)."""
        producer = data.producer()
        if producer is not None and producer.graph is site.graph:
            self.replace_value(site.outputs[0], data)
            return
        identity = self.node("Identity", [data], self.names.fresh("bnfold_identity"))
        site.graph.insert_before(site, identity)
        self.replace_value(site.outputs[0], identity.outputs[0])

    def _fold_weight(self, edit: WeightEdit) -> ir.Value:
        """Point the node at a folded copy of its weight; the old weight goes once nothing reads it."""
        old = edit.node.inputs[edit.index]
        folded = FoldedTensor(edit.source, edit.factor, name="", read=weight_array, release=release_pages)
        edit.node.replace_input_with(edit.index, self.constant(edit.node, f"{old.name}_bnfold", folded))
        self.drop_unused([old])
        return old

    def _set_bias(self, bias: BiasEdit, base: str) -> None:
        if bias.node is None:
            self.add_after(bias.after, bias.values, base)
            return
        node, index = bias.node, bias.index
        old = node.inputs[index] if index < len(node.inputs) else None
        if index >= len(node.inputs):
            node.resize_inputs(index + 1)
        base = old.name if old is not None else f"{node.name or node.op_type}_bias"
        node.replace_input_with(index, self.constant(node, f"{base}_bnfold", ir.tensor(bias.values)))
        if bias.reset_beta:
            self.set_attribute(node, ir.AttrFloat32("beta", 1.0))
        self.drop_unused([old])

    def _merge(self, plan: Merge) -> LedgerEntry:
        """The branch conv ``plan.into`` takes the merged kernel and bias and the sum's place;
        every other node of the branches goes."""
        conv, root = plan.into, plan.site.node
        old_weight = conv.inputs[1]
        merged = MergedTensor(plan.shape, plan.dtype, list(plan.kernels), list(plan.diagonals), name="",
                              read=weight_array, release=release_pages)
        conv.replace_input_with(1, self.constant(conv, f"{old_weight.name}_bnfold_merged", merged))
        old_bias = conv.inputs[2] if len(conv.inputs) > 2 else None
        if len(conv.inputs) < 3:
            conv.resize_inputs(3)
        base = old_bias.name if old_bias is not None else f"{conv.name or 'conv'}_bias"
        conv.replace_input_with(2, self.constant(conv, f"{base}_bnfold_merged", ir.tensor(plan.bias)))
        self.replace_value(root.outputs[0], conv.outputs[0])
        pending = list(plan.nodes)
        while pending:  # from the sum down: each node goes once nothing reads it
            dead = [n for n in pending if not any(v.uses() or self.consts.is_output(v) for v in n.outputs
                                                  if v is not None)]
            if not dead:
                break
            for node in dead:
                if node.graph is not None:  # not already pruned with an unused input (an Identity branch)
                    self.remove_node(node)
                pending.remove(node)
        self.drop_unused([old_weight, old_bias])
        return self._entry(plan, STATUS_MERGED, pattern=plan.pattern, into=conv.name, into_op=conv.op_type,
                           detail=plan.detail, channels=plan.channels)

    def absorbed(self, plan: Merge, bn: ir.Node) -> LedgerEntry:
        """The ledger entry of a BN that a merge folded into its conv."""
        return LedgerEntry(op=bn.op_type, node=bn.name, graph=plan.site.scope.label, status=STATUS_FOLDED,
                           pattern="merge", into=plan.into.name, into_op=plan.into.op_type,
                           route=f"one of the branches merged at {describe(plan.site.node)}",
                           converted_from_training=bn in self.converted)

    def _decompose(self, plan: Fold) -> LedgerEntry:
        """Replace a BN that has no linear neighbour by ``x * s + t``."""
        bn = plan.site.node
        base = bn.name or "bn"
        scale, shift = plan.decomposed
        mul = self.node("Mul", [bn.inputs[0]], self.names.fresh(f"{base}_bnfold_mul"))
        bn.graph.insert_before(bn, mul)
        mul.resize_inputs(2)
        mul.replace_input_with(1, self.constant(mul, f"{base}_bnfold_scale", ir.tensor(scale)))
        add = self.node("Add", [mul.outputs[0]], self.names.fresh(f"{base}_bnfold_add"))
        bn.graph.insert_before(bn, add)
        add.resize_inputs(2)
        add.replace_input_with(1, self.constant(add, f"{base}_bnfold_shift", ir.tensor(shift)))
        self.replace_value(bn.outputs[0], add.outputs[0])
        self.remove_node(bn)
        return self._entry(plan, STATUS_DECOMPOSED, pattern=plan.pattern, reason="no-linear-producer",
                           detail=plan.detail, channels=plan.channels, channel_axis=plan.channel_axis)

    def convert_to_inference(self, bn: ir.Node, opset: int) -> None:
        """Make a training-mode BN an inference BN (planning checked its extra outputs are unused)."""
        self.converted.add(bn)
        if len(bn.outputs) > 1:
            bn.resize_outputs(1)
            self.truncated.add(bn)
        self.remove_attribute(bn, "training_mode")
        if (bn.version or opset) == 6:
            self.set_attribute(bn, ir.AttrInt64("is_test", 1))

    def _entry(self, plan: Fold | Merge | Keep, status: str, **fields) -> LedgerEntry:
        node = plan.site.node
        return LedgerEntry(op=node.op_type, node=node.name, graph=plan.site.scope.label, status=status,
                           converted_from_training=node in self.converted, **fields)


class NameAllocator:
    """Unique value names across the whole model, for the values a fold creates."""

    def __init__(self, scopes: dict[ir.Graph, Scope]):
        self.taken: set[str] = set()
        for graph in scopes:
            self.taken.update(v.name for v in graph.inputs if v.name)
            self.taken.update(graph.initializers)
            for node in graph:
                self.taken.update(v.name for v in node.outputs if v is not None and v.name)
                self.taken.update(v.name for v in node.inputs if v is not None and v.name)

    def fresh(self, base: str) -> str:
        name, counter = base, 1
        while name in self.taken:
            counter += 1
            name = f"{base}_{counter}"
        self.taken.add(name)
        return name
