"""``bnfold recalibrate``: running statistics recomputed from unlabelled data.

The goals of the feature, each a test on the zoo's digits models with the digits TRAIN
split as data (the zoo's .npz files hold the test split, scored here against
models/digits_test_labels.npz): untrained statistics fixed, training-mode BNs converted,
healthy models left as good as they were, statistics equal to a float64 numpy reference
whatever the batch size, and test-time adaptation to shifted inputs.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import bnfold
from bnfold import inspect
from bnfold.errors import InputError
from bnfold.recalibration import Moments, recalibrate
from bnfold.train.data import as_layout, load_digits_split
from cli_runner import invoke

MODELS = Path(__file__).resolve().parent.parent / "models"
LABELS = np.load(MODELS / "digits_test_labels.npz")["labels"]


@pytest.fixture(scope="module")
def digits():
    return load_digits_split()


@pytest.fixture(scope="module")
def train_images(digits):
    return {"input": as_layout(digits.x_train, "image")}


def accuracy(model, name: str, inputs: np.ndarray | None = None, batch: int | None = None) -> float:
    """Test accuracy of ``model`` (path or ModelProto) on the zoo's test digits (or ``inputs``)."""
    data = np.load(MODELS / f"{name}.npz")["input"] if inputs is None else inputs
    session = ort.InferenceSession(str(model) if isinstance(model, (str, Path)) else model.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    step = batch or len(data)
    logits = np.concatenate([session.run(None, {"input": data[i:i + step]})[0] for i in range(0, len(data), step)])
    return float((logits.argmax(1) == LABELS).mean())


def bn_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == "BatchNormalization"]


