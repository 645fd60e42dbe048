"""bnfold verify: per-channel verdict, golden outputs, input ranges, --shape conventions,
top-1, the inference-mode reference, rich escaping. Real onnxruntime sessions throughout."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from _models import ConvBnParams, conv_bn_model, make_model, save
from bnfold.cli import app
from bnfold.errors import EXIT_BAD_INPUT, EXIT_CHECK_FAILED, EXIT_OK, InputError
from bnfold.verification import compare_arrays, default_tolerance, parse_input_ranges, verify

CHANNELS = 8


def invoke(*args):
    return CliRunner().invoke(app, [str(arg) for arg in args])


def channel_params(magnitudes, seed: int = 0) -> ConvBnParams:
    """Conv(3->C, 3x3) + BN whose output channel c has magnitude ~magnitudes[c] and no bias
    term, so that scaling channel c's folded weight by 1+r scales that channel by exactly 1+r."""
    rng = np.random.default_rng(seed)
    params = ConvBnParams.random(rng, len(magnitudes), 3, (3, 3))
    params.scale = (np.asarray(magnitudes) * np.sqrt(params.var + params.epsilon)).astype(np.float32)
    params.mean = params.conv_bias.copy()
    params.beta = np.zeros(len(magnitudes), np.float32)
    return params


def cbm(params: ConvBnParams, **kwargs) -> onnx.ModelProto:
    return conv_bn_model(params, output_shape=("N", len(params.scale), 6, 6), **kwargs)


def folded_with(params: ConvBnParams, channel: int | None = None, relative: float = 0.0) -> onnx.ModelProto:
    model = cbm(params, folded=True)
    if channel is not None:
        weight = numpy_helper.to_array(model.graph.initializer[0]).copy()
        weight[channel] *= 1 + relative
        model.graph.initializer[0].CopyFrom(numpy_helper.from_array(weight, "c_W"))
    return model


# --- 0. a verdict that magnitude cannot fool ---------------------------------------------


def test_small_channels_cannot_hide_behind_large_ones(tmp_path):
    """The issue's case: 4 channels ~1000, 4 ~0.01; the small ones' weights off by 20%."""
    params = channel_params([1000.0] * 4 + [0.01] * 4)
    original = save(cbm(params), tmp_path / "original.onnx")
    good = save(folded_with(params), tmp_path / "good.onnx")
    model = folded_with(params)
    weight = numpy_helper.to_array(model.graph.initializer[0]).copy()
    weight[4:] *= 1.2
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(weight, "c_W"))
    bad = save(model, tmp_path / "bad.onnx")

    assert verify(original, good, providers="cpu").passed
    report = verify(original, bad, providers="cpu")

    assert not report.passed
    difference = report.failures()[0].difference
    assert difference.channel_axis == 1 and difference.channels == CHANNELS
    assert difference.channels_failing == 4 and difference.max_channel_rel_diff_channel >= 4
    assert difference.max_channel_rel_diff == pytest.approx(0.2, rel=1e-3)
    assert "4 of 8 channels" in report.summary()
    # the old whole-output scale (atol 1e-5 x 1000) would have passed it
    old = compare_arrays([np.zeros(1)], [np.full(1, 0.2 * 0.01)], default_tolerance("float32"))
    assert old.elements_failing == 1  # per channel scale 1 ...
    assert 0.2 * 0.01 < 1e-5 * 1000  # ... against the 1e-2 the largest channel allowed


magnitudes = st.lists(st.floats(-3, 3).map(lambda e: float(10**e)), min_size=CHANNELS, max_size=CHANNELS)


@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
@given(magnitudes=magnitudes, seed=st.integers(0, 2**16))
def test_property_correct_folds_pass(tmp_path_factory, magnitudes, seed):
    folder = tmp_path_factory.mktemp("pass")
    params = channel_params(magnitudes, seed)
    report = verify(save(cbm(params), folder / "o.onnx"), save(folded_with(params), folder / "f.onnx"),
                    providers="cpu", seed=seed)
    assert report.passed, report.summary()


