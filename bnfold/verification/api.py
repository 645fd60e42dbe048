"""``verify``: plan the runs, feed them, run them in the child, compare, report.

The reference is the ORIGINAL run with ``ORT_DISABLE_ALL``: onnxruntime's basic
optimisations already fuse Conv+BatchNormalization, so an optimised original would
itself be folded and the comparison would prove nothing. The CANDIDATE runs
unoptimised (the fold alone) and at onnxruntime's default level (what production runs).
Or the reference is a set of stored outputs (``--reference-outputs``: torch's, Keras's,
or an earlier ``--save-outputs``).
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from bnfold import __version__
from bnfold._ort_worker import CPU, CUDA
from bnfold.errors import InputError
from bnfold.load import external_data_files, load_model, load_source
from bnfold.runtime import require_converter, require_onnxruntime, runtime_notes
from bnfold.verification.compare import channel_axis_of, compare_arrays, precision_drift, resolve_tolerance, top1
from bnfold.verification.feeds import (
    ModelSignature,
    feeds_from_npz,
    input_ranges,
    model_signature,
    outputs_from_npz,
    random_feeds,
    resolve_input_shapes,
    tensor_mismatches,
    write_npz,
)
from bnfold.verification.mapped import mapped_model
from bnfold.verification.report import (
    OPTIMIZATION_DEFAULT,
    OPTIMIZATION_DISABLED,
    STORED,
    OutputComparison,
    PrecisionComparison,
    RunId,
    VerifyReport,
)
from bnfold.verification.runner import run_in_child, worker_ahead

DEFAULT_BATCH = 2
DEFAULT_SAMPLES = 1
DEFAULT_SEED = 0
PROVIDER_ALIASES = {"cpu": CPU, "cuda": CUDA}
METRICS = ("top1",)
#: --precision: the lower precisions ORIGINAL and CANDIDATE can be converted to.
PRECISIONS = ("fp16",)


@dataclass(frozen=True)
class VerifyOptions:
    """What to run and how strictly to compare; None means "the documented default"."""

    providers: str | Sequence[str] = "auto"
    inputs: str | os.PathLike | None = None
    samples: int | None = None
    batch: int | None = None
    shapes: Mapping[str, Sequence[int]] = field(default_factory=dict)
    seed: int | None = None
    rtol: float | None = None
    atol: float | None = None
    allow_tf32: bool = False
    #: --input-range: input name (or "*" for all) -> [low, high], inclusive.
    input_ranges: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    #: --channel-rtol: bound of each channel's ||diff_c|| / ||ref_c|| (default by dtype).
    channel_rtol: float | None = None
    #: --channel-axis: output name (or "*") -> the axis its channels lie along (default: the
    #: graph's, ``feeds.output_channel_axes``, else 1).
    channel_axes: Mapping[str, int] = field(default_factory=dict)
    #: --metric: extra per-output views, e.g. ("top1",).
    metrics: Sequence[str] = ()
    #: --reference-outputs: compare against these stored outputs instead of ORIGINAL's run.
    reference_outputs: str | os.PathLike | None = None
    #: --save-outputs / --save-inputs: write the reference outputs and the inputs used.
    save_outputs: str | os.PathLike | None = None
    save_inputs: str | os.PathLike | None = None
    #: Run ORIGINAL's training-mode BNs in inference mode for the reference (fold --to-inference).
    reference_inference: bool = False
    #: --noise-factor: how many times ORIGINAL's own drift (default against disabled
    #: optimisations) a float comparison allows on top of its tolerance (default 4; 0: none).
    noise_factor: float | None = None
    #: --precision: also run both models converted to these (``PRECISIONS``) and fail where
    #: CANDIDATE drifts from ORIGINAL's float32 outputs more than ORIGINAL does.
    precision: Sequence[str] = ()

    def __post_init__(self) -> None:
        for name in ("samples", "batch"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise InputError(f"--{name} must be at least 1, got {value}")
        for name in ("rtol", "atol", "channel_rtol", "noise_factor"):
            value = getattr(self, name)
            if value is not None and not (value >= 0 and math.isfinite(value)):
                raise InputError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value}")
        for name, dims in self.shapes.items():
            if not dims or any(int(dim) < 1 for dim in dims):
                raise InputError(f"--shape {name}: dimensions must be integers >= 1, got {list(dims)}")
        unknown = [metric for metric in self.metrics if metric not in METRICS]
        if unknown:
            raise InputError(f"--metric {unknown[0]!r}: expected one of {', '.join(METRICS)}")
        unknown = [target for target in self.precision if target not in PRECISIONS]
        if unknown:
            raise InputError(f"--precision {unknown[0]!r}: expected {', '.join(PRECISIONS)}")
        if self.inputs is not None:
            given = [f"--{name}" for name in ("samples", "batch", "seed") if getattr(self, name) is not None]
            given += ["--shape"] if self.shapes else []
            given += ["--input-range"] if self.input_ranges else []
            if given:
                raise InputError(
                    f"{', '.join(given)} only shape random inputs; --inputs {self.inputs} gives the data itself"
                )
        if self.reference_outputs is not None:
            if self.inputs is None:
                raise InputError(f"--reference-outputs {self.reference_outputs} needs the inputs those outputs were "
                                 "computed from: --inputs IN.npz (--save-inputs writes them)")
            if self.save_outputs is not None:
                raise InputError("--save-outputs writes the ORIGINAL's outputs; with --reference-outputs there is "
                                 "no ORIGINAL reference run to save")


def parse_providers(spec: str | Sequence[str]) -> dict[str, bool]:
    """Map the ``--providers`` value to {provider: required}; CPU always runs.

    ``auto`` adds CUDA only when onnxruntime can use it; naming ``cuda`` makes it required.
    """
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [name.strip().lower() for name in names if name.strip()]
    if names == ["auto"]:
        return {CPU: True, CUDA: False}
    unknown = [name for name in names if name not in PROVIDER_ALIASES]
    if unknown or not names:
        raise InputError(f"--providers {','.join(names)!r}: expected 'auto' or a list of cpu, cuda")
    return {CPU: True} | {PROVIDER_ALIASES[name]: True for name in names}


def parse_channel_axes(specs: Sequence[str]) -> dict[str, int]:
    """``--channel-axis OUTPUT=AXIS`` (repeatable) or ``AXIS`` for every output."""
    axes: dict[str, int] = {}
    for spec in specs:
        name, sep, text = spec.rpartition("=")
        try:
            axis = int(text)
        except ValueError:
            raise InputError(f"--channel-axis {spec!r}: expected OUTPUT=AXIS (e.g. y=3) or AXIS") from None
        axes[name if sep else "*"] = axis
    return axes


def verify(
    original: str | os.PathLike | Any | None,
    candidate: str | os.PathLike | Any | None = None,
    options: VerifyOptions | None = None,
    /,
    **option_fields: Any,
) -> VerifyReport:
    """Run ORIGINAL and CANDIDATE in onnxruntime on the same inputs and compare every output.

    Each model is a path, or in memory: an ``onnx.ModelProto``, an ``onnx_ir.Model`` or a
    ``FoldResult`` (written to a temporary folder for the onnxruntime child process).
    See ``_verify`` for the rest.
    """
    in_memory = [m for m in (original, candidate) if m is not None and not isinstance(m, (str, os.PathLike))]
    if not in_memory:
        return _verify(original, candidate, options, **option_fields)
    with tempfile.TemporaryDirectory(prefix="bnfold-verify-") as folder:
        paths = [_written(m, Path(folder), name) for m, name in ((original, "original"), (candidate, "candidate"))]
        report = _verify(*paths, options, **option_fields)
    for field_name, model in (("original", original), ("candidate", candidate)):
        if model is not None and not isinstance(model, (str, os.PathLike)):
            setattr(report, field_name, f"<in-memory {type(model).__name__}>")
    return report


def _written(model, folder: Path, name: str):
    """A path for ``model``: as given, or an in-memory model saved (embedded) into ``folder``."""
    if model is None or isinstance(model, (str, os.PathLike)):
        return model
    import onnx

    from bnfold._onnx_ir import ir

    path = folder / f"{name}.onnx"
    if hasattr(model, "save") and hasattr(model, "ledger"):  # a FoldResult
        model.save(path, external_data=False)
    elif isinstance(model, ir.Model):
        ir.save(model, path)
    elif isinstance(model, onnx.ModelProto):
        onnx.save(model, path)
    else:
        raise TypeError(f"verify takes paths, onnx.ModelProto, onnx_ir.Model or FoldResult, not {type(model).__name__}")
    return path


def _verify(
    original: str | os.PathLike | None,
    candidate: str | os.PathLike | None = None,
    options: VerifyOptions | None = None,
    /,
    **option_fields: Any,
) -> VerifyReport:
    """Run ORIGINAL and CANDIDATE in onnxruntime on the same inputs and compare every output.

    With ``reference_outputs`` the reference is that npz instead, and ORIGINAL may be None
    (``verify(None, candidate, reference_outputs=..., inputs=...)``); when given it runs as
    well, compared with the stored outputs outside the verdict.

    Pass a ``VerifyOptions`` or its fields as keywords. Raises InputError for unusable
    input (missing file, bad npz, unresolved dynamic dimension, unavailable provider,
    onnxruntime failing or crashing on a model); a mismatch is a failed report, not an error.
    """
    if options is None:
        options = VerifyOptions(**option_fields)
    elif option_fields:
        raise TypeError("pass either a VerifyOptions or its fields as keywords, not both")
    stored = options.reference_outputs is not None
    if candidate is None:
        raise TypeError("verify needs a CANDIDATE model")
    require_onnxruntime("bnfold verify")
    if original is None and not stored:
        raise InputError("give an ORIGINAL model to compare with, or --reference-outputs REF.npz")
    if options.precision:
        require_converter("--precision fp16")
        if original is None:
            raise InputError("--precision compares CANDIDATE's fp16 drift with ORIGINAL's: give ORIGINAL too")
    providers = parse_providers(options.providers)
    with worker_ahead():  # onnxruntime's process starts while the models are read
        return _run_and_compare(original, candidate, options, providers)


def _run_and_compare(original, candidate, options: VerifyOptions, providers: dict[str, bool]) -> VerifyReport:
    """``_verify`` once its arguments are checked: read both models, run them, compare."""
    stored = options.reference_outputs is not None
    candidate_signature, candidate_mapped = _signature(candidate)
    original_signature, original_mapped = _signature(original) if original is not None else (None, None)
    fed_signature = original_signature or candidate_signature
    if original_signature is not None:
        input_mismatches = tensor_mismatches("input", original_signature.inputs, candidate_signature.inputs)
        output_mismatches = tensor_mismatches("output", original_signature.outputs, candidate_signature.outputs)
    else:
        input_mismatches, output_mismatches = [], []
    feeds, input_data, seed = _feeds(fed_signature, options, original if original is not None else candidate)
    reference_outputs: dict[str, list[np.ndarray]] = {}
    if stored:
        reference_outputs, stored_problems = outputs_from_npz(
            Path(options.reference_outputs), candidate_signature.outputs, len(feeds))
        output_mismatches += stored_problems
    report = VerifyReport(
        original=None if original is None else str(original),
        candidate=str(candidate),
        tool_version=__version__,
        onnxruntime_version=None,
        available_providers=[],
        providers=[],
        input_source="random" if options.inputs is None else str(options.inputs),
        seed=seed,
        runs=len(feeds),
        inputs=input_data,
        signature_mismatches=input_mismatches + output_mismatches,
        comparisons=[],
        noise_floor=[],
        notes=runtime_notes(),
        allow_tf32=options.allow_tf32,
        reference=STORED if stored else ("original-inference" if options.reference_inference else "original"),
        reference_outputs=None if not stored else str(options.reference_outputs),
        metrics=list(options.metrics),
    )
    if options.save_inputs is not None:
        write_npz(Path(options.save_inputs), {d.name: [feed[d.name] for feed in feeds] for d in input_data}, "input")
    if input_mismatches:
        report.notes.append("not run: the two models do not take the same inputs")
        return report
    runs = _plan_runs(providers, stored, original is not None)
    with tempfile.TemporaryDirectory(prefix="bnfold-verify-ref-") as folder:
        paths = {"candidate": str(candidate)}
        mapped = {"candidate": candidate_mapped, "original": original_mapped}
        if original is not None:
            paths["original"] = str(original)
            if options.reference_inference:
                paths["original"], converted = inference_copy(Path(original), Path(folder))
                mapped["original"] = None
                report.notes.append(
                    f"the reference is ORIGINAL with {converted} training-mode BatchNormalization run in inference "
                    "mode (running statistics, extra outputs dropped), as --to-inference converts them"
                    if converted else "--to-inference: ORIGINAL has no training-mode BatchNormalization to convert")

        def run_sessions(planned: list[RunId], required: Mapping[str, bool]) -> dict[RunId, dict]:
            result = run_in_child(
                {
                    "sessions": [
                        {
                            "label": f"{run.describe()}: {paths[run.model] if run.model == 'candidate' else original}",
                            "path": paths[run.model],
                            "mapped": mapped[run.model],
                            "provider": run.provider,
                            "optimize": run.optimization == OPTIMIZATION_DEFAULT,
                        }
                        for run in planned
                    ],
                    "required": required,
                    "cuda_options": {} if options.allow_tf32 else {"use_tf32": "0"},
                    "feeds": feeds,
                }
            )
            if result.get("error"):
                raise InputError(_worker_error(result, planned, original, candidate, input_data))
            report.onnxruntime_version = result["onnxruntime_version"]
            report.available_providers = result["available_providers"]
            report.notes += [note for note in result["notes"] if note not in report.notes]
            return {run: arrays for run, arrays in zip(planned, result["outputs"]) if arrays is not None}

        outputs = run_sessions(runs, providers)
        report.providers = [provider for provider in providers
                            if any(run.provider == provider for run in outputs)]
        if stored:
            outputs[RunId(STORED, "", "")] = reference_outputs
        graph_axes = fed_signature.channel_axes or {}
        judged = {provider: _provider_comparisons(provider, outputs, options, graph_axes, stored)
                  for provider in report.providers}
        # The noise floor: ORIGINAL at the default level, run only where a float comparison
        # fails without it (a pass without it passes with it: the allowance is >= 0).
        noisy = [provider for provider in report.providers
                 if not stored and any(_noise_could_help(c) for c in judged[provider][0])]
        if noisy:
            outputs.update(run_sessions([RunId("original", provider, OPTIMIZATION_DEFAULT) for provider in noisy],
                                        {CPU: True} | {provider: True for provider in noisy}))
            for provider in noisy:
                judged[provider] = _provider_comparisons(provider, outputs, options, graph_axes, stored)
        if options.precision and "original" in paths:
            _precision_runs(report, options, paths, mapped, folder, outputs, graph_axes, run_sessions)
    for provider in report.providers:
        report.comparisons += judged[provider][0]
        report.noise_floor += judged[provider][1]
    if options.save_outputs is not None:
        saved = outputs.get(RunId("original", CPU, OPTIMIZATION_DISABLED))
        if saved is not None:
            write_npz(Path(options.save_outputs), saved, "output")
    return report


def _precision_runs(report: VerifyReport, options: VerifyOptions, paths: dict, mapped: dict, folder: str,
                    outputs: dict, graph_axes: Mapping[str, int], run_sessions) -> None:
    """--precision fp16: ORIGINAL and CANDIDATE converted (``fp16.convert_fp16``) and run
    unoptimised on every provider, each output compared with ORIGINAL's own unoptimised run."""
    from bnfold.verification.fp16 import CONVERT_ARGUMENTS, convert_fp16, converter_version

    arguments = ", ".join(f"{key}={value}" for key, value in CONVERT_ARGUMENTS.items())
    report.precision_targets = list(options.precision)
    report.converter = f"onnxconverter-common {converter_version()} convert_float_to_float16({arguments})"
    for model in ("original", "candidate"):
        paths[f"{model}-fp16"] = convert_fp16(paths[model], Path(folder), model)
        mapped[f"{model}-fp16"] = None
    runs = [RunId(f"{model}-fp16", provider, OPTIMIZATION_DISABLED) for provider in report.providers
            for model in ("original", "candidate")]
    outputs.update(run_sessions(runs, {provider: True for provider in report.providers}))
    for provider in report.providers:
        reference = outputs[RunId("original", provider, OPTIMIZATION_DISABLED)]
        original = outputs[RunId("original-fp16", provider, OPTIMIZATION_DISABLED)]
        candidate = outputs[RunId("candidate-fp16", provider, OPTIMIZATION_DISABLED)]
        for name, arrays in reference.items():
            if name not in candidate or arrays[0].dtype.kind != "f":
                continue  # an output only one model has (a signature mismatch), or not a float
            problems = [f"{who} fp16 output is {got[0].dtype}, shape {list(got[0].shape)}" for who, got in
                        (("ORIGINAL", original.get(name)), ("CANDIDATE", candidate.get(name)))
                        if got is None or len(got) != len(arrays) or
                        any(g.shape != a.shape for g, a in zip(got, arrays))] if name in original else \
                ["ORIGINAL's fp16 model lacks it"]
            drift = None
            if not problems:
                axis = channel_axis_of(arrays[0].shape,
                                       options.channel_axes.get(name, options.channel_axes.get("*", graph_axes.get(name, 1))))
                drift = precision_drift(arrays, original[name], candidate[name], axis, "fp16")
            report.precision.append(PrecisionComparison(name, provider, "fp16", problems, drift))


