"""Real exporter output: fold, verify and count what is left (issue 13).

The corpus (tests/corpus.py) is generated, never downloaded: small timm architectures and
hand-written torch models exported with both torch exporters (TorchScript, dynamo), and
Keras / tf2onnx-style graphs built with onnx.helper. Each model is exported once per run
into a session-scoped folder. For every model:

1. the original passes the checker and runs in onnxruntime, and holds the BN placement
   or pattern it is in the corpus for (``Spec.signature``);
2. ``bnfold.fold`` + ``save`` gives a model that passes the full checker and matches the
   original in onnxruntime (ORT_DISABLE_ALL on both; a second batch size where the batch
   dim is dynamic);
3. ``bnfold.inspect`` agrees with the fold's ledger on every BN;
4. the BNs left are exactly the ledger's kept BNs, each with a reason, and no more than
   ``EXPECTED_LEFT_MAX`` (the counts measured when the corpus was written: a regression
   fails). ``test_summary_table`` prints the table (run with ``-s``) and writes it to
   ``corpus_summary.json`` in pytest's base temp folder.

``test_patterns_fold`` says, per hand-written pattern model, whether it folds fully today;
the ones that do not are strict xfails, so implementing one flips its test to XPASS,
which fails until its mark is removed here.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest

import bnfold
import corpus as C
from bnfold.ledger import REASONS, STATUS_FOLDED

pytestmark = pytest.mark.train  # needs torch (and timm for the timm models)
pytest.importorskip("torch")

RTOL = 1e-4
ATOL_REL = 1e-4  # atol = ATOL_REL * max(1, max |ref|)
MIN_TIMM_EXPORTS = 12
AFFINE_OPS = ("Mul", "Div", "Add", "Sub")

#: Most BatchNormalization nodes left after folding, per model id, as measured when the
#: corpus was written (bnfold at c7df020 plus work in progress). Lower is fine; tighten it
#: when a pattern lands. What is left is not foldable: BN after GELU / ReLU / Concat with
#: no linear neighbour, or a producer read elsewhere (fan-out).
EXPECTED_LEFT_MAX: dict[str, int] = {
    "timm.resnet10t-ts": 0, "timm.resnet10t-dynamo": 0,
    "timm.mobilenetv3-ts": 0, "timm.mobilenetv3-dynamo": 0,
    "timm.mixnet-ts": 0, "timm.mixnet-dynamo": 0,  # BN after Concat of the mixed depthwise convs
    "timm.levit-ts": 0, "timm.levit-dynamo": 0,  # Linear -> flatten(0,1) -> BN1d
    "timm.convmixer-ts": 4, "timm.convmixer-dynamo": 4,  # BN after GELU; residual fan-out (the head's BN routes)
    "timm.repvgg-ts": 0, "timm.repvgg-dynamo": 0,  # the identity-branch BNs merge with their blocks' convs
    "timm.densenet-ts": 6, "timm.densenet-dynamo": 6,  # pre-activation BN after Concat / pooling
    "timm.regnet-ts": 0, "timm.regnet-dynamo": 0,
    "timm.ghostnet-ts": 0, "timm.ghostnet-dynamo": 0,
    "timm.dla-ts": 0, "timm.dla-dynamo": 0,
    "torch.bn1d_linear_last-ts": 0, "torch.bn1d_linear_last-dynamo": 0,
    "torch.linear_btf_bn1-ts": 0, "torch.linear_btf_bn1-dynamo": 0,
    "torch.unsqueeze0_bn1-ts": 0, "torch.unsqueeze0_bn1-dynamo": 0,
    "torch.bn_bn_conv-ts": 0, "torch.bn_bn_conv-dynamo": 0,
    "torch.bn_transpose_linear-ts": 0, "torch.bn_transpose_linear-dynamo": 0,
    "torch.const_first_matmul_bn-ts": 0, "torch.const_first_matmul_bn-dynamo": 0,
    "torch.linear_bias_111n-ts": 0, "torch.linear_bias_111n-dynamo": 0,
    "torch.flatten_bn_linear-ts": 0, "torch.flatten_bn_linear-dynamo": 0,
    "torch.identity_conv_bn-ts": 0, "torch.identity_conv_bn-dynamo": 0,
    "torch.conv_shape_reader-ts": 0, "torch.conv_shape_reader-dynamo": 0,
    "onnx.keras_bn_dense-onnx": 0,
    "onnx.keras_input_bn_dense-onnx": 0,
    "onnx.keras_relu_bn_dense-onnx": 0,
    "onnx.keras3_conv_mul_add-onnx": 0,
    "onnx.tf2onnx_dense_bn-onnx": 0,
    "onnx.input_norm_conv-onnx": 0,
    "onnx.input_norm_gemm-onnx": 0,
    "onnx.nhwc_conv_mul_add-onnx": 0,
    # Real blocks (tests/blocks.py), exact: the BNs each must keep, and why.
    "block.vgg_pool_bn-ts": 0, "block.vgg_pool_bn-dynamo": 0,
    "block.vgg_pool_bn_negative-ts": 1, "block.vgg_pool_bn_negative-dynamo": 1,  # negative-scale
    "block.preact_residual-ts": 2, "block.preact_residual-dynamo": 2,  # BN -> ReLU, the stem read twice
    "block.inception_fork-ts": 0, "block.inception_fork-dynamo": 0,
    "block.classifier_head-ts": 0, "block.classifier_head-dynamo": 0,
    "block.sum_then_bn-ts": 0, "block.sum_then_bn-dynamo": 0,
    "block.upsampling_decoder-ts": 0, "block.upsampling_decoder-dynamo": 0,
    "block.counted_padding_pool-ts": 1, "block.counted_padding_pool-dynamo": 1,  # shift-not-crossing
    "block.fork_with_activation-ts": 1, "block.fork_with_activation-dynamo": 1,  # fan-out into a ReLU
}

#: Why each block keeps what it keeps (the reasons, exactly).
BLOCK_KEPT: dict[str, dict[str, int]] = {
    "block.vgg_pool_bn_negative": {"negative-scale": 1},
    "block.preact_residual": {"fan-out": 2},
    "block.counted_padding_pool": {"shift-not-crossing": 1},
    "block.fork_with_activation": {"fan-out": 1},
}

#: Hand-written pattern models that do not fold fully today (model id -> what is left);
#: each is a strict xfail in test_patterns_fold. Empty: every pattern folds in the working
#: tree measured last. Add an entry for a new pattern model before its fold lands.
NOT_FOLDED_YET: dict[str, str] = {}

PATTERN_IDS = [model_id for model_id in C.ALL_IDS if C.SPEC_OF[model_id].pattern is not None]


def _pattern_param(model_id: str):
    spec = C.SPEC_OF[model_id]
    if model_id not in NOT_FOLDED_YET:
        return pytest.param(model_id, id=model_id)
    reason = f"issue 13 pattern {spec.pattern} not implemented yet ({NOT_FOLDED_YET[model_id]})"
    return pytest.param(model_id, id=model_id, marks=pytest.mark.xfail(strict=True, reason=reason))


# --------------------------------------------------------------------------- fixtures


@dataclass
class Folded:
    path: Path
    out: Path
    result: object
    bn_before: int
    bn_after: int


@pytest.fixture(scope="session")
def cache() -> dict:
    return {"folded": {}, "reference": {}}


def exported(corpus: C.Corpus, model_id: str) -> Path:
    try:
        return corpus.path(model_id)
    except C.ExportError as exc:
        print(f"\nSKIP {exc}")
        pytest.skip(str(exc))


def folded(corpus: C.Corpus, cache: dict, model_id: str) -> Folded:
    done = cache["folded"]
    if model_id not in done:
        path = exported(corpus, model_id)
        result = bnfold.fold(path)
        out = path.with_name(f"{path.stem}.folded.onnx")
        result.save(out)
        done[model_id] = Folded(path, out, result, _bn_count(onnx.load(str(path))), _bn_count(onnx.load(str(out))))
    return done[model_id]


def _bn_count(model: onnx.ModelProto) -> int:
    return sum(node.op_type == "BatchNormalization" for node in model.graph.node)


def run_ort(path: Path | bytes, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    source = path if isinstance(path, bytes) else str(path)
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def batches(model: onnx.ModelProto) -> list[int]:
    return [C.BATCH, C.ALT_BATCH] if C.has_dynamic_dim(model) else [C.BATCH]


def reference(corpus: C.Corpus, cache: dict, model_id: str) -> dict[int, tuple[dict, list[np.ndarray]]]:
    """Per batch size: the random feeds and the original's outputs."""
    refs = cache["reference"]
    if model_id not in refs:
        path = exported(corpus, model_id)
        model = onnx.load(str(path))
        runs = {}
        for batch in batches(model):
            feeds = C.random_feeds(model, batch, C.seed_of(model_id) % (2**31))
            runs[batch] = (feeds, run_ort(path, feeds))
        refs[model_id] = runs
    return refs[model_id]


