"""bnfold verify: real onnxruntime sessions on models built with onnx.helper.

CUDA tests carry the ``cuda`` mark and skip, saying why, where onnxruntime offers no
CUDAExecutionProvider (CI has no GPU).
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper
from typer.testing import CliRunner

import bnfold
from _models import (
    ConvBnParams,
    cast_model,
    conv_bn_model,
    elementwise_model,
    embedding_model,
    opset9_bn_with_empty_outputs,
    save,
    two_branch_model,
)
from bnfold.cli import app
from bnfold.errors import EXIT_BAD_INPUT, EXIT_CHECK_FAILED, EXIT_OK, InputError
from bnfold.verification import (
    CPU,
    CUDA,
    DEFAULT_TOLERANCES,
    OPTIMIZATION_DEFAULT,
    OPTIMIZATION_DISABLED,
    REPORT_SCHEMA_VERSION,
    Tolerance,
    VerifyOptions,
    compare_arrays,
    default_tolerance,
    output_scale,
    parse_shape,
    verify,
)

CUDA_AVAILABLE = CUDA in ort.get_available_providers()
needs_cuda = pytest.mark.skipif(
    not CUDA_AVAILABLE,
    reason=f"onnxruntime {ort.__version__} offers only {ort.get_available_providers()}: "
    "no CUDAExecutionProvider (install onnxruntime-gpu on a machine with a CUDA GPU)",
)


@pytest.fixture(scope="module")
def params() -> ConvBnParams:
    return ConvBnParams.random(np.random.default_rng(0), 4, 3, (3, 3))


@pytest.fixture
def conv_pair(tmp_path, params):
    """(original, hand-folded candidate) paths of x[N,3,8,8] -> Conv -> BN -> y."""
    return save(conv_bn_model(params), tmp_path / "original.onnx"), save(
        conv_bn_model(params, folded=True), tmp_path / "folded.onnx"
    )


def perturb_largest_weight(model: onnx.ModelProto, name: str, relative: float = 1e-3) -> onnx.ModelProto:
    """Scale the largest-magnitude element of initializer ``name`` by ``1 + relative``."""
    for index, initializer in enumerate(model.graph.initializer):
        if initializer.name == name:
            array = numpy_helper.to_array(initializer).copy()
            position = np.unravel_index(np.argmax(np.abs(array)), array.shape)
            array[position] *= 1 + relative
            model.graph.initializer[index].CopyFrom(numpy_helper.from_array(array, name))
            return model
    raise KeyError(name)


def runs_of(report):
    return {(c.output, c.subject.provider, c.subject.optimization) for c in report.comparisons}


def invoke(*args: str):
    return CliRunner().invoke(app, [str(arg) for arg in args])


# --- verdicts ---------------------------------------------------------------------------


def test_folded_model_passes_on_both_optimization_levels(conv_pair):
    original, candidate = conv_pair
    report = verify(original, candidate, providers="cpu")

    assert report.passed and report.exit_code == EXIT_OK
    assert runs_of(report) == {("y", CPU, OPTIMIZATION_DISABLED), ("y", CPU, OPTIMIZATION_DEFAULT)}
    assert all(c.reference.model == "original" and c.reference.optimization == OPTIMIZATION_DISABLED
               for c in report.comparisons)
    assert report.providers == [CPU]
    assert [(data.name, data.shape) for data in report.inputs] == [("x", [2, 3, 8, 8])]
    assert report.onnxruntime_version == ort.__version__


def test_bnfold_verify_stays_callable_after_the_implementation_is_imported(conv_pair):
    import bnfold.verification  # noqa: F401  (a submodule import must not shadow bnfold.verify)

    reports = [bnfold.verify(*conv_pair, providers="cpu"), bnfold.verify(*conv_pair, VerifyOptions(providers="cpu"))]

    assert all(report.passed for report in reports)


def test_model_folded_by_bnfold_passes(tmp_path, params):
    original = save(conv_bn_model(params), tmp_path / "original.onnx")
    result = bnfold.fold(original)
    result.save(tmp_path / "folded.onnx")

    report = verify(original, tmp_path / "folded.onnx", providers="cpu")

    assert report.passed, report.summary()


def test_weight_perturbed_by_1e_3_fails_and_names_the_output(tmp_path, params, conv_pair):
    original, _ = conv_pair
    candidate = save(perturb_largest_weight(conv_bn_model(params, folded=True), "c_W"), tmp_path / "bad.onnx")

    report = verify(original, candidate, providers="cpu")

    assert not report.passed and report.exit_code == EXIT_CHECK_FAILED
    assert {c.output for c in report.failures()} == {"y"}
    assert "'y'" in report.summary()
    for comparison in report.failures():
        difference = comparison.difference
        assert difference.elements_failing > 0
        # The reported minimum tolerances are exactly what it would take to pass.
        assert difference.min_passing_atol > comparison.tolerance.atol
        assert difference.min_passing_rtol > comparison.tolerance.rtol


def test_renamed_output_is_a_mismatch_not_a_crash(tmp_path, params, conv_pair):
    original, _ = conv_pair
    candidate = save(conv_bn_model(params, folded=True, output_name="logits"), tmp_path / "renamed.onnx")

    report = verify(original, candidate, providers="cpu")

    assert not report.passed and report.exit_code == EXIT_CHECK_FAILED
    assert any("'y'" in problem and "missing" in problem for problem in report.signature_mismatches)
    assert any("'logits'" in problem for problem in report.signature_mismatches)


def test_changed_input_shape_is_a_mismatch_and_nothing_runs(tmp_path, params, conv_pair):
    original, _ = conv_pair
    candidate = save(
        conv_bn_model(params, folded=True, input_shape=(1, 3, 8, 8), output_shape=(1, 4, 6, 6)),
        tmp_path / "static.onnx",
    )

    report = verify(original, candidate, providers="cpu")

    assert not report.passed
    assert any("input 'x'" in problem for problem in report.signature_mismatches)
    assert report.comparisons == [] and report.onnxruntime_version is None


def test_dynamic_batch_uses_batch_and_samples(conv_pair):
    original, candidate = conv_pair
    report = verify(original, candidate, providers="cpu", batch=3, samples=2, seed=7)

    assert report.passed
    assert report.runs == 2 and report.seed == 7
    assert report.inputs[0].shape == [3, 3, 8, 8]
    assert all(c.reference_shape == [3, 4, 6, 6] and c.difference.elements == 2 * 3 * 4 * 6 * 6
               for c in report.comparisons)


def test_dynamic_spatial_dims_need_shape(tmp_path, params):
    shapes = {"input_shape": ("N", 3, "H", "W"), "output_shape": ("N", 4, "H2", "W2")}
    original = save(conv_bn_model(params, **shapes), tmp_path / "original.onnx")
    candidate = save(conv_bn_model(params, folded=True, **shapes), tmp_path / "folded.onnx")

    with pytest.raises(InputError, match=r"dimension 2 \(H\) is dynamic.*--shape x:2x3x224x224") as error:
        verify(original, candidate, providers="cpu")
    report = verify(original, candidate, providers="cpu", shapes={"x": (1, 3, 10, 12)})

    assert report.passed
    assert report.comparisons[0].reference_shape == [1, 4, 8, 10]
    # the suggestion pastes as is, on the command line
    suggestion = shlex.split(str(error.value).split("give its size with ")[1].split(" (")[0])
    pasted = invoke("verify", original, candidate, "--providers", "cpu", *suggestion)
    assert pasted.exit_code == EXIT_OK, pasted.output


def test_multi_input_multi_output_names_only_the_output_that_differs(tmp_path):
    rng = np.random.default_rng(1)
    left, right = ConvBnParams.random(rng, 4, 3, (3, 3)), ConvBnParams.random(rng, 4, 2, (3, 3))
    original = save(two_branch_model(left, right), tmp_path / "original.onnx")
    folded = save(two_branch_model(left, right, folded=True), tmp_path / "folded.onnx")
    broken = save(perturb_largest_weight(two_branch_model(left, right, folded=True), "r_W"), tmp_path / "broken.onnx")

    good = verify(original, folded, providers="cpu")
    bad = verify(original, broken, providers="cpu")

    assert good.passed
    assert {c.output for c in good.comparisons} == {"left", "total"}
    assert [data.name for data in good.inputs] == ["a", "b"]
    assert {c.output for c in bad.failures()} == {"total"}


def test_int64_and_bool_inputs(tmp_path):
    rng = np.random.default_rng(2)
    params = ConvBnParams.random(rng, 4, 5, (3,))
    table = rng.standard_normal((10, 6)).astype(np.float32)
    original = save(embedding_model(params, table), tmp_path / "original.onnx")
    folded = save(embedding_model(params, table, folded=True), tmp_path / "folded.onnx")

    report = verify(original, folded, providers="cpu")

    assert report.passed, report.summary()
    assert [(data.name, data.dtype) for data in report.inputs] == [("ids", "int64"), ("mask", "bool")]
    assert report.comparisons[0].reference_shape == [2, 4, 4]


def test_tolerances_follow_the_output_dtype_and_bfloat16_round_trips(tmp_path):
    original = save(cast_model(), tmp_path / "original.onnx")
    scaled = save(cast_model(scale=1.5), tmp_path / "scaled.onnx")

    same = verify(original, original, providers="cpu")
    report = verify(original, scaled, providers="cpu")

    tolerance_of = {c.output: c.tolerance for c in same.comparisons}
    expected_type = {"wide": "float32", "narrow": "bfloat16", "half": "float16"}
    assert set(tolerance_of) == set(expected_type)
    for output, dtype in expected_type.items():
        default = DEFAULT_TOLERANCES[dtype]
        assert tolerance_of[output].rtol == default.rtol
        # the default atol is in units of each channel's max(1, max |reference|): N(0, 1) inputs reach > 1
        assert tolerance_of[output].atol == default.atol and tolerance_of[output].atol_scaled
        low, high = next(c.difference.atol_applied for c in same.comparisons if c.output == output)
        assert default.atol <= low <= high and 1.0 < high / default.atol < 10.0
    assert same.passed
    assert {c.output for c in report.failures()} == {"narrow"}
    assert {c.reference_dtype for c in report.comparisons if c.output == "narrow"} == {"bfloat16"}


def test_output_scale_is_the_largest_finite_magnitude_but_at_least_one():
    assert output_scale([np.array([0.5, -3.0], np.float32), np.array([2.0, np.nan], np.float32)]) == 3.0
    assert output_scale([np.array([0.1, -0.2], np.float32)]) == 1.0
    assert output_scale([np.array([np.inf, 4.0], np.float64)]) == 4.0


@pytest.mark.parametrize("arrays, scale", [
    ([], 1.0),  # no runs
    ([np.zeros((2, 0), np.float32)], 1.0),  # no elements
    ([np.array([np.nan, np.inf], np.float32)], 1.0),  # no finite element
    ([np.array([7, -9], np.int64), np.array([True])], 1.0),  # integers and bool are exact: no scale
    ([np.array([0.5, -3.0], ml_dtypes.bfloat16)], 3.0),  # bfloat16 is a float
])
def test_output_scale_of_outputs_with_nothing_to_scale_by_is_one(arrays, scale):
    """``max(1, max |reference|)`` over the finite float elements: 1 where there are none."""
    assert output_scale(arrays) == scale


def test_tolerance_overrides_apply(conv_pair):
    original, candidate = conv_pair
    report = verify(original, candidate, providers="cpu", rtol=0.5, atol=0.25)

    # a given atol is absolute; the channel bound loosens with the given tolerances; the
    # noise allowance is the default (4x ORIGINAL's own drift), or as given
    assert {c.tolerance for c in report.comparisons} == {
        Tolerance(rtol=0.5, atol=0.25, atol_scaled=False, channel_rtol=0.5, channel_atol=0.25, noise_factor=4.0)}
    quiet = verify(original, candidate, providers="cpu", noise_factor=0)
    assert {c.tolerance.noise_factor for c in quiet.comparisons} == {0.0}


# --- inputs from npz ----------------------------------------------------------------------


def test_npz_samples_along_axis_0_are_split_by_a_static_batch(tmp_path, params):
    shapes = {"input_shape": (1, 3, 8, 8), "output_shape": (1, 4, 6, 6)}
    original = save(conv_bn_model(params, **shapes), tmp_path / "original.onnx")
    candidate = save(conv_bn_model(params, folded=True, **shapes), tmp_path / "folded.onnx")
    np.savez(tmp_path / "inputs.npz", x=np.random.default_rng(3).standard_normal((3, 3, 8, 8)).astype(np.float32))

    report = verify(original, candidate, providers="cpu", inputs=tmp_path / "inputs.npz")

    assert report.passed
    assert report.runs == 3 and report.seed is None
    assert report.input_source == str(tmp_path / "inputs.npz")
    assert report.inputs[0].shape == [1, 3, 8, 8]


def test_npz_with_a_dynamic_batch_runs_all_samples_at_once(tmp_path, conv_pair):
    original, candidate = conv_pair
    np.savez(tmp_path / "inputs.npz", x=np.zeros((5, 3, 8, 8), np.float32))

    report = verify(original, candidate, providers="cpu", inputs=tmp_path / "inputs.npz")

    assert report.passed and report.runs == 1 and report.inputs[0].shape == [5, 3, 8, 8]


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"images": np.zeros((2, 3, 8, 8), np.float32)}, "key 'images' is not an input"),
        ({}, "no array for input 'x'"),
        ({"x": np.zeros((2, 3, 8, 8), np.float64)}, "'x' is float64, the model input is float32"),
        ({"x": np.zeros((2, 3, 9, 9), np.float32)}, "has shape"),
    ],
)
def test_bad_npz_is_an_input_error(tmp_path, conv_pair, arrays, message):
    original, candidate = conv_pair
    np.savez(tmp_path / "inputs.npz", **arrays)

    with pytest.raises(InputError, match=message):
        verify(original, candidate, providers="cpu", inputs=tmp_path / "inputs.npz")


def test_unreadable_npz_is_an_input_error(tmp_path, conv_pair):
    original, candidate = conv_pair
    (tmp_path / "inputs.npz").write_bytes(b"PK\x03\x04 truncated")

    with pytest.raises(InputError, match="not a readable .npz"):
        verify(original, candidate, providers="cpu", inputs=tmp_path / "inputs.npz")


def test_random_input_options_are_refused_with_npz(conv_pair, tmp_path):
    with pytest.raises(InputError, match="--seed"):
        VerifyOptions(inputs=tmp_path / "inputs.npz", seed=1)


# --- robustness -------------------------------------------------------------------------


def test_onnxruntime_crash_is_reported_not_fatal(tmp_path):
    crashing = save(opset9_bn_with_empty_outputs(), tmp_path / "crash.onnx")

    crash = r"onnxruntime crashed \(signal \d+.*running ORIGINAL on CPUExecutionProvider"
    with pytest.raises(InputError, match=crash) as error:
        verify(crashing, crashing, providers="cpu")
    assert error.value.exit_code == EXIT_BAD_INPUT


@pytest.mark.skipif(CUDA_AVAILABLE, reason="CUDAExecutionProvider is available here, so it cannot be missing")
def test_requesting_missing_cuda_is_an_error_naming_onnxruntime_gpu(conv_pair):
    original, candidate = conv_pair
    with pytest.raises(InputError, match="CUDAExecutionProvider is not available.*onnxruntime-gpu"):
        verify(original, candidate, providers="cpu,cuda")


@pytest.mark.skipif(CUDA_AVAILABLE, reason="CUDAExecutionProvider is available here")
def test_auto_without_cuda_runs_cpu_and_says_so(conv_pair):
    report = verify(*conv_pair, providers="auto")

    assert report.providers == [CPU]
    assert any(CUDA in note for note in report.notes)


def test_importing_the_cli_does_not_import_onnxruntime():
    code = "import sys, bnfold.cli; sys.exit('onnxruntime' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# --- CUDA -------------------------------------------------------------------------------


@pytest.mark.cuda
@needs_cuda
def test_cuda_runs_the_matrix_and_measures_the_noise_floor(conv_pair, tmp_path, params):
    original, candidate = conv_pair
    broken = save(perturb_largest_weight(conv_bn_model(params, folded=True), "c_W"), tmp_path / "bad.onnx")

    report = verify(original, candidate, providers="cuda")
    bad = verify(original, broken, providers="cuda")

    print(f"onnxruntime {report.onnxruntime_version} offered {report.available_providers}")
    assert report.passed, report.summary()
    assert report.providers == [CPU, CUDA] and not report.allow_tf32
    assert {(run[1], run[2]) for run in runs_of(report)} == {
        (provider, level) for provider in (CPU, CUDA) for level in (OPTIMIZATION_DISABLED, OPTIMIZATION_DEFAULT)
    }
    # every comparison passed on its own, so ORIGINAL's drift was not needed: only CUDA against CPU
    assert [(c.reference.provider, c.subject.provider) for c in report.noise_floor] == [(CPU, CUDA)]
    assert {c.subject.provider for c in bad.failures()} == {CPU, CUDA}


# --- comparison semantics ---------------------------------------------------------------


def test_nan_in_the_same_place_is_equal_and_in_one_place_fails():
    reference = [np.array([1.0, np.nan, np.inf], np.float32)]
    same = compare_arrays(reference, [reference[0].copy()], DEFAULT_TOLERANCES["float32"])
    one_sided_nan = [np.array([np.nan, np.nan, np.inf], np.float32)]
    one_sided = compare_arrays(reference, one_sided_nan, DEFAULT_TOLERANCES["float32"])

    assert same.passed and same.reference_nan == same.subject_nan == 1 and same.reference_inf == 1
    assert not one_sided.passed
    assert one_sided.nonfinite_mismatches == 1 and one_sided.subject_nan == 2
    assert one_sided.min_passing_atol == one_sided.min_passing_rtol == float("inf")


@pytest.mark.parametrize("seed", range(5))
def test_minimum_passing_tolerances_are_tight(seed):
    rng = np.random.default_rng(seed)
    reference = [rng.standard_normal((3, 4)), rng.standard_normal((3, 4))]
    subject = [array + rng.standard_normal(array.shape) * 1e-3 for array in reference]
    tolerance = Tolerance(rtol=1e-4, atol=1e-5)
    difference = compare_arrays(reference, subject, tolerance)
    min_atol, min_rtol = difference.min_passing_atol, difference.min_passing_rtol

    assert not difference.passed
    assert compare_arrays(reference, subject, Tolerance(tolerance.rtol, min_atol * (1 + 1e-9))).passed
    assert not compare_arrays(reference, subject, Tolerance(tolerance.rtol, min_atol * (1 - 1e-6))).passed
    assert compare_arrays(reference, subject, Tolerance(min_rtol * (1 + 1e-9), tolerance.atol)).passed
    assert not compare_arrays(reference, subject, Tolerance(min_rtol * (1 - 1e-6), tolerance.atol)).passed
    run, *index = difference.max_abs_diff_index
    assert abs(subject[run][tuple(index)] - reference[run][tuple(index)]) == difference.max_abs_diff


def _expected_difference(ref_runs, sub_runs, noise_runs, tol):
    """Every field of docs/verify.md's difference table, computed element by element and
    channel by channel in plain Python (channels along axis 1 of every run)."""
    rows = {}
    for run, (ref, sub, again) in enumerate(zip(ref_runs, sub_runs, noise_runs)):
        for index in np.ndindex(ref.shape):
            rows.setdefault(index[1], []).append((run, index, float(ref[index]), float(sub[index]),
                                                  float(again[index])))
    channels = sorted(rows)
    scale = {c: max(1.0, max(abs(b) for _, _, b, _, _ in rows[c])) for c in channels}
    drift = {c: [abs(d - b) for _, _, b, _, d in rows[c]] for c in channels}
    e = dict(elements=sum(len(v) for v in rows.values()), failing=0, alone=0, max_abs=0.0, at=None, rel=0.0,
             min_atol=0.0, min_rtol=0.0, channels_failing=0, channels_alone=0, worst=[])
    diffs, dots = [], [0.0, 0.0, 0.0]
    for c in channels:
        atol, allowance = tol.atol * scale[c], tol.noise_factor * max(drift[c])
        diff_sq = ref_sq = 0.0
        for run, index, b, a, _ in rows[c]:
            d = abs(a - b)
            diffs.append(d)
            dots = [dots[0] + a * b, dots[1] + a * a, dots[2] + b * b]
            e["failing"] += d > atol + tol.rtol * abs(b) + allowance
            e["alone"] += d > atol + tol.rtol * abs(b)
            if d > e["max_abs"]:
                e["max_abs"], e["at"], e["values"] = d, [run, *index], [b, a]
            e["rel"] = max(e["rel"], 0.0 if d == 0 else d / abs(b))
            e["min_atol"] = max(e["min_atol"], (d - tol.rtol * abs(b)) / scale[c])
            e["min_rtol"] = max(e["min_rtol"], 0.0 if d - atol <= 0 else (d - atol) / abs(b))
            diff_sq, ref_sq = diff_sq + d * d, ref_sq + b * b
        allowed = tol.channel_rtol * ref_sq ** 0.5 + tol.channel_atol * len(rows[c]) ** 0.5
        noise_l2 = sum(x * x for x in drift[c]) ** 0.5
        fails = diff_sq ** 0.5 > allowed + tol.noise_factor * noise_l2
        e["channels_failing"] += fails
        e["channels_alone"] += diff_sq ** 0.5 > allowed
        e["worst"].append((diff_sq ** 0.5 / ref_sq ** 0.5, c, (ref_sq / len(rows[c])) ** 0.5,
                           max(abs(a - b) for _, _, b, a, _ in rows[c]), not fails))
    e["worst"].sort(key=lambda w: -w[0])
    e["mean"] = sum(diffs) / len(diffs)
    e["cosine"] = dots[0] / (dots[1] ** 0.5 * dots[2] ** 0.5)
    e["atol_applied"] = [tol.atol * min(scale.values()), tol.atol * max(scale.values())]
    e["noise_max"] = max(max(d) for d in drift.values())
    allowances = [tol.noise_factor * max(drift[c]) for c in channels]
    e["noise_allowance"] = [min(allowances), max(allowances)]
    return e


def test_every_difference_field_is_what_the_docs_define():
    """docs/verify.md's table, field by field, on two runs of a 3-channel output with channels
    of very different sizes, a noisy reference and a subject off by known amounts: one
    element and one channel fail only without the noise floor, one of each fails with it."""
    rng = np.random.default_rng(7)
    sizes = np.array([200.0, 0.5, 3.0]).reshape(1, 3, 1)
    ref = [rng.standard_normal((2, 3, 4)) * sizes, rng.standard_normal((1, 3, 4)) * sizes]
    again = [r + rng.standard_normal(r.shape) * 1e-3 * sizes for r in ref]
    sub = [r.copy() for r in ref]
    sub[0][1, 0, 2] += 0.01  # past channel 0's atol (1e-5 x its scale) and rtol, within its noise allowance
    sub[0][0, 1, :] *= 1.05  # channel 1 off by 5%: fails, noise or not
    sub[1][0, 2, 3] += 0.02  # channel 2 fails its L2 criterion alone, passes with the noise floor
    tol = default_tolerance("float32")
    got = compare_arrays(ref, sub, tol, channel_axis=1, noise=again)
    want = _expected_difference(ref, sub, again, tol)
    approx = lambda x: pytest.approx(x, rel=1e-12, abs=1e-15)  # noqa: E731
    assert got.elements == want["elements"] == 36
    assert (got.elements_failing, got.elements_within_noise) == (want["failing"], want["alone"] - want["failing"])
    assert got.elements_failing > 0 and got.elements_within_noise > 0
    assert got.nonfinite_mismatches == 0
    assert got.max_abs_diff == approx(want["max_abs"]) and got.max_abs_diff_index == want["at"]
    assert got.max_abs_diff_values == [approx(v) for v in want["values"]]
    assert got.max_rel_diff == approx(want["rel"]) and got.mean_abs_diff == approx(want["mean"])
    assert got.cosine_similarity == approx(want["cosine"])
    assert (got.reference_nan, got.reference_inf, got.subject_nan, got.subject_inf) == (0, 0, 0, 0)
    assert got.min_passing_atol == approx(want["min_atol"]) and got.min_passing_rtol == approx(want["min_rtol"])
    assert (got.channel_axis, got.channels) == (1, 3)
    assert (got.channels_failing, got.channels_within_noise) == (want["channels_failing"],
                                                                want["channels_alone"] - want["channels_failing"])
    assert got.channels_failing == 1 and got.channels_within_noise == 1
    assert got.max_channel_rel_diff == approx(want["worst"][0][0])
    assert got.max_channel_rel_diff_channel == want["worst"][0][1]
    assert got.atol_applied == [approx(v) for v in want["atol_applied"]]
    assert [(w.channel, w.rel_diff, w.rms_reference, w.max_abs_diff, w.passed) for w in got.worst_channels] == [
        (c, approx(r), approx(rms), approx(m), ok) for r, c, rms, m, ok in want["worst"]]
    assert got.noise_max == approx(want["noise_max"])
    assert got.noise_allowance == [approx(v) for v in want["noise_allowance"]]
    assert not got.passed


def test_top1_counts_positions_agreements_and_near_ties():
    """Per docs/verify.md: positions over all runs, agreeing argmax along the class axis,
    and near ties (disagreements where the reference's top two differ by less than twice
    the element tolerance)."""
    from bnfold.verification.compare import top1

    tol = Tolerance(rtol=1e-2, atol=1e-3)
    ref = [np.array([[1.0, 5.0, 2.0], [3.0, 0.0, 2.999], [0.0, 1.0, 4.0]]), np.array([[2.0, 1.0, 0.5]])]
    sub = [np.array([[1.0, 5.0, 2.0], [2.0, 0.0, 3.1], [0.0, 4.5, 4.0]]), np.array([[2.0, 1.0, 0.5]])]
    got = top1(ref, sub, 1, tol)
    # row 2 of run 0 flips 3.0 vs 2.999 (gap 0.001 <= 2 x (1e-3 + 1e-2 x 3)): a near tie;
    # row 3 flips 4.0 vs 1.0: a real disagreement
    assert (got.axis, got.predictions, got.agreeing, got.near_ties) == (1, 4, 2, 1)
    assert got.agreement == 0.5
    assert top1([np.zeros((2, 0))], [np.zeros((2, 0))], 1, tol).agreement == 1.0  # no classes: nothing to predict


@pytest.mark.parametrize("ref, sub, axis, tol, want", [
    # two classes: a flip between two values 0.001 apart is a near tie
    ([[[1.0, 1.001]]], [[[1.002, 1.001]]], 1, (1e-2, 1e-3), (1, 0, 1)),
    # the class axis is not the last one: the top two are taken along it, position by position
    ([[[[0.0, 10.0], [5.0, -10.0], [4.99, 0.0]]]], [[[[0.0, 10.0], [4.98, -10.0], [5.0, 0.0]]]], 1, (1e-2, 1e-3),
     (2, 1, 1)),
    # rtol scales with each position's own top value: 100 vs 99.5 is a near tie at rtol 1e-2, 1 vs 0.9 is not
    ([[[100.0, 99.5, 0.0], [1.0, 0.9, 0.0]]], [[[99.0, 99.5, 0.0], [0.0, 0.9, 0.0]]], 1, (1e-2, 1e-3), (2, 0, 1)),
    # near ties of every run add up
    ([[[1.0, 0.999]], [[2.0, 1.999]]], [[[0.999, 1.0]], [[1.999, 2.0]]], 1, (1e-2, 1e-3), (2, 0, 2)),
    # a gap of exactly twice the tolerance (0.5 = 2 x 0.25) is a near tie; 0.7 (< 3 x 0.25) is not
    ([[[1.0, 0.5, 0.0], [1.0, 0.3, 0.0]]], [[[0.5, 1.0, 0.0], [0.0, 1.0, 0.0]]], 1, (0.0, 0.25), (2, 0, 1)),
    # a run with no class axis or no classes predicts nothing; the runs after it still count
    ([[0.0, 1.0], np.zeros((2, 0)), [[1.0, 0.999]]], [[1.0, 0.0], np.zeros((2, 0)), [[0.999, 1.0]]], 1,
     (1e-2, 1e-3), (1, 0, 1)),
], ids=["two-classes", "class-axis-not-last", "rtol-per-position", "runs-add-up", "exactly-twice", "no-classes"])
def test_top1_near_ties_follow_the_definition(ref, sub, axis, tol, want):
    """docs/verify.md: a near tie is a disagreement where the reference's top two differ by
    at most twice the element tolerance ``atol + rtol * |top|``, counted over every run and
    position along the class axis."""
    from bnfold.verification.compare import top1

    got = top1([np.asarray(r, np.float64) for r in ref], [np.asarray(s, np.float64) for s in sub], axis,
               Tolerance(rtol=tol[0], atol=tol[1]))
    assert (got.predictions, got.agreeing, got.near_ties) == want


def test_top1_of_a_float16_output_measures_the_tie_exactly():
    """The top two 1 and 1 - 2^-11 differ by 2^-11 = 4.8828125e-4; twice an atol of 2.4414e-4
    is 4.8828e-4, less: no near tie (in float16 arithmetic the atol would round to 2^-12 and
    make it one)."""
    from bnfold.verification.compare import top1

    ref = np.array([[1.0, 1.0 - 2.0**-11]], np.float16)
    sub = np.array([[1.0 - 2.0**-11, 1.0]], np.float16)
    got = top1([ref], [sub], 1, Tolerance(rtol=0.0, atol=2.4414e-4))
    assert (got.predictions, got.agreeing, got.near_ties) == (1, 0, 0)
    assert top1([ref], [sub], 1, Tolerance(rtol=0.0, atol=2.4415e-4)).near_ties == 1


def test_integer_outputs_get_no_noise_allowance():
    """docs/verify.md: integer and bool outputs get no noise allowance (they are compared
    exactly), even where the tolerance has a noise factor and the second run moved."""
    ref, sub, again = [np.array([[0, 10]], np.int64)], [np.array([[0, 11]], np.int64)], [np.array([[0, 15]], np.int64)]
    got = compare_arrays(ref, sub, Tolerance(rtol=0.0, atol=0.0, noise_factor=4.0), 1, again)
    assert got.noise_max is None and got.noise_allowance == [] and got.elements_failing == 1 and not got.passed


def test_bfloat16_outputs_get_the_noise_allowance():
    ref = [np.array([[1.0, 2.0]], ml_dtypes.bfloat16)]
    sub = [np.array([[1.0, 2.25]], ml_dtypes.bfloat16)]
    again = [np.array([[1.0, 2.125]], ml_dtypes.bfloat16)]
    got = compare_arrays(ref, sub, Tolerance(rtol=0.0, atol=0.0, noise_factor=4.0), None, again)
    assert got.noise_max == 0.125 and got.noise_allowance == [0.5, 0.5] and got.passed


def test_noise_is_measured_over_finite_pairs_only():
    """docs/verify.md: max |d_c| and ||d_c|| over channel c's finite pairs: a second run that
    overflows where the reference is finite, or a NaN in both, lends no allowance."""
    ref = [np.array([[1.0, 2.0, np.nan, 4.0]], np.float32)]
    again = [np.array([[1.25, np.inf, np.nan, 4.0]], np.float32)]
    sub = [np.array([[1.0, 2.0, np.nan, 6.0]], np.float32)]  # 2.0 off: beyond 4 x 0.25
    got = compare_arrays(ref, sub, Tolerance(rtol=0.0, atol=0.0, channel_rtol=0.0, noise_factor=4.0), None, again)
    assert got.noise_max == 0.25 and got.noise_allowance == [1.0, 1.0]
    assert got.elements_failing == 1 and got.channels_failing == 1  # 2.0 > 4 x ||d|| = 1 as well


@pytest.mark.parametrize("again", [
    [np.array([1.0, 2.0], np.float32)],  # one run short
    [np.array([1.0, 2.0, 3.0], np.float32)] * 3,  # one run too many
    [np.array([1.0, 2.0], np.float32), np.array([3.0], np.float32)],  # another shape
], ids=["fewer-runs", "more-runs", "other-shape"])
def test_a_second_run_unlike_the_reference_is_no_noise_measurement(again):
    """A second run without the reference's runs and shapes measures nothing: no allowance."""
    ref = [np.array([1.0, 2.0, 3.0], np.float32), np.array([4.0], np.float32)]
    sub = [np.array([1.0, 2.5, 3.0], np.float32), np.array([4.0], np.float32)]
    got = compare_arrays(ref, sub, Tolerance(rtol=0.0, atol=0.0, noise_factor=4.0), None, again)
    assert got.noise_max is None and got.noise_allowance == [] and not got.passed


