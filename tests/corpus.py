"""A corpus of real exporter output for the corpus tests (tests/test_corpus.py).

Nothing is downloaded: every model is generated here, with random weights, and exported
at test time. Three kinds:

* ``timm.*``: small timm architectures whose BN placements matter (``pretrained=False``,
  tiny widths, depths and images), exported with both torch exporters.
* ``torch.*``: hand-written torch models, one per pattern of issue 13, both exporters.
* ``onnx.*``: Keras / tf2onnx-style graphs built with onnx.helper (TensorFlow is not
  installed): BN as Mul/Add around Dense and Conv, Sub/Div input normalisation, NHWC
  Transpose wrappers; dynamic batch dims.

Every torch BatchNorm gets realistic statistics (running_mean ~ N(0, 0.5), running_var
~ U(0.5, 2), weight ~ U(0.5, 1.5), bias ~ N(0, 0.2)) and every Conv/Linear He-scaled
weights, so that a wrong fold shows (timm's own init leaves a random net's output nearly
flat: a 5% scale error in an early BN of LeViT or GhostNet vanished below the tolerance);
every net is exported in eval mode:

* TorchScript (``dynamo=False``, opset 17) with ``training=PRESERVE``, which keeps each
  BN as an inference BatchNormalization (its default EVAL mode would fuse Conv+BN itself);
* dynamo (``dynamo=True``, opset 18) with ``optimize=False``, which keeps one BN per module.

Both get a dynamic batch axis (``batch``) unless the model needs a static one. timm
imports torchvision, which has no working CPU build for torch 2.13 here; ``import_timm``
puts a minimal stub in ``sys.modules`` while timm is imported and removes it afterwards
(a stub left there breaks the dynamo exporter's ``find_spec("torchvision")``).
"""

from __future__ import annotations

import dataclasses
import enum
import importlib.machinery
import importlib.util
import logging
import sys
import types
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as onh

import blocks as B

TS, DYNAMO, ONNX = "ts", "dynamo", "onnx"
EXPORTER_NAMES = {TS: "torchscript", DYNAMO: "dynamo", ONNX: "onnx.helper"}
TS_OPSET, DYNAMO_OPSET, ONNX_OPSET = 17, 18, 17
#: The batch the nets are exported with (2, so that dynamo does not specialise 0/1) and
#: the second batch the tests run where the batch dim is dynamic.
BATCH, ALT_BATCH = 2, 3
INPUT, OUTPUT = "input", "output"


@dataclass(frozen=True)
class Spec:
    """One corpus model. ``build`` returns ``(net, example)`` for torch kinds and a
    ModelProto for ``onnx``. ``pattern`` is the issue-13 pattern number of a hand-written
    model (None for timm)."""

    name: str
    kind: str  # "timm" | "torch" | "block" | "onnx"
    build: Callable
    pattern: int | None = None
    dynamic: bool = True
    #: Producer>consumer op edges the export must hold (``input>Op`` for the graph input),
    #: so that an exporter change cannot silently drop what the model is here for; a
    #: ``@ts``/``@dynamo`` suffix limits an edge to one exporter.
    signature: tuple[str, ...] = ()
    #: Run on the torch net after its BNs got realistic statistics (a negative case's plant).
    tweak: Callable | None = None

    @property
    def exporters(self) -> tuple[str, ...]:
        return (ONNX,) if self.kind == "onnx" else (TS, DYNAMO)

    def ids(self) -> list[str]:
        return [f"{self.name}-{e}" for e in self.exporters]


class ExportError(Exception):
    """A (model, exporter) pair that could not be exported; the tests skip it."""


# --------------------------------------------------------------------------- timm


_TV_MODULES = (
    "torchvision", "torchvision.transforms", "torchvision.transforms.functional",
    "torchvision.transforms.v2", "torchvision.ops", "torchvision.ops.misc", "torchvision.datasets",
    "torchvision.models", "torchvision.models.feature_extraction", "torchvision.utils",
)


class _Placeholder:
    """Any torchvision class or function timm names at import time; never used here."""

    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        raise RuntimeError("torchvision is stubbed out in the corpus tests")


class InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


