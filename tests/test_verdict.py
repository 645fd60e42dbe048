"""One verdict everywhere: the exit code, the JUnit report, the JSON report and the
summary line of a run agree, because all four read one ``bnfold.verdict.Verdict``.

Checked on every model of the zoo (models/*.onnx) and of the exporter corpus
(tests/corpus.py): ``fold`` plain, ``--strict``, ``--to-inference --strict`` and
``--verify`` (with the default tolerances, and with zero tolerances, which a fold's
rounding fails), ``inspect``, batch mode (``--out-dir``) over each whole set, ``verify``
and ``recalibrate``. Besides agreeing, each verdict is what the documentation says: a
plain fold exits 0, ``--strict`` fails exactly on a BN kept or still not inference-ready
(read here from the ledger's own entries), a problem ``--to-inference`` repaired does
not count, and a verify mismatch fails the fold.
"""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from cli_runner import invoke

ROOT = Path(__file__).resolve().parent.parent
ZOO = sorted((ROOT / "models").glob("*.onnx"))
ZERO_TOLERANCE = ("--rtol", "0", "--atol", "0", "--channel-rtol", "0")


def junit_counts(path: Path) -> dict:
    """Failures and errors of a JUnit file, checked to add up as CI servers count them."""
    root = ET.parse(path).getroot()
    suites = root.findall("testsuite")
    cases = [case for suite in suites for case in suite.findall("testcase")]
    for element, members in [(root, cases), *((s, s.findall("testcase")) for s in suites)]:
        assert int(element.get("tests")) == len(members)
        for kind in ("failure", "error", "skipped"):
            assert int(element.get(f"{kind}s" if kind != "skipped" else kind)) == \
                sum(c.find(kind) is not None for c in members), kind
    return {
        "failures": [(s.get("name"), c.get("classname"), c.get("name")) for s in suites
                     for c in s.findall("testcase") if c.find("failure") is not None],
        "errors": sum(c.find("error") is not None for c in cases),
        "suites": suites,
    }


def fail_lines(result) -> list[str]:
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("bnfold: FAIL: ")]


def assert_agree(result, report: dict, junit: Path, *, several: bool = False) -> None:
    """Exit code, JSON (``verdict``, ``exit_code``, ``failures``), JUnit and summary lines agree."""
    code = result.exit_code
    counts = junit_counts(junit)
    assert report["exit_code"] == code, (report["exit_code"], code, result.output)
    assert report["verdict"] == {0: "PASS", 1: "FAIL"}.get(code, "ERROR")
    assert (counts["errors"] > 0) == (code >= 2)
    if code < 2:
        assert bool(counts["failures"]) == (code == 1), (counts["failures"], code)
    models = report["models"] if several else [report]
    assert sum(len(m["failures"]) for m in models) == len(counts["failures"])
    for model, suite in zip(models, counts["suites"]):
        failing = [c for c in suite.findall("testcase") if c.find("failure") is not None]
        assert [(f["check"], f["name"]) for f in model["failures"]] == [(c.get("classname"), c.get("name"))
                                                                         for c in failing]
        assert model["exit_code"] == (1 if failing else 0) or "error" in model
    failed_models = sum(m["verdict"] == "FAIL" for m in models)
    assert len(fail_lines(result)) == failed_models, result.output
    if code == 0:
        assert "FAIL" not in result.output


def strict_should_fail(ledger: dict) -> bool:
    """docs: --strict fails on a BN kept or not inference-ready; a training-mode BN that
    --to-inference converted is repaired."""
    def open_problems(e):
        return [p for p in e["problems"] if not (p == "training-mode" and e["converted_from_training"])]

    return any(e["op"] == "BatchNormalization" and (e["status"] == "kept" or open_problems(e))
               for e in ledger["entries"])