def test_channel_axes_and_runs_of_a_comparison():
    from bnfold.verification.compare import _run_index, channel_axis_of, pooled_channel_axis

    assert channel_axis_of((2, 3, 4)) == 1  # the default channel axis is 1
    assert [channel_axis_of((2, 3, 4), a) for a in (1, -1, -3, 3, -4, None)] == [1, 2, 0, None, None, None]
    assert channel_axis_of((5,)) is None  # rank 1: one channel
    assert pooled_channel_axis([(2, 3), (4, 3)], 1) == 1
    assert pooled_channel_axis([(2, 3), (2, 4)], 1) is None  # channel count changes between runs
    assert pooled_channel_axis([(2, 3), (2,)], 1) is None
    # element 5 of channel 1 in runs of shapes (1, 2, 3) and (2, 2, 3): run 1, index [0, 1, 2]
    assert _run_index(1, 5, [(1, 2, 3), (2, 2, 3)], 1) == [1, 0, 1, 2]
    assert _run_index(0, 4, [(2, 3)], None) == [0, 1, 1]


def test_run_index_of_a_channel_beyond_2_31_elements_per_run():
    """``max_abs_diff_index`` is exact however large a run: element 2^32 + 5 of channel 2 of a
    (1, 3, 2^20, 2^13) output (only its shape is needed) is at [run 0, 0, 2, 2^19, 5]."""
    from bnfold.verification.compare import _run_index

    assert _run_index(2, 2**32 + 5, [(1, 3, 2**20, 2**13)], 1) == [0, 0, 2, 2**19, 5]
    assert _run_index(0, 2**32 + 5, [(2**20, 2**13)], None) == [0, 2**19, 5]


