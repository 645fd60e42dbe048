"""Feature-rich ONNX models for the lossless round-trip tests (tests/test_lossless.py).

``build(cfg)`` turns a ``Config`` (drawn by ``configs()``, a hypothesis strategy) into a
``Rich`` model that uses as much of the ONNX protobuf schema as the config asks for:
every ModelProto / GraphProto / NodeProto / ValueInfoProto field, attributes of every
type (on custom-domain nodes, which onnxruntime never runs), tensors in every storage
form and many dtypes, sparse tensors, model-local functions with attribute parameters
and ``ref_attr_name``, If / Loop subgraphs, training_info, large (streamed) initializers,
and unknown protobuf fields on every message. Some configs add a Conv -> BatchNormalization
corner (in the main graph, a subgraph or a function body) so that folds happen alongside
the rest. ``runnable`` configs use only what onnxruntime runs (standard ops, IR <= 10), so
a test can compare the folded model numerically too.

``write_external(model, folder, ...)`` lays tensors out as external data by hand, with
every combination of the optional ``offset`` / ``length`` / ``checksum`` keys.
"""

from __future__ import annotations

import copy
import hashlib
import random
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as onh
from hypothesis import strategies as st

T = onnx.TensorProto
FLOAT = T.FLOAT
CUSTOM = "com.example.rich"
FN_DOMAIN = "com.example.fn"
#: Opset of the default domain; ORT 1.32 runs it and bnfold knows BN/Conv there.
OPSET = 17
#: Main-graph initializers at least this large are streamed by bnfold (bnfold.load.EMBEDDED_MIN_BYTES).
STREAMED_BYTES = 64 * 1024


# --- unknown protobuf fields -----------------------------------------------------------


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def unknown_field(number: int = 500, wire_type: int = 0, payload: bytes | int = 1) -> bytes:
    """The wire bytes of one field no ONNX message declares (tag = number << 3 | wire type)."""
    tag = varint((number << 3) | wire_type)
    if wire_type == 0:
        return tag + varint(int(payload))
    if wire_type == 2:
        data = payload if isinstance(payload, bytes) else str(payload).encode()
        return tag + varint(len(data)) + data
    if wire_type == 5:
        return tag + int(payload).to_bytes(4, "little")
    if wire_type == 1:
        return tag + int(payload).to_bytes(8, "little")
    raise ValueError(wire_type)


def add_unknown(message, salt: int = 0) -> None:
    """Append unknown fields (a varint and a length-delimited one) to ``message``."""
    message.MergeFromString(unknown_field(500 + salt % 7, 0, 1 + salt)
                            + unknown_field(900 + salt % 5, 2, f"bnfold-unknown-{salt}".encode()))


def sprinkle_unknown(message, rng: random.Random, probability: float = 0.6, here: bool = True) -> int:
    """Add unknown fields to ``message`` (when ``here``) and, each with ``probability``, to
    the messages below it, at every depth. Returns how many messages got some."""
    count = 0
    if here:
        add_unknown(message, rng.randrange(1000))
        count += 1
    for descriptor, value in message.ListFields():
        if descriptor.type != descriptor.TYPE_MESSAGE:
            continue
        for item in (value if _is_repeated(descriptor) else [value]):
            count += sprinkle_unknown(item, rng, probability, rng.random() < probability)
    return count


def _is_repeated(descriptor) -> bool:
    repeated = getattr(descriptor, "is_repeated", None)
    return descriptor.label == descriptor.LABEL_REPEATED if repeated is None else repeated


# --- tensors in every storage form -------------------------------------------------------

#: (dtype, minimum IR version that declares it).
DTYPES_MIN_IR = {
    T.FLOAT: 3, T.DOUBLE: 3, T.INT32: 3, T.INT8: 3, T.UINT8: 3, T.INT16: 3, T.UINT16: 3, T.BOOL: 3,
    T.FLOAT16: 3, T.INT64: 3, T.UINT32: 3, T.UINT64: 3, T.STRING: 3, T.COMPLEX64: 3, T.COMPLEX128: 3,
    T.BFLOAT16: 4, T.FLOAT8E4M3FN: 9, T.FLOAT8E4M3FNUZ: 9, T.FLOAT8E5M2: 9, T.FLOAT8E5M2FNUZ: 9,
    T.UINT4: 10, T.INT4: 10, T.FLOAT4E2M1: 11, T.FLOAT8E8M0: 12, T.UINT2: 13, T.INT2: 13,
    T.FLOAT6E2M3: 14, T.FLOAT6E3M2: 14,
}
#: Types onnxruntime loads as (unused) initializers.
ORT_DTYPES = {T.FLOAT, T.DOUBLE, T.INT32, T.INT8, T.UINT8, T.INT16, T.UINT16, T.BOOL, T.FLOAT16, T.INT64,
              T.UINT32, T.UINT64, T.STRING, T.BFLOAT16}


