"""What verify feeds the models: signatures, ``--shape`` and ``--input-range`` parsing,
seeded random inputs valid for the model, and inputs or outputs read from / written to npz."""

from __future__ import annotations

import math
import os
import re
import shlex
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bnfold._onnx_ir import ir
from bnfold.errors import InputError
from bnfold.load import _first_line

#: Random integer inputs are drawn from [0, INTEGER_INPUT_HIGH) unless a range is given
#: or derived from the Gather they index.
INTEGER_INPUT_HIGH = 10

_SUPPORTED_DTYPES = {
    ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16, ir.DataType.BFLOAT16,
    ir.DataType.INT8, ir.DataType.INT16, ir.DataType.INT32, ir.DataType.INT64,
    ir.DataType.UINT8, ir.DataType.UINT16, ir.DataType.UINT32, ir.DataType.UINT64, ir.DataType.BOOL,
}


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
    #: Integer inputs that index a Gather over a constant dimension: name -> that dimension's size.
    index_limits: Mapping[str, int] | None = None
    #: Outputs whose channels the graph shows lie along another axis than 1: name -> axis.
    channel_axes: Mapping[str, int] | None = None


@dataclass
class InputData:
    """What one model input was fed in each run."""

    name: str
    dtype: str
    shape: list[int]
    #: [low, high] of the values fed (inclusive), and where that range came from.
    range: list[float] | None = None
    range_source: str | None = None


def model_signature(model: ir.Model, path: str | os.PathLike, declared=None) -> ModelSignature:
    """Read the feedable inputs and the outputs of ``model``, refusing non-numeric tensors.

    ``declared`` (the file's own ``onnx.GraphProto``) gives the shapes as the file declares
    them where ``model`` carries shapes onnx's inference filled in: the interface compared
    between two models is the declared one."""
    graph = model.graph
    shapes = _declared_shapes(declared) if declared is not None else {}
    inputs = tuple(_tensor_signature(value, path, "input", shapes)
                   for value in graph.inputs if value.name not in graph.initializers)
    outputs = tuple(_tensor_signature(value, path, "output", shapes) for value in graph.outputs)
    return ModelSignature(inputs, outputs, index_limits(model, {t.name for t in inputs if _is_integer(t.dtype)}),
                          output_channel_axes(model))


def _declared_shapes(graph) -> dict[str, tuple | None]:
    """name -> the shape a graph input or output declares (as ``_tensor_signature`` reads it)."""
    shapes = {}
    for info in [*graph.input, *graph.output]:
        tensor = info.type.tensor_type
        if not tensor.HasField("shape"):
            shapes[info.name] = None
            continue
        shapes[info.name] = tuple(dim.dim_value if dim.HasField("dim_value") else (dim.dim_param or None)
                                  for dim in tensor.shape.dim)
    return shapes


def _tensor_signature(value: ir.Value, path: str | os.PathLike, role: str, declared=None) -> TensorSignature:
    if not isinstance(value.type, ir.TensorType):
        raise InputError(f"{path}: {role} {value.name!r} is {value.type or 'untyped'}; bnfold verify compares tensors")
    if value.dtype not in _SUPPORTED_DTYPES:
        raise InputError(
            f"{path}: {role} {value.name!r} has element type {value.dtype.name}, which verify cannot compare"
        )
    shape = None
    if declared and value.name in declared:
        shape = declared[value.name]
    elif value.shape is not None:
        shape = tuple(dim if isinstance(dim, int) else dim.value for dim in value.shape.dims)
    return TensorSignature(value.name, value.dtype.numpy().name, shape)