def capture(model: onnx.ModelProto, names: list[str], feed: dict) -> list[np.ndarray]:
    """Run ``model`` with ``names`` exposed as outputs, all samples in one run."""
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    exposed.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(exposed.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(names, feed)


# --- pooling ---------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 7, 1000])
def test_pooled_moments_equal_numpy_whatever_the_batching(batch):
    rng = np.random.default_rng(0)
    scales, offsets = np.array([1, 10, 1e-3, 100, 1]), rng.standard_normal(5) * 50
    data = (rng.standard_normal((203, 5, 3, 4)) * scales[:, None, None] + offsets[:, None, None]).astype(np.float32)
    moments = Moments()
    for start in range(0, len(data), batch):
        moments.update(data[start:start + batch])
    reference = data.astype(np.float64)
    np.testing.assert_allclose(moments.mean, reference.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(moments.var, reference.var(axis=(0, 2, 3)), rtol=1e-10)  # biased
    assert moments.count == 203 * 12


# --- the zoo's goals ----------------------------------------------------------------------


def test_untrained_statistics_are_recomputed_in_graph_order(train_images, tmp_path):
    model = MODELS / "cnn-nostats_ts17.onnx"
    before = hashlib.sha256(model.read_bytes()).hexdigest()
    assert accuracy(model, "cnn-nostats_ts17") == pytest.approx(0.10, abs=0.01)
    result = recalibrate(model, train_images)
    out = tmp_path / "out.onnx"
    result.save(out)
    assert accuracy(out, "cnn-nostats_ts17") >= 0.992
    assert hashlib.sha256(model.read_bytes()).hexdigest() == before
    # A chain of five BNs: five levels, one pass each, every sample used.
    assert [e.level for e in result.report] == [1, 2, 3, 4, 5] and result.passes == 5
    assert all(e.recalibrated and e.samples == 1437 for e in result.report)
    assert result.report[0].count == 1437 * 8 * 8 and result.report[-1].count == 1437
    assert all(f.ok for f in inspect(out))
    # The exporter shared features.4's 0/1 statistics with features.7 and .10 through
    # Identity nodes: each BN now has tensors of its own, and the shared ones are gone.
    saved = onnx.load(out)
    stats = [name for n in bn_nodes(saved) for name in n.input[3:5]]
    assert len(set(stats)) == 10 and all(name.endswith("_recalibrated") for name in stats)
    assert not [n for n in saved.graph.node if n.op_type == "Identity"]
    assert not {"features.4.running_mean", "features.4.running_var"} & {t.name for t in saved.graph.initializer}


def test_64_samples_are_enough(train_images):
    scores = [accuracy(recalibrate(MODELS / "cnn-nostats_ts17.onnx", train_images, samples=64, seed=seed).to_proto(),
                       "cnn-nostats_ts17") for seed in range(5)]
    assert np.mean(scores) >= 0.98, scores


@pytest.mark.parametrize("name", ["cnn-trainmode_ts13", "cnn-trainmode_ts17"])
def test_training_mode_bns_become_inference_bns(train_images, name):
    result = recalibrate(MODELS / f"{name}.onnx", train_images)
    assert all(e.recalibrated and e.converted_from_training for e in result.report)
    model = result.to_proto()
    assert all(len(n.output) == 1 and not any(a.name == "training_mode" and a.i for a in n.attribute)
               for n in bn_nodes(model))
    assert not [p for f in inspect(model) for p in f.problems]
    # Inference form: one digit at a time scores what the whole batch scores.
    assert accuracy(model, name) >= 0.992
    assert accuracy(model, name, batch=1) == accuracy(model, name)


@pytest.mark.parametrize("name", ["cnn_ts13", "resnet_ts13"])
def test_a_healthy_model_stays_as_good(train_images, name):
    original = accuracy(MODELS / f"{name}.onnx", name)
    result = recalibrate(MODELS / f"{name}.onnx", train_images)
    # Never worse by more than 0.5% (cnn_ts13 scores exactly the same; resnet_ts13 gains
    # two test digits, 98.06% -> 98.61%: torch's running averages lag the final weights).
    assert accuracy(result.to_proto(), name) >= original - 0.005
    assert max(e.max_rel_change for e in result.report) < 0.5  # trained statistics barely move


def test_independent_bns_of_one_level_share_a_pass(train_images):
    result = recalibrate(MODELS / "resnet_ts13.onnx", train_images)
    levels = {e.bn: e.level for e in result.report}
    # The strided block's two branches: conv1's BN and the shortcut's BN read the same
    # activation's descendants at the same depth and are measured in one run.
    assert levels["/block2/shortcut/shortcut.1/BatchNormalization"] == levels["/block2/bn1/BatchNormalization"]
    assert len(result.report) == 6 and result.passes == 5


@pytest.mark.parametrize("batch", [1, 7, None])
def test_statistics_equal_a_float64_numpy_reference(train_images, batch):
    data = {"input": train_images["input"][:500]}
    result = recalibrate(MODELS / "cnn-nostats_ts17.onnx", data, batch=batch or 500)
    model = result.to_proto()
    bns = bn_nodes(model)
    activations = capture(model, [n.input[0] for n in bns], data)
    for entry, node, activation in zip(result.report, bns, activations):
        reference = activation.astype(np.float64)
        axes = (0, *range(2, reference.ndim))
        np.testing.assert_allclose(entry.mean, reference.mean(axis=axes), rtol=1e-6)
        np.testing.assert_allclose(entry.var, reference.var(axis=axes), rtol=1e-6)
        stored = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        np.testing.assert_array_equal(stored[node.input[3]], entry.mean.astype(np.float32))
        np.testing.assert_array_equal(stored[node.input[4]], entry.var.astype(np.float32))


@pytest.mark.parametrize("shift, before_at_most, after_at_least", [
    (lambda x: 0.5 + 0.3 * (x - 0.5), 0.35, 0.88),  # low contrast (measured 30.8% -> 92.5%)
    (lambda x: x + 0.5, 0.30, 0.94),  # brighter (measured 25.3% -> 96.7%)
])
def test_test_time_adaptation_to_shifted_inputs(digits, shift, before_at_most, after_at_least):
    shifted_test = shift(as_layout(digits.x_test, "image"))
    shifted_train = {"input": shift(as_layout(digits.x_train, "image"))}
    assert accuracy(MODELS / "cnn_ts13.onnx", "cnn_ts13", shifted_test) <= before_at_most
    adapted = recalibrate(MODELS / "cnn_ts13.onnx", shifted_train, samples=32, seed=0)
    assert accuracy(adapted.to_proto(), "cnn_ts13", shifted_test) >= after_at_least


# --- selection, sharing, skipping -------------------------------------------------------


def test_only_leaves_shared_statistics_untouched(train_images):
    bn4 = "/features/features.4/BatchNormalization"
    result = recalibrate(MODELS / "cnn-nostats_ts17.onnx", train_images, only=[bn4])
    assert [e.bn for e in result.recalibrated] == [bn4]
    assert {e.reason for e in result.report if not e.recalibrated} == {"not-selected"}
    model = result.to_proto()
    constants = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:  # Identity outputs are the shared tensors, still 0 / 1
        if node.op_type == "Identity":
            constants[node.output[0]] = constants[node.input[0]]
    for node in bn_nodes(model):
        mean, var = constants[node.input[3]], constants[node.input[4]]
        if node.name == bn4:
            assert node.input[3].endswith("_recalibrated") and np.any(mean != 0)
        else:
            assert np.all(mean == 0) and np.all(var == 1), node.name


def test_only_refuses_to_measure_behind_a_training_mode_bn_it_leaves_out(train_images):
    with pytest.raises(InputError, match="training-mode BN"):
        recalibrate(MODELS / "cnn-trainmode_ts17.onnx", train_images, only=["/features/features.4/BatchNormalization"])


def _synthetic(nodes, initializers, inputs, outputs, opset=17):
    model = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, initializers),
                              opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def _bn_params(prefix, channels, rng):
    return [numpy_helper.from_array(a.astype(np.float32), f"{prefix}_{role}") for role, a in
            (("scale", rng.uniform(0.5, 2, channels)), ("bias", rng.standard_normal(channels)),
             ("mean", np.zeros(channels)), ("var", np.ones(channels)))]


def test_bns_in_subgraphs_and_with_used_running_stats_are_skipped_with_a_reason():
    rng = np.random.default_rng(0)
    inner = helper.make_graph(
        [helper.make_node("BatchNormalization", ["h", "s_scale", "s_bias", "s_mean", "s_var"], ["sub_y"],
                          name="sub_bn")],
        "then", [], [helper.make_tensor_value_info("sub_y", TensorProto.FLOAT, None)], _bn_params("s", 3, rng))
    other = helper.make_graph([helper.make_node("Identity", ["h"], ["else_y"])], "else", [],
                              [helper.make_tensor_value_info("else_y", TensorProto.FLOAT, None)])
    nodes = [
        helper.make_node("BatchNormalization", ["x", "t_scale", "t_bias", "t_mean", "t_var"],
                         ["h", "run_mean", "run_var"], name="train_bn", training_mode=1),
        helper.make_node("Conv", ["h", "w"], ["c"]),
        helper.make_node("BatchNormalization", ["c", "m_scale", "m_bias", "m_mean", "m_var"], ["y"], name="main_bn"),
        helper.make_node("ReduceMax", ["x"], ["peak"], keepdims=0),
        helper.make_node("Greater", ["peak", "zero"], ["cond"]),
        helper.make_node("If", ["cond"], ["z"], then_branch=inner, else_branch=other),
    ]
    initializers = [*_bn_params("t", 3, rng), *_bn_params("m", 3, rng),
                    numpy_helper.from_array(rng.standard_normal((3, 3, 1, 1)).astype(np.float32), "w"),
                    numpy_helper.from_array(np.array(0, np.float32), "zero")]
    model = _synthetic(nodes, initializers, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 4, 4])],
                       [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y", "z", "run_mean")])
    result = recalibrate(model, {"x": rng.standard_normal((10, 3, 4, 4)).astype(np.float32)})
    by_name = {e.bn: e for e in result.report}
    assert by_name["train_bn"].reason == "running-stats-used"
    assert by_name["sub_bn"].reason == "in-subgraph"
    assert by_name["main_bn"].recalibrated and "train_bn" in by_name["main_bn"].detail


def test_a_bn_in_a_function_is_skipped_with_a_reason():
    """A function body's BN has no value recalibration can measure once the call is
    inlined: skipped as in-subgraph, the main graph's BN still recalibrated."""
    rng = np.random.default_rng(1)
    body = [helper.make_node("Constant", [], [f"f_{role}"], value=t)
            for role, t in zip(("scale", "bias", "mean", "var"), _bn_params("f", 3, rng))]
    body.append(helper.make_node("BatchNormalization", ["a", "f_scale", "f_bias", "f_mean", "f_var"], ["o"],
                                 name="function_bn"))
    function = helper.make_function("local.test", "F", ["a"], ["o"], body, [helper.make_opsetid("", 17)])
    nodes = [helper.make_node("BatchNormalization", ["x", "m_scale", "m_bias", "m_mean", "m_var"], ["h"],
                              name="main_bn"),
             helper.make_node("F", ["h"], ["y"], domain="local.test")]
    model = _synthetic(nodes, _bn_params("m", 3, rng), [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                       ["n", 3, 4, 4])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model.opset_import.append(helper.make_opsetid("local.test", 1))
    model.functions.append(function)
    result = recalibrate(model, {"x": rng.standard_normal((10, 3, 4, 4)).astype(np.float32)})
    by_name = {e.bn: e for e in result.report}
    assert by_name["function_bn"].reason == "in-subgraph" and not by_name["function_bn"].recalibrated
    assert by_name["main_bn"].recalibrated


def test_a_fixed_batch_is_fed_whole_batches():
    model = _conv_bn_chain(channels=4, batch=4)
    data = {"x": np.random.default_rng(3).standard_normal((10, 3, 6, 6)).astype(np.float32)}
    result = recalibrate(model, data)
    assert result.batch == 4 and result.samples == 8 and "2 sample(s) left out" in result.notes[0]
    with pytest.raises(InputError, match="fixed batch of 4"):
        recalibrate(model, data, batch=3)


def test_non_finite_activations_are_refused_with_their_reason():
    data = {"x": np.full((4, 3, 6, 6), np.nan, np.float32)}
    with pytest.raises(InputError, match="none of the 2 BatchNormalization can be recalibrated "
                                         r"\(non-finite-activations\)"):
        recalibrate(_conv_bn_chain(channels=4), data)


def _conv_bn_chain(channels=64, batch="n"):
    """Conv -> BN -> Relu -> Conv -> BN with a 147 KiB weight: large enough to stay in the
    model file at load (an EmbeddedTensor), so the passes must write it out."""
    rng = np.random.default_rng(1)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c1", "a_scale", "a_bias", "a_mean", "a_var"], ["b1"], name="bn1"),
             helper.make_node("Relu", ["b1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["c2"]),
             helper.make_node("BatchNormalization", ["c2", "b_scale", "b_bias", "b_mean", "b_var"], ["y"], name="bn2")]
    initializers = [numpy_helper.from_array((rng.standard_normal((channels, 3, 3, 3)) * 0.3).astype(np.float32), "w1"),
                    numpy_helper.from_array((rng.standard_normal((channels, channels, 3, 3)) * 0.05).astype(np.float32),
                                            "w2"),
                    *_bn_params("a", channels, rng), *_bn_params("b", channels, rng)]
    return _synthetic(nodes, initializers, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 6, 6])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])


