"""``recalibrate``: recompute every BatchNormalization's running mean and variance from data.

A BN whose running statistics were never updated (mean 0, variance 1), were trained on
other data than the model now sees, or that runs in training mode is fixed by measuring
what actually reaches it: feed representative, unlabelled inputs, collect each BN's
data input, and store its per-channel mean and biased variance as the new running
statistics. Training-mode BNs become inference BNs with those statistics.

Order matters. A BN's input depends on every BN before it, so its statistics are only
right once those upstream BNs normalise with their *new* statistics. BNs are therefore
recalibrated level by level in graph order: a level is one more than the deepest
recalibrated BN feeding it, and all BNs of one level are measured in one pass over the
data, on an onnxruntime session of the model as recalibrated so far (pruned to what
those BNs read, their data inputs exposed as outputs). The cost is one pass per level,
not per BN.

Statistics are pooled exactly: per-channel mean and biased variance over every axis but
axis 1, merged batch by batch in float64 (Chan et al.'s parallel update, weighted by
element counts), so the result does not depend on the batch size. Only one batch of
activations is held at a time.

The output is written like ``fold``'s: the input's own protobuf with only the edited parts
changed. Each recalibrated BN gets mean and variance tensors of its own (exporters share
one BN's statistics with others through Identity nodes; a shared tensor is never changed
in place), tensors nobody reads any more are dropped, and external data stays external.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from bnfold import affine
from bnfold._onnx_ir import ir
from bnfold.constant_eval import Constants
from bnfold.errors import InputError
from bnfold.ledger import NoMatch
from bnfold.load import _first_line, as_source, has_external_data
from bnfold.plan import iter_scopes, is_batch_norm, mode_problem, read_stats, used_names
from bnfold.rewrite import Editor
from bnfold.runtime import require_onnxruntime
from bnfold.save import EditedModel, save_edited
from bnfold.source import Source
from bnfold.verification.feeds import read_npz
from bnfold.writer import Edited, apply_edits, copy_message

__all__ = ["REASONS", "BNRecalibration", "Moments", "RecalibrateResult", "StatsSummary", "recalibrate",
           "render_report", "report_title"]

RECALIBRATE_SCHEMA_VERSION = 1
#: Samples per onnxruntime run unless the model's inputs fix their batch size.
DEFAULT_BATCH = 32

STATUS_RECALIBRATED = "recalibrated"
STATUS_SKIPPED = "skipped"

#: Why a BN was left as it is. Keys are stable codes (reports and tests match on them).
REASONS: dict[str, str] = {
    "not-selected": "--only did not name this BN",
    "in-subgraph": "the BN lies in a subgraph (If/Loop/Scan body) or a function: only main-graph BNs are recalibrated",
    "unsupported-form": "BatchNormalization older than version 6, or spatial=0 (per-element statistics)",
    "running-stats-used": "a training-mode BN whose running-stat outputs are read: it cannot become an inference BN",
    "stats-not-constant": "mean/var are graph inputs (or overridable initializers) or computed in the graph",
    "constant-input": "the BN's data input is a constant: there is nothing to measure",
    "non-finite-activations": "the BN's input held NaN or infinity on the data",
    "dtype-overflow": "the new statistics do not fit the dtype of the old ones",
}


@dataclass
class StatsSummary:
    """Running statistics of one BN, summarised over its channels."""

    mean_min: float
    mean_max: float
    var_min: float
    var_max: float

    @classmethod
    def of(cls, mean: np.ndarray, var: np.ndarray) -> StatsSummary:
        return cls(float(np.min(mean)), float(np.max(mean)), float(np.min(var)), float(np.max(var)))

    def describe(self) -> str:
        return (f"mean [{self.mean_min:.3g}, {self.mean_max:.3g}], "
                f"var [{self.var_min:.3g}, {self.var_max:.3g}]")


@dataclass
class BNRecalibration:
    """What recalibration did to one BatchNormalization."""

    bn: str
    graph: str
    status: str
    reason: str | None = None
    detail: str = ""
    channels: int | None = None
    #: The pass that measured it: 1 for BNs no other recalibrated BN feeds, and so on.
    level: int | None = None
    #: Samples (along axis 0 of the data) pooled, and values pooled per channel.
    samples: int = 0
    count: int = 0
    converted_from_training: bool = False
    old: StatsSummary | None = None
    new: StatsSummary | None = None
    #: Largest ``|new mean - old mean| / sqrt(old var + eps)`` over the channels.
    max_mean_shift: float | None = None
    #: Largest ``|new var - old var| / (old var + eps)`` over the channels.
    max_var_change: float | None = None
    #: The larger of the two: the largest relative change of the statistics.
    max_rel_change: float | None = None
    #: The new statistics in float64 (before the cast to the model's dtype).
    mean: np.ndarray | None = field(default=None, repr=False)
    var: np.ndarray | None = field(default=None, repr=False)

    @property
    def recalibrated(self) -> bool:
        return self.status == STATUS_RECALIBRATED

    def to_dict(self) -> dict:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("mean", "var")}
        for key in ("old", "new"):
            data[key] = None if data[key] is None else dataclasses.asdict(data[key])
        return data


@dataclass
class RecalibrateResult(EditedModel):
    """The recalibrated model (analysis view), the per-BN report, and the edited protobuf
    that ``save`` writes. ``source`` is the edited Source: ``fold(result.source)`` folds the
    recalibrated model, editing those same objects (save the recalibrated model first if
    you want it too)."""

    model: ir.Model
    report: list[BNRecalibration]
    edited: Edited
    source: Source
    external_data: bool = False
    #: Samples used, samples per onnxruntime run, passes over the data, wall time.
    samples: int = 0
    batch: int = 0
    passes: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def recalibrated(self) -> list[BNRecalibration]:
        return [entry for entry in self.report if entry.recalibrated]

    def to_dict(self, **context) -> dict:
        from bnfold import __version__

        return {
            "schema": "bnfold.recalibrate",
            "schema_version": RECALIBRATE_SCHEMA_VERSION,
            "bnfold_version": __version__,
            **context,
            "summary": {"bn_total": len(self.report), "recalibrated": len(self.recalibrated),
                        "skipped": len(self.report) - len(self.recalibrated), "samples": self.samples,
                        "batch": self.batch, "passes": self.passes, "seconds": round(self.seconds, 3)},
            "notes": list(self.notes),
            "entries": [entry.to_dict() for entry in self.report],
        }


# --- the API -------------------------------------------------------------------------


def recalibrate(model, data: str | os.PathLike | Mapping[str, np.ndarray], *, samples: int | None = None,
                batch: int | None = None, seed: int = 0, only: Iterable[str] | None = None) -> RecalibrateResult:
    """Recompute the running mean and variance of every main-graph BN (or those named in
    ``only``, by node name or ledger label) from ``data``: a .npz file or a mapping with
    one array per model input, samples along axis 0. ``samples`` picks that many samples
    at random (``seed``); ``batch`` is the number of samples per onnxruntime run (it does
    not change the result). A path is loaded; a ModelProto or onnx_ir Model is copied first.
    """
    started = time.perf_counter()
    require_onnxruntime("bnfold recalibrate")
    source = as_source(model)
    external = has_external_data(source)  # decided before any edit
    arrays = _load_data(data)
    graph = source.model.graph
    inputs = [v for v in graph.inputs if not v.is_initializer() and v.name not in source.opaque_inputs]
    arrays, total = _check_data(arrays, inputs, data)
    fixed = _fixed_batch(inputs)
    if batch is not None and batch < 1:
        raise InputError(f"--batch must be at least 1, got {batch}")
    if fixed is not None and batch is not None and batch != fixed:
        raise InputError(f"the model's inputs have a fixed batch of {fixed}; --batch {batch} cannot be fed")
    batch = fixed or batch or DEFAULT_BATCH
    order = _pick_samples(total, samples, seed)
    notes = []
    if fixed is not None and len(order) % fixed:
        used = len(order) - len(order) % fixed
        if used == 0:
            raise InputError(f"{len(order)} sample(s) are fewer than the model's fixed batch of {fixed}")
        notes.append(f"the model's fixed batch is {fixed}: {len(order) - used} sample(s) left out")
        order = order[:used]

    scopes = list(iter_scopes(source.model))
    consts = Constants(source.model.ir_version, graphs=[scope.graph for scope in scopes])
    editor = Editor(consts, {scope.graph: scope for scope in scopes})
    report, targets = _select(scopes, consts, only)
    _check_upstream(graph, scopes[0].opset, targets, report)
    levels = _levels(graph, targets)

    passes = 0
    with tempfile.TemporaryDirectory(prefix="bnfold-recalibrate-") as folder:
        for level in sorted(set(levels.values())):
            members = [bn for bn in targets if levels[bn] == level]
            captures = {bn.inputs[0].name: bn.inputs[0] for bn in members}
            from_graph = [name for name, value in captures.items() if not value.is_graph_input()]
            session = None
            if from_graph:
                path = _capture_model(source, editor, external, from_graph, Path(folder), level)
                session = _session(path)
                passes += 1
            moments = _measure(session, from_graph, captures, arrays, inputs, order, batch)
            if session is not None:  # one pass's copy of the model on disk at a time
                del session
                shutil.rmtree(path.parent, ignore_errors=True)
            for bn in members:
                entry = report[bn]
                entry.level = level
                _store(bn, entry, moments[bn.inputs[0].name], editor, consts, targets[bn], len(order))
    if not any(entry.recalibrated for entry in report.values()):
        reasons = sorted({entry.reason for entry in report.values()})
        raise InputError(f"none of the {len(report)} BatchNormalization can be recalibrated ({', '.join(reasons)})")
    edited = apply_edits(source, editor.attributes, editor.truncated, external)
    return RecalibrateResult(model=source.model, report=list(report.values()), edited=edited, source=source,
                             external_data=external, samples=len(order), batch=batch, passes=passes,
                             seconds=time.perf_counter() - started, notes=notes)


# --- data ----------------------------------------------------------------------------


def _load_data(data) -> dict[str, np.ndarray]:
    if isinstance(data, Mapping):
        return {str(k): np.asarray(v) for k, v in data.items()}
    return read_npz(Path(data), "inputs")


def _check_data(arrays: dict[str, np.ndarray], inputs: list[ir.Value], data) -> tuple[dict[str, np.ndarray], int]:
    """Every model input has an array of its rank, dtype and static dims, with one
    number of samples along axis 0; arrays are cast between float types where needed."""
    where = f"{data}: " if not isinstance(data, Mapping) else "data: "
    names = [v.name for v in inputs]
    if not inputs:
        raise InputError("the model has no inputs to feed")
    missing = [name for name in names if name not in arrays]
    if missing:
        raise InputError(f"{where}no array for input {missing[0]!r} (model inputs: {', '.join(names)}; "
                         f"arrays: {', '.join(sorted(arrays)) or 'none'})")
    extra = sorted(set(arrays) - set(names))
    if extra:
        raise InputError(f"{where}array {extra[0]!r} is not an input of the model (inputs: {', '.join(names)})")
    checked, counts = {}, {}
    for value in inputs:
        array = arrays[value.name]
        dims = _dims(value)
        if array.ndim == 0:
            raise InputError(f"{where}{value.name!r} is a scalar: samples must lie along axis 0")
        if dims is not None and len(dims) != array.ndim:
            raise InputError(f"{where}{value.name!r} has shape {list(array.shape)}, the model input has rank "
                             f"{len(dims)} ({_describe_dims(dims)})")
        if dims is not None and any(isinstance(d, int) and d != n for d, n in zip(dims[1:], array.shape[1:])):
            raise InputError(f"{where}{value.name!r} has shape {list(array.shape)}, the model input is "
                             f"{_describe_dims(dims)}")
        want = value.dtype.numpy() if value.dtype is not None else None
        if want is not None and array.dtype != want:
            if np.dtype(want).kind == "f" and array.dtype.kind in "fiu":
                array = array.astype(want)
            else:
                raise InputError(f"{where}{value.name!r} is {array.dtype}, the model input is {np.dtype(want)}")
        checked[value.name] = array
        counts[value.name] = array.shape[0]
    if len(set(counts.values())) > 1:
        raise InputError(f"{where}the inputs hold different numbers of samples along axis 0 ({counts})")
    total = next(iter(counts.values()))
    if total == 0:
        raise InputError(f"{where}no samples (axis 0 is empty)")
    return checked, total


def _dims(value: ir.Value) -> list | None:
    if value.shape is None:
        return None
    return [d if isinstance(d, int) else None for d in value.shape]


def _describe_dims(dims: list) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"


def _fixed_batch(inputs: list[ir.Value]) -> int | None:
    """The batch the inputs fix with a static first dimension, if any."""
    fixed = {dims[0] for dims in map(_dims, inputs) if dims and isinstance(dims[0], int) and dims[0] > 0}
    if len(fixed) > 1:
        raise InputError(f"the model's inputs fix different batch sizes ({sorted(fixed)}): they cannot be fed "
                         "samples together")
    return fixed.pop() if fixed else None


def _pick_samples(total: int, samples: int | None, seed: int) -> np.ndarray:
    if samples is None:
        return np.arange(total)
    if samples < 1:
        raise InputError(f"--samples must be at least 1, got {samples}")
    if samples > total:
        raise InputError(f"--samples {samples} exceeds the {total} samples in the data")
    return np.sort(np.random.default_rng(seed).choice(total, samples, replace=False))


# --- which BNs, in which order -------------------------------------------------------


@dataclass(frozen=True)
class _Target:
    """A BN to recalibrate: its parameters' reading, and whether it is converted."""

    convert: bool
    opset: int
    epsilon: float
    old_mean: np.ndarray
    old_var: np.ndarray
    mean_dtype: np.dtype
    var_dtype: np.dtype


