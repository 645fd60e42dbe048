"""The figures of docs/recalibrate.md: ``python bench/recalibrate.py`` (about 15 s on 2 cores).

Every accuracy is on the zoo's 360 test digits (models/*.npz, labels in
models/digits_test_labels.npz); recalibration data is the digits TRAIN split
(``bnfold.train.data.load_digits_split``), unlabelled. Needs numpy, scikit-learn and
onnxruntime; not torch.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bnfold.recalibration import recalibrate  # noqa: E402
from bnfold.train.data import as_layout, load_digits_split  # noqa: E402

MODELS = ROOT / "models"
LABELS = np.load(MODELS / "digits_test_labels.npz")["labels"]
SEEDS = range(5)

#: Input shifts for test-time adaptation, on pixels in [0, 1].
SHIFTS = {
    "low contrast (0.5 + 0.3 (x - 0.5))": lambda x: 0.5 + 0.3 * (x - 0.5),
    "brighter (x + 0.5)": lambda x: x + 0.5,
    "noise (x + N(0, 0.3))": lambda x: x + np.random.default_rng(1).normal(0, 0.3, x.shape).astype(np.float32),
    "inverted (1 - x)": lambda x: 1 - x,
}


def accuracy(model, inputs: np.ndarray) -> float:
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    options = ort.SessionOptions()
    options.log_severity_level = 3  # the one-pass model leaves the old statistics unused
    session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    return float((session.run(None, {"input": inputs})[0].argmax(1) == LABELS).mean())


def one_pass(path: Path, train: np.ndarray) -> onnx.ModelProto:
    """The wrong way, for comparison: every BN's statistics from ONE pass over the original
    graph, so deeper BNs see activations normalised with the stale upstream statistics."""
    model = onnx.load(path)
    bns = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    exposed.graph.output.extend(onnx.ValueInfoProto(name=n.input[0]) for n in bns)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(exposed.SerializeToString(), options, providers=["CPUExecutionProvider"])
    activations = session.run([n.input[0] for n in bns], {"input": train})
    for index, (node, activation) in enumerate(zip(bns, activations)):
        axes = (0, *range(2, activation.ndim))
        for slot, array in ((3, activation.mean(axis=axes, dtype=np.float64)),
                            (4, activation.astype(np.float64).var(axis=axes))):
            name = f"one_pass_{index}_{slot}"
            model.graph.initializer.append(numpy_helper.from_array(array.astype(np.float32), name))
            node.input[slot] = name
    return model


def main() -> None:
    digits = load_digits_split()
    train, test = as_layout(digits.x_train, "image"), as_layout(digits.x_test, "image")
    rows = []

    def row(what: str, before: float, after: float, seconds: float | None = None, note: str = "") -> None:
        timing = f"{seconds:.2f}" if seconds is not None else ""
        rows.append(f"| {what} | {before:.1%} | {after:.1%} | {timing} | {note} |")

    nostats = MODELS / "cnn-nostats_ts17.onnx"
    started = time.perf_counter()
    result = recalibrate(nostats, {"input": train})
    seconds = time.perf_counter() - started
    row("cnn-nostats_ts17, full train split (1437)", accuracy(nostats, test), accuracy(result.to_proto(), test),
        seconds, f"{result.passes} passes")
    row("cnn-nostats_ts17, one pass over the original graph (wrong)", accuracy(nostats, test),
        accuracy(one_pass(nostats, train), test), None, "stale upstream statistics")
    scores = [accuracy(recalibrate(nostats, {"input": train}, samples=64, seed=s).to_proto(), test) for s in SEEDS]
    row("cnn-nostats_ts17, 64 samples (mean of 5 seeds)", accuracy(nostats, test), float(np.mean(scores)), None,
        f"min {min(scores):.1%}, max {max(scores):.1%}")
    for name in ("cnn-trainmode_ts13", "cnn-trainmode_ts17", "cnn_ts13", "resnet_ts13"):
        path = MODELS / f"{name}.onnx"
        started = time.perf_counter()
        result = recalibrate(path, {"input": train})
        seconds = time.perf_counter() - started
        converted = sum(e.converted_from_training for e in result.report)
        note = f"{converted} BN converted to inference form" if converted else "healthy model"
        if converted:  # a training-mode model scores chance level one digit at a time
            single = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            before = float(np.mean([single.run(None, {"input": test[i:i + 1]})[0].argmax() == LABELS[i]
                                    for i in range(len(test))]))
            note += f"; before is batch 1 ({accuracy(path, test):.1%} on the whole test batch)"
        else:
            before = accuracy(path, test)
        row(f"{name}, full train split", before, accuracy(result.to_proto(), test), seconds, note)
    trained = MODELS / "cnn_ts13.onnx"
    for what, shift in SHIFTS.items():
        shifted_test = shift(test).astype(np.float32)
        shifted_train = {"input": shift(train).astype(np.float32)}
        scores = [accuracy(recalibrate(trained, shifted_train, samples=32, seed=s).to_proto(), shifted_test)
                  for s in SEEDS]
        row(f"cnn_ts13 on {what}, 32 shifted train images (mean of 5 seeds)", accuracy(trained, shifted_test),
            float(np.mean(scores)), None, f"min {min(scores):.1%}, max {max(scores):.1%}")
    print("| case | before | after | recalibrate s | note |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