def _stub_module(name: str) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__path__ = []
    module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)

    def __getattr__(attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return type(attr, (_Placeholder,), {})

    module.__getattr__ = __getattr__
    return module


def import_timm():
    """Import timm; with a torchvision stub in sys.modules while it imports, if torchvision
    is not installed. The stub is removed afterwards, whatever happens."""
    if "timm" in sys.modules or importlib.util.find_spec("torchvision") is not None:
        import timm

        return timm
    added = []
    try:
        for name in _TV_MODULES:
            sys.modules[name] = _stub_module(name)
            added.append(name)
            parent, _, child = name.rpartition(".")
            if parent:
                setattr(sys.modules[parent], child, sys.modules[name])
        sys.modules["torchvision.transforms.functional"].InterpolationMode = InterpolationMode
        with _quiet():
            import timm
            import timm.models  # noqa: F401
        return timm
    finally:
        for name in added:
            sys.modules.pop(name, None)


def _timm_resnet():
    timm = import_timm()
    # resnet10t (deep-tiered stem, avg-pool downsample), widths cut to 16..64
    return timm.create_model("resnet10t", pretrained=False, num_classes=10, channels=(16, 32, 48, 64),
                             stem_width=8), _image(32)


def _timm_mobilenetv3():
    timm = import_timm()
    # SE blocks, hard-swish, Conv-BN and a Linear head after global pool; one block per stage
    return timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=10,
                             depth_multiplier=0.25), _image(32)


def _timm_mixnet():
    import_timm()
    from timm.models import efficientnet as en

    # MixNet-S blocks (k3.5.7 mixed depthwise: Split -> Conv_i -> Concat -> BN; a1.1/p1.1
    # grouped pointwise), SE, swish; tiny widths
    arch = [["ds_r1_k3_s1_e1_c8"], ["ir_r1_k3.5.7_s2_e3_c16_se0.5_nsw"],
            ["ir_r1_k3.5_a1.1_p1.1_s2_e3_c24_se0.25_nsw"]]
    return en.EfficientNet(block_args=en.decode_arch_def(arch), num_features=64, stem_size=8,
                           num_classes=10), _image(32)


def _timm_levit():
    import_timm()
    from timm.models import levit

    # LinearNorm: Linear -> flatten(0,1) -> BN1d -> reshape; ConvNorm stem; NormLinear head
    # (BN1d -> Linear); attention with a BN'd projection
    return levit.Levit(img_size=64, num_classes=10, embed_dim=(32, 48), key_dim=8, depth=(1, 1),
                       num_heads=(2, 3), down_op="subsample"), _image(64)


def _timm_convmixer():
    import_timm()
    from timm.models import convmixer

    # Conv -> GELU -> BN (BN after the activation), residual depthwise
    return convmixer.ConvMixer(dim=32, depth=2, kernel_size=3, patch_size=4, num_classes=10), _image(32)


def _timm_repvgg():
    import_timm()
    from timm.models import byobnet

    # RepVGG blocks: 3x3 conv-BN + 1x1 conv-BN (+ identity BN where stride 1 and widths match)
    cfg = byobnet.model_cfgs["repvgg_a0"]
    blocks = (byobnet.ByoBlockCfg(type="rep", d=2, c=16, s=2, gs=0, br=1.0),
              byobnet.ByoBlockCfg(type="rep", d=2, c=24, s=2, gs=0, br=1.0))
    cfg = dataclasses.replace(cfg, blocks=blocks, stem_chs=16)
    return byobnet.ByobNet(cfg, num_classes=10), _image(32)


def _timm_densenet():
    import_timm()
    from timm.models import densenet

    # pre-activation dense layers: BN after Concat (and after the stem's max-pool)
    return densenet.DenseNet(growth_rate=8, block_config=(2, 2), bn_size=2, num_classes=10), _image(32)


def _timm_regnet():
    import_timm()
    from timm.models import regnet

    # RegNetY-style: group conv, SE, conv1x1 downsample; 4 stages of 8..64 channels
    cfg = regnet.RegNetCfg(depth=4, w0=8, wa=13, wm=2.0, group_size=8, se_ratio=0.25, stem_width=16)
    return regnet.RegNet(cfg, num_classes=10), _image(32)