def _signature(path) -> tuple[ModelSignature, dict | None]:
    """The model's declared inputs and outputs, its outputs' channel axes (read with the
    shapes onnx infers, as fold reads a model), and how the worker can map its weights."""
    source = load_source(path)
    try:
        return model_signature(source.model, path, source.proto.graph), mapped_model(source)
    finally:
        del source  # the weights are not needed in this process


def _feeds(signature: ModelSignature, options: VerifyOptions, path):
    if options.inputs is not None:
        feeds, input_data = feeds_from_npz(Path(options.inputs), signature.inputs)
        return feeds, input_data, None
    seed = DEFAULT_SEED if options.seed is None else options.seed
    feeds, input_data = random_feeds(signature, options.shapes, options.input_ranges, options.batch or DEFAULT_BATCH,
                                     options.samples or DEFAULT_SAMPLES, seed, path)
    return feeds, input_data, seed


def _plan_runs(providers: Mapping[str, bool], stored: bool, have_original: bool) -> list[RunId]:
    """Per provider: ORIGINAL unoptimised (the reference), then CANDIDATE unoptimised and at
    the default level. (ORIGINAL at the default level, the noise floor, runs on demand.)"""
    runs = []
    for provider in providers:
        if have_original:
            runs.append(RunId("original", provider, OPTIMIZATION_DISABLED))
        runs += [RunId("candidate", provider, OPTIMIZATION_DISABLED), RunId("candidate", provider, OPTIMIZATION_DEFAULT)]
    return runs


