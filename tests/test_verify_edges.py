"""bnfold verify on the edges of what a model can output or take: integers beyond float64's
53 bits, outputs whose size changes from run to run, outputs with no channels, inputs whose
type leaves few values (uint64, bool), and the comparison's own figures on zeros, empty channels
and non-finite values. Real onnxruntime sessions; nothing may crash (exit 3)."""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import replace

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from _models import make_model, save
from cli_runner import invoke
from bnfold.errors import EXIT_BAD_INPUT, EXIT_CHECK_FAILED, EXIT_OK, InputError
from bnfold.verification import EXACT, Tolerance, compare_arrays, parse_input_ranges, verify

INT_TYPES = {"int64": TensorProto.INT64, "uint64": TensorProto.UINT64, "int32": TensorProto.INT32,
             "bool": TensorProto.BOOL}


def add_constant_model(dtype: str, constant) -> onnx.ModelProto:
    """x[2, 3] + constant (a scalar of ``dtype``) -> y."""
    return make_model([helper.make_node("Add", ["x", "k"], ["y"])],
                      [numpy_helper.from_array(np.array(constant, dtype), "k")],
                      [helper.make_tensor_value_info("x", INT_TYPES[dtype], [2, 3])],
                      [helper.make_tensor_value_info("y", INT_TYPES[dtype], [2, 3])])


# --- integers are compared exactly ------------------------------------------------------


@pytest.mark.parametrize(("dtype", "a", "b"), [("int64", 2**60, 2**60 + 1), ("uint64", 2**63 + 2**62, 2**63 + 2**62 + 1),
                                               ("int64", -(2**62), -(2**62) + 1)])
def test_integers_beyond_53_bits_that_differ_by_one_fail(tmp_path, dtype, a, b):
    """float64 holds integers exactly only up to 2**53: x + 2**60 and x + (2**60 + 1) are
    the same float64, so the comparison must not go through it."""
    original = save(add_constant_model(dtype, a), tmp_path / "a.onnx")
    candidate = save(add_constant_model(dtype, b), tmp_path / "b.onnx")

    report = verify(original, candidate, providers="cpu")

    assert not report.passed
    difference = report.comparisons[0].difference
    assert difference.elements_failing == difference.elements == 6
    assert difference.max_abs_diff == 1.0
    reference, subject = difference.max_abs_diff_values
    assert subject - reference == 1 and isinstance(reference, int)  # exact in the report, and in its JSON
    assert verify(original, original, providers="cpu").passed


def test_exact_integer_differences_in_compare_arrays():
    big = np.array([[2**62, -(2**62), 2**63 - 1]], np.int64)
    assert compare_arrays([big], [big], EXACT, 1).passed
    shifted = big.copy()
    shifted[0, 2] -= 1
    difference = compare_arrays([big], [shifted], EXACT, 1)
    assert difference.elements_failing == 1 and difference.channels_failing == 1 and difference.max_abs_diff == 1
    extreme = compare_arrays([np.array([np.iinfo(np.int64).min])], [np.array([np.iinfo(np.int64).max])], EXACT)
    assert extreme.max_abs_diff == float(2**64 - 1) and extreme.elements_failing == 1  # no overflow
    top = np.array([2**64 - 1], np.uint64)
    assert compare_arrays([top], [top - np.uint64(1)], EXACT).elements_failing == 1
    flags = np.array([[True, False]])
    assert compare_arrays([flags], [~flags], EXACT, 1).elements_failing == 2


# --- outputs whose size changes between runs -----------------------------------------------


def nonzero_model() -> onnx.ModelProto:
    return make_model([helper.make_node("NonZero", ["x"], ["y"])], [],
                      [helper.make_tensor_value_info("x", TensorProto.INT64, [2, 3])],
                      [helper.make_tensor_value_info("y", TensorProto.INT64, [2, None])])