def _timm_ghostnet():
    import_timm()
    from timm.models import ghostnet

    # Ghost modules (primary conv-BN, cheap depthwise conv-BN, Concat), SE; 3 stages
    cfgs = [[[3, 16, 16, 0, 1]], [[3, 48, 24, 0, 2]], [[5, 72, 40, 0.25, 2]]]
    return ghostnet.GhostNet(cfgs, width=0.5, num_classes=10), _image(32)


def _timm_dla():
    import_timm()
    from timm.models import dla

    # DLA trees: aggregation nodes Concat -> Conv -> BN, projections conv-BN
    return dla.DLA(levels=[1, 1, 1, 1, 1, 1], channels=[8, 16, 16, 32, 32, 64], block=dla.DlaBottleneck,
                   num_classes=10), _image(32)


def _image(size: int):
    import torch

    return torch.randn(BATCH, 3, size, size, generator=torch.Generator().manual_seed(size))


# --------------------------------------------------------------------------- hand-written torch


def _torch():
    import torch
    import torch.nn as nn

    return torch, nn


def _p1_bn1d_linear_last():
    """BatchNorm1d -> Linear(bias=False) as the last layer (BN after a ReLU: folds forward)."""
    torch, nn = _torch()

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 16)
            self.bn = nn.BatchNorm1d(16)
            self.head = nn.Linear(16, 4, bias=False)

        def forward(self, x):
            return self.head(self.bn(torch.relu(self.fc(x))))

    return Net(), torch.randn(BATCH, 8)


def _p2_linear_btf_bn1():
    """Linear on [B, T, F] (T = 1) -> BatchNorm1d(1): one channel, a scalar map."""
    torch, nn = _torch()

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 6)
            self.bn = nn.BatchNorm1d(1)

        def forward(self, x):
            return self.bn(self.fc(x))

    return Net(), torch.randn(BATCH, 1, 8)


def _p3_unsqueeze0_bn1():
    """Linear -> x.unsqueeze(0) -> BatchNorm1d(1) -> squeeze(0): BN(1) needs the unbatched
    [1, F] input, so the batch dim is static."""
    torch, nn = _torch()

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 6)
            self.bn = nn.BatchNorm1d(1)

        def forward(self, x):
            return self.bn(self.fc(x).unsqueeze(0)).squeeze(0)

    return Net(), torch.randn(1, 8)


def _p4_bn_bn_conv():
    """BN -> BN -> Conv (unpadded), BN on the graph input."""
    torch, nn = _torch()

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn1 = nn.BatchNorm2d(3)
            self.bn2 = nn.BatchNorm2d(3)
            self.conv = nn.Conv2d(3, 8, 3)

        def forward(self, x):
            return torch.relu(self.conv(self.bn2(self.bn1(x))))

    return Net(), torch.randn(BATCH, 3, 8, 8)


def _p5_bn_transpose_linear():
    """BN over [B, C, T] -> transpose(1, 2) -> Linear(C, H)."""
    torch, nn = _torch()

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm1d(6)
            self.fc = nn.Linear(6, 4)

        def forward(self, x):
            return self.fc(self.bn(x).transpose(1, 2))

    return Net(), torch.randn(BATCH, 6, 5)


def _p6_const_first_matmul_bn():
    """W @ x (the constant is MatMul's first operand) -> BN over W's rows."""
    torch, nn = _torch()

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(5, 6) * 0.4)
            self.bn = nn.BatchNorm1d(5)

        def forward(self, x):
            return self.bn(self.w @ x)

    return Net(), torch.randn(BATCH, 6, 4)


def _p7_linear_bias_111n():
    """x @ W + b with b shaped [1, 1, N] on [B, T, F] -> transpose(1, 2) -> BN over N."""
    torch, nn = _torch()

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(6, 5) * 0.4)
            self.b = nn.Parameter(torch.randn(1, 1, 5) * 0.2)
            self.bn = nn.BatchNorm1d(5)

        def forward(self, x):
            return self.bn((x @ self.w + self.b).transpose(1, 2))

    return Net(), torch.randn(BATCH, 4, 6)


def _p8_flatten_bn_linear():
    """Conv -> ReLU -> BN -> nn.Flatten -> Linear (dynamo writes the flatten as a Reshape)."""
    torch, nn = _torch()

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)
            self.flatten = nn.Flatten()
            self.fc = nn.Linear(4 * 4 * 4, 5)

        def forward(self, x):
            return self.fc(self.flatten(self.bn(torch.relu(self.conv(x)))))

    return Net(), torch.randn(BATCH, 3, 6, 6)


