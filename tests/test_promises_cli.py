"""Promises of the command line and the writer that had no test (issue 27).

- ``--embed`` is refused above protobuf's 2 GB, before anything is written (README);
- big models (>= 64 MiB of weights) get progress bars on stderr, smaller ones and
  ``--quiet`` runs none (README);
- an internal error is exit 3 with one line, and with ``BNFOLD_DEBUG=1`` the traceback,
  still exit 3 (README, "Exit codes");
- at most 32 MiB of folded weights, or two tensors, are in flight ahead of the writer
  (docs/io.md);
- ``--fold-overridable``, ``--channel-axis`` and ``--allow-tf32`` do on the command line
  what the README and docs/verify.md say.

The large models are external-data models whose data file is sparse (``truncate``), so
they cost no disk and little time: bnfold decides from sizes before it reads a byte.
"""

from __future__ import annotations

import json
import os
import pty
import re
import subprocess
import sys
import time
import tracemalloc

import numpy as np
import onnx
import onnx.helper as oh
import pytest

import bnfold
from bnfold.errors import InputError
from builders import external, run
from cli_runner import invoke

MiB = 2**20
#: The sizes the README promises, written out rather than imported from bnfold.
PROGRESS_FROM_BYTES = 64 * MiB
PROTOBUF_LIMIT = 2**31


def add_model(folder, elements: int, *, embedded: bool = False):
    """x[1, n] + W[1, n]: one float32 weight of ``elements``, external (a sparse file) or embedded."""
    path = folder / "m.onnx"
    if embedded:
        weight = onnx.numpy_helper.from_array(np.zeros((1, elements), np.float32), "W")
    else:
        with open(folder / "m.data", "wb") as data:
            data.truncate(elements * 4)
        weight = external("W", [1, elements], 0, "m.data")
    graph = oh.make_graph([oh.make_node("Add", ["x", "W"], ["y"], name="add")], "g",
                          [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, elements])],
                          [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, elements])], [weight])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    model.ir_version = 9
    path.write_bytes(model.SerializeToString())
    return path


def listing(folder) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))}


# --- --embed above 2 GB ------------------------------------------------------------------


