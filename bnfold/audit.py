"""Inference-readiness audit behind ``bnfold inspect``.

A BN is inference-ready when it normalises with constant running statistics that look
trained and healthy. Problems are codes from ``PROBLEMS``; the fold plan (what
``bnfold fold`` would do) comes from the engine's own planner, so the two never disagree.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from bnfold._onnx_ir import ir
from bnfold.constant_eval import Constants
from bnfold.engine import run
from bnfold.io import as_source
from bnfold.ledger import STATUS_FOLDED, NoMatch
from bnfold.plan import Site, mode_problem, read_stats

INSPECT_SCHEMA_VERSION = 1

#: Tiny variance: the channel's variance is at most this multiple of epsilon, so epsilon,
#: not the data, decides the normalisation (typically a dead channel).
TINY_VARIANCE_FACTOR = 1.0

PROBLEMS: dict[str, str] = {
    "training-mode": "the BN normalises with batch statistics (training_mode=1, is_test=0, or running-stat outputs)",
    "batch-statistics": "mean/var are computed in the graph from data, not stored running statistics",
    "stats-as-inputs": "mean/var/scale/bias are graph inputs (or overridable initializers) that a caller must supply",
    "non-finite-stats": "a parameter holds NaN or infinity",
    "negative-variance": "a running variance is negative",
    "zero-variance": "a running variance is exactly zero",
    "tiny-variance": "a running variance is no larger than epsilon (dead channel)",
    "untrained-stats": "running mean is 0 and variance 1 on every channel: statistics were never updated",
}


@dataclass
class Finding:
    """The audit of one BatchNormalization."""

    bn: str
    graph: str
    problems: list[str] = field(default_factory=list)
    details: list[str] = field(default_factory=list)
    channels: int | None = None
    plan: str = ""
    fold_reason: str | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, problem: str, detail: str) -> None:
        self.problems.append(problem)
        self.details.append(detail)

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


def inspect(model) -> list[Finding]:
    """Audit every BN of the model (a path, ModelProto, onnx_ir Model or Source); the plan
    of each is the one ``fold`` carries out, from the same run on bnfold's own copy."""
    source = as_source(model)
    findings: list[Finding] = []

    def observe(site: Site) -> None:
        if not site.is_bn:
            return
        bn = site.node
        finding = Finding(bn=bn.name, graph=site.scope.label)
        mode = mode_problem(bn, site.scope.opset)
        if mode is not None and mode[0] == "training-mode":
            finding.add("training-mode", mode[1])
        try:
            stats = read_stats(bn, consts_of(source))
        except NoMatch as no:
            _non_constant_stats(finding, bn, (no.reason, no.detail))
        else:
            finding.channels = stats.channels
            _check_health(finding, stats)
        findings.append(finding)

    _, ledger = run(source, observe=observe)
    for finding, entry in zip(findings, ledger.batch_norms):
        if entry.status == STATUS_FOLDED:
            direction = "forward into" if entry.pattern.startswith("bn-") else "into"
            finding.plan = f"fold {direction} {entry.into_op} {entry.into!r} ({entry.pattern})"
        else:
            finding.fold_reason = entry.reason
            finding.plan = f"keep: {entry.reason} ({entry.detail})"
    return findings


def consts_of(source) -> Constants:
    return Constants(source.model.ir_version)


def _non_constant_stats(finding: Finding, bn: ir.Node, problem: tuple[str, str]) -> None:
    reason, detail = problem
    computed = [v for v in bn.inputs[3:5] if v.producer() is not None and v.producer().op_type != "Constant"]
    if computed:
        finding.add("batch-statistics", detail)
    else:
        finding.add("stats-as-inputs", detail)


def _check_health(finding: Finding, stats) -> None:
    for role in ("gamma", "beta", "mean", "var"):
        bad = ~np.isfinite(getattr(stats, role))
        if bad.any():
            finding.add("non-finite-stats", f"{role} is NaN/inf on {int(bad.sum())} channel(s)")
    var = stats.var
    finite = np.isfinite(var)
    if (var[finite] < 0).any():
        finding.add("negative-variance", f"var < 0 on {int((var[finite] < 0).sum())} channel(s)")
    if (var == 0).any():
        finding.add("zero-variance", f"var == 0 on {int((var == 0).sum())} channel(s)")
    tiny = finite & (var > 0) & (var <= TINY_VARIANCE_FACTOR * stats.epsilon)
    if tiny.any():
        finding.add("tiny-variance", f"0 < var <= eps ({stats.epsilon:g}) on {int(tiny.sum())} channel(s)")
    if stats.channels and np.all(stats.mean == 0) and np.all(stats.var == 1):
        finding.add("untrained-stats", "mean == 0 and var == 1 on every channel")


def findings_to_dict(findings: list[Finding], **context) -> dict:
    from bnfold import __version__

    return {
        "schema": "bnfold.inspect",
        "schema_version": INSPECT_SCHEMA_VERSION,
        "bnfold_version": __version__,
        **context,
        "summary": {"bn_total": len(findings), "ready": sum(f.ok for f in findings),
                    "not_ready": sum(not f.ok for f in findings)},
        "findings": [f.to_dict() for f in findings],
    }
