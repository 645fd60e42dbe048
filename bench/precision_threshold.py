"""Where does a fold's range spread start to cost int8 accuracy? ``python bench/precision_threshold.py``

The measurement behind ``precision.SPREAD_THRESHOLD`` (docs/precision.md). For every
weight bnfold folds in the digits-trained models (the zoo's classifiers, and
``bnfold.train.hazards``' depthwise stacks at three learning rates and two seeds, and its
tiny-variance and dead-channel nets), it takes the folded model and quantises that one
weight with symmetric int8 (QuantizeLinear/DequantizeLinear's arithmetic: step
max|w| / 127, round half to even), once per tensor and once per output channel, and
measures the test accuracy on the 360 held-out digits in onnxruntime. Needs the train
extra (torch) for the hazard models; writes bench/results/precision-threshold.md/.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ZOO = ["cnn_ts13", "resnet_ts13", "mlp_ts13", "mlp-inputnorm_ts13", "seq1d_ts13", "clip3d_ts13",
       "mlp-deadpixel_dynamo18"]
DEPTHWISE = [(lr, seed) for lr in (3e-3, 1e-2, 2e-2, 3e-2) for seed in (0, 1, 2)]


def quantised(weight: np.ndarray, axis: int | None) -> np.ndarray:
    """Symmetric int8 quantise-dequantise, per tensor (axis None) or per slice along ``axis``."""
    w = weight.astype(np.float32)
    if axis is None:
        peak = np.float32(np.abs(w).max())
    else:
        peak = np.abs(w).max(axis=tuple(a for a in range(w.ndim) if a != axis), keepdims=True).astype(np.float32)
    step = np.where(peak > 0, peak / np.float32(127), np.float32(1))
    return (np.clip(np.rint(w / step), -127, 127) * step).astype(np.float32)


def accuracy(proto, feeds: dict, labels: np.ndarray) -> float:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    logits = session.run(None, feeds)[0]
    return float(np.mean(logits.argmax(axis=1) == labels))


def measure(name: str, path: Path, feeds: dict, labels: np.ndarray) -> list[dict]:
    import onnx
    from onnx import numpy_helper

    import bnfold

    result = bnfold.fold(path, targets=("int8",))
    proto = result.to_proto()
    base = accuracy(proto, feeds, labels)
    initializers = {t.name: t for t in proto.graph.initializer}
    rows = []
    for entry in result.ledger:
        if entry.precision is None:
            continue
        for figures in entry.precision.tensors:
            if figures.role != "weight":
                continue
            node = next(n for n in proto.graph.node if n.name == figures.node)
            tensor = initializers[node.input[figures.input]]
            original = numpy_helper.to_array(tensor)
            scores = {}
            for mode, axis in (("per_tensor", None), ("per_channel", figures.channel_axis)):
                tensor.CopyFrom(numpy_helper.from_array(quantised(original, axis), tensor.name))
                scores[mode] = accuracy(proto, feeds, labels)
            tensor.CopyFrom(numpy_helper.from_array(original, tensor.name))
            rows.append({"model": name, "site": entry.label, "weight": figures.tensor, "scaled": figures.scaled,
                         "spread_before": figures.spread.before, "spread_after": figures.spread.after,
                         "sqnr_per_tensor": figures.int8.per_tensor_sqnr_db.after,
                         "accuracy": base, "per_tensor": scores["per_tensor"], "per_channel": scores["per_channel"]})
    del onnx
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    from bnfold.train import data as D
    from bnfold.train import hazards

    labels = np.load(ROOT / "models" / "digits_test_labels.npz")
    labels = labels[list(labels.keys())[0]]
    rows = []
    for name in ZOO:
        feeds = dict(np.load(ROOT / "models" / f"{name}.npz"))
        rows += measure(name, ROOT / "models" / f"{name}.onnx", feeds, labels)
    digits = D.load_digits_split()
    with tempfile.TemporaryDirectory() as folder:
        builds = [(f"depthwise lr {lr:g} seed {seed}", "depthwise", lr, seed) for lr, seed in DEPTHWISE]
        builds += [(name, name, None, 0) for name in ("tiny-variance", "dead-channel")]
        for label, name, lr, seed in builds:
            sub = Path(folder) / label.replace(" ", "_")
            sub.mkdir()
            built = hazards.build(name, sub, seed=seed, lr=lr, digits=digits)
            rows += measure(label, built["onnx"], dict(np.load(built["inputs"])), built["labels"])
    rows.sort(key=lambda r: r["spread_after"] or 0.0)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "precision-threshold.json").write_text(json.dumps(rows, indent=1) + "\n")
    lines = ["# int8 accuracy against the fold's range spread", "",
             "One folded weight at a time quantised to symmetric int8 (the rest float32); test accuracy on "
             "the 360 held-out digits in onnxruntime. `python bench/precision_threshold.py`.", "",
             "| model | site | scaled | spread before | spread after | SQNR per tensor, dB | float | int8 per tensor | "
             "int8 per channel |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['site']} | {r['scaled']} | {r['spread_before']:.3g} | "
                     f"{r['spread_after']:.3g} | {r['sqnr_per_tensor']:.1f} | {r['accuracy']:.4f} | "
                     f"{r['per_tensor']:.4f} | {r['per_channel']:.4f} |")
    lines += ["", "Largest accuracy loss of per-tensor int8 (against float) by spread after the fold:", "",
              "| spread | weights | largest loss, points | median loss, points |", "|---|---|---|---|"]
    for low, high in ((0, 2), (2, 4), (4, 8), (8, 16), (16, 32), (32, 128), (128, float("inf"))):
        chosen = [r for r in rows if low <= (r["spread_after"] or 0) < high]
        if chosen:
            losses = [100 * (r["accuracy"] - r["per_tensor"]) for r in chosen]
            lines.append(f"| {low:g}-{high:g} | {len(chosen)} | {max(losses):.2f} | {float(np.median(losses)):.2f} |")
    (args.out / "precision-threshold.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
