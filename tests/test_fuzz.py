"""Differential fuzzer: composed random models must fold into models that run the same.

tests/fuzzgen.py draws a *recipe* (a plain dict: chains of linear ops, BN and constant
Mul/Add/Sub/Div sites, layout ops and Relu, fan-out and graph-output taps, shared
weights, parts nested in If/Loop/Scan bodies or model-local functions with attribute
references, IR 3/opset 7-9 or IR 9/opset 13-17, float32/16/64, degenerate sizes and
statistics, NaN/inf constants, three parameter styles, with or without value_info, odd
names and tensor encodings) and builds the model from it. For each model the oracle
checks:

1. the generated model is valid (checker, full_check) and runs in onnxruntime; if not,
   that is a bug in the generator (``GeneratorBug``), not in bnfold;
2. ``bnfold.fold(path, **flags)``, ``result.save`` and ``bnfold.inspect`` do not raise
   (bnfold's exception propagates, with the recipe attached);
3. the output passes the checker (full_check) and loads in onnxruntime;
4. both run (ORT_DISABLE_ALL) to the same output names, shapes, dtypes, NaN and ±inf
   positions (but where an infinite constant or a zero divisor meets a value that rounding
   moves across zero: ``_signs_rounding_decides``), and values within ``tolerance()``; the real graph inputs are unchanged
   and the input file is untouched;
5. ``bnfold.inspect`` agrees with the ledger of a flagless fold for every BN
   (``fold_reason is None`` iff folded; equal reasons when kept; inspect takes no flags),
   a BN that ``decompose_standalone`` decomposes is one kept as ``no-linear-producer``
   without it, every BN has exactly one ledger entry, and the folded model holds exactly
   the BNs the ledger keeps;
6. every ledger reason is in ``bnfold.ledger.REASONS``.

Each check fails with its own exception class, so hypothesis reports (and shrinks) each
kind of failure separately. Every message carries the shrunk recipe; a failure becomes a
regression test as ``def test_x(tmp_path): check_recipe({...}, tmp_path)``. Seeds are
fresh on every run (not derandomized); ``print_blob`` prints a ``@reproduce_failure``
blob. A failure saved in the local example database (.hypothesis/) is replayed first on
the next run, which then stops after a few more examples: delete it, or run elsewhere,
to explore afresh.

Examples per run come from the hypothesis profile (tests/conftest.py): ``ci`` (default)
1,000 composed graphs (about 20 s on 2 cores), ``HYPOTHESIS_PROFILE=nightly`` 20,000,
``dev`` 100. Coverage: ``pytest tests/test_fuzz.py --hypothesis-show-statistics``.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from hypothesis import event, given, settings
from hypothesis.errors import InvalidArgument

import bnfold
from bnfold.ledger import REASONS
from fuzzgen import build, features, recipes, serialize, walk

SESSION_OPTIONS = ort.SessionOptions()
SESSION_OPTIONS.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
SESSION_OPTIONS.log_severity_level = 3
SESSION_OPTIONS.intra_op_num_threads = 1
SESSION_OPTIONS.inter_op_num_threads = 1
PROVIDERS = ["CPUExecutionProvider"]

#: Tolerance, in units of the dtype's machine epsilon, per arithmetic op in the recipe and
#: relative to the output's magnitude (floored at 1: inputs are N(0, 1) and weights are
#: scaled by 1/sqrt(fan_in), so values inside the graph are O(1)). A fold replaces
#: round(s * round(W x)) by round(round(s W) x): about an ulp per folded site. Measured
#: on 2,000 correct folds: at most 0.62 ulp per op (4.3 ulps over 7 ops, float64), so 4
#: per op leaves 6x headroom; a wrong fold is off by O(1) of the output's magnitude.
ULPS_PER_OP = 4
LINEAR_OPS = {"conv", "convT", "gemm", "matmul"}
ARITH_OPS = LINEAR_OPS | {"bn", "Mul", "Add", "Sub", "Div"}


class GeneratorBug(Exception):
    """The generated model itself is invalid or unrunnable: fix tests/fuzzgen.py."""


class OutputInvalid(Exception):
    """The folded model fails onnx.checker (full_check)."""


class OutputUnrunnable(Exception):
    """The folded model does not load or run in onnxruntime."""


class InterfaceChanged(Exception):
    """Graph outputs or real graph inputs differ, or the input file was modified."""


class ShapeMismatch(Exception):
    """An output's shape or dtype differs."""