# --------------------------------------------------------------------------- 1-4, per model


@pytest.mark.parametrize("model_id", C.ALL_IDS)
def test_original_is_valid_and_runs(corpus, cache, model_id):
    path = exported(corpus, model_id)
    onnx.checker.check_model(onnx.load(str(path)))
    for batch, (_, outputs) in reference(corpus, cache, model_id).items():
        assert outputs and all(np.isfinite(o).all() for o in outputs), f"batch {batch}"


@pytest.mark.parametrize("model_id", C.ALL_IDS)
def test_export_holds_its_pattern(corpus, model_id):
    """The export holds the BN placement or pattern the model is in the corpus for."""
    found = C.edges(onnx.load(str(exported(corpus, model_id))))
    missing = [edge for edge in C.signature_of(model_id) if edge not in found]
    assert not missing, f"{model_id}: missing {missing}; has {sorted(found)}"


@pytest.mark.parametrize("model_id", C.ALL_IDS)
def test_fold_matches_original(corpus, cache, model_id):
    f = folded(corpus, cache, model_id)
    model, out = onnx.load(str(f.path)), onnx.load(str(f.out))
    onnx.checker.check_model(out, full_check=True)
    assert [o.name for o in out.graph.output] == [o.name for o in model.graph.output]
    assert C.input_shapes(out, C.BATCH) == C.input_shapes(model, C.BATCH)
    for batch, (feeds, expected) in reference(corpus, cache, model_id).items():
        actual = run_ort(f.out, feeds)
        assert len(actual) == len(expected)
        for ref, got in zip(expected, actual):
            assert got.shape == ref.shape and got.dtype == ref.dtype
            atol = ATOL_REL * max(1.0, float(np.abs(ref).max(initial=0.0)))
            np.testing.assert_allclose(got, ref, rtol=RTOL, atol=atol, err_msg=f"{model_id}, batch {batch}")


