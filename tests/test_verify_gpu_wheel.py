"""``--providers cuda`` never reports a CPU run as CUDA, tested with a real onnxruntime-gpu wheel.

onnxruntime-gpu offers CUDAExecutionProvider even where no GPU or CUDA library is usable;
sessions then fall back to CPU. The test runs ``bnfold verify`` under an interpreter that
has onnxruntime-gpu (this one, or ``$BNFOLD_ORT_GPU_PYTHON``, default
``/tmp/ortgpu-venv/bin/python``: ``python3 -m venv /tmp/ortgpu-venv && /tmp/ortgpu-venv/bin/pip
install onnxruntime-gpu numpy onnx onnx-ir typer rich ml_dtypes``) and skips where there is none.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from _models import ConvBnParams, conv_bn_model, save

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.gpu_wheel


def _gpu_python() -> str | None:
    probe = "import onnxruntime as o, sys; sys.exit(0 if 'CUDAExecutionProvider' in o.get_available_providers() else 1)"
    for candidate in (sys.executable, os.environ.get("BNFOLD_ORT_GPU_PYTHON", "/tmp/ortgpu-venv/bin/python")):
        if candidate and Path(candidate).exists() and subprocess.run([candidate, "-c", probe]).returncode == 0:
            return candidate
    return None


GPU_PYTHON = _gpu_python()


@pytest.mark.skipif(GPU_PYTHON is None, reason="no interpreter with onnxruntime-gpu (set BNFOLD_ORT_GPU_PYTHON)")
def test_cuda_is_either_really_used_or_an_error_with_the_reason(tmp_path):
    params = ConvBnParams.random(np.random.default_rng(0), 4, 3, (3, 3))
    original = save(conv_bn_model(params), tmp_path / "o.onnx")
    folded = save(conv_bn_model(params, folded=True), tmp_path / "f.onnx")
    env = dict(os.environ, PYTHONPATH=str(ROOT))

    run = subprocess.run([GPU_PYTHON, "-m", "bnfold", "verify", str(original), str(folded), "--providers", "cuda",
                          "--json", str(tmp_path / "r.json"), "-q"], capture_output=True, text=True, env=env)
    print(run.stderr.strip().splitlines()[-1] if run.stderr.strip() else "(no stderr)")
    if run.returncode == 0:  # a usable GPU: CUDA really ran
        report = json.loads((tmp_path / "r.json").read_text())
        assert "CUDAExecutionProvider" in report["providers"]
    else:
        assert run.returncode == 2, run.stderr
        error = run.stderr.strip().splitlines()[-1]
        assert "fell back from CUDAExecutionProvider" in error
        reason = error.split("(optimizations disabled): ")[1]
        assert len(reason) > len(str(original)) + 10  # onnxruntime's reason follows the model path
        assert not (tmp_path / "r.json").exists()

    auto = subprocess.run([GPU_PYTHON, "-m", "bnfold", "verify", str(original), str(folded), "--providers", "auto",
                           "--json", str(tmp_path / "a.json"), "-q"], capture_output=True, text=True, env=env)
    assert auto.returncode == 0, auto.stderr
    report = json.loads((tmp_path / "a.json").read_text())
    if "CUDAExecutionProvider" not in report["providers"]:
        assert any("fell back" in note for note in report["notes"])