def _p9_identity_conv_bn():
    """Conv -> x.clone() (an Identity in the export) -> BN."""
    torch, nn = _torch()

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            return torch.relu(self.bn(self.conv(x).clone()))

    return Net(), torch.randn(BATCH, 3, 6, 6)


def _p10_conv_shape_reader():
    """Conv whose output is also read by shape code (``y.size(0)``, ``y.shape[-1]``): a
    Shape node reads the conv output besides the BN."""
    torch, nn = _torch()

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            z = torch.relu(self.bn(y))
            return z.reshape(y.size(0), -1, y.shape[-1])

    return Net(), torch.randn(BATCH, 3, 6, 6)


# --------------------------------------------------------------------------- onnx.helper graphs


class _Graph:
    """A tiny onnx.helper graph builder for the Keras / tf2onnx-style models."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.count = 0

    def _name(self, base: str) -> str:
        self.count += 1
        return f"{base}_{self.count}"

    def const(self, array, base: str) -> str:
        name = self._name(base)
        self.inits.append(onh.from_array(np.asarray(array, dtype=np.float32), name))
        return name

    def weight(self, shape, base: str = "kernel") -> str:
        fan_in = int(np.prod(shape[1:])) if len(shape) > 2 else shape[0]
        return self.const(self.rng.standard_normal(shape) / np.sqrt(fan_in), base)

    def input(self, shape) -> str:
        self.inputs.append(oh.make_tensor_value_info(INPUT, onnx.TensorProto.FLOAT, shape))
        return INPUT

    def node(self, op: str, inputs, base: str | None = None, **attrs) -> str:
        name = self._name(base or op)
        self.nodes.append(oh.make_node(op, list(inputs), [name + ":0"], name=name, **attrs))
        return name + ":0"

    def bn_scale_shift(self, channels: int, shape) -> tuple[str, str]:
        """A Keras BN as the constants of Mul and Add (realistic statistics)."""
        r = self.rng
        gamma, beta = r.uniform(0.5, 1.5, channels), r.normal(0, 0.2, channels)
        mean, var = r.normal(0, 0.5, channels), r.uniform(0.5, 2.0, channels)
        scale = gamma / np.sqrt(var + 1e-3)
        shift = beta - mean * scale
        return self.const(scale.reshape(shape), "bn/mul"), self.const(shift.reshape(shape), "bn/add")

    def dense(self, x: str, k: int, n: int, bias: bool = True) -> str:
        y = self.node("MatMul", [x, self.weight([k, n])], "dense/MatMul")
        if bias:
            y = self.node("Add", [y, self.const(self.rng.normal(0, 0.2, n), "dense/bias")], "dense/BiasAdd")
        return y

    def model(self, out: str, out_shape) -> onnx.ModelProto:
        self.nodes[-1].output[0] = OUTPUT
        self.outputs.append(oh.make_tensor_value_info(OUTPUT, onnx.TensorProto.FLOAT, out_shape))
        graph = oh.make_graph(self.nodes, "tf2onnx", self.inputs, self.outputs, self.inits)
        model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", ONNX_OPSET)], producer_name="corpus")
        model.ir_version = 9
        return model


def _p11_keras_bn_dense():
    """Dense -> Tanh -> BN as Mul(c) -> Add(c) -> Dense(use_bias=False), a bare MatMul."""
    g = _Graph(11)
    y = g.node("Tanh", [g.dense(g.input(["N", 8]), 8, 16)])
    s, t = g.bn_scale_shift(16, [16])
    y = g.node("Add", [g.node("Mul", [y, s], "bn/mul"), t], "bn/add")
    g.dense(y, 16, 4, bias=False)
    return g.model(OUTPUT, ["N", 4])


def _p12_keras_input_bn_dense():
    """input -> Mul(c) -> Add(c) -> MatMul -> Add: a BN on the model input before a Dense."""
    g = _Graph(12)
    s, t = g.bn_scale_shift(8, [8])
    y = g.node("Add", [g.node("Mul", [g.input(["N", 8]), s], "bn/mul"), t], "bn/add")
    g.dense(y, 8, 4)
    return g.model(OUTPUT, ["N", 4])


def _p13_keras_relu_bn_dense():
    """Dense -> Relu -> Mul(c) -> Add(c) -> MatMul -> Add."""
    g = _Graph(13)
    y = g.node("Relu", [g.dense(g.input(["N", 8]), 8, 16)])
    s, t = g.bn_scale_shift(16, [16])
    y = g.node("Add", [g.node("Mul", [y, s], "bn/mul"), t], "bn/add")
    g.dense(y, 16, 4)
    return g.model(OUTPUT, ["N", 4])


def _p14_keras3_conv_mul_add():
    """Keras 3 BN after a conv: Conv -> Mul([1,C,1,1]) -> Add([1,C,1,1]) -> Relu."""
    g = _Graph(14)
    y = g.node("Conv", [g.input(["N", 3, 8, 8]), g.weight([8, 3, 3, 3]), g.const(g.rng.normal(0, 0.2, 8), "bias")],
               pads=[1, 1, 1, 1])
    s, t = g.bn_scale_shift(8, [1, 8, 1, 1])
    y = g.node("Add", [g.node("Mul", [y, s], "bn/mul"), t], "bn/add")
    g.node("Relu", [y])
    return g.model(OUTPUT, ["N", 8, 8, 8])


def _p15_tf2onnx_dense_bn():
    """tf2onnx Dense + BN: MatMul -> Add(bias) -> Mul(c) -> Add(c) -> Relu."""
    g = _Graph(15)
    y = g.dense(g.input(["N", 8]), 8, 16)
    s, t = g.bn_scale_shift(16, [16])
    y = g.node("Add", [g.node("Mul", [y, s], "bn/mul"), t], "bn/add")
    g.node("Relu", [y])
    return g.model(OUTPUT, ["N", 16])


def _p16_input_norm_conv():
    """(x - mean) / std per channel -> unpadded Conv -> Relu."""
    g = _Graph(16)
    mean = g.const(g.rng.uniform(0.3, 0.6, 3).reshape(1, 3, 1, 1), "mean")
    std = g.const(g.rng.uniform(0.2, 0.3, 3).reshape(1, 3, 1, 1), "std")
    y = g.node("Div", [g.node("Sub", [g.input(["N", 3, 8, 8]), mean]), std])
    y = g.node("Conv", [y, g.weight([8, 3, 3, 3]), g.const(g.rng.normal(0, 0.2, 8), "bias")])
    g.node("Relu", [y])
    return g.model(OUTPUT, ["N", 8, 6, 6])


def _p17_input_norm_gemm():
    """(x - mean) / std per feature -> Gemm(transB=1)."""
    g = _Graph(17)
    mean = g.const(g.rng.normal(0, 1, 6), "mean")
    std = g.const(g.rng.uniform(0.5, 2.0, 6), "std")
    y = g.node("Div", [g.node("Sub", [g.input(["N", 6]), mean]), std])
    g.node("Gemm", [y, g.weight([4, 6]), g.const(g.rng.normal(0, 0.2, 4), "bias")], transB=1)
    return g.model(OUTPUT, ["N", 4])


def _p18_nhwc_conv_mul_add():
    """tf2onnx NHWC wrapper: Transpose(0,3,1,2) -> Conv -> Transpose(0,2,3,1) -> Mul(c[C])
    -> Add(c[C]) (channels-last constants) -> Relu, dynamic batch."""
    g = _Graph(18)
    y = g.node("Transpose", [g.input(["N", 8, 8, 3])], perm=[0, 3, 1, 2])
    y = g.node("Conv", [y, g.weight([8, 3, 3, 3]), g.const(g.rng.normal(0, 0.2, 8), "bias")], pads=[1, 1, 1, 1])
    y = g.node("Transpose", [y], perm=[0, 2, 3, 1])
    s, t = g.bn_scale_shift(8, [8])
    y = g.node("Add", [g.node("Mul", [y, s], "bn/mul"), t], "bn/add")
    g.node("Relu", [y])
    return g.model(OUTPUT, ["N", 8, 8, 8])


# --------------------------------------------------------------------------- the corpus


SPECS: list[Spec] = [
    Spec("timm.resnet10t", "timm", _timm_resnet, signature=("Conv>BatchNormalization", "BatchNormalization>Add")),
    Spec("timm.mobilenetv3", "timm", _timm_mobilenetv3, signature=("BatchNormalization>HardSwish",)),
    Spec("timm.mixnet", "timm", _timm_mixnet, signature=("Concat>BatchNormalization", "Split>Conv@ts")),
    Spec("timm.levit", "timm", _timm_levit, signature=("Flatten>BatchNormalization@ts", "Reshape>BatchNormalization@dynamo",
                                                        "BatchNormalization>Gemm@ts")),
    Spec("timm.convmixer", "timm", _timm_convmixer, signature=("Mul>BatchNormalization",)),
    Spec("timm.repvgg", "timm", _timm_repvgg, signature=("Relu>BatchNormalization", "BatchNormalization>Add")),
    Spec("timm.densenet", "timm", _timm_densenet, signature=("Concat>BatchNormalization",)),
    Spec("timm.regnet", "timm", _timm_regnet, signature=("Conv>BatchNormalization",)),
    Spec("timm.ghostnet", "timm", _timm_ghostnet, signature=("BatchNormalization>Concat",)),
    Spec("timm.dla", "timm", _timm_dla, signature=("Conv>BatchNormalization",)),
    Spec("torch.bn1d_linear_last", "torch", _p1_bn1d_linear_last, pattern=1,
         signature=("Relu>BatchNormalization", "BatchNormalization>MatMul@ts", "BatchNormalization>Gemm@dynamo")),
    Spec("torch.linear_btf_bn1", "torch", _p2_linear_btf_bn1, pattern=2,
         signature=("MatMul>Add", "Add>BatchNormalization")),
    Spec("torch.unsqueeze0_bn1", "torch", _p3_unsqueeze0_bn1, pattern=3, dynamic=False,
         signature=("Gemm>Unsqueeze", "Unsqueeze>BatchNormalization")),
    Spec("torch.bn_bn_conv", "torch", _p4_bn_bn_conv, pattern=4,
         signature=("input>BatchNormalization", "BatchNormalization>BatchNormalization", "BatchNormalization>Conv")),
    Spec("torch.bn_transpose_linear", "torch", _p5_bn_transpose_linear, pattern=5,
         signature=("BatchNormalization>Transpose", "Transpose>MatMul")),
    Spec("torch.const_first_matmul_bn", "torch", _p6_const_first_matmul_bn, pattern=6,
         signature=("input>MatMul", "MatMul>BatchNormalization")),
    Spec("torch.linear_bias_111n", "torch", _p7_linear_bias_111n, pattern=7,
         signature=("MatMul>Add", "Add>Transpose", "Transpose>BatchNormalization")),
    Spec("torch.flatten_bn_linear", "torch", _p8_flatten_bn_linear, pattern=8,
         signature=("Relu>BatchNormalization", "BatchNormalization>Flatten@ts", "Flatten>Gemm@ts",
                    "BatchNormalization>Reshape@dynamo", "Reshape>Gemm@dynamo")),
    # TorchScript drops the clone; dynamo keeps it as an Identity
    Spec("torch.identity_conv_bn", "torch", _p9_identity_conv_bn, pattern=9,
         signature=("Conv>Identity@dynamo", "Identity>BatchNormalization@dynamo", "Conv>BatchNormalization@ts")),
    # only TorchScript reads the conv output's shape; dynamo takes the batch from the input's
    Spec("torch.conv_shape_reader", "torch", _p10_conv_shape_reader, pattern=10,
         signature=("Conv>BatchNormalization", "Conv>Shape@ts")),
    Spec("onnx.keras_bn_dense", "onnx", _p11_keras_bn_dense, pattern=11,
         signature=("Tanh>Mul", "Mul>Add", "Add>MatMul")),
    Spec("onnx.keras_input_bn_dense", "onnx", _p12_keras_input_bn_dense, pattern=12,
         signature=("input>Mul", "Mul>Add", "Add>MatMul", "MatMul>Add")),
    Spec("onnx.keras_relu_bn_dense", "onnx", _p13_keras_relu_bn_dense, pattern=13,
         signature=("Relu>Mul", "Mul>Add", "Add>MatMul", "MatMul>Add")),
    Spec("onnx.keras3_conv_mul_add", "onnx", _p14_keras3_conv_mul_add, pattern=14, signature=("Conv>Mul", "Mul>Add")),
    Spec("onnx.tf2onnx_dense_bn", "onnx", _p15_tf2onnx_dense_bn, pattern=15,
         signature=("MatMul>Add", "Add>Mul", "Mul>Add")),
    Spec("onnx.input_norm_conv", "onnx", _p16_input_norm_conv, pattern=16,
         signature=("input>Sub", "Sub>Div", "Div>Conv")),
    Spec("onnx.input_norm_gemm", "onnx", _p17_input_norm_gemm, pattern=17,
         signature=("input>Sub", "Sub>Div", "Div>Gemm")),
    Spec("onnx.nhwc_conv_mul_add", "onnx", _p18_nhwc_conv_mul_add, pattern=18,
         signature=("input>Transpose", "Transpose>Conv", "Conv>Transpose", "Transpose>Mul", "Mul>Add")),
]

# Real blocks in training form (tests/blocks.py): routes across pools, resizes, sums and forks.
SPECS += [
    Spec("block.vgg_pool_bn", "block", B.vgg_pool_bn, signature=("MaxPool>BatchNormalization",)),
    Spec("block.vgg_pool_bn_negative", "block", B.vgg_pool_bn, signature=("MaxPool>BatchNormalization",),
         tweak=B.negative_scale_after_pool),
    Spec("block.preact_residual", "block", B.preact_residual, signature=("Add>BatchNormalization",)),
    Spec("block.inception_fork", "block", B.inception_fork, signature=("BatchNormalization>MaxPool",)),
    Spec("block.classifier_head", "block", B.classifier_head, signature=("BatchNormalization>GlobalAveragePool@ts", "BatchNormalization>ReduceMean@dynamo")),
    Spec("block.sum_then_bn", "block", B.sum_then_bn, signature=("Add>BatchNormalization",)),
    Spec("block.upsampling_decoder", "block", B.upsampling_decoder, signature=("Resize>BatchNormalization",)),
    Spec("block.counted_padding_pool", "block", B.counted_padding_pool,
         signature=("AveragePool>BatchNormalization",)),
    Spec("block.fork_with_activation", "block", B.fork_with_activation, signature=("BatchNormalization>Relu",)),
]

SPEC_OF: dict[str, Spec] = {model_id: spec for spec in SPECS for model_id in spec.ids()}
ALL_IDS: list[str] = list(SPEC_OF)


def exporter_of(model_id: str) -> str:
    return model_id.rsplit("-", 1)[1]


def signature_of(model_id: str) -> list[str]:
    """The edges ``model_id``'s export must hold (its spec's, for its exporter)."""
    exporter, wanted = exporter_of(model_id), []
    for edge in SPEC_OF[model_id].signature:
        edge, _, only = edge.partition("@")
        if not only or only == exporter:
            wanted.append(edge)
    return wanted


def edges(model: onnx.ModelProto) -> set[str]:
    """``Producer>Consumer`` op pairs of the main graph (``input>Op`` for the graph input;
    Constant producers left out)."""
    producer = {out: node.op_type for node in model.graph.node for out in node.output}
    inputs = {vi.name for vi in model.graph.input}
    found = set()
    for node in model.graph.node:
        for name in node.input:
            if name in producer and producer[name] != "Constant":
                found.add(f"{producer[name]}>{node.op_type}")
            elif name in inputs and name == INPUT:
                found.add(f"input>{node.op_type}")
    return found


def rescale_weights(net, seed: int) -> None:
    """Conv and Linear weights ~ N(0, 2/fan_in) (He). timm's inits (std 0.02 heads, zero-init
    residual branches) leave a random net's output nearly independent of its input, where
    a wrong fold deep in the net would not show."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.modules.conv._ConvNd)):
                w = module.weight
                fan_in = w[0].numel() if not isinstance(module, torch.nn.modules.conv._ConvTransposeNd) \
                    else w.shape[0] // module.groups * w[0, 0].numel()
                w.copy_(torch.randn(w.shape, generator=gen) * (2 / fan_in) ** 0.5)
                if module.bias is not None:
                    module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 0.1)