@pytest.mark.parametrize("external", [False, True])
def test_large_weights_and_external_data(tmp_path, external):
    path = tmp_path / "model.onnx"
    onnx.save_model(_conv_bn_chain(), path, save_as_external_data=external, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=0)
    data = {"x": np.random.default_rng(2).standard_normal((40, 3, 6, 6)).astype(np.float32)}
    result = recalibrate(path, data, batch=9)
    out = tmp_path / "out" / "recalibrated.onnx"
    out.parent.mkdir()
    result.save(out)
    assert (out.parent / "recalibrated.onnx.data").exists() == external  # external stays external
    model = onnx.load(out)
    activations = capture(model, [n.input[0] for n in bn_nodes(model)], data)
    for entry, activation in zip(result.report, activations):
        reference = activation.astype(np.float64)
        np.testing.assert_allclose(entry.mean, reference.mean(axis=(0, 2, 3)), rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(entry.var, reference.var(axis=(0, 2, 3)), rtol=1e-6)
    original = {t.name: numpy_helper.to_array(t, base_dir=str(tmp_path)) for t in onnx.load(path).graph.initializer}
    assert np.array_equal(numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "w2")),
                          original["w2"])


def test_the_output_is_the_input_with_only_the_statistics_changed(train_images):
    original = onnx.load(MODELS / "cnn_ts13.onnx")
    result = recalibrate(MODELS / "cnn_ts13.onnx", train_images)
    model = result.to_proto()
    assert len(model.graph.node) == len(original.graph.node)
    for old, new in zip(original.graph.node, model.graph.node):
        if old.op_type == "BatchNormalization":
            assert new.input[:3] == old.input[:3] and new.output == old.output and new.attribute == old.attribute
        else:
            assert new == old
    stats = {name for n in bn_nodes(original) for name in n.input[3:5]}
    kept = [t for t in original.graph.initializer if t.name not in stats]
    assert [t for t in model.graph.initializer if t.name in {k.name for k in kept}] == kept
    for field_name in ("input", "output", "value_info"):
        assert getattr(model.graph, field_name) == getattr(original.graph, field_name)
    assert (model.producer_name, model.opset_import, model.ir_version) == \
           (original.producer_name, original.opset_import, original.ir_version)