def _select(scopes, consts: Constants, only: Iterable[str] | None) -> tuple[dict, dict]:
    """A report entry for every BN of the model; the main-graph BNs to recalibrate."""
    report: dict[ir.Node, BNRecalibration] = {}
    targets: dict[ir.Node, _Target] = {}
    names: dict[ir.Node, tuple[str, str]] = {}
    for scope in scopes:
        for index, node in enumerate(scope.graph):
            if is_batch_norm(node):
                names[node] = (node.name, _label(node, index))
                report[node] = BNRecalibration(bn=_label(node, index), graph=scope.label, status=STATUS_SKIPPED)
    if not report:
        raise InputError("the model has no BatchNormalization to recalibrate")
    wanted = None
    if only is not None:
        wanted = {only} if isinstance(only, str) else set(only)
        known = {n for pair in names.values() for n in pair if n}
        unknown = sorted(wanted - known)
        if unknown:
            shown = ", ".join(sorted({label for _, label in names.values()})[:8])
            raise InputError(f"--only {unknown[0]!r} names no BatchNormalization (BNs: {shown}"
                             f"{', ...' if len(names) > 8 else ''})")
    for scope in scopes:
        for node in scope.graph:
            if node not in report:
                continue
            entry = report[node]
            if not scope.is_main:
                _skip(entry, "in-subgraph", f"in {scope.label}")
                continue
            if wanted is not None and not (set(names[node]) & wanted):
                _skip(entry, "not-selected", "")
                continue
            target = _target(node, scope.opset, consts, entry)
            if target is not None:
                targets[node] = target
    return report, targets


