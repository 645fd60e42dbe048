"""Differential fuzzer: composed random models must fold into models that run the same.

tests/fuzzgen.py draws a *recipe* (a plain dict: chains of linear ops, Concats of two
linear ops along the channel axis or another, BN and constant Mul/Add/Sub/Div sites
after and before linear ops (before a Gemm with every transA/transB), layout ops
(Transposes by cycles and by moves of the channel axis and their inverses) and Relu,
fan-out and graph-output taps, shared weights, parts nested in If/Loop/Scan bodies or
model-local functions with attribute references, IR 3/opset 7-9 or IR 9/opset 13-17,
float32/16/64, degenerate sizes and statistics, NaN/inf constants, three parameter
styles, with or without value_info, odd names and tensor encodings) and builds the model
from it. For each model the oracle checks:

1. the generated model is valid (checker, full_check) and runs in onnxruntime; if not,
   that is a bug in the generator (``GeneratorBug``), not in bnfold;
2. ``bnfold.fold(path, **flags)``, ``result.save`` and ``bnfold.inspect`` do not raise
   (bnfold's exception propagates, with the recipe attached);
3. the output passes the checker (full_check) and loads in onnxruntime;
4. both run (ORT_DISABLE_ALL) to the same output names, shapes, dtypes, NaN and ±inf
   positions (but where an infinite constant or a zero divisor meets a value that rounding
   moves across zero: ``_signs_rounding_decides``; and, once branches were merged into one
   conv in a model that may compute ±inf inside, where ORIGINAL is NaN or ±inf: branches
   reading an infinite value sum ``inf - inf = NaN`` where their merged conv gives
   ``(w_a + w_b) * inf = ±inf``, and a Relu after makes that 0; at the end of the
   dtype's range, ``_end_of_range``; and ±inf, never NaN, where the values an element is
   made of are so large that the square model overflows, ``_made_of_huge_values``), and
   every value within its own rounding ``bound`` (from the recipe's square model: so per
   channel along the axis the ledger folded, and per element); the real graph inputs are
   unchanged and the input file is untouched;
5. ``bnfold.inspect`` agrees with the ledger of a flagless fold for every BN
   (``fold_reason is None`` iff folded; equal reasons when kept; inspect takes no flags),
   with ``decompose_standalone`` a BN is decomposed exactly where the flagless fold keeps
   it as ``no-linear-producer`` and every other BN ends the same (``check_decompose``:
   ledgers that cannot be paired fail), every BN has exactly one ledger entry, and the
   folded model holds exactly the BNs the ledger keeps;
6. every ledger reason is in ``bnfold.ledger.REASONS``.

Each check fails with its own exception class, so hypothesis reports (and shrinks) each
kind of failure separately. Every message carries the shrunk recipe; a failure becomes a
regression test as ``def test_x(tmp_path): check_recipe({...}, tmp_path)``. Seeds are
fresh on every run (not derandomized); ``print_blob`` prints a ``@reproduce_failure``
blob. A failure saved in the local example database (.hypothesis/) is replayed first on
the next run, which then stops after a few more examples: delete it, or run elsewhere,
to explore afresh.

Examples per run come from the hypothesis profile (tests/conftest.py): ``ci`` (default)
1,000 composed graphs (about 25 s on 2 cores), ``HYPOTHESIS_PROFILE=nightly`` 20,000,
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
from fuzzgen import Builder, build, features, path_ops, recipes, reduction_width, serialize, walk

SESSION_OPTIONS = ort.SessionOptions()
SESSION_OPTIONS.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
SESSION_OPTIONS.log_severity_level = 3
SESSION_OPTIONS.intra_op_num_threads = 1
SESSION_OPTIONS.inter_op_num_threads = 1
PROVIDERS = ["CPUExecutionProvider"]

#: How many standard deviations of the rounding noise a correct fold may reach (``bound``).
SIGMAS = 6

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
    """Rounding steps on the longest path from the input to an output, plus one (the input's own)."""
    return 1 + path_ops(recipe["steps"])


def roundoff(dtype) -> float:
    """The unit roundoff u: half the distance from 1 to the next number (float16: 2**-11)."""
    return float(np.finfo(dtype).eps) / 2


def bound(dtype: np.dtype, square: np.ndarray, expected: np.ndarray, recipe: dict) -> np.ndarray:
    """How far a correct fold may move each output element: SIGMAS standard deviations
    of the rounding noise of the two models,

        sigma**2 = (2 * depth + 1) * u**2 * max(S, expected**2)  +  2 * n * u_acc**2 * S

    where S is the recipe's square model's output (fuzzgen.Builder: the mean square of
    the values combined into that element, without cancellation) and depth the rounding
    steps on the way (``depth``). Each rounding step (a linear op, a BN, a constant
    Mul/Add/Sub/Div; onnxruntime rounds each op's result once) makes a relative error of
    at most u, of either sign; later steps carry it on scaled by their coefficients, so
    its variance reaches the output scaled as the square model scales S: each model's
    noise has variance up to depth * u**2 * S, the two models' difference twice that,
    and the fold rounds the new weight and bias once more (u**2 * S). ``u_acc`` is the
    roundoff of the precision onnxruntime sums dot products in (float32 for float16 and
    float32: a float16 MatMul over 8,000 features stays within one float16 rounding;
    float64 for float64), n the longest dot product (``reduction_width``).

    The worst case (every rounding the same sign: ``(2 * depth + 2) * u * A``, A the sum
    of |coefficient| * |value| over the paths) is no use in float16: on these graphs A is
    a median 3-6 times the value and up to thousands of times (Relu zeroes what A keeps),
    so it passes a fold off by 2% at depth 5. Noise does not add up that way: on 5,000
    graphs (9,700 outputs, float16/32/64) correct folds stayed within 1.5 sigma, and
    sqrt(S) is a median 1.2-1.4 times the value. Each element is held to its own bound, so
    every channel (along the axis the ledger folded, or any other) is judged by the values
    it was made of: a small channel cannot hide beside a large one. In float16 at depth 5,
    where S is the square of the value, the bound is 6 * sqrt(11) u = 1% of the value.
    """
    u, u_acc = roundoff(dtype), roundoff(np.float64 if dtype == np.float64 else np.float32)
    square = np.where(np.isnan(square), np.inf, square)
    variance = ((2 * depth(recipe) + 1) * u**2 * np.maximum(square, np.square(expected))
                + 2 * reduction_width(recipe) * u_acc**2 * square)
    return SIGMAS * np.sqrt(variance)


def compare(name: str, expected: np.ndarray, actual: np.ndarray, recipe: dict, where: str,
            rounded: np.ndarray | None = None, squares=None) -> None:
    """Same shape, dtype, NaN and ±inf positions (but at ``rounded`` positions, see
    _signs_rounding_decides; and ±inf at positions made of huge values,
    ``_made_of_huge_values``), and every finite value within its ``bound``. ``squares()``
    gives the square model's output; it is only asked for when ±inf positions differ or
    some error exceeds the bound with S = 0 (the bound only grows with S)."""
    if expected.shape != actual.shape or expected.dtype != actual.dtype:
        raise ShapeMismatch(f"output {name!r}: expected {expected.dtype}{list(expected.shape)}, "
                            f"got {actual.dtype}{list(actual.shape)}{where}")
    excused = (np.zeros(expected.shape, bool) if rounded is None else rounded) | _end_of_range(expected, actual)
    infinite = ((np.isposinf(expected) != np.isposinf(actual)) | (np.isneginf(expected) != np.isneginf(actual))) \
        & ~excused
    if infinite.any() and squares is not None:
        excused = excused | (infinite & _made_of_huge_values(_square(squares, expected, name, where)))
    for test in (np.isnan, np.isposinf, np.isneginf):
        differs = (test(expected) != test(actual)) & ~excused
        if differs.any():
            differ = int(differs.sum())
            raise NonFiniteMismatch(f"output {name!r}: {test.__name__} differs at {differ} of {expected.size} "
                                    f"positions{where}")
    finite = np.isfinite(expected) & ~excused
    if not finite.any():
        return
    reference = expected[finite].astype(np.float64)
    error = np.abs(reference - actual[finite].astype(np.float64))
    if not error.any() or np.all(error <= bound(expected.dtype, 0.0, reference, recipe)):
        return
    square = _square(squares, expected, name, where)
    limit = bound(expected.dtype, square[finite], reference, recipe)
    over = error > limit
    if over.any():
        worst = int(np.argmax(np.where(over, error / np.where(limit > 0, limit, 1e-300), 0)))
        index = tuple(int(i) for i in np.argwhere(finite)[worst])
        raise ValueMismatch(f"output {name!r}: |error| {error[worst]:.3g} > bound {limit[worst]:.3g} at {list(index)} "
                            f"(expected {reference[worst]:.6g}, got {actual[index]:.6g}, rms magnitude "
                            f"{np.sqrt(square[index]):.3g}{_channel_note(recipe, name, index)}); {int(over.sum())} of "
                            f"{error.size} elements over their bound{where}")


def _end_of_range(expected: np.ndarray, actual: np.ndarray) -> np.ndarray:
    """Positions at the end of the dtype's range (within 16x of its largest value, or
    beyond it) in both models: there a fold that scales a weight instead of a product may
    overflow where the original did not, or the other way round (and onnxruntime's MaxPool
    turns -inf into the lowest finite value), so inf positions and values are not compared
    (the square model, in the same dtype, overflows there too). A value that is moderate in
    either model is compared as ever."""
    edge = float(np.finfo(expected.dtype).max) / 16
    with np.errstate(invalid="ignore"):
        return (np.abs(expected.astype(np.float64)) >= edge) & (np.abs(actual.astype(np.float64)) >= edge)


def _made_of_huge_values(square: np.ndarray) -> np.ndarray:
    """Positions made of values so large that the square model (their mean square, in the
    model's dtype) overflows: beyond the square root of the largest value (~1.8e19 in
    float32). There a fold that scales a weight instead of a product may overflow where the
    original did not, or the other way round, and two terms near the largest value cancel
    into a finite value in one model where the other overflowed (onnxruntime's MaxPool turns
    NaN into the lowest finite value, -3.4e38 in float32). Only ±inf is excused there, never
    a NaN."""
    return np.isinf(square)


def _square(squares, expected: np.ndarray, name: str, where: str) -> np.ndarray:
    """The square model's output (``squares()``), as magnitudes."""
    square = np.abs(np.asarray(squares(), dtype=np.float64))  # a Neg tap negates it
    if square.shape != expected.shape:
        raise GeneratorBug(f"output {name!r}: the square model gives {list(square.shape)}, the model "
                           f"{list(expected.shape)}{where}")
    return square


def _channel_note(recipe: dict, name: str, index: tuple) -> str:
    """Which channel the element is in, along the axis where the generator put the last linear op's channels."""
    builder = Builder(recipe)
    builder.build()
    axis = builder.chans.get(name)
    if axis is None or axis >= len(index):
        return ""
    return f"; channel {index[axis]} along axis {axis}"


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
    squares = []

    def square(i: int):
        if not squares:
            try:
                square_model, square_feeds = build(recipe, squares=True)
                squares.extend(session(square_model.SerializeToString()).run(None, square_feeds))
            except Exception as exc:  # noqa: BLE001 - the square model is the generator's
                raise GeneratorBug(f"square model: {type(exc).__name__}: {exc}{where}") from exc
        return squares[i]

    merged = any(entry.status == "merged" for entry in result.ledger) and may_overflow(recipe)
    for i, (name, e, a) in enumerate(zip(names, expected, actual)):
        rounded = _signs_rounding_decides(name, e, a, model, folded, feeds, recipe)
        if merged:  # where ORIGINAL is NaN or ±inf, a merge may differ: see the module docstring, 4.
            nonfinite = ~np.isfinite(e)
            rounded = nonfinite if rounded is None else rounded | nonfinite
        compare(name, e, a, recipe, where, rounded, lambda i=i: square(i))

    entries = list(result.ledger)
    for entry in entries:
        if entry.reason is not None and entry.reason not in REASONS:
            raise UnknownReason(f"{entry}{where}")
    unique = recipe.get("names") != "empty"
    check_ledger(entries, model, folded, where, unique)
    # inspect takes no flags: compare it with what a flagless fold does.
    plain = entries if not flags else list(bnfold.fold(src).ledger)
    check_inspect(plain, findings, where, unique)
    if flags == {"decompose_standalone": True}:
        check_decompose(entries, plain, where, unique)
    record(features(recipe))
    record([f"ledger: {sorted({e.status for e in entries}) or 'empty'}"])
    for entry in entries:
        scope = "function" if entry.graph.startswith("function") else "subgraph" if "/" in entry.graph else "main"
        record([f"{entry.status}: {entry.pattern or entry.reason}", f"{entry.status} in {scope}"])


def may_overflow(recipe: dict) -> bool:
    """Whether the recipe's model may compute ±inf or NaN inside: a non-finite constant or
    weight, statistics that make one, a division by zero, or float16's small range."""
    bad = any(step.get("w_bad") or step.get("c_bad") or step.get("bad")
              or step.get("stats") in ("nan", "inf", "neg_var") for step in walk(recipe["steps"]))
    return bad or recipe["dtype"] == "float16"


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
        finite = x_before[np.isfinite(x_before)].astype(np.float64)
        peak = max(1.0, float(np.abs(finite).max(initial=0.0)))  # x's largest magnitude, for its S
        tol = bound(expected.dtype, peak**2, 0.0, recipe)
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


def check_decompose(entries, plain, where, unique: bool) -> None:
    """With decompose_standalone, a BN is decomposed exactly where the flagless fold keeps
    it as ``no-linear-producer`` (decomposing is the last resort, after every fold), and
    every other BN ends as it does without the flag. Each BN is paired with its entry in
    the flagless ledger: ledgers that cannot be paired are a failure, not a skipped check."""
    decomposed, flagless = bn_entries(entries, where, unique), bn_entries(plain, where, unique)
    if set(decomposed) != set(flagless):
        raise InspectDisagrees(f"the ledgers with and without decompose_standalone cannot be paired: BNs "
                               f"{sorted(set(decomposed) ^ set(flagless))} are in only one of them{where}")
    for key, entry in decomposed.items():
        other = flagless[key]
        if entry.status == "decomposed":
            if other.status != "kept" or other.reason != "no-linear-producer":
                raise InspectDisagrees(f"BN {key}: decomposed, but without the flag: {other}{where}")
        elif (entry.status, entry.reason, entry.pattern) != (other.status, other.reason, other.pattern):
            raise InspectDisagrees(f"BN {key}: {entry.status} ({entry.pattern or entry.reason}) with "
                                   f"decompose_standalone, {other.status} ({other.pattern or other.reason}) "
                                   f"without the flag{where}")


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
