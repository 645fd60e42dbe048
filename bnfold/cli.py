"""The ``bnfold`` command line: thin commands over the library API.

Every command turns a ``BnfoldError`` into one line on stderr and its exit code
(0 ok, 1 a check failed, 2 bad input or usage); see README "Exit codes".
"""

# No ``from __future__ import annotations`` here: typer would eval every parameter's
# annotation string at each start (~4 ms).
import functools
import gc
import json
import os
import signal
import sys
from pathlib import Path
from typing import Callable, NoReturn, Optional

import typer

from bnfold.errors import EXIT_CHECK_FAILED, BnfoldError, InputError

EXIT_INTERNAL = 3
#: What a shell reports for a process killed by SIGPIPE: the reader of our output went away.
SIGPIPE_EXIT = 128 + 13

app = typer.Typer(
    name="bnfold",
    help="Audit, fold and verify BatchNormalization in ONNX models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _show_version(value: bool) -> None:
    if value:
        from bnfold import __version__

        print(f"bnfold {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: bool = typer.Option(False, "--version", callback=_show_version, is_eager=True,
                                 help="Print bnfold's version and exit."),
) -> None:
    """Audit, fold and verify BatchNormalization in ONNX models."""


@functools.cache
def console():
    """stdout's rich Console, made on first use: rich costs ~35 ms to import, which
    ``fold -q`` (the CI case) never needs."""
    return _console_class()()


@functools.cache
def err_console():
    return _console_class()(stderr=True)


@functools.cache
def _console_class():
    from rich.console import Console

    class PipeAwareConsole(Console):
        """rich ends a run whose reader went away with exit 1, which reads as a failed
        check; bnfold exits as a process killed by SIGPIPE would."""

        def on_broken_pipe(self) -> None:
            self.quiet = True
            _quiet_stdout()
            raise SystemExit(SIGPIPE_EXIT)

    return PipeAwareConsole


def reports_errors(command):
    """Print a BnfoldError as one line and exit with its code, never a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except BnfoldError as exc:
            err_console().print(f"bnfold: error: {exc}", markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except BrokenPipeError:  # the reader went away (``| head``): not a failed check
            _quiet_stdout()
            raise SystemExit(SIGPIPE_EXIT) from None
        except (typer.Exit, typer.Abort, KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:
            if os.environ.get("BNFOLD_DEBUG"):  # the traceback, and still the exit code of a bug
                import traceback

                sys.stderr.flush()
                traceback.print_exc(file=sys.stderr)
                sys.stderr.flush()
                raise typer.Exit(EXIT_INTERNAL) from None
            err_console().print(
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
    """Write a JSON report (see ``write_report``)."""
    write_report(path, json.dumps(payload, indent=2) + "\n", "JSON report")


def write_report(path: Path, text: str, what: str) -> None:
    """Write a report: ``-`` is stdout; a regular file is replaced atomically (through a
    symlink to it, the link stays); a device or FIFO is written directly."""
    from bnfold.save import output_target

    if str(path) == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    target, direct = output_target(path, what)
    if direct:
        try:
            with open(target, "w") as handle:
                handle.write(text)
        except OSError as exc:
            raise InputError(f"{path}: cannot write the {what} ({exc.strerror or exc})") from None
        return
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, target)
    except OSError as exc:
        raise InputError(f"{path}: cannot write the {what} ({exc.strerror or exc})") from None
    finally:
        tmp.unlink(missing_ok=True)  # after a failure or an interrupt; gone already on success


def human_console(json_path: Optional[Path]):
    """Where the human-readable output goes: stderr when the JSON report takes stdout."""
    return err_console() if json_path is not None and str(json_path) == "-" else console()


def summary_on_stderr(line: str) -> None:
    """With -q, a failed check still says what failed, in one line."""
    err_console().print(f"bnfold: {line}", markup=False, highlight=False, soft_wrap=True)


def naming_input(path: Path, call):
    """Return ``call()``; an InputError that does not name the file yet gets ``path`` prepended."""
    try:
        return call()
    except InputError as exc:
        if str(exc).startswith(f"{path}:"):
            raise
        raise InputError(f"{path}: {exc}") from None


def refuse_overwriting_input(model: Path, source, writes: list[tuple[str, Path]], in_place: bool = False) -> None:
    """No file a command writes may replace the input model or its external data; with
    ``--in-place`` only OUT (and its weights) may replace the input's own files."""
    from bnfold.load import external_data_files

    protected = {model.resolve()} | external_data_files(source)
    written: set[Path] = set()
    for what, path in writes:
        if str(path) == "-" or path.is_char_device():
            continue  # stdout, /dev/null: written through, nothing is replaced
        target = path.resolve()
        allowed = in_place and what in ("output", "weights file")
        if (target in protected and not allowed) or target in written:
            raise InputError(f"{path}: the {what} would overwrite the input model {model}, its "
                             "external data or another output; choose another path")
        written.add(target)


