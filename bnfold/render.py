"""How fold, inspect and train results look: rich tables on a terminal, one plain line per
site (or model) everywhere else (pipes, CI logs), never wrapped or cut, so ``grep
training-mode`` finds every BN it should. verify's report follows the same rule
(``bnfold.verification.report``) and prints its plain lines with ``print_plain``.

Model- and user-derived text (node names, paths, details) is printed literally: escaped
in rich markup, and with ASCII stand-ins where the output encoding (say cp1252) cannot
hold the table's characters.
"""

from __future__ import annotations

from pathlib import Path

from bnfold.verdict import site_detail


def can_encode(console, text: str) -> bool:
    encoding = getattr(console.file, "encoding", None) or "utf-8"
    try:
        text.encode(encoding)
    except (UnicodeEncodeError, LookupError):
        return False
    return True


def _print_lines(console, lines: list[str]) -> None:
    for line in lines:
        console.print(line, markup=False, highlight=False, soft_wrap=True, emoji=False)


def print_plain(console, lines: list[str]) -> None:
    """Lines as they are, one per line: no markup, no wrapping, ASCII stand-ins where the
    output encoding cannot hold a character (what every command prints off a terminal)."""
    _print_lines(console, [_ascii_safe(console, line) for line in lines])


def _ascii_safe(console, text: str) -> str:
    if can_encode(console, text):
        return text
    encoding = getattr(console.file, "encoding", None) or "ascii"
    return text.encode(encoding, errors="backslashreplace").decode(encoding)


def ledger_lines(ledger) -> list[str]:
    """One line per site: label, status, pattern or reason, detail (tab-free, two spaces)."""
    lines = []
    for e in ledger:
        what = f"{e.pattern} into {e.into}" if e.gone else (e.reason or "")
        lines.append("  ".join(filter(None, [e.label or e.node, e.op, e.graph, e.status, what, site_detail(e)])))
    return lines


def ledger_title(ledger) -> str:
    summary = ledger.summary()
    title = f"bnfold: {summary['folded']} of {summary['bn_total']} BatchNormalization folded"
    if summary["decomposed"]:
        title += f", {summary['decomposed']} decomposed"
    if summary["other_folded"]:
        title += f", {summary['other_folded']} other affine op(s) folded"
    if summary["merged"]:
        title += f", {summary['merged']} sum(s) of branches merged into one conv"
    return title


def readiness_lines(ledger) -> list[str]:
    """One line on the BNs the output still has readiness problems with, and what to do."""
    from bnfold.health import hints
    from bnfold.verdict import outstanding_problems

    lines = []
    converted = [e for e in ledger.batch_norms if e.converted_from_training]
    if converted:
        lines.append(f"note: {len(converted)} training-mode BatchNormalization converted to inference form")
    troubled = [e for e in ledger.batch_norms if outstanding_problems(e)]
    if troubled:
        codes = sorted({p for e in troubled for p, _ in outstanding_problems(e)})
        lines.append(f"warning: {len(troubled)} BatchNormalization not inference-ready ({', '.join(codes)}); "
                     "see `bnfold inspect`")
        lines += hints(codes)
    return lines


def size_line(ledger, sizes: tuple[int | None, int | None] | None, op_changes: dict | None = None) -> str:
    """Before/after in one line, as onnxsim and OnnxSlim print it: the op counts that
    changed (else the BN count), and the size on disk (model file and external data)."""
    summary = ledger.summary()
    if op_changes:
        ops = ", ".join(f"{op} {a} -> {b}" for op, (a, b) in op_changes.items())
    else:
        left = summary["bn_total"] - summary["folded"] - summary["decomposed"]
        ops = f"BatchNormalization {summary['bn_total']} -> {left}"
    known = sizes is not None and None not in sizes
    return f"ops: {ops}" + (f"; {_mib(sizes[0])} -> {_mib(sizes[1])}" if known else "")


def _mib(size: int) -> str:
    return f"{size / 2**20:.2f} MiB" if size >= 2**20 else f"{size / 1024:.1f} KiB"


def render_ledger(ledger, out: Path, console, sizes: tuple[int | None, int | None] | None = None,
                  op_changes: dict | None = None) -> None:
    """The fold ledger: a table on a terminal, plain lines otherwise; with targets, the
    precision figures and problems; then the summary. ``sizes``: bytes on disk of the
    input and of OUT, each with its external data."""
    if console.is_terminal:
        _ledger_table(ledger, console)
    else:
        _print_lines(console, [ledger_title(ledger), *(_ascii_safe(console, line) for line in ledger_lines(ledger))])
    if ledger.targets:
        render_precision(list(ledger), ledger.targets, console)
        flagged = [e for e in ledger if e.precision_problems]
        if flagged:
            from bnfold.verdict import precision_codes

            _print_lines(console, [f"warning: {len(flagged)} folded site(s) with precision problems for "
                                   f"{', '.join(ledger.targets)} ({', '.join(precision_codes(flagged))}); "
                                   "--strict fails on them"])
    tail = readiness_lines(ledger)
    tail.append(size_line(ledger, sizes, op_changes))
    tail.append(f"wrote {out}")
    _print_lines(console, [_ascii_safe(console, line) for line in tail])