def _provider_comparisons(provider: str, outputs: Mapping[RunId, dict], options: VerifyOptions,
                          graph_axes: Mapping[str, int], stored: bool) -> tuple[list, list]:
    """The comparisons that judge ``provider`` and its noise-floor comparisons (not judged):
    ORIGINAL's drift where it ran, ORIGINAL on an accelerator against CPU, or against the
    stored outputs."""
    reference = RunId(STORED, "", "") if stored else RunId("original", provider, OPTIMIZATION_DISABLED)
    drift = RunId("original", provider, OPTIMIZATION_DEFAULT)
    drift = drift if not stored and drift in outputs else None
    comparisons, noise_floor = [], []
    if drift is not None:
        noise_floor += _compare_runs(reference, drift, outputs, options, graph_axes)
    for optimization in (OPTIMIZATION_DISABLED, OPTIMIZATION_DEFAULT):
        subject = RunId("candidate", provider, optimization)
        comparisons += _compare_runs(reference, subject, outputs, options, graph_axes, drift)
    original_run = RunId("original", provider, OPTIMIZATION_DISABLED)
    if stored and original_run in outputs:
        noise_floor += _compare_runs(reference, original_run, outputs, options, graph_axes)
    elif provider != CPU and original_run in outputs:
        noise_floor += _compare_runs(RunId("original", CPU, OPTIMIZATION_DISABLED), original_run, outputs, options,
                                     graph_axes)
    return comparisons, noise_floor