def compress_model(shift: float = 0.0) -> onnx.ModelProto:
    """The columns of x[N, 4] whose first row is positive, times 2 (plus ``shift``): an
    output [N, n] whose channel axis changes size from run to run."""
    nodes = [helper.make_node("Slice", ["x", "zero_i", "one_i", "zero_i"], ["first"]),
             helper.make_node("Squeeze", ["first", "zero_i"], ["first_1d"]),
             helper.make_node("Greater", ["first_1d", "zero"], ["keep"]),
             helper.make_node("Compress", ["x", "keep"], ["kept"], axis=1),
             helper.make_node("Mul", ["kept", "two"], ["doubled"]),
             helper.make_node("Add", ["doubled", "shift"], ["y"])]
    inits = [numpy_helper.from_array(np.array([0], np.int64), "zero_i"),
             numpy_helper.from_array(np.array([1], np.int64), "one_i"),
             numpy_helper.from_array(np.array(0, np.float32), "zero"),
             numpy_helper.from_array(np.array(2, np.float32), "two"),
             numpy_helper.from_array(np.array(shift, np.float32), "shift")]
    return make_model(nodes, inits, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", None])])


def test_nonzero_with_several_random_samples_is_compared_not_crashed(tmp_path):
    model = save(nonzero_model(), tmp_path / "nz.onnx")

    result = invoke("verify", model, model, "--providers", "cpu", "--samples", "5", "--json", tmp_path / "r.json")

    assert result.exit_code == EXIT_OK, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["runs"] == 5 and report["verdict"] == "PASS"
    assert all(c["difference"]["channel_axis"] is None for c in report["comparisons"])


def test_compress_over_several_samples_is_compared_not_crashed(tmp_path):
    original = save(compress_model(), tmp_path / "o.onnx")
    shifted = save(compress_model(shift=0.5), tmp_path / "s.onnx")
    result = invoke("verify", original, original, "--providers", "cpu", "--samples", "4", "--batch", "5")
    assert result.exit_code == EXIT_OK, result.output
    failed = invoke("verify", original, shifted, "--providers", "cpu", "--samples", "4", "--batch", "5")
    assert failed.exit_code == EXIT_CHECK_FAILED, failed.output


def test_runs_of_different_sizes_from_an_npz_are_compared(tmp_path):
    model = onnx.ModelProto()
    model.CopyFrom(nonzero_model())
    path = save(model, tmp_path / "nz.onnx")
    # a static batch of 2: six samples make three runs, with 5, 0 and 3 non-zero values
    np.savez(tmp_path / "in.npz", x=np.array([[1, 2, 3], [4, 5, 0], [0, 0, 0], [0, 0, 0], [1, 0, 1], [0, 1, 0]],
                                             np.int64))
    report = verify(path, path, providers="cpu", inputs=tmp_path / "in.npz")
    assert report.passed and report.runs == 3
    assert report.comparisons[0].difference.elements == 2 * (5 + 0 + 3)


def test_compare_arrays_with_runs_of_different_channel_counts():
    reference = [np.ones((2, 5)), np.ones((2, 0)), np.ones((2, 3))]
    subject = [np.ones((2, 5)), np.ones((2, 0)), np.ones((2, 3)) * 1.5]
    difference = compare_arrays(reference, subject, EXACT, 1)
    assert difference.channel_axis is None and difference.elements == 16 and difference.elements_failing == 6
    assert difference.max_abs_diff_index == [2, 0, 0]


# --- outputs with no channels ----------------------------------------------------------------


def test_an_output_with_zero_channels_matches(tmp_path):
    model = save(make_model([helper.make_node("Identity", ["x"], ["y"])], [],
                            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 0])],
                            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 0])]), tmp_path / "z.onnx")

    result = invoke("verify", model, model, "--providers", "cpu", "--samples", "2", "--metric", "top1")

    assert result.exit_code == EXIT_OK, result.output
    difference = compare_arrays([np.zeros((2, 0, 3))], [np.zeros((2, 0, 3))], EXACT, 1)
    assert difference.passed and difference.channels == 0 and difference.elements == 0


