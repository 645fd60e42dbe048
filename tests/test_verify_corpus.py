"""verify's per-channel verdict on real exporter output, and golden outputs from torch.

Correct folds of deep fp32 networks (timm architectures, exported by tests/corpus.py)
pass with the default tolerances, and scaling any one output channel's weights by 1% in
the folded model fails; a model exported from torch verifies against torch's own outputs.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import bnfold
import corpus as C
from bnfold.verification import verify

pytestmark = pytest.mark.train
torch = pytest.importorskip("torch")

DEEP = ["timm.resnet10t-ts", "timm.mobilenetv3-dynamo", "timm.regnet-ts", "timm.convmixer-ts", "timm.densenet-dynamo"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> C.Corpus:
    return C.Corpus(tmp_path_factory.mktemp("verify-corpus"))


def _exported(corpus, model_id):
    try:
        return corpus.path(model_id)
    except C.ExportError as exc:
        pytest.skip(str(exc))


@pytest.mark.parametrize("model_id", DEEP)
def test_correct_fold_of_a_deep_network_passes_and_a_1pct_channel_fails(corpus, model_id, tmp_path):
    path = _exported(corpus, model_id)
    folded = tmp_path / "folded.onnx"
    bnfold.fold(path).save(folded)

    report = verify(path, folded, providers="cpu", samples=2, metrics=("top1",))
    assert report.passed, report.summary()
    worst = max(c.difference.max_channel_rel_diff for c in report.comparisons)
    assert worst < 1e-4, f"correct fold's channel error {worst:.2e}: the default bound 1e-3 has 10x margin"

    # the last Gemm/MatMul/Conv with a constant weight: scale one output channel by 1.01
    model = onnx.load(str(folded))
    inits = {t.name: i for i, t in enumerate(model.graph.initializer)}
    node = next(n for n in reversed(model.graph.node)
                if n.op_type in ("Gemm", "Conv", "MatMul") and len(n.input) > 1 and n.input[1] in inits)
    weight = numpy_helper.to_array(model.graph.initializer[inits[node.input[1]]]).copy()
    axis = 0 if node.op_type == "Conv" or (node.op_type == "Gemm" and any(
        a.name == "transB" and a.i for a in node.attribute)) else weight.ndim - 1
    channel = int(np.random.default_rng(0).integers(weight.shape[axis]))
    index = [slice(None)] * weight.ndim
    index[axis] = channel
    weight[tuple(index)] *= 1.01
    model.graph.initializer[inits[node.input[1]]].CopyFrom(numpy_helper.from_array(weight, node.input[1]))
    onnx.save(model, str(tmp_path / "bad.onnx"))

    bad = verify(path, tmp_path / "bad.onnx", providers="cpu", samples=2)
    assert not bad.passed, f"{model_id}: 1% on channel {channel} of {node.name} passed"


def test_golden_outputs_from_torch(tmp_path):
    """A torch model exported to ONNX verifies against torch's own outputs (--reference-outputs)."""
    from typer.testing import CliRunner

    from bnfold.cli import app

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 5),
    )
    C.randomize_bn(net, 0)
    net.eval()
    x = torch.randn(6, 3, 8, 8)
    C.export_torch(net, x, tmp_path / "net.onnx", C.TS, dynamic=True)
    with torch.no_grad():
        expected = net(x).numpy()
    np.savez(tmp_path / "in.npz", **{C.INPUT: x.numpy()})
    np.savez(tmp_path / "torch.npz", **{C.OUTPUT: expected})
    bnfold.fold(tmp_path / "net.onnx").save(tmp_path / "folded.onnx")

    report = verify(None, tmp_path / "folded.onnx", reference_outputs=tmp_path / "torch.npz",
                    inputs=tmp_path / "in.npz", providers="cpu", metrics=("top1",))
    assert report.passed, report.summary()
    assert report.reference == "stored" and {c.reference.model for c in report.comparisons} == {"stored"}
    assert report.comparisons[0].top1.agreement == 1.0

    # the CLI, and fold --verify against the same torch outputs (ORIGINAL vs torch is reported, not judged)
    runner = CliRunner()
    result = runner.invoke(app, ["verify", str(tmp_path / "folded.onnx"), "--reference-outputs",
                                 str(tmp_path / "torch.npz"), "--inputs", str(tmp_path / "in.npz"), "--providers", "cpu"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["fold", str(tmp_path / "net.onnx"), "-o", str(tmp_path / "f2.onnx"), "--verify",
                                 "--reference-outputs", str(tmp_path / "torch.npz"), "--inputs",
                                 str(tmp_path / "in.npz"), "--providers", "cpu"])
    assert result.exit_code == 0, result.output

    # torch's output for a different net is a mismatch
    np.savez(tmp_path / "wrong.npz", **{C.OUTPUT: expected * 1.01})
    wrong = verify(None, tmp_path / "folded.onnx", reference_outputs=tmp_path / "wrong.npz",
                   inputs=tmp_path / "in.npz", providers="cpu")
    assert not wrong.passed
