"""Load and save models safely.

Loading validates what onnx_ir does not: that the file is ONNX at all, that every
external-data reference stays inside the model's folder and within its file, and that
the graph is well formed (every input defined before use, declared opsets). Large
weights are not parsed: they stay in the model file as ``EmbeddedTensor``s, read by
offset where a fold needs them and copied file to file when the model is written back
(``bnfold.wire``). Saving writes to a temporary folder beside the target and renames
into place, so a failed or interrupted run never leaves a partial output and never
touches the input.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import io as _io
import logging
import math
import mmap
import os
import shutil
import signal
import stat
import sys
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
from google.protobuf import json_format, text_format
from google.protobuf.message import DecodeError

from bnfold import wire
from bnfold._onnx_ir import ir
from bnfold.constant_eval import constant_tensor
from bnfold.errors import BnfoldError, InputError
from bnfold.source import Source, analysis_copy, link
from bnfold.writer import Edited, all_tensors, external_range, set_external, set_inline, tensor_nbytes

PROTOBUF_LIMIT_BYTES = 2**31 - 1
#: Bytes of computed (folded) tensors that may be in flight ahead of the writer (two
#: tensors are always allowed, so both workers stay busy whatever the tensor size).
SAVE_IN_FLIGHT_BYTES = 32 * 2**20
#: Headroom for the graph itself when deciding whether weights still fit inline.
EMBED_HEADROOM_BYTES = 64 * 2**20
#: Main-graph initializers at least this large stay in the model file at load (and are
#: written by copying); smaller ones (BN statistics, biases) are parsed as usual.
EMBEDDED_MIN_BYTES = 64 * 2**10
#: In-memory initializers at least this large go to the external-data file when there is one.
EXTERNAL_MIN_BYTES = 1024
#: Small pieces of an output model are gathered up to this size before each write.
WRITE_BUFFER_BYTES = 2**20
#: Errors with which copy_file_range says "not between these files": copy through memory instead.
_NO_FILE_COPY = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EPERM,
                 errno.EBADF}


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
            now = _file_identity(os.stat(self.path) if fileno is None else os.fstat(fileno))
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


def _file_identity(stat: os.stat_result) -> tuple[int, int, int, int]:
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
    identity = _file_identity(os.stat(path))
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


def has_external_data(model: ir.Model | Source) -> bool:
    """Whether any tensor is stored outside the model file."""
    return bool(external_data_files(model))


def _proto_external_files(source: Source) -> set[Path]:
    base = source.base_dir
    if base is None:
        return set()
    return {external_range(tensor, base)[0] for tensor, _ in all_tensors(source.proto)
            if tensor.data_location == onnx.TensorProto.EXTERNAL}


def save_model(
    model: ir.Model,
    path: str | os.PathLike,
    *,
    external_data: str | None = None,
    callback: Callable | None = None,
) -> None:
    """Write an onnx_ir ``model`` to ``path`` atomically (see ``save_edited``)."""
    save_edited(_edited_from_ir(model), path, external_data=external_data, callback=callback)


def save_edited(
    edited: Edited,
    path: str | os.PathLike,
    *,
    external_data: str | None = None,
    callback: Callable | None = None,
) -> None:
    """Write an edited model to ``path`` atomically.

    ``external_data`` names the weights file relative to ``path``'s folder; None embeds
    the weights, which is refused when they cannot fit protobuf's 2 GB limit.
    ``callback(tensor, written, total)`` runs after each large weight is written.
    """
    target, direct = output_target(Path(path), "output")
    folder = target.parent
    if external_data is not None:
        if direct:
            raise InputError(f"{path}: a device or FIFO cannot have external data beside it; use --embed")
        _check_relative_name(external_data, target)
    layout = _Layout(edited, external_data)
    if external_data is None and layout.embedded_bytes > PROTOBUF_LIMIT_BYTES - EMBED_HEADROOM_BYTES:
        raise InputError(
            f"{target}: weights ({layout.embedded_bytes / 2**30:.2f} GiB) do not fit in one ONNX "
            "file (protobuf limit 2 GiB); write them as external data instead"
        )
    if direct:  # a device or FIFO: nothing to replace atomically, write straight to it
        try:
            layout.write_model(target, callback)
        except OSError as exc:
            raise InputError(f"{path}: cannot write ({exc.strerror or exc})") from None
        return
    staging = None
    try:
        with _signals_deferred():  # a signal between mkdir and assignment would leak the folder
            try:
                staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=folder))
            except OSError as exc:
                raise InputError(f"{target}: cannot write to {folder} ({exc.strerror})") from None
        staged_model = staging / target.name
        staged_files = [staged_model]
        if layout.external:
            staged_data = staging / external_data
            staged_data.parent.mkdir(parents=True, exist_ok=True)  # a name like "weights/w.bin"
            with open(staged_data, "wb", buffering=0) as handle:
                _write_pieces(handle, list(layout.external), layout.external, callback)
            staged_files.insert(0, staged_data)
        layout.write_model(staged_model, callback)
        for staged in staged_files:
            _fsync(staged)
        # Data first: the model file is what makes the pair visible. An interrupt waits
        # until both are in place, so it never leaves the data without its model.
        with _signals_deferred():
            for staged in staged_files:
                destination = folder / staged.relative_to(staging)
                destination.parent.mkdir(parents=True, exist_ok=True)
                os.replace(staged, destination)
            _fsync_dir(folder)
    except Exception as exc:
        cause = _cause_of_type(exc, BnfoldError) or _cause_of_type(exc, OSError)
        if isinstance(cause, BnfoldError):
            raise cause from None
        if isinstance(cause, OSError):
            raise InputError(f"{target}: cannot write ({cause.strerror or cause})") from None
        raise
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


def output_target(path: Path, what: str) -> tuple[Path, bool]:
    """Where an output really goes, and whether to write it directly.

    A symlink is written through (the link stays, its regular-file target is replaced
    atomically); a character device or FIFO (``/dev/null``, a named pipe) is written
    directly, since there is nothing to replace; anything else that is not a regular file
    is refused, as is a missing folder. Never replaces a file that is not ours to replace.
    """
    try:
        mode = os.stat(path).st_mode  # through any symlinks
    except OSError:
        mode = None
    if mode is not None and (stat.S_ISCHR(mode) or stat.S_ISFIFO(mode)):
        return path, True  # /dev/null, /dev/stdout (a link to a pipe or terminal), a FIFO
    if mode is not None and stat.S_ISDIR(mode):
        raise InputError(f"{path}: is a directory, not a file for the {what}")
    if mode is not None and not stat.S_ISREG(mode):
        raise InputError(f"{path}: the {what} would replace something that is not a regular file")
    target = Path(os.path.realpath(path)) if path.is_symlink() else path
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        problem = "is not a folder" if folder.exists() else "does not exist"
        raise InputError(f"{path}: the {what}'s folder {folder} {problem}")
    if not os.access(folder, os.W_OK):
        raise InputError(f"{path}: cannot write the {what} to {folder} (permission denied)")
    return target, False


class _Layout:
    """Where each tensor's data goes in the output, decided on a copy of the edited proto.

    Embedded: every tensor inline; the data of main-graph initializers that lie in a file
    or are folded is written in place by ``wire.encode_model`` (never assembled in memory),
    other such tensors (subgraphs, Constant nodes) are read into the proto, they are small.
    External: what was external data stays external (in the new data file, its other keys
    such as a checksum kept), folded weights go there too, and, when the input had no
    external data, so do initializers of at least EXTERNAL_MIN_BYTES.
    Everything else stays exactly where it was.
    """

    def __init__(self, edited: Edited, data_name: str | None):
        self.proto = onnx.ModelProto()
        self.proto.CopyFrom(edited.proto)
        self.data_name = data_name
        self.streamed: dict[int, ir.TensorProtocol] = {}  # main-graph initializer index -> data
        self.external: dict[int, ir.TensorProtocol] = {}  # order in the data file -> data
        move_inline = data_name is not None and not edited.input_external
        offset = 0
        main_index = 0
        for tensor, kind in all_tensors(self.proto):
            index = main_index if kind == "main" else None
            main_index += kind == "main"
            data = _data_of(tensor, kind, edited)
            nbytes = data.nbytes if data is not None else None
            if data_name is not None and tensor.data_type != onnx.TensorProto.STRING and (
                    tensor.data_location == onnx.TensorProto.EXTERNAL
                    or (tensor.name in edited.folded and kind != "attribute")
                    or (move_inline and kind != "attribute" and _inline_nbytes(tensor, data) >= EXTERNAL_MIN_BYTES)):
                if data is None:  # read now: the proto is about to point elsewhere
                    data = ir.Tensor(ir.serde.TensorProtoTensor(tensor).numpy(), dtype=ir.DataType(tensor.data_type))
                    nbytes = data.nbytes
                set_external(tensor, data_name, offset, nbytes)
                self.external[len(self.external)] = data
                offset += nbytes
            elif data is not None:
                if index is not None:
                    set_inline(tensor, None)
                    self.streamed[index] = data
                else:
                    set_inline(tensor, _tensor_bytes(data).tobytes())
        self.lengths = [self.streamed[i].nbytes if i in self.streamed else None for i in range(main_index)]
        self.embedded_bytes = self.proto.ByteSize() + sum(t.nbytes for t in self.streamed.values())

    def write_model(self, path: Path, callback: Callable | None) -> None:
        skeleton = self.proto.SerializeToString()
        pieces = wire.encode_model(skeleton, self.lengths) if self.streamed else [skeleton]
        _, extension = os.path.splitext(path)
        if onnx.serialization.registry.get_format_from_file_extension(extension) not in (None, "protobuf"):
            # A text format (the output's extension asks for it) needs the whole message.
            buffer = _io.BytesIO()
            _write_pieces(buffer, pieces, self.streamed, callback)
            onnx.save_model(onnx.ModelProto.FromString(buffer.getvalue()), str(path))
            return
        with open(path, "wb", buffering=0) as handle:
            _write_pieces(handle, pieces, self.streamed, callback)


def _data_of(tensor: onnx.TensorProto, kind: str, edited: Edited) -> ir.TensorProtocol | None:
    """The data of a tensor the proto does not hold: folded, left in the input file, or
    external; None for a tensor whose data is in the proto."""
    source = edited.source
    if tensor.name in edited.folded and not tensor.HasField("raw_data") and kind != "attribute":
        return edited.folded[tensor.name]
    if kind == "main" and tensor.name in source.spans and not tensor.HasField("raw_data") \
            and tensor.data_location != onnx.TensorProto.EXTERNAL:
        return source.model.graph.initializers[tensor.name].const_value
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        path, offset, length = external_range(tensor, source.base_dir)
        dtype = ir.DataType(tensor.data_type)
        if length == 0:
            return ir.Tensor(np.empty(tuple(tensor.dims), dtype=dtype.numpy()), dtype=dtype)
        return ir.ExternalTensor(str(path), offset, length, dtype, shape=ir.Shape(tuple(tensor.dims)),
                                 name=tensor.name)
    return None


def _inline_nbytes(tensor: onnx.TensorProto, data: ir.TensorProtocol | None) -> int:
    if data is not None:
        return data.nbytes
    if tensor.HasField("raw_data"):
        return len(tensor.raw_data)
    return tensor.ByteSize()


def _edited_from_ir(model: ir.Model) -> Edited:
    """An onnx_ir model as an Edited proto: tensors in files or computed on writing become
    data-less placeholders whose data is streamed; nothing is read into memory for it."""
    streamed: dict[str, ir.TensorProtocol] = {}
    values = [v for graph in model.graphs() for v in graph.initializers.values() if v.const_value is not None]
    placeholders = {}
    for value in values:
        tensor = value.const_value
        if _streamable(tensor) or isinstance(tensor, ir.ExternalTensor):
            streamed[value.name] = tensor
            placeholders[value] = ir.ExternalTensor("", None, None, tensor.dtype, shape=tensor.shape, name=value.name,
                                                    doc_string=tensor.doc_string,
                                                    metadata_props=dict(tensor.metadata_props) or None)
    originals = {value: value.const_value for value in placeholders}
    try:
        for value, placeholder in placeholders.items():
            value.const_value = placeholder
        proto = ir.serde.serialize_model(model)
    finally:
        for value, tensor in originals.items():
            value.const_value = tensor
    for tensor, _ in all_tensors(proto):
        if tensor.name in streamed and tensor.data_location == onnx.TensorProto.EXTERNAL:
            set_inline(tensor, None)
    external = any(isinstance(t, ir.ExternalTensor) and not isinstance(t, EmbeddedTensor) for t in streamed.values())
    return Edited(proto, Source(proto=proto, model=model), streamed, external)


def _streamable(tensor: ir.TensorProtocol) -> bool:
    """Whether a weight's bytes go straight to the output: any tensor that lies in a file
    (its bytes are already ONNX's encoding) or is computed on writing, and large in-memory
    ones of whole bytes per element."""
    if tensor.dtype == ir.DataType.STRING:
        return False
    if isinstance(tensor, (ir.ExternalTensor, ir.LazyTensor)):
        return True
    return isinstance(tensor, ir.Tensor) and tensor.nbytes >= EMBEDDED_MIN_BYTES and tensor.dtype.bitwidth % 8 == 0


def _write_pieces(handle, pieces, sources: dict[int, ir.TensorProtocol], callback: Callable | None) -> None:
    """Write ``wire.encode_model``'s pieces (bytes, or the index of a tensor in ``sources``);
    tensors that must be computed are computed on worker threads ahead of the writer
    (numpy releases the GIL), copies run in the kernel."""
    computed = [index for index, tensor in sources.items() if not _in_file(tensor)]
    written = 0
    with _Prefetch(sources, computed, SAVE_IN_FLIGHT_BYTES) as prefetch:
        pending = bytearray()
        for piece in pieces:
            if isinstance(piece, bytes):
                pending += piece
                if len(pending) >= WRITE_BUFFER_BYTES:
                    _write_all(handle, pending)
                    pending.clear()
                continue
            _write_all(handle, pending)
            pending.clear()
            tensor = sources[piece]
            start = handle.tell()
            if _in_file(tensor):
                _copy_from_file(tensor, handle)
            else:
                _write_all(handle, prefetch.take(piece))
            _start_writeback(handle, start, handle.tell() - start)
            written += 1
            if callback is not None:
                callback(tensor, written, len(sources))
        _write_all(handle, pending)


def _start_writeback(handle, offset: int, length: int) -> None:
    """Have the kernel start writing these bytes to disk now (Linux ``sync_file_range``).

    The final fsync then has little left to wait for, and the dirty pages never pile up
    to where the kernel throttles the writer: on the bench's conv stack this took the
    fsync from ~0.15 s to ~0 and sped up the writes. A hint: a failure changes nothing
    (the fsync still makes the file durable), and elsewhere this is a no-op.
    """
    sync_file_range = _sync_file_range()
    if sync_file_range is not None and not isinstance(handle, _io.BytesIO):
        sync_file_range(handle.fileno(), offset, length, _SYNC_FILE_RANGE_WRITE)


_SYNC_FILE_RANGE_WRITE = 2


@functools.cache
def _sync_file_range() -> Callable | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def _in_file(tensor: ir.TensorProtocol) -> bool:
    return isinstance(tensor, ir.ExternalTensor) and tensor.nbytes > 0


class _Prefetch:
    """The bytes of tensors, in the order they will be taken, computed on two worker threads
    while the caller writes; at most ``budget`` bytes, or two tensors, are in flight."""

    def __init__(self, sources: dict[int, ir.TensorProtocol], order: list[int], budget: int):
        self._sources, self._order, self._budget = sources, list(reversed(order)), budget
        self._executor = ThreadPoolExecutor(max_workers=2) if order else None
        self._waiting: dict[int, Future] = {}
        self._waiting_bytes = 0

    def __enter__(self) -> _Prefetch:
        self._top_up()
        return self

    def __exit__(self, *exc_info) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)

    def take(self, index: int) -> memoryview:
        data = self._waiting.pop(index).result()
        self._waiting_bytes -= self._sources[index].nbytes
        self._top_up()
        return data

    def _top_up(self) -> None:
        while self._order and (len(self._waiting) < 2 or
                               self._waiting_bytes + self._sources[self._order[-1]].nbytes <= self._budget):
            index = self._order.pop()
            self._waiting[index] = self._executor.submit(_tensor_bytes, self._sources[index])
            self._waiting_bytes += self._sources[index].nbytes


def _tensor_bytes(tensor: ir.TensorProtocol) -> memoryview:
    """The tensor's little-endian bytes; a folded (lazy) tensor's straight from its array."""
    if isinstance(tensor, ir.LazyTensor):
        array = np.ascontiguousarray(tensor.numpy())
        if array.dtype.byteorder == ">":
            array = array.astype(array.dtype.newbyteorder("<"))
        data = memoryview(array.reshape(-1).view(np.uint8))
    else:
        data = memoryview(tensor.tobytes())
    if data.nbytes != tensor.nbytes:
        raise RuntimeError(f"tensor {tensor.name!r} gave {data.nbytes} bytes, its shape needs {tensor.nbytes}")
    return data


def _write_all(handle, data) -> None:
    view = memoryview(data)
    while view:
        written = handle.write(view)
        view = view[written:]


def _copy_from_file(tensor: ir.ExternalTensor, handle) -> None:
    """Append the tensor's bytes from its file to ``handle``: in the kernel where the file
    systems allow it, the rest through a bounded buffer."""
    source, offset, length = tensor.path, tensor.offset or 0, tensor.nbytes
    with open(source, "rb") as src:
        if isinstance(tensor, EmbeddedTensor):
            tensor.check_source(src.fileno())
        remaining = length - _kernel_copy(src.fileno(), handle, offset, length)
        src.seek(offset + length - remaining)
        while remaining:
            chunk = src.read(min(remaining, 8 * WRITE_BUFFER_BYTES))
            if not chunk:
                break
            _write_all(handle, chunk)
            remaining -= len(chunk)
    if remaining:
        raise InputError(f"{source}: ends before the {length} bytes of a tensor at offset {offset} "
                         "(the file changed while bnfold ran)")


def _kernel_copy(source_fd: int, handle, offset: int, length: int) -> int:
    """Bytes appended to ``handle`` by ``copy_file_range``: all of them, or fewer (maybe none)
    where the platform or the pair of file systems does not allow it."""
    copy_file_range = getattr(os, "copy_file_range", None)  # Linux only
    if copy_file_range is None or isinstance(handle, _io.BytesIO):
        return 0
    done = 0
    try:
        while done < length:
            copied = copy_file_range(source_fd, handle.fileno(), length - done, offset + done)
            if copied == 0:  # the source ends early: the buffered copy reports it
                break
            done += copied
    except OSError as exc:
        if exc.errno not in _NO_FILE_COPY:
            raise
    return done


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM while the block runs, then deliver them to the previous handlers.

    Python-level (not pthread_sigmask): any thread may receive the signal, but Python
    handlers always run in the main thread, which is where this swaps them.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    held = (signal.SIGINT, signal.SIGTERM)
    try:
        previous = {signum: signal.signal(signum, lambda signum, frame: pending.append(signum)) for signum in held}
    except ValueError:  # not the main interpreter: signals are not ours to hold
        previous = None
    if previous is None:
        yield
        return
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in pending:
            handler = previous[signum]
            if callable(handler):
                handler(signum, None)
            else:  # default or ignore: let the restored disposition decide
                signal.raise_signal(signum)


def _cause_of_type(exc: BaseException, kind: type) -> BaseException | None:
    """``exc`` or the first exception in its cause/context chain that is a ``kind``."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, kind):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


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
            if node.domain not in ("", "ai.onnx") or node.op_type not in ("Conv", "ConvTranspose", "Gemm"):
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


def linear_shape_problem(node: ir.Node, weight: tuple[int, ...], bias: tuple[int, ...] | None) -> str | None:
    """What is wrong with a Conv/ConvTranspose/Gemm weight and bias shape, if anything."""
    op = node.op_type
    if op == "Gemm":
        if len(weight) != 2:
            return f"Gemm weight B has shape {list(weight)}, a Gemm needs a 2-D B"
        n = weight[0] if node.attributes.get_int("transB", 0) else weight[1]
        if bias is not None and (len(bias) > 2 or (bias and bias[-1] not in (1, n))):
            return f"Gemm bias C of shape {list(bias)} does not broadcast to (M, {n})"
        return None
    group = node.attributes.get_int("group", 1)
    if len(weight) < 3 or group < 1 or weight[0] % group:
        return (f"{op} weight has shape {list(weight)} and group {group}: it needs rank >= 3 "
                "(channels, channels per group, kernel) and a group >= 1 dividing its first axis")
    channels = weight[0] if op == "Conv" else weight[1] * group
    if bias is not None and tuple(bias) != (channels,):
        return f"{op} bias has shape {list(bias)}, it needs [{channels}] (one per output channel)"
    return None


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


def _check_relative_name(name: str, target: Path) -> None:
    if os.path.isabs(name) or ".." in Path(name).parts:
        raise InputError(f"{target}: external data name {name!r} must be a plain name relative to the output folder")
    if not Path(name).parts or Path(name) == Path(target.name):
        raise InputError(f"{target}: external data name {name!r} must differ from the model file's name")


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
