"""Lossless round trips: everything bnfold does not fold comes out exactly as it went in.

The guarantee (issue 18): for a model with nothing to fold, OUT equals IN as protos (and
as bytes where IN was written by ``onnx.save``); for a model with folds, OUT equals IN
outside the folded nodes and tensors. ``assert_same_outside`` states precisely what a
fold may change (see its docstring); everything else is compared as serialized protobuf
messages, unknown fields included (upb's ``==`` compares unknown fields too, but bytes
also show *where* two messages differ).

External data is compared by content: ``inline`` reads every external tensor into
``raw_data`` on both sides, and ``assert_external_kept`` checks that an untouched
external tensor stays external with its other keys (``checksum``) unchanged.

Models come from ``richgen`` (feature-rich, every ONNX message and field) and from small
builders below, one per regression of issue 18 (``test_issue18_<n>_...``). Every input
model passes ``onnx.checker.check_model(full_check=True)``, except where the full check
does not apply (a sparse initializer read by a standard op: the checker's shape
inference types it as a sparse tensor, which onnxruntime densifies and runs); models of
standard ops only are also run in onnxruntime before and after folding.
"""

from __future__ import annotations

import copy
import json
import math
import os
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as onh
import onnx_ir as ir
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bnfold
import richgen
from builders import run
from cli_runner import invoke
from richgen import FLOAT, add_unknown, set_props, sparse, with_doc

T = onnx.TensorProto
EXTERNAL_POSITION_KEYS = ("location", "offset", "length")
#: Nodes a fold may insert: the shift of a padded conv, a decomposed BN, a bias after a bare MatMul.
INSERTED_OPS = {"Add", "Mul"}
#: Nodes that compute constants and may be dropped once nothing reads them (bnfold.constant_eval).
CONSTANT_OPS = {"Constant", "Identity", "Cast", "Reshape", "Transpose", "Unsqueeze", "Squeeze", "ConstantOfShape",
                "Expand", "CastLike", "Shape"}
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ---------------------------------------------------------------------------------------
# reading models


def load(path: Path) -> onnx.ModelProto:
    return onnx.load(str(path), load_external_data=False)