def test_embed_is_refused_above_2gb_before_anything_is_written(tmp_path):
    src_folder, out_folder = tmp_path / "src", tmp_path / "out"
    src_folder.mkdir()
    out_folder.mkdir()
    src = add_model(src_folder, PROTOBUF_LIMIT // 4 + 1024)
    before = listing(src_folder)

    result = invoke("fold", src, "-o", out_folder / "big.onnx", "--embed", "--quiet")

    assert result.exit_code == 2, result.output
    (line,) = result.stderr.splitlines()
    assert line.startswith("bnfold: error: ") and "2 GiB" in line and "external data" in line
    assert listing(out_folder) == {}
    assert listing(src_folder) == before
    with pytest.raises(InputError, match="2 GiB"):
        bnfold.fold(src).save(out_folder / "api.onnx", external_data=False)
    assert listing(out_folder) == {}


# --- progress bars from 64 MiB ---------------------------------------------------------

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def fold_on_a_terminal(*args) -> tuple[int, str]:
    """``python -m bnfold fold ...`` with stderr on a pseudo-terminal, as a user at a shell
    sees it: (exit code, stderr without its terminal control sequences)."""
    leader, follower = pty.openpty()
    env = {**os.environ, "TERM": "xterm", "COLUMNS": "100"}
    process = subprocess.Popen([sys.executable, "-m", "bnfold", "fold", *map(str, args)], stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=follower, env=env)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    code = process.wait(timeout=120)
    return code, ANSI.sub("", b"".join(chunks).decode(errors="replace"))


@pytest.mark.parametrize("elements, bars", [(PROGRESS_FROM_BYTES // 4, True), (PROGRESS_FROM_BYTES // 4 - 1, False)],
                         ids=["64MiB", "just-below"])
def test_progress_bars_from_64_mib_of_weights(tmp_path, elements, bars):
    src = add_model(tmp_path, elements)
    code, shown = fold_on_a_terminal(src, "-o", tmp_path / "out.onnx")
    assert code == 0, shown
    if bars:
        assert "fold" in shown and "save out.onnx" in shown, shown
    else:
        assert shown.strip() == "", shown
    quiet = invoke("fold", src, "-o", tmp_path / "quiet.onnx", "--quiet")
    assert quiet.exit_code == 0 and quiet.stderr == quiet.stdout == "", quiet.output


def test_a_big_embedded_model_gets_a_bar_while_loading(tmp_path):
    src = add_model(tmp_path, PROGRESS_FROM_BYTES // 4, embedded=True)
    code, shown = fold_on_a_terminal(src, "-o", tmp_path / "out.onnx")
    assert code == 0, shown
    assert "load m.onnx" in shown, shown


# --- exit 3 and BNFOLD_DEBUG -----------------------------------------------------------

#: The ``bnfold`` command with a bug planted in the fold's algebra: a real process, a real exit code.
PLANTED = ("import sys, bnfold.affine as affine\n"
           "def planted(*args, **kwargs):\n"
           "    raise RuntimeError('planted bug')\n"
           "affine.bn_scale_shift = planted\n"
           "from bnfold.cli import console_script\n"
           "console_script()\n")


@pytest.fixture
def conv_bn_file(tmp_path):
    from _models import ConvBnParams, conv_bn_model, save

    return save(conv_bn_model(ConvBnParams.random(np.random.default_rng(0), 4, 3, (3, 3))), tmp_path / "m.onnx")


@pytest.mark.parametrize("debug", [False, True], ids=["plain", "BNFOLD_DEBUG=1"])
def test_an_internal_error_exits_3_with_one_line_or_the_traceback(tmp_path, conv_bn_file, debug):
    env = {key: value for key, value in os.environ.items() if key != "BNFOLD_DEBUG"}
    if debug:
        env["BNFOLD_DEBUG"] = "1"
    out = tmp_path / "out.onnx"
    before = listing(tmp_path)
    process = subprocess.run([sys.executable, "-c", PLANTED, "fold", str(conv_bn_file), "-o", str(out)],
                             capture_output=True, text=True, env=env, timeout=120)

    assert process.returncode == 3, process.stderr
    assert process.stdout == ""
    assert listing(tmp_path) == before  # no output, no leftovers
    if debug:
        assert process.stderr.startswith("Traceback (most recent call last):"), process.stderr
        assert "in planted" in process.stderr
        assert process.stderr.rstrip().splitlines()[-1] == "RuntimeError: planted bug"
    else:
        assert process.stderr.splitlines() == [
            "bnfold: internal error: RuntimeError: planted bug (set BNFOLD_DEBUG=1 for a traceback)"]


# --- the writer's bytes in flight ------------------------------------------------------

LAYERS, CHANNELS = 20, 1024  # 20 folded weights of 4 MiB: 80 MiB in all


def conv_bn_stack(folder):
    """LAYERS x (1x1 Conv [CHANNELS, CHANNELS] -> BN), weights in a sparse external file."""
    nbytes = CHANNELS * CHANNELS * 4
    with open(folder / "stack.data", "wb") as data:
        data.truncate(LAYERS * nbytes)
    rng = np.random.default_rng(0)
    initializers, nodes, x = [], [], "x"
    for layer in range(LAYERS):
        initializers.append(external(f"w{layer}", [CHANNELS, CHANNELS, 1, 1], layer * nbytes, "stack.data"))
        names = [f"{role}{layer}" for role in ("gamma", "beta", "mean", "var")]
        values = [rng.uniform(0.5, 2, CHANNELS), rng.standard_normal(CHANNELS), rng.standard_normal(CHANNELS),
                  rng.uniform(0.5, 2, CHANNELS)]
        initializers += [onnx.numpy_helper.from_array(v.astype(np.float32), n) for v, n in zip(values, names)]
        nodes += [oh.make_node("Conv", [x, f"w{layer}"], [f"c{layer}"], name=f"conv{layer}"),
                  oh.make_node("BatchNormalization", [f"c{layer}", *names], [f"y{layer}"], name=f"bn{layer}")]
        x = f"y{layer}"
    value = oh.make_tensor_value_info
    graph = oh.make_graph(nodes, "stack", [value("x", onnx.TensorProto.FLOAT, [1, CHANNELS, 1, 1])],
                          [value(x, onnx.TensorProto.FLOAT, [1, CHANNELS, 1, 1])], initializers)
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    model.ir_version = 9
    (folder / "stack.onnx").write_bytes(model.SerializeToString())
    return folder / "stack.onnx", nbytes


def test_at_most_32_mib_of_folded_weights_are_in_flight_while_writing(tmp_path):
    """A writer slowed down (its callback sleeps after each weight) lets the folding threads
    run as far ahead as they may. What the save allocates at its peak (numpy reports its
    buffers to tracemalloc) is then the in-flight weights, the one being written and the
    two threads' 1 MiB float64 blocks: at most max(32 MiB, 2 tensors) + 1 tensor + 4 MiB,
    far below the 80 MiB of folded weights."""
    src, tensor = conv_bn_stack(tmp_path)
    result = bnfold.fold(src)
    assert len(result.ledger.folded) == LAYERS
    written = []

    def slow_writer(tensor, count, total):
        written.append(count)
        time.sleep(0.02)

    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        result.save(tmp_path / "out.onnx", callback=slow_writer)
        peak = tracemalloc.get_traced_memory()[1] - start
    finally:
        tracemalloc.stop()

    assert written == list(range(1, LAYERS + 1))
    bound = max(32 * MiB, 2 * tensor) + tensor + 4 * MiB
    assert peak <= bound, f"peak {peak / MiB:.1f} MiB > {bound / MiB:.1f} MiB while writing {LAYERS * tensor / MiB:.0f} MiB"


# --- options the README and docs/verify.md name ------------------------------------------


def overridable_conv_bn(path):
    """x -> Conv -> BN whose four statistics are initializers also listed as graph inputs (IR 8)."""
    from _models import ConvBnParams, conv_bn_model

    model = conv_bn_model(ConvBnParams.random(np.random.default_rng(3), 4, 3, (3, 3)))
    for name in ("c_scale", "c_beta", "c_mean", "c_var"):
        model.graph.input.append(oh.make_tensor_value_info(name, onnx.TensorProto.FLOAT, [4]))
    path.write_bytes(model.SerializeToString())
    return path


def test_fold_overridable_on_the_command_line_folds_and_drops_the_inputs(tmp_path):
    """README: --fold-overridable folds initializers that are also graph inputs (IR >= 4),
    dropping those inputs; without it such a BN is kept as overridable-params."""
    src = overridable_conv_bn(tmp_path / "m.onnx")
    plain = invoke("fold", src, "-o", tmp_path / "plain.onnx", "--json", tmp_path / "plain.json", "--quiet")
    folded = invoke("fold", src, "-o", tmp_path / "out.onnx", "--fold-overridable", "--json", tmp_path / "out.json",
                    "--quiet")

    assert plain.exit_code == folded.exit_code == 0, plain.output + folded.output
    (kept,) = json.loads((tmp_path / "plain.json").read_text())["entries"]
    (done,) = json.loads((tmp_path / "out.json").read_text())["entries"]
    assert (kept["status"], kept["reason"]) == ("kept", "overridable-params")
    assert (done["status"], done["pattern"]) == ("folded", "conv-bn")
    out = onnx.load(tmp_path / "out.onnx")
    assert [i.name for i in out.graph.input] == ["x"]
    x = {"x": np.random.default_rng(4).standard_normal((2, 3, 8, 8)).astype(np.float32)}
    np.testing.assert_allclose(run(tmp_path / "out.onnx", x)[0], run(src, x)[0], rtol=1e-4, atol=1e-5)


def test_verify_records_channel_axis_and_allow_tf32_from_the_command_line(tmp_path):
    """docs/verify.md: --channel-axis OUTPUT=AXIS says where an output's channels lie (the
    report's channel_axis and channel count follow it); --allow-tf32 is recorded."""
    from _models import ConvBnParams, conv_bn_model, save

    params = ConvBnParams.random(np.random.default_rng(5), 4, 3, (3, 3))
    original = save(conv_bn_model(params), tmp_path / "original.onnx")
    candidate = save(conv_bn_model(params, folded=True), tmp_path / "candidate.onnx")
    reports = {}
    for name, extra in (("default", []), ("axis", ["--channel-axis", "y=3", "--allow-tf32"])):
        result = invoke("verify", original, candidate, "--providers", "cpu", "--json", tmp_path / f"{name}.json",
                        *extra)
        assert result.exit_code == 0, result.output
        reports[name] = json.loads((tmp_path / f"{name}.json").read_text())
    axes = {name: {(c["difference"]["channel_axis"], c["difference"]["channels"]) for c in report["comparisons"]}
            for name, report in reports.items()}
    assert axes == {"default": {(1, 4)}, "axis": {(3, 6)}}  # y is [2, 4, 6, 6]
    assert (reports["default"]["allow_tf32"], reports["axis"]["allow_tf32"]) == (False, True)


def test_an_input_range_onnxruntime_cannot_run_is_named_with_the_fix(tmp_path):
    """docs/verify.md: a run-time error of onnxruntime is exit 2 in one line naming the node,
    the graph input that feeds it, what it was fed and the --input-range to give."""
    from _models import ConvBnParams, embedding_model, save

    params = ConvBnParams.random(np.random.default_rng(6), 4, 5, (3,))
    table = np.random.default_rng(7).standard_normal((5, 6)).astype(np.float32)
    model = save(embedding_model(params, table), tmp_path / "m.onnx")
    result = invoke("verify", model, model, "--providers", "cpu", "--input-range", "ids=0,50", "--quiet")

    assert result.exit_code == 2, result.output
    (line,) = result.stderr.splitlines()
    assert line.startswith("bnfold: error: onnxruntime failed running ORIGINAL"), line
    assert "reads input 'ids' int64[2x5] fed values in [0, 50] (--input-range)" in line, line
    assert line.endswith("give the valid range with --input-range ids=LO,HI"), line
    assert invoke("verify", model, model, "--providers", "cpu", "--quiet").exit_code == 0  # the derived range: [0, 4]
