"""The committed model zoo (models/): integrity, fold + verify, inspect, and torch parity.

Every test reads models/MANIFEST.json and is parametrised over its entries, so a model
added to the zoo is covered without touching this file. Reference runs use onnxruntime
with every graph optimisation disabled: ORT's own Conv+BN fusion would otherwise make
the original look folded and prove nothing.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

import bnfold
from bnfold.cli import app
from bnfold.ledger import REASONS
from bnfold.train import export as E
from bnfold.verification import verify

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
MANIFEST = json.loads((MODELS / "MANIFEST.json").read_text())
ENTRIES = MANIFEST["models"]
HEALTHY = [e for e in ENTRIES if e["health"] == "healthy"]
BROKEN = [e for e in ENTRIES if e["health"] != "healthy"]
LABELS = E.load_npz(MODELS / MANIFEST["dataset"]["labels"])["labels"]
RTOL, ATOL = 1e-4, 1e-5


def _id(entry: dict) -> str:
    return entry["name"]


def _feeds(entry: dict) -> dict[str, np.ndarray]:
    return E.load_npz(MODELS / entry["inputs"])


def _bn_count(path: Path) -> int:
    return sum(n.op_type == "BatchNormalization" for n in onnx.load(str(path)).graph.node)


def _label(le) -> str:
    return f"{le.node}: {le.reason} ({le.detail})"


def _assert_same_predictions(entry: dict, ref: np.ndarray, got: np.ndarray) -> None:
    """Outputs allclose and the task metric identical (accuracy, or MSE for the autoencoder)."""
    np.testing.assert_allclose(got, ref, rtol=RTOL, atol=ATOL)
    if entry["task"] == "classification":
        assert np.mean(ref.argmax(1) == LABELS) == np.mean(got.argmax(1) == LABELS)
        top2 = np.sort(ref, axis=1)[:, -2:]
        decided = (top2[:, 1] - top2[:, 0]) > 1e-4  # a near-tie may flip on rounding alone
        assert np.array_equal(ref.argmax(1)[decided], got.argmax(1)[decided])
    else:
        x = _feeds(entry)[entry["input_name"]]
        assert np.mean((got - x) ** 2) == pytest.approx(np.mean((ref - x) ** 2), rel=1e-5)


# --------------------------------------------------------------------------- the manifest


def test_manifest_covers_the_issue_matrix():
    archs = {e["architecture"] for e in ENTRIES}
    assert archs == {"mlp", "mlp-inputnorm", "cnn", "resnet", "autoencoder", "seq1d", "clip3d"}
    for arch in archs - {"mlp-inputnorm"}:  # every architecture through both exporters
        assert {e["exporter"] for e in HEALTHY if e["architecture"] == arch} == {"torchscript", "dynamo"}
    assert {13, 17} <= {e["opset"] for e in HEALTHY if e["exporter"] == "torchscript"}
    assert {17, 18} <= {e["opset"] for e in HEALTHY if e["exporter"] == "dynamo"}
    assert {e["health"] for e in BROKEN} == {"training-mode", "untrained-stats", "zero-variance"}
    assert all(e["input_shape"][0] == "batch" and e["output_shape"][0] == "batch" for e in ENTRIES)
    default = next(e for e in ENTRIES if e["file"] == MANIFEST["default_model"])
    assert default["health"] == "healthy" and default["architecture"] == "cnn"


def test_models_folder_is_small_and_fully_listed():
    listed = {e["file"] for e in ENTRIES} | {e["inputs"] for e in ENTRIES}
    listed |= {MANIFEST["dataset"]["labels"], "MANIFEST.json"}
    on_disk = {p.name for p in MODELS.iterdir() if p.is_file()}
    assert {n for n in on_disk if n.endswith((".onnx", ".npz"))} <= listed, "unlisted files in models/"
    assert listed <= on_disk, "manifest lists missing files"
    assert sum((MODELS / n).stat().st_size for n in on_disk) < 5 * 1024 * 1024
    assert len(LABELS) == MANIFEST["dataset"]["test_samples"]


@pytest.mark.parametrize("entry", ENTRIES, ids=_id)
def test_file_matches_manifest(entry):
    path = MODELS / entry["file"]
    assert E.sha256(path) == entry["sha256"]
    assert E.sha256(MODELS / entry["inputs"]) == entry["inputs_sha256"]
    onnx.checker.check_model(str(path), full_check=True)
    info = E.describe(path)
    assert info["opset"] == entry["opset"] and info["bn_count"] == entry["bn_count"]
    assert info["bn_training_mode_attr"] == entry["emitted"]["bn_training_mode_attr"]
    assert info["bn_with_extra_outputs"] == entry["emitted"]["bn_with_extra_outputs"]
    feeds = _feeds(entry)
    assert list(feeds) == [entry["input_name"]] == list(info["inputs"])
    assert feeds[entry["input_name"]].shape[1:] == tuple(entry["input_shape"][1:])
    # the recorded accuracy is what the file computes on its inputs
    (out,) = E.run_onnx(path, feeds)
    if entry["task"] == "classification":
        assert np.mean(out.argmax(1) == LABELS) == pytest.approx(entry["test_accuracy"], abs=1e-6)
    else:
        x = feeds[entry["input_name"]]
        assert np.mean((out - x) ** 2) == pytest.approx(entry["test_mse"], abs=1e-6)


def test_exporters_emit_what_the_manifest_says():
    by_name = {e["name"]: e for e in ENTRIES}
    for e in HEALTHY:
        # eval-mode exports: one inference BN per module, no training form (except optimize=True: none)
        expected = 0 if e["export_options"].get("optimize") else e["bn_modules"]
        assert e["bn_count"] == expected, e["name"]
        assert e["emitted"]["bn_training_mode_attr"] == e["emitted"]["bn_with_extra_outputs"] == 0
    assert by_name["cnn-trainmode_ts13"]["emitted"]["bn_with_extra_outputs"] == 5  # opset 13: 5 outputs
    assert by_name["cnn-trainmode_ts17"]["emitted"]["bn_training_mode_attr"] == 5  # opset 17: training_mode=1


# --------------------------------------------------------------------------- fold + verify


@pytest.mark.parametrize("entry", ENTRIES, ids=_id)
def test_fold_and_verify(entry, tmp_path):
    src = MODELS / entry["file"]
    result = bnfold.fold(src)
    out = tmp_path / "folded.onnx"
    result.save(out)

    ledger = result.ledger.batch_norms
    assert len(ledger) == entry["bn_count"], "the ledger must account for every BN"
    kept = [le for le in ledger if le.status != "folded"]
    for le in kept:
        assert le.status == "kept" and le.reason in REASONS, _label(le)
    assert _bn_count(out) == len(kept)
    # The manifest's claim is checked both ways: all folded exactly when it says so.
    assert (not kept) == entry["expect_all_folded"], "kept: " + "; ".join(_label(le) for le in kept)
    if entry["health"] == "training-mode":
        assert [le.reason for le in kept] == ["training-mode"] * entry["bn_count"]

    report = verify(src, out, inputs=MODELS / entry["inputs"], rtol=RTOL, atol=ATOL, providers="cpu")
    assert report.passed, report.summary()

    feeds = _feeds(entry)
    (ref,) = E.run_onnx(src, feeds)
    (got,) = E.run_onnx(out, feeds)
    _assert_same_predictions(entry, ref, got)


# --------------------------------------------------------------------------- inspect


@pytest.mark.parametrize("entry", ENTRIES, ids=_id)
def test_inspect_cli(entry, tmp_path):
    report = tmp_path / "inspect.json"
    result = CliRunner().invoke(app, ["inspect", str(MODELS / entry["file"]), "--json", str(report), "-q"])
    findings = json.loads(report.read_text())["findings"]
    flagged = {f["bn"]: f["problems"] for f in findings if f["problems"]}
    assert result.exit_code == (0 if entry["health"] == "healthy" else 1), f"flagged: {flagged}"
    got = Counter(tuple(sorted(f["problems"])) for f in findings)
    want = Counter(tuple(p) for p in entry["expected_bn_problems"])
    assert got == want, f"inspect found {dict(got)}, the torch module state says {dict(want)}"
    for problem in entry["expected_problems"]:
        assert any(problem in f["problems"] for f in findings)


# --------------------------------------------------------------------------- torch parity


ARCH_JOBS = ["mlp", "mlp-inputnorm", "cnn", "resnet", "autoencoder", "seq1d", "clip3d"]


@pytest.mark.train
@pytest.mark.parametrize("job_name", ARCH_JOBS)
def test_folded_onnx_matches_torch_eval(job_name, tmp_path):
    """Train one epoch, export (TorchScript 13; the CNN also dynamo 18), fold: the folded
    ONNX in ORT must reproduce the torch module in eval mode on the real test digits."""
    torch = pytest.importorskip("torch", reason="needs the [train] extra (torch)")
    from bnfold.train import data as D
    from bnfold.train.fit import predict
    from bnfold.train.zoo import JOBS_BY_NAME, train_job

    job = JOBS_BY_NAME[job_name]
    digits = D.load_digits_split()
    net = train_job(job, digits, epochs=1)
    x = D.as_layout(digits.x_test, net.INPUT_LAYOUT)
    expected = predict(net, x)
    example = torch.from_numpy(D.as_layout(digits.x_train[:4], net.INPUT_LAYOUT))
    exports = [("torchscript", 13)] + ([("dynamo", 18)] if job_name == "cnn" else [])
    for exporter, opset in exports:
        src = tmp_path / f"{exporter}.onnx"
        E.export(net, example, src, exporter=exporter, opset=opset)
        result = bnfold.fold(src)
        out = tmp_path / f"{exporter}.folded.onnx"
        result.save(out)
        assert _bn_count(out) == sum(le.status != "folded" for le in result.ledger.batch_norms)
        (got,) = E.run_onnx(out, {"input": x})
        np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL)
        if net.TASK == "classification":
            assert np.mean(got.argmax(1) == digits.y_test) == np.mean(expected.argmax(1) == digits.y_test)
        else:
            assert np.mean((got - x) ** 2) == pytest.approx(np.mean((expected - x) ** 2), rel=1e-5)
