"""Input/output safety: bad inputs are refused cleanly, writes are atomic, external data
stays inside the model folder, and no byte sequence makes bnfold crash (exit 3).

Most cases drive the real CLI in-process (typer's CliRunner) against real files built
with onnx.helper; a few use subprocesses where only a real process can show it (a
traceback on the real stderr, signals).
"""

from __future__ import annotations

import copy
import hashlib
import json
import errno
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as onh
import onnx_ir as ir
import pytest
from cli_runner import invoke
from builders import GraphBuilder, count_ops, run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bnfold
from bnfold.errors import InputError
from bnfold.load import load_model
from bnfold.save import save_model

PYTHON = sys.executable
FEEDS = {"x": np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)}


# ---------------------------------------------------------------------------------------
# helpers


def conv_bn(channels: int = 4, bn_channels: int | None = None, seed: int = 0) -> onnx.ModelProto:
    """x[1,3,8,8] -> Conv(channels) -> BatchNormalization(bn_channels) -> y."""
    b = GraphBuilder(seed=seed)
    x = b.input([1, 3, 8, 8])
    c = b.node("Conv", [x, b.random([channels, 3, 3, 3]), b.random([channels])], pads=[1, 1, 1, 1])
    y = b.bn(c, bn_channels or channels)
    b.output(y)
    return b.model()


def save_external(model: onnx.ModelProto, path: Path, location: str | None = None) -> Path:
    """Save with every initializer in one external file next to ``path``; returns the data file."""
    # Written by hand: onnx.save refuses when a file named ``location`` exists in the cwd.
    location = location or f"{path.name}.data"
    model = copy.deepcopy(model)
    with open(path.parent / location, "wb") as data:
        for tensor in model.graph.initializer:
            if not tensor.HasField("raw_data"):
                tensor.raw_data = onh.to_array(tensor).tobytes()
                del tensor.float_data[:], tensor.int64_data[:], tensor.int32_data[:], tensor.double_data[:]
            tensor.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", location), ("offset", data.tell()), ("length", len(tensor.raw_data))):
                tensor.external_data.add(key=key, value=str(value))
            data.write(tensor.raw_data)
            tensor.ClearField("raw_data")
    path.write_bytes(model.SerializeToString())
    return path.parent / location


def edit_external(path: Path, **changes) -> None:
    """Rewrite the external-data entries (location/offset/length) of every external tensor."""
    proto = onnx.load(path, load_external_data=False)
    for tensor in proto.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        entries = {e.key: e.value for e in tensor.external_data}
        entries.update({k: str(v) for k, v in changes.items()})
        del tensor.external_data[:]
        for key, value in entries.items():
            tensor.external_data.add(key=key, value=value)
    path.write_bytes(proto.SerializeToString())


def snapshot(folder: Path) -> dict[str, str]:
    """Every entry under ``folder``: sha256 of files, target of links, 'dir' for folders."""
    state = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            p = Path(root, name)
            rel = str(p.relative_to(folder))
            if p.is_symlink():
                state[rel] = "link->" + os.readlink(p)
            elif p.is_dir():
                state[rel] = "dir"
            else:
                state[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return state


def temp_leftovers(folder: Path) -> list[str]:
    """Names a staging write could leave behind (bnfold stages in hidden folders/files)."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") or "tmp" in p.name)


def assert_bad_input(result, names: str, problem: str) -> None:
    """Exit 2, exactly one line on stderr naming ``names`` and matching ``problem``, no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith("bnfold: error: "), line
    assert names in line, (names, line)
    assert re.search(problem, line, re.IGNORECASE), (problem, line)
    assert "Traceback" not in result.output
    assert result.stdout == ""
    assert result.noise == []  # nothing else reaches the real stderr either


def valid_model_bytes() -> bytes:
    return conv_bn().SerializeToString()


# ---------------------------------------------------------------------------------------
# bad inputs: one case per way a model can be unusable. Each builder gets the model folder
# and returns (path passed on the command line, text the error must contain, regex of the problem).


def _missing(d):
    return d / "missing.onnx", "missing.onnx", "no such file"


def _directory(d):
    (d / "dir.onnx").mkdir()
    return d / "dir.onnx", "dir.onnx", "directory"


def _empty(d):
    (d / "empty.onnx").write_bytes(b"")
    return d / "empty.onnx", "empty.onnx", "empty"


def _not_onnx_text(d):
    (d / "notes.onnx").write_text("hello, this is a text file and not a model\n" * 20)
    return d / "notes.onnx", "notes.onnx", "not (a readable |an )?ONNX|invalid"


def _not_onnx_png(d):
    (d / "img.onnx").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    return d / "img.onnx", "img.onnx", "not (a readable |an )?ONNX|invalid"


def _truncated(fraction):
    def build(d):
        data = valid_model_bytes()
        cut = max(1, int(len(data) * fraction)) if fraction < 1 else len(data) - 1
        (d / "cut.onnx").write_bytes(data[:cut])
        return d / "cut.onnx", "cut.onnx", "ONNX|invalid|undeclared"
    return build


def _external(location_for, make_outside_link=False):
    def build(d):
        data = save_external(conv_bn(), d / "ext.onnx")
        outside = d.parent / "outside.bin"
        outside.write_bytes(data.read_bytes())
        if make_outside_link:
            os.symlink(outside, d / "link.bin")
        edit_external(d / "ext.onnx", location=location_for(outside))
        return d / "ext.onnx", "ext.onnx", "escapes the model folder"
    return build


def _external_missing(d):
    data = save_external(conv_bn(), d / "ext.onnx")
    data.unlink()
    return d / "ext.onnx", "ext.onnx", "missing"


def _external_beyond(d):
    data = save_external(conv_bn(), d / "ext.onnx")
    edit_external(d / "ext.onnx", offset=data.stat().st_size - 4, length=64)
    return d / "ext.onnx", "ext.onnx", "beyond"


def _external_short(d):
    # offset inside the file but the stored length is smaller than the tensor needs
    save_external(conv_bn(), d / "ext.onnx")
    edit_external(d / "ext.onnx", offset=0, length=4)
    return d / "ext.onnx", "ext.onnx", "needs"


def _graph(build_nodes, outputs=("y",)):
    def build(d):
        nodes = build_nodes()
        graph = oh.make_graph(
            nodes, "g", [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])],
            [oh.make_tensor_value_info(o, onnx.TensorProto.FLOAT, [1, 4]) for o in outputs])
        model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
        model.ir_version = 9
        onnx.save(model, d / "g.onnx")
        return d / "g.onnx", "g.onnx", "invalid graph"
    return build