# Options shared by `verify` and `fold --verify`; their meaning is in docs/verify.md.
JUNIT = typer.Option(None, "--junit", metavar="FILE",
                     help="Also write a JUnit XML report (one testcase per BN site, or per output and provider).")
VERIFY_PROVIDERS = typer.Option(
    "auto", "--providers", help="cpu, cuda, or auto (CUDA when onnxruntime can use it); CPU always runs.")
VERIFY_INPUTS = typer.Option(
    None, "--inputs", help="Real inputs: .npz with one array per input name, samples along axis 0.")
VERIFY_SAMPLES = typer.Option(None, "--samples", help="Random input sets to run (default 1).")
VERIFY_BATCH = typer.Option(None, "--batch", help="Size of dynamic first dimensions (default 2).")
VERIFY_SHAPES = typer.Option(
    None, "--shape", help="NAME:1x3x224x224 (or NAME:1,3,224,224, NAME:[1,3,224,224], NAME=1x3x224x224) for an "
    "input's dynamic dims (repeatable).")
VERIFY_SEED = typer.Option(None, "--seed", help="Seed of the random inputs (default 0).")
VERIFY_RTOL = typer.Option(None, "--rtol", help="Relative tolerance for all outputs (default by dtype).")
VERIFY_ATOL = typer.Option(
    None, "--atol", help="Absolute tolerance for all outputs, used as given (default by dtype, times "
    "max(1, max |output channel|) for each channel).")
VERIFY_ALLOW_TF32 = typer.Option(False, "--allow-tf32", help="Let CUDA use TF32 (off: it changes fp32 results).")
VERIFY_INPUT_RANGE = typer.Option(
    None, "--input-range", help="NAME=LO,HI (inclusive) for an input's random values, or LO,HI for all (repeatable).")
VERIFY_CHANNEL_RTOL = typer.Option(
    None, "--channel-rtol", help="Bound of each channel's ||diff||/||ref|| (default by dtype: 1e-3 for float32).")
VERIFY_NOISE_FACTOR = typer.Option(
    None, "--noise-factor", help="Times ORIGINAL's own drift (default vs disabled optimisations, per channel) "
    "a float output may differ on top of the tolerances (default 4; 0: none).")
VERIFY_CHANNEL_AXIS = typer.Option(
    None, "--channel-axis", help="OUTPUT=AXIS (or AXIS for all outputs): where channels lie (default: read from the graph, else 1).")
VERIFY_METRIC = typer.Option(None, "--metric", help="Extra per-output view: top1 (argmax agreement); repeatable.")
VERIFY_REFERENCE_OUTPUTS = typer.Option(
    None, "--reference-outputs", help="Compare against these stored outputs (.npz keyed by output name); needs --inputs.")
VERIFY_SAVE_OUTPUTS = typer.Option(None, "--save-outputs", help="Write the reference (ORIGINAL's CPU) outputs to this .npz.")
VERIFY_SAVE_INPUTS = typer.Option(None, "--save-inputs", help="Write the inputs used to this .npz (--inputs reads it).")
VERIFY_PRECISION = typer.Option(
    None, "--precision", metavar="fp16", help="Also run both models converted to fp16 (needs bnfold[precision]) and "
    "fail where the fold makes fp16 worse than ORIGINAL's own fp16 drift.")
TARGET = typer.Option(
    None, "--target", metavar="fp16|bf16|int8",
    help="Measure what each fold does to this next step's precision (repeatable): growth, channel range spread, "
         "fp16/bf16 overflow and underflow, int8 SQNR; see docs/precision.md.")


def verify_options(**fields):
    """VerifyOptions from the shared CLI values (parsing --shape, --input-range, --channel-axis)."""
    from bnfold.verification import VerifyOptions, parse_channel_axes, parse_input_ranges, parse_shapes

    return VerifyOptions(shapes=parse_shapes(fields.pop("shape") or []),
                         input_ranges=parse_input_ranges(fields.pop("input_range") or []),
                         channel_axes=parse_channel_axes(fields.pop("channel_axis") or []),
                         metrics=tuple(fields.pop("metric") or ()), precision=tuple(fields.pop("precision") or ()),
                         **fields)