def _target(bn: ir.Node, opset: int, consts: Constants, entry: BNRecalibration) -> _Target | None:
    convert = False
    problem = mode_problem(bn, opset)
    if problem is not None:
        reason, detail = problem
        if reason != "training-mode":
            _skip(entry, "unsupported-form", detail)
            return None
        used = used_names([v for v in bn.outputs[1:] if v is not None and v.name])
        if used:
            _skip(entry, "running-stats-used", f"running-stat outputs read: {', '.join(used)}")
            return None
        convert = True
    try:
        stats = read_stats(bn, consts)
    except NoMatch as no:
        _skip(entry, "stats-not-constant", no.detail)
        return None
    entry.channels = stats.channels
    data = bn.inputs[0]
    if data is None or consts.tensor(data)[0] is not None:
        _skip(entry, "constant-input", f"{data.name!r} is a constant" if data is not None else "no data input")
        return None
    mean_dtype = np.dtype(consts.tensor(bn.inputs[3])[0].dtype.numpy())
    var_dtype = np.dtype(consts.tensor(bn.inputs[4])[0].dtype.numpy())
    return _Target(convert, opset, stats.epsilon, stats.mean, stats.var, mean_dtype, var_dtype)


def _skip(entry: BNRecalibration, reason: str, detail: str) -> None:
    entry.status, entry.reason, entry.detail = STATUS_SKIPPED, reason, detail


