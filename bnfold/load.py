"""Load models safely: parse, validate, and leave large weights in the file.

Loading validates what onnx_ir does not: that the file is ONNX at all, that every
external-data reference stays inside the model's folder and within its file, and that
the graph is well formed (every input defined before use, declared opsets). Large
weights are not parsed: they stay in the model file as ``EmbeddedTensor``s, read by
offset where a fold needs them and copied file to file when the model is written back
(``bnfold.wire``, ``bnfold.stream``). Saving is ``bnfold.save``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import mmap
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from google.protobuf import json_format, text_format
from google.protobuf.message import DecodeError

from bnfold import wire
from bnfold._onnx_ir import ir
from bnfold.constant_eval import constant_tensor
from bnfold.errors import InputError
from bnfold.patterns.shapes import linear_shape_problem
from bnfold.source import Source, analysis_copy, link
from bnfold.standard import is_standard
from bnfold.writer import all_tensors, external_range, tensor_nbytes

PROTOBUF_LIMIT_BYTES = 2**31 - 1
#: Main-graph initializers at least this large stay in the model file at load (and are
#: written by copying); smaller ones (BN statistics, biases) are parsed as usual.
EMBEDDED_MIN_BYTES = 64 * 2**10


class EmbeddedTensor(ir.ExternalTensor):
    """A main-graph initializer whose bytes stay in the model file it was loaded from.

    To everything that reads data it is an ExternalTensor (offset and length into a file,
    mapped on demand); it is not external data: an embedded save writes it back inline,
    copying the bytes file to file. The path is absolute and the base folder empty, so
    onnx_ir's containment checks, meant for data files a model names, do not apply to
    the model file the user gave. The file must stay as it was until the model is saved:
    if it is replaced (say, a save over it followed by another save of the same model),
    reading the tensor is an InputError rather than a read of the wrong bytes.
    """

    __slots__ = ("_identity",)

    def __init__(self, source: str, offset: int, length: int, dtype: ir.DataType, *, identity: tuple,
                 **kwargs) -> None:
        super().__init__(source, offset, length, dtype, **kwargs)
        self._identity = identity

    def check_source(self, fileno: int | None = None) -> None:
        """Raise InputError if the model file (at its path, or open as ``fileno``) is no
        longer the one this tensor was read from."""
        try:
            now = file_identity(os.stat(self.path) if fileno is None else os.fstat(fileno))
        except OSError:
            now = None
        if now != self._identity:
            raise InputError(f"{self.path}: the model file changed after it was loaded; "
                             f"load it again (tensor {self.name!r} lies in it)")

    def numpy(self) -> np.ndarray:
        if self._array is None:  # once mapped, the data stays valid whatever happens to the path
            self.check_source()
        return super().numpy()

    def tobytes(self) -> bytes:
        if self._array is None:
            self.check_source()
        return super().tobytes()


def file_identity(stat: os.stat_result) -> tuple[int, int, int, int]:
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns


def load_model(path: str | os.PathLike) -> ir.Model:
    """Read ``path`` into an onnx_ir model as the file has it (lazily for external data),
    or raise InputError."""
    return load_source(path, infer_shapes=False).model


def load_source(path: str | os.PathLike, *, infer_shapes: bool = True) -> Source:
    """Read ``path``: its proto (large weights left in the file) and the analysis model
    (with onnx's inferred shapes where the file has no value_info)."""
    path = Path(path)
    _check_readable_file(path)
    try:
        proto, embedded = _parse(path)
    except (DecodeError, RuntimeError, ValueError, OSError, text_format.ParseError, json_format.ParseError) as exc:
        raise InputError(f"{path}: not a readable ONNX model ({_first_line(exc)})") from None
    if not proto.HasField("graph") or proto.ir_version <= 0:
        raise InputError(f"{path}: not an ONNX model (no graph or IR version in the file)")
    _check_text(proto, path)
    _check_tensors(proto, path, embedded)
    _check_external_data(proto, path.resolve().parent, path)
    _check_opsets(proto, path)
    names = [tensor.name for tensor in proto.graph.initializer]
    if len(set(names)) != len(names):
        duplicate = next(name for name in names if names.count(name) > 1)
        raise InputError(f"{path}: invalid ONNX model (initializer {duplicate!r} is defined more than once)")
    source = _analyse(proto, path, infer_shapes)
    source.spans = {names[index]: span for index, span in embedded.items()}
    _attach_embedded(source)
    check_graph_wellformed(source.model, path)
    check_linear_shapes(source.model, path)
    return source


def source_from_proto(proto: onnx.ModelProto, base_dir: Path | None = None) -> Source:
    """A model given in memory: checked like a file, analysed on bnfold's own copy."""
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    where = Path("<model>")
    _check_text(copy, where)
    _check_tensors(copy, where, {})
    if base_dir is not None:
        _check_external_data(copy, base_dir, where)
    _check_opsets(copy, where)
    source = _analyse(copy, None)
    if base_dir is not None:
        _set_base_dir(source.model, base_dir)
        source.base = base_dir
    check_graph_wellformed(source.model, where)
    check_linear_shapes(source.model, where)
    return source


def _with_shapes(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The analysis copy with onnx's inferred shapes where the exporter wrote no value_info:
    layout proofs (Reshape, Flatten, Squeeze) and ranks need them. Only the copy changes."""
    if len(proto.graph.value_info) or not len(proto.graph.node):
        return proto
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return onnx.shape_inference.infer_shapes(proto)
    except Exception:  # custom ops, models onnx cannot type: analyse without the shapes
        return proto


def _set_base_dir(model: ir.Model, folder: Path) -> None:
    """External data is relative to the model's folder, in function bodies too."""
    for graph in [model.graph, *(f.graph for f in model.functions.values())]:
        ir.external_data.set_base_dir(graph, str(folder))


def _analyse(proto: onnx.ModelProto, path: Path | None, infer_shapes: bool = True) -> Source:
    analysed, opaque = analysis_copy(_with_shapes(proto) if infer_shapes else proto)
    try:
        with _onnx_ir_quiet():
            model = ir.serde.deserialize_model(analysed)
    except Exception as exc:  # onnx_ir raises many types on malformed protos
        raise InputError(f"{path or '<model>'}: invalid ONNX model ({_first_line(exc)})") from None
    if path is not None:
        _set_base_dir(model, path.resolve().parent)
    nodes, graphs = link(model, proto)
    return Source(proto=proto, model=model, path=path, node_protos=nodes, graph_protos=graphs, opaque_inputs=opaque)


def _parse(path: Path) -> tuple[onnx.ModelProto, dict[int, tuple[int, int]]]:
    """The model's proto, with large main-graph weights cut out where the file allows it,
    and where the cut weights lie: initializer index -> (offset, length) in the file."""
    _, extension = os.path.splitext(path)
    binary = onnx.serialization.registry.get_format_from_file_extension(extension) in (None, "protobuf")
    if binary and path.stat().st_size <= PROTOBUF_LIMIT_BYTES:
        with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
            split = wire.split_weights(buffer, EMBEDDED_MIN_BYTES)
        if split is not None:
            return onnx.ModelProto.FromString(split.skeleton), split.spans
    return onnx.load(str(path), load_external_data=False), {}


def _attach_embedded(source: Source) -> None:
    """Give each cut initializer its bytes back, as an EmbeddedTensor over the model file."""
    if not source.spans:
        return
    path = str(source.path.resolve())
    identity = file_identity(os.stat(path))
    for name, (offset, length) in source.spans.items():
        value = source.model.graph.initializers[name]
        skeleton = value.const_value
        value.const_value = EmbeddedTensor(
            path, offset, length, skeleton.dtype, identity=identity, shape=skeleton.shape, name=value.name,
            doc_string=skeleton.doc_string, metadata_props=dict(skeleton.metadata_props) or None,
        )


@contextlib.contextmanager
def _onnx_ir_quiet() -> Iterator[None]:
    """onnx_ir logs and warns about malformed parts as it reads them ("Output 'y' is not
    produced by any node"); load_model reports those itself, as one error, so mute them."""
    logger = logging.getLogger("onnx_ir")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def as_source(model: Source | ir.Model | onnx.ModelProto | str | os.PathLike) -> Source:
    """What the API accepts: a path, a ModelProto, an onnx_ir Model, or a loaded Source.
    In-memory models are copied: bnfold never changes what it is given."""
    if isinstance(model, Source):
        return model
    if isinstance(model, onnx.ModelProto):
        return source_from_proto(model)
    if isinstance(model, ir.Model):
        return source_from_proto(ir.serde.serialize_model(model))
    return load_source(model)


def external_data_files(model: ir.Model | Source) -> set[Path]:
    """The resolved paths of the files holding the model's external data."""
    if isinstance(model, Source):
        return {path.resolve() for path in _proto_external_files(model)}
    return {
        Path(value.const_value.path).resolve()
        for graph in model.graphs()
        for value in graph.initializers.values()
        if isinstance(value.const_value, ir.ExternalTensor) and not isinstance(value.const_value, EmbeddedTensor)
    }


def disk_size(paths) -> int | None:
    """Bytes on disk of a model's files (the model and its external data); None if one is unreadable."""
    try:
        return sum(os.path.getsize(path) for path in paths)
    except OSError:
        return None


def has_external_data(model: ir.Model | Source) -> bool:
    """Whether any tensor is stored outside the model file."""
    return bool(external_data_files(model))


def _proto_external_files(source: Source) -> set[Path]:
    base = source.base_dir
    if base is None:
        return set()
    return {external_range(tensor, base)[0] for tensor, _ in all_tensors(source.proto)
            if tensor.data_location == onnx.TensorProto.EXTERNAL}



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


def check_linear_shapes(model: ir.Model, path: Path) -> None:
    """Constant weights of Conv, ConvTranspose and Gemm have the ranks and bias lengths their
    ONNX schemas require. The checker does not look at shapes, and the fold reads them."""
    graphs = list(model.graphs()) + [f.graph for f in model.functions.values()]
    for graph in graphs:
        for node in graph:
            if not is_standard(node) or node.op_type not in ("Conv", "ConvTranspose", "Gemm"):
                continue
            if any(attr.is_ref() for attr in node.attributes.values()):
                continue  # its attributes come from the call sites: planning checks it once they are known
            weight = _static_shape(node.inputs[1] if len(node.inputs) > 1 else None)
            if weight is None:
                continue
            bias = _static_shape(node.inputs[2] if len(node.inputs) > 2 else None)
            problem = linear_shape_problem(node, weight, bias)
            if problem:
                raise InputError(f"{path}: invalid node {node.name or node.op_type!r}: {problem}")



def _static_shape(value: ir.Value | None) -> tuple[int, ...] | None:
    """The shape of an initializer or Constant-node tensor, None for anything computed."""
    tensor = None if value is None else constant_tensor(value)
    return None if tensor is None else tuple(int(d) for d in tensor.shape)


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
        if node.op_type == "Constant" and domain != "ai.onnx.ml" and len(node.attribute) != 1:
            # The schema allows each value attribute; the checker does not count them.
            raise InputError(f"{path}: invalid node {node.name or node.op_type!r}: a Constant needs exactly "
                             f"one value attribute, it has {len(node.attribute)}")
        if any(attr.t.data_location == onnx.TensorProto.EXTERNAL for attr in node.attribute if attr.HasField("t")):
            continue  # the checker would read the data relative to the working directory; _check_external_data checked it
        try:
            onnx.checker.check_node(node, context)
        except onnx.checker.ValidationError as exc:
            raise InputError(f"{path}: invalid node {node.name or node.op_type!r}: {_first_line(exc)}") from None
        except UnicodeDecodeError:  # the checker's message quotes text that is not UTF-8
            raise InputError(f"{path}: invalid node {node.name or node.op_type!r}: "
                             "names or attributes that are not valid UTF-8") from None


def _check_external_data(proto: onnx.ModelProto, base: Path, path: Path) -> None:
    """Refuse external data that escapes the model folder or lies beyond its file."""
    for tensor, _ in all_tensors(proto):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = info.get("location", "")
        where = f"{path}: tensor {tensor.name!r}"
        if not location:
            raise InputError(f"{where} has external data without a location")
        if not isinstance(location, str) or "\x00" in location:  # bytes: not valid UTF-8
            raise InputError(f"{where}: external data location {location!r} is not a file name")
        if tensor.data_type == onnx.TensorProto.STRING:
            raise InputError(f"{where}: STRING tensors cannot be stored as external data")
        if os.path.isabs(location) or ".." in Path(location).parts:
            raise InputError(f"{where}: external data location {location!r} escapes the model folder")
        try:
            data_file = (base / location).resolve()
            if base not in data_file.parents:
                raise InputError(f"{where}: external data location {location!r} escapes the model folder")
            if not data_file.is_file():
                raise InputError(f"{where}: external data file {location!r} is missing")
            file_size = data_file.stat().st_size
        except OSError as exc:
            raise InputError(f"{where}: external data file {location!r} is unusable ({exc.strerror or exc})") from None
        offset = _int_entry(info, "offset", where, 0)
        needed = tensor_nbytes(tensor)
        length = _int_entry(info, "length", where, file_size - offset)
        if offset < 0 or length < 0 or offset + length > file_size:
            raise InputError(
                f"{where}: external data range {offset}+{length} lies beyond {location!r} ({file_size} bytes)"
            )
        if needed is not None and length < needed:
            raise InputError(f"{where}: external data holds {length} bytes, the tensor needs {needed}")
        if needed is not None and info.get("length") and length != needed:
            raise InputError(f"{where}: external data length {length} does not match the {needed} bytes "
                             f"of its type and shape {list(tensor.dims)}")


def _int_entry(info: dict[str, str], key: str, where: str, default: int) -> int:
    """An external-data offset/length as an int; absent or empty means ``default``."""
    text = info.get(key, "")
    if not text:
        return default
    try:
        return int(text)
    except ValueError:
        raise InputError(f"{where}: external data {key} {text!r} is not an integer") from None


#: The typed field that holds a tensor's data when there is no raw_data, and entries per element.
_TYPED_FIELDS: dict[ir.DataType, tuple[str, int]] = {
    ir.DataType.FLOAT: ("float_data", 1), ir.DataType.COMPLEX64: ("float_data", 2),
    ir.DataType.DOUBLE: ("double_data", 1), ir.DataType.COMPLEX128: ("double_data", 2),
    ir.DataType.INT64: ("int64_data", 1), ir.DataType.UINT32: ("uint64_data", 1),
    ir.DataType.UINT64: ("uint64_data", 1), ir.DataType.STRING: ("string_data", 1),
    **{t: ("int32_data", 1) for t in (
        ir.DataType.INT32, ir.DataType.INT16, ir.DataType.INT8, ir.DataType.UINT16, ir.DataType.UINT8,
        ir.DataType.BOOL, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.FLOAT8E4M3FN,
        ir.DataType.FLOAT8E4M3FNUZ, ir.DataType.FLOAT8E5M2, ir.DataType.FLOAT8E5M2FNUZ)},
}


def _check_text(message, path: Path) -> None:
    """Every string field is valid UTF-8. protobuf hands over invalid ones as bytes, which
    nothing downstream expects (onnx_ir cannot even write such a name back)."""
    for field, value in message.ListFields():
        repeated = getattr(field, "is_repeated", None)
        if repeated is None:  # protobuf < 5
            repeated = field.label == field.LABEL_REPEATED
        items = value if repeated else (value,)
        if field.type == field.TYPE_MESSAGE:
            for item in items:
                _check_text(item, path)
        elif field.type == field.TYPE_STRING:
            for item in items:
                if not isinstance(item, str):
                    raise InputError(f"{path}: {field.containing_type.name}.{field.name} {item!r} is not valid UTF-8")


def _check_tensors(proto: onnx.ModelProto, path: Path, embedded: dict[int, tuple[int, int]]) -> None:
    """Every tensor in the file has a known type, a valid shape, and exactly the data they need.

    onnx_ir reads tensors lazily, so a mismatch would otherwise surface deep in a fold.
    ``embedded`` gives the data length of main-graph initializers cut out at load; external
    data is checked by ``_check_external_data``.
    """
    for index, tensor in enumerate(proto.graph.initializer):
        _check_tensor(tensor, path, embedded[index][1] if index in embedded else None)
    for tensor, kind in all_tensors(proto):
        if kind == "main":
            continue
        _check_tensor(tensor, path, None)


def _check_tensor(tensor: onnx.TensorProto, path: Path, embedded_length: int | None) -> None:
    where = f"{path}: tensor {tensor.name!r}"
    if any(dim < 0 for dim in tensor.dims):
        raise InputError(f"{where} has a negative dimension in its shape {list(tensor.dims)}")
    try:
        dtype = ir.DataType(tensor.data_type)
    except ValueError:
        raise InputError(f"{where} has an unknown data type {tensor.data_type}") from None
    if dtype == ir.DataType.UNDEFINED:
        raise InputError(f"{where} has no data type")
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        return
    if embedded_length is not None or tensor.HasField("raw_data"):
        if dtype == ir.DataType.STRING:
            raise InputError(f"{where} is a STRING tensor with raw_data, which only numeric types may use")
        stored = len(tensor.raw_data) if embedded_length is None else embedded_length
        needed, unit = tensor_nbytes(tensor), "bytes"
    elif dtype in _TYPED_FIELDS:
        field, per_element = _TYPED_FIELDS[dtype]
        stored, needed, unit = len(getattr(tensor, field)), math.prod(tensor.dims) * per_element, "values"
    else:
        return
    if needed is not None and stored != needed:
        raise InputError(f"{where} stores {stored} {unit} of data, but {dtype.name} of shape "
                         f"{list(tensor.dims)} needs {needed}")



def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
