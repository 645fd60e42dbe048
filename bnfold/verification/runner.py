"""Run onnxruntime sessions in a child process (``bnfold._ort_worker``) and get their outputs.

An onnxruntime crash on an untrusted model kills only the child and becomes an
InputError naming the session that was running.

The child is started ahead of its request (``worker_ahead``): its interpreter, numpy and
onnxruntime load while this process is still importing and reading the models, on the
other core. This module imports nothing heavy, so that the CLI can start the child first.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bnfold.errors import InputError

#: The worker runs from its file, so the child needs no import path to bnfold: requests and
#: results hold only builtins and numpy arrays. Found without importing it (it imports numpy).
WORKER_FILE = importlib.util.find_spec("bnfold._ort_worker").origin
#: The child skips the interpreter's teardown (~45 ms of onnxruntime and numpy), as the
#: ``bnfold`` command does: its result file is written and closed by the time main returns.
_WORKER_COMMAND = ("import os, runpy, sys; code = runpy.run_path(sys.argv[1])['main'](sys.argv[2]); "
                   "sys.stdout.flush(); sys.stderr.flush(); os._exit(code)")
#: glibc malloc settings for the child. onnxruntime's layout transformer frees the weights it
#: reorders; from glibc's heap that memory would stay resident, so buffers of 1 MiB and more
#: are mapped on their own and go back to the system when freed, in transparent huge pages
#: where the kernel allows (fewer page faults than the heap: faster, too). Measured in
#: bench/verify_memory.py. Settings the user gives in GLIBC_TUNABLES win; other C libraries
#: ignore the variable.
MALLOC_TUNABLES = {"glibc.malloc.mmap_threshold": str(2**20), "glibc.malloc.hugetlb": "1"}


def child_environment(environ=os.environ) -> dict[str, str]:
    """``environ`` with MALLOC_TUNABLES added to GLIBC_TUNABLES where it does not set them."""
    given = environ.get("GLIBC_TUNABLES", "")
    set_keys = {item.split("=", 1)[0] for item in given.split(":") if item}
    added = [f"{key}={value}" for key, value in MALLOC_TUNABLES.items() if key not in set_keys]
    return {**environ, "GLIBC_TUNABLES": ":".join(filter(None, [given, *added]))}


class Worker:
    """One onnxruntime child: started at construction, given one request by ``run``; it
    loads numpy and onnxruntime, then waits for the request on its stdin. ``close`` ends
    it if it was never given one, and removes its files."""

    def __init__(self) -> None:
        self._folder = tempfile.TemporaryDirectory(prefix="bnfold-verify-")
        self._result_path = Path(self._folder.name) / "result.pickle"
        self._stderr = tempfile.TemporaryFile()
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-c", _WORKER_COMMAND, WORKER_FILE, str(self._result_path)],
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=self._stderr, env=child_environment())
        except BaseException:
            self._stderr.close()
            self._folder.cleanup()
            raise

    def run(self, request: dict) -> dict:
        """Send ``request``, wait for the child, return its result; its crash is an InputError.

        An error the worker reports (a model onnxruntime cannot load or run, a provider that
        is unavailable) comes back in ``result["error"]`` for the caller to word.
        """
        try:
            self._process.stdin.write(pickle.dumps(request, protocol=pickle.HIGHEST_PROTOCOL))
            self._process.stdin.close()
        except BrokenPipeError:  # the child ended before reading it: its exit code says why
            pass
        returncode = self._process.wait()
        if returncode != 0 or not self._result_path.exists():
            self._stderr.seek(0)
            raise InputError(child_failure(returncode, self._stderr.read().decode(errors="replace")))
        # The file comes from our own child in our own private temporary folder.
        with open(self._result_path, "rb") as handle:
            return pickle.load(handle)

    def close(self) -> None:
        if self._process.poll() is None:  # never given its request (an error on the way, an interrupt)
            self._process.kill()
            self._process.wait()
        if not self._process.stdin.closed:
            try:
                self._process.stdin.close()
            except BrokenPipeError:
                pass
        self._stderr.close()
        self._folder.cleanup()


#: A worker started by ``worker_ahead`` that no ``run_in_child`` has used yet.
_ahead: list[Worker] = []


@contextmanager
def worker_ahead() -> Iterator[None]:
    """Start the worker now, for the first ``run_in_child`` inside this block; one started
    by an enclosing block is used instead. The worker is ended on leaving the block."""
    if _ahead:
        yield
        return
    worker = Worker()
    _ahead.append(worker)
    try:
        yield
    finally:
        if worker in _ahead:
            _ahead.remove(worker)
        worker.close()


def run_in_child(request: dict) -> dict:
    """Run the sessions in a fresh interpreter (the one started ahead, if any); turn its
    crash into InputError. See ``Worker.run``."""
    if _ahead:
        return _ahead.pop().run(request)  # closed by its worker_ahead block
    worker = Worker()
    try:
        return worker.run(request)
    finally:
        worker.close()


def child_failure(returncode: int, stderr: str) -> str:
    from bnfold._ort_worker import PROGRESS_PREFIX  # here: that module imports numpy

    running = [line[len(PROGRESS_PREFIX):] for line in stderr.splitlines() if line.startswith(PROGRESS_PREFIX)]
    where = f" running {running[-1]}" if running else " starting up"
    if returncode < 0:
        try:
            name = f", {signal.Signals(-returncode).name}"
        except ValueError:
            name = ""
        return f"onnxruntime crashed (signal {-returncode}{name}){where}"
    details = [line for line in stderr.splitlines() if line.strip() and not line.startswith(PROGRESS_PREFIX)]
    tail = f": {details[-1].strip()}" if details else ""
    return f"the onnxruntime worker process failed (exit {returncode}){where}{tail}"
