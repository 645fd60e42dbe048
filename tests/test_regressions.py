"""Regression tests for issue 12: minimal models on which ``fold`` went wrong.

Every case is a small hand-built model that is valid on its own (the ONNX checker with
``full_check`` and onnxruntime accept it, which each test checks first). The contract
asserted for each one:

- ``bnfold fold IN -o OUT`` exits 0 (never 2 or 3 on a valid model);
- OUT passes the full checker, loads in onnxruntime, keeps the output names and the
  inputs a caller feeds;
- IN and OUT compute the same outputs in onnxruntime (CPU, optimisations off) on the same
  inputs, with NaN and +-inf in exactly the same places;
- every site is folded, or kept with a reason from ``bnfold.ledger.REASONS``; where the
  fold is exact and expected the test says it must be folded;
- ``inspect`` plans what ``fold`` does, for every BN of every model built here
  (``test_issue12_inspect_agrees_with_fold``).

Cases are registered in ``CASES`` (name -> builder) so the property test sees them all.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as onh
import onnxruntime as ort
import pytest
from cli_runner import invoke

import bnfold
from bnfold.ledger import REASONS

F32 = onnx.TensorProto.FLOAT
F16 = onnx.TensorProto.FLOAT16
F64 = onnx.TensorProto.DOUBLE
BOOL = onnx.TensorProto.BOOL
INT = onnx.AttributeProto.INT
INTS = onnx.AttributeProto.INTS
FLOAT = onnx.AttributeProto.FLOAT
STRING = onnx.AttributeProto.STRING

BN = "BatchNormalization"
LOCAL = "local"  # domain of the model-local functions built here


# ---------------------------------------------------------------------------------------
# building blocks


@dataclass
class Case:
    """A model, the input sets to run it on (None: random, from the declared inputs; a
    bool input is run both True and False) and the CLI flags its fold needs."""

    model: onnx.ModelProto
    feeds: list[dict[str, np.ndarray]] | None = None
    flags: tuple[str, ...] = ()
    seed: int = 0


#: name -> builder of every model this file folds (the property test runs them all).
CASES: dict[str, Callable[[], Case]] = {}


def case(name: str):
    def register(builder):
        assert name not in CASES, name
        CASES[name] = builder
        return builder

    return register


def tensor(array, name: str) -> onnx.TensorProto:
    return onh.from_array(np.asarray(array), name)


def vi(name: str, elem: int = F32, shape=None) -> onnx.ValueInfoProto:
    return oh.make_tensor_value_info(name, elem, shape)


def node(op: str, inputs, outputs, name: str, domain: str = "", refs: dict | None = None, **attrs):
    """A node; ``refs`` maps attribute name -> (type, function attribute it refers to)."""
    n = oh.make_node(op, list(inputs), list(outputs), name=name, domain=domain or None, **attrs)
    for attr, (kind, ref) in (refs or {}).items():
        n.attribute.append(oh.make_attribute_ref(attr, kind, ref_attr_name=ref))
    return n


def const_node(array, output: str, name: str | None = None) -> onnx.NodeProto:
    return oh.make_node("Constant", [], [output], name=name or f"const_{output}", value=tensor(array, output))


def bn_stats(rng: np.random.Generator, channels: int, dtype=np.float32) -> list[np.ndarray]:
    """Realistic inference statistics: gamma around 1, var in [0.5, 2]."""
    return [
        rng.uniform(0.5, 1.5, channels).astype(dtype),  # scale
        (rng.standard_normal(channels) * 0.3).astype(dtype),  # B
        (rng.standard_normal(channels) * 0.5).astype(dtype),  # mean
        rng.uniform(0.5, 2.0, channels).astype(dtype),  # var
    ]


def bn_inits(rng, prefix: str, channels: int, dtype=np.float32) -> tuple[list[str], list[onnx.TensorProto]]:
    names = [f"{prefix}.{role}" for role in ("scale", "B", "mean", "var")]
    return names, [tensor(a, n) for a, n in zip(bn_stats(rng, channels, dtype), names)]


def bn_consts(rng, prefix: str, channels: int, dtype=np.float32) -> tuple[list[str], list[onnx.NodeProto]]:
    """BN parameters as Constant nodes (for function bodies, which have no initializers)."""
    names = [f"{prefix}.{role}" for role in ("scale", "B", "mean", "var")]
    return names, [const_node(a, n) for a, n in zip(bn_stats(rng, channels, dtype), names)]


def rnd(rng, shape, scale: float = 0.5, dtype=np.float32) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(dtype)


def make(nodes, inputs, outputs, inits=(), opset: int = 17, ir_version: int = 9, functions=(),
         training_info=()) -> onnx.ModelProto:
    graph = oh.make_graph(list(nodes), "main", list(inputs), list(outputs), list(inits))
    opsets = [oh.make_opsetid("", opset)] + ([oh.make_opsetid(LOCAL, 1)] if functions else [])
    model = oh.make_model(graph, opset_imports=opsets, functions=list(functions))
    model.ir_version = ir_version
    for info in training_info:
        model.training_info.append(info)
    return model


def function(name: str, inputs, outputs, nodes, attributes=(), opset: int = 17) -> onnx.FunctionProto:
    return oh.make_function(LOCAL, name, list(inputs), list(outputs), list(nodes),
                            [oh.make_opsetid("", opset)], attributes=list(attributes))


# ---------------------------------------------------------------------------------------
# running and checking


NP_OF = {F32: np.float32, F16: np.float16, F64: np.float64, BOOL: np.bool_}


def session(model: onnx.ModelProto | Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def real_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Graph inputs a caller feeds (IR < 4 also lists every initializer as an input)."""
    initializers = {init.name for init in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in initializers]


def random_feeds(model: onnx.ModelProto, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1000 + seed)
    base: dict[str, np.ndarray] = {}
    flags: list[str] = []
    for inp in real_inputs(model):
        elem = inp.type.tensor_type.elem_type
        if elem == BOOL:
            flags.append(inp.name)
            continue
        dims = [d.dim_value if d.HasField("dim_value") else 2 for d in inp.type.tensor_type.shape.dim]
        base[inp.name] = rng.standard_normal(dims).astype(NP_OF[elem])
    sets = [base]
    for name in flags:
        sets = [{**s, name: np.array(value)} for s in sets for value in (True, False)]
    return sets


def tolerance(dtype) -> tuple[float, float]:
    """(rtol, atol per unit of output scale)."""
    dtype = np.dtype(dtype)
    if dtype == np.float16:
        return 1e-2, 1e-2
    if dtype == np.float64:
        return 1e-9, 1e-10
    return 1e-4, 1e-5


def assert_same_outputs(expected: list[np.ndarray], actual: list[np.ndarray], names: list[str], what: str = ""):
    assert len(expected) == len(actual)
    for name, e, a in zip(names, expected, actual):
        e, a = np.asarray(e), np.asarray(a)
        assert a.shape == e.shape, f"{what}output {name!r}: shape {a.shape}, expected {e.shape}"
        assert a.dtype == e.dtype, f"{what}output {name!r}: dtype {a.dtype}, expected {e.dtype}"
        if e.dtype.kind != "f":
            np.testing.assert_array_equal(a, e, err_msg=f"{what}output {name!r}")
            continue
        finite = e[np.isfinite(e)]
        scale = max(1.0, float(np.abs(finite.astype(np.float64)).max())) if finite.size else 1.0
        rtol, atol = tolerance(e.dtype)
        np.testing.assert_allclose(a, e, rtol=rtol, atol=atol * scale, equal_nan=True,
                                   err_msg=f"{what}output {name!r} (NaN/inf must sit where the original's do)")


