"""The ``fold`` and ``inspect`` commands: default paths, reports, exit codes, quiet
output, and a light import footprint (no onnxruntime or torch for --help or a fold)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
import pytest
from cli_runner import invoke
from builders import GraphBuilder, count_ops, run

from bnfold.cli import default_output

PYTHON = sys.executable
FEEDS = {"x": np.random.default_rng(2).standard_normal((1, 3, 8, 8)).astype(np.float32)}


def conv_bn_relu_bn() -> onnx.ModelProto:
    """Conv -> BN (foldable) -> Relu -> BN (kept: no linear producer)."""
    b = GraphBuilder(seed=3)
    x = b.input([1, 3, 8, 8])
    c = b.node("Conv", [x, b.random([4, 3, 3, 3])], name="conv", pads=[1, 1, 1, 1])
    y = b.bn(c, 4, name="bn_a")
    r = b.node("Relu", [y], name="relu")
    b.output(b.bn(r, 4, name="bn_b"))
    return b.model()


def conv_bn() -> onnx.ModelProto:
    b = GraphBuilder(seed=4)
    x = b.input([1, 3, 8, 8])
    c = b.node("Conv", [x, b.random([4, 3, 3, 3]), b.random([4])], name="conv", pads=[1, 1, 1, 1])
    b.output(b.bn(c, 4, name="bn"))
    return b.model()


@pytest.fixture
def folds_all(tmp_path):
    path = tmp_path / "net.onnx"
    onnx.save(conv_bn(), path)
    return path


@pytest.fixture
def keeps_one(tmp_path):
    path = tmp_path / "mixed.onnx"
    onnx.save(conv_bn_relu_bn(), path)
    return path


# ---------------------------------------------------------------------------------------
# fold


def test_default_output_name():
    assert default_output(Path("a/model.onnx")) == Path("a/model.folded.onnx")
    assert default_output(Path("model")) == Path("model.folded.onnx")
    assert default_output(Path("x.v2.onnx")) == Path("x.v2.folded.onnx")


def test_fold_writes_default_output_beside_input(folds_all):
    result = invoke("fold", folds_all)
    assert result.exit_code == 0, result.output
    out = folds_all.with_name("net.folded.onnx")
    assert sorted(p.name for p in folds_all.parent.iterdir()) == ["net.folded.onnx", "net.onnx"]
    folded = onnx.load(out)
    assert count_ops(folded, "BatchNormalization") == 0
    for expected, actual in zip(run(folds_all, FEEDS), run(out, FEEDS)):
        np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-5)
    assert "net.folded.onnx" in result.stdout and "1 of 1" in result.stdout


def test_fold_default_output_for_name_without_suffix(tmp_path):
    path = tmp_path / "model"
    onnx.save(conv_bn(), path)
    assert invoke("fold", path, "-q").exit_code == 0
    assert (tmp_path / "model.folded.onnx").is_file()


def test_fold_json_ledger(keeps_one, tmp_path):
    report = tmp_path / "ledger.json"
    out = tmp_path / "out.onnx"
    result = invoke("fold", keeps_one, "-o", out, "--json", report, "-q")
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert data["schema"] == "bnfold.ledger"
    assert data["schema_version"] == 3
    assert data["input"] == str(keeps_one) and data["output"] == str(out)
    assert {k: data["summary"][k] for k in ("bn_total", "folded", "kept")} == {"bn_total": 2, "folded": 1, "kept": 1}
    by_bn = {e["node"]: e for e in data["entries"] if e["op"] == "BatchNormalization"}
    assert set(by_bn) == {"bn_a", "bn_b"}
    assert by_bn["bn_a"]["status"] == "folded" and by_bn["bn_a"]["into"] == "conv"
    assert by_bn["bn_a"]["reason"] is None
    assert by_bn["bn_b"]["status"] == "kept" and by_bn["bn_b"]["reason"] == "no-linear-producer"
    assert by_bn["bn_b"]["into"] is None
    assert count_ops(onnx.load(out), "BatchNormalization") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ledger.json", "mixed.onnx", "out.onnx"]


def test_strict_exits_1_when_a_bn_is_kept(keeps_one, tmp_path):
    out = tmp_path / "out.onnx"
    result = invoke("fold", keeps_one, "-o", out, "--strict", "-q")
    assert result.exit_code == 1, result.output
    assert out.is_file()  # the output is still written: --strict only reports
    assert invoke("fold", keeps_one, "-o", out, "-q").exit_code == 0


def test_strict_exits_0_when_everything_folds(folds_all):
    result = invoke("fold", folds_all, "--strict", "-q")
    assert result.exit_code == 0, result.output


def test_quiet_prints_nothing_on_success(keeps_one, tmp_path):
    result = invoke("fold", keeps_one, "-o", tmp_path / "o.onnx", "--quiet")
    assert result.exit_code == 0
    assert result.stdout == "" and result.stderr == "" and result.noise == []
    result = invoke("inspect", keeps_one, "--quiet")
    assert result.exit_code == 0
    assert result.stdout == "" and result.stderr == "" and result.noise == []
    result = invoke("fold", keeps_one, "-o", tmp_path / "o2.onnx")
    assert result.exit_code == 0 and "bn_b" in result.stdout  # without --quiet there is a table


def test_quiet_when_a_half_precision_fold_would_overflow(tmp_path):
    """The BN is kept (dtype-overflow) and nothing is printed: no numpy warning either."""
    b = GraphBuilder(dtype=np.float16)
    c = b.node("Conv", [b.input([1, 3, 4, 4]), b.const(np.full((2, 3, 1, 1), 6e4, np.float16))], name="conv")
    params = [b.const(np.full(2, 100.0, np.float16)), b.const(np.zeros(2, np.float16)),
              b.const(np.zeros(2, np.float16)), b.const(np.ones(2, np.float16))]
    b.output(b.node("BatchNormalization", [c, *params], name="bn"))
    path = tmp_path / "half.onnx"
    onnx.save(b.model(), path)
    result = invoke("fold", path, "-q", "--json", tmp_path / "l.json")
    assert result.exit_code == 0
    assert result.stdout == "" and result.stderr == "" and result.noise == []
    assert json.loads((tmp_path / "l.json").read_text())["entries"][0]["reason"] == "dtype-overflow"
    result = invoke("inspect", path, "-q")  # mean 0 / var 1: not ready; -q says so in one line
    assert result.exit_code == 1 and result.stdout == "" and result.noise == []
    assert result.stderr.splitlines() == [
        "bnfold: FAIL: 1 of 1 BatchNormalization not inference-ready (untrained-stats)"]


def test_quiet_still_reports_errors(tmp_path):
    result = invoke("fold", tmp_path / "absent.onnx", "--quiet")
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr.startswith("bnfold: error: ") and "absent.onnx" in result.stderr


def test_unknown_option_is_a_usage_error(folds_all):
    result = invoke("fold", folds_all, "--no-such-option")
    assert result.exit_code == 2
    assert not folds_all.with_name("net.folded.onnx").exists()


def test_missing_argument_is_a_usage_error():
    assert invoke("fold").exit_code == 2


# ---------------------------------------------------------------------------------------
# inspect


def test_inspect_healthy_model_exits_0(folds_all, tmp_path):
    report = tmp_path / "inspect.json"
    result = invoke("inspect", folds_all, "--json", report)
    assert result.exit_code == 0, result.output
    assert "1 of 1" in result.stdout
    data = json.loads(report.read_text())
    assert data["schema"] == "bnfold.inspect" and data["schema_version"] == 2
    assert {k: data["summary"][k] for k in ("bn_total", "ready", "not_ready")} == {"bn_total": 1, "ready": 1, "not_ready": 0}
    assert data["findings"][0]["ok"] is True and data["findings"][0]["problems"] == []


def test_inspect_training_mode_bn_exits_1(tmp_path):
    b = GraphBuilder(seed=5)
    x = b.input([2, 3, 8, 8])
    c = b.node("Conv", [x, b.random([4, 3, 3, 3])], name="conv", pads=[1, 1, 1, 1])
    y, running_mean, running_var = b.node("BatchNormalization", [c, *b.bn_params(4)], n_out=3, name="bn",
                                          training_mode=1)
    b.output(y)
    b.output(running_mean, shape=[4])
    b.output(running_var, shape=[4])
    path = tmp_path / "train.onnx"
    onnx.save(b.model(opset=15), path)
    report = tmp_path / "r.json"
    result = invoke("inspect", path, "--json", report)
    assert result.exit_code == 1, result.output
    finding = json.loads(report.read_text())["findings"][0]
    assert "training-mode" in finding["problems"] and finding["ok"] is False
    assert "NO" in result.stdout
    # folding leaves it in place and says why
    result = invoke("fold", path, "-o", tmp_path / "o.onnx", "--strict", "-q", "--json", tmp_path / "l.json")
    assert result.exit_code == 1
    assert json.loads((tmp_path / "l.json").read_text())["entries"][0]["reason"] == "training-mode"


def test_inspect_untrained_stats_exits_1(tmp_path):
    b = GraphBuilder(seed=6)
    x = b.input([1, 3, 8, 8])
    c = b.node("Conv", [x, b.random([4, 3, 3, 3])], name="conv", pads=[1, 1, 1, 1])
    params = [b.const(np.ones(4, np.float32)), b.const(np.zeros(4, np.float32)),
              b.const(np.zeros(4, np.float32)), b.const(np.ones(4, np.float32))]
    b.output(b.node("BatchNormalization", [c, *params], name="bn"))
    path = tmp_path / "fresh.onnx"
    onnx.save(b.model(), path)
    report = tmp_path / "r.json"
    result = invoke("inspect", path, "--json", report, "-q")
    assert result.exit_code == 1, result.output
    assert result.stdout == ""
    assert json.loads(report.read_text())["findings"][0]["problems"] == ["untrained-stats"]


def test_inspect_model_without_bn_exits_0(tmp_path):
    graph = oh.make_graph([oh.make_node("Relu", ["x"], ["y"])], "g",
                          [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
                          [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, tmp_path / "plain.onnx")
    assert invoke("inspect", tmp_path / "plain.onnx", "-q").exit_code == 0
    assert invoke("fold", tmp_path / "plain.onnx", "-q", "--strict").exit_code == 0


# ---------------------------------------------------------------------------------------
# entry points and import footprint


def test_python_dash_m_help():
    proc = subprocess.run([PYTHON, "-m", "bnfold", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "fold" in proc.stdout and "inspect" in proc.stdout
    assert proc.stderr == ""


def test_the_command_exits_with_each_status_and_delivers_all_its_output(keeps_one, tmp_path):
    """The command leaves without the interpreter's teardown (cli.console_script): exit
    codes, output and the written files must all survive that, with stdout block-buffered
    as in a pipeline."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    not_onnx = tmp_path / "notes.onnx"
    not_onnx.write_text("not a model")

    def command(*args):
        return subprocess.run([PYTHON, "-m", "bnfold", *map(str, args)], capture_output=True, text=True,
                              timeout=60, env=env, cwd=tmp_path)

    out = tmp_path / "out.onnx"
    kept = command("fold", keeps_one, "-o", out, "--strict", "--json", tmp_path / "ledger.json")
    assert kept.returncode == 1, kept.stderr
    assert "bn_b" in kept.stdout and f"wrote {out}" in kept.stdout.splitlines()
    assert kept.stdout.splitlines()[-1] == (f"bnfold: FAIL: --strict: 1 of 2 BatchNormalization kept "
                                            f"(no-linear-producer) ({out} was written)")
    assert json.loads((tmp_path / "ledger.json").read_text())["summary"]["folded"] == 1
    assert count_ops(onnx.load(out), "BatchNormalization") == 1
    run(onnx.load(out), FEEDS)  # a complete model, not a file cut short by the exit

    ok = command("fold", keeps_one, "-o", tmp_path / "again.onnx", "-q")
    assert (ok.returncode, ok.stdout, ok.stderr) == (0, "", "")

    bad = command("fold", not_onnx)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.count("\n") == 1 and bad.stderr.startswith("bnfold: error: ")

    usage = command("fold", keeps_one, "--no-such-option")
    assert usage.returncode == 2 and "No such option" in usage.stderr