# --- precision (--target) ---------------------------------------------------------------


def _ratio(value) -> str:
    return "n/a" if value is None else ("inf" if value == float("inf") else f"{value:.3g}x")


def _db(value) -> str:
    return "n/a" if value is None else ("exact" if value == float("inf") else f"{value:.1f}")


def _change(change, show, arrow: str, unit: str = "") -> str:
    return f"{show(change.before)} {arrow} {show(change.after)}{unit}"


def tensor_name(figures) -> str:
    """``'conv1.weight'``, or what a new tensor is (``new bias``)."""
    return repr(figures.tensor) if figures.tensor else f"new {figures.role}"


def figure_parts(figures, arrow: str = "->") -> list[str]:
    """A measured tensor's figures, before and after the fold, a few words each."""
    parts = []
    if figures.growth is not None:
        parts.append(f"growth {_ratio(figures.growth)}")
    if figures.spread is not None:
        parts.append(f"spread ({figures.scaled} channels) {_change(figures.spread, _ratio, arrow)}")
    for name in ("fp16", "bf16"):
        counts = getattr(figures, name)
        if counts is not None:
            parts.append(f"{name} overflow {_change(counts.overflow, str, arrow)}, "
                         f"underflow {_change(counts.underflow, str, arrow)}")
    if figures.int8 is not None:
        parts.append(f"int8 SQNR per tensor {_change(figures.int8.per_tensor_sqnr_db, _db, arrow, ' dB')}")
        parts.append(f"per channel {_change(figures.int8.per_channel_sqnr_db, _db, arrow, ' dB')}")
    return parts


def precision_lines(entries) -> list[str]:
    """One plain line per measured tensor of every folded site: what folded it, the tensor,
    its figures before and after the fold."""
    lines = []
    for e in entries:
        if e.precision is None:
            continue
        for t in e.precision.tensors:
            shape = "x".join(str(d) for d in t.shape)
            lines.append(f"precision: {e.label or e.node or e.op}: {t.op} {t.node!r} {t.role} {tensor_name(t)} "
                         f"[{shape}]: " + "; ".join(figure_parts(t)))
    return lines


def precision_problem_lines(entries) -> list[str]:
    """Each precision problem in full (code, tensor, channels, facts), then what to do."""
    from bnfold.precision import hints

    problems = [p for e in entries for p in e.precision_problems]
    return [f"{p.code}: {p.detail}" for p in problems] + hints(p.code for p in problems)


def render_precision(entries, targets, console) -> None:
    """The precision figures of every measured tensor (a table on a terminal, a line each
    otherwise), then the problems and hints."""
    if console.is_terminal:
        arrow = "→" if can_encode(console, "→") else "->"
        rows = []
        for e in entries:
            if e.precision is None:
                continue
            for t in e.precision.tensors:
                below = f"{t.role} of {t.op} {t.node!r}"
                rows.append((t.tensor or f"new {t.role}", below, [_ratio(t.growth), "\n".join(figure_parts(t, arrow)[1:]
                             if t.growth is not None else figure_parts(t, arrow))],
                             "red" if any(p.tensor == t.tensor for p in e.precision_problems) else None))
        if rows:
            _two_line_table(console, f"precision for {', '.join(targets)}: before {arrow} after the fold",
                            ["tensor: what it is", "growth", "figures"], rows, 24)
    else:
        _print_lines(console, [_ascii_safe(console, line) for line in precision_lines(entries)])
    _print_lines(console, [_ascii_safe(console, line) for line in precision_problem_lines(entries)])


def middle_ellipsis(text: str, width: int) -> str:
    """``text`` cut to ``width`` characters by replacing its middle with an ellipsis: long
    exporter names differ at both ends (``node__native_batch_norm_legit_no_training_3__0``)."""
    if len(text) <= width:
        return text
    tail = (width - 1) // 2
    return text[: width - 1 - tail] + "…" + text[len(text) - tail:]


def _two_line_table(console, title: str, headers: list[str], rows: list[tuple[str, str, list[str], str | None]],
                    free_min: int) -> None:
    """A table whose rows are two lines at any console width: the first column holds a
    name and, below it, what became of it; then short fixed columns, of which the third
    (``headers[2]``) is free text that wraps. Widths are set here (rich would crop the table
    rather than wrap it at 80 columns): the fixed columns as wide as their content, the
    free text down to ``free_min``, the name column the rest. A name wider than that
    loses its middle to an ellipsis (the plain output and ``--json`` keep it whole).

    ``rows``: (name, below the name, the other cells, style)."""
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    fancy = can_encode(console, "┃━…" + "".join(headers))
    table = Table(title=escape(_ascii_safe(console, title)), box=box.HEAVY_HEAD if fancy else box.ASCII)
    cells = [[_ascii_safe(console, c) for c in other] for _, _, other, _ in rows]
    natural = [max([len(header), *(len(line) for row in cells for line in row[i].splitlines())])
               for i, header in enumerate(headers[1:])]
    free = 1  # headers[2], among the cells after the name
    fixed = sum(width for i, width in enumerate(natural) if i != free)
    room = console.width - (3 * len(headers) + 1) - fixed
    first = max([len(headers[0]), *(max(len(name), 2 + len(below)) for name, below, _, _ in rows)])
    first = min(first, max(20, room - min(natural[free], free_min)))
    natural[free] = max(6, min(natural[free], room - first))
    table.add_column(headers[0], overflow="fold", width=first)
    for i, header in enumerate(headers[1:]):
        table.add_column(header, overflow="fold", no_wrap=i != free, width=natural[i])
    for (name, below, _, style), other in zip(rows, cells):
        name = _ascii_safe(console, name)
        head = middle_ellipsis(name, first) if fancy else name
        table.add_row(escape(f"{head}\n  {_ascii_safe(console, below)}"), *(escape(c) for c in other), style=style)
    console.print(table)


