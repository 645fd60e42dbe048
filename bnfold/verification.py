"""Prove in onnxruntime that a candidate model computes what the original computes.

The reference is the ORIGINAL run with ``ORT_DISABLE_ALL``: onnxruntime's basic
optimisations already fuse Conv+BatchNormalization, so an optimised original would
itself be folded and the comparison would prove nothing. The CANDIDATE runs
unoptimised (the fold alone) and at onnxruntime's default level (what production runs).
Every session runs in one child process, so an onnxruntime crash on an untrusted model
becomes an error message instead of taking the tool down.
"""

from __future__ import annotations

import math
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bnfold._onnx_ir import ir
from bnfold import __version__
from bnfold.errors import EXIT_CHECK_FAILED, EXIT_OK, InputError
from bnfold import _ort_worker
from bnfold._ort_worker import CPU, CUDA, PROGRESS_PREFIX
from bnfold.io import _first_line, external_data_files, load_model

#: Version of the JSON report layout documented in docs/verify.md.
REPORT_SCHEMA_VERSION = 1
DEFAULT_BATCH = 2
DEFAULT_SAMPLES = 1
DEFAULT_SEED = 0
#: Random integer inputs are drawn from [0, INTEGER_INPUT_HIGH): small enough to be
#: valid indices for most Gather/embedding tables.
INTEGER_INPUT_HIGH = 10

PROVIDER_ALIASES = {"cpu": CPU, "cuda": CUDA}
#: Optimisation levels a run can use: the reference is always "disabled".
OPTIMIZATION_DISABLED = "disabled"
OPTIMIZATION_DEFAULT = "default"


@dataclass(frozen=True)
class Tolerance:
    """An element passes when ``|candidate - reference| <= atol + rtol * |reference|``."""

    rtol: float
    atol: float


#: Defaults by output element type; integer and bool outputs must match exactly.
DEFAULT_TOLERANCES: dict[str, Tolerance] = {
    "float64": Tolerance(rtol=1e-7, atol=1e-9),
    "float32": Tolerance(rtol=1e-4, atol=1e-5),
    "float16": Tolerance(rtol=1e-2, atol=1e-3),
    "bfloat16": Tolerance(rtol=5e-2, atol=1e-2),
}
EXACT = Tolerance(rtol=0.0, atol=0.0)

_SUPPORTED_DTYPES = {
    ir.DataType.FLOAT,
    ir.DataType.DOUBLE,
    ir.DataType.FLOAT16,
    ir.DataType.BFLOAT16,
    ir.DataType.INT8,
    ir.DataType.INT16,
    ir.DataType.INT32,
    ir.DataType.INT64,
    ir.DataType.UINT8,
    ir.DataType.UINT16,
    ir.DataType.UINT32,
    ir.DataType.UINT64,
    ir.DataType.BOOL,
}