def _undefined_name():
    return [oh.make_node("Add", ["x", "nope"], ["y"], name="add")]


def _cycle():
    return [oh.make_node("Add", ["x", "b"], ["a"], name="first"),
            oh.make_node("Relu", ["a"], ["b"], name="second"),
            oh.make_node("Identity", ["b"], ["y"], name="third")]


def _never_produced():
    return [oh.make_node("Relu", ["x"], ["y"], name="relu")]


def _opset(d):
    model = conv_bn()
    model.opset_import[0].version = 99
    onnx.save(model, d / "op.onnx")
    return d / "op.onnx", "op.onnx", "unsupported opset 99"


def _undeclared_domain(d):
    model = conv_bn()
    model.graph.node.append(oh.make_node("Custom", [model.graph.output[0].name], ["z"], domain="com.example"))
    onnx.save(model, d / "dom.onnx")
    return d / "dom.onnx", "dom.onnx", "undeclared domain 'com.example'"


def _bn_param_shapes(d):
    b = GraphBuilder()
    x = b.input([1, 3, 8, 8])
    c = b.node("Conv", [x, b.random([3, 3, 3, 3])], pads=[1, 1, 1, 1])
    params = [b.const(np.ones(3, np.float32)), b.const(np.zeros(3, np.float32)),
              b.const(np.zeros(4, np.float32)), b.const(np.ones(4, np.float32))]
    b.output(b.node("BatchNormalization", [c, *params], name="bn"))
    onnx.save(b.model(), d / "shapes.onnx")
    return d / "shapes.onnx", "shapes.onnx", r"1-D of one length.*\[3\].*\[4\]"


def _bn_channels(d):
    onnx.save(conv_bn(channels=4, bn_channels=6), d / "chan.onnx")
    return d / "chan.onnx", "chan.onnx", "6 channels.*4 output channels"


def _edited(name, edit, problem):
    """A valid Conv+BN model with ``edit(model)`` applied to its proto."""
    def build(d):
        model = conv_bn()
        raw = edit(model)  # an edit may return the bytes to write instead
        (d / name).write_bytes(raw or model.SerializeToString())
        return d / name, name, problem
    return build


def _initializer(model, prefix):
    return next(t for t in model.graph.initializer if t.name.startswith(prefix))


def _short_raw(model):
    _initializer(model, "w").raw_data = _initializer(model, "w").raw_data[:-4]


def _undefined_dtype(model):
    _initializer(model, "gamma").data_type = onnx.TensorProto.UNDEFINED


def _negative_dim(model):
    _initializer(model, "mean").dims[:] = [-4]


def _scalar_conv_weight(model):  # a 4-byte scalar: consistent as a tensor, invalid as a Conv weight
    weight = _initializer(model, "w")
    weight.dims[:] = []
    weight.raw_data = weight.raw_data[:4]


def _long_conv_bias(model):
    bias = next(t for t in model.graph.initializer if t.name == model.graph.node[0].input[2])
    bias.CopyFrom(onh.from_array(np.ones(5, np.float32), bias.name))


def _group_not_dividing(model):
    model.graph.node[0].attribute.append(oh.make_attribute("group", 3))


def _non_utf8_name(model):
    name = model.graph.node[0].name.encode()
    return model.SerializeToString().replace(name, name[:1] + b"\xd0" + name[2:], 1)  # same length


def _constant_two_values(model):
    """The Conv weight as a Constant node that (invalidly) carries two value attributes."""
    weight = _initializer(model, "w")
    model.graph.initializer.remove(weight)
    weight.name = ""
    model.graph.node.insert(0, oh.make_node("Constant", [], [model.graph.node[0].input[1]],
                                            value=weight, value_float=1.0))


def _gemm_rank(d):
    b = GraphBuilder()
    x = b.input([2, 3])
    g = b.node("Gemm", [x, b.random([3, 4, 1])])
    b.output(b.bn(g, 4))
    onnx.save(b.model(), d / "gemm.onnx")
    return d / "gemm.onnx", "gemm.onnx", "2-D B"


def _external_edit(problem, **changes):
    def build(d):
        save_external(conv_bn(), d / "ext.onnx")
        edit_external(d / "ext.onnx", **changes)
        return d / "ext.onnx", "ext.onnx", problem
    return build


