"""bnfold.plan's legality and numeric decisions, one promise per test (issue 27: each
test kills mutants of plan.py that the other tests let live)."""

from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as onh
import pytest

import bnfold
from bnfold.errors import InputError
from bnfold.plan import FoldOptions
from builders import GraphBuilder, count_ops, run


def fold_compare(model: onnx.ModelProto, feeds, tmp_path: Path, rtol=1e-4, atol=1e-5, **flags):
    """Fold ``model`` with ``flags`` (FoldOptions fields), run both in ORT (ORT_DISABLE_ALL)
    and assert the outputs match; the result and the folded ModelProto."""
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(model, src)
    result = bnfold.fold(src, **flags)
    result.save(out)
    folded = onnx.load(out)
    onnx.checker.check_model(folded, full_check=True)
    for e, a in zip(run(src, feeds), run(out, feeds), strict=True):
        np.testing.assert_allclose(a, e, rtol=rtol, atol=atol)
    return result, folded


def entry(result, node: str):
    (found,) = [e for e in result.ledger if e.node == node]
    return found


def x_feed(shape, seed=0):
    return {"x": np.random.default_rng(seed).standard_normal(shape).astype(np.float32)}


def conv_bn(b: GraphBuilder, c_out=4, **bn_attrs) -> str:
    y = b.node("Conv", [b.input([2, 3, 5, 5]), b.random([c_out, 3, 3, 3])], pads=[1, 1, 1, 1])
    return b.bn(y, c_out, name="the_bn", **bn_attrs)


# --- options ---------------------------------------------------------------------------


def test_targets_are_checked():
    assert FoldOptions(targets=("fp16", "int8", "fp16")).targets == ("fp16", "int8")
    with pytest.raises(InputError, match="fp17"):
        FoldOptions(targets=("fp16", "fp17"))


def test_keep_on_request(tmp_path):
    """--keep: a BN that would fold stays, with its reason and its channel count."""
    b = GraphBuilder(seed=1)
    b.output(conv_bn(b))
    result, folded = fold_compare(b.model(), x_feed([2, 3, 5, 5]), tmp_path, keep=frozenset({"the_bn"}))
    found = entry(result, "the_bn")
    assert (found.status, found.reason, found.channels) == ("kept", "kept-on-request", 4)
    assert count_ops(folded, "BatchNormalization") == 1


# --- statistics ------------------------------------------------------------------------


def test_zero_variance_with_zero_epsilon_is_kept(tmp_path):
    """var + eps == 0 makes s = gamma / 0: the BN stays even though no var is negative."""
    b = GraphBuilder(seed=2)
    y = b.node("Conv", [b.input([2, 3, 5, 5]), b.random([4, 3, 3, 3])], pads=[1, 1, 1, 1])
    gamma, beta, mean, _ = b.bn_params(4)
    var = b.const(np.float32([0.5, 0.0, 1.0, 2.0]), "var")
    b.output(b.node("BatchNormalization", [y, gamma, beta, mean, var], name="the_bn", epsilon=0.0))
    src = tmp_path / "in.onnx"
    onnx.save(b.model(), src)
    found = entry(bnfold.fold(src), "the_bn")
    assert (found.status, found.reason) == ("kept", "negative-variance")


# --- elementwise sites -----------------------------------------------------------------


def mul_before_matmul(const, x_shape, w_shape, between=None, seed=3):
    b = GraphBuilder(seed=seed)
    x = b.input(x_shape)
    y = b.node("Mul", [x, b.const(np.asarray(const, dtype=np.float32))], name="the_mul")
    if between is not None:
        y = b.node(between, [y])
    b.output(b.node("MatMul", [y, b.random(w_shape)]))
    return b


def test_constant_varying_along_two_axes_is_refused(tmp_path):
    b = mul_before_matmul(np.arange(1, 13).reshape(3, 4), [2, 3, 4], [4, 5])
    result, folded = fold_compare(b.model(), x_feed([2, 3, 4]), tmp_path)
    found = entry(result, "the_mul")
    assert (found.status, found.reason) == ("kept", "non-channel-constant")
    assert count_ops(folded, "Mul") == 1


def test_mul_before_dropout_and_matmul_folds(tmp_path):
    """The route from a Mul down to the linear op crosses version-dependent ops (Dropout)."""
    b = mul_before_matmul([1.0, -2.0, 3.0, 0.5], [2, 3, 4], [4, 5], between="Dropout")
    result, folded = fold_compare(b.model(), x_feed([2, 3, 4]), tmp_path)
    assert entry(result, "the_mul").status == "folded"
    assert count_ops(folded, "Mul") == 0