# --- bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize("data, kwargs, message", [
    ({"images": np.zeros((4, 1, 8, 8), np.float32)}, {}, "no array for input 'input'"),
    ({"input": np.zeros((4, 64), np.float32)}, {}, "rank 4"),
    ({"input": np.zeros((4, 1, 8, 9), np.float32)}, {}, r"shape \[4, 1, 8, 9\]"),
    ({"input": np.zeros((4, 1, 8, 8), np.int64)}, {}, None),  # ints are cast to float
    ({"input": np.zeros((4, 1, 8, 8), np.float32)}, {"samples": 5}, "exceeds the 4 samples"),
    ({"input": np.zeros((4, 1, 8, 8), np.float32)}, {"only": ["nope"]}, "'nope' names no BatchNormalization"),
])
def test_bad_input_is_one_input_error(data, kwargs, message):
    if message is None:
        recalibrate(MODELS / "cnn_ts13.onnx", data, **kwargs)
        return
    with pytest.raises(InputError, match=message):
        recalibrate(MODELS / "cnn_ts13.onnx", data, **kwargs)


def test_reasons_are_documented_and_inspect_points_here():
    from bnfold.health import PROBLEMS
    from bnfold.recalibration import REASONS

    text = (Path(__file__).resolve().parent.parent / "docs" / "recalibrate.md").read_text()
    assert [code for code in REASONS if f"| `{code}` |" not in text] == []
    assert "bnfold recalibrate" in PROBLEMS["untrained-stats"] and "bnfold recalibrate" in PROBLEMS["training-mode"]