def _noise_could_help(comparison: OutputComparison) -> bool:
    """A float comparison that fails on its numbers alone (not on a shape, type or NaN)."""
    difference = comparison.difference
    return (not comparison.passed and difference is not None and not comparison.problems
            and comparison.tolerance.noise_factor > 0 and difference.noise_max is None
            and (difference.elements_failing > difference.nonfinite_mismatches or difference.channels_failing > 0))


def preflight(model, path, options: VerifyOptions) -> None:
    """Check, before ``fold --verify`` folds and writes anything, that verification can
    feed ``model``: onnxruntime is installed, dynamic dimensions resolve, ranges name
    inputs, npz files read."""
    require_onnxruntime("fold --verify")
    if options.precision:
        require_converter("--precision fp16")
    signature = model_signature(model, path)
    if options.inputs is not None:
        feeds, _ = feeds_from_npz(Path(options.inputs), signature.inputs)
        if options.reference_outputs is not None:
            outputs_from_npz(Path(options.reference_outputs), signature.outputs, len(feeds))
    else:
        resolve_input_shapes(signature.inputs, options.shapes, options.batch or DEFAULT_BATCH, path)
        input_ranges(signature.inputs, options.input_ranges, signature.index_limits or {}, path)
    parse_providers(options.providers)


def _compare_runs(
    reference: RunId, subject: RunId, outputs: Mapping[RunId, dict[str, list[np.ndarray]]], options: VerifyOptions,
    graph_axes: Mapping[str, int], drift: RunId | None = None,
) -> list[OutputComparison]:
    """Compare every output the two runs share; outputs only one model has are signature mismatches.
    Channels lie along --channel-axis where given, else along the axis the graph shows
    (``graph_axes``), else axis 1. ``drift``: the reference model's run at another
    optimisation level, whose difference from ``reference`` is the noise allowance."""
    comparisons = []
    for name, reference_arrays in outputs[reference].items():
        subject_arrays = outputs[subject].get(name)
        if subject_arrays is None:
            continue
        ref_dtype, sub_dtype = str(reference_arrays[0].dtype), str(subject_arrays[0].dtype)
        noise = outputs[drift].get(name) if drift is not None and drift in outputs else None
        tolerance = resolve_tolerance(ref_dtype, options.rtol, options.atol, options.channel_rtol,
                                      options.noise_factor)
        if reference.model == STORED or subject.model == "original":  # no allowance there (docs/verify.md)
            tolerance = replace(tolerance, noise_factor=0.0)
        problems = []
        if ref_dtype != sub_dtype:
            problems.append(f"element type {sub_dtype} differs from the reference's {ref_dtype}")
        if len(reference_arrays) != len(subject_arrays):
            problems.append(f"{len(subject_arrays)} runs, the reference has {len(reference_arrays)}")
        mismatched = [
            f"run {run}: shape {list(sub.shape)} differs from the reference's {list(ref.shape)}"
            for run, (ref, sub) in enumerate(zip(reference_arrays, subject_arrays))
            if ref.shape != sub.shape
        ]
        problems += mismatched
        inferred = graph_axes.get(name, 1)
        axis = channel_axis_of(reference_arrays[0].shape,
                               options.channel_axes.get(name, options.channel_axes.get("*", inferred)))
        difference = top = None
        if not problems:
            difference = compare_arrays(reference_arrays, subject_arrays, tolerance, axis, noise)
            if "top1" in options.metrics and axis is not None and reference_arrays[0].dtype.kind in "fV":
                top = top1(reference_arrays, subject_arrays, axis, tolerance)
        comparisons.append(
            OutputComparison(
                output=name,
                reference=reference,
                subject=subject,
                tolerance=tolerance,
                reference_dtype=ref_dtype,
                subject_dtype=sub_dtype,
                reference_shape=list(reference_arrays[0].shape),
                subject_shape=list(subject_arrays[0].shape),
                problems=problems,
                difference=difference,
                top1=top,
            )
        )
    return comparisons