def check_model(model: Path, tmp_path: Path, verify_failing: bool, plain: bool = True) -> None:
    """fold (plain; --strict; --to-inference --strict; --verify, which runs without
    --strict) and inspect on one model; ``plain=False`` leaves out the plain fold."""
    out, report, junit = tmp_path / "out.onnx", tmp_path / "r.json", tmp_path / "r.xml"

    def fold(*options, quiet=False):
        result = invoke("fold", model, "-o", out, "--json", report, "--junit", junit, *options, *(["-q"] * quiet))
        assert result.exit_code in (0, 1), result.output
        data = json.loads(report.read_text())
        assert_agree(result, data, junit)
        return result, data

    if plain:
        result, _ = fold()
        assert result.exit_code == 0  # without --strict or --verify nothing fails a fold that worked
    result, strict = fold("--strict", quiet=True)
    assert (result.exit_code == 1) == strict_should_fail(strict)
    result, converted = fold("--strict", "--to-inference")
    assert (result.exit_code == 1) == strict_should_fail(converted)
    if any(e["converted_from_training"] for e in converted["entries"]):
        assert converted["exit_code"] <= strict["exit_code"]

    tolerance = ZERO_TOLERANCE if verify_failing else ()
    result, verified = fold("--verify", "--providers", "cpu", "--verify-json", tmp_path / "v.json", *tolerance,
                            quiet=verify_failing)
    verify_report = json.loads((tmp_path / "v.json").read_text())
    assert (result.exit_code == 1) == (verify_report["verdict"] == "FAIL")
    assert out.exists() == (result.exit_code == 0)  # a failed verification removes OUT

    result = invoke("inspect", model, "--json", report, "--junit", junit)
    assert_agree(result, json.loads(report.read_text()), junit)


def check_batch(models: list[Path], tmp_path: Path, options_sets=((), ("--strict",), ("--strict", "--to-inference"),
                                                                 ("-q", "--strict"))) -> None:
    """Batch mode over a folder of copies: with and without --strict and --to-inference;
    one model made unusable shows an error (exit 2) without hiding the others' verdicts."""
    folder = tmp_path / "in"
    folder.mkdir()
    for model in models:
        shutil.copy(model, folder / model.name)
    report, junit = tmp_path / "all.json", tmp_path / "all.xml"
    for options in options_sets:
        result = invoke("fold", folder, "--out-dir", tmp_path / "out", "--json", report, "--junit", junit, *options)
        data = json.loads(report.read_text())
        assert_agree(result, data, junit, several=True)
        for entry in data["models"]:
            assert entry["exit_code"] == int("--strict" in options and strict_should_fail(entry))
    result = invoke("inspect", folder, "--json", report, "--junit", junit)
    assert_agree(result, json.loads(report.read_text()), junit, several=True)
    (folder / "zz-broken.onnx").write_bytes(b"not a model")
    result = invoke("fold", folder, "--out-dir", tmp_path / "out", "--json", report, "--junit", junit, "--strict")
    assert result.exit_code == 2
    assert_agree(result, json.loads(report.read_text()), junit, several=True)


# --- the zoo ---------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ZOO, ids=[m.stem for m in ZOO])
def test_the_zoo_agrees(model, tmp_path):
    check_model(model, tmp_path, verify_failing=ZOO.index(model) % 2 == 1)


def test_the_zoo_in_batch_mode_agrees(tmp_path):
    check_batch(ZOO, tmp_path)


def test_training_mode_bns_that_to_inference_converted_do_not_count(tmp_path):
    """The issue's case: 5 training-mode BNs, every one converted and folded: --strict
    passes, the JUnit has no failure, and no warning says the output is not ready."""
    model = ROOT / "models" / "cnn-trainmode_ts13.onnx"
    report, junit = tmp_path / "r.json", tmp_path / "r.xml"
    result = invoke("fold", model, "-o", tmp_path / "o.onnx", "--to-inference", "--strict", "--json", report,
                    "--junit", junit)
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert data["summary"]["folded"] == 5 and data["failures"] == [] and data["verdict"] == "PASS"
    assert all(e["problems"] == ["training-mode"] for e in data["entries"])  # the input's problems stay reported
    assert junit_counts(junit)["failures"] == []
    assert "not inference-ready" not in result.stdout and "converted to inference form" in result.stdout
    # without --to-inference the same model is kept: a warning, exit 0, JUnit skipped, not failed
    result = invoke("fold", model, "-o", tmp_path / "o.onnx", "--junit", junit)
    assert result.exit_code == 0 and "not inference-ready" in result.stdout
    root = ET.parse(junit).getroot()
    assert (root.get("failures"), root.get("skipped")) == ("0", "5")
    # with --strict it fails, and says why once: kept for training mode (not also "not ready" for it)
    result = invoke("fold", model, "-o", tmp_path / "o.onnx", "--strict", "-q", "--junit", junit)
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [f"bnfold: FAIL: --strict: 5 of 5 BatchNormalization kept (training-mode) "
                                          f"({tmp_path / 'o.onnx'} was written)"]
    messages = {f.get("message") for f in ET.parse(junit).getroot().iter("failure")}
    assert messages == {"kept: training-mode"}


