"""Parallel branches of one tensor merge into one conv (issue 23), checked three ways.

Real train-form blocks written in torch (tests/blocks.py: RepVGG, MobileOne-style
over-parameterisation, YOLO's RepConv, ACNet, a grouped block with an identity, FastViT's
layer-scaled RepMixer) are exported with both torch exporters and folded. Each must

1. become one Conv per block (+ activation): no BN, no Add left, and the Conv count the
   block's deploy form has;
2. match the original in onnxruntime (ORT_DISABLE_ALL on both);
3. carry the kernel and bias the authors' own merge algebra gives, written here from the
   papers (RepVGG: fuse each BN into its conv, pad the 1x1 to the centre of the 3x3, the
   identity as a 3x3 kernel with a 1 in the centre of its own channel, sum; ACNet: add the
   1x3 and 3x1 kernels onto the middle row and column; FastViT: ``id + ls * (mixer -
   norm)``), not from bnfold's code.

Then the cases the common "pad by k//2" rule gets wrong (TF's SAME_UPPER at stride 2, as
tf2onnx writes it: asymmetric pads and auto_pad), the refusals (each with its reason,
the model left exact), the options, and timm's own repvgg_a0 in train form against its
reparameterised export.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as onh
import pytest

import blocks as B
import bnfold
import corpus as C
from builders import GraphBuilder, count_ops, fold_and_compare, run

pytestmark = pytest.mark.train
torch = pytest.importorskip("torch")


# --- the authors' algebra ----------------------------------------------------------------


def fuse(conv: torch.nn.Conv2d, bn: torch.nn.BatchNorm2d) -> tuple[np.ndarray, np.ndarray]:
    """RepVGG, eq. 3: ``W' = (gamma / sigma) W``, ``b' = beta - mu gamma / sigma``."""
    std = np.sqrt(bn.running_var.detach().double().numpy() + bn.eps)
    scale = bn.weight.detach().double().numpy() / std
    bias = bn.bias.detach().double().numpy() - bn.running_mean.detach().double().numpy() * scale
    weight = conv.weight.detach().double().numpy() * scale[:, None, None, None]
    if conv.bias is not None:
        bias = bias + conv.bias.detach().double().numpy() * scale
    return weight, bias


def identity(bn: torch.nn.BatchNorm2d, groups: int, kernel: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """RepVGG: the identity branch is a conv whose kernel has a 1 at the centre of each
    channel's own input (within its group), then its BN fused."""
    c = bn.num_features
    eye = np.zeros((c, c // groups, *kernel))
    for i in range(c):
        eye[i, i % (c // groups), kernel[0] // 2, kernel[1] // 2] = 1.0
    conv = torch.nn.Conv2d(c, c, kernel, groups=groups, bias=False)
    conv.weight.data = torch.from_numpy(eye)
    return fuse(conv, bn)


def centre(weight: np.ndarray, kernel: tuple[int, int]) -> np.ndarray:
    """Zero-pad a smaller kernel into the centre of ``kernel`` (symmetric pads only)."""
    h, w = weight.shape[2:]
    top, left = (kernel[0] - h) // 2, (kernel[1] - w) // 2
    return np.pad(weight, ((0, 0), (0, 0), (top, kernel[0] - h - top), (left, kernel[1] - w - left)))


def conv_bn(seq) -> tuple[np.ndarray, np.ndarray]:
    return fuse(seq[0], seq[1])


def reference_kernels(name: str, net) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each block's merged (W, b), in graph order, by the authors' algebra."""
    merged = []
    if name == "repvgg":
        for block in net:
            k = block.dense[0].kernel_size
            terms = [conv_bn(block.dense), conv_bn(block.one)]
            if block.identity is not None:
                terms.append(identity(block.identity, 1, k))
            merged.append((sum(centre(w, k) for w, _ in terms), sum(b for _, b in terms)))
    elif name == "overparameterised":
        for block in list(net)[1:]:
            k = block.branches[0][0].kernel_size
            groups = block.branches[0][0].groups
            terms = [conv_bn(branch) for branch in block.branches] + [identity(block.identity, groups, k)]
            if block.scale is not None:
                terms.append(conv_bn(block.scale))
            merged.append((sum(centre(w, k) for w, _ in terms), sum(b for _, b in terms)))
    elif name == "repconv":
        for block in net:
            k = block.conv1[0].kernel_size
            terms = [conv_bn(block.conv1), conv_bn(block.conv2)]
            merged.append((sum(centre(w, k) for w, _ in terms), sum(b for _, b in terms)))
    elif name == "acnet":  # ACNet, sec. 3.3: the 1x3 and 3x1 kernels add onto the middle row and column
        for block in net:
            (square, b1), (hor, b2), (ver, b3) = conv_bn(block.square), conv_bn(block.hor), conv_bn(block.ver)
            square = square.copy()
            square[:, :, 1:2, :] += hor
            square[:, :, :, 1:2] += ver
            merged.append((square, b1 + b2 + b3))
    elif name == "grouped_identity":
        for block in list(net)[1:]:
            k, groups = block.dense[0].kernel_size, block.dense[0].groups
            terms = [conv_bn(block.dense), conv_bn(block.one), identity(block.identity, groups, k)]
            merged.append((sum(centre(w, k) for w, _ in terms), sum(b for _, b in terms)))
    elif name == "layer_scaled_mixer":  # FastViT's RepMixer.reparameterize: id + ls * (mixer - norm)
        for mixer in (net[1], net[3]):
            c = mixer.layer_scale.shape[0]
            mixer_w, mixer_b = [sum(t) for t in zip(conv_bn(mixer.dw), identity(mixer.mixer_identity, c, (3, 3)))]
            norm_w, norm_b = identity(mixer.norm, c, (3, 3))
            ls = mixer.layer_scale.double().detach().numpy().reshape(-1)
            eye = identity(_unit_bn(c), c, (3, 3))[0]
            merged.append((eye + ls[:, None, None, None] * (mixer_w - norm_w), ls * (mixer_b - norm_b)))
    return merged


def _unit_bn(c: int) -> torch.nn.BatchNorm2d:
    bn = torch.nn.BatchNorm2d(c, eps=0.0).eval()
    return bn


#: block -> (Conv count of the deploy form, merges)
DEPLOY = {"repvgg": (3, 3), "overparameterised": (3, 2), "repconv": (2, 2), "acnet": (2, 2),
          "grouped_identity": (3, 2), "layer_scaled_mixer": (3, 2)}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("merge")
    done = {}

    def get(name: str, exporter: str):
        if (name, exporter) not in done:
            torch.manual_seed(C.seed_of(name) % 2**31)
            net, example = getattr(B, name)()
            C.rescale_weights(net, C.seed_of(name) % 2**31)
            C.randomize_bn(net, C.seed_of(name) % 2**31)
            net.eval()
            path = folder / f"{name}-{exporter}.onnx"
            C.export_torch(net, example, path, exporter, True)
            result = bnfold.fold(path)
            out = folder / f"{name}-{exporter}.folded.onnx"
            result.save(out)
            done[(name, exporter)] = (net, example, path, out, result)
        return done[(name, exporter)]

    return get


@pytest.mark.parametrize("exporter", [C.TS, C.DYNAMO])
@pytest.mark.parametrize("name", list(DEPLOY))
def test_train_form_block_becomes_its_deploy_form(exported, name, exporter):
    net, example, path, out, result = exported(name, exporter)
    original, folded = onnx.load(path), onnx.load(out)
    onnx.checker.check_model(folded, full_check=True)
    convs, merges = DEPLOY[name]
    assert count_ops(folded, "Conv") == convs, [e for e in result.ledger if e.status != "folded"]
    assert count_ops(folded, "BatchNormalization") == 0
    assert count_ops(folded, "Add") == count_ops(folded, "Sub") == 0
    assert count_ops(folded, "Mul") == count_ops(folded, "Sigmoid")  # a SiLU's; no layer scale left
    assert len([e for e in result.ledger if e.status == "merged"]) == merges
    assert len(folded.graph.node) < len(original.graph.node)
    feeds = {C.INPUT: np.random.default_rng(3).standard_normal(tuple(example.shape)).astype(np.float32)}
    expected, actual = run(path, feeds)[0], run(out, feeds)[0]
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(expected).max())))
    with torch.no_grad():  # and the export is the torch net (so the algebra below compares like with like)
        np.testing.assert_allclose(expected, net(example.new_tensor(feeds[C.INPUT])).numpy(), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("exporter", [C.TS, C.DYNAMO])
@pytest.mark.parametrize("name", list(DEPLOY))
def test_merged_kernel_is_the_authors_algebra(exported, name, exporter):
    net, _, _, out, result = exported(name, exporter)
    folded = onnx.load(out)
    inits = {i.name: onh.to_array(i) for i in folded.graph.initializer}
    convs = {n.name: n for n in folded.graph.node if n.op_type == "Conv"}
    merges = [e for e in result.ledger if e.status == "merged"]
    reference = reference_kernels(name, net)
    assert len(merges) == len(reference)
    for entry, (weight, bias) in zip(merges, reference):
        conv = convs[entry.into]
        got_w, got_b = inits[conv.input[1]].astype(np.float64), inits[conv.input[2]].astype(np.float64)
        assert got_w.shape == weight.shape, entry.detail
        scale = max(1.0, float(np.abs(weight).max()))
        np.testing.assert_allclose(got_w, weight, rtol=1e-5, atol=1e-6 * scale, err_msg=entry.detail)
        np.testing.assert_allclose(got_b, bias, rtol=1e-5, atol=1e-6 * max(1.0, float(np.abs(bias).max())))


@pytest.mark.parametrize("exporter", [C.TS, C.DYNAMO])
def test_absorbed_bns_point_to_the_merged_conv(exported, exporter):
    _, _, path, out, result = exported("repvgg", exporter)
    merged = {e.into for e in result.ledger if e.status == "merged"}
    bns = result.ledger.batch_norms
    assert len(bns) == 8 and all(e.folded for e in bns)
    assert {e.into for e in bns} == merged, [(e.node, e.into) for e in bns]
    # a BN the merge itself took in (the identity branch's) says so and names the sum
    sums = {f"Add '{e.node}'" for e in result.ledger if e.status == "merged"}
    absorbed = [e for e in bns if e.pattern == "merge"]
    assert absorbed and all(e.route.removeprefix("one of the branches merged at ") in sums for e in absorbed), \
        [(e.pattern, e.route) for e in bns]
    assert all(e.into in {n.name for n in onnx.load(out).graph.node} for e in bns)
    plans = [f.plan for f in bnfold.inspect(path)]
    assert all(any(name in plan for name in merged) for plan in plans), plans


# --- placement: where the common rule is wrong ---------------------------------------------


def tf_same(auto_pad: bool, seed: int = 0) -> onnx.ModelProto:
    """tf2onnx's stride-2 SAME block on a 16x16 input: the 3x3 conv pads (0, 1) per axis,
    the 1x1 conv none; both read x, their BNs as Mul/Add are already in the convs."""
    b = GraphBuilder(seed=seed)
    x = b.input([2, 3, 16, 16])
    pads = {"auto_pad": "SAME_UPPER"} if auto_pad else {"pads": [0, 0, 1, 1]}
    big = b.node("Conv", [x, b.random([8, 3, 3, 3]), b.random([8])], strides=[2, 2], name="dense", **pads)
    small = b.node("Conv", [x, b.random([8, 3, 1, 1]), b.random([8])], strides=[2, 2], name="one",
                   **({"auto_pad": "SAME_UPPER"} if auto_pad else {}))
    b.output(b.node("Relu", [b.node("Add", [big, small], name="sum")]))
    return b.model()


@pytest.mark.parametrize("auto_pad", [False, True], ids=["asymmetric-pads", "same-upper"])
def test_tf_same_stride_2_places_the_1x1_at_offset_0(tmp_path, auto_pad):
    model = tf_same(auto_pad)
    feeds = {"x": np.random.default_rng(1).standard_normal((2, 3, 16, 16)).astype(np.float32)}
    result, folded = fold_and_compare(model, feeds, tmp_path)
    (entry,) = [e for e in result.ledger if e.status == "merged"]
    assert entry.detail == "merged 2 branches (3x3, 1x1) into Conv 'dense'"
    assert count_ops(folded, "Conv") == 1 and count_ops(folded, "Add") == 0
    inits = {i.name: onh.to_array(i) for i in model.graph.initializer}
    conv = {n.name: n for n in model.graph.node}
    w_big, w_small = inits[conv["dense"].input[1]], inits[conv["one"].input[1]]
    merged = {i.name: onh.to_array(i) for i in folded.graph.initializer}[folded.graph.node[0].input[1]]
    np.testing.assert_allclose(merged[:, :, 0, 0], w_big[:, :, 0, 0] + w_small[:, :, 0, 0], rtol=1e-6)
    np.testing.assert_array_equal(merged[:, :, 1, 1], w_big[:, :, 1, 1])
    # The "pad the 1x1 by k//2" rule puts it at the centre: a different function here.
    centred = w_big.astype(np.float64)
    centred[:, :, 1, 1] += w_small[:, :, 0, 0]
    naive = GraphBuilder()
    bias = inits[conv["dense"].input[2]] + inits[conv["one"].input[2]]
    naive.output(naive.node("Relu", [naive.node("Conv", [naive.input([2, 3, 16, 16]), naive.const(
        centred.astype(np.float32)), naive.const(bias)], strides=[2, 2], pads=[0, 0, 1, 1])]))
    assert not np.allclose(run(naive.model(), feeds)[0], run(model, feeds)[0], atol=1e-3)


def test_avgpool_branch_counting_its_padding_merges(tmp_path):
    """``conv3x3(x) + AvgPool3x3(x)`` with count_include_pad=1 is one conv (1/9 on each channel)."""
    b = GraphBuilder(seed=2)
    x = b.input([2, 4, 8, 8])
    conv = b.node("Conv", [x, b.random([4, 4, 3, 3]), b.random([4])], pads=[1, 1, 1, 1], name="conv")
    pool = b.node("AveragePool", [x], kernel_shape=[3, 3], pads=[1, 1, 1, 1], count_include_pad=1)
    b.output(b.node("Add", [conv, pool], name="sum"))
    feeds = {"x": np.random.default_rng(2).standard_normal((2, 4, 8, 8)).astype(np.float32)}
    result, folded = fold_and_compare(b.model(), feeds, tmp_path)
    (entry,) = [e for e in result.ledger if e.status == "merged"]
    assert entry.pattern == "merge(3x3+avgpool3x3)" and count_ops(folded, "AveragePool") == 0


# --- refusals: kept with their reasons, the model exact ---------------------------------------


def refused(tmp_path, model, feeds, reason: str) -> None:
    result, folded = fold_and_compare(model, feeds, tmp_path)
    kept = [e for e in result.ledger if e.op in ("Add", "Sub", "Sum") and e.status == "kept"]
    assert [e.reason for e in kept] == [reason], [(e.reason, e.detail) for e in result.ledger]
    assert kept[0].detail
    assert count_ops(folded, "Conv") == count_ops(model, "Conv")


def two_branches(second, seed=0, channels=4):
    b = GraphBuilder(seed=seed)
    x = b.input([2, channels, 8, 8])
    first = b.node("Conv", [x, b.random([channels, channels, 3, 3])], pads=[1, 1, 1, 1])
    b.output(b.node("Add", [first, second(b, x)], name="sum"))
    return b.model(), {"x": np.random.default_rng(seed).standard_normal((2, channels, 8, 8)).astype(np.float32)}


@pytest.mark.parametrize("second, reason", [
    (lambda b, x: b.node("AveragePool", [x], kernel_shape=[3, 3], pads=[1, 1, 1, 1]), "avgpool-borders"),
    (lambda b, x: b.node("Conv", [x, b.random([4, 4, 3, 3])], pads=[2, 2, 2, 2], dilations=[2, 2]),
     "branch-mismatch"),
    (lambda b, x: b.node("Conv", [x, b.random([4, 1, 3, 3])], pads=[1, 1, 1, 1], group=4), "branch-mismatch"),
    (lambda b, x: b.node("Conv", [b.bn(b.node("Conv", [x, b.random([4, 4, 1, 1])]), 4),
                                  b.random([4, 4, 3, 3])], pads=[1, 1, 1, 1]), "sequential-branch"),
], ids=["avgpool-uncounted-border", "dilation", "groups", "dbb-sequential"])
def test_branches_that_are_not_one_conv_stay(tmp_path, second, reason):
    model, feeds = two_branches(second)
    refused(tmp_path, model, feeds, reason)


def test_branches_no_one_kernel_holds_stay(tmp_path):
    """1x3 + 3x1 without a 3x3: merging needs a 3x3, more FLOPs than the branches."""
    b = GraphBuilder(seed=4)
    x = b.input([2, 4, 8, 8])
    hor = b.node("Conv", [x, b.random([4, 4, 1, 3])], pads=[0, 1, 0, 1])
    ver = b.node("Conv", [x, b.random([4, 4, 3, 1])], pads=[1, 0, 1, 0])
    b.output(b.node("Add", [hor, ver], name="sum"))
    refused(tmp_path, b.model(), {"x": np.random.default_rng(4).standard_normal((2, 4, 8, 8)).astype(np.float32)},
            "branch-mismatch")


def test_a_branch_read_elsewhere_stays(tmp_path):
    b = GraphBuilder(seed=5)
    x = b.input([2, 4, 8, 8])
    first = b.node("Conv", [x, b.random([4, 4, 3, 3])], pads=[1, 1, 1, 1])
    second = b.node("Conv", [x, b.random([4, 4, 1, 1])])
    b.output(b.node("Add", [first, second], name="sum"))
    b.output(b.node("Sigmoid", [second]))
    refused(tmp_path, b.model(), {"x": np.random.default_rng(5).standard_normal((2, 4, 8, 8)).astype(np.float32)},
            "fan-out")


def test_no_merge_branches_keeps_them(tmp_path):
    model, feeds = two_branches(lambda b, x: b.node("Conv", [x, b.random([4, 4, 1, 1])]))
    onnx.save(model, tmp_path / "m.onnx")
    result = bnfold.fold(tmp_path / "m.onnx", merge_branches=False)
    assert not [e for e in result.ledger if e.status == "merged"]
    assert count_ops(result.to_proto(), "Conv") == 2
    assert count_ops(bnfold.fold(tmp_path / "m.onnx").to_proto(), "Conv") == 1


def test_inspect_plans_as_fold_does_with_and_without_merges(tmp_path):
    """inspect reports the plan fold carries out, --no-merge-branches included."""
    from cli_runner import invoke

    model, _ = two_branches(lambda b, x: b.bn(b.node("Conv", [x, b.random([4, 4, 1, 1])], name="one"), 4,
                                              name="the_bn"))
    onnx.save(model, tmp_path / "m.onnx")
    dense = next(n.name for n in model.graph.node if n.op_type == "Conv" and n.name != "one")
    for flags, into in (([], dense), (["--no-merge-branches"], "one")):
        report = tmp_path / "inspect.json"
        result = invoke("inspect", tmp_path / "m.onnx", "--json", report, "-q", *flags)
        assert result.exit_code == 0, result.output
        (finding,) = json.loads(report.read_text())["findings"]
        (entry,) = [e for e in bnfold.fold(tmp_path / "m.onnx", merge_branches=not flags).ledger
                    if e.node == "the_bn"]
        assert entry.into == into  # the BN went into its branch's conv, which the merge made the 3x3
        assert f"'{into}'" in finding["plan"]


def test_a_residual_of_another_tensor_is_no_site(tmp_path):
    """``x + conv(relu(x))``: the branches read two tensors, so the sum is not a merge site."""
    model, feeds = two_branches(lambda b, x: b.node("Conv", [b.node("Relu", [x]), b.random([4, 4, 1, 1])]))
    result, _ = fold_and_compare(model, feeds, tmp_path)
    assert not [e for e in result.ledger if e.op == "Add"]


# --- timm's RepVGG in train form against its own reparameterisation ----------------------------


@pytest.mark.slow
def test_timm_repvgg_a0_train_form_folds_to_its_deploy_form(tmp_path):
    timm = C.import_timm()
    from timm.utils.model import reparameterize_model

    torch.manual_seed(0)
    net = timm.create_model("repvgg_a0", pretrained=False, num_classes=10)
    C.rescale_weights(net, 0)
    C.randomize_bn(net, 0)
    net.eval()
    deploy = reparameterize_model(copy.deepcopy(net))
    example = torch.randn(2, 3, 32, 32)
    C.export_torch(net, example, tmp_path / "train.onnx", C.TS, True)
    C.export_torch(deploy, example, tmp_path / "deploy.onnx", C.TS, True)
    result = bnfold.fold(tmp_path / "train.onnx")
    result.save(tmp_path / "folded.onnx")
    train, deployed, folded = (onnx.load(tmp_path / f"{n}.onnx") for n in ("train", "deploy", "folded"))
    assert count_ops(folded, "Conv") == count_ops(deployed, "Conv") < count_ops(train, "Conv")
    assert count_ops(folded, "BatchNormalization") == count_ops(deployed, "BatchNormalization") == 0
    assert count_ops(folded, "Add") == count_ops(deployed, "Add") == 0
    feeds = {C.INPUT: example.numpy()}
    expected = run(tmp_path / "train.onnx", feeds)[0]
    scale = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(run(tmp_path / "folded.onnx", feeds)[0], expected, rtol=1e-4, atol=1e-5 * scale)
    np.testing.assert_allclose(run(tmp_path / "deploy.onnx", feeds)[0], expected, rtol=1e-4, atol=1e-5 * scale)


def test_planning_a_merge_computes_no_folded_weight(tmp_path, monkeypatch):
    """Folded and merged weights are computed while saving, block by block (a big model's
    peak memory is a few tensors): planning a merge of conv-BN branches must not compute
    the branches' folded weights."""
    from bnfold.engine import run
    from bnfold.folded import FoldedTensor, MergedTensor
    from bnfold.load import load_source

    b = GraphBuilder(seed=7)
    x = b.input([2, 4, 8, 8])
    dense = b.bn(b.node("Conv", [x, b.random([4, 4, 3, 3])], pads=[1, 1, 1, 1]), 4)
    one = b.bn(b.node("Conv", [x, b.random([4, 4, 1, 1])]), 4)
    b.output(b.node("Add", [b.node("Add", [dense, one]), b.bn(x, 4)]))
    onnx.save(b.model(), tmp_path / "m.onnx")
    computed = []
    for cls in (FoldedTensor, MergedTensor):
        original = cls._compute
        monkeypatch.setattr(cls, "_compute", lambda self, original=original: computed.append(self) or original(self))
    _, ledger = run(load_source(tmp_path / "m.onnx"))
    assert [e.status for e in ledger if e.op == "Add"] == ["merged"]
    assert computed == []


# --- sums that are no merge of linear branches, and more refusals ----------------------------


@pytest.mark.parametrize("other", ["x*x", "2/x", "training-dropout", "sum-with-a-constant"])
def test_a_branch_that_is_no_linear_map_of_x_makes_no_merge_site(tmp_path, other):
    """``conv(x) + x*x`` (and ``2/x``, a training-mode Dropout of x, ``Sum(x, c)``) is no sum
    of linear branches the merge knows: no ledger entry at all, as for a Relu branch, and
    certainly not "fan-out: read elsewhere" (that branch is read by the sum alone)."""
    def second(b, x):
        return {"x*x": lambda: b.node("Mul", [x, x]), "2/x": lambda: b.node("Div", [b.const(np.float32(2.0)), x]),
                "training-dropout": lambda: b.node("Dropout", [x, b.const(np.array(0.0, np.float32)),
                                                               b.const(np.array(True))]),
                "sum-with-a-constant": lambda: b.node("Sum", [x, b.const(np.float32(0.5))])}[other]()
    model, feeds = two_branches(second)
    result, folded = fold_and_compare(model, feeds, tmp_path)
    assert not [e for e in result.ledger if e.op == "Add"], [(e.reason, e.detail) for e in result.ledger]
    assert count_ops(folded, "Conv") == 1 and count_ops(folded, "Add") == 1


def merged(tmp_path, model, feeds, pattern: str | None = None):
    result, folded = fold_and_compare(model, feeds, tmp_path)
    entries = [e for e in result.ledger if e.status == "merged"]
    assert len(entries) == 1, [(e.op, e.status, e.reason, e.detail) for e in result.ledger]
    if pattern is not None:
        assert entries[0].pattern == pattern
    assert count_ops(folded, "Conv") == 1 and count_ops(folded, "Add") + count_ops(folded, "Sub") == 0
    return entries[0]


@pytest.mark.parametrize("second, pattern", [
    (lambda b, x: b.node("Identity", [x]), "merge(3x3+identity)"),
    (lambda b, x: b.node("Neg", [b.node("Conv", [x, b.random([4, 4, 1, 1])])]), "merge(3x3+1x1)"),
    (lambda b, x: b.node("Add", [x, b.const(np.arange(4, dtype=np.float32).reshape(1, 4, 1, 1))]),
     "merge(3x3+identity)"),
    (lambda b, x: b.node("Sub", [b.const(np.float32(0.25)), x]), "merge(3x3+identity)"),
    (lambda b, x: b.node("Sub", [x, b.const(np.float32(0.25))]), "merge(3x3+identity)"),
    (lambda b, x: b.node("Div", [x, b.const(np.array([2.0, -4.0, 0.5, 8.0], np.float32).reshape(1, 4, 1, 1))]),
     "merge(3x3+identity)"),
    (lambda b, x: b.node("Conv", [x, b.random([4, 4, 1, 1])], auto_pad="VALID"), "merge(3x3+1x1)"),
    (lambda b, x: b.node("Identity", [b.node("Conv", [x, b.random([4, 4, 1, 1])])]), "merge(3x3+1x1)"),
], ids=["identity", "neg-conv", "x-plus-c", "c-minus-x", "x-minus-c", "x-over-c", "valid-1x1", "identity-of-a-conv"])
def test_linear_branches_of_every_form_merge(tmp_path, second, pattern):
    """Identity, negation, ``x + c``, ``c - x``, ``x - c``, ``x / c``: each is a linear map of
    x, so ``conv3x3(x) + branch`` is one conv (checked in onnxruntime)."""
    model, feeds = two_branches(second)
    merged(tmp_path, model, feeds, pattern)


def nested(outer_other, inner_other):
    """``(conv3x3(x) + inner) + outer``: two sums, the inner one's expression inside the outer's."""
    b = GraphBuilder(seed=20)
    x = b.input([2, 4, 8, 8])
    first = b.node("Conv", [x, b.random([4, 4, 3, 3])], pads=[1, 1, 1, 1], name="first")
    inner = b.node("Add", [first, inner_other(b, x)], name="inner")
    b.output(b.node("Add", [inner, outer_other(b, x)], name="outer"))
    return b.model(), {"x": np.random.default_rng(20).standard_normal((2, 4, 8, 8)).astype(np.float32)}


def test_a_sum_above_that_cannot_merge_leaves_the_one_below_to_merge(tmp_path):
    grouped = lambda b, x: b.node("Conv", [x, b.random([4, 1, 3, 3])], pads=[1, 1, 1, 1], group=4)  # noqa: E731
    one = lambda b, x: b.node("Conv", [x, b.random([4, 4, 1, 1])])  # noqa: E731
    model, feeds = nested(grouped, one)
    result, folded = fold_and_compare(model, feeds, tmp_path)
    assert [(e.node, e.status, e.reason) for e in result.ledger if e.op == "Add"] == [
        ("inner", "merged", None), ("outer", "kept", "branch-mismatch")]
    assert count_ops(folded, "Conv") == 2


def test_when_no_sum_can_merge_only_the_largest_says_why(tmp_path):
    """Both sums refuse: the ledger names the refusal once, at the outer sum, whose
    expression holds the inner one."""
    grouped = lambda b, x: b.node("Conv", [x, b.random([4, 1, 3, 3])], pads=[1, 1, 1, 1], group=4)  # noqa: E731
    dilated = lambda b, x: b.node("Conv", [x, b.random([4, 4, 3, 3])], pads=[2, 2, 2, 2],  # noqa: E731
                                  dilations=[2, 2])
    model, feeds = nested(grouped, dilated)
    result, _ = fold_and_compare(model, feeds, tmp_path)
    assert [(e.node, e.status, e.reason) for e in result.ledger if e.op == "Add"] == [
        ("outer", "kept", "branch-mismatch")]


def shaped(second, opset: int = 17, seed: int = 26):
    """``conv3x3(x) + second(b, x)`` with the sum's shape given (inference cannot give it)."""
    b = GraphBuilder(seed=seed)
    x = b.input([2, 4, 8, 8])
    first = b.node("Conv", [x, b.random([4, 4, 3, 3])], pads=[1, 1, 1, 1])
    b.output(b.node("Add", [first, second(b, x)], name="sum"), shape=[2, 4, 8, 8])
    return b.model(opset), {"x": np.random.default_rng(seed).standard_normal((2, 4, 8, 8)).astype(np.float32)}


def tiny(second, seed=21, channels=4, shape=(2, 4, 1, 1), first_attrs=None):
    """``conv1x1(x) + second(b, x)`` on a 1x1 map, where strides change no output size."""
    b = GraphBuilder(seed=seed)
    x = b.input(list(shape))
    first = b.node("Conv", [x, b.random([channels, shape[1], 1, 1])], **(first_attrs or {}))
    b.output(b.node("Add", [first, second(b, x)], name="sum"))
    return b.model(), {"x": np.random.default_rng(seed).standard_normal(shape).astype(np.float32)}


@pytest.mark.parametrize("build, reason", [
    (lambda: tiny(lambda b, x: x, shape=(2, 1, 1, 1)), "branch-mismatch"),  # x broadcast over 4 channels
    (lambda: tiny(lambda b, x: b.node("Conv", [x, b.random([1, 4, 1, 1])])), "branch-mismatch"),  # 1 vs 4 channels
    (lambda: tiny(lambda b, x: b.node("Conv", [x, b.random([4, 4, 1, 1])], strides=[2, 2])), "branch-mismatch"),
    (lambda: tiny(lambda b, x: x, first_attrs={"strides": [2, 2]}), "branch-mismatch"),  # identity at stride 2
    (lambda: tiny(lambda b, x: b.node("AveragePool", [x], kernel_shape=[1, 1], strides=[2, 2])), "branch-mismatch"),
    (lambda: two_branches(lambda b, x: b.node("Mul", [x, b.const(np.array([1, np.nan, 1, 1], np.float32)
                                                                .reshape(1, 4, 1, 1))])), "non-finite-params"),
    (lambda: two_branches(lambda b, x: b.node("Div", [x, b.const(np.array([1, 0, 1, 1], np.float32)
                                                                .reshape(1, 4, 1, 1))])), "non-finite-params"),
    (lambda: shaped(lambda b, x: b.node("BatchNormalization", [x, *b.bn_params(4)], n_out=3, training_mode=1)[0]),
     "training-mode"),
    (lambda: shaped(lambda b, x: b.node("AveragePool", [x], kernel_shape=[3, 3], pads=[2, 2, 2, 2],
                                        count_include_pad=1, dilations=[2, 2]), opset=19), "branch-mismatch"),
], ids=["identity-broadcast", "fewer-channels", "strides", "identity-stride-2", "pool-strides", "nan-scale",
        "division-by-zero", "training-bn", "dilated-pool"])
def test_more_branches_that_are_not_one_conv_stay(tmp_path, build, reason):
    model, feeds = build()
    refused(tmp_path, model, feeds, reason)


def test_a_pool_inside_a_dilated_kernel_stays(tmp_path):
    """An average pool's window is contiguous; a dilated 3x3 conv's taps are not."""
    b = GraphBuilder(seed=23)
    x = b.input([2, 4, 8, 8])
    first = b.node("Conv", [x, b.random([4, 4, 3, 3])], pads=[2, 2, 2, 2], dilations=[2, 2])
    pool = b.node("AveragePool", [x], kernel_shape=[3, 3], pads=[1, 1, 1, 1], count_include_pad=1)
    b.output(b.node("Add", [first, pool], name="sum"))
    refused(tmp_path, b.model(), {"x": np.random.default_rng(23).standard_normal((2, 4, 8, 8)).astype(np.float32)},
            "branch-mismatch")


@pytest.mark.parametrize("pads, reason", [({"auto_pad": "SAME_UPPER"}, "unknown-rank"),
                                          ({"pads": [0, 0, 1, 1]}, "branch-mismatch")])
def test_windows_over_a_map_of_unknown_size(tmp_path, pads, reason):
    """tf2onnx's stride-2 SAME block on an input of unknown height and width: SAME padding
    cannot be resolved, and explicit (0, 1) pads against none give outputs of one size only
    for some sizes: both stay."""
    b = GraphBuilder(seed=24)
    x = b.input(["N", 3, "H", "W"])
    big = b.node("Conv", [x, b.random([8, 3, 3, 3])], strides=[2, 2], **pads)
    small = b.node("Conv", [x, b.random([8, 3, 1, 1])], strides=[2, 2],
                   **({"auto_pad": "SAME_UPPER"} if "auto_pad" in pads else {}))
    b.output(b.node("Add", [big, small], name="sum"), shape=["N", 8, "h", "w"])
    refused(tmp_path, b.model(), {"x": np.random.default_rng(24).standard_normal((2, 3, 16, 16)).astype(np.float32)},
            reason)


def test_a_branch_through_another_op_before_its_conv_is_no_merge(tmp_path):
    """``conv3x3(x) + conv1x1(relu(conv1x1(x)))``: the second branch is no linear map of x."""
    model, feeds = two_branches(lambda b, x: b.node("Conv", [b.node("Relu", [b.node("Conv", [
        x, b.random([4, 4, 1, 1])])]), b.random([4, 4, 1, 1])]))
    result, _ = fold_and_compare(model, feeds, tmp_path)
    assert not [e for e in result.ledger if e.op == "Add"]


def test_two_convs_in_a_row_through_a_pad_stay(tmp_path):
    """DBB's ``1x1 -> Pad -> kxk`` branch: two convs in sequence, no single kernel."""
    model, feeds = two_branches(lambda b, x: b.node("Conv", [b.node("Pad", [b.node("Identity", [b.node("Conv", [
        x, b.random([4, 4, 1, 1])])]), b.const(np.array([0, 0, 1, 1, 0, 0, 1, 1]))]), b.random([4, 4, 3, 3])]))
    refused(tmp_path, model, feeds, "sequential-branch")


def test_a_branch_kernel_with_nan_stays(tmp_path):
    model, feeds = two_branches(lambda b, x: b.node("Conv", [x, b.const(np.full((4, 4, 1, 1), np.nan, np.float32))]))
    refused(tmp_path, model, feeds, "non-finite-params")


def test_a_merged_float16_kernel_that_may_overflow_stays(tmp_path):
    """Each branch fits float16, their sum (up to 80000) would not: kept."""
    b = GraphBuilder(dtype=np.float16, seed=25)
    x = b.input([1, 2, 4, 4])
    first = b.node("Conv", [x, b.const(np.full((2, 2, 3, 3), 40000, np.float16))], pads=[1, 1, 1, 1])
    second = b.node("Conv", [x, b.const(np.full((2, 2, 1, 1), 40000, np.float16))])
    b.output(b.node("Add", [first, second], name="sum"))
    onnx.save(b.model(), tmp_path / "m.onnx")
    result = bnfold.fold(tmp_path / "m.onnx")
    assert [(e.status, e.reason) for e in result.ledger if e.op == "Add"] == [("kept", "dtype-overflow")]


# --- merge.py survivors (issue 27): each case decides a merge or a refusal ----------------------


def test_keep_naming_the_sum_keeps_the_branches_apart(tmp_path):
    """``--keep sum``: the merge that would happen is not made, and says so."""
    model, feeds = two_branches(lambda b, x: b.node("Conv", [x, b.random([4, 4, 1, 1])]))
    onnx.save(model, tmp_path / "in.onnx")
    result = bnfold.fold(tmp_path / "in.onnx", keep=frozenset({"sum"}))
    result.save(tmp_path / "out.onnx")
    (entry,) = [e for e in result.ledger if e.op == "Add"]
    assert (entry.node, entry.status, entry.reason) == ("sum", "kept", "kept-on-request")
    assert entry.detail.startswith("--keep sum") and entry.detail.endswith(": the branches stay apart")
    folded = onnx.load(tmp_path / "out.onnx")
    assert count_ops(folded, "Conv") == 2 and count_ops(folded, "Add") == 1
    np.testing.assert_allclose(run(tmp_path / "out.onnx", feeds)[0], run(model, feeds)[0], rtol=1e-5, atol=1e-6)


def test_a_sum_behind_an_average_pool_is_no_sum_above(tmp_path):
    """``AvgPool(conv3x3(x) + grouped3x3(x)) + y / c`` (c holding a 0): the outer sum reads the inner one
    through an average pool, which ends the inner expression: the inner sum reports its own
    refusal (the outer one's refusal does not hide it)."""
    b = GraphBuilder(seed=30)
    x = b.input([2, 4, 8, 8])
    y = b.input([2, 4, 8, 8], name="y")
    first = b.node("Conv", [x, b.random([4, 4, 3, 3])], pads=[1, 1, 1, 1])
    grouped = b.node("Conv", [x, b.random([4, 1, 3, 3])], pads=[1, 1, 1, 1], group=4)
    inner = b.node("Add", [first, grouped], name="inner")
    pool = b.node("AveragePool", [inner], kernel_shape=[1, 1])
    halved = b.node("Div", [y, b.const(np.array([1, 0, 1, 1], np.float32).reshape(1, 4, 1, 1))])
    b.output(b.node("Add", [pool, halved], name="outer"))
    onnx.save(b.model(), tmp_path / "m.onnx")
    result = bnfold.fold(tmp_path / "m.onnx")
    assert [(e.node, e.status, e.reason) for e in result.ledger if e.op == "Add"] == [
        ("inner", "kept", "branch-mismatch"), ("outer", "kept", "non-finite-params")]


def identities(count):
    def build(b, x):
        value = b.node("Conv", [x, b.random([4, 4, 1, 1])])
        for _ in range(count):
            value = b.node("Identity", [value])
        return value
    return build


def test_an_expression_of_max_nodes_merges(tmp_path):
    """``conv3x3(x) + Identity^62(conv1x1(x))``: 64 nodes under the sum, the most a merge reads."""
    from bnfold.merge import MAX_NODES

    model, feeds = two_branches(identities(MAX_NODES - 2))
    merged(tmp_path, model, feeds, "merge(3x3+1x1)")


def test_an_inference_dropout_of_x_is_an_identity_branch(tmp_path):
    model, feeds = two_branches(lambda b, x: b.node("Dropout", [x]))
    merged(tmp_path, model, feeds, "merge(3x3+identity)")


@pytest.mark.parametrize("count, reason", [(7, "sequential-branch"), (8, None)], ids=["7-between", "8-between"])
def test_two_convs_in_a_row_are_seen_through_up_to_8_nodes(tmp_path, count, reason):
    """The sequential-branch refusal looks back 8 producers from the second conv: 7 nodes
    between the two convs are seen through (and refused); with 8 between, the sum is
    simply no merge site (no ledger entry)."""
    model, feeds = two_branches(lambda b, x: b.node("Conv", [identities(count)(b, x), b.random([4, 4, 1, 1])]))
    if reason is None:
        result, _ = fold_and_compare(model, feeds, tmp_path)
        assert not [e for e in result.ledger if e.op == "Add"], [(e.reason, e.detail) for e in result.ledger]
    else:
        refused(tmp_path, model, feeds, reason)


def test_a_conv_of_another_input_is_no_merge_site(tmp_path):
    """``conv3x3(x) + conv1x1(y)``: y is no conv of x, so no site (not "sequential-branch")."""
    b = GraphBuilder(seed=31)
    x = b.input([2, 4, 8, 8])
    y = b.input([2, 4, 8, 8], name="y")
    first = b.node("Conv", [x, b.random([4, 4, 3, 3])], pads=[1, 1, 1, 1])
    b.output(b.node("Add", [first, b.node("Conv", [y, b.random([4, 4, 1, 1])])], name="sum"))
    rng = np.random.default_rng(31)
    feeds = {n: rng.standard_normal((2, 4, 8, 8)).astype(np.float32) for n in ("x", "y")}
    result, _ = fold_and_compare(b.model(), feeds, tmp_path)
    assert not [e for e in result.ledger if e.op == "Add"], [(e.reason, e.detail) for e in result.ledger]


def bn_with(var):
    def build(b, x):
        conv = b.node("Conv", [x, b.random([4, 4, 1, 1])])
        ones = np.ones(4, np.float32)
        return b.node("BatchNormalization", [conv, b.const(ones), b.const(ones * 0.5), b.const(ones * 0.1),
                                             b.const(np.asarray(var, np.float32))])
    return build


def one_channel_plus_bn4():
    """``conv3x3(x)`` with 1 output channel, broadcast against ``BN(x)`` of 4 channels."""
    b = GraphBuilder(seed=32)
    x = b.input([2, 4, 8, 8])
    first = b.node("Conv", [x, b.random([1, 4, 3, 3])], pads=[1, 1, 1, 1])
    second = b.node("BatchNormalization", [x, *b.bn_params(4)])
    b.output(b.node("Add", [first, second], name="sum"))
    return b.model(), {"x": np.random.default_rng(32).standard_normal((2, 4, 8, 8)).astype(np.float32)}


def dilated_pool():
    """A 5x5 conv and a 3x3 pool dilated 2 at stride 3 on 8x8: same output sizes, but the
    pool's taps are not contiguous (were its dilation ignored, 3x3 would look contiguous)."""
    b = GraphBuilder(seed=33)
    x = b.input([2, 4, 8, 8])
    first = b.node("Conv", [x, b.random([4, 4, 5, 5])], strides=[3, 3])
    pool = b.node("AveragePool", [x], kernel_shape=[3, 3], strides=[3, 3], dilations=[2, 2])
    b.output(b.node("Add", [first, pool], name="sum"), shape=[2, 4, 2, 2])
    return b.model(19), {"x": np.random.default_rng(33).standard_normal((2, 4, 8, 8)).astype(np.float32)}


def ceil_pool():
    """A 3x3 pool at stride 2 with ceil_mode: its last window overhangs the padding; the
    conv beside it pads (1, 2) so their outputs have one size."""
    b = GraphBuilder(seed=34)
    x = b.input([2, 4, 8, 8])
    first = b.node("Conv", [x, b.random([4, 4, 3, 3])], strides=[2, 2], pads=[1, 1, 2, 2])
    pool = b.node("AveragePool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1,
                  count_include_pad=1)
    b.output(b.node("Add", [first, pool], name="sum"), shape=[2, 4, 5, 5])
    return b.model(), {"x": np.random.default_rng(34).standard_normal((2, 4, 8, 8)).astype(np.float32)}


@pytest.mark.parametrize("build, reason", [
    (lambda: two_branches(bn_with([1, -1, 1, 1])), "negative-variance"),
    (lambda: one_channel_plus_bn4(), "branch-mismatch"),
    (dilated_pool, "branch-mismatch"),
    (ceil_pool, "avgpool-borders"),
], ids=["negative-variance", "bn-of-4-against-1-channel", "dilated-pool-stride-3", "ceil-mode-pool"])
def test_more_survivor_refusals(tmp_path, build, reason):
    model, feeds = build()
    refused(tmp_path, model, feeds, reason)


def same_padded(kernel, auto_pad="SAME_UPPER"):
    """A kxk and a 1x1 conv, both SAME_UPPER (or SAME_LOWER) at stride 1 on 8x8: pads (k//2, k//2)."""
    def build():
        b = GraphBuilder(seed=35)
        x = b.input([2, 4, 8, 8])
        big = b.node("Conv", [x, b.random([4, 4, kernel, kernel])], auto_pad=auto_pad)
        small = b.node("Conv", [x, b.random([4, 4, 1, 1])], auto_pad=auto_pad)
        b.output(b.node("Add", [big, small], name="sum"))
        return b.model(), {"x": np.random.default_rng(35).standard_normal((2, 4, 8, 8)).astype(np.float32)}
    return build


def dilated_3x3():
    """A 3x3 conv dilated 2 (pads 2) and a 1x1: the 1x1 lands on the centre tap."""
    b = GraphBuilder(seed=36)
    x = b.input([2, 4, 8, 8])
    big = b.node("Conv", [x, b.random([4, 4, 3, 3])], pads=[2, 2, 2, 2], dilations=[2, 2])
    b.output(b.node("Add", [big, b.node("Conv", [x, b.random([4, 4, 1, 1])])], name="sum"))
    return b.model(), {"x": np.random.default_rng(36).standard_normal((2, 4, 8, 8)).astype(np.float32)}


@pytest.mark.parametrize("build, pattern", [
    (same_padded(5), "merge(5x5+1x1)"),
    (same_padded(5, "SAME_LOWER"), "merge(5x5+1x1)"),
    (dilated_3x3, "merge(3x3+1x1)"),
], ids=["same-upper-5x5", "same-lower-5x5", "dilated-3x3"])
def test_more_survivor_merges(tmp_path, build, pattern):
    model, feeds = build()
    merged(tmp_path, model, feeds, pattern)


def test_each_output_channel_bounds_its_own_float16_kernel(tmp_path):
    """Channel 0's 3x3 and channel 1's 1x1 each peak at 40000: per channel the merged kernel
    fits float16 (40000 + 1), though the two peaks together would not: merged."""
    b = GraphBuilder(dtype=np.float16, seed=37)
    x = b.input([1, 2, 4, 4])
    big = np.zeros((2, 2, 3, 3), np.float16)
    big[0, 0, 0, 0] = 40000
    big[1, 1, 1, 1] = 1
    small = np.zeros((2, 2, 1, 1), np.float16)
    small[1, 0, 0, 0] = 40000
    small[0, 1, 0, 0] = 1
    first = b.node("Conv", [x, b.const(big)], pads=[1, 1, 1, 1])
    b.output(b.node("Add", [first, b.node("Conv", [x, b.const(small)])], name="sum"))
    feeds = {"x": (np.random.default_rng(37).standard_normal((1, 2, 4, 4)) * 1e-3).astype(np.float16)}
    result, _ = fold_and_compare(b.model(), feeds, tmp_path, rtol=1e-2, atol=1e-1)
    assert [(e.status, e.reason) for e in result.ledger if e.op == "Add"] == [("merged", None)]


def test_a_float16_identity_that_overflows_the_kernel_centre_stays(tmp_path):
    """A 3x3 whose centre is 65000 plus ``1000 * x``: the merged centre, 66000, is no float16."""
    b = GraphBuilder(dtype=np.float16, seed=38)
    x = b.input([1, 2, 4, 4])
    w = np.zeros((2, 2, 3, 3), np.float16)
    w[0, 0, 1, 1] = 65000
    first = b.node("Conv", [x, b.const(w)], pads=[1, 1, 1, 1])
    b.output(b.node("Add", [first, b.node("Mul", [x, b.const(np.float16(1000))])], name="sum"))
    onnx.save(b.model(), tmp_path / "m.onnx")
    result = bnfold.fold(tmp_path / "m.onnx")
    assert [(e.status, e.reason) for e in result.ledger if e.op == "Add"] == [("kept", "dtype-overflow")]


def tf_same_of_unknown_rank():
    """tf2onnx's stride-2 block, explicit pads (0, 1) against none, on an input of unknown rank."""
    b = GraphBuilder(seed=39)
    x = b.input(None)
    big = b.node("Conv", [x, b.random([8, 3, 3, 3])], strides=[2, 2], pads=[0, 0, 1, 1])
    small = b.node("Conv", [x, b.random([8, 3, 1, 1])], strides=[2, 2])
    b.output(b.node("Add", [big, small], name="sum"))
    return b.model(), {"x": np.random.default_rng(39).standard_normal((2, 3, 16, 16)).astype(np.float32)}


def dbb_through_a_custom_identity():
    """``1x1 -> custom-domain Identity -> kxk``: a custom op (named like a standard one) may
    compute anything, so the kxk conv reads no known conv of x: no merge site at all."""
    model, feeds = two_branches(lambda b, x: b.node("Conv", [b.node("Identity", [b.node("Conv", [
        x, b.random([4, 4, 1, 1])])]), b.random([4, 4, 3, 3])], pads=[1, 1, 1, 1]))
    next(n for n in model.graph.node if n.op_type == "Identity").domain = "XXai.onnxXX"
    model.opset_import.append(oh.make_opsetid("XXai.onnxXX", 1))
    return model, feeds


def test_two_convs_through_a_custom_op_are_no_merge_site(tmp_path):
    model, _ = dbb_through_a_custom_identity()
    onnx.save(model, tmp_path / "m.onnx")
    result = bnfold.fold(tmp_path / "m.onnx")
    assert not [e for e in result.ledger if e.op == "Add"], [(e.reason, e.detail) for e in result.ledger]


@pytest.mark.parametrize("build, reason", [
    (tf_same_of_unknown_rank, "branch-mismatch"),
], ids=["end-pads-on-unknown-rank"])
def test_more_survivor_refusals_on_graphs_the_checker_rejects(tmp_path, build, reason):
    """The full checker rejects an input of no shape, so this is checked on the plan: kept,
    with the reason, every conv left."""
    model, _ = build()
    onnx.save(model, tmp_path / "m.onnx")
    result = bnfold.fold(tmp_path / "m.onnx")
    kept = [(e.status, e.reason) for e in result.ledger if e.op == "Add"]
    assert kept == [("kept", reason)], [(e.reason, e.detail) for e in result.ledger]
    assert count_ops(result.to_proto(), "Conv") == count_ops(model, "Conv")


@pytest.mark.parametrize("attrs", [{"dilations": [1]}, {"strides": [1, 1, 1]}], ids=["dilations", "strides"])
def test_a_branch_attribute_of_the_wrong_length_is_refused(tmp_path, attrs):
    """A 2-D conv with one dilation (or three strides) is no model onnxruntime runs; the merge
    refuses it as a mismatch rather than guessing or failing."""
    model, _ = two_branches(lambda b, x: b.node("Conv", [x, b.random([4, 4, 1, 1])], **attrs))
    onnx.save(model, tmp_path / "m.onnx")
    result = bnfold.fold(tmp_path / "m.onnx")
    assert [(e.status, e.reason) for e in result.ledger if e.op == "Add"] == [("kept", "branch-mismatch")]


def test_keep_names_each_kept_node_once(tmp_path):
    """The sum is both the site and one of the merge's nodes: ``--keep sum`` names it once."""
    model, _ = two_branches(lambda b, x: b.node("Conv", [x, b.random([4, 4, 1, 1])]))
    onnx.save(model, tmp_path / "in.onnx")
    (entry,) = [e for e in bnfold.fold(tmp_path / "in.onnx", keep=frozenset({"sum"})).ledger if e.op == "Add"]
    assert entry.detail == "--keep sum: the branches stay apart"