def test_a_model_without_bn_is_refused():
    with pytest.raises(InputError, match="no BatchNormalization"):
        recalibrate(MODELS / "cnn_dynamo18opt.onnx", {"input": np.zeros((2, 1, 8, 8), np.float32)})


# --- API and CLI ---------------------------------------------------------------------------


def test_the_api_is_bnfold_recalibrate(train_images):
    from bnfold import recalibration  # the module has its own name: bnfold.recalibrate stays the function

    assert recalibration.recalibrate is bnfold.recalibrate
    assert callable(bnfold.recalibrate) and bnfold.recalibrate.__module__ == "bnfold.recalibration"
    result = bnfold.recalibrate(MODELS / "mlp_ts13.onnx", {"input": as_layout(load_digits_split().x_train, "flat")},
                                samples=100)
    assert len(result.recalibrated) == 2 and result.to_dict()["summary"]["recalibrated"] == 2
    json.dumps(result.to_dict())


def test_cli_recalibrate(train_images, tmp_path):
    model = tmp_path / "cnn-nostats_ts17.onnx"
    shutil.copy(MODELS / "cnn-nostats_ts17.onnx", model)
    data = tmp_path / "train.npz"
    np.savez(data, **train_images)
    result = invoke("recalibrate", model, "--data", data, "--json", tmp_path / "report.json", "--samples", "500",
                    "--batch", "50")
    assert result.exit_code == 0, result.output
    out = tmp_path / "cnn-nostats_ts17.recalibrated.onnx"
    assert "5 of 5 BatchNormalization recalibrated" in result.output and f"wrote {out}" in result.output
    assert accuracy(out, "cnn-nostats_ts17") >= 0.99
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["schema"] == "bnfold.recalibrate" and report["summary"]["samples"] == 500
    assert [e["level"] for e in report["entries"]] == [1, 2, 3, 4, 5]
    bad = invoke("recalibrate", model, "--data", data, "--only", "nope", "-o", tmp_path / "x.onnx")
    assert bad.exit_code == 2 and "names no BatchNormalization" in bad.output


