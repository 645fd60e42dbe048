"""Inference-readiness of one BatchNormalization: the problems ``inspect`` reports and
``fold`` lists beside each BN in its ledger, from one function.

A BN is inference-ready when it normalises with constant running statistics that look
trained and healthy. Problems are codes from ``PROBLEMS`` (part of the public interface,
documented in docs/ledger.md).
"""

from __future__ import annotations

import numpy as np

from bnfold._onnx_ir import ir
from bnfold.constant_eval import Constants, has_unresolved_reference
from bnfold.ledger import NoMatch
from bnfold.plan import BNStats, mode_problem, read_stats

#: Tiny variance: the channel's variance is at most this multiple of epsilon, so epsilon,
#: not the data, decides the normalisation (typically a dead channel).
TINY_VARIANCE_FACTOR = 1.0

PROBLEMS: dict[str, str] = {
    "training-mode": "the BN normalises with batch statistics (training_mode=1, is_test=0, or running-stat outputs); "
                     "`bnfold fold --to-inference` converts it, `bnfold recalibrate` recomputes its statistics from data",
    "batch-statistics": "mean/var are computed in the graph from data, not stored running statistics",
    "stats-as-inputs": "mean/var/scale/bias are graph inputs (or overridable initializers) that a caller must supply",
    "non-finite-stats": "a parameter holds NaN or infinity",
    "negative-variance": "a running variance is negative",
    "zero-variance": "a running variance is exactly zero",
    "tiny-variance": "a running variance is no larger than epsilon (dead channel)",
    "untrained-stats": "running mean is 0 and variance 1 on every channel: statistics were never updated; "
                       "`bnfold recalibrate` recomputes them from data",
}


#: What to do about a problem, printed once below a report that shows it (each line
#: fits 80 columns).
HINTS: dict[str, str] = {
    "training-mode": "training-mode BNs with unused running-stat outputs: `fold --to-inference`",
    "untrained-stats": "untrained statistics: `bnfold recalibrate MODEL --data DATA.npz`",
}


def hints(codes) -> list[str]:
    """The hint lines for these problem codes, in ``HINTS`` order."""
    present = set(codes)
    return [f"hint: {text}" for code, text in HINTS.items() if code in present]


def bn_problems(bn: ir.Node, opset: int, consts: Constants) -> list[tuple[str, str]]:
    """Every readiness problem of ``bn`` as (code, detail)."""
    problems: list[tuple[str, str]] = []
    mode = mode_problem(bn, opset)
    if mode is not None and mode[0] == "training-mode":
        problems.append(("training-mode", mode[1]))
    if mode is not None and mode[0] in ("spatial-0", "unsupported-opset"):
        return problems  # statistics per element, or an old form: nothing per channel to judge
    if has_unresolved_reference(bn):
        return problems  # epsilon differs between the function's call sites: no one value to judge
    try:
        stats = read_stats(bn, consts)
    except NoMatch as no:
        computed = [v for v in bn.inputs[3:5] if v is not None and v.producer() is not None
                    and v.producer().op_type != "Constant"]
        problems.append(("batch-statistics" if computed else "stats-as-inputs", no.detail))
        return problems
    return problems + stats_health(stats)


def stats_health(stats: BNStats) -> list[tuple[str, str]]:
    problems = []
    for role in ("gamma", "beta", "mean", "var"):
        bad = ~np.isfinite(getattr(stats, role))
        if bad.any():
            problems.append(("non-finite-stats", f"{role} is NaN/inf on {int(bad.sum())} channel(s)"))
    var = stats.var
    finite = np.isfinite(var)
    if (var[finite] < 0).any():
        problems.append(("negative-variance", f"var < 0 on {int((var[finite] < 0).sum())} channel(s)"))
    if (var == 0).any():
        problems.append(("zero-variance", f"var == 0 on {int((var == 0).sum())} channel(s)"))
    tiny = finite & (var > 0) & (var <= TINY_VARIANCE_FACTOR * stats.epsilon)
    if tiny.any():
        problems.append(("tiny-variance", f"0 < var <= eps ({stats.epsilon:g}) on {int(tiny.sum())} channel(s)"))
    if stats.channels and np.all(stats.mean == 0) and np.all(stats.var == 1):
        problems.append(("untrained-stats", "mean == 0 and var == 1 on every channel"))
    return problems