def _external_string(d):
    save_external(conv_bn(), d / "ext.onnx")
    proto = onnx.load(d / "ext.onnx", load_external_data=False)
    proto.graph.initializer[0].data_type = onnx.TensorProto.STRING
    (d / "ext.onnx").write_bytes(proto.SerializeToString())
    return d / "ext.onnx", "ext.onnx", "STRING"


BAD_INPUTS = {
    "missing": _missing,
    "directory": _directory,
    "empty": _empty,
    "text": _not_onnx_text,
    "png": _not_onnx_png,
    "truncated-1-byte": _truncated(0.0),
    "truncated-10%": _truncated(0.1),
    "truncated-33%": _truncated(0.33),
    "truncated-50%": _truncated(0.5),
    "truncated-90%": _truncated(0.9),
    "truncated-last-byte": _truncated(1.0),
    "ext-dotdot": _external(lambda outside: "../outside.bin"),
    "ext-absolute": _external(lambda outside: str(outside)),
    "ext-symlink-out": _external(lambda outside: "link.bin", make_outside_link=True),
    "ext-missing-file": _external_missing,
    "ext-beyond-file": _external_beyond,
    "ext-too-short": _external_short,
    "graph-undefined-name": _graph(_undefined_name),
    "graph-cycle": _graph(_cycle),
    "graph-output-never-produced": _graph(_never_produced, outputs=("y", "ghost")),
    "opset-99": _opset,
    "undeclared-domain": _undeclared_domain,
    "bn-param-shapes": _bn_param_shapes,
    "bn-channel-mismatch": _bn_channels,
    "tensor-short-raw-data": _edited("raw.onnx", _short_raw, "stores 428 bytes.*needs 432"),
    "tensor-undefined-dtype": _edited("dtype.onnx", _undefined_dtype, "no data type"),
    "tensor-negative-dim": _edited("dim.onnx", _negative_dim, "negative dimension"),
    "non-utf8-name": _edited("utf.onnx", _non_utf8_name, "not valid UTF-8"),
    "conv-scalar-weight": _edited("rank.onnx", _scalar_conv_weight, r"weight has shape \[\].*rank >= 3"),
    "conv-bias-length": _edited("bias.onnx", _long_conv_bias, r"bias has shape \[5\], it needs \[4\]"),
    "conv-group": _edited("group.onnx", _group_not_dividing, "group 3"),
    "gemm-weight-rank": _gemm_rank,
    "constant-two-values": _edited("const.onnx", _constant_two_values, "exactly one value attribute, it has 2"),
    "ext-offset-not-integer": _external_edit("offset 'abc' is not an integer", offset="abc"),
    "ext-location-nul": _external_edit("not a file name", location="ext.onnx.data\x00x"),
    "ext-length-too-long": _external_edit("length 500 does not match the 432 bytes", offset=0, length=500),
    "ext-string-tensor": _external_string,
}


@pytest.mark.parametrize("command", ["fold", "inspect"])
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_refused_cleanly(tmp_path, case, command):
    folder = tmp_path / "model"
    folder.mkdir()
    model, names, problem = BAD_INPUTS[case](folder)
    before = snapshot(tmp_path)
    if command == "fold":
        result = invoke("fold", model, "--json", folder / "report.json")
    else:
        result = invoke("inspect", model, "--json", folder / "report.json")
    assert_bad_input(result, names, problem)
    # nothing written (no OUT, no OUT.data, no report, no temp files), input untouched
    assert snapshot(tmp_path) == before


REAL_PROCESS_PROBE = r"""
import json, sys
from bnfold.cli import main
for case, args in json.loads(sys.argv[1]):
    print(f"@@ {case}", file=sys.stderr, flush=True)
    sys.argv = ["bnfold", *args]
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code
    sys.stderr.flush()
    print(json.dumps([case, code]), flush=True)
"""


def test_bad_inputs_in_a_real_process_print_exactly_one_line(tmp_path):
    """Outside pytest nothing intercepts warnings or library logging: each bad input must
    still give one line on the real stderr. One process runs every case to stay fast."""
    cases, before = [], {}
    for case, build in BAD_INPUTS.items():
        folder = tmp_path / case / "model"
        folder.mkdir(parents=True)
        model, names, _ = build(folder)
        cases.append([case, ["fold", str(model)]])
        before[case] = snapshot(tmp_path / case)
    proc = subprocess.run([PYTHON, "-c", REAL_PROCESS_PROBE, json.dumps(cases)], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    codes = dict(json.loads(line) for line in proc.stdout.splitlines())
    stderr = {}
    for block in proc.stderr.split("@@ ")[1:]:
        case, _, text = block.partition("\n")
        stderr[case] = text.splitlines()
    assert set(codes) == set(BAD_INPUTS) == set(stderr)
    assert "@@" not in proc.stdout and all(line.startswith("[") for line in proc.stdout.splitlines())
    for case in BAD_INPUTS:
        assert codes[case] == 2, (case, stderr[case])
        assert len(stderr[case]) == 1 and stderr[case][0].startswith("bnfold: error: "), (case, stderr[case])
        assert snapshot(tmp_path / case) == before[case], case


def test_load_model_raises_input_error_not_other_exceptions(tmp_path):
    for case, build in BAD_INPUTS.items():
        if case.startswith("bn-"):
            continue  # those models load; the engine refuses them
        folder = tmp_path / case
        folder.mkdir()
        model, names, _ = build(folder)
        with pytest.raises(InputError, match=names.replace(".", r"\.")):
            load_model(model)


# ---------------------------------------------------------------------------------------
# output problems


def _folded_ok(path: Path, reference: Path) -> None:
    folded = onnx.load(path)
    onnx.checker.check_model(folded, full_check=True)
    assert count_ops(folded, "BatchNormalization") == 0
    for expected, actual in zip(run(reference, FEEDS), run(path, FEEDS)):
        np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-5)


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(conv_bn(), path)
    return path


