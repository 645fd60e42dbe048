"""JUnit XML reports, the format GitLab, Jenkins and GitHub show natively: one testsuite
per model and command, one testcase per check of its ``Verdict`` (a BN site for fold,
inspect and recalibrate; an output on a provider for verify).

The outcomes are the verdict's own cases, so a ``<failure>`` is exactly what makes the
command exit 1 and an ``<error>`` what makes it exit 2 or 3; a site kept without
``--strict`` is ``<skipped>`` with its reason, and details of a passing case go to its
``<system-out>``.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

from bnfold.verdict import Case, Verdict


def document(verdicts: list[Verdict]) -> str:
    """The whole XML document: one testsuite per verdict."""
    suites = [(f"bnfold {v.command} {v.subject}", _cases(v)) for v in verdicts]
    every = [case for _, cases in suites for case in cases]
    root = ET.Element("testsuites", name="bnfold", **_counts(every))
    for suite, cases in suites:
        element = ET.SubElement(root, "testsuite", name=suite, **_counts(cases))
        for case, error in cases:
            node = ET.SubElement(element, "testcase", classname=case.classname, name=case.name, time="0")
            if error:
                ET.SubElement(node, "error", message=case.failure, type="error").text = case.text
            elif case.failure is not None:
                ET.SubElement(node, "failure", message=case.failure,
                              type=case.failure.split(":")[0].split(",")[0].split(";")[0]).text = case.text
            else:
                if case.skipped is not None:
                    ET.SubElement(node, "skipped", message=case.skipped)
                if case.text:
                    ET.SubElement(node, "system-out").text = case.text
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"


def _cases(verdict: Verdict) -> list[tuple[Case, bool]]:
    """The verdict's cases, and for a run stopped by an error one case carrying it."""
    cases = [(case, False) for case in verdict.cases]
    if verdict.error is not None:
        cases.append((Case(f"bnfold.{verdict.command}", verdict.subject, verdict.error, None, verdict.error), True))
    return cases


def _counts(cases: list[tuple[Case, bool]]) -> dict[str, str]:
    errors = sum(error for _, error in cases)
    failures = sum(case.failure is not None and not error for case, error in cases)
    skipped = sum(case.skipped is not None and case.failure is None for case, _ in cases)
    return {"tests": str(len(cases)), "failures": str(failures), "errors": str(errors), "skipped": str(skipped)}
