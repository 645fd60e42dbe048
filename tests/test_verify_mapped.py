"""verify hands onnxruntime large embedded weights mapped from the model file
(bnfold/verification/mapped.py): the sessions must compute what onnxruntime computes on the
file itself, for every dtype and for offsets of any alignment, and a change in a mapped
weight must still fail."""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from _models import make_model, save
from bnfold import _ort_worker
from bnfold.load import EMBEDDED_MIN_BYTES, load_source
from bnfold.verification import verify
from bnfold.verification.feeds import read_npz
from bnfold.verification.mapped import mapped_model
from bnfold.verification.runner import MALLOC_TUNABLES, child_environment

pytestmark = pytest.mark.skipif(
    _ort_worker._version(ort.__version__) < _ort_worker.FIRST_MAPPING_VERSION,
    reason=f"onnxruntime {ort.__version__} is given paths, not mapped weights",
)


def _mixed_model(rng: np.random.Generator, nudge: float = 0.0) -> onnx.ModelProto:
    """Large float32, float64, float16 and int64 weights behind one input each; ``nudge``
    changes one column of the float32 weight by that fraction."""
    w32 = rng.standard_normal((64, 300)).astype(np.float32)
    w32[:, 7] *= 1 + nudge
    w64 = rng.standard_normal((300, 40))
    w16 = rng.standard_normal((40, 1000)).astype(np.float16)
    table = rng.integers(-1000, 1000, 20000).astype(np.int64)
    nodes = [
        helper.make_node("MatMul", ["x", "w32"], ["h32"]),
        helper.make_node("Cast", ["h32"], ["h64"], to=TensorProto.DOUBLE),
        helper.make_node("MatMul", ["h64", "w64"], ["y64"]),
        helper.make_node("Cast", ["y64"], ["y16in"], to=TensorProto.FLOAT16),
        helper.make_node("MatMul", ["y16in", "w16"], ["y16"]),
        helper.make_node("Gather", ["table", "index"], ["picked"], axis=0),
    ]
    # Odd-length names put the tensors' bytes at offsets of every alignment.
    initializers = [numpy_helper.from_array(a, n) for a, n in
                    ((w32, "w32"), (w64, "w64x"), (w16, "w16xyz"), (table, "table"))]
    for node in nodes:
        node.input[:] = [{"w64": "w64x", "w16": "w16xyz"}.get(name, name) for name in node.input]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64]),
              helper.make_tensor_value_info("index", TensorProto.INT64, [2, 5])]
    outputs = [helper.make_tensor_value_info("y64", TensorProto.DOUBLE, [2, 40]),
               helper.make_tensor_value_info("y16", TensorProto.FLOAT16, [2, 1000]),
               helper.make_tensor_value_info("picked", TensorProto.INT64, [2, 5])]
    return make_model(nodes, initializers, inputs, outputs)


def test_mapped_sessions_compute_what_onnxruntime_computes_on_the_file(tmp_path):
    path = save(_mixed_model(np.random.default_rng(0)), tmp_path / "model.onnx")
    mapped = mapped_model(load_source(path, infer_shapes=False))
    skeleton = onnx.ModelProto.FromString(mapped["model"])
    offsets = {t.name: int(next(e.value for e in t.external_data if e.key == "offset")) for t in skeleton.graph.initializer}
    assert set(offsets) == {"w32", "w64x", "w16xyz", "table"}
    assert {offset % 8 for offset in offsets.values()} != {0}, "the model should put some weight at an odd offset"
    assert len(mapped["model"]) < EMBEDDED_MIN_BYTES

    report = verify(path, path, save_outputs=tmp_path / "out.npz", save_inputs=tmp_path / "in.npz",
                    input_ranges={"index": (0, 19999)})
    assert report.passed
    inputs, outputs = read_npz(tmp_path / "in.npz", "input"), read_npz(tmp_path / "out.npz", "output")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    direct = session.run(None, {name: inputs[name] for name in ("x", "index")})
    for name, value in zip(("y64", "y16", "picked"), direct):
        np.testing.assert_array_equal(outputs[name], value)