def _label(node: ir.Node, index: int) -> str:
    """A node's name, or what identifies an unnamed one (as the fold ledger labels it)."""
    if node.name:
        return node.name
    output = node.outputs[0].name if node.outputs and node.outputs[0] is not None else ""
    return f"{node.op_type}#{index} -> {output!r}"


def _reads(node: ir.Node) -> list[ir.Value]:
    """Every value ``node`` reads, including those its subgraphs read from enclosing graphs."""
    values = [v for v in node.inputs if v is not None]
    pending = [node]
    while pending:
        current = pending.pop()
        for attr in current.attributes.values():
            if attr.is_ref():
                continue
            graphs = [attr.value] if attr.type == ir.AttributeType.GRAPH else (
                list(attr.value) if attr.type == ir.AttributeType.GRAPHS else [])
            for sub in graphs:
                for inner in sub:
                    values.extend(v for v in inner.inputs if v is not None)
                    pending.append(inner)
    return values


def _levels(graph: ir.Graph, targets: dict) -> dict[ir.Node, int]:
    """Each target's level: one more than the deepest target upstream of its data input."""
    reach: dict[ir.Value, int] = {}
    levels: dict[ir.Node, int] = {}
    for node in graph:  # ONNX graphs are topologically sorted (load checked it)
        deepest = max((reach.get(v, 0) for v in _reads(node)), default=0)
        if node in targets:
            levels[node] = reach.get(node.inputs[0], 0) + 1
            deepest = max(deepest, levels[node])
        for out in node.outputs:
            if out is not None:
                reach[out] = deepest
    return levels


