"""bench/gpu_check.sh: one command that folds and verifies models on CUDA.

CI has no GPU, so the no-GPU path runs as is (one line, exit 77), and the machinery
(fold --verify, the reports, the provider check, the summary and exit codes) runs with the
CPU provider in its place and with CUDA required where it is missing.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import onnxruntime as ort
import pytest

ROOT = Path(__file__).resolve().parents[1]
CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"


def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # its dataclass reads its own module
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(CUDA in ort.get_available_providers(), reason="onnxruntime here offers CUDA: not the no-GPU path")
def test_without_a_gpu_it_says_so_in_one_line(tmp_path):
    result = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), str(tmp_path / "reports")],
                            capture_output=True, text=True, env={"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"})

    assert result.returncode == 77, (result.stdout, result.stderr)
    assert result.stdout.count("\n") == 1 and result.stderr == "", (result.stdout, result.stderr)
    assert result.stdout.startswith("gpu_check: no usable CUDA here, nothing verified: ")
    assert CUDA in result.stdout  # onnxruntime's own reason, as bnfold verify --providers cuda words it
    assert not (tmp_path / "reports").exists()


def test_usage_without_a_folder_is_exit_2():
    result = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh")], capture_output=True, text=True,
                            env={"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"})
    assert result.returncode == 2 and "usage" in result.stderr


def test_the_machinery_on_the_cpu_provider(tmp_path, capsys):
    """Bundled models (a training-mode one too) and a corpus model, folded and verified; the
    reports show the provider; every line and the summary say PASS."""
    check = gpu_check()
    models = [(name, ROOT / "models" / f"{name}.onnx", ROOT / "models" / f"{name}.npz")
              for name in ("cnn_ts13", "cnn-trainmode_ts13")]
    check.CORPUS = {"onnx.tf2onnx_dense_bn-onnx": None, "timm.resnet10t-ts": "no_such_module_here"}

    code = check.run(tmp_path / "out", provider=CPU, models=models)

    lines = capsys.readouterr().out.splitlines()
    assert code == check.EXIT_OK, lines
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [(m["model"], m["status"]) for m in summary["models"]] == [
        ("timm.resnet10t-ts", "SKIPPED"), ("cnn_ts13", "PASS"), ("cnn-trainmode_ts13", "PASS"),
        ("onnx.tf2onnx_dense_bn-onnx", "PASS")]
    for name in ("cnn_ts13", "cnn-trainmode_ts13", "onnx.tf2onnx_dense_bn-onnx"):
        report = json.loads((tmp_path / "out" / f"{name}.verify.json").read_text())
        assert report["verdict"] == "PASS" and CPU in report["providers"]
        assert json.loads((tmp_path / "out" / f"{name}.ledger.json").read_text())["schema"] == "bnfold.ledger"
    trainmode = json.loads((tmp_path / "out" / "cnn-trainmode_ts13.verify.json").read_text())
    assert trainmode["reference"] == "original-inference"
    assert lines[-1].startswith("gpu_check: 3 PASS, 1 SKIPPED on CPUExecutionProvider")


@pytest.mark.skipif(CUDA in ort.get_available_providers(), reason="onnxruntime here offers CUDA")
def test_a_model_that_did_not_run_on_cuda_is_an_error(tmp_path):
    check = gpu_check()
    models = [("cnn_ts13", ROOT / "models" / "cnn_ts13.onnx", None)]

    code = check.run(tmp_path / "out", provider=CUDA, models=models, corpus=False)

    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert code == check.EXIT_ERROR and summary["models"][0]["status"] == "ERROR"
    assert CUDA in summary["models"][0]["detail"]


def test_a_passing_report_without_cuda_among_its_providers_is_an_error(tmp_path):
    """Belt and braces beside --providers cuda: a report is read for what actually ran. Here
    bnfold is asked for the CPU (the helper rewrites the provider), and the report, though
    it passed, does not show CUDA."""
    check = gpu_check()
    real = check.bnfold
    check.bnfold = lambda *args, **kwargs: real(*["cpu" if arg == "cuda" else arg for arg in args], **kwargs)

    outcome = check.check_model("cnn_ts13", ROOT / "models" / "cnn_ts13.onnx", tmp_path, CUDA)

    report = json.loads((tmp_path / "cnn_ts13.verify.json").read_text())
    assert report["verdict"] == "PASS" and report["providers"] == [CPU]
    assert outcome.status == "ERROR" and "not CUDAExecutionProvider" in outcome.detail