def test_a_verify_mismatch_is_a_junit_failure(tmp_path):
    """The issue's case: fold --verify exits 1 on a mismatch; the JUnit and JSON say so."""
    model = ROOT / "models" / "cnn_ts13.onnx"
    report, junit = tmp_path / "r.json", tmp_path / "r.xml"
    result = invoke("fold", model, "-o", tmp_path / "o.onnx", "--verify", "--providers", "cpu", *ZERO_TOLERANCE,
                    "--json", report, "--junit", junit)
    assert result.exit_code == 1
    failures = junit_counts(junit)["failures"]
    assert failures and all(check.startswith("bnfold.verify.") for _, check, _ in failures)
    data = json.loads(report.read_text())
    assert data["verdict"] == "FAIL" and data["exit_code"] == 1 and not (tmp_path / "o.onnx").exists()
    (line,) = fail_lines(result)
    assert line.startswith("bnfold: FAIL: verify: output 'logits'") and "was removed" in line


def test_verify_and_recalibrate_agree(tmp_path):
    model = ROOT / "models" / "cnn_ts13.onnx"
    folded = tmp_path / "f.onnx"
    assert invoke("fold", model, "-o", folded, "-q").exit_code == 0
    report, junit = tmp_path / "r.json", tmp_path / "r.xml"
    for tolerance, quiet in [((), ()), (ZERO_TOLERANCE, ("-q",))]:
        result = invoke("verify", model, folded, "--providers", "cpu", "--json", report, "--junit", junit, *tolerance,
                        *quiet)
        data = json.loads(report.read_text())
        assert result.exit_code == (1 if tolerance else 0)
        assert data["exit_code"] == result.exit_code and data["verdict"] == ("FAIL" if tolerance else "PASS")
        counts = junit_counts(junit)
        assert bool(counts["failures"]) == bool(tolerance) and len(counts["failures"]) == len(data["failures"])
        if quiet:
            assert len(fail_lines(result)) == 1
    nostats = ROOT / "models" / "cnn-nostats_ts17.onnx"
    result = invoke("recalibrate", nostats, "--data", ROOT / "models" / "cnn-nostats_ts17.npz", "-o",
                    tmp_path / "re.onnx", "--json", report, "--junit", junit, "--samples", "16")
    assert result.exit_code == 0, result.output
    assert_agree(result, json.loads(report.read_text()), junit)
    assert len(ET.parse(junit).getroot().findall("testsuite/testcase")) == 5


# --- the exporter corpus -----------------------------------------------------------------------


def _corpus_ids():
    try:
        import corpus as C
    except ImportError:  # pragma: no cover
        return []
    return C.ALL_IDS


def _exported(corpus, model_id):
    import corpus as C

    try:
        return corpus.path(model_id)
    except C.ExportError as exc:
        pytest.skip(str(exc))


@pytest.mark.train
@pytest.mark.parametrize("model_id", _corpus_ids())
def test_the_corpus_agrees(corpus, model_id, tmp_path):
    pytest.importorskip("torch")
    # the plain fold is left out here: the zoo has it, and --verify runs without --strict
    check_model(_exported(corpus, model_id), tmp_path, verify_failing=_corpus_ids().index(model_id) % 2 == 1,
                plain=False)


@pytest.mark.train
def test_the_corpus_in_batch_mode_agrees(corpus, tmp_path):
    pytest.importorskip("torch")
    import corpus as C

    models = []
    for model_id in C.ALL_IDS:
        try:
            models.append(corpus.path(model_id))
        except C.ExportError:
            continue
    check_batch(models, tmp_path, options_sets=[("-q",), ("--strict", "--to-inference")])


def test_every_report_command_writes_json_to_stdout(tmp_path):
    """README: fold, inspect, verify and recalibrate take `--json -` (the human output goes to stderr)."""
    model = ROOT / "models" / "cnn_ts13.onnx"
    assert invoke("fold", model, "-o", tmp_path / "f.onnx", "-q").exit_code == 0
    runs = {"fold": ["fold", model, "-o", tmp_path / "o.onnx"], "inspect": ["inspect", model],
            "verify": ["verify", model, tmp_path / "f.onnx", "--providers", "cpu"],
            "recalibrate": ["recalibrate", model, "--data", ROOT / "models" / "cnn_ts13.npz", "-o", tmp_path / "r.onnx",
                            "--samples", "8"]}
    for command, args in runs.items():
        result = invoke(*args, "--json", "-")
        assert result.exit_code == 0, (command, result.output)
        data = json.loads(result.stdout)
        assert (data["verdict"], data["exit_code"], data["failures"]) == ("PASS", 0, []), command
