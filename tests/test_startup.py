"""What a bnfold process loads and starts: each command imports only what it uses (no
onnxruntime, torch, sympy, scipy or training code where it does no such work; no rich at
all when it prints nothing, none of rich's heavy renderers when it prints a table), the
``bnfold`` process asks numpy's BLAS for one thread, and ``verify`` starts its onnxruntime
process ahead of its request and never leaves it behind. Timings are bench/startup.py's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bnfold.verification import runner

PYTHON = sys.executable
MODELS = Path(__file__).resolve().parent.parent / "models"
MODEL = MODELS / "cnn_ts13.onnx"

#: Never imported by fold, inspect or verify's own process.
NEVER = ("onnxruntime", "torch", "sympy", "scipy", "sklearn", "bnfold.train")
#: rich's renderers that printing a ledger, findings or a report does not use.
HEAVY_RICH = ("rich.syntax", "rich.markdown", "rich.traceback", "rich.pretty", "rich.progress", "rich.live",
              "pygments", "markdown_it")

#: Runs the CLI in this fresh process as the ``bnfold`` command does (``lean_process``, then
#: ``main``) and prints which of the named modules it imported, or a prefix of them.
PROBE = r"""
import json, sys
from bnfold.cli import lean_process, main

names = json.loads(sys.argv[1])
sys.argv = ["bnfold", *sys.argv[2:]]
lean_process()
try:
    main()
except SystemExit as exc:
    code = exc.code
imported = sorted(n for n in names if any(m == n or m.startswith(n + ".") for m in sys.modules))
print(json.dumps({"code": code, "imported": imported}))
"""


def _imports(args: list[str], names: tuple[str, ...]) -> dict:
    done = subprocess.run([PYTHON, "-c", PROBE, json.dumps(names), *args], capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def folded(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("startup") / "folded.onnx"
    done = subprocess.run([PYTHON, "-m", "bnfold", "fold", str(MODEL), "-o", str(out), "-q"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return out


@pytest.mark.parametrize("command, quiet", [
    ("fold", True), ("fold", False), ("inspect", True), ("inspect", False), ("verify", True), ("verify", False),
])
def test_each_command_imports_only_what_it_uses(command, quiet, folded, tmp_path):
    """verify's own process reads the models and compares; onnxruntime runs in its worker."""
    if command == "verify":
        pytest.importorskip("onnxruntime", reason="verify needs onnxruntime (the [cpu] extra)")
    args = {"fold": ["fold", str(MODEL), "-o", str(tmp_path / "out.onnx")],
            "inspect": ["inspect", str(MODEL)],
            "verify": ["verify", str(MODEL), str(folded), "--providers", "cpu"]}[command]
    names = NEVER + (("rich",) if quiet else HEAVY_RICH)
    result = _imports(args + (["-q"] if quiet else []), names)
    assert result == {"code": 0, "imported": []}
    if not quiet:  # it did print, through rich
        assert _imports(args, ("rich.console",))["imported"] == ["rich.console"]


def test_the_bnfold_process_asks_for_one_blas_thread_unless_told_otherwise():
    """numpy's OpenBLAS would start a spinning thread per core at import; bnfold does no BLAS
    work. A thread count the user set wins, and ``bnfold train`` (torch) is left alone."""
    if (os.cpu_count() or 1) < 2:
        pytest.skip("OpenBLAS starts no extra thread on one core")
    probe = ("import os, sys; sys.argv = ['bnfold', *sys.argv[1:]]; from bnfold.cli import lean_process; "
             "lean_process(); import numpy; print(len(os.listdir('/proc/self/task')), "
             "os.environ.get('OPENBLAS_NUM_THREADS'))")
    clean = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS",
                                                               "OMP_NUM_THREADS")}

    def threads(*args: str, **env: str) -> str:
        done = subprocess.run([PYTHON, "-c", probe, *args], capture_output=True, text=True, timeout=60,
                              env={**clean, **env})
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    assert threads("fold", "m.onnx") == "1 1"
    assert threads("fold", "m.onnx", OPENBLAS_NUM_THREADS="2") == "2 2"
    assert threads("-q", "train").split()[1] == "None"


def test_verify_uses_the_worker_started_ahead(folded, monkeypatch):
    """One onnxruntime process per verification: the one started before the models were read."""
    pytest.importorskip("onnxruntime", reason="verify needs onnxruntime (the [cpu] extra)")
    from bnfold.verification import verify

    started = []
    original_init = runner.Worker.__init__

    def counting_init(self):
        started.append(self)
        original_init(self)

    monkeypatch.setattr(runner.Worker, "__init__", counting_init)
    with runner.worker_ahead():
        assert len(started) == 1
        report = verify(MODEL, folded, providers="cpu")
    assert report.passed
    assert len(started) == 1
    assert started[0]._process.returncode == 0  # it ran the sessions and ended on its own


def test_a_verify_that_fails_early_leaves_no_worker_behind(tmp_path, monkeypatch):
    """The worker is started before the models are read; an error then ends it and removes
    its folder, in the library and in the CLI (one line, exit 2, as ever)."""
    pytest.importorskip("onnxruntime", reason="verify needs onnxruntime (the [cpu] extra)")
    from bnfold.errors import InputError
    from bnfold.verification import verify

    started = []
    original_init = runner.Worker.__init__

    def spying_init(self):
        started.append(self)
        original_init(self)

    monkeypatch.setattr(runner.Worker, "__init__", spying_init)
    with pytest.raises(InputError, match="missing.onnx"):
        verify(MODEL, tmp_path / "missing.onnx", providers="cpu")
    assert len(started) == 1
    assert started[0]._process.returncode is not None
    assert not Path(started[0]._folder.name).exists()

    private = tmp_path / "tmp"
    private.mkdir()
    done = subprocess.run([PYTHON, "-m", "bnfold", "verify", str(MODEL), str(tmp_path / "missing.onnx")],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "TMPDIR": str(private)})
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "missing.onnx" in done.stderr
    assert list(private.glob("bnfold-*")) == []


def _on_a_terminal(argv: list[str]) -> tuple[subprocess.CompletedProcess, str]:
    """Run ``argv`` with its stdout on a pseudo-terminal; return it and what it showed."""
    import pty
    import threading

    main_fd, terminal_fd = pty.openpty()
    shown: list[bytes] = []

    def drain():  # concurrently: a full terminal buffer would block the command
        while True:
            try:
                chunk = os.read(main_fd, 65536)
            except OSError:  # the other end is closed and everything was read
                return
            if not chunk:
                return
            shown.append(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    try:
        done = subprocess.run(argv, stdout=terminal_fd, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                              timeout=60, env={**os.environ, "COLUMNS": "100"})
    finally:
        os.close(terminal_fd)
        reader.join(timeout=10)
        os.close(main_fd)
    return done, b"".join(shown).decode(errors="replace")


def test_help_is_plain_text_off_a_terminal_and_rich_on_one():
    """--help in a pipe or a log needs none of rich's renderers (0.05 s of imports); at a
    terminal it keeps rich's panels."""
    result = _imports(["--help"], ("rich", "onnx", "numpy") + NEVER)
    assert result == {"code": 0, "imported": []}
    piped = subprocess.run([PYTHON, "-m", "bnfold", "--help"], capture_output=True, text=True, timeout=60)
    assert piped.returncode == 0 and "Commands:" in piped.stdout and "╭" not in piped.stdout

    done, shown = _on_a_terminal([PYTHON, "-m", "bnfold", "--help"])
    assert done.returncode == 0, done.stderr
    assert "╭" in shown and "fold" in shown