def _check_upstream(graph: ir.Graph, opset: int, targets: dict, report: dict) -> None:
    """A target fed by a training-mode BN that stays in training mode would be measured on
    batch-dependent activations: refused when --only left it out, noted otherwise."""
    training = {node for node in report if node not in targets and node.graph is graph
                and (mode_problem(node, opset) or ("",))[0] == "training-mode"}
    if not training:
        return
    upstream: dict[ir.Value, frozenset] = {}
    for node in graph:
        found = frozenset().union(*(upstream.get(v, frozenset()) for v in _reads(node)))
        if node in targets and found:
            names = ", ".join(sorted(report[bn].bn for bn in found))
            if any(report[bn].reason == "not-selected" for bn in found):
                raise InputError(f"BatchNormalization {report[node].bn!r} is fed by training-mode BN(s) {names} "
                                 "that --only leaves out: its input would depend on the batch; include them")
            report[node].detail = f"fed by training-mode BN(s) left as they are: {names}"
        if node in training:
            found = found | {node}
        for out in node.outputs:
            if out is not None:
                upstream[out] = found


# --- measuring -----------------------------------------------------------------------


class Moments:
    """Per-channel count, mean and sum of squared deviations over every axis but axis 1,
    merged batch by batch in float64 (Chan, Golub and LeVeque's pairwise update)."""

    def __init__(self):
        self.count = 0
        self.mean: np.ndarray | None = None
        self.m2: np.ndarray | None = None

    def update(self, batch: np.ndarray) -> None:
        if batch.ndim < 2:
            raise InputError(f"a BatchNormalization input has shape {list(batch.shape)}: it needs a channel axis 1")
        axes = (0, *range(2, batch.ndim))
        n = math.prod(batch.shape) // batch.shape[1] if batch.shape[1] else 0
        if n == 0:
            return
        mean = batch.mean(axis=axes, dtype=np.float64)
        centered = batch.astype(np.float64) - mean.reshape((1, -1) + (1,) * (batch.ndim - 2))
        np.square(centered, out=centered)
        m2 = centered.sum(axis=axes)
        if self.count == 0:
            self.count, self.mean, self.m2 = n, mean, m2
            return
        if mean.shape != self.mean.shape:
            raise InputError(f"a BatchNormalization input changed its channel count between batches "
                             f"({self.mean.shape[0]} then {mean.shape[0]})")
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + np.square(delta) * (self.count * n / total)
        self.count = total

    @property
    def var(self) -> np.ndarray:
        """The biased (population) variance."""
        return self.m2 / self.count