@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
@given(magnitudes=magnitudes, seed=st.integers(0, 2**16), channel=st.integers(0, CHANNELS - 1),
       sign=st.sampled_from([-1, 1]))
def test_property_one_percent_on_any_channel_fails(tmp_path_factory, magnitudes, seed, channel, sign):
    folder = tmp_path_factory.mktemp("fail")
    params = channel_params(magnitudes, seed)
    report = verify(save(cbm(params), folder / "o.onnx"),
                    save(folded_with(params, channel, sign * 0.01), folder / "f.onnx"), providers="cpu", seed=seed)
    assert not report.passed
    for comparison in report.failures():
        assert comparison.difference.max_channel_rel_diff_channel == channel
        assert comparison.difference.max_channel_rel_diff == pytest.approx(0.01, rel=1e-2)


def test_channel_axis_and_channel_rtol_options(tmp_path):
    params = channel_params([1.0] * CHANNELS)
    original = save(cbm(params), tmp_path / "o.onnx")
    bad = save(folded_with(params, 2, 0.01), tmp_path / "b.onnx")

    loose = invoke("verify", original, bad, "--providers", "cpu", "--channel-rtol", "0.05", "--rtol", "0.05",
                   "--json", tmp_path / "r.json")
    assert loose.exit_code == EXIT_OK, loose.output
    difference = json.loads((tmp_path / "r.json").read_text())["comparisons"][0]["difference"]
    assert difference["channel_axis"] == 1 and difference["worst_channels"][0]["channel"] == 2
    other_axis = verify(original, bad, providers="cpu", channel_axes={"y": 3})
    assert other_axis.comparisons[0].difference.channel_axis == 3


def _channels_last_model(nudge: float = 0.0, channels: int = 8, size: int = 6) -> onnx.ModelProto:
    """tf2onnx's shape of a Keras Conv: NHWC in, Transpose, Conv, Relu, Transpose back to
    NHWC. Half the output channels are ~1000, half ~0.01; ``nudge`` scales the weights of
    channel 5 (a small one)."""
    weight = (np.random.default_rng(0).standard_normal((channels, channels, 1, 1)) * 0.3).astype(np.float32)
    weight[: channels // 2] *= 1000
    weight[channels // 2:] *= 0.01
    weight[5] *= 1 + nudge
    nodes = [helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 3, 1, 2]),
             helper.make_node("Conv", ["xt", "W"], ["c"]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Transpose", ["r"], ["y"], perm=[0, 2, 3, 1])]
    shape = [1, size, size, channels]
    return make_model(nodes, [numpy_helper.from_array(weight, "W")],
                      [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)])


def test_channels_are_judged_along_the_axis_the_graph_puts_them(tmp_path):
    """A channels-last output is judged per channel of the Conv that made it: 1% on one small
    channel fails along axis 3, where the graph's Transposes put the Conv's channels, while
    along axis 1 (image rows, each holding large channels too) even 20% would pass."""
    original = save(_channels_last_model(), tmp_path / "o.onnx")
    changed = save(_channels_last_model(nudge=0.01), tmp_path / "c.onnx")
    report = verify(original, changed, providers="cpu")
    assert not report.passed
    assert {c.difference.channel_axis for c in report.comparisons} == {3}
    assert {c.difference.max_channel_rel_diff_channel for c in report.failures()} == {5}
    assert verify(original, save(_channels_last_model(nudge=0.2), tmp_path / "c20.onnx"), providers="cpu",
                  channel_axes={"*": 1}).passed
    assert verify(original, save(_channels_last_model(), tmp_path / "same.onnx"), providers="cpu").passed


@pytest.mark.parametrize(("ops", "expected"), [
    (["MatMul"], {"y": 2}),
    (["MatMul", "Relu", "Add"], {"y": 2}),
    (["MatMul", "Transpose"], {"y": 0}),
    (["Gemm"], {}),
    (["MatMul", "Reshape"], {}),
])
def test_output_channel_axes_follow_layout_keeping_ops_and_transposes(ops, expected):
    from bnfold._onnx_ir import ir
    from bnfold.verification.feeds import output_channel_axes

    shape = [2, 3, 4] if ops[0] == "MatMul" else [2, 4]
    nodes, initializers, current = [], [numpy_helper.from_array(np.ones((4, 4), np.float32), "W"),
                                        numpy_helper.from_array(np.ones(4, np.float32), "b"),
                                        numpy_helper.from_array(np.array([-1], np.int64), "flat")], "x"
    for index, op in enumerate(ops):
        out = "y" if index == len(ops) - 1 else f"t{index}"
        inputs = {"MatMul": [current, "W"], "Gemm": [current, "W"], "Add": [current, "b"], "Relu": [current],
                  "Reshape": [current, "flat"], "Transpose": [current]}[op]
        attributes = {"perm": [2, 0, 1]} if op == "Transpose" else {}
        nodes.append(helper.make_node(op, inputs, [out], **attributes))
        current = out
    proto = make_model(nodes, initializers, [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["a"] if "Reshape" in ops else
                                                       ["a", "b", "c"][: len(shape)])])
    assert output_channel_axes(ir.serde.deserialize_model(proto)) == expected