def sample_values(dtype: int, count: int, rng: np.random.Generator) -> list:
    """``count`` values that ``dtype`` represents exactly."""
    name = T.DataType.Name(dtype)
    if dtype == T.STRING:
        return [f"s{i}-\u00e9".encode() for i in range(count)]
    if dtype == T.BOOL:
        return [bool(v) for v in rng.integers(0, 2, count)]
    if name.startswith("COMPLEX"):
        return [complex(a, b) for a, b in rng.integers(-4, 5, (count, 2))]
    if dtype == T.FLOAT8E8M0:  # powers of two only
        return [float(2.0 ** v) for v in rng.integers(-3, 4, count)]
    if name.startswith(("FLOAT", "DOUBLE", "BFLOAT")):
        return [float(v) / 2 for v in rng.integers(-4, 5, count)]
    low, high = {"INT2": (-2, 2), "UINT2": (0, 4), "INT4": (-8, 8), "UINT4": (0, 16)}.get(
        name, (0, 9) if name.startswith("UINT") else (-4, 5))
    return [int(v) for v in rng.integers(low, high, count)]


def storage_tensor(name: str, dtype: int, dims: list[int], form: str, rng: np.random.Generator) -> onnx.TensorProto:
    """A tensor whose data is in ``form``: "typed" (the typed *_data field onnx.helper picks
    for the dtype) or "raw" (raw_data)."""
    count = int(np.prod(dims)) if dims else 1
    tensor = oh.make_tensor(name, dtype, dims, sample_values(dtype, count, rng))
    if form == "raw" and dtype != T.STRING:
        tensor = onh.from_array(onh.to_array(tensor), name)
        assert tensor.data_type == dtype and tensor.HasField("raw_data"), T.DataType.Name(dtype)
    return tensor


def storage_zoo(prefix: str, ir_version: int, rng: np.random.Generator, ort_only: bool) -> list[onnx.TensorProto]:
    """One tensor per (dtype, storage form), plus a scalar and an empty one."""
    out = []
    for dtype, min_ir in DTYPES_MIN_IR.items():
        if min_ir > ir_version or (ort_only and dtype not in ORT_DTYPES):
            continue
        forms = ["typed"] if dtype == T.STRING else ["typed", "raw"]
        for form in forms:
            name = f"{prefix}_{T.DataType.Name(dtype).lower()}_{form}"
            out.append(storage_tensor(name, dtype, [2, 3], form, rng))
    out.append(storage_tensor(f"{prefix}_scalar", T.INT64, [], "typed", rng))
    out.append(storage_tensor(f"{prefix}_empty", FLOAT, [0, 3], "raw", rng))
    out.append(storage_tensor(f"{prefix}_empty_typed", T.INT32, [3, 0], "typed", rng))
    return out


def with_doc(tensor: onnx.TensorProto, text: str, props: dict | list | None = None) -> onnx.TensorProto:
    tensor.doc_string = text
    for key, value in (props.items() if isinstance(props, dict) else props or []):
        tensor.metadata_props.add(key=key, value=value)
    return tensor


def sparse(name: str, dims: list[int], rng: np.random.Generator, coordinate_form: bool = False):
    """A float SparseTensorProto with two non-zeros (linear or coordinate indices)."""
    size = int(np.prod(dims))
    linear = sorted(rng.choice(size, size=min(2, size), replace=False).tolist())
    values = onh.from_array(rng.standard_normal(len(linear)).astype(np.float32), name)
    if coordinate_form:
        coords = np.array(np.unravel_index(linear, dims)).T.astype(np.int64)
        indices = onh.from_array(coords, "")
    else:
        indices = onh.from_array(np.array(linear, dtype=np.int64), "")
    return oh.make_sparse_tensor(values, indices, dims)


def props(rng: random.Random, tag: str, duplicate: bool = True) -> list[tuple[str, str]]:
    """metadata_props entries, duplicate keys included, in a deliberate (unsorted) order."""
    entries = [("zeta", f"{tag}-1"), ("alpha", f"{tag}-2")]
    if duplicate:
        entries.append(("zeta", f"{tag}-3"))
    if rng.random() < 0.5:
        entries.append(("", "empty key"))
    return entries


def set_props(message, entries) -> None:
    for key, value in entries:
        message.metadata_props.add(key=key, value=value)


