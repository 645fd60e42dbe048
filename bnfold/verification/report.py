"""The verification report: what was compared, the verdict, its JSON form and its rendering."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from bnfold.errors import EXIT_CHECK_FAILED, EXIT_OK
from bnfold.ledger import json_safe
from bnfold.verification.compare import Difference, PrecisionDrift, Tolerance, Top1
from bnfold.verification.feeds import InputData

#: Version of the JSON report layout documented in docs/verify.md. Version 2 added the
#: per-channel fields, top-1, input ranges and stored reference outputs; ``precision``
#: (--precision fp16) was added within version 2.
REPORT_SCHEMA_VERSION = 2

#: Optimisation levels a run can use: the reference is always "disabled".
OPTIMIZATION_DISABLED = "disabled"
OPTIMIZATION_DEFAULT = "default"
#: The "model" of a reference read from --reference-outputs.
STORED = "stored"


@dataclass(frozen=True)
class RunId:
    """One session of the run matrix, or the stored reference outputs (model "stored")."""

    model: str  # "original", "candidate" or "stored"
    provider: str
    optimization: str  # OPTIMIZATION_DISABLED or OPTIMIZATION_DEFAULT ("" for stored outputs)

    def describe(self) -> str:
        if self.model == STORED:
            return "the stored REFERENCE outputs"
        level = "optimizations disabled" if self.optimization == OPTIMIZATION_DISABLED else "default optimizations"
        return f"{self.model.upper()} on {self.provider} ({level})"


@dataclass
class OutputComparison:
    """One output of one subject run against its reference run."""

    output: str
    reference: RunId
    subject: RunId
    tolerance: Tolerance
    reference_dtype: str
    subject_dtype: str
    reference_shape: list[int]
    subject_shape: list[int]
    #: Shape or element type differences; numbers are only computed without them.
    problems: list[str]
    difference: Difference | None
    #: With --metric top1: argmax agreement along the channel axis (not part of the verdict).
    top1: Top1 | None = None

    @property
    def passed(self) -> bool:
        return not self.problems and self.difference is not None and self.difference.passed


@dataclass
class PrecisionComparison:
    """One output on one provider: ORIGINAL and CANDIDATE converted to ``target``, against
    ORIGINAL's own unoptimised output (``--precision``)."""

    output: str
    provider: str
    target: str
    problems: list[str]
    drift: PrecisionDrift | None

    @property
    def passed(self) -> bool:
        return not self.problems and self.drift is not None and self.drift.passed


