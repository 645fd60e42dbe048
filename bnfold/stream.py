"""Stream a model's bytes to its file.

The output is written in pieces (``bnfold.wire.encode_model``): graph bytes, and large
tensors whose bytes never go through one in-memory message. Tensors that lie in a file
are copied file to file (in the kernel where it allows it); folded tensors are computed
on worker threads ahead of the writer. Written ranges are handed to the kernel's
writeback as they complete, so the final fsync has little left to do.
"""

from __future__ import annotations

import errno
import functools
import io as _io
import os
import sys
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from bnfold._onnx_ir import ir
from bnfold.errors import InputError
from bnfold.load import EmbeddedTensor

#: Bytes of computed (folded) tensors that may be in flight ahead of the writer (two
#: tensors are always allowed, so both workers stay busy whatever the tensor size).
SAVE_IN_FLIGHT_BYTES = 32 * 2**20
#: Small pieces of an output model are gathered up to this size before each write.
WRITE_BUFFER_BYTES = 2**20
#: Errors with which copy_file_range says "not between these files": copy through memory instead.
_NO_FILE_COPY = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EPERM,
                 errno.EBADF}


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
