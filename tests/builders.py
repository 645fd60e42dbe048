"""Small ONNX graphs for the tests, built with onnx.helper, and an ORT runner.

The runner always uses ORT_DISABLE_ALL: with optimisations on, onnxruntime fuses
Conv+BN itself and a comparison against the folded model would prove nothing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as onh
import onnxruntime as ort

import bnfold

NP_TO_ONNX = {
    np.dtype(np.float32): onnx.TensorProto.FLOAT,
    np.dtype(np.float64): onnx.TensorProto.DOUBLE,
    np.dtype(np.float16): onnx.TensorProto.FLOAT16,
    np.dtype(np.int64): onnx.TensorProto.INT64,
}


class GraphBuilder:
    """Collects nodes and initializers; names are generated so tests stay short."""

    def __init__(self, dtype=np.float32, seed: int = 0):
        self.dtype = np.dtype(dtype)
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._count = 0

    def name(self, base: str) -> str:
        self._count += 1
        return f"{base}{self._count}"

    def const(self, array, base: str = "c") -> str:
        name = self.name(base)
        self.initializers.append(onh.from_array(np.asarray(array), name))
        return name

    def random(self, shape, base: str = "w", scale: float = 0.5) -> str:
        return self.const((self.rng.standard_normal(shape) * scale).astype(self.dtype), base)

    def input(self, shape, name: str = "x", dtype=None) -> str:
        elem = NP_TO_ONNX[np.dtype(dtype or self.dtype)]
        self.inputs.append(oh.make_tensor_value_info(name, elem, shape))
        return name

    def output(self, name: str, shape=None, dtype=None) -> None:
        elem = NP_TO_ONNX[np.dtype(dtype or self.dtype)]
        self.outputs.append(oh.make_tensor_value_info(name, elem, shape))

    def node(self, op: str, inputs, n_out: int = 1, name: str | None = None, **attrs) -> str | list[str]:
        outs = [self.name(f"{op.lower()}_out") for _ in range(n_out)]
        self.nodes.append(oh.make_node(op, list(inputs), outs, name=name or self.name(op), **attrs))
        return outs[0] if n_out == 1 else outs

    def bn_params(self, channels: int, var_low: float = 0.1) -> list[str]:
        r = self.rng
        return [
            self.const((r.uniform(0.5, 2.0, channels) * r.choice([-1, 1], channels)).astype(self.dtype), "gamma"),
            self.const(r.standard_normal(channels).astype(self.dtype), "beta"),
            self.const(r.standard_normal(channels).astype(self.dtype), "mean"),
            self.const(r.uniform(var_low, 3.0, channels).astype(self.dtype), "var"),
        ]

    def bn(self, x: str, channels: int, name: str | None = None, epsilon: float = 1e-5, **attrs) -> str:
        return self.node("BatchNormalization", [x, *self.bn_params(channels)], name=name or self.name("bn"),
                         epsilon=epsilon, **attrs)

    def model(self, opset: int = 17, ir_version: int | None = None) -> onnx.ModelProto:
        graph = oh.make_graph(self.nodes, "g", self.inputs, self.outputs, self.initializers)
        model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", opset)])
        model.ir_version = ir_version or min(onnx.IR_VERSION, 9)
        inferred = {v.name: v for v in onnx.shape_inference.infer_shapes(model).graph.output}
        for output in model.graph.output:
            if not output.type.tensor_type.HasField("shape") and output.name in inferred:
                output.CopyFrom(inferred[output.name])
        return model


def run(model: onnx.ModelProto | str | Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Outputs of ``model`` in onnxruntime CPU with all graph optimisations disabled."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    source = str(model) if isinstance(model, (str, Path)) else model.SerializeToString()
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def entries(result, status=None) -> list[tuple]:
    """A fold's ledger as ``(op, status, pattern or reason)``, optionally of one status."""
    return [(e.op, e.status, e.pattern if e.folded else e.reason) for e in result.ledger
            if status is None or e.status == status]


def ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def feeds(b: GraphBuilder, shape, name="x") -> dict[str, np.ndarray]:
    """Random float32 data for input ``name`` from the builder's generator."""
    return {name: b.rng.standard_normal(shape).astype(np.float32)}


def count_ops(model: onnx.ModelProto, op: str) -> int:
    return sum(node.op_type == op for node in model.graph.node)


def fold_and_compare(model: onnx.ModelProto, feeds, tmp_path: Path, rtol=1e-4, atol=1e-5, checked=True, **flags):
    """Fold ``model`` from a file with ``flags`` (FoldOptions fields), check it, run both in
    ORT and assert the outputs match (``checked`` False: inputs or outputs of unknown shape,
    which onnx's checker refuses; onnxruntime still loads both models).

    Returns the FoldResult and the saved folded ModelProto.
    """
    src = tmp_path / "in.onnx"
    out = tmp_path / "out.onnx"
    onnx.save(model, src)
    result = bnfold.fold(src, **flags)
    result.save(out)
    folded = onnx.load(out)
    if checked:
        onnx.checker.check_model(folded, full_check=True)
    expected = run(src, feeds)
    actual = run(out, feeds)
    assert len(expected) == len(actual)
    for e, a in zip(expected, actual):
        np.testing.assert_allclose(a, e, rtol=rtol, atol=atol)
    assert [o.name for o in folded.graph.output] == [o.name for o in model.graph.output]
    assert real_inputs(folded) == real_inputs(model)
    return result, folded


def real_inputs(model: onnx.ModelProto) -> list[str]:
    """Graph inputs a caller feeds (IR < 4 also lists every initializer as an input)."""
    initializers = {init.name for init in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in initializers]


def external(name: str, dims, offset: int, location: str) -> onnx.TensorProto:
    """A float32 initializer whose data is ``location`` (beside the model) at ``offset``."""
    tensor = onnx.TensorProto(name=name, data_type=onnx.TensorProto.FLOAT, dims=dims)
    tensor.data_location = onnx.TensorProto.EXTERNAL
    nbytes = int(np.prod(dims)) * 4
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(nbytes))):
        tensor.external_data.add(key=key, value=value)
    return tensor