class NonFiniteMismatch(Exception):
    """NaN or ±inf at different positions."""


class ValueMismatch(Exception):
    """Finite values differ by more than the tolerance."""


class LedgerIncomplete(Exception):
    """A BN without exactly one ledger entry, or BN nodes left that the ledger does not keep."""


class InspectDisagrees(Exception):
    """inspect's plan differs from what fold did."""


class UnknownReason(Exception):
    """A ledger reason outside bnfold.ledger.REASONS."""


def session(source) -> ort.InferenceSession:
    return ort.InferenceSession(source, SESSION_OPTIONS, providers=PROVIDERS)


def subgraphs(graph: onnx.GraphProto):
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from subgraphs(attr.g)
            for g in attr.graphs:
                yield from subgraphs(g)


def all_nodes(model: onnx.ModelProto):
    for graph in subgraphs(model.graph):
        yield from graph.node
    for function in model.functions:
        for node in function.node:
            yield node
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    for graph in subgraphs(attr.g):
                        yield from graph.node


def count_bns(model: onnx.ModelProto) -> int:
    return sum(node.op_type == "BatchNormalization" and node.domain in ("", "ai.onnx") for node in all_nodes(model))


def real_inputs(model: onnx.ModelProto) -> list[str]:
    initializers = {init.name for init in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in initializers]


def depth(recipe: dict) -> int:
    """Arithmetic ops that can round on the way from input to an output."""
    return 1 + sum(step["op"] in ARITH_OPS for step in walk(recipe["steps"]))


def tolerance(dtype: np.dtype, reference: np.ndarray, recipe: dict) -> float:
    """ULPS_PER_OP ulps per op of depth, of the output's magnitude; a wide reduction (a
    MatMul or Gemm over thousands of features) rounds its sum in another order after a
    fold, which grows like the square root of the width."""
    finite = reference[np.isfinite(reference)].astype(np.float64)
    magnitude = max(1.0, float(np.max(np.abs(finite)))) if finite.size else 1.0
    widest = max([step.get("n", 0) for step in walk(recipe["steps"])] + recipe["input"] + [1])
    return ULPS_PER_OP * float(np.finfo(dtype).eps) * depth(recipe) * magnitude * max(1.0, np.sqrt(widest / 64))


def compare(name: str, expected: np.ndarray, actual: np.ndarray, recipe: dict, where: str,
            rounded: np.ndarray | None = None) -> None:
    """Same shape, dtype, NaN and ±inf positions (but at ``rounded`` positions, see
    _signs_rounding_decides), and values within tolerance()."""
    if expected.shape != actual.shape or expected.dtype != actual.dtype:
        raise ShapeMismatch(f"output {name!r}: expected {expected.dtype}{list(expected.shape)}, "
                            f"got {actual.dtype}{list(actual.shape)}{where}")
    excused = np.zeros(expected.shape, bool) if rounded is None else rounded
    for test in (np.isnan, np.isposinf, np.isneginf):
        differs = (test(expected) != test(actual)) & ~excused
        if differs.any():
            differ = int(differs.sum())
            raise NonFiniteMismatch(f"output {name!r}: {test.__name__} differs at {differ} of {expected.size} "
                                    f"positions{where}")
    finite = np.isfinite(expected)
    if finite.any():
        error = np.abs(expected[finite].astype(np.float64) - actual[finite].astype(np.float64))
        tol = tolerance(expected.dtype, expected, recipe)
        if error.max() > tol:
            raise ValueMismatch(f"output {name!r}: max |error| {error.max():.3g} > tolerance {tol:.3g} "
                                f"(max |expected| {np.abs(expected[finite]).max():.3g}){where}")


