"""A loaded model as two views: the original protobuf, and an onnx_ir copy for analysis.

bnfold's output is the input's own ModelProto with only the folded parts edited, so that
everything it does not understand (training_info, sparse tensors, unknown fields, field
order, duplicate metadata keys) comes out exactly as it went in. onnx_ir serves analysis
only. ``Source`` holds both and the links between them: each analysed node and graph
knows the NodeProto and GraphProto/FunctionProto it came from.

What onnx_ir cannot represent is left out of the analysis copy, never out of the proto:
a ``Constant(sparse_value=...)`` becomes an opaque node (its output is not a constant),
SPARSE_TENSOR attributes are dropped, a sparse initializer becomes an opaque graph input
of the copy, and map/opaque types (ZipMap outputs, TypeProto attributes) lose their type
there. None of them can take part in a fold.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import onnx

from bnfold._onnx_ir import ir
from bnfold.standard import DEFAULT_DOMAINS

#: Domain of the stand-in for nodes whose content onnx_ir cannot hold.
OPAQUE_DOMAIN = "bnfold.opaque"
_SPARSE_ATTRIBUTES = (onnx.AttributeProto.SPARSE_TENSOR, onnx.AttributeProto.SPARSE_TENSORS)
_TYPE_ATTRIBUTES = (onnx.AttributeProto.TYPE_PROTO, onnx.AttributeProto.TYPE_PROTOS)

#: A large main-graph initializer whose raw_data stayed in the model file: (offset, length).
Span = tuple[int, int]


@dataclass
class Source:
    """The original proto (private to bnfold: edits are applied to it), the analysis model,
    and how they correspond."""

    proto: onnx.ModelProto
    model: ir.Model
    #: The model file, or None for a model given in memory.
    path: Path | None = None
    #: Main-graph initializers cut out of the proto at load, by name.
    spans: dict[str, Span] = field(default_factory=dict)
    node_protos: dict[ir.Node, onnx.NodeProto] = field(default_factory=dict)
    graph_protos: dict[ir.Graph, onnx.GraphProto | onnx.FunctionProto] = field(default_factory=dict)
    #: Names of graph inputs that exist only in the analysis copy (sparse initializers).
    opaque_inputs: set[str] = field(default_factory=set)
    #: For a model given in memory: the folder its external data is relative to.
    base: Path | None = None

    @property
    def base_dir(self) -> Path | None:
        """The folder external-data locations are relative to."""
        return self.base if self.path is None else self.path.resolve().parent


def analysis_copy(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, set[str]]:
    """``proto`` itself when onnx_ir can read it whole, else a copy without the parts it
    cannot (see the module docstring); also the names of the stand-in graph inputs."""
    if not _needs_sanitizing(proto):
        return proto, set()
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    opaque: set[str] = set()
    for graph in all_graphs(copy):
        if isinstance(graph, onnx.GraphProto):
            for sparse in graph.sparse_initializer:
                name = sparse.values.name
                opaque.add(name)
                graph.input.append(onnx.ValueInfoProto(name=name))
            del graph.sparse_initializer[:]
        for info in _value_infos(graph):
            if _unreadable_type(info.type):
                info.ClearField("type")
        for node in graph.node:
            if node.op_type == "Constant" and node.domain in DEFAULT_DOMAINS and any(
                    a.type in _SPARSE_ATTRIBUTES or a.name == "sparse_value" for a in node.attribute):
                node.domain = OPAQUE_DOMAIN
            kept = [a for a in node.attribute if not _unreadable_attribute(a)]
            if len(kept) != len(node.attribute):
                del node.attribute[:]
                node.attribute.extend(kept)
    return copy, opaque


def _needs_sanitizing(proto: onnx.ModelProto) -> bool:
    for graph in all_graphs(proto):
        if isinstance(graph, onnx.GraphProto) and len(graph.sparse_initializer):
            return True
        if any(_unreadable_type(info.type) for info in _value_infos(graph)):
            return True
        for node in graph.node:
            if any(_unreadable_attribute(a) for a in node.attribute):
                return True
    return False


def _value_infos(graph):
    if isinstance(graph, onnx.GraphProto):
        yield from graph.input
        yield from graph.output
    yield from graph.value_info


def _unreadable_attribute(attr: onnx.AttributeProto) -> bool:
    if attr.type in _SPARSE_ATTRIBUTES or attr.name == "sparse_value":
        return True
    if attr.type in _TYPE_ATTRIBUTES:
        return any(_unreadable_type(t) for t in [attr.tp, *attr.type_protos])
    return False


def _unreadable_type(type_proto: onnx.TypeProto) -> bool:
    """Map and opaque types, at any depth: onnx_ir has no representation for them."""
    while True:
        kind = type_proto.WhichOneof("value")
        if kind in ("map_type", "opaque_type"):
            return True
        if kind == "sequence_type":
            type_proto = type_proto.sequence_type.elem_type
        elif kind == "optional_type":
            type_proto = type_proto.optional_type.elem_type
        else:
            return False


def all_graphs(proto: onnx.ModelProto):
    """Every GraphProto (main and nested) and FunctionProto of the model."""
    stack: list = [proto.graph, *proto.functions]
    while stack:
        graph = stack.pop()
        yield graph
        for node in graph.node:
            for attr in node.attribute:
                if attr.HasField("g"):
                    stack.append(attr.g)
                stack.extend(attr.graphs)


def link(model: ir.Model, proto: onnx.ModelProto) -> tuple[dict, dict]:
    """Map every analysed node and graph to the proto it was read from (same order)."""
    nodes: dict[ir.Node, onnx.NodeProto] = {}
    graphs: dict[ir.Graph, onnx.GraphProto | onnx.FunctionProto] = {}
    pairs = [(model.graph, proto.graph)]
    functions = {(f.domain, f.name, getattr(f, "overload", "")): f for f in proto.functions}
    for key, function in model.functions.items():
        pairs.append((function.graph, functions[key]))
    while pairs:
        graph, graph_proto = pairs.pop()
        graphs[graph] = graph_proto
        ir_nodes = list(graph)
        if len(ir_nodes) != len(graph_proto.node):
            raise AssertionError("onnx_ir changed the number of nodes of a graph")
        for node, node_proto in zip(ir_nodes, graph_proto.node):
            nodes[node] = node_proto
            by_name = {a.name: a for a in node_proto.attribute}
            for attr in node.attributes.values():
                if attr.is_ref():
                    continue
                if attr.type == ir.AttributeType.GRAPH:
                    pairs.append((attr.value, by_name[attr.name].g))
                elif attr.type == ir.AttributeType.GRAPHS:
                    pairs.extend(zip(attr.value, by_name[attr.name].graphs))
    return nodes, graphs
