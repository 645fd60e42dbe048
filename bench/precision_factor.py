"""How much does a correct fold change fp16 drift? ``python bench/precision_factor.py``

The measurement behind ``verification.compare.PRECISION_FACTOR`` (docs/precision.md). For
each digits-trained model (the zoo's, and ``bnfold.train.hazards``' depthwise stacks and
dead-channel net, whose folds are correct but whose BNs are not all healthy), ORIGINAL and
the folded CANDIDATE are converted to fp16 as ``verify --precision fp16`` converts them and
run on the 360 held-out digits in onnxruntime; per output channel, CANDIDATE's drift from
ORIGINAL's float32 output is divided by the allowance's base (the larger of ORIGINAL's
own fp16 drift there, one fp16 rounding of the channel and a subnormal per element). The
largest ratio over every channel is what a correct fold needs; writes
bench/results/precision-factor.md. Needs the train extra (torch) and onnxconverter-common.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ZOO = ["cnn_ts13", "cnn_dynamo18", "resnet_ts13", "mlp_ts13", "mlp-inputnorm_ts13", "autoencoder_ts13", "seq1d_ts13",
       "clip3d_ts13", "mlp-deadpixel_dynamo18"]


def ratios(original: Path, inputs: Path, folder: Path) -> tuple[float, float, float]:
    """(largest ratio, ORIGINAL's largest relative drift, CANDIDATE's) over every output channel."""
    import onnxruntime as ort

    import bnfold
    from bnfold.verification.compare import FP16_SMALLEST_NORMAL, FP16_UNIT, _by_channel
    from bnfold.verification.fp16 import convert_fp16

    candidate = folder / f"{original.stem}.folded.onnx"
    bnfold.fold(original).save(candidate)
    feeds = dict(np.load(inputs))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL

    def run(path):
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return session.run(None, feeds)

    reference = run(original)
    half_original = run(convert_fp16(original, folder, original.stem))
    half_candidate = run(convert_fp16(candidate, folder, candidate.stem))
    worst = drift_o = drift_c = 0.0
    for ref, o16, c16 in zip(reference, half_original, half_candidate):
        axis = 1 if ref.ndim > 1 else None
        ref, o16, c16 = (_by_channel([a], axis).astype(np.float64) for a in (ref, o16, c16))
        norm = np.sqrt((ref ** 2).sum(axis=1))
        e_o = np.sqrt(((o16 - ref) ** 2).sum(axis=1))
        e_c = np.sqrt(((c16 - ref) ** 2).sum(axis=1))
        floor = np.maximum(FP16_UNIT * norm, FP16_SMALLEST_NORMAL * np.sqrt(ref.shape[1]))
        worst = max(worst, float((e_c / np.maximum(e_o, floor)).max()))
        drift_o = max(drift_o, float((e_o / norm).max()))
        drift_c = max(drift_c, float((e_c / norm).max()))
    return worst, drift_o, drift_c


def main() -> int:
    from bnfold.train import hazards

    rows = []
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        for name in ZOO:
            rows.append((name, *ratios(ROOT / "models" / f"{name}.onnx", ROOT / "models" / f"{name}.npz", folder)))
        for name, lr, seed in [("depthwise", lr, seed) for lr in (3e-3, 3e-2) for seed in (0, 1)] + \
                [("dead-channel", None, 0)]:
            sub = folder / f"{name}-{lr}-{seed}"
            sub.mkdir()
            built = hazards.build(name, sub, seed=seed, lr=lr)
            rows.append((f"{name} lr {lr} seed {seed}" if lr else name, *ratios(built["onnx"], built["inputs"], sub)))
    lines = ["# fp16 drift of correct folds", "",
             "CANDIDATE's fp16 drift from ORIGINAL's float32 output over the allowance's base (ORIGINAL's own fp16 "
             "drift, else one fp16 rounding or a subnormal per element), largest over every output channel; the 360 "
             "held-out digits in onnxruntime. `python bench/precision_factor.py`.", "",
             "| model | largest ratio | ORIGINAL's fp16 drift (max rel.) | CANDIDATE's |", "|---|---|---|---|"]
    lines += [f"| {name} | {worst:.2f} | {o:.3g} | {c:.3g} |" for name, worst, o, c in rows]
    lines += ["", f"Largest over all: {max(r[1] for r in rows):.2f}."]
    out = ROOT / "bench" / "results" / "precision-factor.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