def test_fold_verify_of_a_zero_channel_conv_bn_keeps_the_output(tmp_path):
    """bnfold's own zero-size site: kept ("zero-size"), and the model it writes verifies."""
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"]),
             helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["y"])]
    inits = [numpy_helper.from_array(np.zeros((0, 3, 1, 1), np.float32), "W")]
    inits += [numpy_helper.from_array(np.zeros(0, np.float32), name) for name in ("s", "b", "m", "v")]
    original = save(make_model(nodes, inits, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4, 4])],
                               [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 0, 4, 4])]),
                    tmp_path / "zero.onnx")
    out = tmp_path / "zero.folded.onnx"

    result = invoke("fold", original, "-o", out, "--verify", "--providers", "cpu", "--verify-json", tmp_path / "v.json")

    assert result.exit_code == EXIT_OK, result.output
    assert out.exists() and json.loads((tmp_path / "v.json").read_text())["verdict"] == "PASS"


# --- input ranges for integer and bool inputs -------------------------------------------------


def identity_model(dtype: str) -> onnx.ModelProto:
    return make_model([helper.make_node("Identity", ["x"], ["y"])], [],
                      [helper.make_tensor_value_info("x", INT_TYPES[dtype], [2, 3])],
                      [helper.make_tensor_value_info("y", INT_TYPES[dtype], [2, 3])])


def test_a_uint64_range_beyond_int64_is_fed(tmp_path):
    model = save(identity_model("uint64"), tmp_path / "u.onnx")

    result = invoke("verify", model, model, "--providers", "cpu", "--input-range", "x=0,1e19", "--samples", "4",
                    "--save-inputs", tmp_path / "in.npz", "--json", tmp_path / "r.json")

    assert result.exit_code == EXIT_OK, result.output
    with np.load(tmp_path / "in.npz") as saved:
        fed = saved["x"]
    assert fed.dtype == np.uint64 and int(fed.max()) > 2**63  # values beyond int64 were drawn
    assert json.loads((tmp_path / "r.json").read_text())["inputs"][0]["range"] == [0, 10**19]
    top = invoke("verify", model, model, "--providers", "cpu", "--input-range", f"x={2**64 - 2},{2**64 - 1}")
    assert top.exit_code == EXIT_OK, top.output


@pytest.mark.parametrize(("dtype", "spec", "words"), [
    ("bool", "x=0.2,0.7", ["'x'", "bool", "0.2", "0.7"]),
    ("uint64", "x=-5,-1", ["'x'", "uint64", "-5"]),
    ("uint64", "x=0,1e20", ["'x'", "uint64", "18446744073709551615"]),
    ("int32", "x=0.2,0.7", ["'x'", "int32", "no integer"]),
])
def test_a_range_that_holds_no_value_of_the_input_type_is_one_line_exit_2(tmp_path, dtype, spec, words):
    model = save(identity_model(dtype), tmp_path / "m.onnx")

    result = invoke("verify", model, model, "--providers", "cpu", "--input-range", spec)
    folded = invoke("fold", model, "-o", tmp_path / "out.onnx", "--verify", "--providers", "cpu", "--input-range", spec)

    for outcome in (result, folded):
        assert outcome.exit_code == EXIT_BAD_INPUT, outcome.output
        line = outcome.stderr.strip()
        assert line.count("\n") == 0 and line.startswith("bnfold: error:") and "--input-range" in line, line
        assert all(word in line for word in words), line
    assert not (tmp_path / "out.onnx").exists()  # refused before anything was written


def test_bool_ranges_that_hold_a_value():
    for spec, expected in (("x=1,1", {True}), ("x=0,0.5", {False}), ("x=-3,7", {False, True})):
        ranges = parse_input_ranges([spec])
        from bnfold.verification.feeds import TensorSignature, ModelSignature, random_feeds

        signature = ModelSignature((TensorSignature("x", "bool", (50,)),), ())
        feeds, _ = random_feeds(signature, {}, ranges, 2, 1, 0, "m.onnx")
        assert set(feeds[0]["x"].tolist()) == expected
    with pytest.raises(InputError):
        random_feeds(signature, {}, parse_input_ranges(["x=2,3"]), 2, 1, 0, "m.onnx")