def test_output_into_missing_folder(tmp_path, model_file):
    before = snapshot(tmp_path)
    result = invoke("fold", model_file, "-o", tmp_path / "nope" / "out.onnx")
    assert_bad_input(result, "out.onnx", "does not exist")
    assert snapshot(tmp_path) == before  # the folder is not created either


def test_output_whose_parent_is_a_file(tmp_path, model_file):
    (tmp_path / "plain").write_text("I am a file")
    before = snapshot(tmp_path)
    result = invoke("fold", model_file, "-o", tmp_path / "plain" / "out.onnx")
    assert_bad_input(result, "out.onnx", "plain is not a folder")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("report", ["nope/r.json", "folder"])
def test_unwritable_json_report_is_refused_before_anything_is_written(tmp_path, model_file, report):
    (tmp_path / "folder").mkdir()
    before = snapshot(tmp_path)
    result = invoke("fold", model_file, "-o", tmp_path / "out.onnx", "--json", tmp_path / report)
    assert_bad_input(result, report, "JSON report")
    assert snapshot(tmp_path) == before  # in particular no out.onnx


def test_output_is_a_directory(tmp_path, model_file):
    (tmp_path / "out.onnx").mkdir()
    before = snapshot(tmp_path)
    result = invoke("fold", model_file, "-o", tmp_path / "out.onnx")
    assert_bad_input(result, "out.onnx", "directory")
    assert snapshot(tmp_path) == before


def test_output_into_read_only_folder(tmp_path, model_file):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        probe = locked / "probe"
        try:
            probe.write_text("x")
        except PermissionError:
            pass
        else:
            probe.unlink()
            pytest.skip("running with privileges that ignore folder permissions (root); "
                        "test_output_whose_parent_is_a_file covers an unwritable output path")
        before = snapshot(tmp_path)
        result = invoke("fold", model_file, "-o", locked / "out.onnx")
        assert_bad_input(result, "out.onnx", "cannot write|permission")
        assert snapshot(tmp_path) == before
    finally:
        locked.chmod(0o755)


def test_output_equal_to_input_needs_in_place(tmp_path, model_file):
    reference = tmp_path / "reference.onnx"
    reference.write_bytes(model_file.read_bytes())
    before = snapshot(tmp_path)
    result = invoke("fold", model_file, "-o", model_file)
    assert_bad_input(result, "m.onnx", "--in-place")
    assert snapshot(tmp_path) == before
    # other spellings of the same file are the same file
    (tmp_path / "sub").mkdir()
    os.symlink(model_file, tmp_path / "alias.onnx")
    before = snapshot(tmp_path)
    for spelling in (tmp_path / "sub" / ".." / "m.onnx", tmp_path / "alias.onnx"):
        result = invoke("fold", model_file, "-o", spelling)
        assert_bad_input(result, str(spelling), "--in-place")
        assert snapshot(tmp_path) == before
    (tmp_path / "alias.onnx").unlink()
    (tmp_path / "sub").rmdir()

    result = invoke("fold", model_file, "-o", model_file, "--in-place", "--quiet")
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "reference.onnx"]
    _folded_ok(model_file, reference)


def test_in_place_with_external_data(tmp_path):
    path = tmp_path / "m.onnx"
    save_external(conv_bn(), path)
    reference = tmp_path / "reference.onnx"
    onnx.save(conv_bn(), reference)
    result = invoke("fold", path, "--in-place", "-o", path, "--quiet")
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "m.onnx.data", "reference.onnx"]
    _folded_ok(path, reference)
    assert _locations(path) == {"m.onnx.data"}


def test_embed_with_external_data_is_a_usage_error(tmp_path, model_file):
    before = snapshot(tmp_path)
    result = invoke("fold", model_file, "--embed", "--external-data", "w.bin")
    assert_bad_input(result, "--external-data", "exclude")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("name", ["../w.bin", "/tmp/w.bin", "sub/../../w.bin"])
def test_external_data_name_must_stay_in_output_folder(tmp_path, model_file, name):
    before = snapshot(tmp_path)
    result = invoke("fold", model_file, "-o", tmp_path / "out.onnx", "--external-data", name)
    assert_bad_input(result, "out.onnx", "plain name")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("extra", [
    ["-o", "{d}/b.onnx", "--external-data", "m.onnx.data"],           # OUT's weights over the input's
    ["-o", "{d}/b.onnx", "--external-data", "m.onnx.data", "--in-place"],
    ["-o", "{d}/m.onnx.data"],                                          # OUT over the input's weights
    ["-o", "{d}/b.onnx", "--json", "{d}/m.onnx"],                       # report over the input
    ["-o", "{d}/b.onnx", "--json", "{d}/m.onnx.data"],
    ["-o", "{d}/b.onnx", "--json", "{d}/b.onnx"],                       # report over OUT
    ["-o", "{d}/b.onnx", "--json", "{d}/b.onnx.data"],                  # report over OUT's weights
    ["-o", "{d}/b.onnx", "--external-data", "b.onnx"],                  # weights over OUT
    ["-o", "{d}/m.onnx", "--in-place", "--json", "{d}/m.onnx"],
])
def test_no_written_file_may_replace_an_input_file(tmp_path, extra):
    model = tmp_path / "m.onnx"
    save_external(conv_bn(), model)
    before = snapshot(tmp_path)
    result = invoke("fold", model, *[a.format(d=tmp_path) for a in extra])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("bnfold: error: ") and result.stderr.count("\n") == 1, result.stderr
    assert snapshot(tmp_path) == before