def test_given_tolerances_override_the_defaults_the_documented_way():
    from bnfold.verification.compare import resolve_tolerance

    default = default_tolerance("float32")
    assert (default.rtol, default.atol, default.atol_scaled, default.channel_rtol, default.channel_atol,
            default.noise_factor) == (1e-4, 1e-5, True, 1e-3, 1e-6, 4.0)
    loose = resolve_tolerance("float32", 0.05, None, None)
    assert (loose.rtol, loose.channel_rtol) == (0.05, 0.05)  # the channel rtol follows a looser rtol
    assert resolve_tolerance("float32", 1e-6, None, None).channel_rtol == 1e-3  # and never tightens it
    given_atol = resolve_tolerance("float32", None, 0.5, None)
    assert (given_atol.atol, given_atol.atol_scaled, given_atol.channel_atol) == (0.5, False, 0.5)
    assert resolve_tolerance("float32", None, None, 0.2).channel_rtol == 0.2
    assert resolve_tolerance("float32", None, None, None, noise_factor=0.0).noise_factor == 0.0
    exact = resolve_tolerance("int64", None, None, None, noise_factor=9.0)
    assert (exact.rtol, exact.atol, exact.noise_factor) == (0.0, 0.0, 0.0)  # integers stay exact


@pytest.mark.parametrize("spec", ["images=1x3x224x224", "images:1x3x224x224", "images:1,3,224,224",
                                  "images:[1,3,224,224]", "images=[1, 3, 224, 224]", "images:1X3X224X224"])