IMPORT_PROBE = r"""
import sys
from bnfold.cli import main

def cli(*args):
    sys.argv = ["bnfold", *args]
    try:
        main()
    except SystemExit as exc:
        return exc.code
    return 0

src, a, b = sys.argv[1:4]
codes = [cli("fold", src, "-o", a, "-q"), cli("inspect", src, "-q")]
import bnfold
bnfold.fold(src).save(b)
print(codes, sorted(m for m in ("onnxruntime", "torch") if m in sys.modules))
"""


def test_fold_and_inspect_do_not_import_onnxruntime_or_torch(folds_all, tmp_path):
    """Through the real entry point (and the library), in a fresh process; --quiet really is
    quiet there too, where nothing intercepts warnings or logging."""
    proc = subprocess.run([PYTHON, "-c", IMPORT_PROBE, str(folds_all), str(tmp_path / "a.onnx"),
                           str(tmp_path / "b.onnx")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "[0, 0] []\n", proc.stdout + proc.stderr
    assert proc.stderr == ""
    assert count_ops(onnx.load(tmp_path / "a.onnx"), "BatchNormalization") == 0
    assert count_ops(onnx.load(tmp_path / "b.onnx"), "BatchNormalization") == 0


def test_console_script_help_does_not_import_onnxruntime_or_torch():
    probe = ("import sys\nsys.argv = ['bnfold', '--help']\nfrom bnfold.cli import main\n"
             "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\n"
             "print('EXIT', code, sorted(m for m in ('onnxruntime', 'torch') if m in sys.modules))")
    proc = subprocess.run([PYTHON, "-c", probe], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "EXIT 0 []", proc.stdout


def test_folding_does_not_import_sympy_yet_symbolic_shapes_still_work():
    """bnfold imports onnx_ir without its eager sympy import (bnfold/_onnx_ir.py); anything
    that really needs sympy afterwards gets the real module."""
    script = """
import sys
import bnfold
result = bnfold.fold(sys.argv[1])
assert result.ledger.summary()["folded"] == 6, result.ledger.summary()
print("sympy imported by the fold:", "sympy.core" in sys.modules)
import onnx_ir as ir
print("symbolic:", ir.SymbolicDim("N") * 2 + 1)
import sympy
print("sympy module:", sympy.Symbol("x") + 1)
"""
    model = Path(__file__).resolve().parent.parent / "models" / "resnet_dynamo18.onnx"
    done = subprocess.run([PYTHON, "-c", script, str(model)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "sympy imported by the fold: False", "symbolic: 2*N + 1", "sympy module: x + 1"]


def test_torch_imports_after_bnfold():
    pytest.importorskip("torch", reason="torch (the [train] extra) is not installed")
    script = "import bnfold.engine, torch; print(torch.tensor([1.0]).sum().item())"
    done = subprocess.run([PYTHON, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "1.0", done.stderr