def test_inspect_report_may_not_replace_the_model(tmp_path):
    model = tmp_path / "m.onnx"
    save_external(conv_bn(), model)
    before = snapshot(tmp_path)
    for target in ("m.onnx", "m.onnx.data"):
        result = invoke("inspect", model, "--json", tmp_path / target)
        assert_bad_input(result, target, "overwrite the input")
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------------------------------
# atomic writes


def _overflowing_model() -> onnx.ModelProto:
    """A float32 Conv whose folded weight would overflow, beside one that folds."""
    b = GraphBuilder()
    x = b.input([1, 3, 4, 4])
    c = b.node("Conv", [x, b.const(np.full((2, 3, 1, 1), 3e38, np.float32))])
    params = [b.const(np.full(2, 100.0, np.float32)), b.const(np.zeros(2, np.float32)),
              b.const(np.zeros(2, np.float32)), b.const(np.ones(2, np.float32))]
    y = b.node("Relu", [b.node("BatchNormalization", [c, *params], name="bn")])
    b.output(b.bn(b.node("Conv", [y, b.random([2, 2, 1, 1])]), 2))
    return b.model()


def test_an_overflowing_fold_keeps_that_site_and_folds_the_rest(tmp_path):
    """Overflow is decided while planning: that site is kept, the model is still written."""
    model = tmp_path / "m.onnx"
    onnx.save(_overflowing_model(), model)
    result = bnfold.fold(model)
    statuses = {e.node or e.pattern: (e.status, e.reason) for e in result.ledger}
    assert statuses["bn"] == ("kept", "dtype-overflow")
    assert sum(e.status == "folded" for e in result.ledger) == 1
    result.save(tmp_path / "out.onnx")
    onnx.checker.check_model(onnx.load(tmp_path / "out.onnx"), full_check=True)


def test_failed_save_through_cli_leaves_nothing(tmp_path, monkeypatch):
    model = tmp_path / "m.onnx"
    onnx.save(conv_bn(), model)
    (tmp_path / "out.onnx").write_bytes(b"previous output")  # an older OUT stays as it was
    before = snapshot(tmp_path)

    def full_disk(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full_disk)
    result = invoke("fold", model, "-o", tmp_path / "out.onnx", "--external-data", "out.bin")
    assert_bad_input(result, "out.onnx", "No space left")
    assert snapshot(tmp_path) == before
    assert temp_leftovers(tmp_path) == []


@pytest.mark.parametrize("failure", [RuntimeError, KeyboardInterrupt, OSError])
@pytest.mark.parametrize("external", [None, "weights.bin"])
def test_save_that_raises_midway_leaves_no_temp_files(tmp_path, failure, external):
    """A tensor whose data cannot be produced, written after the real weights."""
    model = load_model(_write(tmp_path / "in" / "m.onnx", conv_bn()))
    produced = []

    def broken():
        produced.append(True)
        raise failure("disk on fire")

    model.graph.register_initializer(ir.Value(
        name="late", const_value=ir.LazyTensor(broken, dtype=ir.DataType.FLOAT, shape=ir.Shape([4]))))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "out.onnx").write_bytes(b"old")
    expected = {OSError: InputError, RuntimeError: Exception, KeyboardInterrupt: KeyboardInterrupt}[failure]
    with pytest.raises(expected):
        save_model(model, out_dir / "out.onnx", external_data=external)
    assert produced
    assert sorted(os.listdir(out_dir)) == ["out.onnx"]
    assert (out_dir / "out.onnx").read_bytes() == b"old"


@pytest.mark.parametrize("failure", [RuntimeError, KeyboardInterrupt])
def test_save_interrupted_while_writing_external_data(tmp_path, failure):
    """The callback runs between tensors: the staging data file is half written when it raises."""
    model = load_model(_write(tmp_path / "in" / "m.onnx", conv_bn(channels=300)))  # 6 tensors >= 1 KiB
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    seen = []

    def explode(tensor, written, total):
        seen.append((tensor.name, written, total))
        if written == 3:
            raise failure("stop")

    with pytest.raises(failure):
        save_model(model, out_dir / "out.onnx", external_data="weights.bin", callback=explode)
    assert [written for _, written, _ in seen] == [1, 2, 3] and seen[0][2] > 3
    assert os.listdir(out_dir) == []


def test_signals_wait_until_the_commit_is_done():
    """The commit (renames) runs under _signals_deferred: a signal is held, then delivered."""
    from bnfold.save import _signals_deferred

    delivered = []

    def handler(signum, frame):
        delivered.append(signum)
        raise SystemExit(128 + signum)

    old = signal.signal(signal.SIGTERM, handler)
    try:
        steps = []
        with pytest.raises(SystemExit):
            with _signals_deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)  # a handler that was not held would run (and raise) here
                steps.append("committed")
        assert steps == ["committed"] and delivered == [signal.SIGTERM]
        assert signal.getsignal(signal.SIGTERM) is handler  # restored
    finally:
        signal.signal(signal.SIGTERM, old)


def _write(path: Path, model: onnx.ModelProto) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)
    return path


