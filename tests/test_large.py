"""A > 2 GB external-data model folds in a bounded amount of memory.

The model is a stack of 1x1 Conv+BN layers whose weights live in one sparse data file
(mostly holes, so building it costs little disk time); each weight has a written, random
head so the folded values can be checked. The fold runs as a separate `python -m bnfold`
process and its peak RSS is read with ``os.wait4``.

Bound: peak RSS < 0.5 x the model's weight bytes. Folded tensors are computed one at a
time while saving (float64 in chunks, cast once into one output-sized buffer), and each
source mapping is released after use, so the peak is about one tensor plus the
interpreter; measured here at ~0.7 GB for a 2.4 GB model.
"""

import os
import subprocess
import sys

import numpy as np
import onnx
import onnx.helper as oh
import pytest

from builders import external

CHANNELS = 8192  # one weight = 8192 x 8192 float32 = 256 MiB
LAYERS = 9  # 2.25 GiB of weights in all
HEAD = 4096  # elements written at the start of each weight (< CHANNELS); the rest is a hole
RSS_BOUND_FRACTION = 0.5


def build_big_model(folder) -> tuple[list[np.ndarray], int]:
    """Write ``big.onnx`` and its sparse ``big.data`` into ``folder``; return each weight's
    written head and the weight bytes in all (``bench/verify_memory.py`` builds it too)."""
    rng = np.random.default_rng(0)
    weight_bytes = CHANNELS * CHANNELS * 4
    heads, initializers, nodes, x = [], [], [], "x"
    with open(folder / "big.data", "wb") as data:
        for layer in range(LAYERS):
            offset = layer * weight_bytes
            head = rng.standard_normal(HEAD).astype(np.float32)
            data.seek(offset)
            data.write(head.tobytes())
            heads.append(head)
            initializers.append(external(f"w{layer}", [CHANNELS, CHANNELS, 1, 1], offset, "big.data"))
            params = [rng.uniform(0.5, 2, CHANNELS), rng.standard_normal(CHANNELS),
                      rng.standard_normal(CHANNELS), rng.uniform(0.5, 2, CHANNELS)]
            names = [f"{role}{layer}" for role in ("gamma", "beta", "mean", "var")]
            initializers += [onnx.numpy_helper.from_array(p.astype(np.float32), n) for p, n in zip(params, names)]
            nodes.append(oh.make_node("Conv", [x, f"w{layer}"], [f"c{layer}"], name=f"conv{layer}"))
            nodes.append(oh.make_node("BatchNormalization", [f"c{layer}", *names], [f"y{layer}"], name=f"bn{layer}"))
            x = f"y{layer}"
        data.truncate(LAYERS * weight_bytes)
    graph = oh.make_graph(nodes, "big", [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, CHANNELS, 1, 1])],
                          [oh.make_tensor_value_info(x, onnx.TensorProto.FLOAT, [1, CHANNELS, 1, 1])], initializers)
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=9)
    with open(folder / "big.onnx", "wb") as handle:
        handle.write(model.SerializeToString())
    return heads, LAYERS * weight_bytes


@pytest.fixture(scope="module")
def big_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("big")
    heads, weight_bytes = build_big_model(folder)
    return folder, heads, weight_bytes


@pytest.mark.slow
def test_fold_of_a_2gb_external_model_streams(big_model, tmp_path):
    folder, heads, weight_bytes = big_model
    assert weight_bytes > 2**31
    out = tmp_path / "big.folded.onnx"
    process = subprocess.Popen([sys.executable, "-m", "bnfold", "fold", str(folder / "big.onnx"), "-o", str(out),
                                "--quiet", "--json", str(tmp_path / "ledger.json")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    stderr = process.stderr.read().decode()
    assert os.waitstatus_to_exitcode(status) == 0, stderr
    peak = usage.ru_maxrss * 1024
    print(f"fold peak RSS {peak / 2**30:.2f} GiB for {weight_bytes / 2**30:.2f} GiB of weights")
    assert peak < RSS_BOUND_FRACTION * weight_bytes, f"peak RSS {peak / 2**30:.2f} GiB for {weight_bytes / 2**30:.2f} GiB"

    data = out.parent / "big.folded.onnx.data"
    assert data.is_file() and data.stat().st_size >= weight_bytes
    folded = onnx.load(out, load_external_data=False)
    assert [n.op_type for n in folded.graph.node] == ["Conv"] * LAYERS
    source = onnx.load(folder / "big.onnx", load_external_data=False)
    params = {t.name: onnx.numpy_helper.to_array(t) for t in source.graph.initializer if not t.external_data}
    by_name = {t.name: t for t in folded.graph.initializer}
    for layer, node in enumerate(folded.graph.node):
        gamma, beta, mean, var = (params[f"{role}{layer}"].astype(np.float64) for role in ("gamma", "beta", "mean", "var"))
        scale = gamma / np.sqrt(var + 1e-5)
        info = {e.key: e.value for e in by_name[node.input[1]].external_data}
        with open(out.parent / info["location"], "rb") as handle:
            handle.seek(int(info["offset"]))
            head = np.frombuffer(handle.read(HEAD * 4), dtype=np.float32)
        # HEAD < CHANNELS: the written head lies in output channel 0.
        expected = (heads[layer].astype(np.float64) * scale[0]).astype(np.float32)
        np.testing.assert_array_equal(head, expected)
        bias = onnx.numpy_helper.to_array(by_name[node.input[2]], base_dir=str(out.parent))
        np.testing.assert_allclose(bias, (beta - mean * scale).astype(np.float32), rtol=1e-6, atol=1e-6)
