"""The child process in which ``bnfold.verify`` runs onnxruntime.

Kept apart from ``bnfold.verification`` so the child imports only numpy and onnxruntime (not
onnx or onnx_ir): it starts once per verification, and its start-up is pure overhead.
The parent starts this file by path ahead of time and pickles a request to its stdin; the
child pickles the outputs (or an error) to the file named on its command line and, before
each session, names it on stderr so that a crash can be attributed.
"""

from __future__ import annotations

import os
import pickle
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
PROGRESS_PREFIX = "bnfold-verify-worker: "
#: The session option naming the folder of external data for a model given as bytes, and
#: the first onnxruntime whose graph optimizers read data placed so (1.18-1.20 fail with
#: "model_path must not be empty"): see ``bnfold.verification.mapped``.
DATA_FOLDER_OPTION = "session.model_external_initializers_file_folder_path"
FIRST_MAPPING_VERSION = (1, 21)
#: onnx.TensorProto.BFLOAT16, without importing onnx here.
_ONNX_BFLOAT16 = 16


def main(result_path: str) -> int:
    """Entry point: run every requested session, pickle the outputs or the error.

    onnxruntime is imported before the request is read: the parent starts this process
    ahead of its request (``bnfold.verification.runner.worker_ahead``). A parent that ends
    without sending one closes the pipe (or kills this process): exit quietly then.
    """
    import onnxruntime  # noqa: F401

    try:
        request = pickle.load(sys.stdin.buffer)
    except EOFError:
        return 0
    result = run_sessions(request)
    Path(result_path).write_bytes(pickle.dumps(result))
    return 0


def run_sessions(request: dict) -> dict:
    """Run each session of ``request["sessions"]`` on every feed; stop at the first error.

    Sessions run one after another and each is released before the next is created, so
    memory holds one session (and the outputs so far) at a time. ``outputs`` is aligned
    with the sessions: a dict of output name to one array per feed, or None for a session
    skipped because its optional provider is unusable.
    """
    import gc

    import onnxruntime as ort

    available = ort.get_available_providers()
    result: dict[str, Any] = {
        "onnxruntime_version": ort.__version__,
        "available_providers": available,
        "notes": [],
        "outputs": [],
        "error": None,
        "run_error": None,
    }
    unusable: set[str] = set()
    for provider, required in request["required"].items():
        if provider in available:
            continue
        if required:
            result["error"] = _unavailable_message(provider, available)
            return result
        unusable.add(provider)
        result["notes"].append(f"{provider} is not available in this onnxruntime; ran on {CPU} only")
    if CUDA in request["required"] and CUDA not in unusable and hasattr(ort, "preload_dlls"):
        # onnxruntime-gpu >= 1.21: load CUDA and cuDNN from the nvidia-* wheels if present.
        with _captured_stderr() as captured:
            try:
                ort.preload_dlls()
            except Exception as exc:  # a failure here shows again, with its reason, at session creation
                captured.append(_first_line(exc))
    for session_request in request["sessions"]:
        provider, what = session_request["provider"], session_request["label"]
        if provider in unusable:
            result["outputs"].append(None)
            continue
        providers: list = [(CUDA, request["cuda_options"]), CPU] if provider == CUDA else [CPU]
        mapped = session_request.get("mapped")
        if mapped is not None and _file_identity(mapped["file"]) != mapped["identity"]:
            result["error"] = f"{what}: the model file changed while it was being verified; verify it again"
            return result
        _report_progress(what)
        with _captured_stderr(enabled=provider != CPU) as log:
            try:
                session = _create_session(ort, session_request, providers, result["notes"])
            except Exception as exc:  # onnxruntime raises its own exception types for bad models
                result["error"] = f"onnxruntime could not load {what} ({_first_line(exc)})"
                return result
        if provider not in session.get_providers():
            del session
            reason = _provider_failure_reason(log)
            message = f"onnxruntime fell back from {provider} to {', '.join(providers[1:])}"
            if request["required"][provider]:
                result["error"] = (f"{message} for {what}: {reason or 'it gave no reason'}; check the GPU, the "
                                   "driver and the CUDA and cuDNN libraries onnxruntime-gpu needs")
                return result
            unusable.add(provider)
            result["notes"].append(f"{message} ({reason or 'no reason given'}); ran on {CPU} only")
            result["outputs"].append(None)
            continue
        names = [output.name for output in session.get_outputs()]
        outputs: dict[str, list[np.ndarray]] = {name: [] for name in names}
        for run, feed in enumerate(request["feeds"]):
            try:
                values = session.run_with_ort_values(names, {k: _to_ort_value(ort, v) for k, v in feed.items()})
            except Exception as exc:  # onnxruntime raises its own exception types at run time
                result["error"] = f"onnxruntime failed running {what}"
                result["run_error"] = {"run": run, "message": _first_line(exc), "text": str(exc)}
                return result
            for name, value in zip(names, values):
                outputs[name].append(_ort_value_to_numpy(value))
            del values
        del session
        gc.collect()
        result["outputs"].append(outputs)
    return result


