"""Verify folds on CUDA in one command: ``bash bench/gpu_check.sh OUTDIR``.

On a machine with onnxruntime-gpu and a CUDA device, folds and verifies on CUDA (``bnfold
fold --verify --providers cuda``, exactly what a user runs):

- every bundled model (``models/*.onnx``, fed its own ``models/NAME.npz``; training-mode
  BNs converted with ``--to-inference`` and verified against the inference-mode reference);
- a few exporter-corpus models (``tests/corpus.py`` builds them: Keras/tf2onnx graphs
  always, torch-exported ones where torch is installed, timm ones where timm is too).

For each model it writes ``OUTDIR/NAME.verify.json`` (the verify report) and
``OUTDIR/NAME.ledger.json``; ``OUTDIR/summary.json`` lists every model's outcome. A model
counts as verified on CUDA only if its report passed and lists ``CUDAExecutionProvider``
among the providers its runs used (``--providers cuda`` makes bnfold exit 2 when
onnxruntime cannot run it on CUDA or silently falls back to CPU; the report's
``providers`` says what actually ran).

Exit codes: 0 every model passed on CUDA; 1 a verification failed (a mismatch on CUDA
or CPU); 2 a model could not be folded or verified, a report does not show CUDA, or bad
usage; 77 no usable CUDA on this machine (onnxruntime-gpu missing, no device, or its
libraries fail to load): one line says why, nothing else runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CUDA = "CUDAExecutionProvider"
EXIT_OK, EXIT_FAILED, EXIT_ERROR, EXIT_NO_CUDA = 0, 1, 2, 77
#: Exporter-corpus models (tests/corpus.py ids): what each needs beyond onnx.
CORPUS = {
    "onnx.keras_bn_dense-onnx": None,
    "onnx.tf2onnx_dense_bn-onnx": None,
    "onnx.nhwc_conv_mul_add-onnx": None,
    "torch.const_first_matmul_bn-dynamo": "torch",
    "torch.linear_btf_bn1-ts": "torch",
    "timm.resnet10t-ts": "timm",
    "timm.mobilenetv3-dynamo": "timm",
}


@dataclass
class Outcome:
    model: str
    status: str  # "PASS", "FAIL", "ERROR", "SKIPPED"
    providers: list[str]
    detail: str


def bnfold(*args, env=None) -> subprocess.CompletedProcess:
    """``python -m bnfold ARGS`` with this checkout's bnfold first on the path."""
    environment = {**os.environ, **(env or {})}
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), environment.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "bnfold", *map(str, args)], capture_output=True, text=True,
                          env=environment)


