"""The output is the input's own protobuf with only the folded parts edited.

``apply_edits`` carries the rewrite of the analysis model over to the original
ModelProto: node lists of the graphs that changed (removed and inserted nodes, in the
analysis model's order), the inputs and outputs of nodes whose names changed, the
attributes the rewrite set, initializers and inputs that appeared or went, and the
value_info of values that no longer exist. Nothing else is touched, so whatever bnfold
does not understand (training_info, sparse tensors, unknown fields, metadata, doc strings)
is carried through as it was.

``save`` then lays out the file: tensor data is copied file to file (large weights left in
the input file at load, external data), computed for folded weights, or left where it is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import onnx

from bnfold._onnx_ir import ir
from bnfold.folded import FoldedTensor
from bnfold.source import Source


@dataclass
class Edited:
    """The edited proto and the data of the tensors it names but does not hold."""

    proto: onnx.ModelProto
    source: Source
    #: Folded weights by (unique) name: their TensorProtos are data-less placeholders.
    folded: dict[str, ir.LazyTensor]
    #: Whether the input stored any tensor as external data (decided before the edits).
    input_external: bool = False


def apply_edits(source: Source, attributes: dict, truncated: set, input_external: bool) -> Edited:
    """Carry the analysis model's state over to ``source.proto`` (edited in place)."""
    folded: dict[str, ir.LazyTensor] = {}
    for graph in _post_order(source.model):
        _edit_graph(graph, source.graph_protos[graph], source, attributes, truncated, folded)
    return Edited(source.proto, source, folded, input_external)


def _post_order(model: ir.Model) -> list[ir.Graph]:
    """Nested graphs before the graphs holding them: rebuilding a node list copies its nodes."""
    order: list[ir.Graph] = []

    def visit(graph: ir.Graph) -> None:
        stack = [(graph, False)]
        while stack:
            current, done = stack.pop()
            if done:
                order.append(current)
                continue
            stack.append((current, True))
            for node in current:
                for attr in node.attributes.values():
                    if attr.is_ref():
                        continue
                    if attr.type == ir.AttributeType.GRAPH:
                        stack.append((attr.value, False))
                    elif attr.type == ir.AttributeType.GRAPHS:
                        stack.extend((sub, False) for sub in attr.value)

    visit(model.graph)
    for function in model.functions.values():
        visit(function.graph)
    return order


def _edit_graph(graph: ir.Graph, graph_proto, source: Source, attributes: dict, truncated: set,
                folded: dict) -> None:
    is_function = isinstance(graph_proto, onnx.FunctionProto)
    before = _defined_names(graph_proto, is_function)
    originals = list(graph_proto.node)
    nodes = []
    for node in graph:
        node_proto = source.node_protos.get(node)
        if node_proto is None:
            node_proto = ir.serde.serialize_node(node)
        else:
            _sync_node(node, node_proto, attributes.get(node), node in truncated)
        nodes.append(node_proto)
    changed = len(nodes) != len(originals) or any(a is not b for a, b in zip(nodes, originals))
    if changed:
        copies = [copy_message(n) for n in nodes]
        del graph_proto.node[:]
        graph_proto.node.extend(copies)
    if not is_function:
        changed |= _edit_initializers(graph, graph_proto, folded)
        changed |= _edit_inputs(graph, graph_proto, source.opaque_inputs)
    if changed:
        after = _defined_names(graph_proto, is_function)
        gone = before - after
        if gone and any(v.name in gone for v in graph_proto.value_info):
            kept = [copy_message(v) for v in graph_proto.value_info if v.name not in gone]
            del graph_proto.value_info[:]
            graph_proto.value_info.extend(kept)


def copy_message(message):
    """A copy of a protobuf message (a repeated field cannot hold the same message twice)."""
    copy = type(message)()
    copy.CopyFrom(message)
    return copy


def _sync_node(node: ir.Node, proto: onnx.NodeProto, attributes: dict | None, truncated: bool) -> None:
    """Input and output names from the analysis model where they differ; recorded attributes."""
    _sync_names(proto.input, [v.name if v is not None else "" for v in node.inputs])
    outputs = [v.name if v is not None else "" for v in node.outputs]
    if truncated:
        del proto.output[len(outputs):]
    _sync_names(proto.output, outputs)
    for name, attr in (attributes or {}).items():
        position = next((i for i, a in enumerate(proto.attribute) if a.name == name), None)
        if attr is None:
            if position is not None:
                del proto.attribute[position]
            continue
        new = ir.serde.serialize_attribute(attr)
        if position is None:
            proto.attribute.append(new)
        else:
            proto.attribute[position].CopyFrom(new)


def _sync_names(field, names: list[str]) -> None:
    current = list(field)
    padded = names + [""] * (len(current) - len(names))
    if padded == current:
        return  # trailing empty names the analysis model did not keep are not a change
    del field[:]
    field.extend(names)


