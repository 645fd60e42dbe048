"""The ``bnfold`` command line: thin commands over the library API.

Every command turns a ``BnfoldError`` into one line on stderr and its exit code
(0 ok, 1 a check failed, 2 bad input or usage); see README "Exit codes".
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from bnfold.errors import EXIT_BAD_INPUT, EXIT_CHECK_FAILED, BnfoldError, InputError

EXIT_INTERNAL = 3

app = typer.Typer(
    name="bnfold",
    help="Audit, fold and verify BatchNormalization in ONNX models.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)


def reports_errors(command):
    """Print a BnfoldError as one line and exit with its code, never a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except BnfoldError as exc:
            err_console.print(f"bnfold: error: {exc}", markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except (typer.Exit, typer.Abort, KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:
            if os.environ.get("BNFOLD_DEBUG"):
                raise
            err_console.print(
                f"bnfold: internal error: {type(exc).__name__}: {exc} (set BNFOLD_DEBUG=1 for a traceback)",
                markup=False, highlight=False, soft_wrap=True,
            )
            raise typer.Exit(EXIT_INTERNAL) from None

    return wrapper


def default_output(path: Path) -> Path:
    """``model.onnx`` -> ``model.folded.onnx`` beside it."""
    stem = path.name[: -len(".onnx")] if path.name.endswith(".onnx") else path.name
    return path.with_name(f"{stem}.folded.onnx")


def write_json(path: Path, payload: dict) -> None:
    """Write a report atomically: a reader never sees half a JSON file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(json.dumps(payload, indent=2) + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise InputError(f"{path}: cannot write JSON report ({exc.strerror or exc})") from None


@app.command()
@reports_errors
def fold(
    model: Path = typer.Argument(..., help="Input ONNX model (never modified)."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Output path [default: IN with .folded.onnx]."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the ledger as JSON to this file."),
    external_data: Optional[str] = typer.Option(
        None, "--external-data", help="Write weights to this file (relative to OUT) instead of the default."),
    embed: bool = typer.Option(False, "--embed", help="Embed all weights in OUT (refused above 2 GB)."),
    in_place: bool = typer.Option(False, "--in-place", help="Allow OUT to be the input path."),
    strict: bool = typer.Option(False, "--strict", help="Exit 1 if any BatchNormalization is kept."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print nothing but errors."),
) -> None:
    """Fold every foldable BatchNormalization of MODEL into its neighbour and write OUT."""
    from bnfold.engine import fold as fold_model

    out = output or default_output(model)
    if out.resolve() == model.resolve() and not in_place:
        raise InputError(f"{out}: output is the input; pass --in-place to overwrite it")
    if embed and external_data:
        raise InputError("--embed and --external-data exclude each other")
    result = fold_model(model)
    result.save(out, external_data=False if embed else (external_data or None))
    if json_path:
        write_json(json_path, result.ledger.to_dict(input=str(model), output=str(out)))
    if not quiet:
        render_ledger(result.ledger, out)
    if strict and result.ledger.kept:
        raise typer.Exit(EXIT_CHECK_FAILED)


@app.command()
@reports_errors
def inspect(
    model: Path = typer.Argument(..., help="ONNX model to audit."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the findings as JSON to this file."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print nothing but errors."),
) -> None:
    """Audit every BatchNormalization: inference mode, statistics health, fold plan.

    Exit 0 when every BN is inference-ready, 1 when any is not.
    """
    from bnfold.audit import findings_to_dict, inspect as inspect_model

    findings = inspect_model(model)
    if json_path:
        write_json(json_path, findings_to_dict(findings, input=str(model)))
    if not quiet:
        render_findings(findings)
    if any(not f.ok for f in findings):
        raise typer.Exit(EXIT_CHECK_FAILED)


def render_ledger(ledger, out: Path) -> None:
    table = Table(title=f"bnfold: {len(ledger.folded)} of {len(ledger)} BatchNormalization folded -> {out}")
    for column in ("BN", "graph", "status", "into / reason", "detail", "max rel Δw"):
        table.add_column(column, overflow="fold")
    for e in ledger:
        target = f"{e.into} ({e.pattern})" if e.folded else e.reason
        change = f"{e.max_rel_weight_change:.3g}" if e.max_rel_weight_change is not None else ""
        table.add_row(e.bn, e.graph, e.status, target, e.detail, change,
                      style=None if e.folded else "yellow")
    console.print(table)


def render_findings(findings) -> None:
    ready = sum(f.ok for f in findings)
    table = Table(title=f"bnfold inspect: {ready} of {len(findings)} BatchNormalization inference-ready")
    for column in ("BN", "graph", "ready", "problems", "fold plan"):
        table.add_column(column, overflow="fold")
    for f in findings:
        problems = "; ".join(f"{p}: {d}" for p, d in zip(f.problems, f.details))
        table.add_row(f.bn, f.graph, "yes" if f.ok else "NO", problems, f.plan,
                      style=None if f.ok else "red")
    console.print(table)


def _terminate(signum, frame):
    # Raising lets the atomic writers' cleanup run; the default action would not.
    raise SystemExit(128 + signum)


def main() -> None:
    signal.signal(signal.SIGTERM, _terminate)
    app()