# --- onnxruntime errors, worded for the user ----------------------------------------------


def _worker_error(result: dict, runs, original, candidate, input_data) -> str:
    """One line: what failed, and for a run-time failure the input that feeds the failing node."""
    message = result["error"]
    run_error = result.get("run_error")
    if not run_error:
        return message
    text = run_error["message"]
    node = re.search(r"running (\w+) node\. Name:'([^']*)'", run_error["text"])
    by_name = {data.name: data for data in input_data}
    culprits: list[str] = []
    if node:
        session = next((run for run in runs if run.describe() in message), None)
        path = candidate if session is None or session.model == "candidate" else original
        culprits = [name for name in _inputs_upstream_of(path, node.group(2)) if name in by_name]
    named = [by_name[name] for name in culprits] or list(by_name.values())
    described = ", ".join(_feed_description(data) for data in named)
    where = f"node {node.group(2)!r} ({node.group(1)}) reads input {described}" if node and culprits \
        else f"inputs {described}"
    hint = ""
    if any(data.dtype.startswith(("int", "uint")) for data in named) and "bound" in text.lower():
        hint = f"; give the valid range with --input-range {named[0].name}=LO,HI"
    return f"{message}, run {run_error['run']}: {where}: {text}{hint}"


def _feed_description(data) -> str:
    text = f"{data.name!r} {data.dtype}[{'x'.join(map(str, data.shape))}]"
    if data.range is not None:
        text += f" fed values in [{data.range[0]}, {data.range[1]}] ({data.range_source})"
    return text


