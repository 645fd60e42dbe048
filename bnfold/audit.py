"""Inference-readiness audit behind ``bnfold inspect``.

Each BN's problems (``health``) and plan come from the very run ``fold`` makes
(``engine.run``), on bnfold's own copy of the model: inspect and fold agree by
construction. With targets (``--target``) each planned fold is measured as ``fold``
measures it (``bnfold.assess``): the BNs' findings and the other folded sites carry the
same precision blocks as fold's ledger.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from bnfold.engine import run
from bnfold.ledger import STATUS_FOLDED, Ledger, LedgerEntry, json_safe
from bnfold.load import as_source
from bnfold.plan import FoldOptions

#: Version 2: ``targets``, each finding's ``precision``, ``sites`` and the verdict's
#: precision problems (``--target``).
INSPECT_SCHEMA_VERSION = 2


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
    #: With targets: what the planned fold does to their precision (``precision.Precision``),
    #: None without a target or a fold.
    precision: object | None = None

    @property
    def ok(self) -> bool:
        """Inference-ready (the precision problems of its fold are apart)."""
        return not self.problems

    @property
    def precision_problems(self) -> list:
        return list(self.precision.problems) if self.precision is not None else []

    def add(self, problem: str, detail: str) -> None:
        self.problems.append(problem)
        self.details.append(detail)

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


def inspect(model, targets: Sequence[str] = (), merge_branches: bool = True) -> list[Finding]:
    """Audit every BN of the model (a path, ModelProto, onnx_ir Model or Source); nothing
    given is changed. ``targets``: measure each planned fold for them, as ``fold`` does;
    ``merge_branches`` False: plan as ``fold --no-merge-branches`` does."""
    return audit(model, targets, merge_branches)[0]


def audit(model, targets: Sequence[str] = (), merge_branches: bool = True) -> tuple[list[Finding], Ledger]:
    """The findings of every BN, and the run's ledger (every site, BN or not, and with
    targets its precision block)."""
    _, ledger = run(as_source(model), FoldOptions(targets=tuple(targets), merge_branches=merge_branches))
    findings = []
    for entry in ledger.batch_norms:
        finding = Finding(bn=entry.node, graph=entry.graph, problems=list(entry.problems),
                          details=list(entry.problem_details), channels=entry.channels, precision=entry.precision)
        if entry.status == STATUS_FOLDED:
            direction = "forward into" if entry.pattern.startswith("bn-") else "into"
            finding.plan = f"fold {direction} {entry.into_op} {entry.into!r} ({entry.pattern})" + \
                (f"; {entry.route}" if entry.route else "")
        else:
            finding.fold_reason = entry.reason
            finding.plan = f"keep: {entry.reason} ({entry.detail})"
        findings.append(finding)
    return findings, ledger


def other_sites(ledger: Ledger) -> list[LedgerEntry]:
    """The planned folds that are not a BN's (Mul/Add/Sub/Div, merged sums) and were measured."""
    return [e for e in ledger if not e.is_bn and e.precision is not None]


def findings_to_dict(findings: list[Finding], ledger: Ledger | None = None, **context) -> dict:
    from bnfold import __version__

    sites = other_sites(ledger) if ledger is not None else []
    return json_safe({
        "schema": "bnfold.inspect",
        "schema_version": INSPECT_SCHEMA_VERSION,
        "bnfold_version": __version__,
        **context,
        "targets": list(ledger.targets) if ledger is not None else [],
        "summary": {"bn_total": len(findings), "ready": sum(f.ok for f in findings),
                    "not_ready": sum(not f.ok for f in findings),
                    "with_precision_problems": sum(bool(f.precision_problems) for f in findings)
                    + sum(bool(e.precision_problems) for e in sites)},
        "findings": [f.to_dict() for f in findings],
        # Folded sites that are not BNs (Mul/Add/Sub/Div, merged sums), with targets.
        "sites": [{"site": e.label or e.node, "op": e.op, "graph": e.graph, "status": e.status, "pattern": e.pattern,
                   "into": e.into, "precision": asdict(e.precision)} for e in sites],
    })