def test_parse_shape_accepts_the_usual_conventions(spec):
    assert parse_shape(spec) == ("images", (1, 3, 224, 224))


def test_parse_shape_keeps_colons_in_names_and_refuses_symbols():
    assert parse_shape("input:0:1x3") == ("input:0", (1, 3))
    assert parse_shape("input:0=1x3") == ("input:0", (1, 3))
    for bad in ("images=1x3xHx224", "images", "images:", ":1x3", "images:0x3"):
        with pytest.raises(InputError, match="NAME:DIMS"):
            parse_shape(bad)


# --- command line -------------------------------------------------------------------------


def test_cli_pass_writes_the_versioned_json_report(conv_pair, tmp_path):
    original, candidate = conv_pair
    result = invoke("verify", original, candidate, "--providers", "cpu", "--seed", "3", "--json", tmp_path / "r.json")

    assert result.exit_code == EXIT_OK, result.output
    assert "PASS" in result.output
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["schema_version"] == REPORT_SCHEMA_VERSION and data["verdict"] == "PASS"
    assert data["tool_version"] == bnfold.__version__ and data["onnxruntime_version"] == ort.__version__
    assert data["providers"] == [CPU] and data["seed"] == 3
    assert data["inputs"] == [{"name": "x", "dtype": "float32", "shape": [2, 3, 8, 8], "range": None,
                               "range_source": "standard normal"}]
    comparison = data["comparisons"][0]
    assert comparison["passed"] is True and comparison["output"] == "y"
    assert set(comparison["difference"]) >= {
        "max_abs_diff", "max_abs_diff_index", "max_rel_diff", "mean_abs_diff", "cosine_similarity",
        "reference_nan", "reference_inf", "subject_nan", "subject_inf", "min_passing_atol", "min_passing_rtol",
    }