def _external_tensor(name, dims, location, offset, length) -> onnx.TensorProto:
    tensor = onnx.TensorProto(name=name, data_type=onnx.TensorProto.FLOAT, dims=dims,
                              data_location=onnx.TensorProto.EXTERNAL)
    for key, value in (("location", location), ("offset", offset), ("length", length)):
        tensor.external_data.add(key=key, value=str(value))
    return tensor


def _big_external_model(folder: Path, channels: int = 64, side: int = 512) -> Path:
    """Conv weight of channels*3*side*side float32 (~200 MB) in a sparse file, BN params after it."""
    folder.mkdir()
    data = folder / "big.onnx.data"
    weight_shape = [channels, 3, side, side]
    weight_bytes = int(np.prod(weight_shape)) * 4
    rng = np.random.default_rng(0)
    small = {
        "gamma": rng.uniform(0.5, 2, channels).astype(np.float32),
        "beta": rng.standard_normal(channels).astype(np.float32),
        "mean": rng.standard_normal(channels).astype(np.float32),
        "var": rng.uniform(0.5, 2, channels).astype(np.float32),
    }
    initializers = []
    initializers.append(_external_tensor("w", weight_shape, data.name, 0, weight_bytes))
    with open(data, "wb") as handle:
        handle.truncate(weight_bytes)  # sparse: costs no disk and no time
        handle.seek(weight_bytes)
        for name, array in small.items():
            initializers.append(_external_tensor(name, [channels], data.name, handle.tell(), array.nbytes))
            handle.write(array.tobytes())
    graph = oh.make_graph(
        [oh.make_node("Conv", ["x", "w"], ["c"], name="conv"),
         oh.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["y"], name="bn")],
        "big", [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, side, side])],
        [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, channels, 1, 1])], initializers)
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    model.ir_version = 9
    path = folder / "big.onnx"
    path.write_bytes(model.SerializeToString())
    return path


