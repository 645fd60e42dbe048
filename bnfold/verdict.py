"""The verdict of one run: which checks failed, and so the exit code.

Each command turns what its run found (the fold ledger's sites and their problems, the
options, the verify report, the inspect findings, an error) into one ``Verdict``. The
exit code, the JUnit report, the JSON report's ``verdict``/``exit_code``/``failures`` and
the ``FAIL:`` summary line are all read from it, so they cannot disagree: a check that
fails is a failing case, and a failing case is what makes the run exit 1.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from bnfold.errors import EXIT_CHECK_FAILED, EXIT_OK
from bnfold.ledger import STATUS_KEPT, LedgerEntry

PASS, FAIL, ERROR = "PASS", "FAIL", "ERROR"


@dataclass(frozen=True)
class Case:
    """One check: a site of the fold ledger, a BN of inspect or recalibrate, an output of
    verify. ``failure`` (a short message) fails the run; ``skipped`` says why a site was
    left as it was; ``text`` holds the details."""

    classname: str
    name: str
    failure: str | None = None
    skipped: str | None = None
    text: str = ""


@dataclass
class Verdict:
    """The outcome of one command on one model."""

    command: str
    subject: str
    cases: list[Case] = field(default_factory=list)
    #: Why the run failed, in words: one fragment per kind of failure (the summary line).
    reasons: list[str] = field(default_factory=list)
    #: What a passing run says instead.
    passed_text: str = ""
    #: The one-line error that stopped the run (bad input, a bug), and its exit code.
    error: str | None = None
    error_code: int = 0

    @property
    def failures(self) -> list[Case]:
        return [case for case in self.cases if case.failure is not None]

    @property
    def passed(self) -> bool:
        return self.error is None and not self.failures

    @property
    def label(self) -> str:
        return ERROR if self.error is not None else (FAIL if self.failures else PASS)

    @property
    def exit_code(self) -> int:
        if self.error is not None:
            return self.error_code
        return EXIT_CHECK_FAILED if self.failures else EXIT_OK

    def summary(self) -> str:
        """One line: ``PASS: ...``, ``FAIL: ...`` or ``ERROR: ...``."""
        if self.error is not None:
            return f"{ERROR}: {self.error}"
        if self.failures:
            return f"{FAIL}: " + "; ".join(self.reasons or [f"{len(self.failures)} check(s) failed"])
        return f"{PASS}: {self.passed_text}" if self.passed_text else PASS

    def to_dict(self) -> dict:
        """The fields every JSON report carries at its top level."""
        data = {"verdict": self.label, "exit_code": self.exit_code,
                "failures": [{"check": c.classname, "name": c.name, "message": c.failure} for c in self.failures]}
        if self.error is not None:
            data["error"] = self.error
        return data


def exit_code(verdicts: Iterable[Verdict]) -> int:
    """The worst exit code of several models' verdicts (2 and 3 above 1 above 0)."""
    return max((v.exit_code for v in verdicts), default=EXIT_OK)


def error_verdict(command: str, subject: str, message: str, code: int) -> Verdict:
    return Verdict(command, subject, error=message, error_code=code)


# --- fold ------------------------------------------------------------------------------


def outstanding_problems(entry: LedgerEntry) -> list[tuple[str, str]]:
    """The readiness problems the output still has: a training-mode BN that
    ``--to-inference`` converted (and so folded or kept in inference form) is repaired."""
    return [(code, detail) for code, detail in zip(entry.problems, entry.problem_details)
            if not (code == "training-mode" and entry.converted_from_training)]


def site_detail(entry: LedgerEntry) -> str:
    """A site's route, detail and the problems its output still has, without repeating a
    problem that is also the reason it was kept (a kept training-mode BN says so once);
    its precision problems in short (``precision_lines`` has them in full)."""
    problems = [f"{p}: {d}" for p, d in outstanding_problems(entry) if (p, d) != (entry.reason, entry.detail)]
    return "; ".join(filter(None, [entry.route, entry.detail, *problems, *precision_notes(entry)]))


def precision_notes(entry: LedgerEntry) -> list[str]:
    """Each precision problem of a site in a few words: code, tensor, channels."""
    from bnfold.precision import channel_list

    return [f"{p.code} ({p.tensor or 'new tensor'}" + (f", channel(s) {channel_list(p.channels)})" if p.channels else ")")
            for p in entry.precision_problems]


def precision_codes(entries) -> list[str]:
    """The precision problem codes of these entries, sorted, once each."""
    return sorted({p.code for e in entries for p in e.precision_problems})