def _defined_names(graph_proto, is_function: bool) -> set[str]:
    names = {name for node in graph_proto.node for name in node.output if name}
    names.update(graph_proto.input if is_function else (v.name for v in graph_proto.input))
    if not is_function:
        names.update(t.name for t in graph_proto.initializer)
        names.update(s.values.name for s in graph_proto.sparse_initializer)
    return names


def _edit_initializers(graph: ir.Graph, graph_proto: onnx.GraphProto, folded: dict) -> bool:
    present = {name for name, value in graph.initializers.items() if value.const_value is not None}
    known = {t.name for t in graph_proto.initializer}
    added = [_new_tensor(name, value.const_value, folded) for name, value in graph.initializers.items()
             if name not in known and value.const_value is not None]
    return _rebuild(graph_proto.initializer, present, added)


def _new_tensor(name: str, tensor: ir.TensorProtocol, folded: dict) -> onnx.TensorProto:
    """A tensor the fold made: a data-less placeholder for a folded weight, else serialized."""
    if isinstance(tensor, FoldedTensor):
        folded[name] = tensor
        return onnx.TensorProto(name=name, data_type=int(tensor.dtype), dims=list(tensor.shape.numpy()))
    proto = ir.serde.serialize_tensor(tensor)
    proto.name = name
    return proto


def _edit_inputs(graph: ir.Graph, graph_proto: onnx.GraphProto, opaque: set[str]) -> bool:
    known = {v.name for v in graph_proto.input}
    added = [ir.serde.serialize_value(v) for v in graph.inputs if v.name not in known and v.name not in opaque]
    return _rebuild(graph_proto.input, {v.name for v in graph.inputs}, added)


def _rebuild(field, present: set[str], added: list) -> bool:
    """Keep the messages of a repeated ``field`` whose names are in ``present`` (copies, in
    their order), then append ``added``; False, untouched, when nothing changes."""
    if not added and all(message.name in present for message in field):
        return False
    kept = [copy_message(message) for message in field if message.name in present]
    del field[:]
    field.extend(kept)
    field.extend(added)
    return True


# --- tensors of the output and where their data comes from ---------------------------


def all_tensors(proto: onnx.ModelProto):
    """Every TensorProto of the model, with its kind: "main" (a main-graph initializer, in
    order), "init" (a subgraph initializer), or "attribute" (node attributes, sparse parts)."""
    for tensor in proto.graph.initializer:
        yield tensor, "main"
    stack = [(proto.graph, True), *((f, False) for f in proto.functions)]
    for info in proto.training_info:
        stack.extend((graph, False) for graph in (info.initialization, info.algorithm))
    while stack:
        graph, is_main = stack.pop()
        if isinstance(graph, onnx.GraphProto):
            if not is_main:
                for tensor in graph.initializer:
                    yield tensor, "init"
            for sparse in graph.sparse_initializer:
                yield sparse.values, "attribute"
                yield sparse.indices, "attribute"
        for node in graph.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t, "attribute"
                yield from ((t, "attribute") for t in attr.tensors)
                if attr.HasField("sparse_tensor"):
                    yield attr.sparse_tensor.values, "attribute"
                    yield attr.sparse_tensor.indices, "attribute"
                for sparse in attr.sparse_tensors:
                    yield sparse.values, "attribute"
                    yield sparse.indices, "attribute"
                if attr.HasField("g"):
                    stack.append((attr.g, False))
                stack.extend((g, False) for g in attr.graphs)


def external_range(tensor: onnx.TensorProto, base_dir: Path | None) -> tuple[Path, int, int]:
    """Where an external tensor's bytes lie (load checked the location and range)."""
    info = {entry.key: entry.value for entry in tensor.external_data}
    if base_dir is None:
        raise ValueError(f"tensor {tensor.name!r} has external data but the model has no folder")
    offset = int(info.get("offset") or 0)
    length = info.get("length")
    return base_dir / info["location"], offset, int(length) if length else (tensor_nbytes(tensor) or 0)


def tensor_nbytes(tensor: onnx.TensorProto) -> int | None:
    """Bytes the tensor's data takes (sub-byte types packed); None for strings or unknown types."""
    try:
        bits = ir.DataType(tensor.data_type).bitwidth
    except (ValueError, TypeError):
        return None
    return -(-math.prod(tensor.dims) * bits // 8)


def set_external(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    """Point ``tensor`` at ``location``; other external_data keys (a checksum) stay as they were."""
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    values = {"location": location, "offset": str(offset), "length": str(length)}
    for entry in tensor.external_data:
        if entry.key in values:
            entry.value = values.pop(entry.key)
    for key in ("location", "offset", "length"):
        if key in values:
            tensor.external_data.add(key=key, value=values[key])


def set_inline(tensor: onnx.TensorProto, data: bytes | None) -> None:
    """Make ``tensor`` hold its data inline (None: a placeholder whose data is written later)."""
    tensor.ClearField("external_data")
    tensor.ClearField("data_location")
    if data is None:
        tensor.ClearField("raw_data")
    else:
        tensor.raw_data = data