def test_cli_mismatch_exits_1_and_names_the_output(tmp_path, params, conv_pair):
    original, _ = conv_pair
    candidate = save(perturb_largest_weight(conv_bn_model(params, folded=True), "c_W"), tmp_path / "bad.onnx")

    result = invoke("verify", original, candidate, "--providers", "cpu", "--json", tmp_path / "r.json")

    assert result.exit_code == EXIT_CHECK_FAILED
    assert "FAIL: output 'y'" in result.output
    assert json.loads((tmp_path / "r.json").read_text())["verdict"] == "FAIL"


def test_cli_nan_in_one_model_only_fails_and_the_json_stays_strict(tmp_path):
    original = save(elementwise_model("Log"), tmp_path / "log.onnx")
    candidate = save(elementwise_model("Abs", "Log"), tmp_path / "log_abs.onnx")

    result = invoke("verify", original, candidate, "--providers", "cpu", "--json", tmp_path / "r.json")

    assert result.exit_code == EXIT_CHECK_FAILED
    text = (tmp_path / "r.json").read_text()
    difference = json.loads(text, parse_constant=pytest.fail)["comparisons"][0]["difference"]
    assert difference["reference_nan"] > 0 and difference["subject_nan"] == 0
    assert difference["nonfinite_mismatches"] == difference["reference_nan"]
    assert difference["min_passing_atol"] == difference["min_passing_rtol"] == "inf"