def default_tolerance(dtype: str) -> Tolerance:
    """The tolerance an output of numpy dtype name ``dtype`` is held to by default."""
    return DEFAULT_TOLERANCES.get(dtype, EXACT)


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

    def __post_init__(self) -> None:
        for name in ("samples", "batch"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise InputError(f"--{name} must be at least 1, got {value}")
        for name in ("rtol", "atol"):
            value = getattr(self, name)
            if value is not None and not (value >= 0 and math.isfinite(value)):
                raise InputError(f"--{name} must be a finite number >= 0, got {value}")
        for name, dims in self.shapes.items():
            if not dims or any(int(dim) < 1 for dim in dims):
                raise InputError(f"--shape {name}: dimensions must be integers >= 1, got {list(dims)}")
        if self.inputs is not None:
            given = [f"--{name}" for name in ("samples", "batch", "seed") if getattr(self, name) is not None]
            given += ["--shape"] if self.shapes else []
            if given:
                raise InputError(
                    f"{', '.join(given)} only shape random inputs; --inputs {self.inputs} gives the data itself"
                )


def parse_shape(spec: str) -> tuple[str, tuple[int, ...]]:
    """Parse ``NAME=1x3x224x224`` (the CLI's ``--shape``) into a name and dimensions."""
    name, sep, dims_text = spec.rpartition("=")
    try:
        dims = tuple(int(dim) for dim in dims_text.lower().split("x"))
    except ValueError:
        dims = ()
    if not sep or not name or not dims or min(dims) < 1:
        raise InputError(f"--shape {spec!r}: expected NAME=DIMS such as images=1x3x224x224")
    return name, dims


def parse_shapes(specs: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """Parse repeated ``--shape`` values; naming an input twice is a usage error."""
    shapes: dict[str, tuple[int, ...]] = {}
    for spec in specs:
        name, dims = parse_shape(spec)
        if name in shapes:
            raise InputError(f"--shape {name} is given twice")
        shapes[name] = dims
    return shapes


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


@dataclass(frozen=True)
class TensorSignature:
    """A graph input or output as declared: dims are ints, symbolic names, or None (unknown)."""

    name: str
    dtype: str
    shape: tuple[int | str | None, ...] | None

    def describe(self) -> str:
        if self.shape is None:
            return f"{self.dtype}[?]"
        return f"{self.dtype}[{', '.join('?' if dim is None else str(dim) for dim in self.shape)}]"


@dataclass(frozen=True)
class ModelSignature:
    """The tensors a caller feeds (initializer-backed inputs excluded) and reads."""

    inputs: tuple[TensorSignature, ...]
    outputs: tuple[TensorSignature, ...]


def model_signature(model: ir.Model, path: str | os.PathLike) -> ModelSignature:
    """Read the feedable inputs and the outputs of ``model``, refusing non-numeric tensors."""
    graph = model.graph
    inputs = tuple(
        _tensor_signature(value, path, "input") for value in graph.inputs if value.name not in graph.initializers
    )
    outputs = tuple(_tensor_signature(value, path, "output") for value in graph.outputs)
    return ModelSignature(inputs, outputs)


def _tensor_signature(value: ir.Value, path: str | os.PathLike, role: str) -> TensorSignature:
    if not isinstance(value.type, ir.TensorType):
        raise InputError(f"{path}: {role} {value.name!r} is {value.type or 'untyped'}; bnfold verify compares tensors")
    if value.dtype not in _SUPPORTED_DTYPES:
        raise InputError(
            f"{path}: {role} {value.name!r} has element type {value.dtype.name}, which verify cannot compare"
        )
    shape = None
    if value.shape is not None:
        shape = tuple(dim if isinstance(dim, int) else dim.value for dim in value.shape.dims)
    return TensorSignature(value.name, value.dtype.numpy().name, shape)


def _tensor_mismatches(role: str, ours: Sequence[TensorSignature], theirs: Sequence[TensorSignature]) -> list[str]:
    """Unknown dimensions (and unknown shapes) fit anything; static sizes and symbolic names must agree."""
    problems = []
    by_name = {tensor.name: tensor for tensor in theirs}
    for tensor in ours:
        other = by_name.get(tensor.name)
        if other is None:
            problems.append(f"{role} {tensor.name!r} of ORIGINAL is missing from CANDIDATE")
        elif other.dtype != tensor.dtype or not _shapes_compatible(tensor.shape, other.shape):
            problems.append(
                f"{role} {tensor.name!r} is {tensor.describe()} in ORIGINAL but {other.describe()} in CANDIDATE"
            )
    ours_names = {tensor.name for tensor in ours}
    problems += [
        f"CANDIDATE has {role} {tensor.name!r}, which ORIGINAL does not have"
        for tensor in theirs
        if tensor.name not in ours_names
    ]
    return problems


def _shapes_compatible(left, right) -> bool:
    if left is None or right is None:
        return True
    return len(left) == len(right) and all(a is None or b is None or a == b for a, b in zip(left, right))


@dataclass(frozen=True)
class RunId:
    """One session of the run matrix."""

    model: str  # "original" or "candidate"
    provider: str
    optimization: str  # OPTIMIZATION_DISABLED or OPTIMIZATION_DEFAULT

    def describe(self) -> str:
        level = "optimizations disabled" if self.optimization == OPTIMIZATION_DISABLED else "default optimizations"
        return f"{self.model.upper()} on {self.provider} ({level})"


@dataclass
class Difference:
    """How far a subject's output is from the reference's, Polygraphy style.

    Statistics use element pairs where both values are finite; matching NaNs (and equal
    infinities) count as equal, a non-finite value on one side only fails the element.
    """

    elements: int
    elements_failing: int
    nonfinite_mismatches: int
    max_abs_diff: float
    #: [run, *index] of the largest absolute difference; None when all are equal.
    max_abs_diff_index: list[int] | None
    #: [reference, subject] values at that index.
    max_abs_diff_values: list[float] | None
    max_rel_diff: float
    mean_abs_diff: float
    cosine_similarity: float
    reference_nan: int
    reference_inf: int
    subject_nan: int
    subject_inf: int
    #: Smallest atol that passes with the rtol in force, and smallest rtol with the atol in force.
    min_passing_atol: float
    min_passing_rtol: float

    @property
    def passed(self) -> bool:
        return self.elements_failing == 0


def output_scale(arrays: Sequence[np.ndarray]) -> float:
    """``max(1, max |reference|)`` over an output: what the default atol is measured in.

    Rounding noise in a deep network is relative to the size of the values it computes
    with, so an element that cancels to near zero carries the noise of its large terms;
    a fixed atol of 1e-5 fails correct folds of networks whose outputs reach 10 or 1e4.
    """
    largest = max((float(np.max(np.abs(a[np.isfinite(a)]), initial=0.0))
                   for a in arrays if np.issubdtype(a.dtype, np.inexact) or a.dtype.kind == "V"), default=0.0)
    return max(1.0, largest)


def compare_arrays(
    reference: Sequence[np.ndarray], subject: Sequence[np.ndarray], tolerance: Tolerance
) -> Difference:
    """Compare per-run arrays of equal shapes, all runs pooled, in float64."""
    ref = np.concatenate([np.asarray(array, dtype=np.float64).ravel() for array in reference])
    sub = np.concatenate([np.asarray(array, dtype=np.float64).ravel() for array in subject])
    finite = np.isfinite(ref) & np.isfinite(sub)
    equal_nonfinite = (np.isnan(ref) & np.isnan(sub)) | (np.isinf(ref) & (ref == sub))
    nonfinite_mismatch = ~finite & ~equal_nonfinite
    diff = np.abs(np.subtract(sub, ref, where=finite, out=np.zeros_like(ref)))
    magnitude = np.where(finite, np.abs(ref), 0.0)
    failing = (diff > tolerance.atol + tolerance.rtol * magnitude) | nonfinite_mismatch
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(diff == 0, 0.0, diff / magnitude)
        excess = diff - tolerance.atol
        rtol_needed = np.where(excess <= 0, 0.0, excess / magnitude)
    any_nonfinite_mismatch = bool(nonfinite_mismatch.any())
    max_abs = float(diff.max(initial=0.0))
    index = values = None
    if max_abs > 0:
        flat = int(np.argmax(diff))
        index = _run_index(flat, [np.shape(array) for array in reference])
        values = [float(ref[flat]), float(sub[flat])]
    return Difference(
        elements=int(ref.size),
        elements_failing=int(failing.sum()),
        nonfinite_mismatches=int(nonfinite_mismatch.sum()),
        max_abs_diff=max_abs,
        max_abs_diff_index=index,
        max_abs_diff_values=values,
        max_rel_diff=float(rel.max(initial=0.0)),
        mean_abs_diff=float(diff[finite].mean()) if finite.any() else 0.0,
        cosine_similarity=_cosine_similarity(ref[finite], sub[finite]),
        reference_nan=int(np.isnan(ref).sum()),
        reference_inf=int(np.isinf(ref).sum()),
        subject_nan=int(np.isnan(sub).sum()),
        subject_inf=int(np.isinf(sub).sum()),
        min_passing_atol=math.inf
        if any_nonfinite_mismatch
        else max(0.0, float((diff - tolerance.rtol * magnitude).max(initial=0.0))),
        min_passing_rtol=math.inf if any_nonfinite_mismatch else float(rtol_needed.max(initial=0.0)),
    )


def _run_index(flat: int, shapes: Sequence[tuple[int, ...]]) -> list[int]:
    for run, shape in enumerate(shapes):
        size = int(np.prod(shape, dtype=np.int64))
        if flat < size:
            return [run, *(int(i) for i in np.unravel_index(flat, shape))]
        flat -= size
    raise IndexError(flat)


def _cosine_similarity(a: np.ndarray, b: np.ndarray) -> float:
    norm_a, norm_b = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if norm_a == 0 and norm_b == 0:
        return 1.0
    if norm_a == 0 or norm_b == 0:
        return 0.0
    return float(np.dot(a, b) / (norm_a * norm_b))


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

    @property
    def passed(self) -> bool:
        return not self.problems and self.difference is not None and self.difference.passed


@dataclass
class InputData:
    """What one model input was fed in each run."""

    name: str
    dtype: str
    shape: list[int]


@dataclass
class VerifyReport:
    """Everything the verdict rests on; ``to_dict`` is the versioned JSON schema."""

    original: str
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
    #: ORIGINAL on each accelerator against ORIGINAL on CPU: the device's own noise, not part of the verdict.
    noise_floor: list[OutputComparison]
    notes: list[str]
    allow_tf32: bool

    @property
    def passed(self) -> bool:
        return not self.signature_mismatches and bool(self.comparisons) and all(c.passed for c in self.comparisons)

    @property
    def verdict(self) -> str:
        return "PASS" if self.passed else "FAIL"

    @property
    def exit_code(self) -> int:
        return EXIT_OK if self.passed else EXIT_CHECK_FAILED

    def failures(self) -> list[OutputComparison]:
        return [comparison for comparison in self.comparisons if not comparison.passed]

    def summary(self) -> str:
        """One line for logs: the verdict and, on failure, what failed where."""
        if self.passed:
            outputs = sorted({comparison.output for comparison in self.comparisons})
            return f"PASS: {len(outputs)} output(s) match on {', '.join(self.providers)}"
        reasons = list(self.signature_mismatches)
        for comparison in self.failures():
            reasons.append(f"output {comparison.output!r}: {comparison.subject.describe()} differs")
        return "FAIL: " + "; ".join(reasons)

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
        return _json_safe(data)


def _json_safe(value):
    """JSON has no inf/nan: write them as the strings "inf", "-inf", "nan"."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    return value


def verify(
    original: str | os.PathLike,
    candidate: str | os.PathLike,
    options: VerifyOptions | None = None,
    /,
    **option_fields: Any,
) -> VerifyReport:
    """Run ORIGINAL and CANDIDATE in onnxruntime on the same inputs and compare every output.

    Pass a ``VerifyOptions`` or its fields as keywords. Raises InputError for unusable
    input (missing file, bad npz, unresolved dynamic dimension, unavailable provider,
    onnxruntime failing or crashing on a model); a mismatch is a failed report, not an error.
    """
    if options is None:
        options = VerifyOptions(**option_fields)
    elif option_fields:
        raise TypeError("pass either a VerifyOptions or its fields as keywords, not both")
    providers = parse_providers(options.providers)
    original_signature = model_signature(load_model(original), original)
    candidate_signature = model_signature(load_model(candidate), candidate)
    input_mismatches = _tensor_mismatches("input", original_signature.inputs, candidate_signature.inputs)
    output_mismatches = _tensor_mismatches("output", original_signature.outputs, candidate_signature.outputs)
    if options.inputs is not None:
        feeds, input_data = _feeds_from_npz(Path(options.inputs), original_signature.inputs)
        seed = None
    else:
        seed = DEFAULT_SEED if options.seed is None else options.seed
        feeds, input_data = _random_feeds(original_signature.inputs, options, seed, original)
    report = VerifyReport(
        original=str(original),
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
        notes=[],
        allow_tf32=options.allow_tf32,
    )
    if input_mismatches:
        report.notes.append("not run: the two models do not take the same inputs")
        return report
    runs = [
        RunId(model, provider, optimization)
        for provider in providers
        for model, optimization in (
            ("original", OPTIMIZATION_DISABLED),
            ("candidate", OPTIMIZATION_DISABLED),
            ("candidate", OPTIMIZATION_DEFAULT),
        )
    ]
    paths = {"original": str(original), "candidate": str(candidate)}
    result = _run_in_child(
        {
            "sessions": [
                {
                    "label": f"{run.describe()}: {paths[run.model]}",
                    "path": paths[run.model],
                    "provider": run.provider,
                    "optimize": run.optimization == OPTIMIZATION_DEFAULT,
                }
                for run in runs
            ],
            "required": providers,
            "cuda_options": {} if options.allow_tf32 else {"use_tf32": "0"},
            "feeds": feeds,
        }
    )
    report.onnxruntime_version = result["onnxruntime_version"]
    report.available_providers = result["available_providers"]
    report.notes += result["notes"]
    outputs = {run: arrays for run, arrays in zip(runs, result["outputs"]) if arrays is not None}
    report.providers = [
        provider for provider in providers if RunId("original", provider, OPTIMIZATION_DISABLED) in outputs
    ]
    for provider in report.providers:
        reference = RunId("original", provider, OPTIMIZATION_DISABLED)
        for optimization in (OPTIMIZATION_DISABLED, OPTIMIZATION_DEFAULT):
            subject = RunId("candidate", provider, optimization)
            report.comparisons += _compare_runs(reference, subject, outputs, options)
        if provider != CPU:
            cpu_reference = RunId("original", CPU, OPTIMIZATION_DISABLED)
            report.noise_floor += _compare_runs(cpu_reference, reference, outputs, options)
    return report


def _compare_runs(
    reference: RunId, subject: RunId, outputs: Mapping[RunId, dict[str, list[np.ndarray]]], options: VerifyOptions
) -> list[OutputComparison]:
    """Compare every output the two runs share; outputs only one model has are signature mismatches."""
    comparisons = []
    for name, reference_arrays in outputs[reference].items():
        subject_arrays = outputs[subject].get(name)
        if subject_arrays is None:
            continue
        ref_dtype, sub_dtype = str(reference_arrays[0].dtype), str(subject_arrays[0].dtype)
        default = default_tolerance(ref_dtype)
        tolerance = Tolerance(
            rtol=default.rtol if options.rtol is None else options.rtol,
            atol=default.atol * output_scale(reference_arrays) if options.atol is None else options.atol,
        )
        problems = []
        if ref_dtype != sub_dtype:
            problems.append(f"element type {sub_dtype} differs from the reference's {ref_dtype}")
        mismatched = [
            f"run {run}: shape {list(sub.shape)} differs from the reference's {list(ref.shape)}"
            for run, (ref, sub) in enumerate(zip(reference_arrays, subject_arrays))
            if ref.shape != sub.shape
        ]
        problems += mismatched
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
                difference=None if mismatched else compare_arrays(reference_arrays, subject_arrays, tolerance),
            )
        )
    return comparisons


def _random_feeds(
    inputs: Sequence[TensorSignature], options: VerifyOptions, seed: int, path
) -> tuple[list[dict[str, np.ndarray]], list[InputData]]:
    shapes = resolve_input_shapes(inputs, options.shapes, options.batch or DEFAULT_BATCH, path)
    rng = np.random.default_rng(seed)
    feeds = [
        {tensor.name: _random_array(rng, tensor.dtype, shapes[tensor.name]) for tensor in inputs}
        for _ in range(options.samples or DEFAULT_SAMPLES)
    ]
    return feeds, [InputData(tensor.name, tensor.dtype, list(shapes[tensor.name])) for tensor in inputs]


def resolve_input_shapes(
    inputs: Sequence[TensorSignature], overrides: Mapping[str, Sequence[int]], batch: int, path
) -> dict[str, tuple[int, ...]]:
    """Give every input a concrete shape: ``--shape`` first, then symbols it fixed, then batch.

    A dynamic first dimension is the batch; a symbolic name resolved anywhere takes that
    size everywhere; any other dynamic dimension must come from ``--shape``.
    """
    by_name = {tensor.name: tensor for tensor in inputs}
    unknown = [name for name in overrides if name not in by_name]
    if unknown:
        raise InputError(f"--shape {unknown[0]}: not an input of {path} (inputs: {', '.join(by_name) or 'none'})")
    symbols: dict[str, int] = {}
    resolved: dict[str, tuple[int, ...]] = {}
    for name, dims in overrides.items():
        declared = by_name[name].shape
        dims = tuple(int(dim) for dim in dims)
        if declared is not None and (
            len(declared) != len(dims) or any(isinstance(d, int) and d != g for d, g in zip(declared, dims))
        ):
            raise InputError(
                f"--shape {name}={'x'.join(map(str, dims))} does not fit the declared {by_name[name].describe()}"
            )
        for symbol, size in zip(declared or (), dims):
            if isinstance(symbol, str):
                symbols.setdefault(symbol, size)
        resolved[name] = dims
    for tensor in inputs:
        if tensor.name in resolved:
            continue
        if tensor.shape is None:
            raise InputError(
                f"{path}: input {tensor.name!r} has no declared shape; give it with --shape {tensor.name}=DIMS"
            )
        if tensor.shape and isinstance(tensor.shape[0], str):
            symbols.setdefault(tensor.shape[0], batch)
    for tensor in inputs:
        if tensor.name in resolved:
            continue
        dims = []
        for axis, dim in enumerate(tensor.shape):
            if isinstance(dim, int):
                dims.append(dim)
            elif dim in symbols:
                dims.append(symbols[dim])
            elif axis == 0:
                dims.append(batch)
            else:
                template = "x".join(str(d) if isinstance(d, int) else (d or "?") for d in tensor.shape)
                raise InputError(
                    f"{path}: input {tensor.name!r} dimension {axis} ({dim or 'unnamed'}) is dynamic; "
                    f"give its size with --shape {tensor.name}={template}"
                )
        resolved[tensor.name] = tuple(dims)
    return {tensor.name: resolved[tensor.name] for tensor in inputs}


def _random_array(rng: np.random.Generator, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    kind = np.dtype(_numpy_dtype(dtype)).kind
    if kind == "b":
        return rng.random(shape) < 0.5
    if kind in "iu":
        return rng.integers(0, INTEGER_INPUT_HIGH, size=shape).astype(_numpy_dtype(dtype))
    return rng.standard_normal(shape).astype(_numpy_dtype(dtype))


def _numpy_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _feeds_from_npz(
    path: Path, inputs: Sequence[TensorSignature]
) -> tuple[list[dict[str, np.ndarray]], list[InputData]]:
    """Read real inputs: one array per input name, samples stacked along axis 0.

    Where an input's first dimension is static, the arrays are fed that many samples at a
    time; every input must split into the same number of runs.
    """
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise InputError(f"{path}: a single array, not an .npz archive of arrays named after the inputs")
        with loaded:
            arrays = {key: loaded[key] for key in loaded.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise InputError(f"{path}: not a readable .npz archive ({_first_line(exc)})") from None
    names = [tensor.name for tensor in inputs]
    extra = sorted(set(arrays) - set(names))
    if extra:
        raise InputError(f"{path}: key {extra[0]!r} is not an input of ORIGINAL (inputs: {', '.join(names)})")
    missing = [name for name in names if name not in arrays]
    if missing:
        raise InputError(f"{path}: no array for input {missing[0]!r} (inputs: {', '.join(names)})")
    runs_by_input = {}
    for tensor in inputs:
        array = arrays[tensor.name]
        if array.dtype != _numpy_dtype(tensor.dtype):
            raise InputError(f"{path}: {tensor.name!r} is {array.dtype}, the model input is {tensor.dtype}")
        if tensor.shape is not None and len(tensor.shape) != array.ndim:
            raise InputError(
                f"{path}: {tensor.name!r} has shape {list(array.shape)}, the model input is {tensor.describe()}"
            )
        if tensor.shape and isinstance(tensor.shape[0], int) and tensor.shape[0] > 0:
            if array.shape[0] % tensor.shape[0]:
                raise InputError(
                    f"{path}: {tensor.name!r} holds {array.shape[0]} samples along axis 0, "
                    f"not a multiple of the model's batch {tensor.shape[0]}"
                )
            runs_by_input[tensor.name] = array.shape[0] // tensor.shape[0]
    if len(set(runs_by_input.values())) > 1:
        raise InputError(f"{path}: the inputs split into different numbers of runs ({runs_by_input})")
    runs = next(iter(runs_by_input.values()), 1)
    feeds: list[dict[str, np.ndarray]] = [{} for _ in range(runs)]
    for tensor in inputs:
        array = arrays[tensor.name]
        if runs > 1 and (array.ndim == 0 or array.shape[0] % runs):
            raise InputError(f"{path}: {tensor.name!r} with shape {list(array.shape)} does not split into {runs} runs")
        chunks = np.split(array, runs) if runs > 1 else [array]
        for feed, chunk in zip(feeds, chunks):
            feed[tensor.name] = chunk
        declared = tensor.shape or ()
        if any(isinstance(d, int) and d != size for d, size in zip(declared, chunks[0].shape)):
            raise InputError(
                f"{path}: {tensor.name!r} has shape {list(chunks[0].shape)} per run, "
                f"the model input is {tensor.describe()}"
            )
    shapes = {name: list(array.shape) for name, array in feeds[0].items()}
    return feeds, [InputData(tensor.name, tensor.dtype, shapes[tensor.name]) for tensor in inputs]


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


def render_report(report: VerifyReport, console) -> None:
    """Print the report as rich tables on ``console``, verdict last."""
    inputs = ", ".join(f"{data.name} {data.dtype}[{'x'.join(map(str, data.shape))}]" for data in report.inputs)
    source = f"random, seed {report.seed}" if report.seed is not None else f"from {report.input_source}"
    console.print(
        f"[bold]bnfold verify[/bold]: CANDIDATE {report.candidate} against ORIGINAL {report.original}", highlight=False
    )
    console.print(
        f"onnxruntime {report.onnxruntime_version or '-'}; ran on {', '.join(report.providers) or 'nothing'} "
        f"(offered: {', '.join(report.available_providers) or '-'}); TF32 {'allowed' if report.allow_tf32 else 'off'}",
        highlight=False,
    )
    console.print(f"inputs ({source}, {report.runs} run(s)): {inputs}", highlight=False)
    for note in report.notes:
        console.print(f"[yellow]note:[/yellow] {note}", highlight=False)
    for problem in report.signature_mismatches:
        console.print(f"[red]mismatch:[/red] {problem}", highlight=False)
    if report.comparisons:
        title = "CANDIDATE against ORIGINAL (unoptimised) on the same provider"
        console.print(_comparison_table(title, report.comparisons))
    if report.noise_floor:
        title = "noise floor, not part of the verdict: ORIGINAL on the device against ORIGINAL on CPU"
        console.print(_comparison_table(title, report.noise_floor))
    colour = "green" if report.passed else "red"
    console.print(f"[bold {colour}]{report.summary()}[/bold {colour}]", highlight=False)


def _comparison_table(title: str, comparisons: Sequence[OutputComparison]):
    """One row per output and run; the numbers stacked in one column so it reads in an 80-column CI log."""
    from rich import box
    from rich.table import Table

    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, show_lines=True)
    for column in ("output", "run", "result", "numbers"):
        table.add_column(column, overflow="fold")
    for comparison in comparisons:
        result = "PASS" if comparison.passed else "FAIL"
        if comparison.difference is not None and comparison.difference.elements_failing:
            result += f"\n{comparison.difference.elements_failing} of {comparison.difference.elements}"
        run = comparison.subject
        table.add_row(
            comparison.output,
            f"{run.model}\n{run.provider.removesuffix('ExecutionProvider')}\n{run.optimization}",
            result,
            "\n".join(comparison.problems + _difference_lines(comparison)),
            style=None if comparison.passed else "red",
        )
    return table


def _difference_lines(comparison: OutputComparison) -> list[str]:
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
    return [
        f"max|diff| {difference.max_abs_diff:.3g} {where}",
        f"max rel {difference.max_rel_diff:.3g}, mean|diff| {difference.mean_abs_diff:.3g}, "
        f"cosine {difference.cosine_similarity:.9f}",
        f"NaN/Inf: reference {difference.reference_nan}/{difference.reference_inf}, "
        f"{comparison.subject.model} {difference.subject_nan}/{difference.subject_inf}",
        f"tolerance rtol {tolerance.rtol:g} atol {tolerance.atol:g}; would pass with "
        f"atol {difference.min_passing_atol:.3g} or rtol {difference.min_passing_rtol:.3g}",
    ]


# --- the onnxruntime child process -------------------------------------------------------

#: The worker runs from its file, so the child needs no import path to bnfold: requests and
#: results hold only builtins and numpy arrays.
#: The child skips the interpreter's teardown (~45 ms of onnxruntime and numpy), as the
#: ``bnfold`` command does: its result file is written and closed by the time main returns.
_WORKER_COMMAND = ("import os, runpy, sys; code = runpy.run_path(sys.argv[1])['main'](sys.argv[2]); "
                   "sys.stdout.flush(); sys.stderr.flush(); os._exit(code)")


def _run_in_child(request: dict) -> dict:
    """Run the session matrix in a fresh interpreter; turn its failure or crash into InputError."""
    with tempfile.TemporaryDirectory(prefix="bnfold-verify-") as folder:
        result_path = Path(folder) / "result.pickle"
        process = subprocess.run(
            [sys.executable, "-c", _WORKER_COMMAND, _ort_worker.__file__, str(result_path)],
            input=pickle.dumps(request),
            capture_output=True,
        )
        stderr = process.stderr.decode(errors="replace")
        if process.returncode != 0 or not result_path.exists():
            raise InputError(_child_failure(process.returncode, stderr))
        # The file comes from our own child in our own private temporary folder.
        result = pickle.loads(result_path.read_bytes())
    if result.get("error"):
        raise InputError(result["error"])
    return result


def _child_failure(returncode: int, stderr: str) -> str:
    running = [line[len(PROGRESS_PREFIX):] for line in stderr.splitlines() if line.startswith(PROGRESS_PREFIX)]
    where = f" running {running[-1]}" if running else " starting up"
    if returncode < 0:
        try:
            name = f", {signal.Signals(-returncode).name}"
        except ValueError:
            name = ""
        return f"onnxruntime crashed (signal {-returncode}{name}){where}"
    details = [line for line in stderr.splitlines() if line.strip() and not line.startswith(PROGRESS_PREFIX)]
    tail = f": {details[-1].strip()}" if details else ""
    return f"the onnxruntime worker process failed (exit {returncode}){where}{tail}"
