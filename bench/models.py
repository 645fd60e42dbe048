"""Synthetic benchmark models, built with onnx.helper and numpy (no downloads).

Every model is float32, opset 17, shape-inferred (value_info for every intermediate
tensor, as exporters write it), with random weights of sensible scale (He init) and
random but healthy BatchNormalization statistics, so that the folded model's outputs can
be compared with the original's and inference does not overflow.

- ``resnet50``: the ResNet-50 v1.5 topology (bottlenecks [3, 4, 6, 3], 53 Conv+BN,
  residual Adds, a 2048->1000 Gemm), ~25.5 M parameters, ~98 MiB embedded.
- ``convstack``: ``layers`` x (Conv 3x3 512->512, no bias) + BN + Relu; 40 layers is
  ~360 MiB of weights. Saved twice: embedded, and with one external-data file.
- ``mlp``: Gemm+BN, MatMul+Add+BN and bias-less MatMul+BN blocks of width 1024.
- a model copied from the repository's ``models/`` zoo (real exporter output).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8


@dataclass
class BenchModel:
    """A model file to benchmark, and what the report needs to know about it."""

    key: str
    title: str
    path: Path
    external: bool
    weight_bytes: int
    bn_count: int
    #: Input name -> static shape used for latency runs.
    inputs: dict[str, list[int]] = field(default_factory=dict)
    #: Whether the model is big enough that only a few latency runs are affordable.
    heavy: bool = False

    @property
    def file_bytes(self) -> int:
        total = self.path.stat().st_size
        if self.external:
            total += sum(p.stat().st_size for p in self.path.parent.glob(self.path.name + ".data"))
        return total


class _Builder:
    """Collects nodes and initializers; names follow the PyTorch exporter's style."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.bn_count = 0
        self.weight_bytes = 0

    def init(self, name: str, array: np.ndarray) -> str:
        array = np.ascontiguousarray(array, dtype=np.float32)
        self.inits.append(numpy_helper.from_array(array, name))
        self.weight_bytes += array.nbytes
        return name

    def normal(self, shape, std: float) -> np.ndarray:
        return self.rng.standard_normal(shape, dtype=np.float32) * np.float32(std)

    def node(self, op: str, inputs: list[str], name: str, **attrs) -> str:
        out = f"{name}_out"
        self.nodes.append(helper.make_node(op, inputs, [out], name=name, **attrs))
        return out

    def conv(self, x: str, cin: int, cout: int, k: int, name: str, stride: int = 1, bias: bool = False) -> str:
        weight = self.init(f"{name}.weight", self.normal((cout, cin, k, k), np.sqrt(2.0 / (cin * k * k))))
        inputs = [x, weight]
        if bias:
            inputs.append(self.init(f"{name}.bias", self.normal((cout,), 0.01)))
        return self.node("Conv", inputs, name, kernel_shape=[k, k], strides=[stride, stride],
                         pads=[k // 2] * 4)

    def bn(self, x: str, channels: int, name: str, gamma: tuple[float, float] = (0.5, 1.5)) -> str:
        self.bn_count += 1
        params = [
            self.init(f"{name}.weight", self.rng.uniform(*gamma, channels)),
            self.init(f"{name}.bias", self.normal((channels,), 0.1)),
            self.init(f"{name}.running_mean", self.normal((channels,), 0.1)),
            self.init(f"{name}.running_var", self.rng.uniform(0.5, 1.5, channels)),
        ]
        return self.node("BatchNormalization", [x, *params], name, epsilon=1e-5)

    def relu(self, x: str, name: str) -> str:
        return self.node("Relu", [x], name)

    def model(self, name: str, inputs: dict[str, list[int]], output: str, out_shape: list[int]) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, name,
            [helper.make_tensor_value_info(k, TensorProto.FLOAT, v) for k, v in inputs.items()],
            [helper.make_tensor_value_info(output, TensorProto.FLOAT, out_shape)],
            initializer=self.inits,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                  producer_name="bnfold-bench")
        model.ir_version = IR_VERSION
        # Exporters write value_info for intermediate tensors; so do we (some folds need ranks).
        return onnx.shape_inference.infer_shapes(model)


def resnet50(seed: int = 0) -> tuple[onnx.ModelProto, _Builder]:
    b = _Builder(seed)
    x = b.relu(b.bn(b.conv("input", 3, 64, 7, "conv1", stride=2), 64, "bn1"), "relu")
    x = b.node("MaxPool", [x], "maxpool", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    cin = 64
    for stage, (blocks, width) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512)), start=1):
        for block in range(blocks):
            p = f"layer{stage}.{block}"
            stride = 2 if block == 0 and stage > 1 else 1
            cout = width * 4
            y = b.relu(b.bn(b.conv(x, cin, width, 1, f"{p}.conv1"), width, f"{p}.bn1"), f"{p}.relu1")
            y = b.relu(b.bn(b.conv(y, width, width, 3, f"{p}.conv2", stride=stride), width, f"{p}.bn2"), f"{p}.relu2")
            # Small gammas on the residual branch's last BN, as trained ResNets have
            # (zero-init-residual): activations stay O(1) over the 16 blocks.
            y = b.bn(b.conv(y, width, cout, 1, f"{p}.conv3"), cout, f"{p}.bn3", gamma=(0.05, 0.3))
            if block == 0:
                x = b.bn(b.conv(x, cin, cout, 1, f"{p}.downsample.0", stride=stride), cout, f"{p}.downsample.1")
            x = b.relu(b.node("Add", [y, x], f"{p}.add"), f"{p}.relu3")
            cin = cout
    x = b.node("GlobalAveragePool", [x], "avgpool")
    x = b.node("Flatten", [x], "flatten", axis=1)
    fc_w = b.init("fc.weight", b.normal((1000, 2048), np.sqrt(1.0 / 2048)))
    fc_b = b.init("fc.bias", b.normal((1000,), 0.01))
    out = b.node("Gemm", [x, fc_w, fc_b], "fc", transB=1)
    return b.model("resnet50", {"input": [1, 3, 224, 224]}, out, [1, 1000]), b