def randomize_bn(net, seed: int) -> None:
    """Realistic BN statistics and affine parameters, so that a wrong fold shows."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in net.modules():
            if not isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                continue
            c = module.num_features
            if module.track_running_stats and module.running_mean is not None:
                module.running_mean.copy_(torch.randn(c, generator=gen) * 0.5)
                module.running_var.copy_(torch.rand(c, generator=gen) * 1.5 + 0.5)
            if module.affine:
                module.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                module.bias.copy_(torch.randn(c, generator=gen) * 0.2)


def _quiet():
    """Silence exporter and timm chatter (prints, warnings, logging)."""
    from bnfold.train.export import quiet

    return quiet(("torch.fx", "timm"), logging.CRITICAL)


def seed_of(model_id: str) -> int:
    return zlib.crc32(model_id.encode())


def export_torch(net, example, path: Path, exporter: str, dynamic: bool) -> None:
    import torch

    with _quiet():
        if exporter == TS:
            torch.onnx.export(
                net, (example,), str(path), dynamo=False, opset_version=TS_OPSET,
                training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=True,
                input_names=[INPUT], output_names=[OUTPUT],
                dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}} if dynamic else None,
            )
        else:
            program = torch.onnx.export(
                net, (example,), dynamo=True, opset_version=DYNAMO_OPSET, optimize=False,
                input_names=[INPUT], output_names=[OUTPUT],
                dynamic_shapes=({0: torch.export.Dim("batch")},) if dynamic else None, verbose=False,
            )
            program.save(str(path), external_data=False)


class Corpus:
    """Exports each model once, lazily, into ``folder``; remembers export failures."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._paths: dict[str, Path] = {}
        self._errors: dict[str, str] = {}
        self._nets: dict[str, tuple] = {}

    def path(self, model_id: str) -> Path:
        """The exported file; ExportError if this (model, exporter) pair cannot be exported."""
        if model_id in self._paths:
            return self._paths[model_id]
        if model_id in self._errors:
            raise ExportError(self._errors[model_id])
        spec, exporter = SPEC_OF[model_id], exporter_of(model_id)
        path = self.folder / f"{model_id}.onnx"
        try:
            if spec.kind == "onnx":
                onnx.save(spec.build(), str(path))
            else:
                net, example = self._net(spec)
                export_torch(net, example, path, exporter, spec.dynamic)
        except Exception as exc:  # an exporter failure is data: skip the pair, say why
            message = f"{model_id}: export failed: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}" \
                if str(exc).strip() else f"{model_id}: export failed: {type(exc).__name__}"
            self._errors[model_id] = message
            raise ExportError(message) from exc
        self._paths[model_id] = path
        return path

    def _net(self, spec: Spec):
        """The torch net (built once, shared by both exporters), BN statistics randomised, eval."""
        if spec.name not in self._nets:
            import torch

            torch.manual_seed(seed_of(spec.name) % (2**31))
            net, example = spec.build()
            rescale_weights(net, seed_of(spec.name) % (2**31))
            randomize_bn(net, seed_of(spec.name) % (2**31))
            if spec.tweak is not None:
                spec.tweak(net)
            self._nets[spec.name] = (net.eval(), example)
        return self._nets[spec.name]

    @property
    def errors(self) -> dict[str, str]:
        return dict(self._errors)


# --------------------------------------------------------------------------- inputs


def input_shapes(model: onnx.ModelProto, batch: int) -> dict[str, list[int]]:
    """The real graph inputs' shapes, every symbolic dim set to ``batch``."""
    inits = {i.name for i in model.graph.initializer}
    shapes = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        dims = vi.type.tensor_type.shape.dim
        shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else batch for d in dims]
    return shapes


def has_dynamic_dim(model: onnx.ModelProto) -> bool:
    inits = {i.name for i in model.graph.initializer}
    return any(not d.HasField("dim_value") for vi in model.graph.input if vi.name not in inits
               for d in vi.type.tensor_type.shape.dim)


def random_feeds(model: onnx.ModelProto, batch: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed + batch)
    return {name: rng.standard_normal(shape).astype(np.float32)
            for name, shape in input_shapes(model, batch).items()}