@dataclass
class VerifyReport:
    """Everything the verdict rests on; ``to_dict`` is the versioned JSON schema."""

    original: str | None
    candidate: str
    tool_version: str
    onnxruntime_version: str | None
    #: What this onnxruntime offered, and what the runs actually used.
    available_providers: list[str]
    providers: list[str]
    #: "random" (seeded with ``seed``) or the npz file the inputs came from.
    input_source: str
    seed: int | None
    #: How many times each session ran, each time on different inputs.
    runs: int
    inputs: list[InputData]
    signature_mismatches: list[str]
    comparisons: list[OutputComparison]
    #: Not part of the verdict: ORIGINAL on each accelerator against ORIGINAL on CPU, and
    #: with stored reference outputs, ORIGINAL against them.
    noise_floor: list[OutputComparison]
    notes: list[str]
    allow_tf32: bool
    #: What the candidate is compared with: "original" (run with ORT_DISABLE_ALL),
    #: "original-inference" (its training-mode BNs run in inference mode) or "stored".
    reference: str = "original"
    reference_outputs: str | None = None
    metrics: list[str] | None = None
    #: --precision: the targets, how the models were converted, and each output's drift.
    precision_targets: list[str] | None = None
    converter: str | None = None
    precision: list[PrecisionComparison] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return (not self.signature_mismatches and bool(self.comparisons) and all(c.passed for c in self.comparisons)
                and all(p.passed for p in self.precision))

    @property
    def verdict(self) -> str:
        return "PASS" if self.passed else "FAIL"

    @property
    def exit_code(self) -> int:
        return EXIT_OK if self.passed else EXIT_CHECK_FAILED

    def failures(self) -> list[OutputComparison]:
        return [comparison for comparison in self.comparisons if not comparison.passed]

    def summary(self) -> str:
        """One line for logs: the verdict and, on failure, what failed where; and how many
        elements and channels passed only within ORIGINAL's own noise (the noise floor)."""
        if self.passed:
            outputs = sorted({comparison.output for comparison in self.comparisons})
            against = " against the stored outputs" if self.reference == STORED else ""
            targets = f"; {', '.join(self.precision_targets)} no worse than ORIGINAL's" if self.precision_targets else ""
            return (f"PASS: {len(outputs)} output(s) match{against} on {', '.join(self.providers)}{targets}"
                    f"{self._within_noise()}")
        reasons = list(self.signature_mismatches)
        for comparison in self.failures():
            reason = f"output {comparison.output!r}: {comparison.subject.describe()} differs"
            difference = comparison.difference
            if difference is not None and difference.channels_failing and difference.channel_axis is not None:
                reason += f" ({difference.channels_failing} of {difference.channels} channels)"
            reasons.append(reason)
        for precision in self.precision:
            if not precision.passed:
                reason = f"output {precision.output!r}: {precision.target} makes CANDIDATE drift more than ORIGINAL"
                drift = precision.drift
                if drift is not None and drift.channel_axis is not None:
                    reason += f" ({drift.channels_worse} of {drift.channels} channels)"
                reasons.append(reason)
        if not reasons:
            reasons.append("nothing was compared")
        return "FAIL: " + "; ".join(reasons) + self._within_noise()

    def _within_noise(self) -> str:
        within = [c for c in self.comparisons if c.difference is not None and
                  (c.difference.elements_within_noise or c.difference.channels_within_noise)]
        if not within:
            return ""
        return f" ({within_noise_text(within)})"

    def to_dict(self) -> dict[str, Any]:
        data = {
            "schema_version": REPORT_SCHEMA_VERSION,
            "tool": "bnfold",
            "tool_version": self.tool_version,
            "verdict": self.verdict,
            **asdict(self),
        }
        for key, comparisons in (("comparisons", self.comparisons), ("noise_floor", self.noise_floor)):
            for entry, comparison in zip(data[key], comparisons):
                entry["passed"] = comparison.passed
                if comparison.top1 is not None:
                    entry["top1"]["agreement"] = comparison.top1.agreement
        for entry, precision in zip(data["precision"], self.precision):
            entry["passed"] = precision.passed
        return json_safe(data)


def within_noise_text(comparisons: Sequence[OutputComparison]) -> str:
    """"N element(s) and M channel(s) within Kx ORIGINAL's own noise" over ``comparisons``."""
    elements = sum(c.difference.elements_within_noise for c in comparisons if c.difference is not None)
    channels = sum(c.difference.channels_within_noise for c in comparisons if c.difference is not None)
    factors = sorted({f"{c.tolerance.noise_factor:g}" for c in comparisons})
    counts = " and ".join(filter(None, [f"{elements} element(s)" if elements else "",
                                        f"{channels} channel(s)" if channels else ""]))
    return f"{counts} within {'/'.join(factors)}x ORIGINAL's own noise"


# --- rendering ---------------------------------------------------------------------------


def render_report(report: VerifyReport, console) -> None:
    """Print the report, verdict last: rich tables on a terminal, and one plain line per
    output and run everywhere else (pipes, CI logs), never wrapped or cut, as fold and
    inspect print (``bnfold.render``).

    Every model-derived text (paths, names, shapes, onnxruntime messages) is printed
    literally: escaped in rich markup, where rich would take ``[batch, 1, 8, 8]`` for a tag.
    """
    if not console.is_terminal:
        from bnfold.render import print_plain

        print_plain(console, report_lines(report))
        return
    from rich.markup import escape

    def say(text: str) -> None:
        console.print(text, highlight=False, soft_wrap=True)

    header = _header_lines(report)
    say(f"[bold]bnfold verify[/bold]{escape(header[0].removeprefix('bnfold verify'))}")
    for line in header[1:]:
        say(escape(line))
    for note in report.notes:
        say(f"[yellow]note:[/yellow] {escape(note)}")
    for problem in report.signature_mismatches:
        say(f"[red]mismatch:[/red] {escape(problem)}")
    if report.comparisons:
        title = ("CANDIDATE against the stored outputs" if report.reference == STORED
                 else "CANDIDATE against ORIGINAL (unoptimised) on the same provider")
        console.print(_comparison_table(title, report.comparisons))
    if report.noise_floor:
        console.print(_comparison_table(NOISE_FLOOR_TITLE, report.noise_floor))
    for line in precision_lines(report):
        say(f"[red]{escape(line)}[/red]" if "  WORSE" in line else escape(line))
    colour = "green" if report.passed else "red"
    say(f"[bold {colour}]{escape(report.summary())}[/bold {colour}]")


