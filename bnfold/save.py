"""Save models atomically.

Saving writes to a temporary folder beside the target and renames into place, so a
failed or interrupted run never leaves a partial output and never touches the input
(SIGINT/SIGTERM wait until the renames are done). ``_Layout`` decides where each
tensor's data goes, inline or in the external-data file; ``bnfold.stream`` writes the
bytes.
"""

from __future__ import annotations

import contextlib
import io as _io
import os
import shutil
import signal
import stat
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx

from bnfold import load, wire
from bnfold._onnx_ir import ir
from bnfold.errors import BnfoldError, InputError
from bnfold.load import PROTOBUF_LIMIT_BYTES, EmbeddedTensor
from bnfold.source import Source
from bnfold.stream import _tensor_bytes, _write_pieces
from bnfold.writer import Edited, all_tensors, external_range, set_external, set_inline

#: Headroom for the graph itself when deciding whether weights still fit inline.
EMBED_HEADROOM_BYTES = 64 * 2**20
#: In-memory initializers at least this large go to the external-data file when there is one.
EXTERNAL_MIN_BYTES = 1024


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
        problem = "is not a folder" if folder.exists() else "does not exist (bnfold creates no folder but --out-dir)"
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
    ones of whole bytes per element (the size at which loading leaves weights in the file,
    read through ``bnfold.load`` so that one setting governs both)."""
    if tensor.dtype == ir.DataType.STRING:
        return False
    if isinstance(tensor, (ir.ExternalTensor, ir.LazyTensor)):
        return True
    return (isinstance(tensor, ir.Tensor) and tensor.nbytes >= load.EMBEDDED_MIN_BYTES
            and tensor.dtype.bitwidth % 8 == 0)



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


class EditedModel:
    """What a result holding an edited model can do (``FoldResult``, ``RecalibrateResult``):
    needs ``edited`` (the Edited proto) and ``external_data`` (the input's choice)."""

    edited: Edited
    external_data: bool

    def save(self, path: str | os.PathLike, *, external_data: str | None | bool = None, callback=None) -> None:
        """Write atomically. ``external_data``: a file name, True for ``<name>.data``, False
        to embed; None keeps the input's choice (external stays external)."""
        target = Path(path)
        if external_data is None:
            external_data = self.external_data
        if external_data is True:
            external_data = f"{target.name}.data"
        save_edited(self.edited, target, external_data=external_data or None, callback=callback)

    def to_proto(self) -> onnx.ModelProto:
        """The model as a ModelProto (weights computed, external data read in)."""
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "model.onnx"
            self.save(path, external_data=False)
            return onnx.load(str(path))