def test_cli_npz_with_a_wrong_key_exits_2(tmp_path, conv_pair):
    original, candidate = conv_pair
    np.savez(tmp_path / "inputs.npz", images=np.zeros((2, 3, 8, 8), np.float32))

    result = invoke("verify", original, candidate, "--inputs", tmp_path / "inputs.npz")

    assert result.exit_code == EXIT_BAD_INPUT
    assert "key 'images' is not an input" in result.output


@pytest.mark.parametrize(
    "arguments",
    [
        ["--providers", "tpu"],
        ["--shape", "x=2x3"],
        ["--samples", "0"],
        ["--rtol", "-1"],
    ],
)
def test_cli_bad_options_exit_2(conv_pair, arguments):
    assert invoke("verify", *conv_pair, *arguments).exit_code == EXIT_BAD_INPUT


def test_cli_missing_file_exits_2(conv_pair, tmp_path):
    result = invoke("verify", conv_pair[0], tmp_path / "absent.onnx")

    assert result.exit_code == EXIT_BAD_INPUT and "no such file" in result.output


def test_fold_verify_keeps_a_verified_output(tmp_path, params):
    original = save(conv_bn_model(params), tmp_path / "original.onnx")

    result = invoke("fold", original, "-o", tmp_path / "out.onnx", "--verify", "--providers", "cpu",
                    "--verify-json", tmp_path / "r.json")

    assert result.exit_code == EXIT_OK, result.output
    assert (tmp_path / "out.onnx").exists()
    assert json.loads((tmp_path / "r.json").read_text())["verdict"] == "PASS"


