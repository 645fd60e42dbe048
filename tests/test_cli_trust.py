"""The command line in pipelines: outputs that never replace what is not ours, model text
printed literally, closed pipes, non-UTF-8 consoles, one-line usage errors, -q summaries,
greppable output off a terminal. Real processes where the behaviour is the process's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import GraphBuilder
from cli_runner import invoke


def bnfold(*args, env=None, **kwargs) -> subprocess.CompletedProcess:
    environment = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "bnfold", *map(str, args)], capture_output=True, text=True,
                          env=environment, **kwargs)


def model_with_names(tmp_path: Path, bn_name: str = "bn[/oops]", trained: bool = True) -> Path:
    """Conv -> BN (named like rich markup) -> Relu -> BN (kept: no linear neighbour)."""
    b = GraphBuilder(seed=3)
    y = b.bn(b.node("Conv", [b.input([1, 3, 4, 4]), b.random([4, 3, 1, 1])], name="conv[bold]"), 4, name=bn_name)
    y = b.node("Relu", [y])
    if trained:
        y = b.bn(y, 4, name="tail[red]x[/red]")
    else:  # running statistics never updated: mean 0, var 1
        params = [b.const(np.full(4, v, np.float32)) for v in (1.0, 0.0, 0.0, 1.0)]
        y = b.node("BatchNormalization", [y, *params], name="tail[red]x[/red]")
    b.output(y)
    path = tmp_path / "m[x].onnx"
    onnx.save(b.model(), path)
    return path


# --- 1. outputs that are not ours to replace -------------------------------------------------


def test_json_through_a_symlink_writes_the_file_and_keeps_the_link(tmp_path):
    model = model_with_names(tmp_path)
    real, link = tmp_path / "real.json", tmp_path / "link.json"
    real.write_text("old")
    link.symlink_to(real)
    result = invoke("inspect", model, "--json", link, "-q")
    assert result.exit_code == 0, result.output
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert json.loads(real.read_text())["schema"] == "bnfold.inspect"


def test_outputs_to_a_device_are_written_directly(tmp_path):
    model = model_with_names(tmp_path)
    result = invoke("fold", model, "-o", os.devnull, "--json", os.devnull, "-q")
    assert result.exit_code == 0, result.output
    assert Path(os.devnull).is_char_device()


def test_json_to_a_fifo_is_written_directly(tmp_path):
    model = model_with_names(tmp_path)
    fifo = tmp_path / "report.fifo"
    os.mkfifo(fifo)
    reader = subprocess.Popen(["cat", str(fifo)], stdout=subprocess.PIPE, text=True)
    result = bnfold("inspect", model, "--json", fifo, "-q")
    text, _ = reader.communicate(timeout=60)
    assert result.returncode == 0, result.stderr
    assert json.loads(text)["schema"] == "bnfold.inspect"
    assert fifo.is_fifo()


def test_json_dash_is_stdout_and_the_table_goes_to_stderr(tmp_path):
    model = model_with_names(tmp_path)
    result = bnfold("fold", model, "-o", tmp_path / "out.onnx", "--json", "-")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["schema"] == "bnfold.ledger"
    assert "wrote" in result.stderr


def test_a_socket_is_not_replaced(tmp_path):
    import socket

    model = model_with_names(tmp_path)
    path = tmp_path / "s.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    try:
        result = invoke("inspect", model, "--json", path)
        assert result.exit_code == 2 and "not a regular file" in result.stderr
        assert path.is_socket()
    finally:
        server.close()


def test_every_output_is_checked_before_the_fold(tmp_path):
    model = model_with_names(tmp_path)
    result = invoke("fold", model, "-o", tmp_path / "out.onnx", "--json", tmp_path / "missing" / "r.json")
    assert result.exit_code == 2 and "JSON report" in result.stderr
    assert not (tmp_path / "out.onnx").exists()


# --- 2. model text printed literally ----------------------------------------------------------


def test_markup_in_names_and_paths_is_printed_literally_on_a_terminal(tmp_path):
    model = model_with_names(tmp_path)
    script = ("import sys; from bnfold.cli import main; sys.argv = ['bnfold', 'fold', sys.argv[1], '-o', sys.argv[2]]; "
              "import bnfold.cli as c; from rich.console import Console; c.console.cache_clear(); "
              "c._console_class.cache_clear(); Console.is_terminal = property(lambda self: True); main()")
    result = subprocess.run([sys.executable, "-c", script, str(model), str(tmp_path / "o[1].onnx")],
                            capture_output=True, text=True, env={**os.environ, "COLUMNS": "400"})
    assert result.returncode == 0, result.stderr
    for text in ("bn[/oops]", "conv[bold]", "tail[red]x[/red]", "o[1].onnx"):
        assert text in result.stdout, text


def test_plain_output_is_one_unwrapped_line_per_site(tmp_path):
    model = model_with_names(tmp_path)
    result = bnfold("fold", model, "-o", tmp_path / "out.onnx", env={"COLUMNS": "80"})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    kept = [line for line in lines if "no-linear-producer" in line]
    assert len(kept) == 1 and kept[0].startswith("tail[red]x[/red]  BatchNormalization  main  kept")
    assert any(line.startswith("bn[/oops]  BatchNormalization  main  folded  conv-bn into conv[bold]") for line in lines)
    assert len(kept[0]) > 80  # not cut at the terminal width


# --- 3. closed pipes, 4. encodings, 5. usage ---------------------------------------------------


def test_a_closed_pipe_is_not_a_failed_check(tmp_path):
    model = model_with_names(tmp_path)
    shell = f"{sys.executable} -m bnfold inspect '{model}' | head -c 1 > /dev/null; echo ${{PIPESTATUS[0]}}"
    # inspect prints a few lines only, which a pipe buffer holds: make it print many.
    result = subprocess.run(["bash", "-c", shell], capture_output=True, text=True)
    assert result.stdout.strip() in ("0", "141"), result
    assert "Traceback" not in result.stderr
    many = f"for i in $(seq 300); do echo; done | cat; {sys.executable} -m bnfold --help | head -c 1 > /dev/null; echo ${{PIPESTATUS[0]}}"
    assert "Traceback" not in subprocess.run(["bash", "-c", many], capture_output=True, text=True).stderr


def test_a_cp1252_console_gets_ascii_not_a_crash(tmp_path):
    model = model_with_names(tmp_path)
    result = bnfold("fold", model, "-o", tmp_path / "out.onnx", env={"PYTHONIOENCODING": "cp1252"})
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize("suffix", [".json", ".textproto"])
def test_junk_text_format_input_is_bad_input(tmp_path, suffix):
    path = tmp_path / f"x{suffix}"
    path.write_text("junk")
    result = bnfold("fold", path, "-o", tmp_path / "o.onnx")
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "not a readable ONNX model" in result.stderr


@pytest.mark.parametrize("args", [["fold"], ["fold", "a", "b", "c"], ["inspect", "--bogus", "x"]])
def test_usage_errors_are_one_line(args):
    result = bnfold(*args)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("bnfold: error: "), result.stderr


def test_version():
    from bnfold import __version__

    result = bnfold("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"bnfold {__version__}"


# --- 6. quiet failures say what failed -----------------------------------------------------------


def test_quiet_strict_failure_prints_one_summary_line(tmp_path):
    model = model_with_names(tmp_path)
    result = bnfold("fold", model, "-o", tmp_path / "o.onnx", "--strict", "-q")
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("bnfold: FAIL: --strict: 1 of 2 BatchNormalization kept")


def test_quiet_inspect_failure_prints_one_summary_line(tmp_path):
    model = model_with_names(tmp_path, trained=False)
    result = bnfold("inspect", model, "-q")
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "untrained-stats" in result.stderr


# --- reports for CI: JUnit, several models, the pre-commit hook ------------------------------------


def _junit(path: Path):
    """Parse a JUnit file and check what CI servers rely on: counts that add up, every
    testcase named, a failure carrying a message."""
    import xml.etree.ElementTree as ET

    root = ET.parse(path).getroot()
    assert root.tag == "testsuites"
    suites = root.findall("testsuite")
    cases = [case for suite in suites for case in suite.findall("testcase")]
    for element, members in [(root, cases), *((s, s.findall("testcase")) for s in suites)]:
        assert int(element.get("tests")) == len(members)
        assert int(element.get("failures")) == sum(c.find("failure") is not None for c in members)
        assert int(element.get("skipped")) == sum(c.find("skipped") is not None for c in members)
    for case in cases:
        assert case.get("classname") and case.get("name")
        failure = case.find("failure")
        assert failure is None or failure.get("message")
    return suites, cases


def test_junit_follows_the_exit_code(tmp_path):
    model = model_with_names(tmp_path)
    report = tmp_path / "fold.xml"
    assert invoke("fold", model, "-o", tmp_path / "o.onnx", "-q", "--junit", report).exit_code == 0
    _, cases = _junit(report)
    assert [c.get("name") for c in cases] == ["bn[/oops]", "tail[red]x[/red]"]
    assert cases[1].find("skipped") is not None and cases[1].find("failure") is None
    assert invoke("fold", model, "-o", tmp_path / "o.onnx", "-q", "--strict", "--junit", report).exit_code == 1
    _, cases = _junit(report)
    assert cases[1].find("failure").get("message") == "kept: no-linear-producer"


def test_inspect_takes_many_models_and_folders(tmp_path):
    good = model_with_names(tmp_path)
    (tmp_path / "sub").mkdir()
    model_with_names(tmp_path / "sub", trained=False)  # not ready: exit 1 at least
    (tmp_path / "sub" / "junk.onnx").write_bytes(b"not onnx")
    report, junit = tmp_path / "all.json", tmp_path / "all.xml"
    result = invoke("inspect", good, tmp_path / "sub", "-q", "--json", report, "--junit", junit)
    assert result.exit_code == 2  # the worst: junk.onnx is unusable, and it is still said in one line
    assert result.stderr.count("bnfold: error: ") == 1 and "not inference-ready" in result.stderr
    data = json.loads(report.read_text())
    assert [Path(m["input"]).name for m in data["models"]] == ["m[x].onnx", "junk.onnx", "m[x].onnx"]
    assert "error" in data["models"][1] and data["models"][2]["summary"]["not_ready"] == 1
    suites, _ = _junit(junit)
    assert len(suites) == 3


def test_the_pre_commit_hook_entry_runs_on_changed_files(tmp_path):
    import shlex

    import yaml

    (hook,) = yaml.safe_load((Path(__file__).resolve().parent.parent / ".pre-commit-hooks.yaml").read_text())
    assert hook["id"] == "bnfold-inspect" and hook["pass_filenames"] and hook["files"] == r"\.onnx$"
    command = shlex.split(hook["entry"])
    assert command[0] == "bnfold"
    good = model_with_names(tmp_path)
    (tmp_path / "b").mkdir()
    bad = model_with_names(tmp_path / "b", trained=False)
    assert bnfold(*command[1:], good).returncode == 0  # what pre-commit runs: entry + the changed files
    result = bnfold(*command[1:], good, bad)
    assert result.returncode == 1 and result.stdout == "" and "untrained-stats" in result.stderr


def test_fold_many_models_into_a_folder(tmp_path):
    """A folder in, a folder out (relative paths kept), external data kept with its model,
    one JSON report, an unusable model reported without stopping the others."""
    source = tmp_path / "in"
    (source / "nested").mkdir(parents=True)
    first = model_with_names(source)
    model = onnx.load(first)
    onnx.save(model, source / "nested" / "ext.onnx", save_as_external_data=True, size_threshold=0,
              location="ext.onnx.data")
    (source / "nested" / "junk.onnx").write_bytes(b"junk")
    report = tmp_path / "all.json"
    result = bnfold("fold", source, "--out-dir", tmp_path / "out", "--jobs", "2", "-q", "--json", report)
    assert result.returncode == 2 and result.stderr.count("bnfold: error: ") == 1, result.stderr
    assert (tmp_path / "out" / "m[x].onnx").is_file()
    assert (tmp_path / "out" / "nested" / "ext.onnx").is_file()
    assert (tmp_path / "out" / "nested" / "ext.onnx.data").is_file()
    assert not (tmp_path / "out" / "nested" / "junk.onnx").exists()
    data = json.loads(report.read_text())
    assert [Path(m["input"]).name for m in data["models"]] == ["m[x].onnx", "ext.onnx", "junk.onnx"]
    assert data["models"][0]["summary"]["folded"] == 1 and "error" in data["models"][2]
    import onnxruntime as ort

    feeds = {"x": np.random.default_rng(0).standard_normal((1, 3, 4, 4)).astype(np.float32)}
    want = ort.InferenceSession(str(first)).run(None, feeds)[0]
    got = ort.InferenceSession(str(tmp_path / "out" / "nested" / "ext.onnx")).run(None, feeds)[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_fold_into_a_folder_inside_the_input_folder_twice(tmp_path):
    """`bnfold fold models --out-dir models/folded`, run again, folds the same models: its
    own earlier outputs under the output folder are not inputs. A model named explicitly
    whose output would replace another input is refused, naming the file replaced."""
    models = tmp_path / "models"
    models.mkdir()
    model_with_names(models)
    (models / "sub").mkdir()
    model_with_names(models / "sub", trained=False)
    report = tmp_path / "r.json"
    for _ in range(2):
        result = invoke("fold", models, "--out-dir", models / "folded", "-q", "--json", report)
        assert result.exit_code == 0, result.output
        data = json.loads(report.read_text())
        assert [Path(m["input"]).relative_to(models).as_posix() for m in data["models"]] == ["m[x].onnx",
                                                                                             "sub/m[x].onnx"]
    assert sorted(p.relative_to(models).as_posix() for p in models.rglob("*.onnx")) == [
        "folded/m[x].onnx", "folded/sub/m[x].onnx", "m[x].onnx", "sub/m[x].onnx"]
    named = invoke("fold", models / "m[x].onnx", models / "folded" / "m[x].onnx", "--out-dir", models / "folded")
    assert named.exit_code == 2
    assert named.stderr.startswith(f"bnfold: error: {models / 'folded' / 'm[x].onnx'}: --out-dir would overwrite this "
                                   f"input model with the fold of {models / 'm[x].onnx'}"), named.stderr
    only = invoke("fold", models / "folded", "--out-dir", models / "folded")
    assert only.exit_code == 2 and "no *.onnx file in it outside the output folder" in only.stderr


def test_several_models_need_an_output_folder(tmp_path):
    model = model_with_names(tmp_path)
    result = invoke("fold", model, model, "-o", tmp_path / "o.onnx")
    assert result.exit_code == 2 and "--out-dir" in result.stderr


def test_the_api_takes_models_in_memory(tmp_path):
    """fold and inspect take a ModelProto or an onnx_ir Model (never changed), fold gives
    a ModelProto back, and verify compares in-memory models."""
    import bnfold
    from bnfold._onnx_ir import ir

    path = model_with_names(tmp_path)
    proto = onnx.load(path)
    before = proto.SerializeToString()
    result = bnfold.fold(proto)
    assert proto.SerializeToString() == before
    folded = result.to_proto()
    assert isinstance(folded, onnx.ModelProto) and sum(n.op_type == "BatchNormalization" for n in folded.graph.node) == 1
    assert [f.fold_reason for f in bnfold.inspect(ir.from_proto(proto))] == [None, "no-linear-producer"]
    report = bnfold.verify(proto, folded, providers="cpu")
    assert report.passed and report.candidate == "<in-memory ModelProto>"
    wrong = onnx.load(path)
    weight = next(t for t in wrong.graph.initializer if len(t.dims) == 4)
    array = onnx.numpy_helper.to_array(weight) * 1.5
    weight.CopyFrom(onnx.numpy_helper.from_array(array.astype(np.float32), weight.name))
    assert not bnfold.verify(proto, wrong, providers="cpu").passed


def test_quiet_verify_failure_prints_one_summary_line(tmp_path):
    model = model_with_names(tmp_path)
    wrong = onnx.load(model)
    weight = next(t for t in wrong.graph.initializer if len(t.dims) == 4)
    weight.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(weight) * 1.5, weight.name))
    onnx.save(wrong, tmp_path / "wrong.onnx")
    result = bnfold("verify", model, tmp_path / "wrong.onnx", "--providers", "cpu", "-q")
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("bnfold: FAIL"), result.stderr


def test_the_summary_line_names_the_ops_that_changed(tmp_path):
    model = model_with_names(tmp_path)
    result = bnfold("fold", model, "-o", tmp_path / "o.onnx")
    assert "ops: BatchNormalization 2 -> 1;" in result.stdout, result.stdout
