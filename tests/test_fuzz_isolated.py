"""The composed fuzzer (tests/test_fuzz.py), run in a child process (tests/fuzz_runner.py).

A hypothesis failure in the child is a failure here, with the child's report. A child
killed by a signal (onnxruntime's rare SIGSEGV after thousands of sessions) is told apart:
its last recipe is checked again in a fresh process; a recipe that fails or crashes there
too is a failure, one that passes was onnxruntime's state, and the fuzzer runs again with
fresh seeds (at most three times).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

RUNNER = Path(__file__).resolve().parent / "fuzz_runner.py"
ATTEMPTS = 3


def test_composed_fuzzer(tmp_path):
    log = tmp_path / "recipe.txt"
    crashes = []
    for _ in range(ATTEMPTS):
        child = subprocess.run([sys.executable, str(RUNNER), str(log)], capture_output=True, text=True)
        if child.returncode == 0:
            return
        if child.returncode > 0:
            pytest.fail(f"the composed fuzzer failed:\n{child.stdout[-6000:]}\n{child.stderr[-12000:]}")
        recipe = log.read_text() if log.exists() else "(none)"
        replay = subprocess.run([sys.executable, str(RUNNER), "--replay", str(log)], capture_output=True, text=True)
        if replay.returncode != 0:
            pytest.fail(f"the fuzzer's process died (signal {-child.returncode}) and its last recipe fails in a "
                        f"fresh process too (exit {replay.returncode}):\nrecipe = {recipe}\n{replay.stderr[-6000:]}")
        crashes.append(recipe)
    pytest.fail(f"onnxruntime crashed {ATTEMPTS} times in a row (each recipe passes alone): {crashes}")