def convstack(layers: int = 40, channels: int = 512, spatial: int = 7, seed: int = 1) -> tuple[onnx.ModelProto, _Builder]:
    b = _Builder(seed)
    x = "input"
    for i in range(layers):
        x = b.relu(b.bn(b.conv(x, channels, channels, 3, f"block{i}.conv"), channels, f"block{i}.bn"), f"block{i}.relu")
    shape = [1, channels, spatial, spatial]
    return b.model(f"convstack{layers}", {"input": shape}, x, shape), b


def mlp(layers: int = 16, width: int = 1024, seed: int = 2) -> tuple[onnx.ModelProto, _Builder]:
    """Cycles Gemm(transB=1, bias)+BN, MatMul+Add+BN, MatMul+BN, Gemm(no bias)+BN, each + Relu."""
    b = _Builder(seed)
    x = "input"
    std = np.sqrt(2.0 / width)
    for i in range(layers):
        p = f"fc{i}"
        kind = i % 4
        if kind == 0:
            w = b.init(f"{p}.weight", b.normal((width, width), std))
            y = b.node("Gemm", [x, w, b.init(f"{p}.bias", b.normal((width,), 0.01))], p, transB=1)
        elif kind == 1:
            y = b.node("MatMul", [x, b.init(f"{p}.weight", b.normal((width, width), std))], p)
            y = b.node("Add", [y, b.init(f"{p}.bias", b.normal((width,), 0.01))], f"{p}.add")
        elif kind == 2:
            y = b.node("MatMul", [x, b.init(f"{p}.weight", b.normal((width, width), std))], p)
        else:
            y = b.node("Gemm", [x, b.init(f"{p}.weight", b.normal((width, width), std))], p)
        x = b.relu(b.bn(y, width, f"{p}.bn"), f"{p}.relu")
    return b.model("mlp", {"input": [1, width]}, x, [1, width]), b


