"""How fold, inspect and train results look: rich tables on a terminal, one plain line per
site (or model) everywhere else (pipes, CI logs), never wrapped or cut, so ``grep
training-mode`` finds every BN it should. verify's report follows the same rule
(``bnfold.verification.report``) and prints its plain lines with ``print_plain``.

Model- and user-derived text (node names, paths, details) is printed literally: escaped
in rich markup, and with ASCII stand-ins where the output encoding (say cp1252) cannot
hold the table's characters.
"""

from __future__ import annotations

import os
from pathlib import Path


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


def entry_detail(e) -> str:
    """A site's route, detail and readiness problems, in one text."""
    problems = (f"{p}: {d}" for p, d in zip(e.problems, e.problem_details))
    return "; ".join(filter(None, [e.route, e.detail, *problems]))


def ledger_lines(ledger) -> list[str]:
    """One line per site: label, status, pattern or reason, detail (tab-free, two spaces)."""
    lines = []
    for e in ledger:
        what = f"{e.pattern} into {e.into}" if e.folded else (e.reason or "")
        detail = entry_detail(e)
        lines.append("  ".join(filter(None, [e.label or e.node, e.op, e.graph, e.status, what, detail])))
    return lines


def ledger_title(ledger) -> str:
    summary = ledger.summary()
    title = f"bnfold: {summary['folded']} of {summary['bn_total']} BatchNormalization folded"
    if summary["decomposed"]:
        title += f", {summary['decomposed']} decomposed"
    if summary["other_folded"]:
        title += f", {summary['other_folded']} other affine op(s) folded"
    return title


def readiness_lines(ledger) -> list[str]:
    """One line on the BNs that are not inference-ready, and how to act on training mode."""
    troubled = [e for e in ledger.batch_norms if e.problems]
    if not troubled:
        return []
    codes = sorted({p for e in troubled for p in e.problems})
    lines = [f"warning: {len(troubled)} BatchNormalization not inference-ready ({', '.join(codes)}); "
             "see `bnfold inspect`"]
    if any(e.reason == "training-mode" and e.status == "kept" for e in troubled):
        lines.append("hint: --to-inference converts training-mode BNs whose running-stat outputs are unused")
    return lines


def size_line(before: Path, after: Path, ledger, op_changes: dict | None = None) -> str:
    """Before/after in one line, as onnxsim and OnnxSlim print it: the op counts that
    changed (else the BN count), and the file size."""
    summary = ledger.summary()
    if op_changes:
        ops = ", ".join(f"{op} {a} -> {b}" for op, (a, b) in op_changes.items())
    else:
        left = summary["bn_total"] - summary["folded"] - summary["decomposed"]
        ops = f"BatchNormalization {summary['bn_total']} -> {left}"
    sizes = ""
    try:
        sizes = f"; {_mib(os.path.getsize(before))} -> {_mib(os.path.getsize(after))}"
    except OSError:
        pass
    return f"ops: {ops}{sizes}"


def _mib(size: int) -> str:
    return f"{size / 2**20:.2f} MiB" if size >= 2**20 else f"{size / 1024:.1f} KiB"


def render_ledger(ledger, out: Path, console, source: Path | None = None, op_changes: dict | None = None) -> None:
    """The fold ledger: a table on a terminal, plain lines otherwise; then the summary."""
    if console.is_terminal:
        _ledger_table(ledger, console)
    else:
        _print_lines(console, [ledger_title(ledger), *(_ascii_safe(console, line) for line in ledger_lines(ledger))])
    tail = readiness_lines(ledger)
    if source is not None:
        tail.append(size_line(source, out, ledger, op_changes))
    tail.append(f"wrote {out}")
    _print_lines(console, [_ascii_safe(console, line) for line in tail])


def _ledger_table(ledger, console) -> None:
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    fancy = can_encode(console, "┃━Δ")
    table = Table(title=ledger_title(ledger), box=box.HEAVY_HEAD if fancy else box.ASCII)
    for column in ("node", "op", "graph", "status", "into / reason", "detail",
                   "max rel Δw" if fancy else "max rel dw"):
        table.add_column(column, overflow="fold")
    for e in ledger:
        target = f"{e.into} ({e.pattern})" if e.folded else (f"{e.pattern} ({e.reason})" if e.pattern else e.reason)
        change = f"{e.max_rel_weight_change:.3g}" if e.max_rel_weight_change is not None else ""
        detail = entry_detail(e)
        cells = [e.label or e.node, "BN" if e.is_bn else e.op, e.graph, e.status, target or "", detail, change]
        table.add_row(*(escape(_ascii_safe(console, c)) for c in cells),
                      style="red" if e.problems else (None if e.folded else "yellow"))
    console.print(table)


def findings_lines(findings) -> list[str]:
    lines = []
    for f in findings:
        problems = "; ".join(f"{p}: {d}" for p, d in zip(f.problems, f.details))
        lines.append("  ".join(filter(None, [f.bn, f.graph, "ready" if f.ok else "NOT-READY", problems, f.plan])))
    return lines


def findings_title(findings) -> str:
    ready = sum(f.ok for f in findings)
    return f"bnfold inspect: {ready} of {len(findings)} BatchNormalization inference-ready"


def render_findings(findings, console, model: Path | None = None) -> None:
    """The inspect findings; ``model`` names the file when several are audited."""
    title = findings_title(findings) + (f" in {model}" if model is not None else "")
    if not console.is_terminal:
        _print_lines(console, [_ascii_safe(console, title), *(_ascii_safe(console, x) for x in findings_lines(findings))])
        return
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=escape(_ascii_safe(console, title)), box=box.HEAVY_HEAD if can_encode(console, "┃━") else box.ASCII)
    for column in ("BN", "graph", "ready", "problems", "fold plan"):
        table.add_column(column, overflow="fold")
    for f in findings:
        problems = "; ".join(f"{p}: {d}" for p, d in zip(f.problems, f.details))
        cells = [f.bn, f.graph, "yes" if f.ok else "NO", problems, f.plan]
        table.add_row(*(escape(_ascii_safe(console, c)) for c in cells), style=None if f.ok else "red")
    console.print(table)


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