def assert_valid(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]) -> list[list[np.ndarray]]:
    """The hand-built model is valid (checker, onnxruntime) and runs on every input set."""
    onnx.checker.check_model(model, full_check=True)
    sess = session(model)
    return [sess.run(None, f) for f in feeds]


def entries_of(ledger) -> list[SimpleNamespace]:
    return [SimpleNamespace(**(e if isinstance(e, dict) else e.to_dict())) for e in ledger]


@dataclass
class Folded:
    src: Path
    out: Path
    model: onnx.ModelProto
    entries: list[SimpleNamespace]
    cli: object

    def entry(self, node: str, op: str | None = None) -> SimpleNamespace:
        found = [e for e in self.entries if e.node == node and (op is None or e.op == op)]
        assert len(found) == 1, f"ledger entries for {node!r}: {found} (all: {[(e.op, e.node) for e in self.entries]})"
        return found[0]

    def bns(self) -> list[SimpleNamespace]:
        return [e for e in self.entries if e.op == BN]


def cli_message(result) -> str:
    return result.output[-3000:]


def fold_and_check(c: Case, tmp_path: Path, *flags: str) -> Folded:
    """The whole contract: valid IN, exit 0, valid OUT, same outputs, reasons from REASONS."""
    model = c.model
    feeds = c.feeds if c.feeds is not None else random_feeds(model, c.seed)
    expected = assert_valid(model, feeds)
    src, out, report = tmp_path / "in.onnx", tmp_path / "out.onnx", tmp_path / "ledger.json"
    onnx.save(model, src)
    result = invoke("fold", src, "-o", out, "--json", report, "-q", *c.flags, *flags)
    assert result.exit_code == 0, f"fold exited {result.exit_code} on a valid model:\n{cli_message(result)}"
    folded = onnx.load(out)
    onnx.checker.check_model(folded, full_check=True)
    assert [o.name for o in folded.graph.output] == [o.name for o in model.graph.output]
    assert [i.name for i in real_inputs(folded)] == [i.name for i in real_inputs(model)]
    sess = session(out)
    names = [o.name for o in model.graph.output]
    for i, (f, e) in enumerate(zip(feeds, expected)):
        assert_same_outputs(e, sess.run(None, f), names, what=f"input set {i}: ")
    entries = entries_of(json.loads(report.read_text())["entries"])
    for e in entries:
        assert e.status in ("folded", "kept", "decomposed"), e
        if e.status == "kept":
            assert e.reason in REASONS, e
    return Folded(src, out, folded, entries, result)


def assert_folded(folded: Folded, node: str, op: str | None = None) -> None:
    entry = folded.entry(node, op)
    assert entry.status == "folded", f"{node}: expected folded, got {entry.status} ({entry.reason}: {entry.detail})"


def assert_inspect_agrees(path: Path, entries: list[SimpleNamespace]) -> None:
    """For every BN: inspect plans a fold iff fold folded it, and names the same reason."""
    findings = bnfold.inspect(path)
    by_key = {}
    for e in entries:
        if e.op == BN:
            assert (e.graph, e.node) not in by_key, f"two ledger entries for {e.graph}/{e.node}"
            by_key[(e.graph, e.node)] = e
    seen = {}
    for f in findings:
        assert (f.graph, f.bn) not in seen, f"two findings for {f.graph}/{f.bn}"
        seen[(f.graph, f.bn)] = f
    assert set(seen) == set(by_key), f"inspect saw {sorted(seen)}, fold {sorted(by_key)}"
    for key, f in seen.items():
        e = by_key[key]
        if e.status == "decomposed":
            continue
        assert (f.fold_reason is None) == (e.status == "folded"), (key, f.plan, f.fold_reason, e.status, e.reason)
        assert f.plan.startswith("fold" if e.status == "folded" else "keep"), (key, f.plan, e.status)
        if e.status == "kept":
            assert f.fold_reason == e.reason, (key, f.fold_reason, e.reason)


# ---------------------------------------------------------------------------------------
# 1. BN -> MatMul (bias-less) whose output is a graph output


@case("bn_matmul_graph_output")
def _bn_matmul_graph_output() -> Case:
    rng = np.random.default_rng(1)
    p, inits = bn_inits(rng, "bn", 4)
    nodes = [node(BN, ["x", *p], ["h"], "bn"), node("MatMul", ["h", "W"], ["y"], "matmul")]
    return Case(make(nodes, [vi("x", F32, [3, 4])], [vi("y", F32, [3, 5])], [*inits, tensor(rnd(rng, (4, 5)), "W")]))


@case("bn_flatten_matmul_graph_output")
def _bn_flatten_matmul_graph_output() -> Case:
    rng = np.random.default_rng(2)
    p, inits = bn_inits(rng, "bn", 4)
    nodes = [node(BN, ["x", *p], ["h"], "bn"), node("Flatten", ["h"], ["f"], "flatten"),
             node("MatMul", ["f", "W"], ["y"], "matmul")]
    return Case(make(nodes, [vi("x", F32, [3, 4, 1, 1])], [vi("y", F32, [3, 5])],
                     [*inits, tensor(rnd(rng, (4, 5)), "W")]))


def test_issue12_1_bn_matmul_graph_output(tmp_path):
    folded = fold_and_check(CASES["bn_matmul_graph_output"](), tmp_path)
    assert_folded(folded, "bn")


def test_issue12_1_bn_flatten_matmul_graph_output(tmp_path):
    folded = fold_and_check(CASES["bn_flatten_matmul_graph_output"](), tmp_path)
    assert_folded(folded, "bn")


# ---------------------------------------------------------------------------------------
# 2. Gemm transB by attribute reference inside a model-local function


def gemm_transb_ref_case(site: str, n: int) -> Case:
    rng = np.random.default_rng(3 + n)
    k = 4
    body = [const_node(rnd(rng, (n, k)), "W"),  # transB=1: B is [N, K]
            const_node(rnd(rng, (n,)), "b"),
            node("Gemm", ["x", "W", "b"], ["g"], "gemm", refs={"transB": (INT, "transB")})]
    if site == "bn":
        p, consts = bn_consts(rng, "bn", n)
        body += [*consts, node(BN, ["g", *p], ["y"], "bn")]
    else:
        body += [const_node(rng.uniform(0.5, 1.5, n).astype(np.float32), "c"), node("Mul", ["g", "c"], ["y"], "mul")]
    fn = function("GemmSite", ["x"], ["y"], body, attributes=["transB"])
    call = node("GemmSite", ["x"], ["y"], "call", domain=LOCAL, transB=1)
    return Case(make([call], [vi("x", F32, [3, k])], [vi("y", F32, [3, n])], functions=[fn]))


for _site in ("bn", "mul"):
    for _n in (4, 5):
        case(f"gemm_transb_ref_{_site}_n{_n}")(lambda s=_site, n=_n: gemm_transb_ref_case(s, n))


@pytest.mark.parametrize("n", [4, 5], ids=["square", "nonsquare"])
@pytest.mark.parametrize("site", ["bn", "mul"])
def test_issue12_2_gemm_transb_attribute_reference(tmp_path, site, n):
    folded = fold_and_check(CASES[f"gemm_transb_ref_{site}_n{n}"](), tmp_path)
    assert_folded(folded, site)