@pytest.fixture(scope="module")
def big_model(tmp_path_factory):
    return _big_external_model(tmp_path_factory.mktemp("big") / "model")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_interrupted_fold_leaves_no_output_and_no_temp_files(tmp_path, big_model, signum):
    before = snapshot(big_model.parent)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "big.folded.onnx"
    proc = subprocess.Popen([PYTHON, "-m", "bnfold", "fold", str(big_model), "-o", str(out), "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    signalled = False
    deadline = time.monotonic() + 30
    while proc.poll() is None and time.monotonic() < deadline:
        if any(p.name.startswith(".") for p in out_dir.iterdir()):  # the save has begun staging
            time.sleep(0.05)
            proc.send_signal(signum)
            signalled = True
            break
        time.sleep(0.002)
    _, stderr = proc.communicate(timeout=60)
    assert "Traceback" not in stderr
    # 0 if it finished first, else the conventional 128 + signal: never 1 ("a check failed") or 3
    assert proc.returncode in (0, 128 + signum), (proc.returncode, stderr)
    assert signalled or proc.returncode == 0, stderr
    assert temp_leftovers(out_dir) == [], os.listdir(out_dir)
    written = sorted(os.listdir(out_dir))
    if written:
        # the signal came too late to stop the commit: then the output must be complete
        assert written == ["big.folded.onnx", "big.folded.onnx.data"]
        assert (out_dir / "big.folded.onnx.data").stat().st_size >= 64 * 3 * 512 * 512 * 4
        onnx.checker.check_model(str(out))
    else:
        assert proc.returncode == 128 + signum
    assert snapshot(big_model.parent) == before


# ---------------------------------------------------------------------------------------
# external data in, external data out


def _locations(path: Path) -> set[str]:
    proto = onnx.load(path, load_external_data=False)
    return {
        {e.key: e.value for e in t.external_data}["location"]
        for t in proto.graph.initializer
        if t.data_location == onnx.TensorProto.EXTERNAL
    }


@pytest.fixture
def external_model(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    path = src / "model.onnx"
    save_external(conv_bn(), path)
    return path


def test_external_data_model_folds_to_out_data_by_default(tmp_path, external_model):
    src_before = snapshot(external_model.parent)
    out = tmp_path / "folded.onnx"
    result = invoke("fold", external_model, "-o", out, "--quiet")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["folded.onnx", "folded.onnx.data"]
    assert _locations(out) == {"folded.onnx.data"}
    proto = onnx.load(out, load_external_data=False)
    weight = next(n for n in proto.graph.node if n.op_type == "Conv").input[1]
    stored = {t.name: t.data_location for t in proto.graph.initializer}
    assert stored[weight] == onnx.TensorProto.EXTERNAL  # the folded weight is still external
    assert out.stat().st_size < 432  # the weights (4*3*3*3 float32) are not inline
    _folded_ok(out, external_model)
    assert snapshot(external_model.parent) == src_before


def test_external_data_name_is_honoured(tmp_path, external_model):
    out = tmp_path / "folded.onnx"
    result = invoke("fold", external_model, "-o", out, "--external-data", "weights.bin", "--quiet")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["folded.onnx", "weights.bin"]
    assert _locations(out) == {"weights.bin"}
    _folded_ok(out, external_model)


def test_external_data_into_subfolder_of_output(tmp_path, external_model):
    out = tmp_path / "folded.onnx"
    result = invoke("fold", external_model, "-o", out, "--external-data", "w/weights.bin", "--quiet")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "w" / "weights.bin").is_file()
    assert _locations(out) == {"w/weights.bin"}
    assert temp_leftovers(tmp_path) == []
    _folded_ok(out, external_model)


def test_embed_inlines_external_weights(tmp_path, external_model):
    out = tmp_path / "folded.onnx"
    result = invoke("fold", external_model, "-o", out, "--embed", "--quiet")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["folded.onnx"]
    assert _locations(out) == set()
    _folded_ok(out, external_model)


def test_inline_model_stays_inline_unless_asked(tmp_path, model_file):
    out = tmp_path / "a.onnx"
    assert invoke("fold", model_file, "-o", out, "--quiet").exit_code == 0
    assert _locations(out) == set()
    assert not (tmp_path / "a.onnx.data").exists()
    out = tmp_path / "b.onnx"
    assert invoke("fold", model_file, "-o", out, "--external-data", "b.bin", "--quiet").exit_code == 0
    assert _locations(out) == {"b.bin"}
    _folded_ok(out, model_file)


def test_model_reached_through_symlinked_folder_keeps_working(tmp_path, external_model):
    """A link to the whole model folder is not an escape: the data is beside the real file."""
    link = tmp_path / "alias"
    os.symlink(external_model.parent, link)
    out = tmp_path / "folded.onnx"
    result = invoke("fold", link / "model.onnx", "-o", out, "--quiet")
    assert result.exit_code == 0, result.output
    _folded_ok(out, external_model)


# ---------------------------------------------------------------------------------------
# fuzz: no byte sequence may crash bnfold


settings.register_profile(
    "bnfold-fuzz", max_examples=int(os.environ.get("BNFOLD_FUZZ_EXAMPLES", 300)), deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
FUZZ = settings.get_profile("bnfold-fuzz")


def _fuzz_bases() -> dict[str, tuple[bytes, bytes | None]]:
    """Small valid models to mutate: Conv+BN inline and with external data, and a Conv+BN+Relu+BN."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "m.onnx"
        data = save_external(conv_bn(), path, location="m.onnx.data")
        external = (path.read_bytes(), data.read_bytes())
    b = GraphBuilder(seed=7)
    c = b.node("Conv", [b.input([1, 3, 8, 8]), b.random([4, 3, 3, 3])], name="conv", pads=[1, 1, 1, 1])
    r = b.node("Relu", [b.bn(c, 4, name="bn_a")], name="relu")
    b.output(b.bn(r, 4, name="bn_b"))
    return {"inline": (valid_model_bytes(), None), "external": external,
            "two-bn": (b.model().SerializeToString(), None)}


FUZZ_BASES = _fuzz_bases()

# Byte-level mutations: mostly break the protobuf encoding.
byte_mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10**6), st.integers(0, 7)),
    st.tuples(st.just("set"), st.integers(0, 10**6), st.integers(0, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 10**6)),
    st.tuples(st.just("insert"), st.integers(0, 10**6), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("delete"), st.integers(0, 10**6), st.integers(1, 32)),
    st.tuples(st.just("swap"), st.integers(0, 10**6), st.integers(0, 10**6), st.integers(1, 64)),
)

# Structure-aware mutations: the bytes still parse, so they reach validation and the engine.
_ATTRS = ["epsilon", "training_mode", "is_test", "spatial", "momentum", "group", "pads", "strides",
          "dilations", "kernel_shape", "auto_pad", "transA", "transB", "alpha", "beta", "axis"]
_EXT_VALUES = ["", "m.onnx.data", "../m.onnx.data", "/etc/passwd", "m.onnx", ".", "sub/x.bin", "-1", "0",
               "7", "abc", "1e3", "99999999999999999999", "a\x00b"]
attr_value = st.one_of(st.integers(-3, 6), st.floats(width=32), st.lists(st.integers(-2, 4), max_size=6),
                       st.sampled_from(["SAME_UPPER", "bogus"]))
index = st.integers(0, 50)
proto_mutation = st.one_of(
    st.tuples(st.just("rename"), index, st.booleans(), index, index),
    st.tuples(st.just("drop"), st.integers(0, 4), index),
    st.tuples(st.just("dims"), index, st.lists(st.integers(-2, 6), max_size=4)),
    st.tuples(st.just("dtype"), index, st.integers(0, 26)),
    st.tuples(st.just("attr"), index, st.sampled_from(_ATTRS), attr_value),
    st.tuples(st.just("op"), index, st.sampled_from(["Conv", "BatchNormalization", "Gemm", "MatMul", "Relu",
                                                     "ConvTranspose", "Add", "Identity", "NoSuchOp"])),
    st.tuples(st.just("opset"), st.integers(-1, 30)),
    st.tuples(st.just("ir"), st.integers(-1, 13)),
    st.tuples(st.just("domain"), index, st.sampled_from(["", "ai.onnx", "ai.onnx.ml", "com.microsoft", "x"])),
    st.tuples(st.just("ext"), index, st.sampled_from(["location", "offset", "length", "checksum"]),
              st.sampled_from(_EXT_VALUES)),
    st.tuples(st.just("arity"), index, st.integers(0, 7)),
    st.tuples(st.just("raw"), index, st.binary(max_size=40)),
    st.tuples(st.just("fill"), index, st.binary(min_size=1, max_size=8)),  # same length: odd values
)


def mutate(data: bytes, steps) -> bytes:
    buf = bytearray(data)
    for step in steps:
        if not buf:
            break
        kind, pos = step[0], step[1] % len(buf)
        if kind == "flip":
            buf[pos] ^= 1 << step[2]
        elif kind == "set":
            buf[pos] = step[2]
        elif kind == "truncate":
            del buf[pos:]
        elif kind == "insert":
            buf[pos:pos] = step[2]
        elif kind == "delete":
            del buf[pos:pos + step[2]]
        elif kind == "swap":
            other, size = step[2] % len(buf), step[3]
            a, b = sorted((pos, other))
            size = min(size, b - a, len(buf) - b)
            if size > 0:
                buf[a:a + size], buf[b:b + size] = buf[b:b + size], buf[a:a + size]
    return bytes(buf)


def _pick(items, i):
    return items[i % len(items)] if len(items) else None


def mutate_proto(data: bytes, steps) -> bytes:
    model = onnx.ModelProto.FromString(data)
    g = model.graph
    names = sorted({n for node in g.node for n in [*node.input, *node.output]}
                   | {t.name for t in g.initializer} | {"", "ghost"})
    for kind, *args in steps:
        if kind == "rename" and (node := _pick(g.node, args[0])) is not None:
            field = node.input if args[1] else node.output
            if len(field):
                field[args[2] % len(field)] = names[args[3] % len(names)]
        elif kind == "drop":
            container = [g.node, g.initializer, g.input, g.output, model.opset_import][args[0]]
            if len(container):
                del container[args[1] % len(container)]
        elif kind in ("dims", "dtype", "raw", "fill") and (tensor := _pick(g.initializer, args[0])) is not None:
            if kind == "dims":
                tensor.dims[:] = args[1]
            elif kind == "dtype":
                tensor.data_type = args[1]
            elif tensor.data_location != onnx.TensorProto.EXTERNAL and kind == "raw":
                tensor.raw_data = args[1]
            elif tensor.data_location != onnx.TensorProto.EXTERNAL:
                size = len(tensor.raw_data)
                tensor.raw_data = (args[1] * size)[:size]
        elif kind == "attr" and (node := _pick(g.node, args[0])) is not None:
            kept = [a for a in node.attribute if a.name != args[1]]
            del node.attribute[:]
            kind_hint = onnx.AttributeProto.INTS if args[2] == [] else None
            node.attribute.extend([*kept, oh.make_attribute(args[1], args[2], attr_type=kind_hint)])
        elif kind == "op" and (node := _pick(g.node, args[0])) is not None:
            node.op_type = args[1]
        elif kind == "opset" and len(model.opset_import):
            model.opset_import[0].version = args[0]
        elif kind == "ir":
            model.ir_version = args[0]
        elif kind == "domain" and (node := _pick(g.node, args[0])) is not None:
            node.domain = args[1]
        elif kind == "ext" and (tensor := _pick(g.initializer, args[0])) is not None:
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                entries = [e for e in tensor.external_data if e.key != args[1]]
                del tensor.external_data[:]
                tensor.external_data.extend(entries)
                tensor.external_data.add(key=args[1], value=args[2])
        elif kind == "arity" and (node := _pick(g.node, args[0])) is not None:
            if args[1] < len(node.input):
                del node.input[args[1]:]
            else:
                node.input.extend([""] * (args[1] - len(node.input)))
    return model.SerializeToString()


def test_mutations_change_the_model():
    data = valid_model_bytes()
    assert mutate(data, [("flip", 5, 0)]) != data
    assert mutate(data, [("truncate", 10)]) == data[:10]
    assert len(mutate(data, [("insert", 3, b"ab")])) == len(data) + 2
    assert mutate(data, [("swap", 0, 20, 4)])[:4] == data[20:24]
    changed = onnx.ModelProto.FromString(mutate_proto(data, [("op", 0, "Relu"), ("opset", 3)]))
    assert changed.graph.node[0].op_type == "Relu" and changed.opset_import[0].version == 3


@settings(FUZZ)
@given(base=st.sampled_from(sorted(FUZZ_BASES)),
       proto_steps=st.lists(proto_mutation, max_size=3),
       byte_steps=st.one_of(st.just([]), st.just([]), st.just([]),  # 1 in 4 also breaks bytes
                            st.lists(byte_mutation, min_size=1, max_size=2)))
def test_fuzzed_models_never_crash(tmp_path, base, proto_steps, byte_steps):
    """Every mutated model gives exit 0, 1 or 2, never 3; exit 2 means one error line and no
    output; a written output is a model bnfold itself can load again."""
    model_bytes, data_bytes = FUZZ_BASES[base]
    folder = Path(tempfile.mkdtemp(dir=tmp_path))
    model = folder / "m.onnx"
    model.write_bytes(mutate(mutate_proto(model_bytes, proto_steps), byte_steps))
    if data_bytes is not None:
        (folder / "m.onnx.data").write_bytes(data_bytes)
    out = folder / "out.onnx"
    before = snapshot(folder)
    for args in (["fold", model, "-o", out, "--quiet"], ["inspect", model, "--quiet"]):
        result = invoke(*args)
        assert result.exit_code in (0, 1, 2), (args[0], result.exit_code, result.output)
        assert "internal error" not in result.output
        assert result.stdout == ""  # --quiet
        if result.exit_code == 2:
            assert result.stderr.count("\n") == 1 and result.stderr.startswith("bnfold: error: "), result.stderr
            if args[0] == "fold":
                assert not out.exists()
        elif result.exit_code == 1:  # inspect -q: not ready, said in one summary line
            assert args[0] == "inspect" and result.stderr.count("\n") == 1, result.stderr
            assert "not inference-ready" in result.stderr
        else:
            assert result.stderr == ""
            if args[0] == "fold":
                load_model(out)  # a written output is complete and passes bnfold's own checks
        assert temp_leftovers(folder) == []
    after = snapshot(folder)
    assert {k: v for k, v in after.items() if not k.startswith("out.onnx")} == before