@pytest.mark.parametrize("model_id", C.ALL_IDS)
def test_inspect_agrees_with_fold(corpus, cache, model_id):
    f = folded(corpus, cache, model_id)
    findings = bnfold.inspect(f.path)
    ledger = {(e.graph, e.node): e for e in f.result.ledger.batch_norms}
    assert len(ledger) == len(f.result.ledger.batch_norms) == f.bn_before
    assert sorted((x.graph, x.bn) for x in findings) == sorted(ledger)
    for finding in findings:
        entry = ledger[(finding.graph, finding.bn)]
        assert (finding.fold_reason is None) == (entry.status == STATUS_FOLDED), (finding, entry)
        if entry.status != STATUS_FOLDED:
            assert finding.fold_reason == entry.reason, (finding, entry)


@pytest.mark.parametrize("model_id", C.ALL_IDS)
def test_bn_left(corpus, cache, model_id):
    f = folded(corpus, cache, model_id)
    kept = [e for e in f.result.ledger.batch_norms if e.status != STATUS_FOLDED]
    assert f.bn_after == len(kept), [(e.node, e.status, e.reason) for e in kept]
    assert all(e.reason in REASONS for e in kept), [(e.node, e.reason) for e in kept]
    assert f.bn_after <= EXPECTED_LEFT_MAX[model_id], _kept_reasons(f)


BLOCK_IDS = [model_id for model_id in C.ALL_IDS if C.SPEC_OF[model_id].kind == "block"]


@pytest.mark.parametrize("model_id", BLOCK_IDS)
def test_blocks_fold_to_the_counts_expected(corpus, cache, model_id):
    """Each real block keeps exactly the BNs it must, for exactly its reason."""
    f = folded(corpus, cache, model_id)
    assert f.bn_after == EXPECTED_LEFT_MAX[model_id], _kept_reasons(f)
    assert _kept_reasons(f) == BLOCK_KEPT.get(C.SPEC_OF[model_id].name, {})


TIMM_TS_IDS = [model_id for model_id in C.ALL_IDS if model_id.startswith("timm.") and model_id.endswith("-ts")]