def _ledger_table(ledger, console) -> None:
    """One row per site, two lines each: the site's name, then what became of it
    (``into CONV (conv-bn)``, or the reason it stays)."""
    rows = []
    for e in ledger:
        what = f"into {e.into} ({e.pattern})" if e.gone else (f"{e.pattern} ({e.reason})" if e.pattern else e.reason)
        what = "  ".join(filter(None, [None if e.is_bn else e.op, what, None if e.graph == "main" else f"in {e.graph}"]))
        change = f"{e.max_rel_weight_change:.3g}" if e.max_rel_weight_change is not None else ""
        rows.append((e.label or e.node, what or "", [e.status, site_detail(e), change],
                     "red" if e.problems else (None if e.gone else "yellow")))
    delta = "Δw" if can_encode(console, "Δ") else "dw"
    _two_line_table(console, ledger_title(ledger), ["site: what became of it", "status", "detail", delta], rows, 14)
    if ledger.folded:
        _print_lines(console, [f"{delta}: largest relative change of a folded weight (max |s - 1|)"])


def findings_lines(findings) -> list[str]:
    from bnfold.verdict import precision_notes

    lines = []
    for f in findings:
        problems = "; ".join([f"{p}: {d}" for p, d in zip(f.problems, f.details)] + precision_notes(f))
        lines.append("  ".join(filter(None, [f.bn, f.graph, "ready" if f.ok else "NOT-READY", problems, f.plan])))
    return lines


def findings_title(findings) -> str:
    ready = sum(f.ok for f in findings)
    return f"bnfold inspect: {ready} of {len(findings)} BatchNormalization inference-ready"


def render_findings(findings, console, model: Path | None = None, ledger=None) -> None:
    """The inspect findings; ``model`` names the file when several are audited; then a
    hint for each kind of problem found; with targets (``ledger.targets``) the precision
    figures and problems of every planned fold."""
    from bnfold.health import hints
    from bnfold.verdict import precision_notes

    title = findings_title(findings) + (f" in {model}" if model is not None else "")
    advice = hints(p for f in findings for p in f.problems)
    if not console.is_terminal:
        _print_lines(console, [_ascii_safe(console, title), *(_ascii_safe(console, x) for x in findings_lines(findings)),
                               *advice])
    else:
        rows = [(f.bn, "  ".join(filter(None, [f.plan, None if f.graph == "main" else f"in {f.graph}"])),
                 ["yes" if f.ok else "NO", "; ".join([f"{p}: {d}" for p, d in zip(f.problems, f.details)]
                                                     + precision_notes(f))],
                 None if f.ok and not f.precision_problems else "red") for f in findings]
        _two_line_table(console, title, ["BN: fold plan", "ready", "problems"], rows, 20)
        _print_lines(console, advice)
    if ledger is not None and ledger.targets:
        render_precision(list(ledger), ledger.targets, console)


def zoo_lines(entries, out) -> list[str]:
    """``bnfold train``'s manifest entries, one line per model."""
    lines = [f"bnfold train: {len(entries)} model(s) -> {out}"]
    for e in entries:
        metric = f"test accuracy {e['test_accuracy']:.4f}" if e["test_accuracy"] is not None \
            else f"test mse {e['test_mse']:.5f}"
        lines.append("  ".join([e["file"], e["exporter"], f"opset {e['opset']}", f"BN {e['bn_count']}", metric,
                                e["health"], f"{e['size_bytes'] / 1024:.0f} KiB"]))
    return lines


def render_zoo(entries, out, console) -> None:
    """The trained zoo: a table on a terminal, plain lines otherwise."""
    if not console.is_terminal:
        print_plain(console, zoo_lines(entries, out))
        return
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=escape(f"bnfold train: {len(entries)} model(s) -> {out}"))
    for column in ("file", "exporter", "opset", "BN", "test accuracy", "health", "KiB"):
        table.add_column(column, no_wrap=column == "file")
    for e in entries:
        metric = f"{e['test_accuracy']:.4f}" if e["test_accuracy"] is not None else f"mse {e['test_mse']:.5f}"
        table.add_row(e["file"], e["exporter"], str(e["opset"]), str(e["bn_count"]), metric, e["health"],
                      f"{e['size_bytes'] / 1024:.0f}", style=None if e["health"] == "healthy" else "yellow")
    console.print(table)