def test_a_constant_first_operand_made_by_a_constant_node_is_not_followed():
    from bnfold._onnx_ir import ir
    from bnfold.verification.feeds import output_channel_axes

    nodes = [helper.make_node("MatMul", ["x", "W"], ["t"]),
             helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(np.ones(4, np.float32))),
             helper.make_node("Mul", ["k", "t"], ["y"])]
    proto = make_model(nodes, [numpy_helper.from_array(np.ones((4, 4), np.float32), "W")],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 4])])
    assert output_channel_axes(ir.serde.deserialize_model(proto)) == {"y": 2}


# --- 1. golden outputs ---------------------------------------------------------------------


def test_save_outputs_and_inputs_then_verify_against_them(tmp_path):
    params = channel_params([1.0, 2.0, 0.5, 3.0])
    original = save(cbm(params), tmp_path / "o.onnx")
    folded = save(folded_with(params), tmp_path / "f.onnx")
    bad = save(folded_with(params, 1, 0.01), tmp_path / "bad.onnx")

    saved = invoke("verify", original, folded, "--providers", "cpu", "--samples", "3",
                   "--save-outputs", tmp_path / "ref.npz", "--save-inputs", tmp_path / "in.npz")
    assert saved.exit_code == EXIT_OK, saved.output
    with np.load(tmp_path / "ref.npz") as ref, np.load(tmp_path / "in.npz") as inputs:
        assert ref["y"].shape == (6, 4, 6, 6) and inputs["x"].shape == (6, 3, 8, 8)

    args = ["--reference-outputs", tmp_path / "ref.npz", "--inputs", tmp_path / "in.npz", "--providers", "cpu"]
    good = invoke("verify", folded, *args, "--json", tmp_path / "r.json")
    assert good.exit_code == EXIT_OK, good.output
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["reference"] == "stored" and data["original"] is None
    assert {c["reference"]["model"] for c in data["comparisons"]} == {"stored"}
    assert invoke("verify", bad, *args).exit_code == EXIT_CHECK_FAILED

    # a reference without one of the outputs is a mismatch; without --inputs, a usage error
    np.savez(tmp_path / "renamed.npz", logits=np.zeros((6, 4, 6, 6), np.float32))
    renamed = verify(None, folded, reference_outputs=tmp_path / "renamed.npz", inputs=tmp_path / "in.npz",
                     providers="cpu")
    assert not renamed.passed and any("'logits'" in m for m in renamed.signature_mismatches)
    assert invoke("verify", folded, "--reference-outputs", tmp_path / "ref.npz").exit_code == EXIT_BAD_INPUT


# --- 2. inputs valid for the model ---------------------------------------------------------