def test_cli_fold_recalibrate(train_images, tmp_path):
    data = tmp_path / "train.npz"
    np.savez(data, **train_images)
    out = tmp_path / "folded.onnx"
    result = invoke("fold", MODELS / "cnn-trainmode_ts13.onnx", "--recalibrate", data, "-o", out,
                    "--json", tmp_path / "ledger.json")
    assert result.exit_code == 0, result.output
    assert not bn_nodes(onnx.load(out)) and accuracy(out, "cnn-trainmode_ts13", batch=1) >= 0.992
    ledger = json.loads((tmp_path / "ledger.json").read_text())
    assert ledger["recalibration"]["summary"]["recalibrated"] == 5
    refused = invoke("fold", MODELS / "cnn_ts13.onnx", "--recalibrate", data, "--verify", "-o", tmp_path / "v.onnx")
    assert refused.exit_code == 2 and "--recalibrate changes" in refused.output


def _beside_a_good_bn(kind: str):
    """``x -> Conv -> BN 'good'`` and, beside it, an unnamed BN that recalibrate must skip
    for ``kind`` (docs/recalibrate.md's reasons), as the third node."""
    rng = np.random.default_rng(5)
    opset = 8 if kind == "unsupported-form" else 17
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 4, 4])
    inputs, inits = [x], [numpy_helper.from_array(rng.standard_normal((3, 3, 1, 1)).astype(np.float32), "w"),
                          *_bn_params("g", 3, rng), *_bn_params("o", 3, rng)]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]),
             helper.make_node("BatchNormalization", ["c", "g_scale", "g_bias", "g_mean", "g_var"], ["y"], name="good")]
    data, params, attrs, before = "c", ["o_scale", "o_bias", "o_mean", "o_var"], {}, []
    if kind == "unsupported-form":
        attrs = {"spatial": 0}
        inits[-4:] = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in zip(
            params, (rng.uniform(0.5, 2, (3, 4, 4)), rng.standard_normal((3, 4, 4)), np.zeros((3, 4, 4)),
                     np.ones((3, 4, 4))))]
    elif kind == "stats-not-constant":  # an initializer listed as an input: an overridable default
        inputs.append(helper.make_tensor_value_info("o_mean", TensorProto.FLOAT, [3]))
    elif kind == "constant-input":
        data = "k"
        inits.append(numpy_helper.from_array(rng.standard_normal((2, 3, 4, 4)).astype(np.float32), "k"))
    elif kind == "dtype-overflow":  # activations ~1e4: their variance does not fit float16
        data = "c16"
        inits[-4:] = [numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name) for t in inits[-4:]]
        inits.append(numpy_helper.from_array(np.array(3000, np.float32), "big"))
        before = [helper.make_node("Mul", ["c", "big"], ["scaled"]),
                  helper.make_node("Cast", ["scaled"], ["c16"], to=TensorProto.FLOAT16)]
    nodes.append(helper.make_node("BatchNormalization", [data, *params], ["z"], **attrs))
    nodes[1:1] = before
    z_type = TensorProto.FLOAT16 if kind == "dtype-overflow" else TensorProto.FLOAT
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
               helper.make_tensor_value_info("z", z_type, None)]
    return _synthetic(nodes, inits, inputs, outputs, opset=opset)


@pytest.mark.parametrize("kind", ["unsupported-form", "stats-not-constant", "constant-input", "dtype-overflow"])
def test_each_documented_skip_leaves_its_bn_and_the_others_recalibrate(kind):
    model = _beside_a_good_bn(kind)
    data = {"x": np.random.default_rng(6).standard_normal((8, 3, 4, 4)).astype(np.float32)}
    result = recalibrate(model, data)
    by_label = {e.bn: e for e in result.report}
    skipped = by_label.pop(f"BatchNormalization#{len(model.graph.node) - 1} -> 'z'")  # unnamed: labelled as fold does
    assert (skipped.status, skipped.reason, skipped.recalibrated) == ("skipped", kind, False), skipped.detail
    assert skipped.detail
    assert list(by_label) == ["good"] and by_label["good"].recalibrated
    out = result.to_proto()
    params = {t.name for t in out.graph.initializer}
    assert {"o_mean", "o_var"} <= params and not {"g_mean", "g_var"} & params  # the skipped BN's stay as they were