def _nbytes(tensor: onnx.TensorProto) -> int:
    return -(-math.prod(tensor.dims) * ir.DataType(tensor.data_type).bitwidth // 8)


def all_tensors(model: onnx.ModelProto):
    """Every TensorProto of ``model``: initializers and attribute tensors of every graph
    (subgraphs, function bodies, training_info) and the parts of sparse tensors."""
    def graph_tensors(graph):
        yield from graph.initializer
        for sp in graph.sparse_initializer:
            yield sp.values
            yield sp.indices
        yield from node_tensors(graph.node)

    def node_tensors(nodes):
        for node in nodes:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors
                for sp in ([attr.sparse_tensor] if attr.HasField("sparse_tensor") else []) + list(attr.sparse_tensors):
                    yield sp.values
                    yield sp.indices
                for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    yield from graph_tensors(sub)

    yield from graph_tensors(model.graph)
    for function in model.functions:
        yield from node_tensors(function.node)
    for info in model.training_info:
        yield from graph_tensors(info.initialization)
        yield from graph_tensors(info.algorithm)


def external_bytes(tensor: onnx.TensorProto, base: Path) -> bytes:
    info = {e.key: e.value for e in tensor.external_data}
    offset = int(info.get("offset") or 0)
    length = int(info["length"]) if info.get("length") else _nbytes(tensor)
    assert (base / info["location"]).is_file(), (
        f"tensor {tensor.name!r}: external data file {info['location']!r} does not exist beside the model ({base})")
    with open(base / info["location"], "rb") as handle:
        handle.seek(offset)
        data = handle.read(length)
    assert len(data) == length, f"tensor {tensor.name!r}: external data ends early"
    return data


def inline(model: onnx.ModelProto, base: Path, strip_default_location: bool = False) -> onnx.ModelProto:
    """A copy with every external tensor's bytes read into raw_data (its external_data
    entries and data_location cleared). ``strip_default_location`` also clears an explicit
    ``data_location: DEFAULT``, which a writer may set or not when it embeds external data."""
    model = copy.deepcopy(model)
    for tensor in all_tensors(model):
        if tensor.data_location == T.EXTERNAL:
            tensor.raw_data = external_bytes(tensor, base)
            del tensor.external_data[:]
            tensor.ClearField("data_location")
        elif strip_default_location and tensor.HasField("data_location"):
            tensor.ClearField("data_location")
    return model


def external_keys(model: onnx.ModelProto) -> dict[str, tuple[bool, list[tuple[str, str]]]]:
    """name -> (stored externally, its external_data entries other than location/offset/length),
    for tensors whose name is unique in the model."""
    seen: dict[str, list] = defaultdict(list)
    for tensor in all_tensors(model):
        if tensor.name:
            extra = [(e.key, e.value) for e in tensor.external_data if e.key not in EXTERNAL_POSITION_KEYS]
            seen[tensor.name].append((tensor.data_location == T.EXTERNAL, extra))
    return {name: found[0] for name, found in seen.items() if len(found) == 1}


def data_files(model: onnx.ModelProto, base: Path) -> set[Path]:
    return {(base / e.value).resolve() for t in all_tensors(model) if t.data_location == T.EXTERNAL
            for e in t.external_data if e.key == "location"}


# ---------------------------------------------------------------------------------------
# the ledger


def entries_of(ledger) -> list[dict]:
    """Ledger entries as dicts, from a Ledger, a list of LedgerEntry, or a --json report."""
    if isinstance(ledger, dict):
        return list(ledger["entries"])
    return [e if isinstance(e, dict) else e.to_dict() for e in ledger]


def changes(ledger) -> list[dict]:
    return [e for e in entries_of(ledger) if e["status"] in ("folded", "decomposed", "merged")]


#: What the branches of a merge are made of (bnfold.merge): they go with the sum.
MERGED_OPS = {"Conv", "BatchNormalization", "Mul", "Div", "Add", "Sub", "Sum", "Neg", "Identity", "Dropout",
              "AveragePool"}


# ---------------------------------------------------------------------------------------
# comparing


def _bytes(message) -> bytes:
    return message.SerializeToString(deterministic=True)


def _without(message, *names):
    clone = type(message)()
    clone.CopyFrom(message)
    for name in names:
        clone.ClearField(name)
    return clone


def _same(a, b, what: str) -> None:
    # Each caller asserts on its own line, so hypothesis tells apart differences found in
    # different places (it keys distinct failures by where they are raised).
    assert _bytes(a) == _bytes(b), _differs(a, b, what)


def _differs(a, b, what: str) -> str:
    return f"{what} differs:\n--- IN\n{_show(a)}\n--- OUT\n{_show(b)}"


def _show(message, limit: int = 3000) -> str:
    text = str(message)
    unknown = message.SerializeToString()[-200:]
    text = text if len(text) <= limit else text[:limit] + "\n... (truncated)"
    return f"{text}\n(serialized tail: {unknown!r})"


def _subgraph_attrs(node):
    """(attribute index, label suffix, graph) of every subgraph a node holds."""
    for index, attr in enumerate(node.attribute):
        if attr.HasField("g"):
            yield index, attr.name, attr.g
        for i, graph in enumerate(attr.graphs):
            yield index, f"{attr.name}[{i}]", graph


def _stripped(node) -> onnx.NodeProto:
    """The node with its subgraphs' contents taken out (they are compared on their own)."""
    clone = _without(node)
    for attr in clone.attribute:
        if attr.HasField("g"):
            attr.g.CopyFrom(onnx.GraphProto())
        for graph in attr.graphs:
            graph.CopyFrom(onnx.GraphProto())
    return clone


def _names(model: onnx.ModelProto) -> tuple[set[str], set[str]]:
    """(every value name anywhere in the model, every name something reads: node inputs,
    graph and function outputs, training bindings)."""
    defined, read = set(), set()

    def graph(g):
        for vi in list(g.input) + list(g.output) + list(g.value_info):
            defined.add(vi.name)
        read.update(vi.name for vi in g.output)
        defined.update(t.name for t in g.initializer)
        defined.update(sp.values.name for sp in g.sparse_initializer)
        nodes(g.node)

    def nodes(ns):
        for node in ns:
            defined.update(node.input)
            defined.update(node.output)
            read.update(node.input)
            for _, _, sub in _subgraph_attrs(node):
                graph(sub)

    graph(model.graph)
    for function in model.functions:
        defined.update(function.input)
        defined.update(function.output)
        read.update(function.output)
        nodes(function.node)
    for info in model.training_info:
        graph(info.initialization)
        graph(info.algorithm)
        for binding in list(info.initialization_binding) + list(info.update_binding):
            read.update([binding.key, binding.value])
    return defined - {""}, read - {""}


def _reads_in_scope(nodes) -> set[str]:
    """Names read by these nodes and by every node of their subgraphs."""
    read = set()
    for node in nodes:
        read.update(node.input)
        for _, _, sub in _subgraph_attrs(node):
            read.update(_reads_in_scope(sub.node))
            read.update(vi.name for vi in sub.output)
    return read - {""}


class _Context:
    def __init__(self, in_model, out_model, ledger):
        self.in_names, self.in_reads = _names(in_model)
        self.out_names, self.out_reads = _names(out_model)
        self.by_graph: dict[str, list[dict]] = defaultdict(list)
        for entry in changes(ledger):
            self.by_graph[entry["graph"]].append(entry)
        self.visited: set[str] = set()


def assert_same_outside(in_model: onnx.ModelProto, out_model: onnx.ModelProto, ledger) -> None:
    """OUT equals IN except where the ledger's folds allow a change.

    Both models must have their external data inlined (``inline``). For each graph (main,
    subgraphs, function bodies; labelled as the ledger labels them) a fold may only:

    - remove its site nodes (the folded or decomposed BN / Mul / Add);
    - change the inputs of the node folded into (``into``) and of a node reading that
      node's output (a MatMul's bias Add, a layout op), to names new to the model or to
      a removed site's input; and a Gemm's ``beta``;
    - rename one output of a node to the output name of a removed site;
    - insert Add / Mul nodes (and Constant nodes in function bodies) with new names;
    - remove Constant-like nodes and initializers that only the changed nodes read;
    - add initializers with new names;
    - drop value_info entries of values that no longer exist.

    Everything else is compared byte for byte: model fields, opset imports, functions'
    signatures, training_info, every graph's name/doc_string/inputs/outputs/
    sparse_initializer/quantization_annotation/metadata_props, every other node and
    initializer (same relative order), every kept value_info entry (same order).
    """
    ctx = _Context(in_model, out_model, ledger)
    a, b = _without(in_model, "graph", "functions"), _without(out_model, "graph", "functions")
    assert _bytes(a) == _bytes(b), _differs(
        a, b, "the model's own fields (ir_version, opset_import, producer, metadata_props, training_info, ...)")
    _compare_scope(ctx, "main", in_model.graph, out_model.graph, kind="main", ir_lt4=in_model.ir_version < 4)
    assert len(in_model.functions) == len(out_model.functions), "the number of functions changed"
    for fin, fout in zip(in_model.functions, out_model.functions):
        _compare_scope(ctx, f"function {fin.domain}::{fin.name}", fin, fout, kind="function")
    unvisited = set(ctx.by_graph) - ctx.visited
    assert not unvisited, f"ledger entries name graphs the comparison never met: {sorted(unvisited)}"


def _compare_scope(ctx: _Context, label: str, gin, gout, kind: str, ir_lt4: bool = False) -> None:
    ctx.visited.add(label)
    local = ctx.by_graph.get(label, [])
    skip = ["node", "value_info"] + (["initializer"] if kind != "function" else [])
    if kind == "main" and ir_lt4:
        skip.append("input")
    a, b = _without(gin, *skip), _without(gout, *skip)
    assert _bytes(a) == _bytes(b), _differs(a, b, f"{label}: fields other than nodes/initializers/value_info")

    in_nodes, out_nodes = list(gin.node), list(gout.node)
    site_names = {e["node"] for e in local}
    sites = [n for n in in_nodes if n.name and n.name in site_names]
    assert len(sites) == len(site_names), f"{label}: ledger sites {sorted(site_names)} are not (uniquely named) nodes"
    into_names = {e["into"] for e in local if e.get("into")}
    intos = [n for n in in_nodes if n.name and n.name in into_names]
    site_outputs = {n.output[0] for n in sites}
    site_inputs = {name for n in sites for name in n.input if name}
    into_outputs = {name for n in intos for name in n.output if name}
    # Nodes whose inputs may change: the node folded into and the nodes reading its output.
    editable = {id(n) for n in intos} | {id(n) for n in in_nodes if set(n.input) & into_outputs}

    # Pair OUT nodes with IN nodes, in order.
    pairs, new_nodes, matched = [], [], set()
    position = 0
    for o in out_nodes:
        found = None
        for index in range(position, len(in_nodes)):
            i = in_nodes[index]
            if index in matched or (i.name, i.op_type, i.domain) != (o.name, o.op_type, o.domain):
                continue
            if i.name or _signature(i) == _signature(o):  # unnamed: the first alike
                found = index
                break
        if found is None:
            new_nodes.append(o)
        else:
            matched.add(found)
            position = found + 1
            pairs.append((in_nodes[found], o))

    in_node_names = {n.name for n in in_nodes if n.name}
    for o in new_nodes:
        allowed = INSERTED_OPS | ({"Constant"} if kind == "function" else set())
        assert local and o.op_type in allowed and o.domain in ("", "ai.onnx") and o.name not in in_node_names, (
            f"{label}: OUT has a node that is not in IN (or moved): {o.name or '(unnamed)'} {o.op_type}\n{_show(o)}")
        for name in o.output:
            assert name not in ctx.in_names or name in site_outputs | into_outputs, (
                f"{label}: inserted node {o.op_type} reuses {name!r}")

    removed = [n for index, n in enumerate(in_nodes) if index not in matched]
    removed_ids = {id(n) for n in removed}
    for n in sites:
        assert id(n) in removed_ids, f"{label}: folded site {n.name!r} is still in OUT"
    allowed_readers = removed_ids | {id(n) for n in intos} | editable
    merges = any(e["status"] == "merged" for e in local)
    for n in removed:
        if n.name in site_names:
            continue
        readers = [r for r in in_nodes if ({name for name in n.output if name} & _reads_in_scope([r]))]
        if merges and n.op_type in MERGED_OPS and readers and all(id(r) in removed_ids for r in readers):
            continue  # a branch of a merge: it went with the sum it fed
        assert local and n.op_type in CONSTANT_OPS and n.domain in ("", "ai.onnx"), (
            f"{label}: node {n.name or '(unnamed)'} ({n.op_type}) is missing from OUT\n{_show(n)}")
        assert readers and all(id(r) in allowed_readers for r in readers), (
            f"{label}: removed constant node {n.name!r} was read by nodes that were not folded")
        gone = {name for name in n.output if name} & ctx.out_reads
        assert not gone, f"{label}: removed node {n.name!r} produced {sorted(gone)}, which OUT still reads"

    for i, o in pairs:
        is_into = id(i) in {id(n) for n in intos}
        _compare_node(ctx, label, i, o, editable=id(i) in editable, into=is_into,
                      site_outputs=site_outputs, site_inputs=site_inputs)

    if kind != "function":
        may_read = removed_ids | editable | {id(n) for n in intos}
        _compare_initializers(ctx, label, gin, gout, may_read, in_nodes, bool(local))
    _compare_value_info(ctx, label, gin.value_info, gout.value_info)
    if kind == "main" and ir_lt4:
        _compare_ir3_inputs(ctx, label, gin, gout)


def _signature(node) -> bytes:
    return _bytes(_without(_stripped(node), "input", "output"))


def _compare_node(ctx, label, i, o, *, editable, into, site_outputs, site_inputs) -> None:
    what = f"{label}: node {i.name or '(unnamed)'} ({i.op_type})"
    gemm_into = into and i.op_type == "Gemm"
    assert len(i.output) == len(o.output), f"{what}: outputs {list(i.output)} became {list(o.output)}"
    for a, b in zip(i.output, o.output):
        if a != b:
            # The producer (or last layout node) takes over the site's output name; the node
            # folded into may hand its own output name to an inserted Add and take a new one.
            renamed_to_site = b in site_outputs and a not in ctx.out_names
            into_renamed = into and b not in ctx.in_names
            assert renamed_to_site or into_renamed, (
                f"{what}: output {a!r} renamed to {b!r}, which is not the output of a folded site")
    if list(i.input) != list(o.input):
        assert editable, f"{what}: inputs {list(i.input)} became {list(o.input)}"
        assert len(o.input) >= len(i.input), f"{what}: inputs {list(i.input)} became {list(o.input)}"
        for k, b in enumerate(o.input):
            a = i.input[k] if k < len(i.input) else ""
            if a != b:
                assert b not in ctx.in_names or b in site_inputs, f"{what}: input {a!r} replaced by existing {b!r}"
    a, b = _stripped(i), _stripped(o)
    del a.input[:], a.output[:], b.input[:], b.output[:]
    if gemm_into:
        for node in (a, b):
            keep = [attr for attr in node.attribute if attr.name != "beta"]
            del node.attribute[:]
            node.attribute.extend(keep)
    assert _bytes(a) == _bytes(b), _differs(a, b, f"{what} (apart from the changes folding may make)")
    for (ai, suffix, gi), (bo, _, go) in zip(_subgraph_attrs(i), _subgraph_attrs(o)):
        _compare_scope(ctx, f"{label}/{i.name or i.op_type}.{suffix}", gi, go, kind="graph")


def _compare_initializers(ctx, label, gin, gout, may_read_removed: set[int], in_nodes, folds_here: bool) -> None:
    in_by_name = {t.name: (index, t) for index, t in enumerate(gin.initializer)}
    position = -1
    present = set()
    for t in gout.initializer:
        if t.name in in_by_name:
            index, original = in_by_name[t.name]
            assert index > position, f"{label}: initializer {t.name!r} moved"
            position = index
            present.add(t.name)
            assert _bytes(original) == _bytes(t), _differs(original, t, f"{label}: initializer {t.name!r}")
        else:
            assert folds_here and t.name not in ctx.in_names, f"{label}: OUT adds initializer {t.name!r} (not new)"
            assert t.name in ctx.out_reads, f"{label}: new initializer {t.name!r} is read by nothing"
    for name, (_, t) in in_by_name.items():
        if name in present:
            continue
        readers = [n for n in in_nodes if name in _reads_in_scope([n])]
        assert folds_here and readers and all(id(n) in may_read_removed for n in readers), (
            f"{label}: initializer {name!r} is missing from OUT, but only folded nodes' parameters may go")
        assert name not in ctx.out_reads, f"{label}: initializer {name!r} was dropped but OUT still reads it"


def _compare_value_info(ctx, label, vin, vout) -> None:
    position = -1
    kept = set()
    in_list = list(vin)
    for info in vout:
        index = next((k for k in range(position + 1, len(in_list)) if in_list[k].name == info.name), None)
        assert index is not None, f"{label}: value_info {info.name!r} is new or moved"
        position = index
        kept.add(index)
        original = in_list[index]
        assert _bytes(original) == _bytes(info), _differs(original, info, f"{label}: value_info {info.name!r}")
    for index, info in enumerate(in_list):
        if index not in kept:
            assert info.name not in ctx.out_names, (
                f"{label}: value_info {info.name!r} was dropped, but the value still exists in OUT")


def _compare_ir3_inputs(ctx, label, gin, gout) -> None:
    in_inputs = {vi.name: (k, vi) for k, vi in enumerate(gin.input)}
    initializers_out = {t.name for t in gout.initializer}
    position = -1
    for vi in gout.input:
        if vi.name in in_inputs:
            k, original = in_inputs[vi.name]
            assert k > position, f"{label}: graph input {vi.name!r} moved"
            position = k
            assert _bytes(original) == _bytes(vi), _differs(original, vi, f"{label}: graph input {vi.name!r}")
        else:
            assert vi.name in initializers_out and vi.name not in ctx.in_names, f"{label}: new graph input {vi.name!r}"
    for name in in_inputs:
        if name not in {vi.name for vi in gout.input}:
            assert name not in ctx.out_names, f"{label}: graph input {name!r} dropped though still used"


def assert_external_kept(in_model: onnx.ModelProto, out_model: onnx.ModelProto) -> None:
    """Untouched tensors (same name on both sides) keep their storage: external stays
    external, inline stays inline, and every external_data key other than
    location/offset/length (the checksum) is kept, in order."""
    before, after = external_keys(in_model), external_keys(out_model)
    for name, (external, extra) in before.items():
        if name in after:
            assert after[name] == (external, extra), (
                f"tensor {name!r}: (external, other keys) {(external, extra)} became {after[name]}")


def assert_lossless(src: Path, out: Path, ledger, *, embed: bool = False, written_by_onnx_save: bool = False) -> None:
    """The whole guarantee for one fold of ``src`` into ``out``."""
    in_raw, out_raw = load(src), load(out)
    out_files = data_files(out_raw, out.parent)
    outside = [f for f in out_files if out.parent.resolve() not in f.parents]
    assert not outside, f"OUT's external data lies outside its folder: {outside}"
    shared = out_files & data_files(in_raw, src.parent)
    assert not shared, f"OUT reads the input's data files {sorted(map(str, shared))}"
    if embed:
        external = [t.name for t in all_tensors(out_raw) if t.data_location == T.EXTERNAL]
        assert not external, f"--embed left external tensors {external}"
    else:
        assert_external_kept(in_raw, out_raw)
    in_model = inline(in_raw, src.parent, strip_default_location=embed)
    out_model = inline(out_raw, out.parent, strip_default_location=embed)
    if not changes(ledger):
        assert_same_outside(in_model, out_model, [])  # names the first difference, if any
        assert _bytes(in_model) == _bytes(out_model), "nothing was folded, yet OUT differs from IN as a proto"
        has_external = any(t.data_location == T.EXTERNAL for t in all_tensors(in_raw))
        if written_by_onnx_save and not has_external:
            assert out.read_bytes() == src.read_bytes(), "nothing was folded, yet OUT's bytes differ from IN's"
        return
    assert_same_outside(in_model, out_model, ledger)


def assert_runs_the_same(src: Path, out: Path, feeds, rtol=1e-4, atol=1e-4) -> None:
    expected, actual = run(src, feeds), run(out, feeds)
    assert len(expected) == len(actual)
    for want, got in zip(expected, actual):
        np.testing.assert_allclose(got, want, rtol=rtol, atol=atol)


def check(model_or_path, full: bool = True) -> None:
    """The test model must be valid: a failure here is the test's fault, not bnfold's."""
    target = str(model_or_path) if isinstance(model_or_path, Path) else model_or_path
    onnx.checker.check_model(target, full_check=full)


def fold_cli(src: Path, out: Path, *flags) -> list[dict]:
    """Fold through the CLI (exit 0 required); returns the ledger entries (from --json)."""
    report = out.parent / f"{out.name}.ledger.json"
    result = invoke("fold", src, "-o", out, "-q", "--json", report, *flags)
    assert result.exit_code == 0, (result.exit_code, result.stderr, result.stdout)
    return json.loads(report.read_text())["entries"]


# ---------------------------------------------------------------------------------------
# small models


def small_model(fold: bool = True, ir_version: int = 9, opset: int = 17, extra=None, seed: int = 0,
                bn_output: bool = True, docs: bool = True):
    """x[1,3,8,8] -> Conv(4) [-> BN] -> y, and whatever ``extra(graph_parts)`` adds.

    ``extra`` gets a dict with nodes, initializers, inputs, outputs, value_info lists and
    the rng, and may append to them."""
    rng = np.random.default_rng(seed)
    parts = dict(nodes=[], initializers=[], inputs=[oh.make_tensor_value_info("x", FLOAT, [1, 3, 8, 8])],
                 outputs=[], value_info=[], rng=rng, feeds={"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)})
    init = parts["initializers"]
    init.append(onh.from_array((rng.standard_normal((4, 3, 3, 3)) * 0.3).astype(np.float32), "w"))
    init.append(onh.from_array(rng.standard_normal(4).astype(np.float32), "b"))
    conv_out = "conv_out" if fold else "y"
    parts["nodes"].append(oh.make_node("Conv", ["x", "w", "b"], [conv_out], name="conv", pads=[1, 1, 1, 1]))
    if fold:
        names = ["gamma", "beta", "mean", "var"]
        init.append(onh.from_array(rng.uniform(0.5, 2, 4).astype(np.float32), "gamma"))
        init.append(onh.from_array(rng.standard_normal(4).astype(np.float32), "beta"))
        init.append(onh.from_array(rng.standard_normal(4).astype(np.float32), "mean"))
        init.append(onh.from_array(rng.uniform(0.5, 2, 4).astype(np.float32), "var"))
        bn_out = "y" if bn_output else "bn_out"
        parts["nodes"].append(oh.make_node("BatchNormalization", ["conv_out", *names], [bn_out], name="bn"))
        if not bn_output:
            parts["nodes"].append(oh.make_node("Relu", ["bn_out"], ["y"], name="relu"))
    parts["outputs"].append(oh.make_tensor_value_info("y", FLOAT, [1, 4, 8, 8]))
    if extra:
        extra(parts)
    graph = oh.make_graph(parts["nodes"], "g", parts["inputs"], parts["outputs"], parts["initializers"],
                          value_info=parts["value_info"], doc_string="graph doc" if docs else None)
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", opset)], producer_name="test_lossless")
    model.ir_version = ir_version
    return model, parts["feeds"]


def big_add(parts):
    """An untouched main-graph initializer of 64 KiB (streamed by bnfold) read by an Add."""
    n = richgen.STREAMED_BYTES // 4
    rng = parts["rng"]
    big = onh.from_array(rng.standard_normal((1, n)).astype(np.float32), "big")
    big.doc_string = "streamed"
    parts["initializers"].append(big)
    parts["inputs"].append(oh.make_tensor_value_info("x2", FLOAT, [1, n]))
    parts["feeds"]["x2"] = rng.standard_normal((1, n)).astype(np.float32)
    parts["nodes"].append(oh.make_node("Add", ["x2", "big"], ["ybig"], name="big_add"))
    parts["outputs"].append(oh.make_tensor_value_info("ybig", FLOAT, [1, n]))


def folded(entries) -> set[str]:
    return {e["node"] for e in entries if e["status"] == "folded"}


# ---------------------------------------------------------------------------------------
# issue 18 regressions


@pytest.mark.parametrize("embed", [False, True], ids=["external", "embed"])
@pytest.mark.parametrize("fold", [False, True], ids=["nothing-to-fold", "fold"])
def test_issue18_1_zero_size_external_initializer(tmp_path, fold, embed):
    def extra(parts):
        parts["initializers"].append(onh.from_array(np.zeros((0, 3), np.float32), "empty"))
        parts["inputs"].append(oh.make_tensor_value_info("t", FLOAT, [2, 3]))
        parts["feeds"]["t"] = np.ones((2, 3), np.float32)
        parts["nodes"].append(oh.make_node("Concat", ["t", "empty"], ["z"], name="concat", axis=0))
        parts["outputs"].append(oh.make_tensor_value_info("z", FLOAT, [2, 3]))

    model, feeds = small_model(fold=fold, extra=extra)
    check(model)
    (tmp_path / "in").mkdir()
    src, out = tmp_path / "in" / "m.onnx", tmp_path / "out.onnx"
    onnx.save(model, src, save_as_external_data=True, size_threshold=0, all_tensors_to_one_file=True,
              location="m.data")
    empty = next(t for t in load(src).graph.initializer if t.name == "empty")
    assert empty.data_location == T.EXTERNAL  # the case of the issue: zero bytes of external data
    check(src)

    entries = fold_cli(src, out, *(["--embed"] if embed else []))
    assert folded(entries) == ({"bn"} if fold else set())
    assert_lossless(src, out, entries, embed=embed)
    assert_runs_the_same(src, out, feeds)


def _external_constant_model():
    """x + C (a Constant) -> Conv(W from a Constant) -> BN -> y."""
    rng = np.random.default_rng(2)
    c = onh.from_array(rng.standard_normal((1, 3, 8, 8)).astype(np.float32), "c_tensor")
    w = onh.from_array((rng.standard_normal((4, 3, 3, 3)) * 0.3).astype(np.float32), "w_tensor")
    stats = [rng.uniform(0.5, 2, 4), rng.standard_normal(4), rng.standard_normal(4), rng.uniform(0.5, 2, 4)]
    params = [onh.from_array(a.astype(np.float32), n) for a, n in zip(stats, ["gamma", "beta", "mean", "var"])]
    nodes = [
        oh.make_node("Constant", [], ["c"], name="c_const", value=c),
        oh.make_node("Add", ["x", "c"], ["xc"], name="add_c"),
        oh.make_node("Constant", [], ["w"], name="w_const", value=w),
        oh.make_node("Conv", ["xc", "w"], ["conv_out"], name="conv", pads=[1, 1, 1, 1]),
        oh.make_node("BatchNormalization", ["conv_out", "gamma", "beta", "mean", "var"], ["y"], name="bn"),
    ]
    graph = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", FLOAT, [1, 3, 8, 8])],
                          [oh.make_tensor_value_info("y", FLOAT, [1, 4, 8, 8])], params)
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    model.ir_version = 9
    return model, {"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)}


@pytest.mark.parametrize("paths", ["absolute", "relative"])
@pytest.mark.parametrize("embed", [False, True], ids=["external", "embed"])
def test_issue18_2_external_constant_from_another_working_directory(tmp_path, monkeypatch, embed, paths):
    model, feeds = _external_constant_model()
    check(model)
    for name in ("a", "b", "elsewhere"):
        (tmp_path / name).mkdir()
    src, out = tmp_path / "a" / "m.onnx", tmp_path / "b" / "out.onnx"
    onnx.save(model, src, save_as_external_data=True, convert_attribute=True, size_threshold=0,
              all_tensors_to_one_file=True, location="m.data")
    constants = {n.name: n.attribute[0].t for n in load(src).graph.node if n.op_type == "Constant"}
    assert all(t.data_location == T.EXTERNAL for t in constants.values())
    check(src)

    monkeypatch.chdir(tmp_path / "elsewhere")
    args = (src, out) if paths == "absolute" else (Path(os.path.relpath(src)), Path(os.path.relpath(out)))
    entries = fold_cli(*args, *(["--embed"] if embed else []))
    monkeypatch.chdir(tmp_path)

    assert folded(entries) == {"bn"}
    result = load(out)
    files = data_files(result, out.parent)
    assert (tmp_path / "a" / "m.data").resolve() not in files, "OUT reads the input's data file"
    if embed:
        assert not files, f"--embed: OUT still has external data in {files}"
    else:
        assert files and all(f.parent == out.parent.resolve() for f in files), f"OUT's data is not its own: {files}"
    kept = {n.name: n.attribute[0].t for n in result.graph.node if n.op_type == "Constant"}
    assert kept["c_const"].name == "c_tensor"
    assert_lossless(src, out, entries, embed=embed)
    assert_runs_the_same(src, out, feeds)


def _sparse_runnable(parts):
    rng = parts["rng"]
    graph_sparse = [sparse("sp_used", [3, 1, 1], rng), sparse("sp_unused", [4, 5], rng, coordinate_form=True)]
    parts["sparse"] = graph_sparse
    parts["nodes"][:0] = [
        oh.make_node("Add", ["x", "sp_used"], ["x_sp"], name="sparse_add"),
        oh.make_node("Constant", [], ["c_sp"], name="sparse_const", sparse_value=sparse("c_sp_t", [3, 1, 1], rng)),
        oh.make_node("Mul", ["x_sp", "c_sp"], ["x_in"], name="sparse_mul"),
    ]
    conv = next(n for n in parts["nodes"] if n.op_type == "Conv")
    conv.input[0] = "x_in"


@pytest.mark.parametrize("fold", [False, True], ids=["nothing-to-fold", "fold"])
def test_issue18_3_sparse_initializers_and_sparse_constant(tmp_path, fold):
    holder = {}

    def extra(parts):
        _sparse_runnable(parts)
        holder["sparse"] = parts["sparse"]

    model, feeds = small_model(fold=fold, extra=extra)
    model.graph.sparse_initializer.extend(holder["sparse"])
    # The full check's shape inference types a sparse initializer as a sparse tensor, which
    # no standard op takes; onnxruntime densifies it (and runs the model just below).
    check(model, full=False)
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(model, src)
    run(src, feeds)

    entries = fold_cli(src, out)
    assert folded(entries) == ({"bn"} if fold else set())
    assert_lossless(src, out, entries, written_by_onnx_save=True)
    assert_runs_the_same(src, out, feeds)


@pytest.mark.parametrize("fold", [False, True], ids=["nothing-to-fold", "fold"])
def test_issue18_3_sparse_attributes_on_custom_nodes(tmp_path, fold):
    def extra(parts):
        rng = parts["rng"]
        node = oh.make_node("Sparse", ["x"], ["s"], name="custom", domain="com.example")
        node.attribute.extend([
            oh.make_attribute("one", sparse("attr_sp", [3, 4], rng)),
            oh.make_attribute("many", [sparse("attr_sp0", [5], rng), sparse("attr_sp1", [2, 2], rng, True)]),
        ])
        parts["nodes"].append(node)
        parts["outputs"].append(oh.make_tensor_value_info("s", FLOAT, ["n"]))

    model, _ = small_model(fold=fold, extra=extra)
    model.opset_import.append(oh.make_opsetid("com.example", 1))
    check(model)
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(model, src)
    entries = fold_cli(src, out)
    assert folded(entries) == ({"bn"} if fold else set())
    assert_lossless(src, out, entries, written_by_onnx_save=True)


def _training_info() -> onnx.TrainingInfoProto:
    init = oh.make_graph([oh.make_node("Constant", [], ["start"], name="start",
                                       value=onh.from_array(np.zeros(4, np.float32), "start_t"))],
                         "initialization", [], [oh.make_tensor_value_info("start", FLOAT, [4])])
    step = oh.make_graph([oh.make_node("Sub", ["b", "lr"], ["b_next"], name="step")], "algorithm", [],
                         [oh.make_tensor_value_info("b_next", FLOAT, [4])],
                         [onh.from_array(np.full(4, 0.1, np.float32), "lr")], doc_string="one step")
    info = onnx.TrainingInfoProto(initialization=init, algorithm=step)
    info.initialization_binding.add(key="b", value="start")
    info.update_binding.add(key="b", value="b_next")
    return info


@pytest.mark.parametrize("fold", [False, True], ids=["nothing-to-fold", "fold"])
def test_issue18_4_training_info_kept(tmp_path, fold):
    # The binding names the Conv bias, which a fold replaces: bind an untouched initializer.
    def extra(parts):
        parts["initializers"].append(onh.from_array(np.ones(4, np.float32), "b_train"))

    model, feeds = small_model(fold=fold, extra=extra)
    info = _training_info()
    for binding in list(info.initialization_binding) + list(info.update_binding):
        binding.key = "b_train"
    info.algorithm.node[0].input[0] = "b_train"
    model.training_info.append(info)
    check(model)
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(model, src)

    entries = fold_cli(src, out)
    assert folded(entries) == ({"bn"} if fold else set())
    result = load(out)
    assert len(result.training_info) == 1, "training_info was dropped"
    _same(model.training_info[0], result.training_info[0], "training_info")
    assert_lossless(src, out, entries, written_by_onnx_save=True)
    assert_runs_the_same(src, out, feeds)


UNKNOWN_AT = ["ModelProto", "GraphProto", "NodeProto", "AttributeProto", "ValueInfoProto", "OperatorSetIdProto",
              "streamed initializer"]


def _with_unknown(model: onnx.ModelProto, where: str) -> list:
    """Put unknown fields on every message of kind ``where``; returns those messages."""
    graph = model.graph
    targets = {
        "ModelProto": [model],
        "GraphProto": [graph],
        "NodeProto": list(graph.node),
        "AttributeProto": [a for n in graph.node for a in n.attribute],
        "ValueInfoProto": list(graph.input) + list(graph.output) + list(graph.value_info),
        "OperatorSetIdProto": list(model.opset_import),
        "streamed initializer": [t for t in graph.initializer if t.name == "big"],
    }[where]
    assert targets
    for k, message in enumerate(targets):
        add_unknown(message, k)
    return targets


@pytest.mark.parametrize("fold", [False, True], ids=["nothing-to-fold", "fold"])
@pytest.mark.parametrize("where", UNKNOWN_AT)
def test_issue18_5_unknown_fields_kept(tmp_path, where, fold):
    def extra(parts):
        big_add(parts)
        parts["value_info"].append(oh.make_tensor_value_info("conv_out" if fold else "y", FLOAT, [1, 4, 8, 8]))
        parts["nodes"].append(oh.make_node("LeakyRelu", ["y"], ["y2"], name="leaky", alpha=0.2))
        parts["outputs"].append(oh.make_tensor_value_info("y2", FLOAT, [1, 4, 8, 8]))

    model, feeds = small_model(fold=fold, extra=extra)
    model.opset_import.append(oh.make_opsetid("com.example.unused", 3))
    _with_unknown(model, where)
    check(model)
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(model, src)

    entries = fold_cli(src, out)
    assert folded(entries) == ({"bn"} if fold else set())
    assert_lossless(src, out, entries, written_by_onnx_save=True)
    assert_runs_the_same(src, out, feeds)


def _tagged_tensors(parts):
    """A small initializer and a Constant's tensor with metadata_props, read by untouched nodes."""
    rng = parts["rng"]
    small = with_doc(onh.from_array(rng.standard_normal((1, 4, 1, 1)).astype(np.float32), "shift"), "shift doc",
                     [("origin", "test"), ("unit", "none"), ("origin", "again")])
    const = with_doc(onh.from_array(np.float32(0.5).reshape(1), "half_t"), "half doc", [("k", "v"), ("k2", "v2")])
    parts["initializers"].append(small)
    parts["nodes"] += [
        oh.make_node("Add", ["y", "shift"], ["y_shift"], name="add_shift"),
        oh.make_node("Constant", [], ["half"], name="half_const", value=const),
        oh.make_node("Mul", ["y_shift", "half"], ["y_half"], name="mul_half"),
    ]
    parts["outputs"].append(oh.make_tensor_value_info("y_half", FLOAT, [1, 4, 8, 8]))


def _tensor_props(model) -> dict[str, list[tuple[str, str]]]:
    """metadata_props of initializers (by name) and of Constant tensors (by node name)."""
    found = {t.name: [(p.key, p.value) for p in t.metadata_props] for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute[0].HasField("t"):
            found[f"Constant {node.name}"] = [(p.key, p.value) for p in node.attribute[0].t.metadata_props]
    return {name: entries for name, entries in found.items() if entries}


def test_issue18_6_tensor_metadata_props_not_doubled_after_one_and_two_folds(tmp_path):
    model, feeds = small_model(fold=True, extra=_tagged_tensors, ir_version=10)
    check(model)
    src, once, twice = tmp_path / "in.onnx", tmp_path / "once.onnx", tmp_path / "twice.onnx"
    onnx.save(model, src)
    expected = _tensor_props(model)
    assert set(expected) == {"shift", "Constant half_const"}

    entries = fold_cli(src, once)
    assert folded(entries) == {"bn"}
    assert _tensor_props(load(once)) == expected, "after one fold"
    again = fold_cli(once, twice)
    assert not changes(again)
    assert _tensor_props(load(twice)) == expected, "after two folds"
    assert_lossless(src, once, entries, written_by_onnx_save=True)
    assert_lossless(once, twice, again)
    assert_runs_the_same(src, twice, feeds)


@pytest.mark.parametrize("fold", [False, True], ids=["nothing-to-fold", "fold-in-subgraph"])
def test_issue18_6_external_subgraph_initializer_keeps_doc_and_props_when_embedded(tmp_path, fold):
    rng = np.random.default_rng(6)
    inner_nodes = [oh.make_node("Mul", ["x", "k"], ["k_out"], name="then_mul")]
    inner_inits = [with_doc(onh.from_array(rng.standard_normal((1, 3, 1, 1)).astype(np.float32), "k"),
                            "a subgraph weight", [("role", "scale"), ("role", "dup")])]
    last = "k_out"
    if fold:
        inner_inits += [onh.from_array((rng.standard_normal((3, 3, 1, 1)) * 0.3).astype(np.float32), "tw"),
                        *[onh.from_array(a.astype(np.float32), n) for a, n in zip(
                            [rng.uniform(0.5, 2, 3), rng.standard_normal(3), rng.standard_normal(3),
                             rng.uniform(0.5, 2, 3)], ["tg", "tb", "tm", "tv"])]]
        # The Relu keeps the Mul by k (the tensor under test) from folding into the Conv.
        inner_nodes += [oh.make_node("Relu", ["k_out"], ["k_relu"], name="then_relu"),
                        oh.make_node("Conv", ["k_relu", "tw"], ["t_conv"], name="then_conv"),
                        oh.make_node("BatchNormalization", ["t_conv", "tg", "tb", "tm", "tv"], ["t_bn"],
                                     name="then_bn")]
        last = "t_bn"
    then = oh.make_graph(inner_nodes, "then", [], [oh.make_tensor_value_info(last, FLOAT, [1, 3, 8, 8])],
                         inner_inits)
    other = oh.make_graph([oh.make_node("Identity", ["x"], ["e_out"], name="else_id")], "else", [],
                          [oh.make_tensor_value_info("e_out", FLOAT, [1, 3, 8, 8])])
    graph = oh.make_graph([oh.make_node("If", ["cond"], ["y"], name="if", then_branch=then, else_branch=other)],
                          "g", [oh.make_tensor_value_info("x", FLOAT, [1, 3, 8, 8]),
                                oh.make_tensor_value_info("cond", T.BOOL, [])],
                          [oh.make_tensor_value_info("y", FLOAT, [1, 3, 8, 8])])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    model.ir_version = 10
    check(model)
    (tmp_path / "in").mkdir()
    src, out = tmp_path / "in" / "m.onnx", tmp_path / "out.onnx"
    onnx.save(model, src, save_as_external_data=True, size_threshold=0, all_tensors_to_one_file=True,
              location="m.data")
    k = next(t for t in all_tensors(load(src)) if t.name == "k")
    assert k.data_location == T.EXTERNAL

    entries = fold_cli(src, out, "--embed")
    assert folded(entries) == ({"then_bn"} if fold else set())
    k_out = next(t for t in all_tensors(load(out)) if t.name == "k")
    assert (k_out.doc_string, list(k_out.metadata_props)) == (k.doc_string, list(k.metadata_props))
    assert_lossless(src, out, entries, embed=True)
    feeds = {"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32), "cond": np.array(True)}
    assert_runs_the_same(src, out, feeds)


def test_issue18_7_bn_graph_output_keeps_its_value_info_and_quantization_annotations(tmp_path):
    def extra(parts):
        parts["nodes"].append(oh.make_node("Relu", ["x"], ["x_relu"], name="relu_x"))
        parts["outputs"].append(oh.make_tensor_value_info("x_relu", FLOAT, [1, 3, 8, 8]))

    model, feeds = small_model(fold=True, ir_version=10, extra=extra)
    y = model.graph.output[0]
    assert y.name == "y"  # the BN's output
    y.doc_string = "the BN output"
    set_props(y, [("role", "logits"), ("unit", "none"), ("role", "again")])
    for name in ("y", "x", "x_relu"):  # deliberately unsorted
        annotation = model.graph.quantization_annotation.add(tensor_name=name)
        annotation.quant_parameter_tensor_names.add(key="SCALE_TENSOR", value=f"{name}_scale")
        annotation.quant_parameter_tensor_names.add(key="ZERO_POINT_TENSOR", value=f"{name}_zp")
    check(model)
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(model, src)

    entries = fold_cli(src, out)
    assert folded(entries) == {"bn"}
    result = load(out)
    _same(y, next(o for o in result.graph.output if o.name == "y"), "the graph output's ValueInfoProto")
    assert [_bytes(a) for a in result.graph.quantization_annotation] == \
        [_bytes(a) for a in model.graph.quantization_annotation], "quantization_annotation changed"
    assert_lossless(src, out, entries, written_by_onnx_save=True)
    assert_runs_the_same(src, out, feeds)


def test_issue18_7_bn_output_in_value_info_keeps_its_doc_string(tmp_path):
    def extra(parts):
        info = oh.make_tensor_value_info("bn_out", FLOAT, [1, 4, 8, 8])
        info.doc_string = "the BN output, read by a Relu"
        set_props(info, [("b", "1"), ("a", "2")])
        parts["value_info"].append(info)

    model, feeds = small_model(fold=True, ir_version=10, bn_output=False, extra=extra)
    check(model)
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(model, src)

    entries = fold_cli(src, out)
    assert folded(entries) == {"bn"}
    infos = {vi.name: vi for vi in load(out).graph.value_info}
    assert "bn_out" in infos, "the BN output's value_info was dropped"
    _same(model.graph.value_info[0], infos["bn_out"], "the BN output's value_info")
    assert_lossless(src, out, entries, written_by_onnx_save=True)
    assert_runs_the_same(src, out, feeds)


@pytest.mark.parametrize("fold", [False, True], ids=["nothing-to-fold", "fold"])
def test_issue18_8_checksum_of_untouched_external_tensors_kept(tmp_path, fold):
    model, feeds = small_model(fold=fold, extra=_tagged_tensors)
    check(model)
    (tmp_path / "in").mkdir()
    src, out = tmp_path / "in" / "m.onnx", tmp_path / "out.onnx"
    moved = richgen.write_external(model, src, keys="all", pick=lambda t: True)
    assert {"shift", "w", "half_t"} <= set(moved)
    check(src)
    before = load(src)
    shift = next(t for t in before.graph.initializer if t.name == "shift")
    checksum = [(e.key, e.value) for e in shift.external_data if e.key == "checksum"]
    assert checksum

    entries = fold_cli(src, out)
    assert folded(entries) == ({"bn"} if fold else set())
    after = load(out)
    shift_out = next(t for t in after.graph.initializer if t.name == "shift")
    assert shift_out.data_location == T.EXTERNAL
    assert [(e.key, e.value) for e in shift_out.external_data if e.key == "checksum"] == checksum
    assert external_bytes(shift_out, out.parent) == external_bytes(shift, src.parent)
    assert_lossless(src, out, entries)
    assert_runs_the_same(src, out, feeds)


def test_issue18_8_constants_only_inspected_keep_their_tensor_names(tmp_path):
    """A Reshape's shape (inspected to prove the layout) and a kept BN's parameters (read
    to plan it) come from Constant nodes; the fold reads them and must not rename them."""
    rng = np.random.default_rng(8)

    def const(name, array):
        return oh.make_node("Constant", [], [name], name=f"{name}_const",
                            value=onh.from_array(np.asarray(array), f"{name}_tensor"))

    stats = lambda c: [rng.uniform(0.5, 2, c), rng.standard_normal(c), rng.standard_normal(c), rng.uniform(0.5, 2, c)]
    nodes = [
        oh.make_node("Conv", ["x", "w"], ["conv_out"], name="conv", pads=[1, 1, 1, 1]),
        const("shape", np.array([1, 4, 64], np.int64)),
        oh.make_node("Reshape", ["conv_out", "shape"], ["flat"], name="reshape"),
        *[const(n, a.astype(np.float32)) for n, a in zip(["g1", "b1", "m1", "v1"], stats(4))],
        oh.make_node("BatchNormalization", ["flat", "g1", "b1", "m1", "v1"], ["bn_out"], name="bn"),
        oh.make_node("Relu", ["bn_out"], ["r"], name="relu"),
        *[const(n, a.astype(np.float32)) for n, a in zip(["g2", "b2", "m2", "v2"], stats(4))],
        oh.make_node("BatchNormalization", ["r", "g2", "b2", "m2", "v2"], ["y"], name="bn_kept"),
    ]
    graph = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", FLOAT, [1, 3, 8, 8])],
                          [oh.make_tensor_value_info("y", FLOAT, [1, 4, 64])],
                          [onh.from_array((rng.standard_normal((4, 3, 3, 3)) * 0.3).astype(np.float32), "w")],
                          value_info=[oh.make_tensor_value_info("conv_out", FLOAT, [1, 4, 8, 8])])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    model.ir_version = 9
    check(model)
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(model, src)

    entries = fold_cli(src, out)
    assert folded(entries) == {"bn"}
    assert {e["node"]: e["status"] for e in entries}["bn_kept"] == "kept"
    names = {n.name: n.attribute[0].t.name for n in load(out).graph.node if n.op_type == "Constant"}
    for inspected in ("shape", "g2", "b2", "m2", "v2"):
        assert names.get(f"{inspected}_const") == f"{inspected}_tensor", (inspected, names)
    assert_lossless(src, out, entries, written_by_onnx_save=True)
    assert_runs_the_same(src, out, {"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)})


@pytest.mark.parametrize("fold", [False, True], ids=["nothing-to-fold", "fold"])
def test_issue18_9_duplicate_metadata_keys_and_empty_trailing_output_kept(tmp_path, fold):
    def extra(parts):
        parts["nodes"].append(oh.make_node("Dropout", ["y"], ["d", ""], name="dropout"))
        parts["nodes"].append(oh.make_node("Relu", ["d"], ["r"], name="relu"))
        parts["outputs"].append(oh.make_tensor_value_info("r", FLOAT, [1, 4, 8, 8]))

    model, feeds = small_model(fold=fold, ir_version=10, extra=extra)
    set_props(model.graph, [("k", "1"), ("a", "2"), ("k", "3")])
    for node in model.graph.node:
        set_props(node, [(f"{node.name}", "x"), ("dup", "1"), ("dup", "2")])
    check(model)
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(model, src)

    entries = fold_cli(src, out)
    assert folded(entries) == ({"bn"} if fold else set())
    result = load(out)
    assert [(p.key, p.value) for p in result.graph.metadata_props] == [("k", "1"), ("a", "2"), ("k", "3")]
    dropout = next(n for n in result.graph.node if n.name == "dropout")
    assert list(dropout.output) == ["d", ""], "the empty trailing output was dropped"
    assert [(p.key, p.value) for p in dropout.metadata_props] == [("dropout", "x"), ("dup", "1"), ("dup", "2")]
    assert_lossless(src, out, entries, written_by_onnx_save=True)
    assert_runs_the_same(src, out, feeds)


# ---------------------------------------------------------------------------------------
# value_info, order, explicit defaults


@pytest.mark.parametrize("fold", [False, True], ids=["nothing-to-fold", "fold"])
def test_value_info_is_not_added_for_initializers(tmp_path, fold):
    model, feeds = small_model(fold=fold, bn_output=False)
    check(model)
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(model, src)
    entries = fold_cli(src, out)
    result = load(out)
    initializers = {t.name for t in result.graph.initializer}
    added = [vi.name for vi in result.graph.value_info if vi.name in initializers]
    assert not added, f"value_info entries added for initializers: {added}"
    assert {vi.name for vi in result.graph.value_info} <= {vi.name for vi in model.graph.value_info}
    assert_lossless(src, out, entries, written_by_onnx_save=True)


@pytest.mark.parametrize("fold", [False, True], ids=["nothing-to-fold", "fold"])
def test_value_info_and_metadata_props_order_unchanged(tmp_path, fold):
    def extra(parts):
        parts["nodes"] += [oh.make_node("Relu", ["y"], ["r1"], name="relu1"),
                           oh.make_node("Sigmoid", ["r1"], ["r2"], name="sigmoid"),
                           oh.make_node("Tanh", ["r2"], ["r3"], name="tanh")]
        parts["outputs"].append(oh.make_tensor_value_info("r3", FLOAT, [1, 4, 8, 8]))
        for name in ("r2", "conv_out", "r1") if fold else ("r2", "r1"):  # not in graph order
            info = oh.make_tensor_value_info(name, FLOAT, [1, 4, 8, 8])
            set_props(info, [("z", "1"), ("a", "2")])
            parts["value_info"].append(info)

    model, feeds = small_model(fold=fold, ir_version=10, extra=extra)
    set_props(model, [("z_last", "1"), ("a_first", "2"), ("m", "3")])
    set_props(model.graph, [("z", "1"), ("a", "2")])
    check(model)
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(model, src)
    entries = fold_cli(src, out)
    result = load(out)
    assert [(p.key, p.value) for p in result.metadata_props] == [(p.key, p.value) for p in model.metadata_props]
    assert [(p.key, p.value) for p in result.graph.metadata_props] == [("z", "1"), ("a", "2")]
    expected = [vi.name for vi in model.graph.value_info if vi.name != "conv_out" or not fold]
    assert [vi.name for vi in result.graph.value_info] == expected
    assert_lossless(src, out, entries, written_by_onnx_save=True)
    assert_runs_the_same(src, out, feeds)


@pytest.mark.parametrize("op", ["Conv", "Gemm"])
def test_explicit_default_attributes_unchanged(tmp_path, op):
    rng = np.random.default_rng(11)
    if op == "Conv":
        shape_in, w = [1, 3, 8, 8], rng.standard_normal((4, 3, 3, 3))
        linear = oh.make_node("Conv", ["x", "w", "b"], ["lin"], name="lin", pads=[1, 1, 1, 1], strides=[1, 1],
                              dilations=[1, 1], group=1, auto_pad="NOTSET")
        shape_out = [1, 4, 8, 8]
    else:
        shape_in, w = [2, 3], rng.standard_normal((3, 4))
        linear = oh.make_node("Gemm", ["x", "w", "b"], ["lin"], name="lin", alpha=1.0, beta=1.0, transA=0, transB=0)
        shape_out = [2, 4]
    nodes = [
        linear,
        oh.make_node("BatchNormalization", ["lin", "g", "bb", "m", "v"], ["bn_out"], name="bn", epsilon=1e-5,
                     momentum=0.9, training_mode=0),
        oh.make_node("LeakyRelu", ["bn_out"], ["lr"], name="leaky", alpha=0.01),
        oh.make_node("BatchNormalization", ["lr", "g", "bb", "m", "v"], ["y"], name="bn_kept", epsilon=1e-5,
                     momentum=0.9, training_mode=0),
    ]
    stats = [rng.uniform(0.5, 2, 4), rng.standard_normal(4), rng.standard_normal(4), rng.uniform(0.5, 2, 4)]
    inits = [onh.from_array(w.astype(np.float32) * 0.3, "w"),
             onh.from_array(rng.standard_normal(4).astype(np.float32), "b")]
    inits += [onh.from_array(a.astype(np.float32), n) for a, n in zip(stats, ["g", "bb", "m", "v"])]
    graph = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", FLOAT, shape_in)],
                          [oh.make_tensor_value_info("y", FLOAT, shape_out)], inits)
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    model.ir_version = 9
    check(model)
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(model, src)
    entries = fold_cli(src, out)
    assert folded(entries) == {"bn"}
    result = {n.name: n for n in load(out).graph.node}
    for name in ("leaky", "bn_kept"):
        _same(next(n for n in nodes if n.name == name), result[name], f"node {name}")
    expected = [(a.name, _bytes(a)) for a in linear.attribute if not (op == "Gemm" and a.name == "beta")]
    assert [(a.name, _bytes(a)) for a in result["lin"].attribute if not (op == "Gemm" and a.name == "beta")] == expected
    assert_lossless(src, out, entries, written_by_onnx_save=True)
    assert_runs_the_same(src, out, {"x": rng.standard_normal(shape_in).astype(np.float32)})


# ---------------------------------------------------------------------------------------
# every kind of edit a fold makes, each next to untouched parts


def _fold_kind(kind: str):
    """(model, feeds, CLI flags) for one kind of fold, with a documented, untouched neighbour
    (a LeakyRelu with doc_string and an unknown field) after it."""
    rng = np.random.default_rng(13)
    arr = lambda *shape: (rng.standard_normal(shape) * 0.4).astype(np.float32)
    stats = lambda c: [rng.uniform(0.5, 2, c), rng.standard_normal(c), rng.standard_normal(c), rng.uniform(0.5, 2, c)]
    inits, nodes, flags, opset, ir_version = [], [], [], 17, 9
    x_shape, y_shape = [1, 3, 8, 8], [1, 4, 8, 8]
    bn_inputs = lambda prefix, c: [f"{prefix}_{k}" for k in ("g", "b", "m", "v")]

    def add_stats(prefix, c):
        inits.extend(onh.from_array(a.astype(np.float32), n) for a, n in zip(stats(c), bn_inputs(prefix, c)))
        return bn_inputs(prefix, c)

    if kind == "shared-weight":  # the weight is also read by another Conv: cloned, the original stays
        flags = ["--no-merge-branches"]  # the two convs of x would merge into one otherwise
        inits += [onh.from_array(arr(4, 3, 3, 3), "w")]
        nodes += [oh.make_node("Conv", ["x", "w"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
                  oh.make_node("BatchNormalization", ["c1", *add_stats("bn", 4)], ["b1"], name="bn"),
                  oh.make_node("Conv", ["x", "w"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
                  oh.make_node("Add", ["b1", "c2"], ["pre"], name="sum")]
    elif kind == "merge":  # RepVGG: 3x3 conv-BN + 1x1 conv-BN + BN identity, summed, become one conv
        inits += [onh.from_array(arr(3, 3, 3, 3), "w3"), onh.from_array(arr(3, 3, 1, 1), "w1")]
        x_shape, y_shape = [1, 3, 8, 8], [1, 3, 8, 8]
        nodes += [oh.make_node("Conv", ["x", "w3"], ["c3"], name="dense", pads=[1, 1, 1, 1]),
                  oh.make_node("BatchNormalization", ["c3", *add_stats("bn3", 3)], ["b3"], name="bn3"),
                  oh.make_node("Conv", ["x", "w1"], ["c1"], name="one"),
                  oh.make_node("BatchNormalization", ["c1", *add_stats("bn1", 3)], ["b1"], name="bn1"),
                  oh.make_node("BatchNormalization", ["x", *add_stats("bnid", 3)], ["bid"], name="bnid"),
                  oh.make_node("Add", ["b3", "b1"], ["s1"], name="sum1"),
                  oh.make_node("Add", ["s1", "bid"], ["pre"], name="sum2")]
    elif kind == "bn-before-conv":  # the consumer reads the BN's input afterwards
        inits += [onh.from_array(arr(4, 3, 1, 1), "w"), onh.from_array(arr(4), "cb")]
        nodes += [oh.make_node("BatchNormalization", ["x", *add_stats("bn", 3)], ["b"], name="bn"),
                  oh.make_node("Conv", ["b", "w", "cb"], ["pre"], name="conv")]
    elif kind == "bn-before-padded-conv":  # the shift stays as an inserted Add before the conv
        inits += [onh.from_array(arr(4, 3, 3, 3), "w")]
        nodes += [oh.make_node("BatchNormalization", ["x", *add_stats("bn", 3)], ["b"], name="bn"),
                  oh.make_node("Conv", ["b", "w"], ["pre"], name="conv", pads=[1, 1, 1, 1])]
    elif kind == "matmul-bias-add":  # a bare MatMul gets its bias as an inserted Add
        x_shape, y_shape = [2, 5, 3], [2, 5, 4]
        inits += [onh.from_array(arr(3, 4), "w")]
        nodes += [oh.make_node("MatMul", ["x", "w"], ["mm"], name="matmul"),
                  oh.make_node("Transpose", ["mm"], ["t"], name="to_ncl", perm=[0, 2, 1]),
                  oh.make_node("BatchNormalization", ["t", *add_stats("bn", 4)], ["b"], name="bn"),
                  oh.make_node("Transpose", ["b"], ["pre"], name="to_nlc", perm=[0, 2, 1])]
    elif kind == "matmul-add":  # the MatMul's existing bias Add gets a new constant
        x_shape, y_shape = [2, 3], [2, 4]
        inits += [onh.from_array(arr(3, 4), "w"), onh.from_array(arr(4), "bias")]
        nodes += [oh.make_node("MatMul", ["x", "w"], ["mm"], name="matmul"),
                  oh.make_node("Add", ["mm", "bias"], ["a"], name="bias_add"),
                  oh.make_node("BatchNormalization", ["a", *add_stats("bn", 4)], ["pre"], name="bn")]
    elif kind == "gemm-beta":  # beta is folded into C and reset to 1
        x_shape, y_shape = [2, 3], [2, 4]
        inits += [onh.from_array(arr(4, 3), "w"), onh.from_array(arr(4), "c")]
        nodes += [oh.make_node("Gemm", ["x", "w", "c"], ["g"], name="gemm", alpha=0.5, beta=2.0, transB=1),
                  oh.make_node("BatchNormalization", ["g", *add_stats("bn", 4)], ["pre"], name="bn")]
    elif kind == "mul-add-after-conv":  # elementwise sites, not BNs
        inits += [onh.from_array(arr(4, 3, 3, 3), "w"), onh.from_array(arr(4), "cb"),
                  onh.from_array(arr(1, 4, 1, 1), "k"), onh.from_array(arr(4, 1, 1), "t")]
        nodes += [oh.make_node("Conv", ["x", "w", "cb"], ["c"], name="conv", pads=[1, 1, 1, 1]),
                  oh.make_node("Mul", ["c", "k"], ["cm"], name="mul"),
                  oh.make_node("Add", ["cm", "t"], ["pre"], name="add")]
    elif kind == "decompose":  # a BN with no linear neighbour becomes Mul + Add
        flags = ["--decompose-standalone"]
        y_shape = [1, 3, 8, 8]
        nodes += [oh.make_node("Relu", ["x"], ["r"], name="relu"),
                  oh.make_node("BatchNormalization", ["r", *add_stats("bn", 3)], ["pre"], name="bn")]
    elif kind == "ir3-inputs":  # IR 3: every initializer is also a graph input
        ir_version, opset = 3, 8
        inits += [onh.from_array(arr(4, 3, 3, 3), "w"), onh.from_array(arr(4), "cb")]
        nodes += [oh.make_node("Conv", ["x", "w", "cb"], ["c"], name="conv", pads=[1, 1, 1, 1]),
                  oh.make_node("BatchNormalization", ["c", *add_stats("bn", 4)], ["pre"], name="bn", epsilon=1e-5)]
    else:
        raise ValueError(kind)
    leaky = oh.make_node("LeakyRelu", ["pre"], ["y"], name="leaky", alpha=0.1, doc_string="untouched")
    add_unknown(leaky, 3)
    nodes.append(leaky)
    inputs = [oh.make_tensor_value_info("x", FLOAT, x_shape)]
    if ir_version < 4:
        inputs += [oh.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in inits]
    graph = oh.make_graph(nodes, "g", inputs, [oh.make_tensor_value_info("y", FLOAT, y_shape)], inits,
                          value_info=[oh.make_tensor_value_info("pre", FLOAT, y_shape)])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", opset)])
    model.ir_version = ir_version
    return model, {"x": rng.standard_normal(x_shape).astype(np.float32)}, flags


FOLD_KINDS = ["shared-weight", "bn-before-conv", "bn-before-padded-conv", "matmul-bias-add", "matmul-add",
              "gemm-beta", "mul-add-after-conv", "decompose", "ir3-inputs", "merge"]


@pytest.mark.parametrize("kind", FOLD_KINDS)
def test_every_kind_of_fold_changes_only_what_it_folds(tmp_path, kind):
    model, feeds, flags = _fold_kind(kind)
    check(model)
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(model, src)
    entries = fold_cli(src, out, *flags)
    assert changes(entries), entries
    assert not [e for e in entries if e["status"] == "kept"], entries
    assert_lossless(src, out, entries, written_by_onnx_save=True)
    check(load(out))
    assert_runs_the_same(src, out, feeds)


# ---------------------------------------------------------------------------------------
# found by the generator, pinned here as small cases


@pytest.mark.parametrize("embed", [False, True], ids=["external", "embed"])
@pytest.mark.parametrize("fold", [False, True], ids=["nothing-to-fold", "fold-in-function"])
def test_external_constants_in_function_bodies(tmp_path, fold, embed):
    """``onnx.save(convert_attribute=True)`` moves Constant tensors of function bodies out too."""
    rich = richgen.build(richgen.Config(function=True, function_fold=fold, kept_bn=False, docs=False))
    (tmp_path / "in").mkdir()
    src, out = tmp_path / "in" / "m.onnx", tmp_path / "out.onnx"
    onnx.save(rich.model, src, save_as_external_data=True, convert_attribute=True, size_threshold=0,
              all_tensors_to_one_file=True, location="m.data")
    body = [t for f in load(src).functions for n in f.node for a in n.attribute if a.HasField("t") for t in [a.t]]
    assert body and all(t.data_location == T.EXTERNAL for t in body)
    _check_rich(rich, src)

    entries = fold_cli(src, out, *(["--embed"] if embed else []))
    assert {(e["graph"], e["node"]) for e in entries if e["status"] == "folded"} == rich.expected_folds
    assert_lossless(src, out, entries, embed=embed)
    assert_runs_the_same(src, out, rich.feeds)


@pytest.mark.parametrize("embed", [False, True], ids=["external", "embed"])
@pytest.mark.parametrize("fold", [False, True], ids=["nothing-to-fold", "fold"])
def test_external_tensors_in_training_info(tmp_path, fold, embed):
    """training_info's graphs hold tensors too; stored externally they must follow OUT
    (onnx.save never moves them, so this model's data is laid out by hand)."""
    rich = richgen.build(richgen.Config(fold_main=fold, training_info=True, kept_bn=False, docs=False))
    (tmp_path / "in").mkdir()
    src, out = tmp_path / "in" / "m.onnx", tmp_path / "out.onnx"
    moved = richgen.write_external(rich.model, src, keys="all", pick=lambda t: t.name in ("ti_lr", "ti_start_t"))
    assert sorted(moved) == ["ti_lr", "ti_start_t"]
    _check_rich(rich, src)

    entries = fold_cli(src, out, *(["--embed"] if embed else []))
    assert folded(entries) == ({"main_bn"} if fold else set())
    assert_lossless(src, out, entries, embed=embed)
    assert_runs_the_same(src, out, rich.feeds)


def _zipmap_classifier():
    """Gemm -> BN -> Softmax -> ZipMap: a classifier as sklearn-onnx writes them, whose
    output is a sequence of maps."""
    rng = np.random.default_rng(12)
    nodes = [oh.make_node("Gemm", ["x", "w", "b"], ["g"], name="gemm"),
             oh.make_node("BatchNormalization", ["g", "s", "bb", "m", "v"], ["bn"], name="bn"),
             oh.make_node("Softmax", ["bn"], ["p"], name="softmax"),
             oh.make_node("ZipMap", ["p"], ["z"], name="zipmap", domain="ai.onnx.ml", classlabels_int64s=[0, 1, 2])]
    arrays = [rng.standard_normal((4, 3)), rng.standard_normal(3), rng.uniform(0.5, 2, 3), rng.standard_normal(3),
              rng.standard_normal(3), rng.uniform(0.5, 2, 3)]
    inits = [onh.from_array(a.astype(np.float32), n) for a, n in zip(arrays, ["w", "b", "s", "bb", "m", "v"])]
    z_type = oh.make_sequence_type_proto(oh.make_map_type_proto(T.INT64, oh.make_tensor_type_proto(FLOAT, None)))
    graph = oh.make_graph(nodes, "classifier", [oh.make_tensor_value_info("x", FLOAT, [2, 4])],
                          [oh.make_tensor_value_info("p", FLOAT, [2, 3]), oh.make_value_info("z", z_type)], inits)
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17), oh.make_opsetid("ai.onnx.ml", 3)])
    model.ir_version = 9
    return model, {"x": rng.standard_normal((2, 4)).astype(np.float32)}


def test_map_typed_values_are_accepted(tmp_path):
    model, feeds = _zipmap_classifier()
    check(model)
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(model, src)
    expected = run(src, feeds)

    entries = fold_cli(src, out)
    assert folded(entries) == {"bn"}
    assert_lossless(src, out, entries, written_by_onnx_save=True)
    actual = run(out, feeds)
    np.testing.assert_allclose(actual[0], expected[0], rtol=1e-5, atol=1e-6)
    assert [sorted(d) for d in actual[1]] == [sorted(d) for d in expected[1]]
    for want, got in zip(expected[1], actual[1]):
        np.testing.assert_allclose([got[k] for k in sorted(got)], [want[k] for k in sorted(want)], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fold", [False, True], ids=["nothing-to-fold", "fold"])
def test_map_type_proto_attributes_on_custom_nodes(tmp_path, fold):
    def extra(parts):
        node = oh.make_node("Typed", ["x"], ["s"], name="custom", domain="com.example")
        map_type = oh.make_map_type_proto(T.STRING, oh.make_tensor_type_proto(FLOAT, [3]))
        node.attribute.extend([oh.make_attribute("tp", map_type), oh.make_attribute("tps", [map_type, map_type])])
        parts["nodes"].append(node)
        parts["outputs"].append(oh.make_tensor_value_info("s", FLOAT, ["n"]))

    model, _ = small_model(fold=fold, extra=extra)
    model.opset_import.append(oh.make_opsetid("com.example", 1))
    check(model)
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(model, src)
    entries = fold_cli(src, out)
    assert folded(entries) == ({"bn"} if fold else set())
    assert_lossless(src, out, entries, written_by_onnx_save=True)


# ---------------------------------------------------------------------------------------
# the rich generator


def _check_rich(rich: richgen.Rich, path: Path | None = None) -> None:
    # A sparse initializer read by an Add fails the full check's typing (see the module docstring).
    check(path or rich.model, full=not rich.cfg.sparse)
    if rich.feeds is not None:
        run(path or rich.model, rich.feeds)


@settings(max_examples=30, **SETTINGS)
@given(richgen.configs())
def test_generated_models_are_valid(cfg):
    """The generator's models pass the checker (and run in onnxruntime when runnable)."""
    rich = richgen.build(cfg)
    _check_rich(rich)
    assert rich.cfg.folds == bool(rich.expected_folds)


@pytest.mark.parametrize("runnable", [True, False], ids=["runnable", "custom"])
def test_generated_models_fold_what_they_mean_to(tmp_path, runnable):
    """Every corner the generator builds folds, every BN it means to keep stays (a lossless
    failure elsewhere is then not a generator that folds something unexpected)."""
    cfg = richgen.Config(runnable=runnable, custom=not runnable, ir_version=10, fold_main=True, function=True,
                         function_fold=True, subgraph="if", subgraph_fold=True)
    rich = richgen.build(cfg)
    _check_rich(rich)
    onnx.save(rich.model, tmp_path / "in.onnx")
    ledger = bnfold.fold(tmp_path / "in.onnx").ledger
    assert {(e.graph, e.node) for e in ledger if e.status == "folded"} == rich.expected_folds
    assert {(e.graph, e.node) for e in ledger if e.status == "kept"} == rich.expected_kept


def _round_trip(rich: richgen.Rich, folder: Path, layout: str, embed: bool, seed: int) -> None:
    """Write IN (``layout``: "onnx.save" or "external"), fold it, check the guarantee."""
    src, out = folder / "in" / "m.onnx", folder / "out" / "folded.onnx"
    src.parent.mkdir()
    out.parent.mkdir()
    if layout == "onnx.save":
        onnx.save(rich.model, src)
    else:
        richgen.write_external(rich.model, src, seed=seed, fraction=0.7, files=1 + seed % 3, align=[1, 64][seed % 2])
    _check_rich(rich, src)
    result = bnfold.fold(src)
    result.save(out, external_data=False if embed else None)
    assert_lossless(src, out, result.ledger, embed=embed, written_by_onnx_save=layout == "onnx.save")
    check(out, full=not rich.cfg.sparse)
    if rich.feeds is not None and changes(result.ledger):
        assert_runs_the_same(src, out, rich.feeds)


@settings(max_examples=150, **SETTINGS)
@given(richgen.configs(folds=False), st.sampled_from(["onnx.save", "external"]), st.booleans(), st.integers(0, 99))
def test_rich_models_with_nothing_to_fold_come_out_unchanged(cfg, layout, embed, seed):
    rich = richgen.build(cfg)
    with tempfile.TemporaryDirectory() as folder:
        _round_trip(rich, Path(folder), layout, embed, seed)


@settings(max_examples=150, **SETTINGS)
@given(richgen.configs(folds=True), st.sampled_from(["onnx.save", "external"]), st.booleans(), st.integers(0, 99))
def test_rich_models_with_folds_change_only_what_they_fold(cfg, layout, embed, seed):
    rich = richgen.build(cfg)
    with tempfile.TemporaryDirectory() as folder:
        _round_trip(rich, Path(folder), layout, embed, seed)


@pytest.mark.parametrize("runnable", [True, False], ids=["runnable", "custom"])
@pytest.mark.parametrize("folds", [False, True], ids=["nothing-to-fold", "fold"])
def test_everything_at_once(tmp_path, runnable, folds):
    """One model with every feature of the generator switched on (a fixed example)."""
    newest = 10 if runnable else onnx.IR_VERSION
    cfg = richgen.Config(runnable=runnable, custom=not runnable, ir_version=newest, fold_main=folds,
                         bn_is_output=True, big_folded=folds, function=True, function_fold=folds, subgraph="loop",
                         subgraph_fold=folds, training_info=True, sparse=True, big_untouched=True, storage=True,
                         unknown=True, devices=not runnable, exotic=False)
    _round_trip(richgen.build(cfg), tmp_path, "onnx.save", False, 0)


# ---------------------------------------------------------------------------------------
# the comparison itself


def test_assert_same_outside_notices_what_it_must():
    """The helper fails on the losses it exists to catch (so a pass means something)."""
    model, _ = small_model(fold=True, extra=lambda p: p["nodes"].append(
        oh.make_node("Relu", ["y"], ["r"], name="relu")) or p["outputs"].append(
        oh.make_tensor_value_info("r", FLOAT, [1, 4, 8, 8])))
    ledger = [{"op": "BatchNormalization", "node": "bn", "graph": "main", "status": "folded", "into": "conv"}]
    # A correct fold, done by hand.
    good = copy.deepcopy(model)
    conv = good.graph.node[0]
    conv.input[1:] = ["w_new", "b_new"]
    conv.output[0] = "y"
    del good.graph.node[1]
    keep = [t for t in good.graph.initializer if t.name not in ("w", "b", "gamma", "beta", "mean", "var")]
    del good.graph.initializer[:]
    good.graph.initializer.extend(keep + [onh.from_array(np.ones((4, 3, 3, 3), np.float32), "w_new"),
                                          onh.from_array(np.ones(4, np.float32), "b_new")])
    assert_same_outside(model, good, ledger)

    def broken(edit):
        bad = copy.deepcopy(good)
        edit(bad)
        with pytest.raises(AssertionError):
            assert_same_outside(model, bad, ledger)

    broken(lambda m: add_unknown(m, 1))
    broken(lambda m: add_unknown(m.graph, 1))
    broken(lambda m: add_unknown(m.graph.node[1], 1))
    broken(lambda m: add_unknown(m.opset_import[0], 1))
    broken(lambda m: setattr(m.graph.node[1], "doc_string", "changed"))
    broken(lambda m: m.graph.node[1].attribute.append(oh.make_attribute("x", 1)))
    broken(lambda m: m.graph.node[0].attribute.append(oh.make_attribute("group", 1)))
    broken(lambda m: m.graph.value_info.append(oh.make_tensor_value_info("w_new", FLOAT, [4, 3, 3, 3])))
    broken(lambda m: setattr(m, "producer_name", "bnfold"))
    broken(lambda m: m.graph.node.append(oh.make_node("Relu", ["r"], ["r2"], name="extra")))
    broken(lambda m: m.graph.node[1].output.append(""))
    broken(lambda m: m.metadata_props.add(key="k", value="v"))
    # Node order, initializer order.
    model2 = copy.deepcopy(model)
    model2.graph.initializer.append(onh.from_array(np.ones(2, np.float32), "u1"))
    model2.graph.initializer.append(onh.from_array(np.ones(2, np.float32), "u2"))
    good2 = copy.deepcopy(good)
    good2.graph.initializer.insert(0, onh.from_array(np.ones(2, np.float32), "u2"))
    good2.graph.initializer.insert(0, onh.from_array(np.ones(2, np.float32), "u1"))
    assert_same_outside(model2, good2, ledger)
    swapped = copy.deepcopy(good2)
    first, second = copy.deepcopy(swapped.graph.initializer[0]), copy.deepcopy(swapped.graph.initializer[1])
    swapped.graph.initializer[0].CopyFrom(second)
    swapped.graph.initializer[1].CopyFrom(first)
    with pytest.raises(AssertionError):
        assert_same_outside(model2, swapped, ledger)
    # Folded tensors stored differently are fine; an untouched one stored differently is not.
    typed = copy.deepcopy(good2)
    typed.graph.initializer[0].CopyFrom(oh.make_tensor("u1", FLOAT, [2], [1.0, 1.0]))
    with pytest.raises(AssertionError):
        assert_same_outside(model2, typed, ledger)


# ---------------------------------------------------------------------------------------
# what mutation testing of the writer found untested


def nested_if_model() -> onnx.ModelProto:
    """``If(c) -> If(c) -> Conv -> BN`` two graphs down, the weights and BN parameters
    main-graph initializers (read from the inner graph): every main initializer goes with
    the fold, and the value_info describing the old weight with it, while no node of the
    main graph changes and nothing comes into it (the folded weight lives with its reader)."""
    rng = np.random.default_rng(7)
    params = {"w": rng.standard_normal((3, 3, 1, 1)), "gamma": rng.uniform(0.5, 2, 3), "beta": rng.standard_normal(3),
              "mean": rng.standard_normal(3), "var": rng.uniform(0.5, 2, 3)}
    inits = [onh.from_array(v.astype(np.float32), k) for k, v in params.items()]
    info = oh.make_tensor_value_info
    inner = oh.make_graph([oh.make_node("Conv", ["x", "w"], ["conv_out"], name="conv"),
                           oh.make_node("BatchNormalization", ["conv_out", "gamma", "beta", "mean", "var"], ["yi"],
                                        name="the_bn")], "inner", [], [info("yi", T.FLOAT, [2, 3, 4, 4])])
    plain = oh.make_graph([oh.make_node("Identity", ["x"], ["yp"])], "plain", [], [info("yp", T.FLOAT, [2, 3, 4, 4])])
    outer = oh.make_graph([oh.make_node("If", ["c"], ["yo"], then_branch=inner, else_branch=plain)], "outer", [],
                          [info("yo", T.FLOAT, [2, 3, 4, 4])])
    plain2 = oh.make_graph([oh.make_node("Identity", ["x"], ["yq"])], "plain2", [],
                           [info("yq", T.FLOAT, [2, 3, 4, 4])])
    graph = oh.make_graph([oh.make_node("If", ["c"], ["y"], then_branch=outer, else_branch=plain2)], "main",
                          [info("x", T.FLOAT, [2, 3, 4, 4]), info("c", T.BOOL, [])],
                          [info("y", T.FLOAT, [2, 3, 4, 4])], inits)
    graph.value_info.append(info("w", T.FLOAT, [3, 3, 1, 1]))  # described, as some exporters do
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=8)


def test_a_fold_two_graphs_down_is_written_and_its_old_main_initializers_go(tmp_path):
    model = nested_if_model()
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, tmp_path / "in.onnx")
    result = bnfold.fold(tmp_path / "in.onnx")
    assert [(e.node, e.status) for e in result.ledger] == [("the_bn", "folded")]
    result.save(tmp_path / "out.onnx")
    out = onnx.load(tmp_path / "out.onnx")
    onnx.checker.check_model(out, full_check=True)
    def then(node):
        return next(a.g for a in node.attribute if a.name == "then_branch")
    inner = then(then(out.graph.node[0]).node[0])
    assert [n.op_type for n in inner.node] == ["Conv"] and len(inner.initializer) == 2  # weight and bias
    assert not out.graph.initializer and not out.graph.value_info  # all five were read by the fold alone
    feeds = {"x": np.random.default_rng(8).standard_normal((2, 3, 4, 4)).astype(np.float32), "c": np.array(True)}
    np.testing.assert_allclose(run(out, feeds)[0], run(model, feeds)[0], rtol=1e-5, atol=1e-5)


def test_weights_written_to_a_data_file_say_where_they_end(tmp_path):
    """Moved to a data file, each tensor's entry gives its offset and length: a reader that
    takes a missing length as "to the end of the file" (onnx.load does) reads the right bytes."""
    rng = np.random.default_rng(9)
    info = oh.make_tensor_value_info
    inits = [onh.from_array(rng.standard_normal(shape).astype(np.float32), name)
             for name, shape in (("w", (16, 8, 3, 3)), ("v", (16, 16, 3, 3)), ("gamma", (16,)), ("beta", (16,)),
                                 ("mean", (16,)), ("var", (16,)))]
    inits[-1] = onh.from_array(rng.uniform(0.5, 2, 16).astype(np.float32), "var")
    graph = oh.make_graph([oh.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
                           oh.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["b"]),
                           oh.make_node("Conv", ["b", "v"], ["y"], pads=[1, 1, 1, 1])], "g",
                          [info("x", T.FLOAT, [1, 8, 5, 5])], [info("y", T.FLOAT, [1, 16, 5, 5])], inits)
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, tmp_path / "in.onnx")
    bnfold.fold(tmp_path / "in.onnx").save(tmp_path / "out.onnx", external_data=True)
    out = onnx.load(tmp_path / "out.onnx", load_external_data=False)
    external = [t for t in out.graph.initializer if t.data_location == T.EXTERNAL]
    assert len(external) == 2
    for tensor in external:
        keys = {e.key: e.value for e in tensor.external_data}
        assert int(keys["length"]) == 4 * math.prod(tensor.dims), keys
    loaded = onnx.load(tmp_path / "out.onnx")
    feeds = {"x": rng.standard_normal((1, 8, 5, 5)).astype(np.float32)}
    np.testing.assert_allclose(run(loaded, feeds)[0], run(model, feeds)[0], rtol=1e-4, atol=1e-4)


def test_attribute_tensors_stay_inline_when_weights_go_to_a_data_file(tmp_path):
    """Only initializers move to a data file: a node's tensor-list and sparse attributes
    stay in the node, however large (here 1.6 kB each, past the 1 kB from which weights move)."""
    rng = np.random.default_rng(10)

    def big_sparse(name):
        linear = np.arange(0, 1200, 3)
        return oh.make_sparse_tensor(onh.from_array(rng.standard_normal(linear.size).astype(np.float32), name),
                                     onh.from_array(linear.astype(np.int64), ""), [1200])
    info = oh.make_tensor_value_info
    custom = oh.make_node("Sparse", ["x"], ["s"], name="custom", domain="com.example")
    custom.attribute.extend([
        oh.make_attribute("dense", [onh.from_array(rng.standard_normal(400).astype(np.float32), "attr_dense")]),
        oh.make_attribute("one", big_sparse("attr_one")),
        oh.make_attribute("many", [big_sparse("attr_many")])])
    inits = [onh.from_array(rng.standard_normal((8, 4, 3, 3)).astype(np.float32), "w")] + \
        [onh.from_array(rng.uniform(0.5, 2, 8).astype(np.float32), n) for n in ("gamma", "beta", "mean", "var")]
    graph = oh.make_graph([oh.make_node("Conv", ["x", "w"], ["c"]),
                           oh.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["y"]), custom],
                          "g", [info("x", T.FLOAT, [1, 4, 5, 5])],
                          [info("y", T.FLOAT, [1, 8, 3, 3]), info("s", T.FLOAT, None)], inits)
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17), oh.make_opsetid("com.example", 1)],
                          ir_version=8)
    onnx.save(model, tmp_path / "in.onnx")
    bnfold.fold(tmp_path / "in.onnx").save(tmp_path / "out.onnx", external_data=True)
    out = onnx.load(tmp_path / "out.onnx", load_external_data=False)
    assert [t.data_location for t in out.graph.initializer] == [T.EXTERNAL, T.DEFAULT]  # folded weight, bias
    (node,) = [n for n in out.graph.node if n.op_type == "Sparse"]
    assert node == custom