def gather_model(rows: int, *, folded: bool = False) -> onnx.ModelProto:
    """ids int64[N, 4] index a [rows, 3] embedding, then Conv1d(3->2, k=1)+BN over the 4 positions."""
    rng = np.random.default_rng(5)
    table = rng.standard_normal((rows, 3)).astype(np.float32)
    params = ConvBnParams.random(rng, 2, 3, (1,))
    from _models import conv_bn_nodes

    nodes, inits = conv_bn_nodes("c", "emb_t", "y", params, folded)
    nodes = [helper.make_node("Gather", ["table", "ids"], ["emb"], name="embed"),
             helper.make_node("Transpose", ["emb"], ["emb_t"], perm=[0, 2, 1])] + nodes
    inits.append(numpy_helper.from_array(table, "table"))
    return make_model(nodes, inits, [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 4])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, 4])])


def test_integer_inputs_that_index_a_gather_stay_in_range(tmp_path):
    original = save(gather_model(5), tmp_path / "o.onnx")
    folded = save(gather_model(5, folded=True), tmp_path / "f.onnx")

    report = verify(original, folded, providers="cpu", samples=4)

    assert report.passed, report.summary()
    assert report.inputs[0].range == [0, 4] and "size 5" in report.inputs[0].range_source


def test_an_out_of_range_input_is_one_line_naming_the_input(tmp_path):
    original = save(gather_model(5), tmp_path / "o.onnx")

    with pytest.raises(InputError) as error:
        verify(original, original, providers="cpu", input_ranges=parse_input_ranges(["ids=0,50"]))
    message = str(error.value)
    assert "\n" not in message and "'ids'" in message and "'embed'" in message
    assert "--input-range ids=LO,HI" in message


def test_input_range_for_floats_ints_and_bools(tmp_path):
    params = channel_params([1.0] * 4)
    original = save(cbm(params), tmp_path / "o.onnx")
    report = verify(original, original, providers="cpu", input_ranges=parse_input_ranges(["0,0.5"]))
    assert report.inputs[0].range == [0, 0.5] and report.passed
    assert parse_input_ranges(["ids=0,9", "mask:[0,1]", "-1,1"]) == {"ids": (0, 9), "mask": (0, 1), "*": (-1, 1)}
    for bad in ("ids=3,1", "ids=a,b", "ids=1"):
        with pytest.raises(InputError, match="--input-range"):
            parse_input_ranges([bad])
    with pytest.raises(InputError, match="not an input"):
        verify(original, original, providers="cpu", input_ranges={"nope": (0, 1)})


# --- 3. --shape conventions, checked before folding ----------------------------------------


@pytest.mark.parametrize("spec", ["x:1x3x10x12", "x:1,3,10,12", "x:[1,3,10,12]", "x=1x3x10x12"])
def test_shape_conventions_on_the_command_line(tmp_path, spec):
    shapes = {"input_shape": ("N", 3, "H", "W"), "output_shape": ("N", 4, "H2", "W2")}
    params = ConvBnParams.random(np.random.default_rng(0), 4, 3, (3, 3))
    original = save(conv_bn_model(params, **shapes), tmp_path / "o.onnx")

    result = invoke("verify", original, original, "--providers", "cpu", "--shape", spec, "--json", tmp_path / "r.json")

    assert result.exit_code == EXIT_OK, result.output
    assert json.loads((tmp_path / "r.json").read_text())["inputs"][0]["shape"] == [1, 3, 10, 12]


def test_fold_verify_finds_unresolved_dimensions_before_writing(tmp_path):
    shapes = {"input_shape": ("N", 3, "H", "W"), "output_shape": ("N", 4, "H2", "W2")}
    params = ConvBnParams.random(np.random.default_rng(0), 4, 3, (3, 3))
    original = save(conv_bn_model(params, **shapes), tmp_path / "o.onnx")

    result = invoke("fold", original, "-o", tmp_path / "out.onnx", "--verify", "--providers", "cpu")

    assert result.exit_code == EXIT_BAD_INPUT and "--shape x:2x3x224x224" in result.output
    assert not (tmp_path / "out.onnx").exists()
    ok = invoke("fold", original, "-o", tmp_path / "out.onnx", "--verify", "--providers", "cpu", "--shape", "x:2,3,9,9")
    assert ok.exit_code == EXIT_OK, ok.output