def test_a_changed_mapped_weight_fails(tmp_path):
    original = save(_mixed_model(np.random.default_rng(0)), tmp_path / "original.onnx")
    changed = save(_mixed_model(np.random.default_rng(0), nudge=0.01), tmp_path / "changed.onnx")
    assert mapped_model(load_source(changed, infer_shapes=False)) is not None
    report = verify(original, changed, input_ranges={"index": (0, 19999)})
    assert not report.passed
    assert [c.output for c in report.comparisons if not c.passed] == ["y64", "y16", "y64", "y16"]


def test_the_worker_refuses_a_model_file_that_changed_after_it_was_read(tmp_path):
    path = save(_mixed_model(np.random.default_rng(0)), tmp_path / "model.onnx")
    mapped = mapped_model(load_source(path, infer_shapes=False))
    with open(path, "ab") as handle:  # same inode, new size: offsets may now name other bytes
        handle.write(b"\0")
    feed = {"x": np.zeros((2, 64), np.float32), "index": np.zeros((2, 5), np.int64)}
    result = _ort_worker.run_sessions({
        "sessions": [{"label": "candidate", "path": str(path), "mapped": mapped, "provider": _ort_worker.CPU,
                      "optimize": False}],
        "required": {_ort_worker.CPU: True}, "cuda_options": {}, "feeds": [feed],
    })
    assert "the model file changed while it was being verified" in result["error"]
    assert result["outputs"] == []


def test_malloc_tunables_are_added_but_the_users_own_win():
    assert child_environment({})["GLIBC_TUNABLES"] == ":".join(f"{k}={v}" for k, v in MALLOC_TUNABLES.items())
    given = {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536:glibc.cpu.x86_shstk=on", "HOME": "/h"}
    environment = child_environment(given)
    assert environment["HOME"] == "/h"
    assert environment["GLIBC_TUNABLES"] == given["GLIBC_TUNABLES"] + ":glibc.malloc.hugetlb=1"


def test_a_mapped_model_onnxruntime_refuses_falls_back_to_the_file_with_a_note(tmp_path):
    path = save(_mixed_model(np.random.default_rng(0)), tmp_path / "model.onnx")
    mapped = mapped_model(load_source(path, infer_shapes=False))
    mapped["model"] = mapped["model"][: len(mapped["model"]) // 2]  # a skeleton onnxruntime cannot parse
    feed = {"x": np.ones((2, 64), np.float32), "index": np.arange(10, dtype=np.int64).reshape(2, 5)}
    sessions = [{"label": f"candidate {optimize}", "path": str(path), "mapped": mapped, "provider": _ort_worker.CPU,
                 "optimize": optimize} for optimize in (False, True)]
    result = _ort_worker.run_sessions({"sessions": sessions, "required": {_ort_worker.CPU: True},
                                       "cuda_options": {}, "feeds": [feed]})
    assert result["error"] is None
    assert len(result["notes"]) == 1 and "could not map the weights of" in result["notes"][0]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    expected = dict(zip(["y64", "y16", "picked"], session.run(None, feed)))
    for outputs in result["outputs"]:
        for name, value in expected.items():
            np.testing.assert_allclose(outputs[name][0].astype(np.float64), value.astype(np.float64), rtol=1e-3)


@pytest.mark.parametrize("where", ["deep folder", "undecodable name"])
def test_paths_onnxruntime_cannot_take_as_mapped_data_are_given_whole(tmp_path, where):
    """A folder longer than a session option may be (1024 bytes) or a file name that is
    not UTF-8 cannot be named in the skeleton: the worker gets the path, and verify works."""
    if where == "deep folder":
        folder = tmp_path.joinpath(*["d" * 200] * 6)
        folder.mkdir(parents=True)
        path = folder / "model.onnx"
    else:
        path = tmp_path / os.fsdecode(b"model-\xff.onnx")
    save(_mixed_model(np.random.default_rng(0)), path)
    assert mapped_model(load_source(path, infer_shapes=False)) is None
    assert verify(path, path, input_ranges={"index": (0, 19999)}).passed