def _save(model: onnx.ModelProto, path: Path, external: bool) -> None:
    for stale in (path, path.with_name(path.name + ".data")):
        stale.unlink(missing_ok=True)
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
    else:
        onnx.save_model(model, str(path))


def _zoo_model(repo: Path, name: str, workdir: Path) -> BenchModel:
    """A real exporter's model from models/, with batch 1 for dynamic dimensions."""
    source = repo / "models" / name
    target = workdir / name
    shutil.copyfile(source, target)
    proto = onnx.load(str(target), load_external_data=False)
    inits = {t.name for t in proto.graph.initializer}
    inputs = {
        vi.name: [d.dim_value if d.HasField("dim_value") else 1 for d in vi.type.tensor_type.shape.dim]
        for vi in proto.graph.input if vi.name not in inits
    }
    bn_count = sum(n.op_type == "BatchNormalization" for n in proto.graph.node)
    weight_bytes = sum(numpy_helper.to_array(t).nbytes for t in proto.graph.initializer)
    return BenchModel(key="zoo", title=f"models/{name} (exporter output)", path=target,
                      external=False, weight_bytes=weight_bytes, bn_count=bn_count, inputs=inputs)


#: The keys ``build`` knows, in report order.
MODEL_KEYS = ("resnet50", "convstack", "convstack-ext", "mlp", "zoo")
ZOO_MODEL = "resnet_dynamo18.onnx"


def build(workdir: Path, repo: Path, keys=MODEL_KEYS, stack_layers: int = 40) -> list[BenchModel]:
    """Write the requested models into ``workdir`` and describe them."""
    workdir.mkdir(parents=True, exist_ok=True)
    built: list[BenchModel] = []
    if "resnet50" in keys:
        proto, b = resnet50()
        path = workdir / "resnet50.onnx"
        _save(proto, path, external=False)
        built.append(BenchModel("resnet50", "ResNet-50-shaped Conv+BN, embedded", path, False,
                                b.weight_bytes, b.bn_count, {"input": [1, 3, 224, 224]}))
    if "convstack" in keys or "convstack-ext" in keys:
        proto, b = convstack(layers=stack_layers)
        size = f"{stack_layers}x512ch Conv3x3+BN"
        if "convstack" in keys:
            path = workdir / "convstack.onnx"
            _save(proto, path, external=False)
            built.append(BenchModel("convstack", f"{size}, embedded", path, False, b.weight_bytes,
                                    b.bn_count, {"input": [1, 512, 7, 7]}, heavy=True))
        if "convstack-ext" in keys:
            path = workdir / "convstack_ext.onnx"
            _save(proto, path, external=True)
            built.append(BenchModel("convstack-ext", f"{size}, external data", path, True, b.weight_bytes,
                                    b.bn_count, {"input": [1, 512, 7, 7]}, heavy=True))
        del proto
    if "mlp" in keys:
        proto, b = mlp()
        path = workdir / "mlp.onnx"
        _save(proto, path, external=False)
        built.append(BenchModel("mlp", "MLP 16x1024 Gemm/MatMul+BN, embedded", path, False, b.weight_bytes,
                                b.bn_count, {"input": [1, 1024]}))
    if "zoo" in keys:
        built.append(_zoo_model(repo, ZOO_MODEL, workdir))
    return built


def main(argv: list[str] | None = None) -> int:
    """``python bench/models.py WORKDIR REPORT.json [--keys a,b] [--stack-layers N]``: build, describe as JSON."""
    import argparse
    import json

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("workdir", type=Path)
    parser.add_argument("report", type=Path)
    parser.add_argument("--keys", default=",".join(MODEL_KEYS))
    parser.add_argument("--stack-layers", type=int, default=40)
    args = parser.parse_args(argv)
    repo = Path(__file__).resolve().parent.parent
    models = build(args.workdir, repo, keys=args.keys.split(","), stack_layers=args.stack_layers)
    args.report.write_text(json.dumps([
        {**{k: v for k, v in vars(m).items() if k != "path"}, "path": str(m.path), "file_bytes": m.file_bytes}
        for m in models
    ], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
