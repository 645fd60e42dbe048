"""Runs the composed fuzzer (tests/test_fuzz.py) in this process, for
tests/test_fuzz_isolated.py, which starts it as a child.

onnxruntime 1.32 occasionally crashes (SIGSEGV) creating a session after thousands of
sessions in one process, on models that load fine in a fresh one. A crash must neither end
the whole test run nor pass unnoticed, so the fuzzer runs in a child process that writes
each recipe to LOG before checking it; the parent replays a crashed recipe in a fresh
process to tell onnxruntime's flake from a real failure.

``python tests/fuzz_runner.py LOG`` fuzzes (examples from the hypothesis profile);
``python tests/fuzz_runner.py --replay LOG`` checks the last recipe in LOG once.
"""

from __future__ import annotations

import importlib
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

importlib.import_module("conftest")  # registers and loads the hypothesis profiles
test_fuzz = importlib.import_module("test_fuzz")


def main(argv: list[str]) -> int:
    replay = argv[:1] == ["--replay"]
    log = Path(argv[-1])
    check = test_fuzz.check_recipe
    if replay:
        with tempfile.TemporaryDirectory() as folder:
            check(eval(log.read_text()), Path(folder))  # a repr of a plain dict, written below
        return 0

    def logged(recipe, workdir):
        with open(log, "w") as handle:
            handle.write(repr(recipe))
            handle.flush()
            os.fsync(handle.fileno())
        return check(recipe, workdir)

    test_fuzz.check_recipe = logged
    test_fuzz.test_fold_composed_graphs()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
