"""Small ONNX models built with onnx.helper, shared by tests.

Each builder can emit the original (Conv followed by BatchNormalization) or the same
network folded by hand with numpy (W * s, (B - mean) * s + beta), so a test can check
verification without depending on the folding engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8


@dataclass
class ConvBnParams:
    """Weights of one Conv (any spatial rank) followed by BatchNormalization."""

    weight: np.ndarray
    conv_bias: np.ndarray
    scale: np.ndarray
    beta: np.ndarray
    mean: np.ndarray
    var: np.ndarray
    epsilon: float = 1e-5

    @classmethod
    def random(cls, rng: np.random.Generator, out_channels: int, in_channels: int, kernel: tuple[int, ...]):
        return cls(
            weight=(rng.standard_normal((out_channels, in_channels, *kernel)) * 0.3).astype(np.float32),
            conv_bias=rng.standard_normal(out_channels).astype(np.float32),
            scale=rng.uniform(0.5, 2.0, out_channels).astype(np.float32),
            beta=rng.standard_normal(out_channels).astype(np.float32),
            mean=rng.standard_normal(out_channels).astype(np.float32),
            var=rng.uniform(0.5, 2.0, out_channels).astype(np.float32),
        )

    def folded(self) -> tuple[np.ndarray, np.ndarray]:
        """The Conv weight and bias that compute Conv then BN in one op."""
        factor = self.scale.astype(np.float64) / np.sqrt(self.var.astype(np.float64) + self.epsilon)
        weight = self.weight * factor.reshape(-1, *([1] * (self.weight.ndim - 1)))
        bias = (self.conv_bias - self.mean) * factor + self.beta
        return weight.astype(np.float32), bias.astype(np.float32)


def conv_bn_nodes(prefix: str, source: str, target: str, params: ConvBnParams, folded: bool):
    """Nodes and initializers computing ``target = BN(Conv(source))``, or its folded Conv."""
    if folded:
        weight, bias = params.folded()
        initializers = [numpy_helper.from_array(weight, f"{prefix}_W"), numpy_helper.from_array(bias, f"{prefix}_B")]
        conv = helper.make_node("Conv", [source, f"{prefix}_W", f"{prefix}_B"], [target], name=f"{prefix}_conv")
        return [conv], initializers
    arrays = {
        "W": params.weight,
        "B": params.conv_bias,
        "scale": params.scale,
        "beta": params.beta,
        "mean": params.mean,
        "var": params.var,
    }
    initializers = [numpy_helper.from_array(array, f"{prefix}_{key}") for key, array in arrays.items()]
    nodes = [
        helper.make_node("Conv", [source, f"{prefix}_W", f"{prefix}_B"], [f"{prefix}_conv_out"], name=f"{prefix}_conv"),
        helper.make_node(
            "BatchNormalization",
            [f"{prefix}_conv_out", f"{prefix}_scale", f"{prefix}_beta", f"{prefix}_mean", f"{prefix}_var"],
            [target],
            name=f"{prefix}_bn",
            epsilon=params.epsilon,
        ),
    ]
    return nodes, initializers


def make_model(nodes, initializers, inputs, outputs, opset: int = OPSET) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "test", inputs, outputs, initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="bnfold-tests")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


def conv_bn_model(
    params: ConvBnParams,
    *,
    folded: bool = False,
    input_shape=("N", 3, 8, 8),
    output_shape=("N", 4, 6, 6),
    output_name: str = "y",
) -> onnx.ModelProto:
    """x -> Conv -> BN -> y (or the folded Conv), with a declared, possibly symbolic, input shape."""
    nodes, initializers = conv_bn_nodes("c", "x", output_name, params, folded)
    return make_model(
        nodes,
        initializers,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(input_shape))],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, list(output_shape))],
    )


def two_branch_model(left: ConvBnParams, right: ConvBnParams, *, folded: bool = False) -> onnx.ModelProto:
    """Two inputs, two outputs: ``left = BN(Conv(a))`` and ``total = left + BN(Conv(b))``."""
    left_nodes, left_inits = conv_bn_nodes("l", "a", "left", left, folded)
    right_nodes, right_inits = conv_bn_nodes("r", "b", "right", right, folded)
    nodes = left_nodes + right_nodes + [helper.make_node("Add", ["left", "right"], ["total"])]
    return make_model(
        nodes,
        left_inits + right_inits,
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 3, 8, 8]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", 2, 8, 8]),
        ],
        [
            helper.make_tensor_value_info("left", TensorProto.FLOAT, ["N", 4, 6, 6]),
            helper.make_tensor_value_info("total", TensorProto.FLOAT, ["N", 4, 6, 6]),
        ],
    )


def embedding_model(params: ConvBnParams, table: np.ndarray, *, folded: bool = False) -> onnx.ModelProto:
    """int64 token ids and a bool mask: ``Where(mask, BN(Conv1d(Gather(table, ids))), 0)``.

    ``params`` is a 1-D convolution over the sequence: in_channels = tokens (5),
    kernel 3, over the embedding width (6), giving [N, out_channels, 4].
    """
    nodes, initializers = conv_bn_nodes("c", "embedded", "features", params, folded)
    nodes = [helper.make_node("Gather", ["table", "ids"], ["embedded"])] + nodes
    nodes.append(helper.make_node("Where", ["mask", "features", "zero"], ["y"]))
    initializers += [numpy_helper.from_array(table, "table"), numpy_helper.from_array(np.zeros((), np.float32), "zero")]
    out_channels = params.weight.shape[0]
    return make_model(
        nodes,
        initializers,
        [
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 5]),
            helper.make_tensor_value_info("mask", TensorProto.BOOL, ["N", out_channels, 4]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", out_channels, 4])],
    )


def cast_model(*, scale: float = 1.0) -> onnx.ModelProto:
    """bfloat16 and float16 in and out: ``wide = float(a)``, ``narrow = bf16(b * scale)``, ``half = f16(b)``."""
    nodes = [
        helper.make_node("Cast", ["a"], ["wide"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["b", "scale"], ["scaled"]),
        helper.make_node("Cast", ["scaled"], ["narrow"], to=TensorProto.BFLOAT16),
        helper.make_node("Cast", ["b"], ["half"], to=TensorProto.FLOAT16),
    ]
    return make_model(
        nodes,
        [numpy_helper.from_array(np.array(scale, np.float32), "scale")],
        [
            helper.make_tensor_value_info("a", TensorProto.BFLOAT16, ["N", 4]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", 4]),
        ],
        [
            helper.make_tensor_value_info("wide", TensorProto.FLOAT, ["N", 4]),
            helper.make_tensor_value_info("narrow", TensorProto.BFLOAT16, ["N", 4]),
            helper.make_tensor_value_info("half", TensorProto.FLOAT16, ["N", 4]),
        ],
    )


def elementwise_model(*ops: str) -> onnx.ModelProto:
    """x[N, 4] -> ops applied in order -> y, e.g. ``("Log",)`` gives NaN for negative x."""
    names = ["x"] + [f"t{i}" for i in range(len(ops) - 1)] + ["y"]
    nodes = [helper.make_node(op, [source], [target]) for op, source, target in zip(ops, names, names[1:])]
    return make_model(
        nodes,
        [],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
    )


def opset9_bn_with_empty_outputs() -> onnx.ModelProto:
    """An opset-9 BatchNormalization whose optional outputs are present as empty names.

    onnxruntime 1.32 segfaults running it: the model verify must survive.
    """
    channels = 3
    initializers = [numpy_helper.from_array(np.ones(channels, np.float32), name) for name in ("s", "b", "m", "v")]
    node = helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y", "", "", "", ""])
    graph = helper.make_graph(
        [node],
        "crash",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, 2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, channels, 2, 2])],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)])
    model.ir_version = 4
    return model


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path