@app.command()
@reports_errors
def fold(
    models: list[Path] = typer.Argument(..., metavar="MODEL...",
                                        help="Input ONNX model (never modified); several, or folders, with --out-dir."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Output path (default: IN with .folded.onnx)."),
    out_dir: Optional[Path] = typer.Option(
        None, "--out-dir", help="Fold several models (files, or folders searched for *.onnx) into this folder, "
                                "keeping their relative paths."),
    jobs: int = typer.Option(1, "--jobs", "-j", min=1, help="With --out-dir: fold this many models at once (processes)."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the ledger as JSON to this file (- for stdout)."),
    junit: Optional[Path] = JUNIT,
    external_data: Optional[str] = typer.Option(
        None, "--external-data", help="Write weights to this file (relative to OUT) instead of the default."),
    embed: bool = typer.Option(False, "--embed", help="Embed all weights in OUT (refused above 2 GB)."),
    in_place: bool = typer.Option(False, "--in-place", help="Allow OUT to be the input path."),
    strict: bool = typer.Option(False, "--strict", help="Exit 1 if any BatchNormalization is kept or not inference-ready (its problems are listed)."),
    fold_overridable: bool = typer.Option(
        False, "--fold-overridable", help="Fold parameters that are initializers and graph inputs (IR >= 4); drops those inputs."),
    decompose_standalone: bool = typer.Option(
        False, "--decompose-standalone", help="Rewrite a BN with no linear neighbour as one Mul and one Add."),
    to_inference: bool = typer.Option(
        False, "--to-inference", help="Convert training-mode BNs (running-stat outputs unused) to inference form, then fold."),
    no_merge_branches: bool = typer.Option(
        False, "--no-merge-branches",
        help="Keep parallel conv branches of one tensor that meet in a sum (by default they merge into one conv, exactly)."),
    recalibrate_data: Optional[Path] = typer.Option(
        None, "--recalibrate", metavar="DATA.npz",
        help="First recompute every BN's running statistics from these inputs (as `bnfold recalibrate`), then fold."),
    target: Optional[list[str]] = TARGET,
    keep: Optional[list[str]] = typer.Option(
        None, "--keep", metavar="NAME", help="Leave this BN (or Mul/Add/Sub/Div site) as it is (repeatable)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print nothing but errors."),
    verify_output: bool = typer.Option(
        False, "--verify", help="Verify OUT against MODEL in onnxruntime, like `bnfold verify`; exit 1 on a mismatch."),
    providers: str = VERIFY_PROVIDERS,
    inputs: Optional[Path] = VERIFY_INPUTS,
    samples: Optional[int] = VERIFY_SAMPLES,
    batch: Optional[int] = VERIFY_BATCH,
    shape: Optional[list[str]] = VERIFY_SHAPES,
    seed: Optional[int] = VERIFY_SEED,
    rtol: Optional[float] = VERIFY_RTOL,
    atol: Optional[float] = VERIFY_ATOL,
    allow_tf32: bool = VERIFY_ALLOW_TF32,
    input_range: Optional[list[str]] = VERIFY_INPUT_RANGE,
    channel_rtol: Optional[float] = VERIFY_CHANNEL_RTOL,
    noise_factor: Optional[float] = VERIFY_NOISE_FACTOR,
    channel_axis: Optional[list[str]] = VERIFY_CHANNEL_AXIS,
    metric: Optional[list[str]] = VERIFY_METRIC,
    reference_outputs: Optional[Path] = VERIFY_REFERENCE_OUTPUTS,
    save_outputs: Optional[Path] = VERIFY_SAVE_OUTPUTS,
    save_inputs: Optional[Path] = VERIFY_SAVE_INPUTS,
    precision: Optional[list[str]] = VERIFY_PRECISION,
    verify_json: Optional[Path] = typer.Option(None, "--verify-json", help="With --verify: write its report as JSON."),
    keep_on_failure: bool = typer.Option(
        False, "--keep-on-failure", help="With --verify: keep OUT when verification fails (it is removed otherwise)."),
) -> None:
    """Fold every foldable BatchNormalization of MODEL into its neighbour and write OUT.

    Exit 0 when OUT was written (with --strict: every BN folded and inference-ready, and
    with --target no precision problem; with --verify: OUT verified), 1 when one of those
    checks failed, 2 on bad input (with several models: the worst of them).
    """
    from bnfold.engine import FoldOptions, fold as fold_model

    options = FoldOptions(fold_overridable=fold_overridable, decompose_standalone=decompose_standalone,
                          to_inference=to_inference, merge_branches=not no_merge_branches,
                          targets=tuple(target or ()), keep=frozenset(keep or ()))
    if out_dir is None and len(models) == 1 and models[0].is_dir():
        raise InputError(f"{models[0]}: is a directory; fold the models in it with --out-dir DIR")
    if out_dir is not None or len(models) > 1:
        single_only = {"-o": output, "--in-place": in_place, "--external-data": external_data,
                       "--verify": verify_output, "--recalibrate": recalibrate_data}
        given = [flag for flag, value in single_only.items() if value]
        if given or out_dir is None:
            raise InputError(f"{', '.join(given) or 'several models'}: several models are folded with --out-dir DIR"
                             + (f"; {', '.join(given)} apply to one model" if given else ""))
        fold_many(models, out_dir, options, embed=embed, jobs=jobs, strict=strict, quiet=quiet, json_path=json_path,
                  junit=junit)
        return
    model = models[0]
    out = output or default_output(model)
    if out.resolve() == model.resolve() and not in_place:
        raise InputError(f"{out}: output is the input; pass --in-place to overwrite it")
    if embed and external_data:
        raise InputError("--embed and --external-data exclude each other")
    from bnfold.save import output_target

    output_target(out, "output")  # every output is checked before anything is folded or written
    for what, report in (("JSON report", json_path), ("JSON report", verify_json), ("JUnit report", junit)):
        if report and str(report) != "-":
            output_target(report, what)
    if (verify_json or keep_on_failure) and not verify_output:
        raise InputError("--verify-json and --keep-on-failure apply only with --verify")
    if recalibrate_data and verify_output:
        raise InputError("--verify compares OUT with MODEL, which --recalibrate changes on purpose: run "
                         "`bnfold recalibrate`, then `bnfold fold --verify` on its output")
    if verify_output:
        if out.resolve() == model.resolve():
            raise InputError(f"{out}: --verify compares OUT with MODEL, so OUT must not overwrite it")
        # --to-inference changes training-mode BNs on purpose: the reference runs them in inference mode too.
        verifying = verify_options(providers=providers, inputs=inputs, samples=samples, batch=batch, shape=shape,
                                   seed=seed, rtol=rtol, atol=atol, allow_tf32=allow_tf32, input_range=input_range,
                                   channel_rtol=channel_rtol, channel_axis=channel_axis, metric=metric,
                                   reference_outputs=reference_outputs, save_outputs=save_outputs,
                                   save_inputs=save_inputs, reference_inference=to_inference,
                                   noise_factor=noise_factor, precision=precision)
    elif any(v is not None and v != [] for v in (input_range, channel_rtol, channel_axis, metric, reference_outputs,
                                                 save_outputs, save_inputs, noise_factor, precision)):
        raise InputError("--input-range, --channel-rtol, --noise-factor, --channel-axis, --metric, "
                         "--reference-outputs, --save-outputs, --save-inputs and --precision apply only with --verify")
    from bnfold.load import disk_size, external_data_files, has_external_data, load_source, weight_bytes
    from bnfold.progress import THRESHOLD_BYTES, Steps, save_callback

    big_file = model.is_file() and model.stat().st_size >= THRESHOLD_BYTES
    with Steps(big_file and not quiet, err_console).step(f"load {model.name}"):
        source = naming_input(model, lambda: load_source(model))
    if verify_output:  # unresolved dynamic dimensions, bad npz files: before anything is folded or written
        from bnfold.verification import preflight

        preflight(source.model, model, verifying)
    steps = Steps(not quiet and weight_bytes(source.model) >= THRESHOLD_BYTES, err_console)
    size_before = disk_size([model, *external_data_files(source)])  # before the fold edits source
    data_name = None if embed else (external_data or (f"{out.name}.data" if has_external_data(source) else None))
    writes = [("output", out)] + [("weights file", out.parent / n) for n in [data_name] if n]
    reports = [("JSON report", p) for p in [json_path, verify_json] if p] + [("JUnit report", p) for p in [junit] if p]
    refuse_overwriting_input(model, source, writes + reports, in_place and out.resolve() == model.resolve())
    recalibration = None
    if recalibrate_data:
        from bnfold.recalibration import recalibrate as recalibrate_model

        with steps.step("recalibrate"):
            recalibration = naming_input(model, lambda: recalibrate_model(source, recalibrate_data))
    with steps.step("fold"):
        result = naming_input(model, lambda: fold_model(source, options))
    with steps.step(f"save {out.name}") as advance:
        result.save(out, external_data=False if embed else (external_data or None), callback=save_callback(advance))
    human = None if quiet else human_console(json_path)  # -q never imports rich for output
    if not quiet:
        from bnfold.render import render_ledger

        if recalibration is not None:
            from bnfold.recalibration import render_report as render_recalibration

            render_recalibration(recalibration, human)
        sizes = (size_before, disk_size([out, *(out.parent / n for n in [data_name] if n)]))
        render_ledger(result.ledger, out, human, sizes=sizes, op_changes=result.op_changes)
    from bnfold.verdict import fold_verdict

    context = {"input": str(model), "output": str(out)}
    if recalibration is not None:
        context["recalibration"] = recalibration.to_dict(data=str(recalibrate_data))
    report = None
    if verify_output:
        from bnfold.verification import verify_or_discard

        try:
            report = verify_or_discard(model, out, verifying, keep_on_failure=keep_on_failure)
        except BnfoldError as exc:  # the reports still say what the fold did, and what stopped it
            verdict = fold_verdict(result.ledger, str(model), strict=strict)
            verdict.error, verdict.error_code = str(exc), exc.exit_code
            write_reports([verdict], json_path, junit, lambda: result.ledger.to_dict(**context, **verdict.to_dict()))
            raise
        if verify_json:
            write_json(verify_json, report.to_dict())
        if not quiet:
            from bnfold.verification import render_report

            render_report(report, human)
    verdict = fold_verdict(result.ledger, str(model), strict=strict, verification=report)
    write_reports([verdict], json_path, junit, lambda: result.ledger.to_dict(**context, **verdict.to_dict()))
    conclude(verdict, quiet, human, f" ({out} was written)" if out.exists() else
             f" ({out} was removed; --keep-on-failure keeps it)")


def write_reports(verdicts: list, json_path: Optional[Path], junit: Optional[Path],
                  payload: Callable[[], dict]) -> None:
    """The JSON report (``payload()``, which carries the verdicts' fields; built only when
    asked for: a big ledger's dict costs time) and the JUnit report of the verdicts."""
    if json_path:
        write_json(json_path, payload())
    if junit:
        from bnfold import junit as junit_xml

        write_report(junit, junit_xml.document(verdicts), "JUnit report")


def say_failure(verdict, quiet: bool, human, note: str = "") -> None:
    """A failed verdict's one line, ``bnfold: FAIL: ...``: last in the output, or on stderr with -q."""
    if verdict.failures:
        line = f"{verdict.summary()}{note}"
        if quiet:
            summary_on_stderr(line)
        else:
            human.print(f"bnfold: {line}", markup=False, highlight=False, soft_wrap=True)


def conclude(verdict, quiet: bool, human, note: str = "") -> None:
    """Say a failed verdict in one line and exit with the verdict's exit code."""
    say_failure(verdict, quiet, human, note)
    if verdict.exit_code:
        raise typer.Exit(verdict.exit_code)


def fold_many(roots: list[Path], out_dir: Path, options, *, embed: bool, jobs: int, strict: bool, quiet: bool,
              json_path: Optional[Path], junit: Optional[Path]) -> None:
    """Fold every model under ``roots`` into ``out_dir`` (relative paths kept), ``jobs`` at a
    time; one report, exit code the worst of all models."""
    from bnfold.batch import fold_files, plan_outputs
    from bnfold.verdict import error_verdict, exit_code, fold_verdict

    tasks = plan_outputs(roots, model_paths(roots, exclude=out_dir), out_dir)
    console_ = None if quiet else human_console(json_path)
    results, verdicts, failed = [], [], []
    for done in fold_files(tasks, options, embed=embed, jobs=jobs):
        results.append(done)
        if done.error is not None:
            err_console().print(f"bnfold: error: {done.error}", markup=False, highlight=False, soft_wrap=True)
            verdicts.append(error_verdict("fold", str(done.model), done.error, done.exit_code))
            continue
        verdict = fold_verdict(done.ledger, str(done.model), strict=strict)
        verdicts.append(verdict)
        if not quiet:
            from bnfold.render import render_ledger

            render_ledger(done.ledger, done.output, console_, sizes=done.sizes)
        if verdict.failures:
            failed.append(done)
        say_failure(verdict, quiet, console_, f" in {done.model}")
    if not quiet:
        folded = sum(r.ledger.summary()["folded"] for r in results if r.ledger)
        total = sum(r.ledger.summary()["bn_total"] for r in results if r.ledger)
        errors = sum(r.error is not None for r in results)
        console_.print(f"bnfold: {len(results)} model(s) -> {out_dir}: {folded} of {total} BatchNormalization folded"
                       + (f", {len(failed)} model(s) failed --strict" if failed else "")
                       + (f", {errors} model(s) not folded (errors above)" if errors else ""),
                       markup=False, highlight=False, soft_wrap=True)
    code = exit_code(verdicts)
    write_reports(verdicts, json_path, junit, lambda: {
        "schema": "bnfold.ledger.batch", "schema_version": 1, "verdict": batch_label(code), "exit_code": code,
        "models": [r.ledger.to_dict(input=str(r.model), output=str(r.output), **v.to_dict()) if r.ledger is not None
                   else {"input": str(r.model), **v.to_dict()} for r, v in zip(results, verdicts)]})
    if code:
        raise typer.Exit(code)


def batch_label(code: int) -> str:
    """The verdict of several models from their worst exit code."""
    from bnfold.verdict import ERROR, FAIL, PASS

    return PASS if code == 0 else FAIL if code == EXIT_CHECK_FAILED else ERROR


@app.command()
@reports_errors
def inspect(
    models: list[Path] = typer.Argument(..., metavar="MODEL...",
                                        help="ONNX models, or folders searched for *.onnx (recursively)."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the findings as JSON to this file (- for stdout)."),
    junit: Optional[Path] = JUNIT,
    target: Optional[list[str]] = TARGET,
    no_merge_branches: bool = typer.Option(
        False, "--no-merge-branches", help="Plan as `fold --no-merge-branches` does: parallel branches stay."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print nothing but errors."),
) -> None:
    """Audit every BatchNormalization: inference mode, statistics health, fold plan.

    Exit 0 when every BN is inference-ready (with --target: and no planned fold has a
    precision problem), 1 when any is not, 2 when a model is unusable (with several
    models: the worst of them; every model is still audited).
    """
    from bnfold.audit import audit, findings_to_dict, other_sites
    from bnfold.plan import FoldOptions

    targets = FoldOptions(targets=tuple(target or ())).targets  # checked before any model is read
    from bnfold.load import load_source
    from bnfold.save import output_target

    for what, report in (("JSON report", json_path), ("JUnit report", junit)):
        if report and str(report) != "-":
            output_target(report, what)
    from bnfold.verdict import error_verdict, exit_code, inspect_verdict

    paths = model_paths(models)
    several = len(paths) > 1
    human = None if quiet else human_console(json_path)
    audited = []
    for model in paths:
        try:
            source = naming_input(model, lambda: load_source(model))
            refuse_overwriting_input(model, source, [("JSON report", p) for p in [json_path, junit] if p])
            findings, ledger = naming_input(model, lambda: audit(source, targets, not no_merge_branches))
        except BnfoldError as exc:
            if not several:
                raise
            err_console().print(f"bnfold: error: {exc}", markup=False, highlight=False, soft_wrap=True)
            audited.append((model, None, None, error_verdict("inspect", str(model), str(exc), exc.exit_code)))
            continue
        verdict = inspect_verdict(findings, str(model), other_sites(ledger), targets)
        audited.append((model, findings, ledger, verdict))
        if not quiet:
            from bnfold.render import render_findings

            render_findings(findings, human, model if several else None, ledger)
        say_failure(verdict, quiet, human, f" in {model}" if several else "")
    verdicts = [v for *_, v in audited]
    code = exit_code(verdicts)

    def payload() -> dict:
        reports = [findings_to_dict(f, ledger, input=str(m), **v.to_dict()) if f is not None
                   else {"input": str(m), **v.to_dict()} for m, f, ledger, v in audited]
        return reports[0] if not several else {
            "schema": "bnfold.inspect.batch", "schema_version": 1, "verdict": batch_label(code), "exit_code": code,
            "models": reports}

    write_reports(verdicts, json_path, junit, payload)
    if code:
        raise typer.Exit(code)


def model_paths(paths: list[Path], exclude: Optional[Path] = None) -> list[Path]:
    """The models named, folders expanded to the *.onnx files under them (sorted); a
    folder's files under ``exclude`` (fold's --out-dir: its own earlier outputs) are not
    picked up."""
    skip = exclude.resolve() if exclude is not None else None
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            models = sorted(p for p in path.rglob("*.onnx") if p.is_file())
            if not models:
                raise InputError(f"{path}: a directory with no *.onnx file in it")
            kept = [p for p in models if skip is None or not _under(p, skip)]
            if not kept:
                raise InputError(f"{path}: no *.onnx file in it outside the output folder {exclude}")
            found.extend(kept)
        else:
            found.append(path)
    return found


def _under(path: Path, folder: Path) -> bool:
    """Whether ``path`` lies in ``folder`` (resolved), judged by where it is, not where a link points."""
    return folder in (path.parent.resolve() / path.name).parents


@app.command()
@reports_errors
def verify(
    original: Path = typer.Argument(
        ..., help="Reference ONNX model (runs with ORT optimisations disabled); with --reference-outputs: CANDIDATE."),
    candidate: Optional[Path] = typer.Argument(
        None, help="ONNX model that must compute the same outputs, e.g. the folded one."),
    providers: str = VERIFY_PROVIDERS,
    inputs: Optional[Path] = VERIFY_INPUTS,
    samples: Optional[int] = VERIFY_SAMPLES,
    batch: Optional[int] = VERIFY_BATCH,
    shape: Optional[list[str]] = VERIFY_SHAPES,
    seed: Optional[int] = VERIFY_SEED,
    rtol: Optional[float] = VERIFY_RTOL,
    atol: Optional[float] = VERIFY_ATOL,
    allow_tf32: bool = VERIFY_ALLOW_TF32,
    input_range: Optional[list[str]] = VERIFY_INPUT_RANGE,
    channel_rtol: Optional[float] = VERIFY_CHANNEL_RTOL,
    noise_factor: Optional[float] = VERIFY_NOISE_FACTOR,
    channel_axis: Optional[list[str]] = VERIFY_CHANNEL_AXIS,
    metric: Optional[list[str]] = VERIFY_METRIC,
    reference_outputs: Optional[Path] = VERIFY_REFERENCE_OUTPUTS,
    save_outputs: Optional[Path] = VERIFY_SAVE_OUTPUTS,
    save_inputs: Optional[Path] = VERIFY_SAVE_INPUTS,
    precision: Optional[list[str]] = VERIFY_PRECISION,
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the report as JSON (schema: docs/verify.md)."),
    junit: Optional[Path] = JUNIT,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print nothing but errors."),
) -> None:
    """Prove in onnxruntime, on CPU and CUDA, that CANDIDATE computes what ORIGINAL computes.

    Exit 0 when every output matches on every provider, 1 on a mismatch, 2 on bad input.
    """
    from bnfold.verification.runner import worker_ahead

    with worker_ahead():  # onnxruntime's process starts now, while this one imports onnx and reads the models
        from bnfold.verification import model_files, verify as verify_models

        options = verify_options(providers=providers, inputs=inputs, samples=samples, batch=batch, shape=shape,
                                 seed=seed, rtol=rtol, atol=atol, allow_tf32=allow_tf32, input_range=input_range,
                                 channel_rtol=channel_rtol, channel_axis=channel_axis, metric=metric,
                                 reference_outputs=reference_outputs, save_outputs=save_outputs,
                                 save_inputs=save_inputs, noise_factor=noise_factor, precision=precision)
        if reference_outputs is not None and candidate is None:
            original, candidate = None, original  # `bnfold verify CANDIDATE --reference-outputs REF.npz`
        elif candidate is None:
            raise InputError("give ORIGINAL and CANDIDATE, or CANDIDATE with --reference-outputs REF.npz")
        models = model_files(candidate) | (model_files(original) if original is not None else set())
        for what, path in (("JSON report", json_path), ("--save-outputs file", save_outputs),
                           ("--save-inputs file", save_inputs)):
            if path and path.resolve() in models:
                raise InputError(f"{path}: the {what} would overwrite a model being verified; choose another path")
        finish_verification(verify_models(original, candidate, options), json_path, quiet, junit)


def finish_verification(report, json_path: Optional[Path], quiet: bool, junit: Optional[Path] = None) -> None:
    """Write and print a verification report; exit 1 unless it passed (with -q, one line says so)."""
    from bnfold.verdict import verify_verdict
    from bnfold.verification import render_report

    verdict = verify_verdict(report, report.candidate)
    write_reports([verdict], json_path, junit, lambda: {**report.to_dict(), **verdict.to_dict()})
    if quiet:
        say_failure(verdict, quiet, None)
    else:
        render_report(report, human_console(json_path))  # its last line is the verdict's summary
    if verdict.exit_code:
        raise typer.Exit(verdict.exit_code)


@app.command()
@reports_errors
def train(
    out: Path = typer.Option(Path("models"), "--out", help="Folder to write the zoo and MANIFEST.json into."),
    only: Optional[list[str]] = typer.Option(
        None, "--only", metavar="NAME", help="Regenerate only this job (e.g. cnn) or file (e.g. cnn_ts13); repeatable."),
    epochs: Optional[int] = typer.Option(None, "--epochs", min=1, help="Train every net this many epochs."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or table."),
) -> None:
    """Train the model zoo on scikit-learn's digits and export it to ONNX (needs the train extra: torch)."""
    from bnfold.train import build_zoo, require_torch

    require_torch()  # one-line error naming the install command (train.INSTALL_HINT), exit 2
    from bnfold.runtime import require_onnxruntime

    require_onnxruntime("bnfold train")  # the zoo is checked in onnxruntime as it is exported
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console(), disable=quiet, transient=True) as progress:
        task = progress.add_task("bnfold train", total=None)

        def report(ev) -> None:
            if ev.kind == "plan":
                progress.update(task, total=ev.total)
            elif ev.kind == "epoch":
                progress.update(task, advance=1, description=f"{ev.job}: epoch {ev.step}/{ev.total} "
                                                             f"loss {ev.metrics['loss']:.4f}")
            elif ev.kind == "trained" and not quiet:
                metric = ", ".join(f"test {k} {v:.4f}" for k, v in ev.metrics.items())
                progress.console.print(f"trained {ev.job}: {metric} (torch, eval mode)")
            elif ev.kind == "exported":
                progress.update(task, advance=1, description=f"exported {ev.entry['file']}")

        entries = build_zoo(out, only=only or None, epochs=epochs, progress=report)
    if not quiet:
        from bnfold.render import render_zoo

        render_zoo(entries, out, console())



@app.command()
@reports_errors
def recalibrate(
    model: Path = typer.Argument(..., help="Input ONNX model (never modified)."),
    data: Path = typer.Option(
        ..., "--data", metavar="DATA.npz",
        help="Representative inputs, unlabelled: .npz with one array per input name, samples along axis 0."),
    output: Optional[Path] = typer.Option(
        None, "-o", "--output", help="Output path (default: IN with .recalibrated.onnx)."),
    samples: Optional[int] = typer.Option(None, "--samples", help="Use this many samples, picked at random (default: all)."),
    batch: Optional[int] = typer.Option(
        None, "--batch", help="Samples per onnxruntime run (default 32); the statistics do not depend on it."),
    seed: int = typer.Option(0, "--seed", help="Seed of the --samples pick."),
    only: Optional[list[str]] = typer.Option(
        None, "--only", metavar="BN", help="Recalibrate only this BN (node name); repeatable."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the report as JSON to this file."),
    junit: Optional[Path] = JUNIT,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print nothing but errors."),
) -> None:
    """Recompute every BatchNormalization's running mean and variance from data and write OUT.

    Training-mode BNs become inference BNs with the new statistics. See docs/recalibrate.md.
    Exit 0 when OUT was written, 2 on bad input (a BN it cannot recalibrate is reported, not an error).
    """
    from bnfold.load import has_external_data, load_source
    from bnfold.recalibration import recalibrate as recalibrate_model, render_report

    stem = model.name[: -len(".onnx")] if model.name.endswith(".onnx") else model.name
    out = output or model.with_name(f"{stem}.recalibrated.onnx")
    if out.resolve() == model.resolve():
        raise InputError(f"{out}: output is the input; choose another path")
    from bnfold.save import output_target

    for what, report in (("JSON report", json_path), ("JUnit report", junit)):  # fail before OUT is written
        if report and str(report) != "-":
            output_target(report, what)
    source = naming_input(model, lambda: load_source(model))
    data_name = f"{out.name}.data" if has_external_data(source) else None
    writes = [("output", out)] + [("weights file", out.parent / n) for n in [data_name] if n]
    refuse_overwriting_input(model, source, writes + [("JSON report", p) for p in [json_path, junit] if p])
    result = naming_input(model, lambda: recalibrate_model(source, data, samples=samples, batch=batch, seed=seed,
                                                           only=only or None))
    result.save(out)
    from bnfold.verdict import recalibrate_verdict

    verdict = recalibrate_verdict(result, str(model))
    write_reports([verdict], json_path, junit, lambda: result.to_dict(input=str(model), data=str(data), output=str(out),
                                                                    **verdict.to_dict()))
    if not quiet:
        render_report(result, human_console(json_path), out)
    conclude(verdict, quiet, None if quiet else human_console(json_path))


def _terminate(signum, frame):
    # Raising lets the atomic writers' cleanup run; the default action would not.
    raise SystemExit(128 + signum)


def main() -> None:
    """Run the CLI; ends, as click does, by raising SystemExit (callers in-process may catch it).

    A usage error is one line on stderr (exit 2); a closed output pipe (``| head``) ends
    the run quietly with 141, as a process killed by SIGPIPE would, never as a failed check.
    """
    signal.signal(signal.SIGTERM, _terminate)
    if not _on_terminal(sys.stdout):
        # --help off a terminal (a pipe, a log): click's plain text, not rich's panels, whose
        # renderers (markdown, syntax highlighting) cost 0.05 s to import (bench/startup.py).
        app.rich_markup_mode = None
    try:
        code = app(standalone_mode=False)
    except BrokenPipeError:
        _quiet_stdout()
        raise SystemExit(SIGPIPE_EXIT) from None
    except Exception as exc:  # click's exceptions (typer may carry its own copy of click)
        kinds = {kind.__name__ for kind in type(exc).__mro__}
        if "NoArgsIsHelpError" in kinds or "UsageError" not in kinds:
            if "ClickException" in kinds:
                exc.show()
                raise SystemExit(exc.exit_code) from None
            if "Abort" in kinds:
                sys.stderr.write("bnfold: aborted\n")
                raise SystemExit(130) from None
            raise
        command = exc.ctx.command_path if exc.ctx is not None else "bnfold"
        sys.stderr.write(f"bnfold: error: {exc.format_message()} (see '{command} --help')\n")
        raise SystemExit(2) from None
    raise SystemExit(code if isinstance(code, int) else 0)


def _on_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # replaced by an object without it, or closed
        return False


def _quiet_stdout() -> None:
    """After a closed pipe, point stdout at /dev/null so the final flush cannot fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    finally:
        os.close(devnull)


#: The variables OpenBLAS reads for its thread count; one the user set is left alone.
BLAS_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS", "OMP_NUM_THREADS")
#: Allocations between two young-generation collections in the bnfold process (Python: 700).
GC_THRESHOLD = 20_000


def lean_process() -> None:
    """Start-up settings of the ``bnfold`` process (not of the library API), both measured
    by bench/startup.py on 2 cores:

    - numpy's OpenBLAS starts one thread per core when numpy is imported, and they spin
      waiting for work while the imports go on: 0.04-0.05 s of a 0.2 s fold on a busy
      2-core machine. bnfold's arithmetic is elementwise, its checks reductions, and the
      BLAS work of ``--target`` (a dot product per channel of a block) too small to share,
      so its processes, the verify worker included, ask for one thread (``bnfold train``
      excepted: torch may use that BLAS).
    - Importing onnx, onnx_ir, numpy and typer allocates ~60,000 objects that live until
      the end, and Python's default threshold (700) collects them ~100 times on the way:
      ~0.01 s. A higher threshold keeps collecting, ~30x less often.
    """
    command = next((arg for arg in sys.argv[1:] if not arg.startswith("-")), None)
    if command != "train" and not any(os.environ.get(name) for name in BLAS_THREAD_VARIABLES):
        os.environ["OPENBLAS_NUM_THREADS"] = "1"
    gc.set_threshold(GC_THRESHOLD, *gc.get_threshold()[1:])


def console_script() -> NoReturn:
    """The installed ``bnfold`` command and ``python -m bnfold``: ``main()``, then exit
    without the interpreter's teardown.

    Tearing down onnx, protobuf, numpy and onnx_ir takes 60-80 ms, a fifth of folding a
    small model. Nothing of bnfold's is left for it to do: every file is closed, synced and
    renamed before a command returns, and no thread of bnfold's is running. So flush the
    standard streams and leave; where that flush fails (a closed pipe), or SystemExit
    carries a message to print, Python's own exit runs as usual.
    """
    lean_process()
    try:
        main()
    except SystemExit as exc:
        if exc.code is not None and not isinstance(exc.code, int):
            raise
        code = exc.code or 0
    else:
        code = 0
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):
        raise SystemExit(code) from None
    os._exit(code)