@pytest.mark.parametrize("case, message", [
    ("empty", "its input is empty on the data"),
    ("channels", "has 3 channels but its input has 4 on axis 1: invalid model"),
])
def test_a_bn_input_that_cannot_give_its_statistics_is_one_input_error(case, message):
    rng = np.random.default_rng(7)
    if case == "empty":  # a slice that keeps no row of the image
        nodes = [helper.make_node("Slice", ["x", "start", "stop", "axis"], ["c"])]
        inits = [numpy_helper.from_array(np.array([v]), n) for n, v in (("start", 2), ("stop", 2), ("axis", 2))]
    else:  # a 4-channel conv read by a 3-channel BN
        nodes = [helper.make_node("Conv", ["x", "w"], ["c"])]
        inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 1, 1)).astype(np.float32), "w")]
    nodes.append(helper.make_node("BatchNormalization", ["c", "b_scale", "b_bias", "b_mean", "b_var"], ["y"],
                                  name="the_bn"))
    model = _synthetic(nodes, inits + _bn_params("b", 3, rng),
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 4, 4])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    with pytest.raises(InputError, match=f"BatchNormalization 'the_bn'.*{message}"):
        recalibrate(model, {"x": rng.standard_normal((4, 3, 4, 4)).astype(np.float32)})


def test_the_report_is_a_table_on_a_terminal_and_one_line_per_bn_elsewhere(train_images):
    """On a terminal each BN is a row (level, status, old -> new ranges, the change, the
    detail, under headers that say what they are); piped, one plain line per BN."""
    import io

    from rich.console import Console

    from bnfold.recalibration import render_report

    result = recalibrate(MODELS / "cnn-nostats_ts17.onnx", train_images, samples=200)
    table, plain = io.StringIO(), io.StringIO()
    render_report(result, Console(file=table, width=400, force_terminal=True, color_system=None), out=Path("r.onnx"))
    render_report(result, Console(file=plain, width=400), out=Path("r.onnx"))
    shown, lines = table.getvalue(), plain.getvalue().splitlines()
    assert "bnfold recalibrate: 5 of 5 BatchNormalization recalibrated" in shown
    assert shown.rstrip().endswith("wrote r.onnx")
    header = next(line for line in shown.splitlines() if "BN" in line and "status" in line)
    assert [c.strip() for c in header.strip("┃│ ").split("┃")] == ["BN", "level", "status", "mean: old -> new",
                                                                   "var: old -> new", "max rel change", "detail"]
    rows = {cells[0]: cells for cells in ([c.strip() for c in line.strip("│ ").split("│")]
                                          for line in shown.splitlines() if line.startswith("│"))}
    for level, e in enumerate(result.report, start=1):
        cells = rows[e.bn]
        assert cells[1:3] == [str(level), "recalibrated"]
        old, new = e.old, e.new
        assert cells[3] == f"[{old.mean_min:.3g}, {old.mean_max:.3g}] -> [{new.mean_min:.3g}, {new.mean_max:.3g}]"
        assert cells[4] == f"[{old.var_min:.3g}, {old.var_max:.3g}] -> [{new.var_min:.3g}, {new.var_max:.3g}]"
        assert cells[5] == f"{e.max_rel_change:.3g}"
        assert lines[level].startswith(f"{e.bn}  level {level}  recalibrated  mean [")
    assert lines[0].startswith("bnfold recalibrate: 5 of 5") and lines[-1] == "wrote r.onnx"


