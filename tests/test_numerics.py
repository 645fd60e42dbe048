"""The error bound of a fold: float64 math, one rounding to the model's dtype.

Each folded weight is ``round(W * s)`` with ``W * s`` computed exactly enough in float64
(the product of two values with 11/24-bit mantissas needs at most 48 bits), so it is the
correctly rounded exact fold: within half an ulp of the model's dtype. A fold computed op
by op in float16 rounds ``var + eps``, the square root, the division and the product
separately and lands further away.
"""

import numpy as np
import onnx_ir as ir

import bnfold
from builders import GraphBuilder


def fp16_conv_bn(seed: int):
    b = GraphBuilder(dtype=np.float16, seed=seed)
    y = b.node("Conv", [b.input([1, 16, 4, 4]), b.random([64, 16, 3, 3], scale=1.0)])
    b.output(b.bn(y, 64, epsilon=1e-3))
    return b.model()


def folded_weight(model) -> np.ndarray:
    result = bnfold.fold(ir.serde.deserialize_model(model))
    assert result.ledger.entries[0].folded
    conv = next(n for n in result.model.graph if n.op_type == "Conv")
    return conv.inputs[1].const_value.numpy()


def test_fp16_fold_is_the_correctly_rounded_exact_fold_and_beats_per_op_fp16():
    for seed in range(5):
        model = fp16_conv_bn(seed)
        arrays = {init.name: ir.serde.deserialize_tensor(init).numpy() for init in model.graph.initializer}
        conv, bn = model.graph.node
        weight = arrays[conv.input[1]]
        gamma, beta, mean, var = (arrays[name] for name in bn.input[1:])
        eps = float(np.float32(1e-3))  # the attribute is stored as float32

        exact = weight.astype(np.float64) * (gamma.astype(np.float64) / np.sqrt(var.astype(np.float64) + eps))[:, None, None, None]
        per_op = weight * (gamma / np.sqrt(var + np.float16(eps)))[:, None, None, None]  # every step in float16
        ours = folded_weight(model)

        np.testing.assert_array_equal(ours, exact.astype(np.float16))  # one rounding: the best fp16 can hold
        ours_error = np.abs(ours.astype(np.float64) - exact)
        per_op_error = np.abs(per_op.astype(np.float64) - exact)
        assert ours_error.max() <= per_op_error.max()
        assert ours_error.mean() < per_op_error.mean()