def check_recipe(recipe: dict, workdir: Path) -> None:
    """Build, fold and compare one recipe; raise the first failed check."""
    where = f"\nrecipe = {recipe!r}"
    try:
        model, feeds = build(recipe)
        data = serialize(model, recipe.get("encoding", "canonical"))
        onnx.checker.check_model(model, full_check=True)
        expected = session(data).run(None, feeds)
    except Exception as exc:  # noqa: BLE001 - any failure here is the generator's
        raise GeneratorBug(f"{type(exc).__name__}: {exc}{where}") from exc
    names = [o.name for o in model.graph.output]

    src, out = workdir / "in.onnx", workdir / "out.onnx"
    src.write_bytes(data)
    flags = dict(recipe["flags"])
    try:
        result = bnfold.fold(src, **flags)
        result.save(out)
        findings = bnfold.inspect(src)
    except Exception as exc:
        # bnfold's own exception propagates, so that hypothesis tells apart (and shrinks
        # separately) failures raised in different places
        if hasattr(exc, "add_note"):  # Python >= 3.11
            exc.add_note(f"raised by bnfold on a valid model{where}")
        raise
    if src.read_bytes() != data:
        raise InterfaceChanged(f"the input file was modified{where}")

    folded = onnx.load(out)
    try:
        onnx.checker.check_model(folded, full_check=True)
    except Exception as exc:  # noqa: BLE001
        raise OutputInvalid(f"{type(exc).__name__}: {exc}{where}") from exc
    try:
        actual = session(str(out)).run(None, feeds)
    except Exception as exc:  # noqa: BLE001
        raise OutputUnrunnable(f"{type(exc).__name__}: {exc}{where}") from exc
    if [o.name for o in folded.graph.output] != names or real_inputs(folded) != real_inputs(model):
        raise InterfaceChanged(f"outputs {[o.name for o in folded.graph.output]} vs {names}, "
                               f"inputs {real_inputs(folded)} vs {real_inputs(model)}{where}")
    for name, e, a in zip(names, expected, actual):
        rounded = _signs_rounding_decides(name, e, a, model, folded, feeds, recipe)
        compare(name, e, a, recipe, where, rounded)

    entries = list(result.ledger)
    for entry in entries:
        if entry.reason is not None and entry.reason not in REASONS:
            raise UnknownReason(f"{entry}{where}")
    unique = recipe.get("names") != "empty"
    check_ledger(entries, model, folded, where, unique)
    # inspect takes no flags: compare it with what a flagless fold does.
    plain = entries if not flags else list(bnfold.fold(src).ledger)
    check_inspect(plain, findings, where, unique)
    if flags == {"decompose_standalone": True} and len(plain) == len(entries):
        for entry, other in zip(entries, plain):
            if (entry.op, entry.graph, entry.node) != (other.op, other.graph, other.node):
                break  # the ledgers no longer line up
            if entry.status == "decomposed" and other.reason != "no-linear-producer":
                raise InspectDisagrees(f"{entry.node}: decomposed, but without the flag: {other}{where}")
    record(features(recipe))
    record([f"ledger: {sorted({e.status for e in entries}) or 'empty'}"])
    for entry in entries:
        scope = "function" if entry.graph.startswith("function") else "subgraph" if "/" in entry.graph else "main"
        record([f"{entry.status}: {entry.pattern or entry.reason}", f"{entry.status} in {scope}"])