# --- off a terminal: one plain line per output and run ---------------------------------------


def _conv_pair(tmp_path):
    from _models import ConvBnParams, conv_bn_model

    params = ConvBnParams.random(np.random.default_rng(0), 4, 3, (3, 3))
    return (save(conv_bn_model(params, output_name="a_rather_long_output_name_for_an_80_column_log"),
                 tmp_path / "original.onnx"),
            save(conv_bn_model(params, folded=True, output_name="a_rather_long_output_name_for_an_80_column_log"),
                 tmp_path / "folded.onnx"))


def test_verify_prints_one_plain_line_per_output_off_a_terminal(tmp_path):
    import os
    import subprocess
    import sys

    original, folded = _conv_pair(tmp_path)
    result = subprocess.run([sys.executable, "-m", "bnfold", "verify", str(original), str(folded), "--providers", "cpu"],
                            capture_output=True, text=True, env={**os.environ, "COLUMNS": "80"})

    assert result.returncode == EXIT_OK, result.stderr
    lines = result.stdout.splitlines()
    assert not any(character in result.stdout for character in "─━┃│┏╭"), result.stdout  # no boxes
    runs = [line for line in lines if line.startswith("a_rather_long_output_name_for_an_80_column_log  candidate CPU")]
    assert len(runs) == 2 and all("PASS" in line and "max|diff|" in line and len(line) > 80 for line in runs)
    assert lines[-1].startswith("PASS: 1 output(s) match") and len(lines) == 6  # header 3, runs 2, summary


def test_verify_keeps_its_tables_on_a_terminal(tmp_path):
    import os
    import subprocess
    import sys

    original, folded = _conv_pair(tmp_path)
    script = ("import sys; from bnfold.cli import main; sys.argv = ['bnfold', 'verify', sys.argv[1], sys.argv[2], "
              "'--providers', 'cpu']; import bnfold.cli as c; from rich.console import Console; "
              "c.console.cache_clear(); c._console_class.cache_clear(); "
              "Console.is_terminal = property(lambda self: True); main()")
    result = subprocess.run([sys.executable, "-c", script, str(original), str(folded)], capture_output=True, text=True,
                            env={**os.environ, "COLUMNS": "80"})
    assert result.returncode == 0, result.stderr
    assert "CANDIDATE against ORIGINAL (unoptimised)" in result.stdout and "─" in result.stdout


def test_train_prints_one_plain_line_per_model_off_a_terminal():
    import io

    from rich.console import Console

    from bnfold.render import render_zoo

    entries = [{"file": "cnn_ts13.onnx", "exporter": "torchscript", "opset": 13, "bn_count": 3,
                "test_accuracy": 0.9861, "test_mse": None, "health": "healthy", "size_bytes": 40960},
               {"file": "autoencoder_dynamo18.onnx", "exporter": "dynamo", "opset": 18, "bn_count": 4,
                "test_accuracy": None, "test_mse": 0.01234, "health": "untrained-stats", "size_bytes": 81920}]
    plain = io.StringIO()
    render_zoo(entries, "models", Console(file=plain, width=80))
    assert plain.getvalue().splitlines() == [
        "bnfold train: 2 model(s) -> models",
        "cnn_ts13.onnx  torchscript  opset 13  BN 3  test accuracy 0.9861  healthy  40 KiB",
        "autoencoder_dynamo18.onnx  dynamo  opset 18  BN 4  test mse 0.01234  untrained-stats  80 KiB"]
    table = io.StringIO()
    render_zoo(entries, "models", Console(file=table, width=80, force_terminal=True))
    assert "━" in table.getvalue() or "─" in table.getvalue()