NOISE_FLOOR_TITLE = ("noise floor, not judged: ORIGINAL's own drift (default against disabled optimisations: "
                     "the allowance), device noise, or ORIGINAL against the stored outputs")


def report_lines(report: VerifyReport) -> list[str]:
    """The report as plain lines: header, notes, one line per output and run (then the noise
    floor's, prefixed ``noise floor:``), the summary."""
    lines = _header_lines(report)
    lines += [f"note: {note}" for note in report.notes]
    lines += [f"mismatch: {problem}" for problem in report.signature_mismatches]
    lines += [comparison_line(comparison) for comparison in report.comparisons]
    lines += [f"noise floor: {comparison_line(comparison, judged=False)}" for comparison in report.noise_floor]
    lines += precision_lines(report)
    lines.append(report.summary())
    return lines


def precision_lines(report: VerifyReport) -> list[str]:
    """--precision: how the models were converted, then one line per output and provider:
    ``TARGET: OUTPUT PROVIDER PASS|WORSE  drifts``."""
    if not report.precision_targets:
        return []
    lines = [f"converted to {', '.join(report.precision_targets)} with {report.converter}"]
    for p in report.precision:
        where = p.provider.removesuffix("ExecutionProvider")
        if p.drift is None:
            lines.append(f"{p.target}: {p.output}  {where}  not compared: {'; '.join(p.problems)}")
            continue
        d = p.drift
        text = (f"{p.target}: {p.output}  {where}  {'PASS' if p.passed else 'WORSE'}"
                + (f" ({d.channels_worse} of {d.channels} channels)" if d.channels_worse else "")
                + f"  drift from ORIGINAL float32, max per channel: ORIGINAL {d.original_max:.3g}, "
                  f"CANDIDATE {d.candidate_max:.3g} (allowed {d.factor:g}x ORIGINAL's)")
        if d.original_nonfinite or d.candidate_nonfinite:
            text += f"; inf/NaN: ORIGINAL {d.original_nonfinite}, CANDIDATE {d.candidate_nonfinite}"
        if d.worst_channels:
            axis = "whole output" if d.channel_axis is None else f"axis {d.channel_axis}"
            text += f"; worst ({axis}): " + ", ".join(
                f"channel {c.channel} {c.original:.3g} -> {c.candidate:.3g}"
                + (f" ({c.candidate_nonfinite} inf/NaN)" if c.candidate_nonfinite > c.original_nonfinite else "")
                for c in d.worst_channels)
        lines.append(text)
    return lines


def comparison_line(comparison: OutputComparison, judged: bool = True) -> str:
    """``OUTPUT  MODEL PROVIDER LEVEL  PASS|FAIL (what failed)  numbers; ...`` on one line;
    a noise-floor comparison (``judged`` False) says "not judged" and what is beyond tolerance."""
    run = comparison.subject
    where = " ".join(filter(None, [run.model, run.provider.removesuffix("ExecutionProvider"), run.optimization]))
    difference = comparison.difference
    failed = []
    if difference is not None and difference.elements_failing:
        failed.append(f"{difference.elements_failing} of {difference.elements} elements")
    if difference is not None and difference.channels_failing and difference.channel_axis is not None:
        failed.append(f"{difference.channels_failing} of {difference.channels} channels")
    if judged:
        result = ("PASS" if comparison.passed else "FAIL") + (f" ({', '.join(failed)})" if failed else "")
    else:
        result = "not judged" + (f" ({', '.join(failed)} beyond the tolerance)" if failed else "")
    return "  ".join([comparison.output, where, result, "; ".join(comparison.problems + difference_lines(comparison))])


def _header_lines(report: VerifyReport) -> list[str]:
    inputs = ", ".join(_describe_input(data) for data in report.inputs)
    source = f"random, seed {report.seed}" if report.seed is not None else f"from {report.input_source}"
    if report.reference == STORED:
        against = f"the stored outputs {report.reference_outputs}"
    elif report.reference == "original-inference":
        against = f"ORIGINAL {report.original} with its training-mode BatchNormalization in inference mode"
    else:
        against = f"ORIGINAL {report.original}"
    return [f"bnfold verify: CANDIDATE {report.candidate} against {against}",
            f"onnxruntime {report.onnxruntime_version or '-'}; ran on {', '.join(report.providers) or 'nothing'} "
            f"(offered: {', '.join(report.available_providers) or '-'}); TF32 {'allowed' if report.allow_tf32 else 'off'}",
            f"inputs ({source}, {report.runs} run(s)): {inputs}"]