def _signs_rounding_decides(name: str, expected: np.ndarray, actual: np.ndarray, model: onnx.ModelProto,
                            folded: onnx.ModelProto, feeds: dict, recipe: dict) -> np.ndarray | None:
    """Where an output is ``x * c`` (or ``x / c``) with an infinite ``c`` (or a zero divisor) that
    both models keep, a correct fold that changes ``x`` by rounding may turn ``x = -3e-6`` into
    ``+2e-6``, and ``-inf`` into ``+inf`` (or ``0 * inf = NaN`` into ``inf``). Such positions,
    where both outputs are non-finite and ``x`` is within tolerance of zero in both models,
    are returned to be excused; None where the output is not such a site."""
    with np.errstate(invalid="ignore"):
        same = (np.isnan(expected) & np.isnan(actual)) | (expected == actual)
    differs = ~np.isfinite(expected) & ~np.isfinite(actual) & ~same
    if not differs.any():
        return None
    sites = []
    for graph in (model.graph, folded.graph):
        node = next((n for n in graph.node if name in n.output), None)
        if node is None or node.op_type not in ("Mul", "Div") or len(node.input) != 2:
            return None
        sites.append((node.op_type, *node.input))
    if sites[0] != sites[1]:
        return None
    op, *operands = sites[0]
    values = []  # both operands, in each model
    for graph_model in (model, folded):
        probe = onnx.ModelProto()
        probe.CopyFrom(graph_model)
        elem_type = onnx.helper.np_dtype_to_tensor_dtype(expected.dtype)
        outputs = {o.name for o in probe.graph.output}
        probe.graph.output.extend(onnx.helper.make_tensor_value_info(n, elem_type, None)
                                  for n in dict.fromkeys(operands) if n not in outputs)
        try:
            values.append(session(probe.SerializeToString()).run(operands, feeds))
        except Exception:  # noqa: BLE001 - an operand onnxruntime cannot output (a graph input): no excuse
            return None
    for x_index in (0, 1) if op == "Mul" else (0,):  # Div: x / c only
        c_before, c_after = values[0][1 - x_index], values[1][1 - x_index]
        blows_up = ~np.isfinite(c_before) | ((c_before == 0) if op == "Div" else False)
        if not blows_up.any() or not np.array_equal(c_before, c_after, equal_nan=True):
            continue
        x_before, x_after = values[0][x_index], values[1][x_index]
        if x_before.shape != expected.shape or x_after.shape != expected.shape:
            continue
        tol = tolerance(expected.dtype, x_before, recipe)
        near_zero = (np.abs(x_before.astype(np.float64)) <= tol) & (np.abs(x_after.astype(np.float64)) <= tol)
        return differs & near_zero
    return None


def record(events) -> None:
    """Coverage for --hypothesis-show-statistics; nothing outside a @given test (a
    regression test calling check_recipe directly)."""
    try:
        for name in events:
            event(name)
    except InvalidArgument:
        pass


def bn_entries(entries, where, unique: bool) -> dict:
    """The ledger's BN entries by (graph, node); by position when node names repeat (empty)."""
    by_key = {}
    for i, entry in enumerate(e for e in entries if e.op == "BatchNormalization"):
        key = (entry.graph, entry.node) if unique else (i, entry.graph, entry.node)
        if key in by_key:
            raise LedgerIncomplete(f"two ledger entries for BN {key}{where}")
        by_key[key] = entry
    return by_key


def check_ledger(entries, model, folded, where, unique: bool) -> None:
    """One entry per BN; the folded model holds exactly the BNs the ledger keeps."""
    bns = bn_entries(entries, where, unique)
    if len(bns) != count_bns(model):
        raise LedgerIncomplete(f"{len(bns)} BN ledger entries for {count_bns(model)} BNs{where}")
    kept = sum(e.status == "kept" for e in bns.values())
    if count_bns(folded) != kept:
        raise LedgerIncomplete(f"{count_bns(folded)} BNs in the folded model, the ledger keeps {kept}{where}")


def check_inspect(entries, findings, where, unique: bool) -> None:
    """inspect's plan for every BN is what a flagless fold did: fold_reason None iff folded,
    and the same reason when kept."""
    bns = bn_entries(entries, where, unique)
    by_key = {((f.graph, f.bn) if unique else (i, f.graph, f.bn)): f for i, f in enumerate(findings)}
    if set(by_key) != set(bns):
        raise InspectDisagrees(f"inspect covers {sorted(by_key)}, the ledger {sorted(bns)}{where}")
    for key, entry in bns.items():
        plan = by_key[key].fold_reason
        if (entry.status == "folded") != (plan is None) or (plan is not None and plan != entry.reason):
            raise InspectDisagrees(f"BN {key}: inspect plans {by_key[key].plan!r} (fold_reason {plan!r}), fold "
                                   f"{entry.status} ({entry.pattern or entry.reason}: {entry.detail}){where}")


@settings(print_blob=True)
@given(recipe=recipes())
def test_fold_composed_graphs(recipe):
    workdir = Path(tempfile.mkdtemp(prefix="bnfold-fuzz-"))
    try:
        check_recipe(recipe, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