# --- the config ------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    seed: int = 0
    #: Only what onnxruntime runs: standard ops (plus the model-local function), IR <= 10.
    runnable: bool = True
    ir_version: int = 9
    #: A Conv -> BatchNormalization corner in the main graph.
    fold_main: bool = False
    #: The BN output of that corner is also a graph output (else: in value_info only).
    bn_is_output: bool = False
    #: The folded Conv weight is >= 64 KiB (a streamed initializer).
    big_folded: bool = False
    #: A BN with no linear neighbour (always kept).
    kept_bn: bool = True
    #: A model-local function (with attribute parameters) called from the main graph.
    function: bool = False
    function_fold: bool = False
    #: "if" or "loop" (or None): a control-flow node with subgraphs.
    subgraph: str | None = None
    subgraph_fold: bool = False
    training_info: bool = False
    sparse: bool = False
    #: An untouched main-graph initializer >= 64 KiB (streamed) with doc_string/props/unknown fields.
    big_untouched: bool = False
    #: Initializers of every dtype and storage form.
    storage: bool = False
    #: Unknown protobuf fields on every kind of message.
    unknown: bool = False
    #: doc_string / metadata_props on everything that has them.
    docs: bool = True
    #: Custom-domain nodes with attributes of every type (never runnable).
    custom: bool = False
    #: ModelProto.configuration and NodeProto.device_configurations (IR >= 11).
    devices: bool = False
    #: On the custom node: SPARSE_TENSOR(S) attributes and a map TypeProto, which onnx_ir
    #: cannot read (kept apart so that they do not hide everything else).
    exotic: bool = False
    #: Constant nodes' tensors are named apart from their outputs ("<output>_t"), else alike.
    distinct_constant_names: bool = True

    @property
    def folds(self) -> bool:
        return self.fold_main or (self.function and self.function_fold) or (
            self.subgraph is not None and self.subgraph_fold)


@st.composite
def configs(draw, runnable: bool | None = None, folds: bool | None = None):
    """A Config; ``runnable`` / ``folds`` pin those aspects when given."""
    runnable = draw(st.booleans()) if runnable is None else runnable
    newest = onnx.IR_VERSION
    ir_version = draw(st.sampled_from([9, 10] if runnable else [9, 10, 11, newest]))
    custom = not runnable
    cfg = Config(
        seed=draw(st.integers(0, 2**31 - 1)), runnable=runnable, ir_version=ir_version,
        fold_main=draw(st.booleans()), bn_is_output=draw(st.booleans()), big_folded=draw(st.booleans()),
        kept_bn=draw(st.booleans()), function=draw(st.booleans()), function_fold=draw(st.booleans()),
        subgraph=draw(st.sampled_from([None, "if", "loop"])), subgraph_fold=draw(st.booleans()),
        training_info=draw(st.booleans()), sparse=draw(st.booleans()), big_untouched=draw(st.booleans()),
        storage=draw(st.booleans()), unknown=draw(st.booleans()), docs=draw(st.booleans()), custom=custom,
        devices=custom and ir_version >= 11 and draw(st.booleans()),
        exotic=custom and draw(st.booleans()),
        distinct_constant_names=draw(st.booleans()),
    )
    if folds is not None:
        if folds and not cfg.folds:
            cfg = replace(cfg, fold_main=True)
        elif not folds:
            cfg = replace(cfg, fold_main=False, function_fold=False, subgraph_fold=False)
    return cfg


# --- the builder -------------------------------------------------------------------------


@dataclass
class Rich:
    model: onnx.ModelProto
    cfg: Config
    feeds: dict[str, np.ndarray] | None
    #: (ledger graph label, site node name) of every BN this model means to be folded.
    expected_folds: set[tuple[str, str]] = field(default_factory=set)
    expected_kept: set[tuple[str, str]] = field(default_factory=set)