# ---------------------------------------------------------------------------------------
# 3. Flatten with axis == rank


def with_value_info(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with onnx's inferred shapes as value_info (exporters write them)."""
    return onnx.shape_inference.infer_shapes(model, strict_mode=True)


def gemm_flatten_axis_rank_case(site: str, shapes: bool) -> Case:
    """Gemm [1,4] -> Flatten(axis=2) [4,1] -> site. ``mul``: Mul(c[4]) broadcasts to
    [4,4] (an outer product, not a per-channel map); ``mul41``: Mul(c[4,1]) scales each
    Gemm channel (exact fold); ``bn``: BN over the single channel of dim 1 (a scalar map)."""
    rng = np.random.default_rng(5)
    nodes = [node("Gemm", ["x", "W", "C"], ["g"], "gemm"), node("Flatten", ["g"], ["f"], "flatten", axis=2)]
    inits = [tensor(rnd(rng, (3, 4)), "W"), tensor(rnd(rng, (4,)), "C")]
    if site == "bn":
        p, bn_tensors = bn_inits(rng, "bn", 1)
        nodes.append(node(BN, ["f", *p], ["y"], "bn"))
        inits += bn_tensors
        y_shape = [4, 1]
    else:
        shape, y_shape = ((4,), [4, 4]) if site == "mul" else ((4, 1), [4, 1])
        inits.append(tensor(rng.uniform(0.5, 1.5, shape).astype(np.float32), "c"))
        nodes.append(node("Mul", ["f", "c"], ["y"], "mul"))
    model = make(nodes, [vi("x", F32, [1, 3])], [vi("y", F32, y_shape)], inits)
    return Case(with_value_info(model) if shapes else model)


def conv_flatten_axis_rank_bn(shapes: bool) -> Case:
    """Conv [1,2,4,4] -> Flatten(axis=4) [32,1] -> BN over 1 channel (dim 1 of [32,1])."""
    rng = np.random.default_rng(6)
    p, inits = bn_inits(rng, "bn", 1)
    nodes = [node("Conv", ["x", "W"], ["c"], "conv"), node("Flatten", ["c"], ["f"], "flatten", axis=4),
             node(BN, ["f", *p], ["y"], "bn")]
    model = make(nodes, [vi("x", F32, [1, 3, 4, 4])], [vi("y", F32, [32, 1])],
                 [tensor(rnd(rng, (2, 3, 1, 1)), "W"), *inits])
    return Case(with_value_info(model) if shapes else model)


for _shapes in (False, True):
    _suffix = "_value_info" if _shapes else ""
    for _site in ("mul", "mul41", "bn"):
        case(f"gemm_flatten_axis_rank_{_site}{_suffix}")(lambda s=_site, v=_shapes: gemm_flatten_axis_rank_case(s, v))
    case(f"conv_flatten_axis_rank_bn{_suffix}")(lambda s=_shapes: conv_flatten_axis_rank_bn(s))


@pytest.mark.parametrize("suffix", ["", "_value_info"], ids=["no-value-info", "value-info"])
@pytest.mark.parametrize("site", ["mul", "mul41", "bn"])
def test_issue12_3_gemm_flatten_axis_equals_rank(tmp_path, site, suffix):
    # Kept or folded, the output shape must survive (fold_and_check compares shapes): for
    # ``mul`` it is [4,4], which no fold into the Gemm alone can produce.
    folded = fold_and_check(CASES[f"gemm_flatten_axis_rank_{site}{suffix}"](), tmp_path)
    assert folded.entry("bn" if site == "bn" else "mul").status in ("folded", "kept")


@pytest.mark.parametrize("suffix", ["", "_value_info"], ids=["no-value-info", "value-info"])
def test_issue12_3_conv_flatten_axis_equals_rank_bn(tmp_path, suffix):
    folded = fold_and_check(CASES[f"conv_flatten_axis_rank_bn{suffix}"](), tmp_path)
    assert folded.entry("bn").status in ("folded", "kept")


# ---------------------------------------------------------------------------------------
# 4. Conv(1 channel) -> Reshape(runtime shape) -> Mul(ones[1,1,1]) raises the rank


def conv_reshape_mul_case(value: float) -> Case:
    rng = np.random.default_rng(7)
    nodes = [node("Conv", ["x", "W"], ["c"], "conv", pads=[1, 1, 1, 1]),
             node("Shape", ["x"], ["xs"], "shape", start=0, end=1),
             const_node(np.array([-1], np.int64), "minus1"),
             node("Concat", ["xs", "minus1"], ["shp"], "concat", axis=0),
             node("Reshape", ["c", "shp"], ["r"], "reshape"),
             node("Mul", ["r", "k"], ["y"], "mul")]
    inits = [tensor(rnd(rng, (1, 3, 3, 3)), "W"), tensor(np.full((1, 1, 1), value, np.float32), "k")]
    return Case(make(nodes, [vi("x", F32, [2, 3, 4, 4])], [vi("y", F32, [1, 2, 16])], inits))


case("conv_reshape_runtime_mul_ones")(lambda: conv_reshape_mul_case(1.0))
case("conv_reshape_runtime_mul_half")(lambda: conv_reshape_mul_case(0.5))


@pytest.mark.parametrize("name", ["conv_reshape_runtime_mul_ones", "conv_reshape_runtime_mul_half"])
def test_issue12_4_mul_broadcast_raises_rank(tmp_path, name):
    c = CASES[name]()
    (expected,) = session(c.model).run(None, random_feeds(c.model, c.seed)[0])
    assert expected.shape == (1, 2, 16)
    fold_and_check(c, tmp_path)  # compares shapes: (1, 2, 16), not (2, 16)


# ---------------------------------------------------------------------------------------
# 5. Gemm with beta=0 and a non-finite C


NON_FINITE_C = np.array([np.nan, np.inf, -np.inf, 1.0], np.float32)


@case("gemm_beta0_nonfinite_c_bn")
def _gemm_beta0_bn() -> Case:
    rng = np.random.default_rng(8)
    p, inits = bn_inits(rng, "bn", 4)
    nodes = [node("Gemm", ["x", "W", "C"], ["g"], "gemm", beta=0.0), node(BN, ["g", *p], ["y"], "bn")]
    return Case(make(nodes, [vi("x", F32, [2, 3])], [vi("y", F32, [2, 4])],
                     [tensor(rnd(rng, (3, 4)), "W"), tensor(NON_FINITE_C, "C"), *inits]))


@case("bn_gemm_beta0_nonfinite_c")
def _bn_gemm_beta0() -> Case:
    rng = np.random.default_rng(9)
    p, inits = bn_inits(rng, "bn", 3)
    nodes = [node(BN, ["x", *p], ["h"], "bn"), node("Gemm", ["h", "W", "C"], ["y"], "gemm", beta=0.0)]
    return Case(make(nodes, [vi("x", F32, [2, 3])], [vi("y", F32, [2, 4])],
                     [*inits, tensor(rnd(rng, (3, 4)), "W"), tensor(NON_FINITE_C, "C")]))


@pytest.mark.parametrize("name", ["gemm_beta0_nonfinite_c_bn", "bn_gemm_beta0_nonfinite_c"])
def test_issue12_5_gemm_beta0_nonfinite_c(tmp_path, name):
    c = CASES[name]()
    (expected,) = session(c.model).run(None, random_feeds(c.model, c.seed)[0])
    assert np.isfinite(expected).all(), "onnxruntime ignores C when beta is 0"
    folded = fold_and_check(c, tmp_path)
    (actual,) = session(folded.out).run(None, random_feeds(c.model, c.seed)[0])
    assert not np.isnan(actual).any()


# ---------------------------------------------------------------------------------------
# 6. Conv -> Mul by a constant with +inf on one channel


@case("conv_mul_inf_channel")
def _conv_mul_inf() -> Case:
    rng = np.random.default_rng(10)
    k = np.array([1.5, np.inf, 0.5], np.float32).reshape(1, 3, 1, 1)
    nodes = [node("Conv", ["x", "W"], ["c"], "conv"), node("Mul", ["c", "k"], ["y"], "mul")]
    return Case(make(nodes, [vi("x", F32, [1, 3, 4, 4])], [vi("y", F32, [1, 3, 4, 4])],
                     [tensor(rnd(rng, (3, 3, 1, 1)), "W"), tensor(k, "k")]))


def test_issue12_6_conv_mul_inf_channel(tmp_path):
    c = CASES["conv_mul_inf_channel"]()
    (expected,) = session(c.model).run(None, random_feeds(c.model, c.seed)[0])
    assert np.isinf(expected[:, 1]).all() and not np.isnan(expected).any()
    folded = fold_and_check(c, tmp_path)
    assert folded.entry("mul").status in ("folded", "kept")


# ---------------------------------------------------------------------------------------
# 7. A site inside an If branch / Loop body whose producer is in the enclosing graph


def if_branch_site_case(site: str, else_reads_producer: bool) -> Case:
    rng = np.random.default_rng(11)
    if site == "bn":
        producer = node("Conv", ["x", "W"], ["p"], "conv")
        p, inits = bn_inits(rng, "bn", 4)
        then_nodes = [node(BN, ["p", *p], ["t"], "bn")]
        x_shape, y_shape = [1, 3, 4, 4], [1, 4, 4, 4]
        inits += [tensor(rnd(rng, (4, 3, 1, 1)), "W"), tensor(rnd(rng, (4, 3, 1, 1)), "W2")]
        other = "Conv"
    else:
        producer = node("Gemm", ["x", "W", "C"], ["p"], "gemm")
        then_nodes = [const_node(rng.uniform(0.5, 1.5, 4).astype(np.float32), "k"), node("Mul", ["p", "k"], ["t"], "mul")]
        x_shape, y_shape = [2, 3], [2, 4]
        inits = [tensor(rnd(rng, (3, 4)), "W"), tensor(rnd(rng, (4,)), "C"), tensor(rnd(rng, (3, 4)), "W2")]
        other = "MatMul"
    if else_reads_producer:
        inits = [t for t in inits if t.name != "W2"]
    then = oh.make_graph(then_nodes, "then", [], [vi("t", F32, y_shape)])
    if else_reads_producer:
        else_nodes = [node("Neg", ["p"], ["e"], "neg")]
    else:
        else_nodes = [node(other, ["x", "W2"], ["e"], "other")]
    orelse = oh.make_graph(else_nodes, "else", [], [vi("e", F32, y_shape)])
    nodes = [producer, node("If", ["cond"], ["y"], "if", then_branch=then, else_branch=orelse)]
    return Case(make(nodes, [vi("x", F32, x_shape), vi("cond", BOOL, [])], [vi("y", F32, y_shape)], inits))


@case("loop_body_bn_outer_conv")
def _loop_body_bn() -> Case:
    rng = np.random.default_rng(12)
    p, inits = bn_inits(rng, "bn", 4)
    body = oh.make_graph([node("Identity", ["cond_in"], ["cond_out"], "cond_id"), node(BN, ["p", *p], ["s"], "bn")],
                         "body", [vi("iter", onnx.TensorProto.INT64, []), vi("cond_in", BOOL, [])],
                         [vi("cond_out", BOOL, []), vi("s", F32, [1, 4, 4, 4])])
    nodes = [node("Conv", ["x", "W"], ["p"], "conv"),
             node("Loop", ["trips", "go"], ["y"], "loop", body=body)]
    inits += [tensor(rnd(rng, (4, 3, 1, 1)), "W"), tensor(np.array(2, np.int64), "trips"), tensor(np.array(True), "go")]
    return Case(make(nodes, [vi("x", F32, [1, 3, 4, 4])], [vi("y", F32, [2, 1, 4, 4, 4])], inits))


for _site in ("bn", "mul"):
    for _reads in (False, True):
        case(f"if_branch_{_site}_outer_producer{'_else_reads' if _reads else ''}")(
            lambda s=_site, r=_reads: if_branch_site_case(s, r))


@pytest.mark.parametrize("else_reads", [False, True], ids=["else-independent", "else-reads-producer"])
@pytest.mark.parametrize("site", ["bn", "mul"])
def test_issue12_7_if_branch_site_outer_producer(tmp_path, site, else_reads):
    name = f"if_branch_{site}_outer_producer{'_else_reads' if else_reads else ''}"
    folded = fold_and_check(CASES[name](), tmp_path)  # runs cond=True and cond=False
    assert folded.entry(site).status in ("folded", "kept")


def test_issue12_7_loop_body_bn_outer_conv(tmp_path):
    folded = fold_and_check(CASES["loop_body_bn_outer_conv"](), tmp_path)
    assert folded.entry("bn").status in ("folded", "kept")


# ---------------------------------------------------------------------------------------
# 8. IR 3: Conv -> BN inside an If branch


def ir3_if_case(params_in_branch: bool) -> Case:
    rng = np.random.default_rng(13)
    p, bn_tensors = bn_inits(rng, "bn", 2)
    params = [tensor(rnd(rng, (2, 3, 1, 1)), "W"), *bn_tensors]
    then_nodes = [node("Conv", ["x", "W"], ["c"], "conv"), node(BN, ["c", *p], ["t"], "bn")]
    if params_in_branch:
        # IR 3: every initializer is also an input of its graph (the checker demands it).
        then = oh.make_graph(then_nodes, "then", [vi(t.name, F32, list(t.dims)) for t in params],
                             [vi("t", F32, [1, 2, 4, 4])], params)
    else:
        then = oh.make_graph(then_nodes, "then", [], [vi("t", F32, [1, 2, 4, 4])])
    orelse = oh.make_graph([node("Conv", ["x", "W2"], ["e"], "conv_else")], "else", [], [vi("e", F32, [1, 2, 4, 4])])
    main_inits = [tensor(rnd(rng, (2, 3, 1, 1)), "W2")] + ([] if params_in_branch else params)
    inputs = [vi("x", F32, [1, 3, 4, 4]), vi("cond", BOOL, [])] + [vi(t.name, F32, list(t.dims)) for t in main_inits]
    nodes = [node("If", ["cond"], ["y"], "if", then_branch=then, else_branch=orelse)]
    return Case(make(nodes, inputs, [vi("y", F32, [1, 2, 4, 4])], main_inits, opset=9, ir_version=3))


case("ir3_if_conv_bn_branch_params")(lambda: ir3_if_case(True))
case("ir3_if_conv_bn_outer_params")(lambda: ir3_if_case(False))


@pytest.mark.parametrize("name", ["ir3_if_conv_bn_branch_params", "ir3_if_conv_bn_outer_params"])
def test_issue12_8_ir3_if_subgraph(tmp_path, name):
    folded = fold_and_check(CASES[name](), tmp_path)
    assert folded.entry("bn").status in ("folded", "kept")


# ---------------------------------------------------------------------------------------
# 9. --decompose-standalone on float16 / float64 without type information


DECOMPOSE_DTYPES = {"float16": (np.float16, np.float16), "float64": (np.float64, np.float64),
                    "float16-x-float32-params": (np.float16, np.float32)}


def decompose_case(dtype_name: str, after_relu: bool) -> Case:
    x_dtype, p_dtype = DECOMPOSE_DTYPES[dtype_name]
    rng = np.random.default_rng(14)
    elem = oh.np_dtype_to_tensor_dtype(np.dtype(x_dtype))
    p, inits = bn_inits(rng, "bn", 3, p_dtype)
    nodes = [node("Relu", ["x"], ["r"], "relu")] if after_relu else []  # "r" has no value_info
    nodes.append(node(BN, ["r" if after_relu else "x", *p], ["y"], "bn"))
    return Case(make(nodes, [vi("x", elem, [2, 3, 4])], [vi("y", elem, [2, 3, 4])], inits),
                flags=("--decompose-standalone",))


for _dt in DECOMPOSE_DTYPES:
    for _relu in (False, True):
        case(f"decompose_{_dt}{'_after_relu' if _relu else ''}")(lambda d=_dt, r=_relu: decompose_case(d, r))


@pytest.mark.parametrize("after_relu", [False, True], ids=["on-input", "after-untyped-relu"])
@pytest.mark.parametrize("dtype_name", list(DECOMPOSE_DTYPES))
def test_issue12_9_decompose_standalone_dtype(tmp_path, dtype_name, after_relu):
    c = CASES[f"decompose_{dtype_name}{'_after_relu' if after_relu else ''}"]()
    folded = fold_and_check(c, tmp_path)  # the flag is in c.flags
    entry = folded.entry("bn")
    assert entry.status == "decomposed", entry
    x_elem = c.model.graph.input[0].type.tensor_type.elem_type
    consts = {t.name: t.data_type for t in folded.model.graph.initializer}
    consts.update({n.output[0]: n.attribute[0].t.data_type for n in folded.model.graph.node
                   if n.op_type == "Constant" and n.attribute[0].name == "value"})
    for n in folded.model.graph.node:
        if n.op_type in ("Mul", "Add"):
            for name in n.input:
                if name in consts:
                    assert consts[name] == x_elem, f"{n.op_type} constant {name!r} has dtype {consts[name]}, not {x_elem}"


# ---------------------------------------------------------------------------------------
# 10. BN folded into a consumer inside a nested graph (a node must be inserted there)


@case("bn_main_matmul_in_if_branch")
def _bn_main_matmul_in_if() -> Case:
    rng = np.random.default_rng(15)
    p, inits = bn_inits(rng, "bn", 4)
    then = oh.make_graph([node("MatMul", ["h", "W"], ["t"], "matmul")], "then", [], [vi("t", F32, [3, 5])])
    orelse = oh.make_graph([node("MatMul", ["x", "W2"], ["e"], "matmul_else")], "else", [], [vi("e", F32, [3, 5])])
    nodes = [node(BN, ["x", *p], ["h"], "bn"), node("If", ["cond"], ["y"], "if", then_branch=then, else_branch=orelse)]
    inits += [tensor(rnd(rng, (4, 5)), "W"), tensor(rnd(rng, (4, 5)), "W2")]
    return Case(make(nodes, [vi("x", F32, [3, 4]), vi("cond", BOOL, [])], [vi("y", F32, [3, 5])], inits))


@case("function_bn_conv_in_if")
def _function_bn_conv_in_if() -> Case:
    rng = np.random.default_rng(16)
    p, consts = bn_consts(rng, "bn", 3)
    then = oh.make_graph([const_node(rnd(rng, (2, 3, 1, 1)), "W"), node("Conv", ["h", "W"], ["t"], "conv")],
                         "then", [], [vi("t", F32, None)])
    orelse = oh.make_graph([const_node(rnd(rng, (2, 3, 1, 1)), "W2"), node("Conv", ["x", "W2"], ["e"], "conv_else")],
                           "else", [], [vi("e", F32, None)])
    body = [*consts, node(BN, ["x", *p], ["h"], "bn"),
            node("If", ["cond"], ["y"], "if", then_branch=then, else_branch=orelse)]
    fn = function("BnThenConv", ["x", "cond"], ["y"], body)
    call = node("BnThenConv", ["x", "cond"], ["y"], "call", domain=LOCAL)
    return Case(make([call], [vi("x", F32, [1, 3, 4, 4]), vi("cond", BOOL, [])], [vi("y", F32, [1, 2, 4, 4])],
                     functions=[fn]))


@pytest.mark.parametrize("name", ["bn_main_matmul_in_if_branch", "function_bn_conv_in_if"])
def test_issue12_10_consumer_in_nested_graph(tmp_path, name):
    folded = fold_and_check(CASES[name](), tmp_path)
    assert folded.entry("bn").status in ("folded", "kept")


# ---------------------------------------------------------------------------------------
# 11. Attribute references (ref_attr_name) that decide the fold


ATTR_REF_OUT_SHAPES = {
    "bn_epsilon": [1, 3, 5, 5], "gemm_alpha_beta": [2, 3], "bn_gemm_alpha_beta": [2, 3],
    "conv_group": [1, 6, 3, 3], "bn_conv_group": [1, 6, 3, 3], "bn_conv_pads": [1, 3, 5, 5],
    "bn_conv_auto_pad": [1, 3, 5, 5], "convtranspose_group": [1, 6, 7, 7], "conv_transpose_perm_bn": [1, 3, 3, 3],
}


def attr_ref_case(kind: str) -> Case:
    """A function whose body holds one fold site; the attribute named by ``kind`` is a
    reference to a function attribute, given once at the (single) call site."""
    rng = np.random.default_rng(17)
    x_shape = [1, 4, 5, 5]
    call_attrs: dict = {}
    y_shape = ATTR_REF_OUT_SHAPES[kind]
    if kind == "bn_epsilon":
        p, consts = bn_consts(rng, "bn", 3)
        body = [const_node(rnd(rng, (3, 4, 1, 1)), "W"), *consts, node("Conv", ["x", "W"], ["c"], "conv"),
                node(BN, ["c", *p], ["y"], "bn", refs={"epsilon": (FLOAT, "eps")})]
        call_attrs = {"eps": 0.05}
    elif kind in ("gemm_alpha_beta", "bn_gemm_alpha_beta"):
        x_shape = [2, 4]
        refs = {"alpha": (FLOAT, "alpha"), "beta": (FLOAT, "beta")}
        if kind == "gemm_alpha_beta":
            p, consts = bn_consts(rng, "bn", 3)
            body = [const_node(rnd(rng, (4, 3)), "W"), const_node(rnd(rng, (3,)), "C"), *consts,
                    node("Gemm", ["x", "W", "C"], ["g"], "gemm", refs=refs), node(BN, ["g", *p], ["y"], "bn")]
        else:
            p, consts = bn_consts(rng, "bn", 4)
            body = [const_node(rnd(rng, (4, 3)), "W"), const_node(rnd(rng, (3,)), "C"), *consts,
                    node(BN, ["x", *p], ["h"], "bn"), node("Gemm", ["h", "W", "C"], ["y"], "gemm", refs=refs)]
        call_attrs = {"alpha": 0.5, "beta": 2.0}
    elif kind == "conv_group":
        p, consts = bn_consts(rng, "bn", 6)
        body = [const_node(rnd(rng, (6, 2, 3, 3)), "W"), *consts,
                node("Conv", ["x", "W"], ["c"], "conv", refs={"group": (INT, "group")}), node(BN, ["c", *p], ["y"], "bn")]
        call_attrs = {"group": 2}
    elif kind == "bn_conv_group":
        p, consts = bn_consts(rng, "bn", 4)
        body = [const_node(rnd(rng, (6, 2, 3, 3)), "W"), *consts, node(BN, ["x", *p], ["h"], "bn"),
                node("Conv", ["h", "W"], ["y"], "conv", refs={"group": (INT, "group")})]
        call_attrs = {"group": 2}
    elif kind == "bn_conv_pads":
        p, consts = bn_consts(rng, "bn", 4)
        body = [const_node(rnd(rng, (3, 4, 3, 3)), "W"), *consts, node(BN, ["x", *p], ["h"], "bn"),
                node("Conv", ["h", "W"], ["y"], "conv", refs={"pads": (INTS, "pads")})]
        call_attrs = {"pads": [1, 1, 1, 1]}
    elif kind == "bn_conv_auto_pad":
        p, consts = bn_consts(rng, "bn", 4)
        body = [const_node(rnd(rng, (3, 4, 3, 3)), "W"), *consts, node(BN, ["x", *p], ["h"], "bn"),
                node("Conv", ["h", "W"], ["y"], "conv", refs={"auto_pad": (STRING, "auto_pad")})]
        call_attrs = {"auto_pad": "SAME_UPPER"}
    elif kind == "convtranspose_group":
        p, consts = bn_consts(rng, "bn", 6)
        body = [const_node(rnd(rng, (4, 3, 3, 3)), "W"), *consts,
                node("ConvTranspose", ["x", "W"], ["c"], "convtranspose", refs={"group": (INT, "group")}),
                node(BN, ["c", *p], ["y"], "bn")]
        call_attrs = {"group": 2}
    elif kind == "conv_transpose_perm_bn":
        p, consts = bn_consts(rng, "bn", 3)
        body = [const_node(rnd(rng, (3, 4, 3, 3)), "W"), *consts, node("Conv", ["x", "W"], ["c"], "conv"),
                node("Transpose", ["c"], ["tr"], "transpose", refs={"perm": (INTS, "perm")}),
                node(BN, ["tr", *p], ["y"], "bn")]
        call_attrs = {"perm": [0, 1, 3, 2]}
    else:
        raise AssertionError(kind)
    fn = function(f"Ref_{kind}", ["x"], ["y"], body, attributes=list(call_attrs))
    call = node(f"Ref_{kind}", ["x"], ["y"], "call", domain=LOCAL, **call_attrs)
    return Case(make([call], [vi("x", F32, x_shape)], [vi("y", F32, y_shape)], functions=[fn]))


ATTR_REF_KINDS = ["bn_epsilon", "gemm_alpha_beta", "bn_gemm_alpha_beta", "conv_group", "bn_conv_group",
                  "bn_conv_pads", "bn_conv_auto_pad", "convtranspose_group", "conv_transpose_perm_bn"]
for _kind in ATTR_REF_KINDS:
    case(f"attr_ref_{_kind}")(lambda k=_kind: attr_ref_case(k))


@pytest.mark.parametrize("kind", ATTR_REF_KINDS)
def test_issue12_11_attribute_reference(tmp_path, kind):
    folded = fold_and_check(CASES[f"attr_ref_{kind}"](), tmp_path)
    findings = bnfold.inspect(folded.src)  # must not crash either
    assert [f.bn for f in findings] == ["bn"]
    assert_folded(folded, "bn")
    assert_inspect_agrees(folded.src, folded.entries)


# ---------------------------------------------------------------------------------------
# 12. Zero-size channels


@case("conv_zero_channels_bn")
def _conv_zero_bn() -> Case:
    p, inits = bn_inits(np.random.default_rng(18), "bn", 0)
    nodes = [node("Conv", ["x", "W"], ["c"], "conv"), node(BN, ["c", *p], ["y"], "bn")]
    return Case(make(nodes, [vi("x", F32, [1, 3, 4, 4])], [vi("y", F32, [1, 0, 4, 4])],
                     [tensor(np.zeros((0, 3, 1, 1), np.float32), "W"), *inits]))


@case("bn_zero_channels_gemm")
def _bn_zero_gemm() -> Case:
    rng = np.random.default_rng(19)
    p, inits = bn_inits(rng, "bn", 0)
    nodes = [node(BN, ["x", *p], ["h"], "bn"), node("Gemm", ["h", "W", "C"], ["y"], "gemm")]
    return Case(make(nodes, [vi("x", F32, [2, 0])], [vi("y", F32, [2, 3])],
                     [*inits, tensor(np.zeros((0, 3), np.float32), "W"), tensor(rnd(rng, (3,)), "C")]))


@pytest.mark.parametrize("name", ["conv_zero_channels_bn", "bn_zero_channels_gemm"])
def test_issue12_12_zero_size_channels(tmp_path, name):
    # onnxruntime 1.32 runs both originals, so the full contract applies.
    folded = fold_and_check(CASES[name](), tmp_path)
    entry = folded.entry("bn")
    assert entry.status == "folded" or entry.reason in REASONS
    assert "Traceback" not in cli_message(folded.cli)


# ---------------------------------------------------------------------------------------
# 13. Depth: long chains must not hit Python's recursion limit


N_MULS = 250
N_IDENTITIES = 330


@case("conv_250_muls")
def _conv_many_muls() -> Case:
    rng = np.random.default_rng(20)
    nodes = [node("Conv", ["x", "W"], ["m0"], "conv", pads=[1, 1, 1, 1])]
    inits = [tensor(rnd(rng, (3, 3, 3, 3)), "W")]
    for i in range(N_MULS):
        out = "y" if i == N_MULS - 1 else f"m{i + 1}"
        inits.append(tensor(rng.uniform(0.98, 1.02, (3, 1, 1)).astype(np.float32), f"k{i}"))
        nodes.append(node("Mul", [f"m{i}", f"k{i}"], [out], f"mul{i}"))
    return Case(make(nodes, [vi("x", F32, [1, 3, 4, 4])], [vi("y", F32, [1, 3, 4, 4])], inits))


@case("bn_param_behind_330_identities")
def _bn_param_identities() -> Case:
    rng = np.random.default_rng(21)
    p, inits = bn_inits(rng, "bn", 3)
    nodes = [node("Conv", ["x", "W"], ["c"], "conv")]
    prev = p[0]
    for i in range(N_IDENTITIES):
        nodes.append(node("Identity", [prev], [f"id{i}"], f"identity{i}"))
        prev = f"id{i}"
    nodes.append(node(BN, ["c", prev, *p[1:]], ["y"], "bn"))
    inits.append(tensor(rnd(rng, (3, 3, 1, 1)), "W"))
    return Case(make(nodes, [vi("x", F32, [1, 3, 4, 4])], [vi("y", F32, [1, 3, 4, 4])], inits))


def test_issue12_13_many_chained_muls(tmp_path):
    folded = fold_and_check(CASES["conv_250_muls"](), tmp_path)
    muls = [e for e in folded.entries if e.op == "Mul"]
    assert len(muls) == N_MULS
    assert all(e.status == "folded" for e in muls), sorted({(e.status, e.reason) for e in muls})
    assert not any(n.op_type == "Mul" for n in folded.model.graph.node)


def test_issue12_13_bn_param_behind_identities(tmp_path):
    folded = fold_and_check(CASES["bn_param_behind_330_identities"](), tmp_path)
    assert_folded(folded, "bn")


# ---------------------------------------------------------------------------------------
# 14. Sparse Constant parameters; float32 overflow keeps only its own site


@case("bn_scale_sparse_constant")
def _bn_sparse_scale() -> Case:
    rng = np.random.default_rng(22)
    p, inits = bn_inits(rng, "bn", 4)
    scale = rng.uniform(0.5, 1.5, 4).astype(np.float32)
    sparse = oh.make_sparse_tensor(tensor(scale, "sparse_scale"), tensor(np.arange(4, dtype=np.int64), "idx"), [4])
    inits = [t for t in inits if t.name != p[0]]
    nodes = [node("Conv", ["x", "W"], ["c"], "conv"),
             oh.make_node("Constant", [], [p[0]], name="sparse_const", sparse_value=sparse),
             node(BN, ["c", *p], ["y"], "bn")]
    return Case(make(nodes, [vi("x", F32, [1, 3, 4, 4])], [vi("y", F32, [1, 4, 4, 4])],
                     [tensor(rnd(rng, (4, 3, 1, 1)), "W"), *inits]))


def overflow_case(where: str) -> Case:
    """conv_a -> bn_a would overflow float32 (weight or bias 3e38, BN scale 10); conv_b ->
    bn_b beside it is ordinary."""
    rng = np.random.default_rng(23)
    w_a = np.full((2, 2, 1, 1), 0.1, np.float32)
    b_a = np.zeros(2, np.float32)
    if where == "weight":
        w_a[0, 0, 0, 0] = 3e38
    else:
        b_a[0] = 3e38
    stats_a = [np.full(2, 10.0, np.float32), np.zeros(2, np.float32), np.zeros(2, np.float32), np.ones(2, np.float32)]
    pa = [f"bn_a.{r}" for r in ("scale", "B", "mean", "var")]
    pb, inits_b = bn_inits(rng, "bn_b", 3)
    nodes = [node("Conv", ["x", "Wa", "Ba"], ["ca"], "conv_a"), node(BN, ["ca", *pa], ["ya"], "bn_a"),
             node("Conv", ["x", "Wb"], ["cb"], "conv_b"), node(BN, ["cb", *pb], ["yb"], "bn_b")]
    inits = [tensor(w_a, "Wa"), tensor(b_a, "Ba"), *[tensor(a, n) for a, n in zip(stats_a, pa)],
             tensor(rnd(rng, (3, 2, 1, 1)), "Wb"), *inits_b]
    x = rng.uniform(-1, 1, (1, 2, 3, 3)).astype(np.float32)
    return Case(make(nodes, [vi("x", F32, [1, 2, 3, 3])], [vi("ya", F32, [1, 2, 3, 3]), vi("yb", F32, [1, 3, 3, 3])],
                     inits), feeds=[{"x": x}])


case("float32_weight_overflow")(lambda: overflow_case("weight"))
case("float32_bias_overflow")(lambda: overflow_case("bias"))


def test_issue12_14_sparse_constant_bn_scale(tmp_path):
    folded = fold_and_check(CASES["bn_scale_sparse_constant"](), tmp_path)
    assert folded.entry("bn").status in ("folded", "kept")


@pytest.mark.parametrize("where", ["weight", "bias"])
def test_issue12_14_float32_overflow_keeps_only_that_site(tmp_path, where):
    folded = fold_and_check(CASES[f"float32_{where}_overflow"](), tmp_path)
    a, b = folded.entry("bn_a"), folded.entry("bn_b")
    assert a.status == "kept" and a.reason == "dtype-overflow", a
    assert b.status == "folded", b


# ---------------------------------------------------------------------------------------
# 15. inspect and fold agree; unknown rank; training_info


@case("conv_bn_bn")
def _conv_bn_bn() -> Case:
    rng = np.random.default_rng(24)
    p1, i1 = bn_inits(rng, "bn1", 4)
    p2, i2 = bn_inits(rng, "bn2", 4)
    nodes = [node("Conv", ["x", "W"], ["c"], "conv", pads=[1, 1, 1, 1]), node(BN, ["c", *p1], ["h"], "bn1"),
             node(BN, ["h", *p2], ["y"], "bn2")]
    return Case(make(nodes, [vi("x", F32, [1, 3, 4, 4])], [vi("y", F32, [1, 4, 4, 4])],
                     [tensor(rnd(rng, (4, 3, 3, 3)), "W"), *i1, *i2]))


@case("bn_matmul_unknown_rank")
def _bn_matmul_unknown_rank() -> Case:
    """The BN input is a Reshape to a shape fed at run time, so its rank is unknown: BN
    normalises axis 1, MatMul contracts the last axis, the same axis only for a 2-D
    input, and the model accepts [3,4] and [2,4,4] alike (Flatten keeps the output 2-D)."""
    rng = np.random.default_rng(25)
    p, inits = bn_inits(rng, "bn", 4)
    nodes = [node("Reshape", ["x", "shape"], ["r"], "reshape"), node(BN, ["r", *p], ["h"], "bn"),
             node("MatMul", ["h", "W"], ["m"], "matmul"), node("Flatten", ["m"], ["y"], "flatten")]
    feeds = [{"x": rng.standard_normal(12).astype(np.float32), "shape": np.array([3, 4], np.int64)},
             {"x": rng.standard_normal(32).astype(np.float32), "shape": np.array([2, 4, 4], np.int64)}]
    inputs = [vi("x", F32, ["n"]), vi("shape", onnx.TensorProto.INT64, ["r"])]
    return Case(make(nodes, inputs, [vi("y", F32, ["a", "b"])], [*inits, tensor(rnd(rng, (4, 5)), "W")]),
                feeds=feeds)


@case("conv_bn_training_info")
def _conv_bn_training_info() -> Case:
    rng = np.random.default_rng(26)
    p, inits = bn_inits(rng, "bn", 4)
    nodes = [node("Conv", ["x", "W"], ["c"], "conv"), node(BN, ["c", *p], ["y"], "bn")]
    algorithm = oh.make_graph([node("Constant", [], ["lr"], "lr_const", value=tensor(np.float32(0.1), "lr")),
                               node("Mul", ["lr", "lr"], ["lr2"], "lr_square")],
                              "algorithm", [], [vi("lr2", F32, [])])
    info = oh.make_training_info(algorithm, [], None, [])
    return Case(make(nodes, [vi("x", F32, [1, 3, 4, 4])], [vi("y", F32, [1, 4, 4, 4])],
                     [tensor(rnd(rng, (4, 3, 1, 1)), "W"), *inits], training_info=[info]))


def test_issue12_15_conv_bn_bn_inspect_agrees(tmp_path):
    folded = fold_and_check(CASES["conv_bn_bn"](), tmp_path)
    assert_folded(folded, "bn1")
    assert_folded(folded, "bn2")
    assert_inspect_agrees(folded.src, folded.entries)


def test_issue12_15_bn_matmul_unknown_rank(tmp_path):
    folded = fold_and_check(CASES["bn_matmul_unknown_rank"](), tmp_path)  # runs 2-D and 3-D x
    entry = folded.entry("bn")
    if entry.status == "kept":
        assert entry.reason == "unknown-rank", entry
    (finding,) = bnfold.inspect(folded.src)
    if finding.fold_reason is not None:
        assert finding.fold_reason == "unknown-rank", finding
    assert_inspect_agrees(folded.src, folded.entries)


def test_issue12_15_training_info_preserved(tmp_path):
    c = CASES["conv_bn_training_info"]()
    folded = fold_and_check(c, tmp_path)
    assert_folded(folded, "bn")
    assert folded.model.training_info == c.model.training_info


# ---------------------------------------------------------------------------------------
# Found by the composed fuzzer (tests/test_fuzz.py), minimised


@case("fuzz_constant_first_mul_before_matmul")
def _fuzz_constant_first_mul_before_matmul():
    """``Mul(c, x) -> MatMul``: the constant is the *first* operand; the MatMul must read x."""
    rng = np.random.default_rng(21)
    nodes = [node("Relu", ["x"], ["r"], "relu"), node("Mul", ["k", "r"], ["m"], "mul"),
             node("MatMul", ["m", "W"], ["y"], "mm")]
    return Case(make(nodes, [vi("x", F32, [2, 3])], [vi("y", F32, [2, 3])],
                     [tensor(rng.uniform(0.5, 2, 3).astype(np.float32), "k"), tensor(rnd(rng, (3, 3)), "W")]))


def test_fuzz_constant_first_mul_before_matmul(tmp_path):
    folded = fold_and_check(CASES["fuzz_constant_first_mul_before_matmul"](), tmp_path)
    assert_folded(folded, "mul")


@case("fuzz_broadcasting_div_before_matmul")
def _fuzz_broadcasting_div_before_matmul():
    """``x[2,2,1] / c[3] -> MatMul(W[3,3])``: the Div stretches the last axis from 1 to 3, so
    removing it would feed the MatMul the wrong shape."""
    rng = np.random.default_rng(22)
    nodes = [node("Relu", ["x"], ["r"], "relu"), node("Div", ["r", "k"], ["d"], "div"),
             node("MatMul", ["d", "W"], ["y"], "mm")]
    return Case(make(nodes, [vi("x", F32, [2, 2, 1])], [vi("y", F32, [2, 2, 3])],
                     [tensor(rng.uniform(0.5, 2, 3).astype(np.float32), "k"), tensor(rnd(rng, (3, 3)), "W")]))


def test_fuzz_broadcasting_div_before_matmul(tmp_path):
    folded = fold_and_check(CASES["fuzz_broadcasting_div_before_matmul"](), tmp_path)
    assert folded.entry("div").status == "kept"


@case("fuzz_spatial0_bn_params_per_element")
def _fuzz_spatial0_bn_params_per_element():
    """An opset-7 BN with spatial=0 holds per-element statistics ``[C, H, W]``: a valid
    model, kept with ``spatial-0``, never an "invalid model" error."""
    rng = np.random.default_rng(23)
    names = [f"bn.{role}" for role in ("scale", "B", "mean", "var")]
    arrays = [rng.uniform(0.5, 1.5, (3, 1, 1)), rng.standard_normal((3, 1, 1)), rng.standard_normal((3, 1, 1)),
              rng.uniform(0.5, 2, (3, 1, 1))]
    nodes = [node("Conv", ["x", "W"], ["c"], "conv"), node(BN, ["c", *names], ["y"], "bn", spatial=0)]
    inits = [tensor(rnd(rng, (3, 3, 1, 1)), "W"), *(tensor(a.astype(np.float32), n) for a, n in zip(arrays, names))]
    inputs = [vi("x", F32, [2, 3, 1, 1])] + [vi(t.name, F32, list(t.dims)) for t in inits]  # IR 3: inits are inputs
    return Case(make(nodes, inputs, [vi("y", F32, [2, 3, 1, 1])], inits, opset=7, ir_version=3))


def test_fuzz_spatial0_bn_params_per_element(tmp_path):
    folded = fold_and_check(CASES["fuzz_spatial0_bn_params_per_element"](), tmp_path)
    assert folded.entry("bn").status == "kept" and folded.entry("bn").reason == "spatial-0"


@case("fuzz_decompose_only_what_no_pass_folds")
def _fuzz_decompose_only_what_no_pass_folds():
    """``BN -> BN -> MatMul`` with --decompose-standalone: the first BN folds once the second
    has (a later pass); decomposing it in the first pass would keep a Mul + Add for nothing."""
    rng = np.random.default_rng(24)
    p1, i1 = bn_inits(rng, "bn1", 3)
    p2, i2 = bn_inits(rng, "bn2", 3)
    nodes = [node(BN, ["x", *p1], ["h"], "bn1"), node(BN, ["h", *p2], ["h2"], "bn2"),
             node("MatMul", ["h2", "W"], ["y"], "mm")]
    return Case(make(nodes, [vi("x", F32, [2, 3])], [vi("y", F32, [2, 3])], [*i1, *i2, tensor(rnd(rng, (3, 3)), "W")]),
                flags=("--decompose-standalone",))


def test_fuzz_decompose_only_what_no_pass_folds(tmp_path):
    folded = fold_and_check(CASES["fuzz_decompose_only_what_no_pass_folds"](), tmp_path)
    assert_folded(folded, "bn1")
    assert_folded(folded, "bn2")


def _squeeze_all_after_conv(width: int) -> Case:
    """``Conv -> Squeeze (no axes) -> BN`` with a symbolic batch: at batch 1 the Squeeze also
    drops the batch, so the BN's axis 1 is the Conv's width, not its channels."""
    rng = np.random.default_rng(25)
    params, inits = bn_inits(rng, "bn", width)
    nodes = [node("Conv", ["x", "W"], ["c"], "conv"), node("Squeeze", ["c"], ["s"], "squeeze"),
             node(BN, ["s", *params], ["y"], "bn")]
    model = make(nodes, [vi("x", F32, ["N", 2, 1, width])], [vi("y", F32, ["d0", "d1"])],
                 [tensor(rnd(rng, (2, 2, 1, 1)), "W"), *inits])
    return Case(model, feeds=[{"x": rnd(rng, (1, 2, 1, width))}])


@case("fuzz_squeeze_all_with_symbolic_batch")
def _fuzz_squeeze_all_with_symbolic_batch():
    """Width 2 = the Conv's channels: the counts agree, and the fold used to scale the Conv's
    channels by the BN's factors for the width (wrong values)."""
    return _squeeze_all_after_conv(2)


@case("fuzz_squeeze_all_with_symbolic_batch_counts_differ")
def _fuzz_squeeze_all_with_symbolic_batch_counts_differ():
    """Width 3: the counts differ, and bnfold called the valid model invalid (exit 2)."""
    return _squeeze_all_after_conv(3)


@pytest.mark.parametrize("name", ["fuzz_squeeze_all_with_symbolic_batch",
                                  "fuzz_squeeze_all_with_symbolic_batch_counts_differ"])
def test_fuzz_squeeze_without_axes_keeps_symbolic_dims(tmp_path, name):
    folded = fold_and_check(CASES[name](), tmp_path)
    entry = folded.entry("bn")
    assert entry.status == "kept" and entry.reason == "unproven-layout", entry
    assert "symbolic" in entry.detail


# ---------------------------------------------------------------------------------------
# Property: inspect plans what fold does, on every model above


@pytest.mark.parametrize("name", sorted(CASES))
def test_issue12_inspect_agrees_with_fold(tmp_path, name):
    c = CASES[name]()
    onnx.checker.check_model(c.model, full_check=True)
    path = tmp_path / "in.onnx"
    onnx.save(c.model, path)
    result = bnfold.fold(path)
    assert_inspect_agrees(path, entries_of(result.ledger))
