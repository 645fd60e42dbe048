"""What fold and inspect print around the ledger: progress bars that leave nothing in a
redirected stderr, sizes on disk that count external data, a hint for each problem, a
reason said once, tables readable at 80 columns, exit codes in every command's help."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from builders import GraphBuilder
from cli_runner import invoke

PYTHON = sys.executable
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def folds_all(tmp_path):
    b = GraphBuilder(seed=4)
    c = b.node("Conv", [b.input([1, 3, 8, 8]), b.random([4, 3, 3, 3]), b.random([4])], name="conv", pads=[1, 1, 1, 1])
    b.output(b.bn(c, 4, name="bn"))
    path = tmp_path / "net.onnx"
    onnx.save(b.model(), path)
    return path



PROGRESS_PROBE = r"""
import sys
import bnfold.progress
bnfold.progress.THRESHOLD_BYTES = 0  # every model is "big": bars wherever bars may be drawn
if sys.argv[1] == "terminal":
    from rich.console import Console
    Console.is_terminal = property(lambda self: True)
from bnfold.cli import main
sys.argv = ["bnfold", "fold", *sys.argv[2:]]
main()
"""


def test_progress_bars_leave_nothing_in_a_redirected_stderr(folds_all, tmp_path):
    """Off a terminal (a CI log, a file) there is no bar and no residue of one; on a
    terminal the bars are drawn (the control that the probe makes the model big)."""
    with open(tmp_path / "err.txt", "w") as err:
        done = subprocess.run([PYTHON, "-c", PROGRESS_PROBE, "plain", folds_all, "-o", tmp_path / "a.onnx"],
                              stdout=subprocess.PIPE, stderr=err, text=True, timeout=120)
    assert done.returncode == 0
    assert (tmp_path / "err.txt").read_text() == ""
    drawn = subprocess.run([PYTHON, "-c", PROGRESS_PROBE, "terminal", folds_all, "-o", tmp_path / "b.onnx"],
                           capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "80"})
    assert drawn.returncode == 0 and "save b.onnx" in drawn.stderr and "━" in drawn.stderr


def test_the_size_line_counts_external_data(tmp_path):
    """Before and after are what lies on disk: the model file and its data file."""
    b = GraphBuilder(seed=7)
    c = b.node("Conv", [b.input([1, 64, 4, 4]), b.random([256, 64, 3, 3])], name="conv", pads=[1, 1, 1, 1])
    b.output(b.bn(c, 256, name="bn"))
    path = tmp_path / "ext.onnx"
    onnx.save(b.model(), path, save_as_external_data=True, size_threshold=0, location="ext.onnx.data")
    out = tmp_path / "o.onnx"
    result = invoke("fold", path, "-o", out)
    assert result.exit_code == 0, result.output
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("ops: ")]
    before = path.stat().st_size + (tmp_path / "ext.onnx.data").stat().st_size
    after = out.stat().st_size + (tmp_path / "o.onnx.data").stat().st_size
    assert before > 2**19 and after > 2**19
    assert line.endswith(f"; {before / 1024:.1f} KiB -> {after / 1024:.1f} KiB"), line


def test_fold_help_names_its_exit_codes():
    for command in ("fold", "inspect", "verify", "recalibrate"):
        done = invoke(command, "--help")
        assert done.exit_code == 0
        assert "Exit 0 when" in " ".join(done.stdout.split()), command


def test_each_problem_gets_its_hint_in_fold_and_inspect(tmp_path):
    """untrained-stats points at `bnfold recalibrate`, training-mode at --to-inference;
    each hint once, under the report, one line within 80 columns."""
    cases = {"cnn-nostats_ts17": ("untrained statistics", "bnfold recalibrate"),
             "cnn-trainmode_ts13": ("training-mode", "--to-inference")}
    for name, (topic, command) in cases.items():
        model = ROOT / "models" / f"{name}.onnx"
        for args in (["fold", model, "-o", tmp_path / "o.onnx"], ["inspect", model]):
            result = invoke(*args)
            hints = [line for line in result.stdout.splitlines() if line.startswith("hint: ")]
            assert len(hints) == 1 and topic in hints[0] and command in hints[0], (args, result.stdout)
            assert len(hints[0]) <= 80
    quiet = invoke("inspect", ROOT / "models" / "cnn_ts13.onnx")
    assert "hint:" not in quiet.stdout


def test_a_kept_training_mode_bn_says_its_reason_once(tmp_path):
    result = invoke("fold", ROOT / "models" / "cnn-trainmode_ts13.onnx", "-o", tmp_path / "o.onnx")
    kept = [line for line in result.stdout.splitlines() if "  kept  " in line]
    assert len(kept) == 5
    for line in kept:
        assert line.count("running-stat outputs present (unused)") == 1, line
        assert line.endswith("kept  training-mode  running-stat outputs present (unused)"), line
    converted = invoke("fold", ROOT / "models" / "cnn-trainmode_ts13.onnx", "-o", tmp_path / "o.onnx", "--to-inference")
    lines = converted.stdout.splitlines()
    assert all(line.endswith("converted from training mode") for line in lines if "  folded  " in line)
    assert not any(line.startswith("warning:") for line in lines)


TABLE_PROBE = r"""
import sys
from rich.console import Console
Console.is_terminal = property(lambda self: True)
from bnfold.cli import main
sys.argv = ["bnfold", *sys.argv[1:]]
main()
"""


@pytest.mark.parametrize("command, model", [
    ("fold", "resnet_dynamo18"), ("fold", "cnn-trainmode_ts13"), ("inspect", "resnet_dynamo18"),
    ("inspect", "cnn-nostats_ts17")])
def test_tables_stay_within_80_columns_two_lines_a_row(command, model, tmp_path):
    """On an 80-column terminal every line fits, and a row with a long exporter name
    takes two lines: the name (its middle cut by an ellipsis if need be), then what
    became of it."""
    path = ROOT / "models" / f"{model}.onnx"
    args = [command, path, *(["-o", tmp_path / "o.onnx"] if command == "fold" else [])]
    done = subprocess.run([PYTHON, "-c", TABLE_PROBE, *map(str, args)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "80", "NO_COLOR": "1"}, cwd=tmp_path)
    assert done.returncode in (0, 1), done.stderr
    lines = re.sub(r"\x1b\[[0-9;]*m", "", done.stdout).splitlines()
    table = [line for line in lines if line[:1] in "┏┃┡│└"]
    assert table and all(len(line) <= 80 for line in table), "\n".join(lines)
    rows = [line for line in table if line.startswith("│")]
    bns = sum(n.op_type == "BatchNormalization" for n in onnx.load(path).graph.node)
    firsts = [line for line in rows if line.split("│")[2].strip()]  # status / ready: on a row's first line only
    assert len(firsts) == bns, "\n".join(table)
    if model == "resnet_dynamo18":  # 46-character names: two lines a row, the names whole at 80 columns
        assert len(rows) == 2 * bns, "\n".join(table)
        assert "node__native_batch_norm_legit_no_training_1__0" in done.stdout
    else:
        assert len(rows) <= 3 * bns, "\n".join(table)