def _inputs_upstream_of(path, node_name: str) -> list[str]:
    """Graph inputs the node ``node_name`` depends on (main graph), nearest first."""
    try:
        model = load_model(path)
    except InputError:
        return []
    graph = model.graph
    inputs = {value.name for value in graph.inputs}
    node = next((n for n in graph if n.name == node_name), None)
    if node is None:
        return []
    found, frontier, seen = [], [v for v in node.inputs if v is not None], set()
    while frontier:
        value = frontier.pop(0)
        if id(value) in seen:
            continue
        seen.add(id(value))
        if value.name in inputs and value.name not in graph.initializers:
            found.append(value.name)
        producer = value.producer()
        if producer is not None:
            frontier += [v for v in producer.inputs if v is not None]
    return found


# --- the inference-mode reference -------------------------------------------------------


def inference_copy(original: Path, folder: Path) -> tuple[str, int]:
    """Write ORIGINAL with its training-mode BNs in inference form into ``folder`` (external
    data linked, not copied); return the path and how many BNs were converted.

    A BN is converted as ``--to-inference`` converts it: only where its running-stat
    outputs are unused; ``training_mode`` goes, an opset-6 BN gets ``is_test=1``.
    """
    import onnx

    proto = onnx.load(str(original), load_external_data=False)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    converted = _convert_graph(proto.graph, opset)
    target = folder / original.name
    if not converted:
        return str(original), 0
    for tensor in _all_tensors(proto.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            location = next(e.value for e in tensor.external_data if e.key == "location")
            link = folder / location
            if not link.exists():
                link.parent.mkdir(parents=True, exist_ok=True)
                os.symlink((original.resolve().parent / location).resolve(), link)
    with open(target, "wb") as handle:
        handle.write(proto.SerializeToString())
    return str(target), converted


def _all_tensors(graph):
    yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            for sub in [attribute.g] if attribute.HasField("g") else list(attribute.graphs):
                yield from _all_tensors(sub)


def _convert_graph(graph, opset: int, outer_used: frozenset = frozenset()) -> int:
    used = set(outer_used) | {o.name for o in graph.output}
    for node in graph.node:
        used.update(node.input)
        for attribute in node.attribute:
            for sub in [attribute.g] if attribute.HasField("g") else list(attribute.graphs):
                used.update(_names_read(sub))
    converted = 0
    for node in graph.node:
        for attribute in node.attribute:
            for sub in [attribute.g] if attribute.HasField("g") else list(attribute.graphs):
                converted += _convert_graph(sub, opset, frozenset(used))
        if node.op_type != "BatchNormalization" or node.domain not in ("", "ai.onnx"):
            continue
        extra = [name for name in node.output[1:] if name]
        training_attr = any(a.name == "training_mode" and a.i for a in node.attribute)
        is_test_0 = opset < 7 and not any(a.name == "is_test" and a.i for a in node.attribute)
        if not (extra or training_attr or is_test_0) or any(name in used for name in extra):
            continue
        del node.output[1:]
        kept = [a for a in node.attribute if a.name not in ("training_mode", "is_test")]
        del node.attribute[:]
        node.attribute.extend(kept)
        if opset < 7:
            node.attribute.append(__import__("onnx").helper.make_attribute("is_test", 1))
        converted += 1
    return converted


def _names_read(graph) -> set[str]:
    names = {o.name for o in graph.output}
    for node in graph.node:
        names.update(node.input)
        for attribute in node.attribute:
            for sub in [attribute.g] if attribute.HasField("g") else list(attribute.graphs):
                names |= _names_read(sub)
    return names


# --- fold --verify helpers ----------------------------------------------------------------


def verify_or_discard(
    original: str | os.PathLike, candidate: str | os.PathLike, options: VerifyOptions, *, keep_on_failure: bool = False
) -> VerifyReport:
    """Verify a freshly written CANDIDATE; a failure or error removes it unless ``keep_on_failure``.

    A deployment step must not pick up a model that was never proven, so CANDIDATE and its
    external-data files go (never a file ORIGINAL also uses).
    """
    try:
        report = verify(original, candidate, options)
    except InputError as error:
        if keep_on_failure:
            raise
        _remove_model(candidate, original)
        raise InputError(f"{error}; removed {candidate} (--keep-on-failure keeps it)") from None
    except BaseException:  # interrupted: the candidate is unproven
        if not keep_on_failure:
            _remove_model(candidate, original)
        raise
    if not report.passed and not keep_on_failure:
        _remove_model(candidate, original)
        report.notes.append(f"removed {candidate} because verification failed (--keep-on-failure keeps it)")
    return report


def _remove_model(path: str | os.PathLike, keep_files_of: str | os.PathLike) -> None:
    for file in model_files(path) - model_files(keep_files_of):
        file.unlink(missing_ok=True)


def model_files(path: str | os.PathLike) -> set[Path]:
    """The model file and the external-data files it references, resolved: what a report must not overwrite."""
    model_path = Path(path).resolve()
    try:
        return {model_path} | external_data_files(load_model(model_path))
    except InputError:
        return {model_path}