#: Ops an index passes through unchanged on its way from the graph input to a Gather.
_INDEX_PASSTHROUGH = {"Cast", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Transpose", "Expand"}


def index_limits(model: ir.Model, integer_inputs: set[str]) -> dict[str, int]:
    """Integer inputs that reach a Gather's indices (through shape-only ops) where the
    indexed dimension of the data is static: name -> the smallest such dimension."""
    limits: dict[str, int] = {}
    graph = model.graph
    for value in graph.inputs:
        if value.name not in integer_inputs:
            continue
        frontier, seen = [value], set()
        while frontier:
            current = frontier.pop()
            if id(current) in seen:
                continue
            seen.add(id(current))
            for node, index in current.uses():
                if node.op_type in _INDEX_PASSTHROUGH and index == 0:
                    frontier.extend(o for o in node.outputs if o is not None)
                elif node.op_type == "Gather" and index == 1 and node.inputs[0] is not None:
                    data = node.inputs[0]
                    shape = data.shape if data.const_value is None else data.const_value.shape
                    if shape is None:
                        continue
                    axis = node.attributes.get_int("axis", 0)
                    dims = list(shape.dims) if hasattr(shape, "dims") else list(shape)
                    axis = axis + len(dims) if axis < 0 else axis
                    if 0 <= axis < len(dims) and isinstance(dims[axis], int) and dims[axis] > 0:
                        limits[value.name] = min(limits.get(value.name, dims[axis]), dims[axis])
    return limits


def output_channel_axes(model: ir.Model) -> dict[str, int]:
    """The channel axis of each graph output where the graph shows it is not 1.

    A wrong fold is wrong per channel of the op it went into, so verify judges each channel
    of that op's output: ``patterns.channels.channel_of`` walks back from the output with
    fold's own matchers and layout proofs, so the axis is the one a fold of any pattern
    scaled. Outputs the walk cannot place keep the default, axis 1."""
    from bnfold.constant_eval import Constants
    from bnfold.patterns.channels import channel_of

    consts = Constants(model.ir_version, graphs=[model.graph])
    axes = {}
    for value in model.graph.outputs:
        channel = channel_of(value, consts)
        if channel is None or channel.axis is None:
            continue
        known = channel.normalized() or channel
        if known.axis != 1:
            axes[value.name] = known.axis
    return axes


def _is_integer(dtype: str) -> bool:
    return dtype.startswith(("int", "uint"))


def tensor_mismatches(role: str, ours: Sequence[TensorSignature], theirs: Sequence[TensorSignature],
                      names=("ORIGINAL", "CANDIDATE")) -> list[str]:
    """Unknown dimensions (and unknown shapes) fit anything; static sizes and symbolic names must agree."""
    problems = []
    by_name = {tensor.name: tensor for tensor in theirs}
    for tensor in ours:
        other = by_name.get(tensor.name)
        if other is None:
            problems.append(f"{role} {tensor.name!r} of {names[0]} is missing from {names[1]}")
        elif other.dtype != tensor.dtype or not _shapes_compatible(tensor.shape, other.shape):
            problems.append(
                f"{role} {tensor.name!r} is {tensor.describe()} in {names[0]} but {other.describe()} in {names[1]}"
            )
    ours_names = {tensor.name for tensor in ours}
    problems += [
        f"{names[1]} has {role} {tensor.name!r}, which {names[0]} does not have"
        for tensor in theirs
        if tensor.name not in ours_names
    ]
    return problems


def _shapes_compatible(left, right) -> bool:
    if left is None or right is None:
        return True
    return len(left) == len(right) and all(a is None or b is None or a == b for a, b in zip(left, right))


# --- option parsing ----------------------------------------------------------------------

_SHAPE_HELP = "expected NAME:DIMS such as images:1x3x224x224, images:1,3,224,224, images:[1,3,224,224] or images=1x3x224x224"


def parse_shape(spec: str) -> tuple[str, tuple[int, ...]]:
    """Parse ``--shape``: ``NAME:1x3x224x224``, ``NAME:1,3,224,224``, ``NAME:[1,3,224,224]``
    or ``NAME=1x3x224x224``. The name is everything before the last ``=`` (or, without
    one, the last ``:``), so TensorFlow names such as ``input:0`` work."""
    separator = "=" if "=" in spec else ":"
    name, sep, dims_text = spec.rpartition(separator)
    text = dims_text.strip().lower()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        dims = tuple(int(dim) for dim in re.split(r"[x,]", text)) if text else ()
    except ValueError:
        dims = ()
    if not sep or not name or not dims or min(dims) < 1:
        raise InputError(f"--shape {spec!r}: {_SHAPE_HELP}")
    return name, dims


def parse_shapes(specs: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """Parse repeated ``--shape`` values; naming an input twice is a usage error."""
    return _by_input(specs, parse_shape, "--shape")


#: Key of the range that applies to every input not named.
ALL_INPUTS = "*"


def parse_input_range(spec: str) -> tuple[str, tuple[float, float]]:
    """``NAME=LO,HI`` (or ``NAME:[LO,HI]``), or ``LO,HI`` for every input: [LO, HI], inclusive.
    Integer literals stay exact ints (a uint64 bound needs all 64 bits)."""
    name, sep, values = spec.rpartition("=")
    if not sep:
        match = re.fullmatch(r"(.+):\[?\s*([^,\[\]:]+)\s*,\s*([^,\[\]]+?)\s*\]?", spec)
        if match and not re.fullmatch(r"[-+.\deE]+", match.group(1)):
            name, values = match.group(1), f"{match.group(2)},{match.group(3)}"
        else:
            name, values = ALL_INPUTS, spec
    values = values.strip().removeprefix("[").removesuffix("]")
    try:
        low, high = (_number(v) for v in values.split(","))
    except ValueError:
        raise InputError(f"--input-range {spec!r}: expected NAME=LO,HI (e.g. ids=0,999) or LO,HI for all inputs") from None
    if not (np.isfinite(low) and np.isfinite(high)) or low > high:
        raise InputError(f"--input-range {spec!r}: LO and HI must be finite with LO <= HI")
    return name or ALL_INPUTS, (low, high)


def _number(text: str) -> float | int:
    text = text.strip()
    return int(text) if re.fullmatch(r"[-+]?\d+", text) else float(text)


def parse_input_ranges(specs: Sequence[str]) -> dict[str, tuple[float, float]]:
    """Parse repeated ``--input-range`` values; naming an input (or all) twice is a usage error."""
    return _by_input(specs, parse_input_range, "--input-range")


def _by_input(specs: Sequence[str], parse, option: str) -> dict:
    """``{name: value}`` from ``parse(spec) -> (name, value)`` for each spec of ``option``."""
    parsed: dict = {}
    for spec in specs:
        name, value = parse(spec)
        if name in parsed:
            raise InputError(f"{option} {'(all inputs)' if name == ALL_INPUTS else name} is given twice")
        parsed[name] = value
    return parsed


# --- random inputs -----------------------------------------------------------------------


def resolve_input_shapes(
    inputs: Sequence[TensorSignature], overrides: Mapping[str, Sequence[int]], batch: int, path
) -> dict[str, tuple[int, ...]]:
    """Give every input a concrete shape: ``--shape`` first, then symbols it fixed, then batch.

    A dynamic first dimension is the batch; a symbolic name resolved anywhere takes that
    size everywhere; any other dynamic dimension must come from ``--shape``, and the error
    says which ``--shape`` to paste.
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
                f"--shape {name}:{'x'.join(map(str, dims))} does not fit the declared {by_name[name].describe()}"
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
                f"{path}: input {tensor.name!r} has no declared shape; give it with "
                f"--shape {shlex.quote(tensor.name + ':DIMS')} (e.g. {shlex.quote(tensor.name + ':1x3x224x224')})"
            )
        if tensor.shape and isinstance(tensor.shape[0], str):
            symbols.setdefault(tensor.shape[0], batch)
    for tensor in inputs:
        if tensor.name in resolved:
            continue
        dims, unresolved = [], []
        for axis, dim in enumerate(tensor.shape):
            if isinstance(dim, int):
                dims.append(dim)
            elif dim in symbols:
                dims.append(symbols[dim])
            elif axis == 0:
                dims.append(batch)
            else:
                unresolved.append((axis, dim))
                dims.append(None)
        if unresolved:
            axis, dim = unresolved[0]
            example = [d if d is not None else _placeholder(len(tensor.shape), a) for a, d in enumerate(dims)]
            names = ", ".join(str(d or "unnamed") for _, d in unresolved)
            raise InputError(
                f"{path}: input {tensor.name!r} dimension {axis} ({dim or 'unnamed'}) is dynamic "
                f"(declared {tensor.describe()}); give its size with "
                f"--shape {shlex.quote(tensor.name + ':' + 'x'.join(map(str, example)))} "
                f"(the sizes standing for {names} are examples: use yours)"
            )
        resolved[tensor.name] = tuple(dims)
    return {tensor.name: resolved[tensor.name] for tensor in inputs}


def _placeholder(rank: int, axis: int) -> int:
    """An example size for an unknown dimension: an image side for 4-D inputs, else 16."""
    return 224 if rank == 4 and axis >= 2 else 16


def input_ranges(
    inputs: Sequence[TensorSignature], given: Mapping[str, tuple[float, float]], limits: Mapping[str, int], path
) -> dict[str, tuple[tuple[float, float] | None, str]]:
    """Each input's value range and its source: given, derived from a Gather, or the default."""
    names = {tensor.name for tensor in inputs}
    unknown = [name for name in given if name != ALL_INPUTS and name not in names]
    if unknown:
        raise InputError(f"--input-range {unknown[0]}: not an input of {path} (inputs: {', '.join(names) or 'none'})")
    ranges = {}
    for tensor in inputs:
        if tensor.name in given:
            ranges[tensor.name] = (given[tensor.name], "--input-range")
            _check_range(tensor, given[tensor.name], f"--input-range {tensor.name}=")
        elif ALL_INPUTS in given:
            ranges[tensor.name] = (given[ALL_INPUTS], "--input-range (all inputs)")
            _check_range(tensor, given[ALL_INPUTS], "--input-range ")
        elif _is_integer(tensor.dtype) and tensor.name in limits:
            ranges[tensor.name] = ((0, limits[tensor.name] - 1), f"indexes a dimension of size {limits[tensor.name]}")
        elif _is_integer(tensor.dtype):
            ranges[tensor.name] = ((0, INTEGER_INPUT_HIGH - 1), "default")
        elif tensor.dtype == "bool":
            ranges[tensor.name] = ((0, 1), "default")
        else:
            ranges[tensor.name] = (None, "standard normal")
    return ranges


def _check_range(tensor: TensorSignature, bounds: tuple[float, float], option: str) -> None:
    """Refuse a range that holds no value of the input's type, or reaches beyond the type."""
    low, high = bounds
    given = f"{option}{_plain(low)},{_plain(high)}: input {tensor.name!r} is {tensor.dtype}"
    if tensor.dtype == "bool":
        if not any(low <= value <= high for value in (0, 1)):
            raise InputError(f"{given}, whose only values are 0 (False) and 1 (True), and "
                             f"[{_plain(low)}, {_plain(high)}] holds neither")
        return
    if _is_integer(tensor.dtype):
        info = np.iinfo(numpy_dtype(tensor.dtype))
        if math.ceil(low) > math.floor(high):
            raise InputError(f"{given}, and [{_plain(low)}, {_plain(high)}] holds no integer")
        if math.ceil(low) < info.min or math.floor(high) > info.max:
            raise InputError(f"{given}, whose values lie in [{info.min}, {info.max}]")
        return
    largest = float(np.finfo(numpy_dtype(tensor.dtype)).max)
    if max(abs(low), abs(high)) > largest:
        raise InputError(f"{given}, whose finite values lie in [-{largest:g}, {largest:g}]")


def random_feeds(
    signature: ModelSignature, shapes_given: Mapping[str, Sequence[int]], ranges_given: Mapping[str, tuple[float, float]],
    batch: int, samples: int, seed: int, path,
) -> tuple[list[dict[str, np.ndarray]], list[InputData]]:
    inputs = signature.inputs
    shapes = resolve_input_shapes(inputs, shapes_given, batch, path)
    ranges = input_ranges(inputs, ranges_given, signature.index_limits or {}, path)
    rng = np.random.default_rng(seed)
    feeds = [
        {tensor.name: random_array(rng, tensor.dtype, shapes[tensor.name], ranges[tensor.name][0])
         for tensor in inputs}
        for _ in range(samples)
    ]
    data = []
    for tensor in inputs:
        bounds, source = ranges[tensor.name]
        data.append(InputData(tensor.name, tensor.dtype, list(shapes[tensor.name]),
                              None if bounds is None else [_plain(bounds[0]), _plain(bounds[1])], source))
    return feeds, data


def _plain(value: float | int) -> float | int:
    if isinstance(value, int):
        return value
    return int(value) if float(value).is_integer() else float(value)


def random_array(rng: np.random.Generator, dtype: str, shape: tuple[int, ...], bounds) -> np.ndarray:
    """Seeded values of ``dtype``: uniform in ``bounds`` (checked by ``input_ranges``: they
    hold a value of the type), standard normal for floats without bounds."""
    numpy_type = numpy_dtype(dtype)
    if numpy_type.kind in "biu":
        low, high = (0, 1) if bounds is None else (math.ceil(bounds[0]), math.floor(bounds[1]))
        if numpy_type.kind == "b":
            low, high = max(low, 0), min(high, 1)
        return rng.integers(low, high, size=shape, endpoint=True, dtype=numpy_type)
    if bounds is None:
        return rng.standard_normal(shape).astype(numpy_type)
    return rng.uniform(bounds[0], bounds[1], size=shape).astype(numpy_type)


def numpy_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


# --- npz ---------------------------------------------------------------------------------


def read_npz(path: Path, what: str) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise InputError(f"{path}: a single array, not an .npz archive of arrays named after the {what}")
        with loaded:
            return {key: loaded[key] for key in loaded.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise InputError(f"{path}: not a readable .npz archive ({_first_line(exc)})") from None


def feeds_from_npz(
    path: Path, inputs: Sequence[TensorSignature]
) -> tuple[list[dict[str, np.ndarray]], list[InputData]]:
    """Read real inputs: one array per input name, samples stacked along axis 0.

    Where an input's first dimension is static, the arrays are fed that many samples at a
    time; every input must split into the same number of runs.
    """
    arrays = read_npz(path, "inputs")
    names = [tensor.name for tensor in inputs]
    extra = sorted(set(arrays) - set(names))
    if extra:
        raise InputError(f"{path}: key {extra[0]!r} is not an input of the model (inputs: {', '.join(names)})")
    missing = [name for name in names if name not in arrays]
    if missing:
        raise InputError(f"{path}: no array for input {missing[0]!r} (inputs: {', '.join(names)})")
    runs_by_input = {}
    for tensor in inputs:
        array = arrays[tensor.name]
        if array.dtype != numpy_dtype(tensor.dtype):
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
    return feeds, [InputData(tensor.name, tensor.dtype, shapes[tensor.name], _range_of(arrays[tensor.name]), "npz")
                   for tensor in inputs]


def _range_of(array: np.ndarray) -> list[float] | None:
    if array.size == 0 or array.dtype.kind not in "biuf":
        return None
    finite = array[np.isfinite(array)] if array.dtype.kind == "f" else array
    if finite.size == 0:
        return None
    return [_plain(float(finite.min())), _plain(float(finite.max()))]


def outputs_from_npz(
    path: Path, outputs: Sequence[TensorSignature], runs: int
) -> tuple[dict[str, list[np.ndarray]], list[str]]:
    """Stored reference outputs: one array per output name, the runs concatenated along
    axis 0 (what ``--save-outputs`` writes); returns the per-run arrays and the problems
    (outputs the model has and the file lacks, or the reverse) for the report."""
    arrays = read_npz(path, "outputs")
    names = [tensor.name for tensor in outputs]
    problems = [f"output {name!r} of CANDIDATE is missing from REFERENCE {path}" for name in names if name not in arrays]
    problems += [f"REFERENCE {path} has output {key!r}, which CANDIDATE does not have"
                 for key in sorted(arrays) if key not in names]
    by_run: dict[str, list[np.ndarray]] = {}
    for name in names:
        if name not in arrays:
            continue
        array = arrays[name]
        if runs > 1 and (array.ndim == 0 or array.shape[0] % runs):
            raise InputError(f"{path}: output {name!r} with shape {list(array.shape)} does not split into the "
                             f"{runs} runs of the inputs")
        by_run[name] = np.split(array, runs) if runs > 1 else [array]
    return by_run, problems


def write_npz(path: Path, arrays_by_name: Mapping[str, Sequence[np.ndarray]], what: str) -> None:
    """Write one array per name, the runs concatenated along axis 0 (the layout --inputs and
    --reference-outputs read), atomically."""
    joined = {}
    for name, arrays in arrays_by_name.items():
        if len(arrays) == 1:
            joined[name] = arrays[0]
        elif any(np.ndim(a) == 0 for a in arrays):
            raise InputError(f"{path}: {what} {name!r} is a scalar in each of {len(arrays)} runs, which one npz "
                             "array cannot hold; run with --samples 1")
        else:
            joined[name] = np.concatenate(arrays, axis=0)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.npz")
    try:
        np.savez(tmp, **joined)
        os.replace(tmp, path)
    except OSError as exc:
        raise InputError(f"{path}: cannot write {what} ({exc.strerror or exc})") from None
    finally:
        tmp.unlink(missing_ok=True)