def _measure(session, from_graph: list[str], captures: dict[str, ir.Value], arrays: dict[str, np.ndarray],
             inputs: list[ir.Value], order: np.ndarray, batch: int) -> dict[str, Moments]:
    moments = {name: Moments() for name in captures}
    for start in range(0, len(order), batch):
        index = order[start:start + batch]
        feed = {value.name: np.ascontiguousarray(arrays[value.name][index]) for value in inputs}
        outputs = dict(zip(from_graph, _run(session, from_graph, feed))) if session is not None else {}
        for name in captures:
            moments[name].update(outputs[name] if name in outputs else feed[name])
    return moments


def _capture_model(source: Source, editor: Editor, external: bool, names: list[str], folder: Path,
                   level: int) -> Path:
    """The model as recalibrated so far, pruned to what computes ``names``, which are its
    outputs; written to ``folder`` (large weights copied, external data kept external)."""
    edited = apply_edits(source, editor.attributes, editor.truncated, external)
    proto = onnx.ModelProto()
    proto.CopyFrom(edited.proto)
    graph = proto.graph
    needed = set(names)
    kept = []
    for node in reversed(graph.node):
        if any(out in needed for out in node.output if out):
            kept.append(node)
            needed.update(_proto_reads(node))
    kept.reverse()
    inputs = {v.name for v in graph.input}
    types = {v.name: v.type for v in [*graph.value_info, *graph.output]}
    defined = inputs | {out for node in kept for out in node.output}
    initializers = [t for t in graph.initializer if t.name in needed or t.name in inputs]
    infos = [v for v in graph.value_info if v.name in defined]
    outputs = []
    for name in names:
        info = onnx.ValueInfoProto(name=name)
        if name in types:
            info.type.CopyFrom(types[name])
        outputs.append(info)
    for field_name, items in (("node", kept), ("initializer", initializers), ("value_info", infos),
                              ("output", outputs)):
        copies = [copy_message(item) for item in items]
        graph.ClearField(field_name)
        getattr(graph, field_name).extend(copies)
    del graph.sparse_initializer[:]  # the analysis model cannot see them; nothing measured reads them
    proto.ClearField("training_info")
    path = folder / f"level{level}" / "model.onnx"
    path.parent.mkdir()
    save_edited(Edited(proto, source, edited.folded, external), path,
                external_data="model.onnx.data" if external else None)
    return path


def _proto_reads(node: onnx.NodeProto) -> set[str]:
    names = {name for name in node.input if name}
    for attr in node.attribute:
        for graph in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
            for inner in graph.node:
                names |= _proto_reads(inner)
    return names


def _session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types for models it cannot run
        raise InputError(f"onnxruntime cannot run the model to measure BN inputs ({_first_line(exc)})") from None


