"""Inference-readiness audit behind ``bnfold inspect``.

Each BN's problems (``health``) and plan come from the very run ``fold`` makes
(``engine.run``), on bnfold's own copy of the model: inspect and fold agree by
construction.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from bnfold.engine import run
from bnfold.load import as_source
from bnfold.ledger import STATUS_FOLDED

INSPECT_SCHEMA_VERSION = 1


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
    """Audit every BN of the model (a path, ModelProto, onnx_ir Model or Source); nothing
    given is changed."""
    _, ledger = run(as_source(model))
    findings = []
    for entry in ledger.batch_norms:
        finding = Finding(bn=entry.node, graph=entry.graph, problems=list(entry.problems),
                          details=list(entry.problem_details), channels=entry.channels)
        if entry.status == STATUS_FOLDED:
            direction = "forward into" if entry.pattern.startswith("bn-") else "into"
            finding.plan = f"fold {direction} {entry.into_op} {entry.into!r} ({entry.pattern})" + \
                (f"; {entry.route}" if entry.route else "")
        else:
            finding.fold_reason = entry.reason
            finding.plan = f"keep: {entry.reason} ({entry.detail})"
        findings.append(finding)
    return findings


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