class _Graph:
    """Nodes, initializers and value infos of one graph under construction."""

    def __init__(self, owner: "_Builder", name: str):
        self.owner, self.name = owner, name
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.value_info: list[onnx.ValueInfoProto] = []

    def node(self, op, inputs, outputs, name, domain="", doc=True, **attrs) -> onnx.NodeProto:
        node = oh.make_node(op, list(inputs), list(outputs), name=name, domain=domain or None, **attrs)
        if self.owner.cfg.docs and doc:
            node.doc_string = f"node {name} doc"
            if self.owner.ir10:
                set_props(node, props(self.owner.py, f"node-{name}"))
        self.nodes.append(node)
        return node

    def init(self, tensor: onnx.TensorProto, doc: bool = False) -> str:
        if doc and self.owner.cfg.docs:
            with_doc(tensor, f"tensor {tensor.name} doc", props(self.owner.py, f"t-{tensor.name}"))
        self.initializers.append(tensor)
        return tensor.name

    def random(self, name: str, shape, scale=0.5, form="raw", doc=False) -> str:
        array = (self.owner.rng.standard_normal(shape) * scale).astype(np.float32)
        tensor = onh.from_array(array, name)
        if form == "typed":
            tensor = oh.make_tensor(name, FLOAT, list(shape), array.ravel().tolist())
        return self.init(tensor, doc)

    def bn_params(self, prefix: str, channels: int, constants: bool = False, form="raw") -> list[str]:
        r = self.owner.rng
        arrays = [
            (r.uniform(0.5, 2.0, channels) * r.choice([-1, 1], channels)).astype(np.float32),
            r.standard_normal(channels).astype(np.float32),
            r.standard_normal(channels).astype(np.float32),
            r.uniform(0.5, 2.0, channels).astype(np.float32),
        ]
        names = []
        for suffix, array in zip(("scale", "bias", "mean", "var"), arrays):
            name = f"{prefix}_{suffix}"
            tensor = onh.from_array(array, self.owner.tensor_name(name) if constants else name)
            if form == "typed":
                tensor = oh.make_tensor(tensor.name, FLOAT, [channels], array.tolist())
            if constants:
                if self.owner.cfg.docs:
                    with_doc(tensor, f"constant {name} doc", props(self.owner.py, f"c-{name}"))
                self.node("Constant", [], [name], f"{name}_const", value=tensor)
            else:
                self.init(tensor, doc=suffix == "scale")
            names.append(name)
        return names

    def vi(self, name, elem=FLOAT, shape=None, doc=None) -> onnx.ValueInfoProto:
        info = oh.make_tensor_value_info(name, elem, shape)
        if self.owner.cfg.docs:
            info.doc_string = doc or f"value {name} doc"
            if self.owner.ir10:
                set_props(info, props(self.owner.py, f"vi-{name}"))
        return info

    def graph(self, inputs, outputs, doc=True) -> onnx.GraphProto:
        graph = oh.make_graph(self.nodes, self.name, inputs, outputs, self.initializers,
                              value_info=self.value_info)
        if self.owner.cfg.docs and doc:
            graph.doc_string = f"graph {self.name} doc"
            if self.owner.ir10:
                set_props(graph, props(self.owner.py, f"graph-{self.name}"))
        return graph