def fold_verdict(ledger, subject: str, *, strict: bool, verification=None) -> Verdict:
    """``fold``: with ``strict``, a BN that is kept or still not inference-ready fails;
    with ``verification`` (a VerifyReport), a mismatch fails. Otherwise a kept site is
    skipped with its reason, and problems are details (printed as a warning)."""
    cases, kept, troubled, imprecise = [], [], [], []
    for e in ledger:
        problems = outstanding_problems(e)
        failing = []
        if strict and e.precision_problems:  # only measured with --target
            failing.append("precision: " + ", ".join(precision_codes([e])))
            imprecise.append(e)
        if strict and e.is_bn:
            if e.status == STATUS_KEPT:
                failing.append(f"kept: {e.reason}")
                kept.append(e)
            codes = [p for p, _ in problems if not (e.status == STATUS_KEPT and p == e.reason)]
            if codes:  # a problem that is the reason a BN was kept is said once, as that reason
                failing.append(", ".join(codes))
                troubled.append((e, codes))
        skipped = f"kept: {e.reason} ({e.detail})" if e.status == STATUS_KEPT else None
        text = "\n".join([site_detail(e), *(p.detail for p in e.precision_problems)])
        cases.append(Case(f"bnfold.fold.{e.graph}", e.label or e.node or e.op, "; ".join(failing) or None,
                          skipped, text))
    reasons, parts = [], []
    bn_total = len(ledger.batch_norms)
    if kept:
        parts.append(f"{len(kept)} of {bn_total} BatchNormalization kept ({', '.join(sorted({e.reason for e in kept}))})")
    if troubled:
        codes = sorted({p for _, problems in troubled for p in problems})
        parts.append(f"{len(troubled)}{'' if kept else f' of {bn_total} BatchNormalization'} not inference-ready "
                     f"({', '.join(codes)})")
    if imprecise:
        parts.append(f"{len(imprecise)} folded site(s) with precision problems for {', '.join(ledger.targets)} "
                     f"({', '.join(precision_codes(imprecise))})")
    if parts:
        reasons.append("--strict: " + ", ".join(parts))
    passed_text = f"{ledger.summary()['folded']} of {bn_total} BatchNormalization folded"
    if ledger.targets:
        flagged = [e for e in ledger if e.precision_problems]
        passed_text += f"; {', '.join(ledger.targets)}: " + (
            f"{len(flagged)} site(s) with precision problems ({', '.join(precision_codes(flagged))})" if flagged
            else "no precision problem")
    if verification is not None:
        verified = verify_verdict(verification, subject)
        cases += verified.cases
        reasons += [f"verify: {r}" for r in verified.reasons]
        passed_text += f"; verified: {verified.passed_text}"
    return Verdict("fold", subject, cases, reasons, passed_text)


# --- inspect, verify, recalibrate ------------------------------------------------------


def inspect_verdict(findings, subject: str, sites=(), targets=()) -> Verdict:
    """``inspect``: a BN that is not inference-ready fails; with ``targets``, so does a
    planned fold with a precision problem (``sites``: the non-BN sites' ledger entries)."""
    cases = []
    for f in findings:
        codes = f.problems + [p.code for p in f.precision_problems]
        text = [f"{p}: {d}" for p, d in zip(f.problems, f.details)] + [p.detail for p in f.precision_problems]
        cases.append(Case(f"bnfold.inspect.{f.graph}", f.bn, ", ".join(dict.fromkeys(codes)) or None, None,
                          "; ".join(text)))
    for e in sites:
        if e.precision_problems:
            cases.append(Case(f"bnfold.inspect.{e.graph}", e.label or e.node or e.op, ", ".join(precision_codes([e])),
                              None, "; ".join(p.detail for p in e.precision_problems)))
    not_ready = [f for f in findings if not f.ok]
    reasons = []
    if not_ready:
        codes = sorted({p for f in not_ready for p in f.problems})
        reasons.append(f"{len(not_ready)} of {len(findings)} BatchNormalization not inference-ready "
                       f"({', '.join(codes)})")
    imprecise = [f for f in findings if f.precision_problems] + [e for e in sites if e.precision_problems]
    if imprecise:
        codes = sorted({p.code for x in imprecise for p in x.precision_problems})
        reasons.append(f"{len(imprecise)} planned fold(s) with precision problems for {', '.join(targets)} "
                       f"({', '.join(codes)})")
    ready = len(findings) - len(not_ready)
    passed = f"{ready} of {len(findings)} BatchNormalization inference-ready"
    if targets:
        passed += f"; {', '.join(targets)}: no precision problem"
    return Verdict("inspect", subject, cases, reasons, passed)


def verify_verdict(report, subject: str) -> Verdict:
    """``verify``: a signature difference or an output that differs fails; a run that
    compared nothing fails too (one case says so)."""
    cases = [Case("bnfold.verify.signature", "inputs and outputs", "signature mismatch", None, problem)
             for problem in report.signature_mismatches]
    from bnfold.verification.report import difference_lines

    for c in report.comparisons:
        name = f"{c.subject.model} {c.subject.provider} {c.subject.optimization}".strip()
        text = "\n".join(c.problems + difference_lines(c))  # the differences, with ORIGINAL's noise floor
        cases.append(Case(f"bnfold.verify.{c.output}", name, None if c.passed else "mismatch", None, text))
    line = report.summary()
    if not report.passed and not any(case.failure for case in cases):
        cases.append(Case("bnfold.verify", "verdict", line.removeprefix(f"{FAIL}: "), None, line))
    reasons = [line.removeprefix(f"{FAIL}: ")] if not report.passed else []
    return Verdict("verify", subject, cases, reasons, line.removeprefix(f"{PASS}: "))


def recalibrate_verdict(result, subject: str) -> Verdict:
    """``recalibrate`` checks nothing that can fail: a BN it leaves is skipped with its reason."""
    cases = [Case(f"bnfold.recalibrate.{e.graph}", e.bn, None,
                  None if e.recalibrated else f"skipped: {e.reason}" + (f" ({e.detail})" if e.detail else ""),
                  e.detail) for e in result.report]
    done = len(result.recalibrated)
    return Verdict("recalibrate", subject, cases, [], f"{done} of {len(result.report)} BatchNormalization recalibrated")
