"""Run onnxruntime sessions in a child process (``bnfold._ort_worker``) and get their outputs.

An onnxruntime crash on an untrusted model kills only the child and becomes an
InputError naming the session that was running.
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from bnfold import _ort_worker
from bnfold._ort_worker import PROGRESS_PREFIX
from bnfold.errors import InputError

#: The worker runs from its file, so the child needs no import path to bnfold: requests and
#: results hold only builtins and numpy arrays.
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


def run_in_child(request: dict) -> dict:
    """Run the sessions in a fresh interpreter; turn its crash into InputError.

    An error the worker reports (a model onnxruntime cannot load or run, a provider that
    is unavailable) comes back in ``result["error"]`` for the caller to word.
    """
    with tempfile.TemporaryDirectory(prefix="bnfold-verify-") as folder:
        result_path = Path(folder) / "result.pickle"
        with tempfile.TemporaryFile() as stderr_file:
            process = subprocess.run(
                [sys.executable, "-c", _WORKER_COMMAND, _ort_worker.__file__, str(result_path)],
                input=pickle.dumps(request, protocol=pickle.HIGHEST_PROTOCOL),
                stdout=subprocess.DEVNULL,
                stderr=stderr_file,
                env=child_environment(),
            )
            stderr_file.seek(0)
            stderr = stderr_file.read().decode(errors="replace")
        if process.returncode != 0 or not result_path.exists():
            raise InputError(child_failure(process.returncode, stderr))
        # The file comes from our own child in our own private temporary folder.
        with open(result_path, "rb") as handle:
            return pickle.load(handle)


def child_failure(returncode: int, stderr: str) -> str:
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
