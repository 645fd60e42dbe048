"""README "When you need bnfold": what torch's exporters leave of BatchNormalization.

Every row of the README's table is exported here as written (the network named in its
first cell, each ``torch.onnx.export`` option set of its second cell) and both counts
are checked: the BNs in the file and the BNs ``bnfold.fold`` folds. The README's other
claims about exports are checked too: training-form exports are flagged and converted,
``export_modules_as_functions`` keeps BNs inside functions (reason
``non-constant-params``) until the functions are inlined.
"""

from __future__ import annotations

import re
from pathlib import Path

import onnx
import pytest

import bnfold

pytestmark = pytest.mark.train
torch = pytest.importorskip("torch")
nn = torch.nn

README = Path(__file__).resolve().parent.parent / "README.md"


class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)

    def forward(self, x):
        return torch.relu(self.b2(self.c2(torch.relu(self.b1(self.c1(x))))))


class LinearBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear, self.bn = nn.Linear(16, 8), nn.BatchNorm1d(8)

    def forward(self, x):
        return self.bn(self.linear(x))


class BNLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn, self.linear = nn.BatchNorm1d(16), nn.Linear(16, 8)

    def forward(self, x):
        return self.linear(self.bn(x))


class ConcatBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 1), nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn(torch.cat([self.a(x), self.b(x)], 1))


NETWORKS = {
    "Conv → BN → ReLU, twice (ResNet-style)": (ConvBN, (2, 3, 8, 8)),
    "Linear → BatchNorm1d": (LinearBN, (2, 16)),
    "BatchNorm1d → Linear": (BNLinear, (2, 16)),
    "Concat(Conv, Conv) → BN": (ConcatBN, (2, 3, 8, 8)),
}


def readme_rows() -> list[tuple[str, dict, int, int]]:
    """(network, export options, BN in the file, BN folded), one per option set of each row."""
    text = README.read_text().split("## When you need bnfold\n", 1)[1].split("\n## ", 1)[0]
    table = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| ---")][1:]
    rows = []
    for line in table:
        network, options, left, folded = (cell.strip() for cell in line.strip("|").split("|"))
        for option_set in re.findall(r"`([^`]+)`", options):
            kwargs = eval(f"dict({option_set})", {"TrainingMode": torch.onnx.TrainingMode})  # the README's own text
            rows.append((network, kwargs, int(left), int(folded)))
    return rows


ROWS = readme_rows()


def export(net_cls, shape, path: Path, train: bool = False, **kwargs) -> onnx.ModelProto:
    from bnfold.train.export import quiet

    torch.manual_seed(0)
    net = net_cls()
    for module in net.modules():  # statistics a trained net would have
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
    net.train(train)
    with quiet():
        torch.onnx.export(net, (torch.randn(*shape),), str(path), **kwargs)
    return onnx.load(str(path))


def bn_count(model: onnx.ModelProto) -> int:
    nodes = [*model.graph.node, *(n for f in model.functions for n in f.node)]
    return sum(n.op_type == "BatchNormalization" for n in nodes)


def test_the_table_covers_every_network_and_both_exporters():
    assert {network for network, *_ in ROWS} == set(NETWORKS)
    assert {kwargs["dynamo"] for _, kwargs, *_ in ROWS} == {False, True}


@pytest.mark.parametrize("network, kwargs, left, folded", ROWS,
                         ids=[f"{n.split()[0]}-{','.join(f'{k}={v}' for k, v in kw.items())}" for n, kw, *_ in ROWS])
def test_what_each_export_keeps(network, kwargs, left, folded, tmp_path):
    net_cls, shape = NETWORKS[network]
    model = export(net_cls, shape, tmp_path / "m.onnx", **kwargs)
    assert bn_count(model) == left
    result = bnfold.fold(tmp_path / "m.onnx")
    assert result.ledger.summary()["folded"] == folded


def test_a_training_form_export_is_flagged_and_converted(tmp_path):
    export(ConvBN, (2, 3, 8, 8), tmp_path / "t.onnx", dynamo=False, training=torch.onnx.TrainingMode.TRAINING)
    findings = bnfold.inspect(tmp_path / "t.onnx")
    assert len(findings) == 2 and all("training-mode" in f.problems for f in findings)
    assert bnfold.fold(tmp_path / "t.onnx").ledger.summary()["folded"] == 0
    from bnfold.engine import FoldOptions

    assert bnfold.fold(tmp_path / "t.onnx", FoldOptions(to_inference=True)).ledger.summary()["folded"] == 2


def test_modules_exported_as_functions_fold_once_inlined(tmp_path):
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)

        def forward(self, x):
            return torch.relu(self.bn(self.conv(x)))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = Block()

        def forward(self, x):
            return self.block(x)

    model = export(Net, (2, 3, 8, 8), tmp_path / "f.onnx", dynamo=False, opset_version=17,
                   training=torch.onnx.TrainingMode.PRESERVE, export_modules_as_functions={Block})
    assert [f.name for f in model.functions] == ["Block"] and bn_count(model) == 1
    (entry,) = bnfold.fold(tmp_path / "f.onnx").ledger
    assert entry.status == "kept" and entry.reason == "non-constant-params"
    import onnx.inliner

    onnx.save(onnx.inliner.inline_local_functions(model), tmp_path / "inlined.onnx")
    assert bnfold.fold(tmp_path / "inlined.onnx").ledger.summary()["folded"] == 1
