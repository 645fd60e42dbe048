"""Inference latency of an original and a folded model in onnxruntime CPU.

``python bench/latency.py ORIGINAL FOLDED REPORT.json --inputs '{"input": [1, 3, 224, 224]}'``

Seven sessions: {original, folded} x {ORT_DISABLE_ALL, ORT's default (ORT_ENABLE_ALL)};
the original with ORT_ENABLE_BASIC (where ORT's own Conv+BN fusion happens) and with
ORT_ENABLE_EXTENDED (every fusion, e.g. Conv+activation, but not the default level's
hardware-specific NCHWc layout); and a second session of the original with
ORT_DISABLE_ALL, whose ratio to the first (an A/A test) is the measurement's own noise:
two sessions of one model differ by a few percent in buffer placement alone. Each runs
with ``intra_op_num_threads`` (default 2), batch as given. Session creation is timed
``creations`` times per session, the kinds alternating; then, after ``warmup`` runs
each, ``runs`` rounds run every session once, in an order rotated each round so that no
session always follows the same one. Reports every sample, and the outputs' largest
differences from the original with optimisations disabled (a sanity check; the harness
quotes ``bnfold verify`` for the official numbers when it is available).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

CONFIGS = (
    ("original", "disabled"),
    ("original", "basic"),
    ("original", "extended"),
    ("original", "default"),
    ("folded", "disabled"),
    ("folded", "default"),
    ("original-again", "disabled"),
)
LEVELS = {
    "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    # Basic: constant folding and BN fusion, but not the layout (NCHWc) and activation fusions.
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    # Extended: also the fusions into contrib ops (FusedConv, FusedGemm, ...), still no layout change.
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "default": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def _options(level: str, threads: int) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = LEVELS[level]
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # ORT's pool threads spin-wait after each run by default. With six sessions alive on two
    # cores, one session's spinning threads took the CPU from the next session's run (the
    # MLP's median was 4x its minimum); without spinning every session gets the cores.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def _rotated(items, shift: int):
    shift %= len(items)
    return list(items[shift:]) + list(items[:shift])


def _diff(reference: list[np.ndarray], subject: list[np.ndarray]) -> dict:
    ref = np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in reference])
    sub = np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in subject])
    diff = np.abs(sub - ref)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(diff == 0, 0.0, diff / np.abs(ref))
    return {"max_abs_diff": float(diff.max(initial=0.0)), "max_rel_diff": float(rel.max(initial=0.0)),
            "max_abs_output": float(np.abs(ref).max(initial=0.0))}


def _median_ci95(values: np.ndarray, resamples: int = 2000) -> list[float]:
    """A bootstrap 95% interval of the median: how far the run-to-run scatter alone could
    move a per-round ratio (bench/run.py widens it by the A/A ratio's deviation)."""
    rng = np.random.default_rng(0)
    medians = np.median(rng.choice(values, size=(resamples, len(values))), axis=1)
    return [float(np.quantile(medians, 0.025)), float(np.quantile(medians, 0.975))]


def measure(paths: dict[str, str], inputs: dict[str, list[int]], runs: int, warmup: int, creations: int,
            threads: int) -> dict:
    rng = np.random.default_rng(0)
    feeds = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in inputs.items()}
    create: dict[tuple, list[float]] = {c: [] for c in CONFIGS}
    sessions: dict[tuple, ort.InferenceSession] = {}
    for round_ in range(creations):
        for config in _rotated(CONFIGS, round_):
            sessions.pop(config, None)  # free the previous one first: memory stays bounded
            model, level = config
            start = time.perf_counter()
            sessions[config] = ort.InferenceSession(paths[model], _options(level, threads),
                                                    providers=["CPUExecutionProvider"])
            create[config].append(time.perf_counter() - start)
    outputs = {}
    for config in CONFIGS:
        for _ in range(warmup):
            outputs[config] = sessions[config].run(None, feeds)
    run_ms: dict[tuple, list[float]] = {c: [] for c in CONFIGS}
    for round_ in range(runs):
        for config in _rotated(CONFIGS, round_):
            start = time.perf_counter()
            sessions[config].run(None, feeds)
            run_ms[config].append((time.perf_counter() - start) * 1e3)
    reference = outputs[("original", "disabled")]
    # Per-round ratios: a slow spell of the machine hits both sides of a ratio alike.
    pairs = {
        "folded/disabled ÷ original/default": (("folded", "disabled"), ("original", "default")),
        "folded/disabled ÷ original/basic": (("folded", "disabled"), ("original", "basic")),
        "folded/disabled ÷ original/extended": (("folded", "disabled"), ("original", "extended")),
        "folded/disabled ÷ original/disabled": (("folded", "disabled"), ("original", "disabled")),
        "folded/default ÷ original/default": (("folded", "default"), ("original", "default")),
        "original-again/disabled ÷ original/disabled": (("original-again", "disabled"), ("original", "disabled")),
    }
    per_round = {name: np.array(run_ms[num]) / np.array(run_ms[den]) for name, (num, den) in pairs.items()}
    ratios = {name: float(np.median(values)) for name, values in per_round.items()}
    result = {"threads": threads, "runs": runs, "warmup": warmup, "creations": creations,
              "onnxruntime": ort.__version__, "ratios": ratios,
              "ratio_ci95": {name: _median_ci95(values) for name, values in per_round.items()}, "configs": {}}
    for config in CONFIGS:
        key = "/".join(config)
        result["configs"][key] = {
            "create_s": create[config],
            "create_s_median": statistics.median(create[config]),
            "run_ms": run_ms[config],
            "run_ms_median": statistics.median(run_ms[config]),
            "run_ms_min": min(run_ms[config]),
            "diff_vs_original_disabled": _diff(reference, outputs[config]),
        }
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("original")
    parser.add_argument("folded")
    parser.add_argument("report", type=Path)
    parser.add_argument("--inputs", required=True, help="JSON object: input name -> static shape")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--creations", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    result = measure({"original": args.original, "folded": args.folded, "original-again": args.original},
                     json.loads(args.inputs), args.runs, max(1, args.warmup), max(1, args.creations), args.threads)
    args.report.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