def test_fold_verify_failure_removes_the_output_unless_kept(tmp_path, params):
    original = save(conv_bn_model(params), tmp_path / "original.onnx")
    # Folding changes rounding, so zero tolerance (and no noise allowance) fails.
    strict = ["--verify", "--providers", "cpu", "--rtol", "0", "--atol", "0", "--noise-factor", "0"]

    removed = invoke("fold", original, "-o", tmp_path / "out.onnx", *strict)
    kept = invoke("fold", original, "-o", tmp_path / "kept.onnx", *strict, "--keep-on-failure")

    assert removed.exit_code == EXIT_CHECK_FAILED and not (tmp_path / "out.onnx").exists()
    assert kept.exit_code == EXIT_CHECK_FAILED and (tmp_path / "kept.onnx").exists()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["kept.onnx", "original.onnx"]


def test_fold_verify_refuses_in_place(tmp_path, params):
    original = save(conv_bn_model(params), tmp_path / "original.onnx")
    before = original.read_bytes()

    result = invoke("fold", original, "-o", original, "--in-place", "--verify")

    assert result.exit_code == EXIT_BAD_INPUT and original.read_bytes() == before


def test_fold_verify_failure_removes_external_data_but_not_the_originals(tmp_path, params):
    model = conv_bn_model(params)
    onnx.save(model, str(tmp_path / "original.onnx"), save_as_external_data=True, location="original.onnx.data",
              size_threshold=0)
    original_files = {path.name: path.read_bytes() for path in tmp_path.iterdir()}

    result = invoke("fold", tmp_path / "original.onnx", "-o", tmp_path / "out.onnx",
                    "--verify", "--providers", "cpu", "--rtol", "0", "--atol", "0", "--noise-factor", "0")

    assert result.exit_code == EXIT_CHECK_FAILED
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == original_files