class _Builder:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.rng = np.random.default_rng(cfg.seed)
        self.py = random.Random(cfg.seed)
        self.ir10 = cfg.ir_version >= 10
        self.expected_folds: set[tuple[str, str]] = set()
        self.expected_kept: set[tuple[str, str]] = set()

    def tensor_name(self, output: str) -> str:
        """The name of a Constant node's tensor that outputs ``output``."""
        return f"{output}_t" if self.cfg.distinct_constant_names else output

    # The Conv -> BN corner: returns the BN (or conv) output name.
    def corner(self, g: _Graph, label: str, prefix: str, source: str, c_in: int, channels: int, fold: bool,
               kernel: int = 3, constants: bool = False, form: str = "raw", out: str | None = None) -> str:
        weight_shape = [channels, c_in, kernel, kernel]
        if constants:
            array = (self.rng.standard_normal(weight_shape) * 0.3).astype(np.float32)
            tensor = onh.from_array(array, self.tensor_name(f"{prefix}_w"))
            g.node("Constant", [], [f"{prefix}_w"], f"{prefix}_w_const", value=tensor)
            weight = f"{prefix}_w"
        else:
            weight = g.random(f"{prefix}_w", weight_shape, 0.3, form=form, doc=True)
        inputs = [source, weight]
        if not constants:
            inputs.append(g.random(f"{prefix}_b", [channels], form=form))
        pad = kernel // 2
        conv_out = f"{prefix}_conv_out" if fold or out is None else out
        # Explicit default attributes: they must come out exactly as they went in.
        g.node("Conv", inputs, [conv_out], f"{prefix}_conv", pads=[pad] * 4, strides=[1, 1], dilations=[1, 1],
               group=1, auto_pad="NOTSET")
        if not fold:
            return conv_out
        bn_out = out or f"{prefix}_bn_out"
        g.node("BatchNormalization", [conv_out, *g.bn_params(f"{prefix}_bn", channels, constants, form)],
               [bn_out], f"{prefix}_bn", epsilon=1e-5, momentum=0.9)
        self.expected_folds.add((label, f"{prefix}_bn"))
        return bn_out

    def build(self) -> Rich:
        cfg, rng = self.cfg, self.rng
        g = _Graph(self, "main_graph")
        inputs = [g.vi("x", FLOAT, [1, 3, 8, 8])]
        outputs: list[onnx.ValueInfoProto] = []
        feeds = {"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)}
        sparse_inits = []
        channels = 72 if cfg.big_folded else 4  # 72*3*9*9*4 bytes >= 64 KiB
        kernel = 9 if cfg.big_folded else 3

        h = "x"
        if cfg.sparse:
            sparse_inits.append(sparse("sp_used", [3, 1, 1], rng))
            sparse_inits.append(sparse("sp_unused", [4, 5], rng, coordinate_form=True))
            g.node("Add", [h, "sp_used"], ["sp_added"], "sparse_add")
            g.node("Constant", [], ["c_sp"], "sparse_const",
                   sparse_value=sparse(self.tensor_name("c_sp"), [3, 1, 1], rng))
            g.node("Mul", ["sp_added", "c_sp"], ["sp_mul"], "sparse_mul")
            h = "sp_mul"

        # The main corner (or the same Conv without a BN).
        form = "typed" if cfg.storage else "raw"
        h = self.corner(g, "main", "main", h, 3, channels, cfg.fold_main, kernel=kernel, form=form)
        if cfg.fold_main:
            for name in ("main_conv_out", "main_bn_out"):
                g.value_info.append(g.vi(name, FLOAT, [1, channels, 8, 8]))
            if cfg.bn_is_output:
                outputs.append(g.vi("main_bn_out", FLOAT, [1, channels, 8, 8], doc="the BN output, a graph output"))
        else:
            g.value_info.append(g.vi("main_conv_out", FLOAT, [1, channels, 8, 8]))
        # Dropout with an empty trailing output (its optional mask).
        g.node("Dropout", [h], ["drop_out", ""], "dropout")
        g.node("LeakyRelu", ["drop_out"], ["leaky_out"], "leaky", alpha=0.01)  # explicit default
        y = "leaky_out"
        if cfg.kept_bn:
            y = g.node("BatchNormalization", [y, *g.bn_params("kept", channels, constants=True)], ["kept_out"],
                       "kept_bn").output[0]
            self.expected_kept.add(("main", "kept_bn"))
        g.node("Identity", [y], ["y"], "")  # an unnamed node
        outputs.insert(0, g.vi("y", FLOAT, [1, channels, 8, 8]))
        g.value_info.append(g.vi("drop_out", FLOAT, [1, channels, 8, 8]))

        if cfg.function:
            call = g.node("Affine", ["x"], ["yf"], "call_fn", domain=FN_DOMAIN, alpha=0.5, beta=0.2)
            if self.ir10:
                call.overload = "v2"
            outputs.append(g.vi("yf", FLOAT, [1, 2, 8, 8]))

        if cfg.subgraph == "if":
            inputs.append(g.vi("cond", T.BOOL, []))
            feeds["cond"] = np.array(True)
            then = _Graph(self, "then_graph")
            label = "main/if_node.then_branch"
            if cfg.subgraph_fold:
                t_out = self.corner(then, label, "then", "x", 3, 3, True, out="then_out")
                then.value_info.append(then.vi("then_conv_out", FLOAT, [1, 3, 8, 8]))
            else:
                mid = self.corner(then, label, "then", "x", 3, 3, False)
                t_out = then.node("Relu", [mid], ["then_out"], "then_relu").output[0]
                then.value_info.append(then.vi(mid, FLOAT, [1, 3, 8, 8]))
            other = _Graph(self, "else_graph")
            other.init(onh.from_array(np.float32(1.5).reshape(1), "else_k"), doc=True)
            other.node("Mul", ["x", "else_k"], ["else_out"], "else_mul")
            g.node("If", ["cond"], ["yif"], "if_node",
                   then_branch=then.graph([], [then.vi(t_out, FLOAT, [1, 3, 8, 8])]),
                   else_branch=other.graph([], [other.vi("else_out", FLOAT, [1, 3, 8, 8])]))
            outputs.append(g.vi("yif", FLOAT, [1, 3, 8, 8]))
        elif cfg.subgraph == "loop":
            g.init(onh.from_array(np.array(2, dtype=np.int64), "trip"))
            body = _Graph(self, "loop_body")
            label = "main/loop_node.body"
            body.node("Identity", ["cond_in"], ["cond_out"], "loop_cond")
            self.corner(body, label, "loop", "v_in", 3, 3, cfg.subgraph_fold, out="v_out")
            body.value_info.append(body.vi("loop_conv_out" if cfg.subgraph_fold else "v_out", FLOAT, [1, 3, 8, 8]))
            body_graph = body.graph(
                [body.vi("iter", T.INT64, []), body.vi("cond_in", T.BOOL, []), body.vi("v_in", FLOAT, [1, 3, 8, 8])],
                [body.vi("cond_out", T.BOOL, []), body.vi("v_out", FLOAT, [1, 3, 8, 8])])
            # The condition input is empty: an empty *middle* input.
            g.node("Loop", ["trip", "", "x"], ["yloop"], "loop_node", body=body_graph)
            outputs.append(g.vi("yloop", FLOAT, [1, 3, 8, 8]))

        if cfg.big_untouched:
            big = onh.from_array(rng.standard_normal((1, STREAMED_BYTES // 4)).astype(np.float32), "big")
            with_doc(big, "a streamed initializer", props(self.py, "big"))
            g.init(big)
            inputs.append(g.vi("x2", FLOAT, [1, STREAMED_BYTES // 4]))
            feeds["x2"] = rng.standard_normal((1, STREAMED_BYTES // 4)).astype(np.float32)
            g.node("Add", ["x2", "big"], ["ybig"], "big_add")
            outputs.append(g.vi("ybig", FLOAT, [1, STREAMED_BYTES // 4]))

        if cfg.storage:
            for tensor in storage_zoo("st", cfg.ir_version, rng, ort_only=cfg.runnable):
                g.init(tensor, doc=self.py.random() < 0.5)

        if cfg.training_info:
            g.init(onh.from_array(np.ones(3, dtype=np.float32), "ti_param"))

        if cfg.custom:
            self.custom_nodes(g, outputs)

        graph = g.graph(inputs, outputs)
        graph.sparse_initializer.extend(sparse_inits)
        if cfg.docs:
            for tensor_name in ["x", "y"] + (["main_bn_out"] if cfg.fold_main else []):
                annotation = graph.quantization_annotation.add(tensor_name=tensor_name)
                annotation.quant_parameter_tensor_names.add(key="SCALE_TENSOR", value=f"{tensor_name}_scale")
                annotation.quant_parameter_tensor_names.add(key="ZERO_POINT_TENSOR", value=f"{tensor_name}_zp")
                annotation.quant_parameter_tensor_names.add(key="SCALE_TENSOR", value="duplicate key")

        opsets = [oh.make_opsetid("", OPSET), oh.make_opsetid("ai.onnx.ml", 3), oh.make_opsetid("org.unused", 2)]
        if cfg.function:
            opsets.append(oh.make_opsetid(FN_DOMAIN, 1))
        if cfg.custom:
            opsets.append(oh.make_opsetid(CUSTOM, 7))
        model = oh.make_model(graph, opset_imports=opsets, producer_name="richgen", producer_version="1.2.3",
                              domain="com.example.models", model_version=42, doc_string="a rich model")
        model.ir_version = cfg.ir_version
        set_props(model, props(self.py, "model", duplicate=False))  # the checker refuses duplicate keys here
        if cfg.function:
            model.functions.append(self.function())
        if cfg.training_info:
            model.training_info.append(self.training_info())
        if cfg.devices:
            conf = model.configuration.add(name="mesh", num_devices=2)
            conf.device.extend(["cpu:0", "cpu:1"])
            node = next(n for n in model.graph.node if n.op_type == "Rich")
            dev = node.device_configurations.add(configuration_id="mesh", pipeline_stage=0)
            spec = dev.sharding_spec.add(tensor_name=node.input[0])
            spec.device.extend([0, 1])
        if cfg.unknown:
            sprinkle_unknown(model, self.py)
            add_unknown(model.graph, 7)
            for opset in model.opset_import:
                add_unknown(opset, 11)
            for tensor in model.graph.initializer:
                if tensor.name == "big":
                    add_unknown(tensor, 13)
        return Rich(model, cfg, feeds if cfg.runnable else None, self.expected_folds, self.expected_kept)

    def function(self) -> onnx.FunctionProto:
        """``Affine(X) = BN(Conv(X * alpha))`` (or a LeakyRelu with ``alpha`` from ``beta``)."""
        cfg = self.cfg
        f = _Graph(self, "fn")
        alpha = oh.make_node("Constant", [], ["fn_alpha"], name="fn_alpha_const")
        alpha.attribute.append(oh.make_attribute_ref("value_float", onnx.AttributeProto.FLOAT, doc_string="ref alpha"))
        alpha.attribute[0].ref_attr_name = "alpha"
        f.nodes.append(alpha)
        f.node("Mul", ["X", "fn_alpha"], ["fn_scaled"], "fn_mul")
        leaky = oh.make_node("LeakyRelu", ["fn_scaled"], ["fn_leaky"], name="fn_leaky")
        leaky.attribute.append(oh.make_attribute_ref("alpha", onnx.AttributeProto.FLOAT))
        leaky.attribute[0].ref_attr_name = "beta"
        f.nodes.append(leaky)
        label = f"function {FN_DOMAIN}::Affine"
        self.corner(f, label, "fn", "fn_leaky", 3, 2, cfg.function_fold, kernel=1, constants=True, out="Y")
        function = oh.make_function(
            FN_DOMAIN, "Affine", ["X"], ["Y"], f.nodes, [oh.make_opsetid("", OPSET)],
            attributes=["beta"], attribute_protos=[oh.make_attribute("alpha", 1.0, doc_string="default alpha")],
            doc_string="a local function" if cfg.docs else None,
        )
        if self.ir10:
            function.overload = "v2"
            if cfg.docs:
                set_props(function, props(self.py, "function"))
                function.value_info.append(f.vi("fn_scaled", FLOAT, [1, 3, 8, 8]))
        return function

    def training_info(self) -> onnx.TrainingInfoProto:
        init = _Graph(self, "ti_init")
        init.node("Constant", [], ["ti_start"], "ti_start_const",
                  value=onh.from_array(np.zeros(3, dtype=np.float32), self.tensor_name("ti_start")))
        step = _Graph(self, "ti_step")
        step.init(onh.from_array(np.full(3, 0.5, dtype=np.float32), "ti_lr"))
        step.node("Sub", ["ti_param", "ti_lr"], ["ti_next"], "ti_sub")
        info = onnx.TrainingInfoProto()
        info.initialization.CopyFrom(init.graph([], [init.vi("ti_start", FLOAT, [3])]))
        info.algorithm.CopyFrom(step.graph([], [step.vi("ti_next", FLOAT, [3])]))
        info.initialization_binding.add(key="ti_param", value="ti_start")
        info.update_binding.add(key="ti_param", value="ti_next")
        return info

    def custom_nodes(self, g: _Graph, outputs: list) -> None:
        """A custom-domain node with an attribute of every type, an unnamed one, unused initializers."""
        rng = self.rng
        sub = _Graph(self, "attr_graph")
        sub.init(onh.from_array(np.ones(2, dtype=np.float32), "attr_graph_c"), doc=True)
        sub.node("Add", ["ag_in", "attr_graph_c"], ["ag_mid"], "ag_add")
        # A BN with no linear neighbour inside a custom node's graph attribute: inspected, kept.
        sub.node("BatchNormalization", ["ag_mid", *sub.bn_params("ag_bn", 2)], ["ag_out"], "ag_bn")
        self.expected_kept.add(("main/rich.body", "ag_bn"))
        sub.value_info.append(sub.vi("ag_mid", FLOAT, [1, 2]))
        body = sub.graph([sub.vi("ag_in", FLOAT, [1, 2])], [sub.vi("ag_out", FLOAT, [1, 2])])
        small = [_Graph(self, f"branch{i}") for i in range(2)]
        for i, b in enumerate(small):
            b.node("Identity", ["b_in"], [f"b_out{i}"], "" if i else "b_id")
        branches = [b.graph([b.vi("b_in", FLOAT, None)], [b.vi(f"b_out{i}", FLOAT, None)]) for i, b in enumerate(small)]
        tp = oh.make_tensor_type_proto(T.FLOAT16, [2, "n"], shape_denotation=["DATA_BATCH", "DATA_CHANNEL"])
        tp.denotation = "TENSOR"
        seq = oh.make_sequence_type_proto(oh.make_tensor_type_proto(T.INT64, None))
        opt = oh.make_optional_type_proto(oh.make_tensor_type_proto(T.BOOL, []))
        map_tp = oh.make_map_type_proto(T.STRING, oh.make_tensor_type_proto(FLOAT, [3]))
        sparse_tp = oh.make_sparse_tensor_type_proto(FLOAT, [4, 4])
        t_attr = with_doc(storage_tensor("attr_t", T.INT32, [2, 2], "typed", rng), "an attribute tensor",
                          props(self.py, "attr-t"))
        attributes = [
            oh.make_attribute("f", 0.25, doc_string="a float"),
            oh.make_attribute("i", -7),
            oh.make_attribute("s", "bytes \x00 \u00e9".encode()),
            oh.make_attribute("t", t_attr),
            oh.make_attribute("body", body),
            oh.make_attribute("floats", [1.5, -0.0, float("inf")]),
            oh.make_attribute("ints", [3, -1, 2**40]),
            oh.make_attribute("strings", [b"a", b"", "\u00e9".encode()]),
            oh.make_attribute("tensors", [storage_tensor("attr_ts0", T.DOUBLE, [2], "typed", rng),
                                          storage_tensor("attr_ts1", T.UINT8, [3], "raw", rng),
                                          storage_tensor("", T.STRING, [1], "typed", rng)]),
            oh.make_attribute("graphs", branches),
            oh.make_attribute("tp", tp),
            oh.make_attribute("type_protos", [seq, opt, sparse_tp] + ([map_tp] if self.cfg.exotic else [])),
            oh.make_attribute("empty_ints", [], attr_type=onnx.AttributeProto.INTS),
            oh.make_attribute("empty_floats", [], attr_type=onnx.AttributeProto.FLOATS),
        ]
        if self.cfg.exotic:
            attributes += [
                oh.make_attribute("sparse_tensor", sparse("attr_sp", [3, 4], rng)),
                oh.make_attribute("sparse_tensors", [sparse("attr_sp0", [5], rng),
                                                     sparse("attr_sp1", [2, 2], rng, coordinate_form=True)]),
            ]
        used = [g.init(with_doc(storage_tensor("rich_w", T.INT8, [4], "typed", rng), "w"))]
        used.append(g.init(storage_tensor("rich_d", T.DOUBLE, [2], "typed", rng)))
        node = g.node("Rich", ["x", *used, "", "y"], ["r", "", "r_extra", ""], "rich", domain=CUSTOM)
        node.attribute.extend(attributes)
        if self.ir10:
            node.overload = "ov1"
        outputs.append(g.vi("r", FLOAT, [1, "n"]))
        outputs.append(g.vi("r_extra", T.INT64, [2]))
        g.node("Tag", ["r"], ["r_tag"], "", domain=CUSTOM)  # unnamed custom node
        outputs.append(g.vi("r_tag", FLOAT, ["a", "b"]))
        # The same attribute given twice on a node is invalid; an attribute named like a
        # standard one on a custom node is not.
        g.node("Rich", ["r_tag"], ["r2"], "rich2", domain=CUSTOM, epsilon=1e-5, training_mode=1)
        outputs.append(g.vi("r2", FLOAT, ["m"]))


def build(cfg: Config) -> Rich:
    return _Builder(cfg).build()


# --- external data ---------------------------------------------------------------------


def tensors_of(model: onnx.ModelProto, initializers=True, attributes=True, subgraphs=True):
    """Every TensorProto that may go to external data: initializers of all graphs (main,
    subgraphs, training_info, function bodies have none) and attribute tensors."""
    def graph_tensors(graph):
        if initializers:
            yield from graph.initializer
        yield from node_tensors(graph.node)

    def node_tensors(nodes):
        for node in nodes:
            for attr in node.attribute:
                if attributes and attr.HasField("t"):
                    yield attr.t
                if attributes:
                    yield from attr.tensors
                if subgraphs:
                    for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                        yield from graph_tensors(sub)

    yield from graph_tensors(model.graph)
    for function in model.functions:
        yield from node_tensors(function.node)
    for info in model.training_info:
        yield from graph_tensors(info.initialization)
        yield from graph_tensors(info.algorithm)


def write_external(model: onnx.ModelProto, path: Path, *, seed: int = 0, fraction: float = 1.0,
                   files: int = 1, keys: str = "mixed", align: int = 1, pick=None) -> list[str]:
    """Write ``model`` to ``path`` with some tensors moved to external data by hand.

    ``pick(tensor)`` (default: every non-string tensor with a name, with probability
    ``fraction``) chooses tensors; they go to ``files`` data files beside ``path``, each
    starting at a multiple of ``align``. ``keys``: "mixed" (offset / length / checksum
    present or not at random, sometimes reordered), "all", or "minimal" (location only
    where the offset is 0). Typed data (float_data, ...) is converted to raw bytes first.
    Returns the names of the tensors moved.
    """
    rng = random.Random(seed)
    model = copy.deepcopy(model)
    moved = []
    handles: dict[str, bytearray] = {}
    for tensor in tensors_of(model):
        if tensor.data_type == T.STRING or tensor.data_location == T.EXTERNAL:
            continue
        if pick is not None:
            if not pick(tensor):
                continue
        elif not tensor.name or rng.random() >= fraction:
            continue
        data = tensor.raw_data if tensor.HasField("raw_data") else _typed_to_raw(tensor)
        for name in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "raw_data"):
            tensor.ClearField(name)
        location = f"{path.stem}.data" if files == 1 else f"{path.stem}.{rng.randrange(files)}.data"
        buffer = handles.setdefault(location, bytearray())
        while len(buffer) % align:
            buffer.append(0)
        offset = len(buffer)
        buffer.extend(data)
        entries = [("location", location)]
        mode = keys if keys != "mixed" else rng.choice(["all", "some", "minimal"])
        if mode == "all" or (mode == "some" and rng.random() < 0.5) or offset:
            entries.append(("offset", str(offset)))
        if mode == "all" or (mode == "some" and rng.random() < 0.5):
            entries.append(("length", str(len(data))))
        if mode == "all" or (mode == "some" and rng.random() < 0.5):
            entries.append(("checksum", hashlib.sha1(bytes(data)).hexdigest()))
        if keys == "mixed" and rng.random() < 0.3:
            rng.shuffle(entries)
        if mode == "minimal" and offset == 0:
            entries = [("location", location)]
        for key, value in entries:
            tensor.external_data.add(key=key, value=value)
        tensor.data_location = T.EXTERNAL
        moved.append(tensor.name)
    for location, buffer in handles.items():
        (path.parent / location).write_bytes(bytes(buffer))
    path.write_bytes(model.SerializeToString())
    return moved


def _typed_to_raw(tensor: onnx.TensorProto) -> bytes:
    array = onh.to_array(tensor)
    return onh.from_array(array, tensor.name).raw_data