def test_the_json_summary_gives_batch_seconds_and_notes(train_images, tmp_path):
    """The report's summary says the batch fed and the seconds taken (a float, within the
    call's own time), and the notes are a list."""
    import time

    started = time.perf_counter()
    result = recalibrate(MODELS / "cnn-nostats_ts17.onnx", train_images, samples=120, batch=40)
    elapsed = time.perf_counter() - started
    report = json.loads(json.dumps(result.to_dict()))
    assert report["summary"]["batch"] == 40 and report["summary"]["samples"] == 120
    seconds = report["summary"]["seconds"]
    assert isinstance(seconds, float) and 0 < seconds <= elapsed + 1e-3
    assert report["notes"] == list(result.notes)


def test_samples_default_to_seed_0_and_one_sample_is_enough(train_images):
    """``seed`` picks the samples (0 unless given); a single sample is a valid choice."""
    model = MODELS / "cnn-nostats_ts17.onnx"
    means = [recalibrate(model, train_images, samples=30, **seed).report[0].mean for seed in ({}, {"seed": 0},
                                                                                            {"seed": 1})]
    np.testing.assert_array_equal(means[0], means[1])
    assert not np.array_equal(means[0], means[2])
    assert recalibrate(model, train_images, samples=1).samples == 1


def test_data_is_not_cast_to_an_integer_input():
    """Integers are cast to a float input, never floats to an integer one (an index input)."""
    rng = np.random.default_rng(11)
    nodes = [helper.make_node("Gather", ["table", "idx"], ["row"], axis=0),
             helper.make_node("Add", ["x", "row"], ["h"]),
             helper.make_node("BatchNormalization", ["h", "b_scale", "b_bias", "b_mean", "b_var"], ["y"], name="bn")]
    inits = [numpy_helper.from_array(rng.standard_normal((5, 3, 1, 1)).astype(np.float32), "table"),
             *_bn_params("b", 3, rng)]
    model = _synthetic(nodes, inits, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 4, 4]),
                                      helper.make_tensor_value_info("idx", TensorProto.INT64, ["n"])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    x = rng.standard_normal((4, 3, 4, 4)).astype(np.float32)
    with pytest.raises(InputError, match="'idx' is float32, the model input is int64"):
        recalibrate(model, {"x": x, "idx": np.zeros(4, np.float32)})


def test_constant_nodes_typed_values_and_subgraphs_upstream_are_measured_through():
    """A Constant node read beside data, value_info typing what is measured, and an If whose
    branches read outer values: each BN's statistics are those of its input as numpy
    computes them from the same samples."""
    rng = np.random.default_rng(12)
    then = helper.make_graph([helper.make_node("Add", ["x", "shift"], ["t"])], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
    other = helper.make_graph([helper.make_node("Neg", ["x"], ["e"])], "else", [],
                              [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("Constant", [], ["one"], value=numpy_helper.from_array(np.float32(1.5), "one_t")),
             helper.make_node("Mul", ["x", "one"], ["m"]),
             helper.make_node("BatchNormalization", ["m", "a_scale", "a_bias", "a_mean", "a_var"], ["y1"], name="a"),
             helper.make_node("If", ["flag"], ["f"], then_branch=then, else_branch=other),
             helper.make_node("BatchNormalization", ["f", "b_scale", "b_bias", "b_mean", "b_var"], ["y2"], name="b")]
    inits = [*_bn_params("a", 3, rng), *_bn_params("b", 3, rng),
             numpy_helper.from_array(np.array(True), "flag"),
             numpy_helper.from_array(np.array([1.0, -2.0, 3.0], np.float32).reshape(1, 3, 1, 1), "shift")]
    model = _synthetic(nodes, inits, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 4, 4])],
                       [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y1", "y2")])
    model = onnx.shape_inference.infer_shapes(model)
    assert {v.name for v in model.graph.value_info} >= {"m", "f"}
    x = rng.standard_normal((6, 3, 4, 4)).astype(np.float32)
    result = {e.bn: e for e in recalibrate(model, {"x": x}).report}
    for name, data in (("a", x * 1.5), ("b", x + np.array([1.0, -2.0, 3.0], np.float32).reshape(1, 3, 1, 1))):
        np.testing.assert_allclose(result[name].mean, data.astype(np.float64).mean(axis=(0, 2, 3)), rtol=1e-6)
        np.testing.assert_allclose(result[name].var, data.astype(np.float64).var(axis=(0, 2, 3)), rtol=1e-5)