def _run(session, names: list[str], feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    try:
        return session.run(names, feed)
    except Exception as exc:  # onnxruntime raises its own exception types at run time
        raise InputError(f"onnxruntime failed running the model on the data ({_first_line(exc)})") from None


# --- writing the new statistics ------------------------------------------------------


def _store(bn: ir.Node, entry: BNRecalibration, moments: Moments, editor: Editor, consts: Constants,
           target: _Target, samples: int) -> None:
    """Give ``bn`` tensors of its own holding the new statistics; convert it if it runs in
    training mode; drop the old tensors if nothing else reads them."""
    mean = moments.mean
    channels = target.old_mean.shape[0]
    entry.samples, entry.count = samples, moments.count
    if mean is None:
        raise InputError(f"BatchNormalization {entry.bn!r}: its input is empty on the data")
    var = moments.var
    if mean.shape[0] != channels:
        raise InputError(f"BatchNormalization {entry.bn!r} has {channels} channels but its input has "
                         f"{mean.shape[0]} on axis 1: invalid model")
    if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(var))):
        bad = int(np.sum(~(np.isfinite(mean) & np.isfinite(var))))
        _skip(entry, "non-finite-activations", f"NaN/inf on {bad} channel(s)")
        return
    new_mean = affine.cast_checked(mean, target.mean_dtype)
    new_var = affine.cast_checked(var, target.var_dtype)
    if new_mean is None or new_var is None:
        _skip(entry, "dtype-overflow", f"the new statistics exceed the range of {target.mean_dtype}")
        return
    old = [bn.inputs[3], bn.inputs[4]]
    for index, value, array in ((3, old[0], new_mean), (4, old[1], new_var)):
        fresh = editor.constant(bn, f"{value.name or bn.name or 'bn'}_recalibrated", ir.tensor(array))
        bn.replace_input_with(index, fresh)
    if target.convert:
        editor.convert_to_inference(bn, target.opset)
    editor.drop_unused(old)
    scale = np.sqrt(target.old_var + target.epsilon)
    entry.status, entry.reason = STATUS_RECALIBRATED, None
    entry.converted_from_training = target.convert
    entry.old = StatsSummary.of(target.old_mean, target.old_var)
    entry.new = StatsSummary.of(mean, var)
    with np.errstate(divide="ignore", invalid="ignore"):
        entry.max_mean_shift = _peak(np.abs(mean - target.old_mean) / scale)
        entry.max_var_change = _peak(np.abs(var - target.old_var) / (target.old_var + target.epsilon))
    entry.max_rel_change = max(entry.max_mean_shift, entry.max_var_change)
    entry.mean, entry.var = mean, var
    constant = var == 0
    if constant.any():  # honest, not an error: the data never varies there (a blank border pixel)
        entry.detail = "; ".join(filter(None, [entry.detail, f"var == 0 on {int(constant.sum())} channel(s): "
                                                             "the input is constant there on the data"]))


def report_title(result: RecalibrateResult) -> str:
    return (f"bnfold recalibrate: {len(result.recalibrated)} of {len(result.report)} BatchNormalization "
            f"recalibrated ({result.samples} samples, {result.passes} pass(es), {result.seconds:.2f} s)")


def _cells(e: BNRecalibration) -> list[str]:
    """BN, level, status, mean old -> new, var old -> new, max rel change, detail."""
    mean = var = ""
    if e.old is not None and e.new is not None:
        mean = f"[{e.old.mean_min:.3g}, {e.old.mean_max:.3g}] -> [{e.new.mean_min:.3g}, {e.new.mean_max:.3g}]"
        var = f"[{e.old.var_min:.3g}, {e.old.var_max:.3g}] -> [{e.new.var_min:.3g}, {e.new.var_max:.3g}]"
    detail = "; ".join(filter(None, [e.reason, "converted from training mode" if e.converted_from_training else "",
                                     e.detail]))
    return [e.bn, "" if e.level is None else f"level {e.level}", e.status, mean and f"mean {mean}",
            var and f"var {var}", "" if e.max_rel_change is None else f"max rel change {e.max_rel_change:.3g}",
            detail]


def render_report(result: RecalibrateResult, console, out: Path | None = None) -> None:
    """A table on a terminal, one plain line per BN otherwise (pipes, CI logs); then notes
    and where the model went."""
    if console.is_terminal:
        from rich.markup import escape
        from rich.table import Table

        table = Table(title=report_title(result))
        for column in ("BN", "level", "status", "mean: old -> new", "var: old -> new", "max rel change", "detail"):
            table.add_column(column, overflow="fold")
        for e in result.report:
            cells = _cells(e)
            cells[1] = cells[1].removeprefix("level ")
            cells[3] = cells[3].removeprefix("mean ")
            cells[4] = cells[4].removeprefix("var ")
            cells[5] = cells[5].removeprefix("max rel change ")
            table.add_row(*(escape(c) for c in cells), style=None if e.recalibrated else "yellow")
        console.print(table)
        lines = []
    else:
        lines = [report_title(result), *("  ".join(filter(None, _cells(e))) for e in result.report)]
    lines += [f"note: {note}" for note in result.notes]
    if out is not None:
        lines.append(f"wrote {out}")
    for line in lines:
        console.print(line, markup=False, highlight=False, soft_wrap=True, emoji=False)


def _peak(values: np.ndarray) -> float:
    values = values[np.isfinite(values)]
    return float(values.max()) if values.size else 0.0