def cuda_problem(provider: str = CUDA) -> str | None:
    """Why ``provider`` cannot run here (None: it can): ``bnfold verify --providers`` on a
    one-node model, which exits 2 with onnxruntime's reason when the provider is missing or
    onnxruntime falls back to CPU."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph([helper.make_node("Mul", ["x", "k"], ["y"])], "probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
                              [numpy_helper.from_array(np.full(4, 2, np.float32), "k")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    with tempfile.TemporaryDirectory(prefix="bnfold-gpu-check-") as folder:
        path = Path(folder) / "probe.onnx"
        onnx.save(model, path)
        name = "cuda" if provider == CUDA else "cpu"
        result = bnfold("verify", path, path, "--providers", name, "--json", Path(folder) / "probe.json", "-q")
        if result.returncode == 0:
            used = json.loads((Path(folder) / "probe.json").read_text())["providers"]
            return None if provider in used else f"verify ran on {', '.join(used)}, not {provider}"
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    return (lines[-1] if lines else f"bnfold exited {result.returncode}").removeprefix("bnfold: error: ")


def check_model(name: str, model: Path, out: Path, provider: str, inputs: Path | None = None) -> Outcome:
    """``bnfold fold MODEL --verify --providers P`` with its reports in ``out``."""
    report, ledger = out / f"{name}.verify.json", out / f"{name}.ledger.json"
    (out / "folded").mkdir(parents=True, exist_ok=True)
    args = ["fold", model, "-o", out / "folded" / f"{name}.onnx", "--json", ledger, "-q", "--to-inference",
            "--verify", "--providers", "cuda" if provider == CUDA else "cpu", "--verify-json", report]
    if inputs is not None:
        args += ["--inputs", inputs]
    result = bnfold(*args)
    message = " ".join(line for line in result.stderr.splitlines() if line.strip())
    if result.returncode not in (0, 1) or not report.exists():
        return Outcome(name, "ERROR", [], message or f"bnfold exited {result.returncode}")
    data = json.loads(report.read_text())
    used = data["providers"]
    if provider not in used:
        return Outcome(name, "ERROR", used, f"the report shows runs on {', '.join(used)}, not {provider}")
    if result.returncode != 0 or data["verdict"] != "PASS":
        return Outcome(name, "FAIL", used, message or "verification failed")
    return Outcome(name, "PASS", used, _numbers(data))


def _numbers(data: dict) -> str:
    worst = max((c["difference"]["max_channel_rel_diff"] for c in data["comparisons"] if c["difference"]), default=0)
    within = sum(c["difference"]["elements_within_noise"] for c in data["comparisons"] if c["difference"])
    return f"max channel rel diff {worst:.3g}" + (f", {within} element(s) within the noise floor" if within else "")


def bundled_models() -> list[tuple[str, Path, Path | None]]:
    return [(path.stem, path, path.with_suffix(".npz") if path.with_suffix(".npz").exists() else None)
            for path in sorted((ROOT / "models").glob("*.onnx"))]


def corpus_models(folder: Path) -> tuple[list[tuple[str, Path, None]], list[Outcome]]:
    """The CORPUS models this machine can export, and a SKIPPED outcome for the others."""
    sys.path.insert(0, str(ROOT / "tests"))
    import importlib.util

    import corpus as C

    exported, skipped = [], []
    corpus = C.Corpus(folder)
    for model_id, needs in CORPUS.items():
        if needs and importlib.util.find_spec(needs) is None:
            skipped.append(Outcome(model_id, "SKIPPED", [], f"needs {needs}, which is not installed"))
            continue
        try:
            exported.append((model_id, corpus.path(model_id), None))
        except C.ExportError as error:
            skipped.append(Outcome(model_id, "SKIPPED", [], str(error)))
    return exported, skipped


def run(out: Path, provider: str = CUDA, models=None, corpus: bool = True) -> int:
    """Check ``models`` (default: the bundled ones) and the corpus on ``provider``; write the
    reports and summary.json into ``out``; print one line per model; return the exit code."""
    out.mkdir(parents=True, exist_ok=True)
    outcomes: list[Outcome] = []
    todo = list(bundled_models() if models is None else models)
    if corpus:
        exported, skipped = corpus_models(out / "corpus")
        todo += exported
        outcomes += skipped
    for name, path, inputs in todo:
        outcome = check_model(name, path, out, provider, inputs)
        print(f"{outcome.model}  {outcome.status}  {','.join(outcome.providers) or '-'}  {outcome.detail}", flush=True)
        outcomes.append(outcome)
    for outcome in outcomes:
        if outcome.status == "SKIPPED":
            print(f"{outcome.model}  SKIPPED  -  {outcome.detail}")
    statuses = [o.status for o in outcomes]
    code = EXIT_ERROR if "ERROR" in statuses else EXIT_FAILED if "FAIL" in statuses else EXIT_OK
    (out / "summary.json").write_text(json.dumps(
        {"provider": provider, "exit_code": code, "models": [asdict(o) for o in outcomes]}, indent=2) + "\n")
    counts = {status: statuses.count(status) for status in ("PASS", "FAIL", "ERROR", "SKIPPED") if status in statuses}
    print(f"gpu_check: {', '.join(f'{n} {s}' for s, n in counts.items())} on {provider}; reports in {out}")
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="exit: 0 all passed on CUDA, 1 a verification failed, 2 a model could "
                                            "not be checked or did not run on CUDA, 77 no usable CUDA here")
    parser.add_argument("out", type=Path, help="folder for the JSON reports (created)")
    parser.add_argument("--no-corpus", action="store_true", help="only the bundled models")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return EXIT_ERROR if exit_.code else EXIT_OK
    problem = cuda_problem()
    if problem is not None:
        print(f"gpu_check: no usable CUDA here, nothing verified: {problem}")
        return EXIT_NO_CUDA
    return run(args.out, corpus=not args.no_corpus)


if __name__ == "__main__":
    sys.exit(main())