def _create_session(ort, session_request: dict, providers: list, notes: list[str]):
    """A session of the model with its large weights mapped from the file where this
    onnxruntime can (``bnfold.verification.mapped``), else of the path. Should the mapped
    load fail, the path is tried before giving up, and a note says so. onnxruntime's
    Python API takes only UTF-8 paths: a file whose name is not is given as its bytes."""

    def options():
        made = ort.SessionOptions()
        if not session_request["optimize"]:
            made.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        return made

    mapped = session_request.get("mapped")
    if mapped is not None and _version(ort.__version__) >= FIRST_MAPPING_VERSION:
        try:
            mapping = options()
            mapping.add_session_config_entry(DATA_FOLDER_OPTION, mapped["folder"])
            return ort.InferenceSession(mapped["model"], mapping, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types
            note = (f"onnxruntime could not map the weights of {session_request['path']} ({_first_line(exc)}); "
                    "it was given the file instead")
            if note not in notes:
                notes.append(note)
    path = session_request["path"]
    if _is_utf8(path):
        return ort.InferenceSession(path, options(), providers=providers)
    with open(path, "rb") as handle:
        content = handle.read()
    whole = options()
    folder = os.path.dirname(os.path.abspath(path))
    if _is_utf8(folder):  # where its external data, if any, lies
        whole.add_session_config_entry(DATA_FOLDER_OPTION, folder)
    return ort.InferenceSession(content, whole, providers=providers)


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes of a file name (surrogate escapes)
        return False
    return True


def _version(text: str) -> tuple[int, ...]:
    """``"1.22.0"`` -> ``(1, 22)``; a version it cannot read counts as old."""
    match = re.match(r"(\d+)\.(\d+)", text)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def _file_identity(path: str) -> list[int] | None:
    """What ``bnfold.load.file_identity`` records, or None if the file is gone."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return [stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns]


class _captured_stderr:
    """Copy what native code writes to fd 2 meanwhile into a list of lines (and pass it on)."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.lines: list[str] = []

    def __enter__(self) -> list[str]:
        if self.enabled:
            import tempfile

            sys.stderr.flush()
            self._file = tempfile.TemporaryFile()
            self._saved = os.dup(2)
            os.dup2(self._file.fileno(), 2)
        return self.lines

    def __exit__(self, *exc_info) -> None:
        if not self.enabled:
            return
        sys.stderr.flush()
        os.dup2(self._saved, 2)
        os.close(self._saved)
        self._file.seek(0)
        text = self._file.read().decode(errors="replace")
        self._file.close()
        sys.stderr.write(text)
        self.lines[:0] = [line for line in text.splitlines() if line.strip()]


_REASON_PATTERNS = ("cannot open shared object", "Failed to load", "LoadLibrary", "CUDA failure", "cudaError",
                    "no CUDA-capable device", "CUDA driver version", "cuDNN", "libcu", "Error")


def _provider_failure_reason(lines: list[str]) -> str:
    """The line of onnxruntime's log that says why a provider did not load, trimmed."""
    for pattern in _REASON_PATTERNS:
        for line in lines:
            if pattern.lower() in line.lower():
                return re.sub(r"^.*?\] ", "", line.strip())[:400]
    return lines[-1].strip()[:400] if lines else ""


def _report_progress(what: str) -> None:
    """Say on stderr what runs next, so the parent can name it if onnxruntime crashes."""
    sys.stderr.write(f"{PROGRESS_PREFIX}{what}\n")
    sys.stderr.flush()


def _unavailable_message(provider: str, available: list[str]) -> str:
    message = f"{provider} is not available in this onnxruntime (it offers {', '.join(available)})"
    if provider == CUDA:
        message += ("; install the GPU build, onnxruntime-gpu: pip uninstall -y onnxruntime && pip install '.[gpu]' "
                    "(from a clone of bnfold)")
    return message


def _to_ort_value(ort, array: np.ndarray):
    """onnxruntime's Python API takes bfloat16 only as raw 16-bit words with an ONNX type."""
    if array.dtype.name == "bfloat16":
        words = np.ascontiguousarray(array).view(np.uint16)
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(words, _ONNX_BFLOAT16)
    return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array))


def _ort_value_to_numpy(value) -> np.ndarray:
    """Copy an output to numpy; onnxruntime has no numpy type for bfloat16, so copy its bytes."""
    if value.data_type() != "tensor(bfloat16)":
        return value.numpy()
    import ctypes

    import ml_dtypes

    if value.device_name().lower() != "cpu":  # session.run returns host copies; never read a device pointer
        raise RuntimeError(f"bfloat16 output on {value.device_name()}, expected a host copy")
    shape = tuple(value.shape())
    count = int(np.prod(shape, dtype=np.int64))
    words = np.empty(0, np.uint16)
    if count:
        words = np.ctypeslib.as_array((ctypes.c_uint16 * count).from_address(value.data_ptr())).copy()
    return words.reshape(shape).view(ml_dtypes.bfloat16)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