def _describe_input(data: InputData) -> str:
    text = f"{data.name} {data.dtype}[{'x'.join(map(str, data.shape))}]"
    if data.range is not None and data.range_source not in (None, "standard normal"):
        text += f" in [{data.range[0]}, {data.range[1]}] ({data.range_source})"
    return text


def _comparison_table(title: str, comparisons: Sequence[OutputComparison]):
    """One row per output and run; the numbers stacked in one column so it reads in an 80-column CI log."""
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=escape(title), title_justify="left", box=box.SIMPLE_HEAD, show_lines=True)
    for column in ("output", "run", "result", "numbers"):
        table.add_column(column, overflow="fold")
    for comparison in comparisons:
        result = "PASS" if comparison.passed else "FAIL"
        difference = comparison.difference
        if difference is not None and difference.elements_failing:
            result += f"\n{difference.elements_failing} of {difference.elements}"
        if difference is not None and difference.channels_failing and difference.channel_axis is not None:
            result += f"\n{difference.channels_failing} of {difference.channels} ch"
        run = comparison.subject
        where = f"{run.model}\n{run.provider.removesuffix('ExecutionProvider')}\n{run.optimization}".strip()
        table.add_row(
            escape(comparison.output),
            escape(where),
            result,
            escape("\n".join(comparison.problems + difference_lines(comparison))),
            style=None if comparison.passed else "red",
        )
    return table


def difference_lines(comparison: OutputComparison) -> list[str]:
    difference, tolerance = comparison.difference, comparison.tolerance
    if difference is None:
        return []
    where = "equal everywhere"
    if difference.max_abs_diff_index:
        reference, subject = difference.max_abs_diff_values
        run, *index = difference.max_abs_diff_index
        where = (
            f"at run {run} index {tuple(index)} "
            f"(reference {reference:.7g}, {comparison.subject.model} {subject:.7g})"
        )
    if tolerance.atol_scaled and difference.atol_applied:
        low, high = difference.atol_applied
        atol = f"atol {tolerance.atol:g} x channel scale ({low:.3g}" + (f"..{high:.3g})" if high != low else ")")
    else:
        atol = f"atol {tolerance.atol:g}"
    lines = [
        f"max|diff| {difference.max_abs_diff:.3g} {where}",
        f"max rel {difference.max_rel_diff:.3g}, mean|diff| {difference.mean_abs_diff:.3g}, "
        f"cosine {difference.cosine_similarity:.9f}",
    ]
    axis = "whole output" if difference.channel_axis is None else f"axis {difference.channel_axis}"
    channel = f"per channel ({axis}, {difference.channels}): max ||diff||/||ref|| {difference.max_channel_rel_diff:.3g}"
    if difference.max_channel_rel_diff_channel is not None and difference.channel_axis is not None:
        channel += f" in channel {difference.max_channel_rel_diff_channel}"
    lines.append(channel + f" (bound {tolerance.channel_rtol:g})")
    lines += [
        f"NaN/Inf: reference {difference.reference_nan}/{difference.reference_inf}, "
        f"{comparison.subject.model} {difference.subject_nan}/{difference.subject_inf}",
        f"tolerance rtol {tolerance.rtol:g} {atol}; would pass with "
        f"atol {difference.min_passing_atol:.3g} or rtol {difference.min_passing_rtol:.3g}",
    ]
    if difference.noise_max is not None:
        noise = f"noise floor: ORIGINAL's own drift max {difference.noise_max:.3g}"
        if tolerance.noise_factor and difference.noise_allowance:
            low, high = difference.noise_allowance
            noise += f", allowance {tolerance.noise_factor:g}x per channel ({low:.3g}" + (
                f"..{high:.3g})" if high != low else ")")
        if difference.elements_within_noise or difference.channels_within_noise:
            noise += f": {within_noise_text([comparison])}"
        lines.append(noise)
    if comparison.top1 is not None:
        top = comparison.top1
        lines.append(f"top-1 agreement {top.agreement:.4%} ({top.agreeing} of {top.predictions}"
                     + (f", {top.near_ties} near ties" if top.near_ties else "") + ")")
    return lines
