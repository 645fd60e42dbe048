"""Load and save models safely.

Loading validates what onnx_ir does not: that the file is ONNX at all, that every
external-data reference stays inside the model's folder and within its file, and that
the graph is well formed (every input defined before use, declared opsets). Saving
writes to a temporary folder beside the target and renames into place, so a failed or
interrupted run never leaves a partial output and never touches the input.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from bnfold.errors import InputError

PROTOBUF_LIMIT_BYTES = 2**31 - 1
#: Headroom for the graph itself when deciding whether weights still fit inline.
EMBED_HEADROOM_BYTES = 64 * 2**20


def load_model(path: str | os.PathLike) -> ir.Model:
    """Read ``path`` into an onnx_ir model, lazily for external data, or raise InputError."""
    path = Path(path)
    _check_readable_file(path)
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, OSError) as exc:
        raise InputError(f"{path}: not a readable ONNX model ({_first_line(exc)})") from None
    if not proto.HasField("graph") or proto.ir_version <= 0:
        raise InputError(f"{path}: not an ONNX model (no graph or IR version in the file)")
    _check_external_data(proto, path.resolve().parent, path)
    _check_opsets(proto, path)
    try:
        model = ir.serde.deserialize_model(proto)
    except Exception as exc:  # onnx_ir raises many types on malformed protos
        raise InputError(f"{path}: invalid ONNX model ({_first_line(exc)})") from None
    ir.external_data.set_base_dir(model.graph, str(path.resolve().parent))
    check_graph_wellformed(model, path)
    return model


def as_model(model_or_path: ir.Model | str | os.PathLike) -> ir.Model:
    """Accept either a loaded model or a path, so the API takes both."""
    if isinstance(model_or_path, ir.Model):
        return model_or_path
    return load_model(model_or_path)


def has_external_data(model: ir.Model) -> bool:
    """Whether any initializer is stored outside the model file."""
    return any(
        isinstance(value.const_value, ir.ExternalTensor)
        for graph in model.graphs()
        for value in graph.initializers.values()
    )


def save_model(
    model: ir.Model,
    path: str | os.PathLike,
    *,
    external_data: str | None = None,
    callback: Callable | None = None,
) -> None:
    """Write ``model`` to ``path`` atomically.

    ``external_data`` names the weights file relative to ``path``'s folder; None embeds
    the weights, which is refused when they cannot fit protobuf's 2 GB limit.
    """
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise InputError(f"{target}: output folder {folder} does not exist")
    if target.is_dir():
        raise InputError(f"{target}: is a directory")
    if external_data is not None:
        _check_relative_name(external_data, target)
    elif weight_bytes(model) > PROTOBUF_LIMIT_BYTES - EMBED_HEADROOM_BYTES:
        raise InputError(
            f"{target}: weights ({weight_bytes(model) / 2**30:.2f} GiB) do not fit in one ONNX "
            "file (protobuf limit 2 GiB); write them as external data instead"
        )
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=folder))
    except OSError as exc:
        raise InputError(f"{target}: cannot write to {folder} ({exc.strerror})") from None
    try:
        staged_model = staging / target.name
        ir.save(model, staged_model, external_data=external_data, callback=callback)
        staged_files = [staged_model]
        if external_data is not None and (staging / external_data).exists():
            staged_files.insert(0, staging / external_data)
        for staged in staged_files:
            _fsync(staged)
        # Data first: the model file is what makes the pair visible.
        for staged in staged_files:
            destination = folder / staged.relative_to(staging)
            destination.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staged, destination)
        _fsync_dir(folder)
    except OSError as exc:
        raise InputError(f"{target}: cannot write ({exc.strerror or exc})") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def weight_bytes(model: ir.Model) -> int:
    """Bytes of all initializers, the part of a model that decides embed vs external."""
    return sum(
        value.const_value.nbytes
        for graph in model.graphs()
        for value in graph.initializers.values()
        if value.const_value is not None
    )


def check_graph_wellformed(model: ir.Model, path: Path) -> None:
    """Every node input must be defined before use (also catches cycles and dangling names)."""
    for function in model.functions.values():
        _check_scope(function, set(function.inputs), path, f"function {function.name}")
    _check_scope(model.graph, set(), path, "graph")


def _check_scope(graph, outer: set, path: Path, where: str) -> None:
    defined = set(outer) | set(graph.inputs) | set(graph.initializers.values() if hasattr(graph, "initializers") else ())
    for node in graph:
        for value in node.inputs:
            if value is not None and value not in defined:
                raise InputError(
                    f"{path}: invalid graph: {where} node {node.name or node.op_type!r} reads "
                    f"{value.name!r} before it is defined (dangling input or cycle)"
                )
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.GRAPH:
                _check_scope(attr.value, defined, path, f"{where}/{node.name}.{attr.name}")
            elif attr.type == ir.AttributeType.GRAPHS:
                for sub in attr.value:
                    _check_scope(sub, defined, path, f"{where}/{node.name}.{attr.name}")
        defined.update(node.outputs)
    for value in graph.outputs:
        if value not in defined:
            raise InputError(f"{path}: invalid graph: output {value.name!r} of {where} is never produced")


def _check_readable_file(path: Path) -> None:
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, not an ONNX file")
    if not os.access(path, os.R_OK):
        raise InputError(f"{path}: permission denied")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: empty file, not an ONNX model")


def _check_opsets(proto: onnx.ModelProto, path: Path) -> None:
    """Opsets this onnx knows, declared domains, and every standard node against its schema."""
    newest = onnx.defs.onnx_opset_version()
    declared = {entry.domain: entry.version for entry in proto.opset_import}
    default = declared.get("", declared.get("ai.onnx"))
    if default is not None and not 1 <= default <= newest:
        raise InputError(
            f"{path}: unsupported opset {default} for the default domain "
            f"(this installation's onnx knows opsets 1 to {newest})"
        )
    local_functions = {f.domain for f in proto.functions}
    _check_nodes(proto.graph.node, proto.ir_version, declared, local_functions, path)
    for function in proto.functions:
        imports = {entry.domain: entry.version for entry in function.opset_import} or declared
        _check_nodes(function.node, proto.ir_version, imports, local_functions, path)


def _check_nodes(nodes, ir_version: int, declared: dict[str, int], local_functions: set[str], path: Path) -> None:
    """Schema-check standard nodes one by one: cheap, since no initializer is serialized.

    Nodes holding subgraphs are checked through their inner nodes, because the checker
    cannot be told which outer names a subgraph may read.
    """
    context = onnx.checker.C.CheckerContext()
    context.ir_version = ir_version
    context.opset_imports = declared
    for node in nodes:
        domain = node.domain or ""
        if domain not in declared and domain != "ai.onnx" and domain not in local_functions:
            raise InputError(f"{path}: node {node.name or node.op_type!r} uses undeclared domain {domain!r}")
        subgraphs = [attr.g for attr in node.attribute if attr.HasField("g")]
        subgraphs += [g for attr in node.attribute for g in attr.graphs]
        for sub in subgraphs:
            _check_nodes(sub.node, ir_version, declared, local_functions, path)
        if subgraphs or domain not in ("", "ai.onnx", "ai.onnx.ml"):
            continue
        try:
            onnx.checker.check_node(node, context)
        except onnx.checker.ValidationError as exc:
            raise InputError(f"{path}: invalid node {node.name or node.op_type!r}: {_first_line(exc)}") from None


def _check_external_data(proto: onnx.ModelProto, base: Path, path: Path) -> None:
    """Refuse external data that escapes the model folder or lies beyond its file."""
    for tensor in _all_tensors(proto):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = info.get("location", "")
        where = f"{path}: tensor {tensor.name!r}"
        if not location:
            raise InputError(f"{where} has external data without a location")
        if os.path.isabs(location) or ".." in Path(location).parts:
            raise InputError(f"{where}: external data location {location!r} escapes the model folder")
        data_file = (base / location).resolve()
        if base not in data_file.parents:
            raise InputError(f"{where}: external data location {location!r} escapes the model folder")
        if not data_file.is_file():
            raise InputError(f"{where}: external data file {location!r} is missing")
        offset = int(info.get("offset", 0) or 0)
        file_size = data_file.stat().st_size
        needed = _tensor_nbytes(tensor)
        length = int(info["length"]) if info.get("length") else file_size - offset
        if offset < 0 or length < 0 or offset + length > file_size:
            raise InputError(
                f"{where}: external data range {offset}+{length} lies beyond {location!r} ({file_size} bytes)"
            )
        if needed is not None and length < needed:
            raise InputError(f"{where}: external data holds {length} bytes, the tensor needs {needed}")


def _tensor_nbytes(tensor: onnx.TensorProto) -> int | None:
    try:
        dtype = ir.DataType(tensor.data_type)
    except ValueError:
        return None
    count = 1
    for dim in tensor.dims:
        count *= dim
    return int(count * dtype.itemsize + 0.5)


def _check_relative_name(name: str, target: Path) -> None:
    if os.path.isabs(name) or ".." in Path(name).parts:
        raise InputError(f"{target}: external data name {name!r} must be a plain name relative to the output folder")


def _all_tensors(proto: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    yield from proto.graph.initializer
    for sparse in proto.graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    yield from _node_tensors(proto.graph.node)
    for function in proto.functions:
        yield from _node_tensors(function.node)


def _node_tensors(nodes) -> Iterator[onnx.TensorProto]:
    for node in nodes:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            subgraphs = ([attr.g] if attr.HasField("g") else []) + list(attr.graphs)
            for sub in subgraphs:
                yield from sub.initializer
                yield from _node_tensors(sub.node)


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
