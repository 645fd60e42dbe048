"""JUnit XML reports, the format GitLab, Jenkins and GitHub show natively: one testcase per
BN site (fold, inspect) or per output and provider (verify).

Outcomes follow the command's own exit code: a failure is what makes the command exit 1
(a BN not inference-ready; with ``fold --strict``, also a kept BN; a verify mismatch);
a kept BN without ``--strict`` is "skipped" with its reason.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass


@dataclass(frozen=True)
class Case:
    classname: str
    name: str
    failure: str | None = None  # the message of a failure
    skipped: str | None = None
    text: str = ""
    #: What the case measured, shown by CI servers as its output whatever the outcome.
    output: str = ""


def document(suite: str, cases: list[Case]) -> str:
    """The whole XML document for one run of one command on one model."""
    return documents([(suite, cases)])


def documents(suites: list[tuple[str, list[Case]]]) -> str:
    """The whole XML document: one testsuite per model."""
    every = [case for _, cases in suites for case in cases]
    root = ET.Element("testsuites", name="bnfold", **_counts(every))
    for suite, cases in suites:
        element = ET.SubElement(root, "testsuite", name=suite, **_counts(cases))
        for case in cases:
            node = ET.SubElement(element, "testcase", classname=case.classname, name=case.name, time="0")
            if case.failure is not None:
                failure = ET.SubElement(node, "failure", message=case.failure, type=case.failure.split(":")[0])
                failure.text = case.text
            elif case.skipped is not None:
                ET.SubElement(node, "skipped", message=case.skipped)
            if case.output:
                ET.SubElement(node, "system-out").text = case.output
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"


def _counts(cases: list[Case]) -> dict[str, str]:
    failures = sum(c.failure is not None for c in cases)
    skipped = sum(c.skipped is not None and c.failure is None for c in cases)
    return {"tests": str(len(cases)), "failures": str(failures), "errors": "0", "skipped": str(skipped)}


def fold_cases(ledger, strict: bool) -> list[Case]:
    cases = []
    for e in ledger:
        detail = "; ".join(f"{p}: {d}" for p, d in zip(e.problems, e.problem_details))
        failure = ", ".join(e.problems) if e.problems else None
        skipped = None
        if e.status == "kept":
            if strict and failure is None:
                failure = f"kept: {e.reason}"
            skipped = f"kept: {e.reason} ({e.detail})"
        cases.append(Case(f"bnfold.fold.{e.graph}", e.label or e.node or e.op, failure, skipped,
                          detail or e.detail))
    return cases


def inspect_cases(findings) -> list[Case]:
    return [Case(f"bnfold.inspect.{f.graph}", f.bn, ", ".join(f.problems) or None, None,
                 "; ".join(f"{p}: {d}" for p, d in zip(f.problems, f.details))) for f in findings]


def verify_cases(report) -> list[Case]:
    cases = [Case("bnfold.verify.signature", "inputs and outputs", "signature mismatch", None, problem)
             for problem in report.signature_mismatches]
    from bnfold.verification.report import difference_lines

    for c in report.comparisons:
        subject = f"{c.subject.model} {c.subject.provider} {c.subject.optimization}".strip()
        text = "; ".join(c.problems)
        if c.difference is not None:
            text = "; ".join(filter(None, [text, f"max|diff| {c.difference.max_abs_diff:.3g}, "
                                                 f"max rel {c.difference.max_rel_diff:.3g}"]))
        cases.append(Case(f"bnfold.verify.{c.output}", subject, None if c.passed else "mismatch", None, text,
                          output="\n".join(c.problems + difference_lines(c))))  # with the noise floor
    return cases