# --- 8. top-1 ---------------------------------------------------------------------------


def test_top1_agreement_is_reported_next_to_the_numbers(tmp_path):
    params = channel_params([1.0] * CHANNELS)
    original = save(cbm(params), tmp_path / "o.onnx")
    bad = save(folded_with(params, 3, 0.5), tmp_path / "bad.onnx")

    same = invoke("verify", original, original, "--providers", "cpu", "--metric", "top1", "--json", tmp_path / "s.json")
    report = verify(original, bad, providers="cpu", metrics=("top1",))

    assert same.exit_code == EXIT_OK and "top-1 agreement 100.0000%" in same.output
    assert json.loads((tmp_path / "s.json").read_text())["comparisons"][0]["top1"]["agreement"] == 1.0
    top = report.comparisons[0].top1
    assert top.predictions == 2 * 6 * 6 and 0 < top.agreeing < top.predictions
    assert invoke("verify", original, original, "--metric", "top5").exit_code == EXIT_BAD_INPUT


# --- 4. --to-inference --verify ---------------------------------------------------------


def training_mode_model() -> onnx.ModelProto:
    """Conv + an opset-15 BN with training_mode=1 and unused running-stat outputs."""
    rng = np.random.default_rng(3)
    params = ConvBnParams.random(rng, 4, 3, (3, 3))
    nodes, inits = conv_bn_nodes_training(params)
    model = make_model(nodes, inits, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 6, 6])], opset=15)
    return model


def conv_bn_nodes_training(params):
    from _models import conv_bn_nodes

    nodes, inits = conv_bn_nodes("c", "x", "y", params, False)
    bn = nodes[1]
    bn.output.extend(["running_mean_out", "running_var_out"])
    bn.attribute.append(helper.make_attribute("training_mode", 1))
    return nodes, inits


def test_to_inference_verifies_against_the_original_in_inference_mode(tmp_path):
    original = save(training_mode_model(), tmp_path / "train.onnx")

    result = invoke("fold", original, "-o", tmp_path / "out.onnx", "--to-inference", "--verify", "--providers", "cpu",
                    "--verify-json", tmp_path / "r.json")

    assert result.exit_code == EXIT_OK, result.output
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["reference"] == "original-inference" and data["verdict"] == "PASS"
    assert any("1 training-mode BatchNormalization run in inference mode" in note for note in data["notes"])
    # against the training-mode original (batch statistics), the same candidate differs
    assert not verify(original, tmp_path / "out.onnx", providers="cpu").passed


# --- rich markup in model-derived text ----------------------------------------------------


def test_model_derived_text_is_escaped_in_the_rich_report(tmp_path):
    params = ConvBnParams.random(np.random.default_rng(0), 4, 3, (3, 3))
    original = save(conv_bn_model(params, output_name="[bold]y"), tmp_path / "o.onnx")
    candidate = save(conv_bn_model(params, folded=True, input_shape=("batch", 3, 8, 8), output_name="[bold]y"),
                     tmp_path / "[red]f.onnx")

    result = invoke("verify", original, candidate, "--providers", "cpu")

    assert result.exit_code == EXIT_CHECK_FAILED
    assert "float32[batch, 3, 8, 8]" in result.output and "[red]f.onnx" in result.output


def test_naming_an_input_twice_is_one_usage_error():
    from bnfold.verification.feeds import parse_shapes

    with pytest.raises(InputError, match=r"^--shape x is given twice$"):
        parse_shapes(["x=1x2", "x:1,3"])
    with pytest.raises(InputError, match=r"^--input-range \(all inputs\) is given twice$"):
        parse_input_ranges(["0,1", "2,3"])
    with pytest.raises(InputError, match=r"^--input-range ids is given twice$"):
        parse_input_ranges(["ids=0,1", "ids:[2,3]"])
    assert parse_input_ranges(["ids=0,9", "-1,1"]) == {"ids": (0.0, 9.0), "*": (-1.0, 1.0)}