def test_atol_help_says_what_the_code_does():
    """A given --atol is used as is; the default is scaled by each channel's own largest value."""
    from bnfold.cli import VERIFY_ATOL
    from bnfold.verification import resolve_tolerance

    help_text = VERIFY_ATOL.help
    assert "as given" in help_text and "channel" in help_text and "max |output|)" not in help_text
    assert not resolve_tolerance("float32", None, 1e-3, None).atol_scaled  # as given
    assert resolve_tolerance("float32", None, None, None).atol_scaled  # the default: per channel
    scaled = compare_arrays([np.array([[100.0, 0.01]]).T], [np.array([[100.0 + 5e-4, 0.01 + 5e-4]]).T],
                            resolve_tolerance("float64", None, None, None), 0)
    assert scaled.atol_applied == [1e-9, 100 * 1e-9]  # each channel's own scale, at least 1


# --- the comparison's figures on zeros, empty channels and non-finite values -----------------


def test_identical_outputs_with_zeros_compare_clean_and_silently():
    """Equal outputs holding zeros, a zero channel and an empty run: every figure 0 (no
    NaN from 0/0), no element to point at, and no RuntimeWarning in a CI log."""
    reference = np.array([[[0.0, 1.0, -2.0], [0.0, 0.0, 0.0]]], np.float32)
    again = reference.copy()
    again[0, 0, 1] = 1.0 + 1e-7
    tolerance = Tolerance(rtol=0.0, atol=0.0, channel_rtol=math.inf, noise_factor=4.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same = compare_arrays([reference], [reference.copy()], tolerance, 1, [again])
    assert same.passed
    assert (same.max_rel_diff, same.min_passing_rtol, same.min_passing_atol, same.max_channel_rel_diff) == (0, 0, 0, 0)
    assert same.max_abs_diff_index is None and same.max_abs_diff_values is None
    assert same.worst_channels == [] and same.max_channel_rel_diff_channel is None
    assert same.elements_within_noise == 0 and same.channels_within_noise == 0


def test_a_zero_reference_channel_that_moves_warns_of_nothing_and_fails_on_the_floor():
    """A channel whose reference is all zeros has no scale of its own: it is held to the
    absolute floor (``channel_atol * sqrt(n)``) alone, also when the relative term is
    unbounded (``channel_rtol`` inf)."""
    reference = np.zeros((1, 2, 4), np.float32)
    reference[0, 1] = 1.0
    moved = reference.copy()
    moved[0, 0] = 0.25  # diff norm 0.5 over n = 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        strict = compare_arrays([reference], [moved], Tolerance(rtol=0.0, atol=1.0, channel_rtol=math.inf), 1)
        floored = compare_arrays([reference], [moved], Tolerance(rtol=0.0, atol=1.0, channel_rtol=math.inf,
                                                                 channel_atol=0.3), 1)
        below = compare_arrays([reference], [moved], Tolerance(rtol=0.0, atol=1.0, channel_rtol=math.inf,
                                                               channel_atol=0.2), 1)
    assert strict.elements_failing == 0 and strict.channels_failing == 1 and not strict.passed
    assert math.isinf(strict.max_rel_diff) and math.isinf(strict.max_channel_rel_diff)
    assert floored.passed  # 0.5 <= 0.3 * sqrt(4)
    assert below.channels_failing == 1  # 0.5 > 0.2 * sqrt(4)


def test_matching_non_finite_values_are_left_out_of_a_channel_verdict():
    """NaN against NaN and inf against the same inf are equal, and the channel's relative
    L2 error is over its finite pairs only: padding a channel with them changes nothing."""
    reference = np.array([[[1e-3, 2e-3, -1e-3]]], np.float32)
    subject = reference * np.float32(1.01)
    tolerance = Tolerance(rtol=1.0, atol=1.0, channel_rtol=1e-3)
    plain = compare_arrays([reference], [subject], tolerance, 1)
    pad = np.array([[[np.nan] * 50 + [np.inf] * 50 + [-np.inf] * 50]], np.float32)
    padded = compare_arrays([np.concatenate([reference, pad], axis=2)], [np.concatenate([subject, pad], axis=2)],
                            tolerance, 1)
    assert plain.channels_failing == padded.channels_failing == 1
    assert padded.max_channel_rel_diff == pytest.approx(plain.max_channel_rel_diff)
    assert padded.worst_channels[0].rms_reference == pytest.approx(plain.worst_channels[0].rms_reference)
    assert padded.nonfinite_mismatches == 0


def test_the_channel_floor_grows_with_the_square_root_of_the_channel_size():
    reference = np.ones((1, 1, 100), np.float32)
    subject = reference + np.float32(0.05)  # diff norm 0.5
    tolerance = Tolerance(rtol=0.0, atol=1.0, channel_rtol=0.0, channel_atol=0.06)
    assert compare_arrays([reference], [subject], tolerance, 1).passed  # 0.5 <= 0.06 * 10
    assert not compare_arrays([reference], [subject], replace(tolerance, channel_atol=0.04), 1).passed


def test_a_noise_factor_of_zero_allows_no_noise_even_when_the_drift_overflows():
    """With ``noise_factor`` 0 the second run plays no part: not even when its drift from
    the reference overflows float64 (0 x inf must not become a NaN that passes everything)."""
    reference = np.array([[[1e308, 1.0, 2.0]]])
    again = np.array([[[-1e308, 1.0, 2.0]]])
    wrong = np.array([[[1e308, 1.5, 2.0]]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = compare_arrays([reference], [wrong], Tolerance(rtol=1e-7, atol=1e-9, noise_factor=0.0), 1, [again])
    assert got.elements_failing == 1 and not got.passed
    assert got.noise_max is None and got.noise_allowance == []
    assert 0.99 < got.cosine_similarity <= 1.0  # squares beyond float64 are not a NaN cosine


@pytest.mark.parametrize("size", [1e200, 1e-200])
def test_float64_outputs_beyond_1e154_keep_their_channel_norms(size):
    """Squares of float64 values beyond 1e154 overflow, and below 1e-154 vanish: the channel
    criterion still sees a 0.1% change of a channel (not an infinite norm that allows
    anything, nor a zero one that hides the change)."""
    reference = np.array([[[3 * size, -size, 2 * size], [1.0, 2.0, 3.0]]])
    subject = reference.copy()
    subject[0, 0] *= 1.001
    tolerance = Tolerance(rtol=1.0, atol=0.0, channel_rtol=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = compare_arrays([reference], [subject], tolerance, 1)
        same = compare_arrays([reference], [reference.copy()], tolerance, 1)
    assert got.elements_failing == 0 and got.channels_failing == 1
    assert got.max_channel_rel_diff == pytest.approx(1e-3)
    assert got.worst_channels[0].rms_reference == pytest.approx(math.sqrt(14 / 3) * size)
    assert same.passed and same.cosine_similarity == pytest.approx(1.0)


def test_differences_that_overflow_float64_fail_quietly():
    """1e308 against -1e308 differs by more than float64 holds: the element and its channel
    fail (an infinite difference), and beside it a large finite one is still squared
    without a warning."""
    reference = np.array([[[1e308, 1e200, 1.0]]])
    subject = np.array([[[-1e308, 1.5e200, 1.0]]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = compare_arrays([reference], [subject], Tolerance(rtol=1e-7, atol=1e-9, channel_rtol=1e-6), 1)
    assert got.elements_failing == 2 and got.channels_failing == 1
    assert got.max_abs_diff == math.inf and got.max_channel_rel_diff == math.inf


def test_within_noise_counts_only_what_the_noise_rescued():
    """``elements_within_noise`` and ``channels_within_noise`` count what fails without the
    allowance and passes with it: never an equal element, never a channel that fails anyway."""
    reference = np.array([[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]])
    again = reference.copy()
    again[0, 2, 0] += 1e-3
    subject = reference.copy()
    subject[0, 0, 0] = np.nan  # channel 0 fails whatever the noise
    subject[0, 2, 0] += 2e-3  # within 4x channel 2's drift
    got = compare_arrays([reference], [subject], Tolerance(rtol=0.0, atol=0.0, channel_rtol=0.0, noise_factor=4.0),
                         1, [again])
    assert got.elements_failing == 1 and got.channels_failing == 1
    assert got.elements_within_noise == 1 and got.channels_within_noise == 1


def test_channels_without_elements_compare_with_a_noise_run():
    """An output of shape [1, 3, 0] has three channels and nothing in them: equal, no crash."""
    empty = np.zeros((1, 3, 0), np.float32)
    got = compare_arrays([empty], [empty.copy()], Tolerance(rtol=1e-4, atol=1e-5, noise_factor=4.0), 1, [empty.copy()])
    assert got.passed and got.channels == 3 and got.noise_max == 0.0


def test_the_worst_channels_come_worst_first_and_ties_in_channel_order():
    """The report's worst channels are the same from run to run: largest relative error
    first, equal errors in channel order."""
    reference = np.ones((1, 40, 4), np.float32)
    subject = reference * np.float32(1.01)
    subject[0, 8] = np.float32(1.02)
    got = compare_arrays([reference], [subject], Tolerance(rtol=1.0, atol=1.0, channel_rtol=1.0), 1)
    assert [w.channel for w in got.worst_channels] == [8, 0, 1]


def test_a_channel_of_only_non_finite_mismatches_is_listed_without_a_scale():
    """A channel whose every element is a NaN/inf mismatch fails, and the report gives it
    no reference scale (no finite pair to take one from) instead of crashing on 0 / 0."""
    reference = np.array([[[1.0, 2.0], [np.nan, np.inf]]])
    subject = np.array([[[1.0, 2.0], [3.0, -np.inf]]])
    got = compare_arrays([reference], [subject], Tolerance(rtol=1e-7, atol=1e-9, channel_rtol=1e-6), 1)
    assert got.channels_failing == 1 and got.nonfinite_mismatches == 2
    (worst,) = got.worst_channels
    assert (worst.channel, worst.rms_reference, worst.passed, worst.rel_diff) == (1, 0.0, False, 0.0)


def test_an_output_of_only_non_finite_values_has_no_statistics_to_spoil():
    """Matching NaN and inf only: it passes, with a mean difference of 0 (not NaN) and no warning."""
    reference = np.array([[[np.nan, np.inf], [-np.inf, np.nan]]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = compare_arrays([reference], [reference.copy()], Tolerance(rtol=1e-7, atol=1e-9, channel_rtol=1e-6), 1)
    assert got.passed and got.mean_abs_diff == 0.0 and got.max_abs_diff == 0.0
    assert (got.reference_nan, got.reference_inf) == (2, 2)


def test_an_output_with_no_channels_reports_no_ranges():
    """Shape [1, 0, 3] has no channel: no atol or noise range to report (and no crash)."""
    empty = np.zeros((1, 0, 3), np.float32)
    got = compare_arrays([empty], [empty.copy()], Tolerance(rtol=1e-4, atol=1e-5, noise_factor=4.0), 1, [empty.copy()])
    assert got.passed and got.channels == 0
    assert got.atol_applied == [] and got.noise_allowance == [] and got.noise_max == 0.0


@pytest.mark.parametrize(("reference", "subject", "cosine"), [
    ([1.0, 2.0, 3.0], [2.0, 4.0, 6.0], 1.0),  # same direction
    ([1.0, 2.0, 3.0], [-1.0, -2.0, -3.0], -1.0),
    ([1.0, 0.0], [0.0, 5.0], 0.0),  # orthogonal
    ([0.0, 0.0], [0.0, 0.0], 1.0),  # both zero: the same
    ([0.0, 0.0], [0.0, 1.0], 0.0),  # one zero: nothing in common
    ([1.0, 0.0], [0.0, 0.0], 0.0),
    ([3.0, 4.0, np.nan], [4.0, 3.0, np.nan], 0.96),  # over the finite pairs
])
def test_the_cosine_similarity_of_an_output(reference, subject, cosine):
    got = compare_arrays([np.array([reference])], [np.array([subject])], Tolerance(rtol=1.0, atol=10.0))
    assert got.cosine_similarity == pytest.approx(cosine)