@pytest.mark.parametrize("model_id", TIMM_TS_IDS)
def test_corpus_shows_a_wrong_fold(corpus, cache, model_id):
    """A fold that got one BN's scale 5% wrong (its shift right) fails the comparison, for
    the first, middle and last BN: the random nets are not so flat that errors vanish."""
    from onnx import numpy_helper as onh

    path = exported(corpus, model_id)
    feeds, expected = reference(corpus, cache, model_id)[C.BATCH]
    ref = expected[0]
    atol = ATOL_REL * max(1.0, float(np.abs(ref).max()))
    bns = [n for n in onnx.load(str(path)).graph.node if n.op_type == "BatchNormalization"]
    for bn in {bns[0].name: bns[0], bns[len(bns) // 2].name: bns[len(bns) // 2], bns[-1].name: bns[-1]}.values():
        model = onnx.load(str(path))
        inits = {i.name: i for i in model.graph.initializer}
        gamma, beta, mean, var = (onh.to_array(inits[n]).astype(np.float64) for n in bn.input[1:5])
        scale = gamma / np.sqrt(var + 1e-5)
        inits[bn.input[1]].CopyFrom(onh.from_array((gamma * 1.05).astype(np.float32), bn.input[1]))
        inits[bn.input[2]].CopyFrom(onh.from_array((beta + 0.05 * mean * scale).astype(np.float32), bn.input[2]))
        got = run_ort(model.SerializeToString(), feeds)[0]
        assert not np.allclose(got, ref, rtol=RTOL, atol=atol), f"{bn.name}: a 5% scale error does not show"


# --------------------------------------------------------------------------- patterns


def _constants(model: onnx.ModelProto) -> set[str]:
    """Values computed from initializers and Constant nodes alone."""
    known = {i.name for i in model.graph.initializer}
    for node in model.graph.node:  # graph order is topological
        if all(not name or name in known for name in node.input):
            known.update(node.output)
    return known


def leftover_affine(model: onnx.ModelProto) -> list[str]:
    """Mul/Div/Add/Sub nodes with one constant operand still in the graph, except an Add
    that is a MatMul's bias (the slot a folded shift lands in)."""
    consts = _constants(model)
    producer = {out: node for node in model.graph.node for out in node.output}
    left = []
    for node in model.graph.node:
        if node.op_type not in AFFINE_OPS or len(node.input) != 2:
            continue
        data = [name for name in node.input if name not in consts]
        if len(data) != 1:
            continue
        if node.op_type == "Add" and getattr(producer.get(data[0]), "op_type", None) == "MatMul":
            continue
        left.append(f"{node.op_type} {node.name}")
    return left


@pytest.mark.parametrize("model_id", [_pattern_param(model_id) for model_id in PATTERN_IDS])
def test_patterns_fold(corpus, cache, model_id):
    """The pattern folds fully: no BN left, every affine site in the ledger folded, and no
    per-channel Mul/Div/Add/Sub left in the graph (but a MatMul's bias Add)."""
    f = folded(corpus, cache, model_id)
    not_folded = [(e.op, e.node, e.reason) for e in f.result.ledger if e.status != STATUS_FOLDED]
    assert f.bn_after == 0, not_folded
    assert not not_folded
    assert not leftover_affine(onnx.load(str(f.out)))


# --------------------------------------------------------------------------- the table


def _kept_reasons(f: Folded) -> dict[str, int]:
    counts: dict[str, int] = {}
    for entry in f.result.ledger.batch_norms:
        if entry.status != STATUS_FOLDED:
            counts[entry.reason] = counts.get(entry.reason, 0) + 1
    return dict(sorted(counts.items()))


def test_expected_table_covers_the_corpus():
    assert set(EXPECTED_LEFT_MAX) == set(C.ALL_IDS)
    assert all(C.signature_of(model_id) for model_id in C.ALL_IDS)
    assert set(NOT_FOLDED_YET) <= set(PATTERN_IDS)


def test_summary_table(corpus, cache, tmp_path_factory):
    """Every model folded (cached), the table printed and written; enough timm exports."""
    rows, skipped = [], {}
    for model_id in C.ALL_IDS:
        try:
            corpus.path(model_id)
        except C.ExportError as exc:
            skipped[model_id] = str(exc)
            continue
        f = folded(corpus, cache, model_id)
        spec = C.SPEC_OF[model_id]
        rows.append({
            "model": spec.name, "exporter": C.EXPORTER_NAMES[C.exporter_of(model_id)], "pattern": spec.pattern,
            "bn_before": f.bn_before, "bn_after": f.bn_after, "kept_reasons": _kept_reasons(f),
            "other_sites": {s: n for s, n in f.result.ledger.summary().items() if s.startswith("other_")},
        })
    path = Path(tmp_path_factory.getbasetemp()) / "corpus_summary.json"
    path.write_text(json.dumps({"rows": rows, "skipped": skipped}, indent=2) + "\n")
    width = max(len(r["model"]) for r in rows)
    lines = [f"{'model':{width}}  {'exporter':11}  {'BN before':>9}  {'BN after':>8}  kept reasons"]
    for r in rows:
        reasons = ", ".join(f"{k} x{v}" for k, v in r["kept_reasons"].items())
        lines.append(f"{r['model']:{width}}  {r['exporter']:11}  {r['bn_before']:9d}  {r['bn_after']:8d}  {reasons}")
    lines += [f"skipped {k}: {v}" for k, v in skipped.items()]
    print(f"\n\ncorpus summary ({path}):\n" + "\n".join(lines))
    if importlib.util.find_spec("timm") is None:
        pytest.skip("timm is not installed (the [test] extra): the timm part of the corpus was skipped")
    timm_exported = sum(r["model"].startswith("timm.") for r in rows)
    assert timm_exported >= MIN_TIMM_EXPORTS, skipped