def test_fold_verify_refuses_unusable_inputs_before_writing(tmp_path, params):
    original = save(conv_bn_model(params), tmp_path / "original.onnx")
    np.savez(tmp_path / "inputs.npz", images=np.zeros((2, 3, 8, 8), np.float32))

    result = invoke("fold", original, "-o", tmp_path / "out.onnx", "--verify", "--inputs", tmp_path / "inputs.npz")

    assert result.exit_code == EXIT_BAD_INPUT
    assert "key 'images' is not an input" in result.output and not (tmp_path / "out.onnx").exists()


@pytest.mark.skipif(CUDA_AVAILABLE, reason="CUDAExecutionProvider is available here, so it cannot be missing")
def test_fold_verify_error_removes_the_output_and_says_so(tmp_path, params):
    original = save(conv_bn_model(params), tmp_path / "original.onnx")

    result = invoke("fold", original, "-o", tmp_path / "out.onnx", "--verify", "--providers", "cuda")

    assert result.exit_code == EXIT_BAD_INPUT
    assert "removed" in result.output and not (tmp_path / "out.onnx").exists()


def test_cli_json_report_never_overwrites_a_model(conv_pair):
    original, candidate = conv_pair
    before = candidate.read_bytes()

    result = invoke("verify", original, candidate, "--json", candidate)

    assert result.exit_code == EXIT_BAD_INPUT and candidate.read_bytes() == before


def test_fold_verify_json_never_overwrites_the_input(tmp_path, params):
    original = save(conv_bn_model(params), tmp_path / "original.onnx")
    before = original.read_bytes()

    result = invoke("fold", original, "-o", tmp_path / "out.onnx", "--verify", "--verify-json", original)

    assert result.exit_code == EXIT_BAD_INPUT and original.read_bytes() == before
    assert not (tmp_path / "out.onnx").exists()
