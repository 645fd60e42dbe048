"""Composed random ONNX models for the differential fuzzer (tests/test_fuzz.py).

Two halves:

- ``recipes()``: a hypothesis strategy that draws a *recipe*, a plain dict of choices
  (its ``repr`` pastes back into Python). It composes what the single-pattern suite drew
  one at a time:

  - chains of linear ops (Conv 1-D/2-D with any group/stride/pads/dilation/auto_pad and
    bias or not, ConvTranspose, Gemm with transA/transB/alpha/beta and every C shape,
    MatMul with a 2-D (or 1-D, or batched 3-D) constant B, MatMul + bias Add), BN sites
    (realistic statistics, sometimes degenerate: tiny/zero/negative variance, gamma 0,
    NaN/inf; epsilon, momentum, training_mode=0, opset-7/8 spatial), constant
    Mul/Add/Sub/Div sites (per-channel [C,1,1]/[1,C,1,1], scalar, [1], along the wrong
    axis, per element, broadcasting the tensor up a rank or a size-1 axis), layout ops
    (Transpose, Reshape, Flatten, Squeeze, Unsqueeze, Identity) and Relu between them,
    a site before a linear op (before a Gemm with every transA/transB, directly, through
    a Flatten or a Transpose);
  - two linear ops of one kind reading the same input, joined by a Concat along their
    channel axis (other channel counts, groups, or a kernel 2 wider and padded 1 more:
    timm's mixed convolutions) or along another axis, then sites;
  - Transposes by any permutation, by cycles of 3 or more axes, by moves of the channel
    axis to axis 1 or the last (``[0, 2, 3, 1]``, ``[0, 3, 1, 2]``) and by the inverses of
    such moves: not their own inverses, so a fold that follows an axis the wrong way
    round lands on the wrong axis;
  - fan-out and outputs: a value that is also a graph output, read by a second node, or
    read inside an If branch; a weight shared by a second node or by both If branches;
  - nesting: part of the chain in an If (both branches), Loop or Scan body, reading the
    enclosing graph's values, or in a model-local function called once or twice, with
    attributes given by reference (Gemm transB/alpha/beta, Conv group/pads, BN epsilon,
    Transpose perm; defaults; call sites that disagree) and weights as Constants, as
    function inputs or as tensor attributes of the call;
  - IR 3 (opset 7-9, initializers listed as inputs) and IR 9 (opset 13-17);
    float32/float16/float64; 1 or 0 channels, 0-size batch or spatial dims, big (>= 64
    KiB) weights; parameters as initializers (here or in the enclosing graph), Constant
    nodes (value, value_float(s), value_int(s), sparse_value) or a small constant
    subgraph (Identity/Cast/Reshape); value_info full, partial or none; dynamic batch;
    overridable initializers (IR >= 4); empty or odd node and value names; tensors as
    raw_data or typed fields; the main graph split over two protobuf chunks.

- ``build(recipe)``: turns a recipe into ``(ModelProto, feeds)`` deterministically (all
  random tensor values come from ``recipe["seed"]``), so a shrunk failing recipe is a
  regression test: ``build({...})``; ``serialize(model, recipe["encoding"])`` gives
  the bytes. ``build(recipe, squares=True)`` gives its square model (``Builder``), from
  which the oracle bounds rounding.

The shape bookkeeping (``State``/``advance``) is shared by both halves: the strategy uses
it to draw only choices that are valid where they land, the builder to size tensors.

Not drawn, because onnxruntime (the oracle) cannot run it: bfloat16 (no CPU kernel for
Conv, ConvTranspose, Gemm, MatMul, BatchNormalization, Relu or Add/Sub/Mul/Div in
onnxruntime 1.32), float64 Conv/ConvTranspose (no kernel), a Conv on a 0-size spatial
dim, dilation with auto_pad SAME, two nodes with the same non-empty name, a
Constant(sparse_value) inside a model-local function (onnxruntime segfaults creating
some such sessions: four crashes in ~70,000 graphs, each model had one; densifying the
constant avoids it); nor sparse initializers (onnx's checker cannot infer their shapes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as onh
from hypothesis import strategies as st
from onnx import TensorProto

DTYPES = {
    "float32": (np.float32, TensorProto.FLOAT),
    "float16": (np.float16, TensorProto.FLOAT16),
    "float64": (np.float64, TensorProto.DOUBLE),
}
MAX_ELEMENTS = 320  # per example (batch excluded) for convolutions: keeps every graph cheap
MAX_TOTAL = 70_000  # elements of any tensor in the chain (the big weights' outputs fit)
MAX_RANK = 5
BIG_BYTES = 66_000  # above bnfold's 64 KiB threshold for weights kept in the file
FUNC_DOMAIN = "local"

# --- shapes ---------------------------------------------------------------------------


@dataclass(frozen=True)
class State:
    """The tensor flowing along the chain: its concrete shape (batch included), where the
    batch axis is (None once merged away), and where the last linear op's output channels
    are (followed through layout ops; None when unknown or squeezed away)."""

    shape: tuple
    batch_axis: int | None
    chan: int | None

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(d for i, d in enumerate(self.shape) if i != self.batch_axis)


def conv_out(length, k, stride, dilation, pad_begin, pad_end, auto_pad):
    extent = dilation * (k - 1) + 1
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        return -(-length // stride)
    if auto_pad == "VALID":
        pad_begin = pad_end = 0
    return (length + pad_begin + pad_end - extent) // stride + 1


def convt_out(length, k, stride, pad_begin, pad_end, out_pad):
    return stride * (length - 1) + out_pad + k - pad_begin - pad_end


def track_reshape(old, new, chan):
    """Where channel axis ``chan`` of ``old`` ends up after a reshape to ``new`` (or None)."""
    if chan is None:
        return None
    before, through = math.prod(old[:chan]), math.prod(old[: chan + 1])
    for j in range(len(new)):
        if math.prod(new[:j]) == before and new[j] == old[chan] and math.prod(new[: j + 1]) == through:
            return j
    return None


def moved(axis, perm):
    return None if axis is None else perm.index(axis)


def advance(state: State, step: dict) -> State:
    """The state after one step (nesting steps included)."""
    op, shape = step["op"], list(state.shape)
    if op in ("bn", "relu", "identity"):
        return state
    if op in ("Mul", "Add", "Sub", "Div"):
        if step["form"] == "expand_rank":  # the constant has one more axis: so has the output
            shift = lambda a: None if a is None else a + 1  # noqa: E731
            return State((1, *shape), shift(state.batch_axis), shift(state.chan))
        if step["form"] == "bcast_chan":  # the constant broadcasts a size-1 axis up
            shape[step["axis"]] = step["size"]
            return State(tuple(shape), state.batch_axis, state.chan)
        return state
    if op == "conv":
        spatial = [conv_out(shape[2 + i], step["k"][i], step["stride"], step["dilation"],
                            step["pads"][i], step["pads"][i + step["dims"]], step["auto_pad"])
                   for i in range(step["dims"])]
        return State((shape[0], step["cout"], *spatial), state.batch_axis if state.batch_axis == 0 else None, 1)
    if op == "convT":
        spatial = [convt_out(shape[2 + i], step["k"][i], step["stride"], step["pads"][i],
                             step["pads"][i + step["dims"]], step["out_pad"]) for i in range(step["dims"])]
        return State((shape[0], step["cout"], *spatial), state.batch_axis if state.batch_axis == 0 else None, 1)
    if op == "gemm":
        m = shape[1] if step["transA"] else shape[0]
        keep = 1 if step["transA"] else 0
        return State((m, step["n"]), 0 if state.batch_axis == keep else None, 1)
    if op == "matmul":
        rank = len(shape)
        if step.get("b") == "1d":  # (..., K) @ (K,) -> (...)
            return State(tuple(shape[:-1]), None if state.batch_axis == rank - 1 else state.batch_axis, None)
        if step.get("b") == "3d":  # (..., M, K) @ (g, K, N): batch dims broadcast
            if rank == 2:
                batch = None if state.batch_axis is None or state.batch_axis == 1 else 1
                return State((step["g"], shape[0], step["n"]), batch, 2)
            # g is 1 or shape[-3]: the output's batch dims are the input's
        return State((*shape[:-1], step["n"]), None if state.batch_axis == rank - 1 else state.batch_axis, rank - 1)
    if op == "transpose":
        perm = step["perm"] or list(reversed(range(len(shape))))
        return State(tuple(shape[p] for p in perm), moved(state.batch_axis, perm), moved(state.chan, perm))
    if op == "reshape":
        new = resolve_reshape(shape, step["to"])
        batch = 0 if state.batch_axis == 0 and step["to"][0] == 0 else None
        return State(tuple(new), batch, track_reshape(shape, new, state.chan))
    if op == "flatten":
        k = step["axis"]
        new = (math.prod(shape[:k]), math.prod(shape[k:]))
        return State(new, 0 if state.batch_axis == 0 and k == 1 else None, track_reshape(shape, new, state.chan))
    if op == "squeeze":
        axes = step["axes"] if step["axes"] is not None else [i for i, d in enumerate(shape) if d == 1]
        keep = [i for i in range(len(shape)) if i not in axes]
        remap = {old: new for new, old in enumerate(keep)}
        return State(tuple(shape[i] for i in keep), remap.get(state.batch_axis), remap.get(state.chan))
    if op == "unsqueeze":
        rank = len(shape) + len(step["axes"])
        keep = [i for i in range(rank) if i not in step["axes"]]
        new = [1] * rank
        for new_axis, old_axis in zip(keep, range(len(shape))):
            new[new_axis] = shape[old_axis]
        remap = {old: new for old, new in zip(range(len(shape)), keep)}
        return State(tuple(new), remap.get(state.batch_axis), remap.get(state.chan))
    if op == "if":
        return advance_all(state, step["body"])
    if op == "loop":
        return advance_all(state, step["body"])  # the trip-count axis is squeezed again
    if op == "scan":
        inner = advance_all(scan_inner_state(state), step["body"])
        return State((state.shape[0], math.prod(inner.shape)), 0 if state.batch_axis == 0 else None, None)
    if op == "func":
        return advance_all(state, step["body"])
    if op in CROSSINGS:
        return _advance_crossing(state, step)
    if op == "sum":
        return advance_all(state, step["chains"][0])
    if op == "concat":
        outs = [advance(state, branch) for branch in step["branches"]]
        axis = step["axis"] % outs[0].rank
        shape = list(outs[0].shape)
        shape[axis] = sum(out.shape[axis] for out in outs)
        return State(tuple(shape), None if outs[0].batch_axis == axis else outs[0].batch_axis, outs[0].chan)
    raise ValueError(op)


#: Ops a map may cross (bnfold.patterns.crossing), one step each.
CROSSINGS = {"pool", "reduce", "resize", "slice", "pad", "gather", "split"}


def pool_out(length, k, stride, pad_begin, pad_end):
    return (length + pad_begin + pad_end - k) // stride + 1


def _advance_crossing(state: State, step: dict) -> State:
    op, shape, rank = step["op"], list(state.shape), state.rank
    if op == "pool":
        if step["type"].startswith("Global"):
            return State((*shape[:2], *([1] * (rank - 2))), state.batch_axis, state.chan)
        dims = rank - 2
        spatial = [pool_out(shape[2 + i], step["k"], step["stride"], step["pads"][i], step["pads"][i + dims])
                   for i in range(dims)]
        return State((*shape[:2], *spatial), state.batch_axis, state.chan)
    if op == "reduce":
        axes = sorted(a % rank for a in step["axes"])
        if step["keepdims"]:
            return State(tuple(1 if i in axes else d for i, d in enumerate(shape)), state.batch_axis, state.chan)
        keep = [i for i in range(rank) if i not in axes]
        remap = {old: new for new, old in enumerate(keep)}
        return State(tuple(shape[i] for i in keep), remap.get(state.batch_axis), remap.get(state.chan))
    if op == "resize":
        return State(tuple(int(d * f) for d, f in zip(shape, step["scales"])), state.batch_axis, state.chan)
    if op in ("slice", "gather", "split"):
        axis = step["axis"] % rank
        if op == "slice":
            shape[axis] = len(range(*slice(step["start"], step["end"], step["step"]).indices(shape[axis])))
        elif op == "gather":
            shape[axis] = len(step["indices"])
        else:
            shape[axis] = step["sizes"][step["take"]]
        return State(tuple(shape), state.batch_axis if state.batch_axis != axis else None, state.chan)
    if op == "pad":
        return State(tuple(d + step["pads"][i] + step["pads"][i + rank] for i, d in enumerate(shape)),
                     state.batch_axis if not (step["pads"][0] or step["pads"][rank]) else None, state.chan)
    raise ValueError(op)


def advance_all(state: State, steps: list[dict]) -> State:
    for step in steps:
        state = advance(state, step)
    return state


def scan_inner_state(state: State) -> State:
    """A Scan body sees one slice along axis 0, unsqueezed back to rank."""
    return State((1, *state.shape[1:]), 0, state.chan if state.chan != 0 else None)


def resolve_reshape(shape, to):
    new = [shape[i] if d == 0 else d for i, d in enumerate(to)]
    if -1 in new:
        known = math.prod(d for d in new if d != -1)
        new[new.index(-1)] = math.prod(shape) // known
    return new


# --- the strategy ---------------------------------------------------------------------


@dataclass(frozen=True)
class Env:
    """Where steps are being drawn: what the model allows and what this scope allows."""

    dtype: str
    opset: int
    ir: int
    scope: str = "main"  # main | sub | func
    in_func: bool = False
    depth: int = 0


def divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0] if n > 0 else [1]


@st.composite
def recipes(draw):
    ir_version = draw(st.sampled_from([9, 9, 9, 3]))
    opset = draw(st.sampled_from([9, 8, 7])) if ir_version == 3 else draw(st.sampled_from([17, 13, 14, 15, 16]))
    dtype = draw(st.sampled_from(["float32", "float32", "float32", "float16", "float64"]))
    rank = draw(st.sampled_from([4, 2, 3]))
    channels = draw(st.sampled_from([3, 1, 2, 4] * 4 + [0]))
    spatial = [0 if draw(st.integers(0, 15)) == 15 else draw(st.integers(1, 5)) for _ in range(rank - 2)]
    batch = draw(st.sampled_from([2, 2, 2, 1, 0]))
    state = State((batch, channels, *spatial), 0, None)
    env = Env(dtype, opset, ir_version)
    steps, state = draw_steps(draw, state, env, max_parts=4)
    recipe = dict(
        ir=ir_version, opset=opset, dtype=dtype, seed=draw(st.integers(0, 2**32 - 1)),
        input=[batch, channels, *spatial], dynamic_batch=draw(st.booleans()),
        steps=steps,
        params=draw(st.sampled_from(["init", "const", "subgraph", "mixed"])),
        value_info=draw(st.sampled_from(["full", "none", "partial"])),
        output_shapes=draw(st.booleans()),
        overridable=ir_version >= 4 and draw(st.integers(0, 9)) == 9,
        share=draw(st.integers(0, 3)) == 3,
        # onnxruntime 1.32 crashes (SIGSEGV) loading some models whose nodes are all unnamed
        # and that call model-local functions: valid models, but they would kill the run.
        names=draw(st.sampled_from(["unique"] * 8 + ["odd"] + ([] if _calls_functions(steps) else ["empty"]))),
        encoding=draw(st.sampled_from(["canonical"] * 6 + ["typed", "chunked"])),
        cond=draw(st.booleans()),
        flags=draw(st.sampled_from([{}, {}, {}, {"decompose_standalone": True}, {"fold_overridable": True},
                                    {"to_inference": True},
                                    {"decompose_standalone": True, "fold_overridable": True}])),
    )
    return recipe


def _calls_functions(steps: list[dict]) -> bool:
    return any(step["op"] == "func" for step in walk(steps))


def draw_steps(draw, state: State, env: Env, max_parts: int):
    """1..max_parts parts; a part is a motif (linear op, layout ops, sites: what folds,
    or a BN before a linear op) or a single step (site, linear, layout, Relu, nest)."""
    steps = []
    parts = draw(st.integers(1, max_parts))
    kinds = ["chain", "site", "before", "chain", "layout", "relu", "nest", "linear", "chain", "site", "before_gemm",
             "concat", "route_after", "route_before", "branches", "fork"]
    for _ in range(parts):
        kind = draw(st.sampled_from(kinds))
        if kind == "nest" and env.depth >= 2:
            kind = "chain"
        if kind == "chain":
            new = draw_linear(draw, state, env)
            new += draw(st.sampled_from([[], [], ["layout"], ["layout"] * 2, ["transpose"], ["transpose"] * 2]))
            new += ["site"] * draw(st.integers(1, 3))
        elif kind == "before":  # a site (mostly a BN) before a linear op, maybe behind a layout op
            first = "bn" if draw(st.integers(0, 2)) else "site"
            between = draw(st.sampled_from([[]] * 4 + [["layout"], ["transpose"], ["transpose"] * 2]))
            new = [first] + between + ["linear"]
        elif kind == "before_gemm":  # a site before a Gemm, any transA/transB, maybe through Flatten/Transpose
            first = "bn" if draw(st.integers(0, 2)) else "site"
            flatten = [{"op": "flatten", "axis": 1}] if state.rank > 2 and draw(st.booleans()) else []
            new = flatten + [first] + (["layout"] if draw(st.integers(0, 3)) == 3 else []) + ["gemm"]
        elif kind == "concat":  # two linear ops joined by a Concat, then sites that may fold into both
            new = ["concat"] + draw(st.sampled_from([[], [], ["layout"], ["transpose"]]))
            new += ["bn" if draw(st.booleans()) else "site"] + ["site"] * draw(st.integers(0, 1))
        elif kind == "route_after":  # a linear op, ops a map may cross, then sites
            new = draw_linear(draw, state, env) + ["cross"] * draw(st.integers(1, 2))
            new += ["bn" if draw(st.booleans()) else "site"] + ["site"] * draw(st.integers(0, 1))
        elif kind == "route_before":  # a site, ops a map may cross, then a linear op
            new = ["bn" if draw(st.integers(0, 2)) else "site"] + ["cross"] * draw(st.integers(1, 2)) + ["linear"]
        elif kind in ("branches", "fork"):  # parallel branches summed; a fork: a site before them
            new = (["bn" if draw(st.integers(0, 2)) else "site"] if kind == "fork" else []) + ["sum"]
            new += ["bn"] * draw(st.integers(0, 1))
        elif kind == "linear":
            new = draw_linear(draw, state, env)
        elif kind == "relu":
            new = [{"op": "relu"}]
        elif kind == "nest":
            new = [draw_nest(draw, state, env)]
        else:
            new = [kind]
        for step in new:
            # placeholders are drawn where they land, from the state there
            if step == "site":
                step = draw_site(draw, state, env)
            elif step == "bn":
                step = draw_site(draw, state, env, bn=True)
            elif step in ("layout", "transpose"):
                step = draw_layout(draw, state, env, step if step == "transpose" else None)
            elif step == "cross":
                step = draw_crossing(draw, state, env)
            elif step == "sum":
                step = draw_sum(draw, state, env)
            elif step in ("linear", "gemm", "concat"):
                for s in draw_linear(draw, state, env, only=step if step == "gemm" else None, concat=step == "concat"):
                    if math.prod(advance(state, s).shape) <= MAX_TOTAL:
                        s["tap"] = draw_tap(draw, env)
                        steps.append(s)
                        state = advance(state, s)
                continue
            if step is None or math.prod(advance(state, step).shape) > MAX_TOTAL:
                continue
            step["tap"] = draw_tap(draw, env)
            steps.append(step)
            state = advance(state, step)
    return steps, state


def draw_tap(draw, env: Env):
    """Another reader of the step's output: none, graph output, a Relu, a subgraph."""
    taps = [None] * 14 + ["out", "relu"] + (["sub"] if env.scope == "main" else [])
    tap = draw(st.sampled_from(taps))
    if tap == "out" and env.scope != "main":
        return None
    return tap


def nonfinite(draw, rare=30):
    """Mostly None; sometimes 'nan' or 'inf' (one element of the constant)."""
    return draw(st.sampled_from([None] * rare + ["nan", "inf", "-inf"]))


def draw_linear(draw, state: State, env: Env, only: str | None = None, concat: bool = False) -> list[dict]:
    """A linear op (with the adapters its input needs); with ``concat`` (else sometimes)
    two reading the same input whose outputs a Concat joins (``draw_concat``)."""
    steps = _draw_linear(draw, state, env, only)
    if steps and steps[-1]["op"] in ("conv", "convT", "gemm", "matmul") and (concat or draw(st.integers(0, 5)) == 5):
        before = advance_all(state, steps[:-1])
        steps[-1] = draw_concat(draw, before, env, steps[-1])
    return steps


def _draw_linear(draw, state: State, env: Env, only: str | None = None) -> list[dict]:
    kinds = ["gemm", "matmul", "matmul_add"]
    if env.dtype != "float64":
        kinds = ["conv", "conv", "convT"] + kinds
    kind = only or draw(st.sampled_from(kinds))
    adapters = []
    if kind in ("conv", "convT"):
        dims = draw(st.sampled_from([2, 1]))
        if 0 in state.shape[1:]:
            return []
        if state.rank < dims + 2:
            adapters.append({"op": "unsqueeze", "axes": list(range(state.rank, dims + 2))})
        elif state.rank > dims + 2:
            head, tail = state.shape[: dims + 1], math.prod(state.shape[dims + 1:])
            if state.shape[0] == 0 and state.batch_axis != 0:
                return []
            adapters.append({"op": "reshape", "to": [0 if state.batch_axis == 0 else head[0], *head[1:], tail]})
        for a in adapters:
            state = advance(state, a)
        step = draw_conv(draw, state, env, dims, transposed=kind == "convT")
        if step is None:
            return []
        return adapters + [step]
    if kind == "gemm" and state.rank != 2:
        adapters.append({"op": "flatten", "axis": draw(st.sampled_from([1, state.rank - 1]))})
        state = advance(state, adapters[-1])
    trans_a = kind == "gemm" and draw(st.booleans())
    n = draw(st.sampled_from([3, 1, 2, 4, 5, 3, 1, 2, 4, 5, "big", 0]))
    if n == "big":
        # A weight of at least 64 KiB: bnfold keeps main-graph initializers that large in
        # the file at load (bnfold.wire) and computes their folds while saving.
        k = state.shape[0] if trans_a else state.shape[-1]
        n = -(-BIG_BYTES // (k * np.dtype(DTYPES[env.dtype][0]).itemsize)) if k and env.scope == "main" else 3
    if kind == "gemm":
        m = state.shape[1] if trans_a else state.shape[0]
        c = draw(st.sampled_from(["n", "none", "scalar", "one", "1n", "mn", "m1"]))
        if env.opset < 11 and c == "none":
            c = "n"
        beta = draw(st.sampled_from([1.0, 0.0, 2.0, -0.5]))
        step = dict(op="gemm", n=n, transA=int(trans_a), transB=draw(st.sampled_from([0, 1])),
                    alpha=draw(st.sampled_from([1.0, 0.5, -1.5, 0.0])), beta=beta, c=c,
                    w_bad=nonfinite(draw), c_bad=nonfinite(draw, rare=4) if beta == 0.0 and c != "none" else None)
        if m == 0 and c in ("mn", "m1"):
            step["c"] = "n"
        step["twin"] = draw_twin(draw)
        step["ref"] = draw_refs(draw, env, ["transB", "alpha", "beta"])
        return adapters + [step]
    step = dict(op="matmul", n=n, bias=None, w_bad=nonfinite(draw), b="2d", twin=draw_twin(draw))
    if kind == "matmul":  # a B that is not 2-D: no channel axis to fold along (or a broadcast one)
        b = draw(st.sampled_from(["2d"] * 8 + ["1d", "3d"]))
        if b == "1d" and state.rank >= 3 and state.shape[-1] > 0:
            step["b"] = "1d"
        elif b == "3d" and state.rank <= 4:
            step["b"], step["g"] = "3d", draw(st.sampled_from([1] + ([state.shape[-3]] if state.rank >= 3 else [2])))
    if kind == "matmul_add":
        step["bias"] = draw(st.sampled_from(["n", "1n", "scalar"]))
        step["bias_first"] = draw(st.booleans())
    return adapters + [step]


def draw_concat(draw, state: State, env: Env, first: dict) -> dict:
    """``first`` and a second linear op of its kind on the same input, joined by a Concat:
    along the channel axis (each owns a slice of the channels: a map after it folds
    slice by slice; timm's mixed convolutions, with another kernel size and padding), or
    along another axis (every channel spans both: a map after it is kept). ``first`` alone
    where its output has no channel axis or the pair would be too big."""
    out = advance(state, first)
    if out.chan is None or first.get("b") == "1d":
        return first
    along = draw(st.sampled_from(["chan", "other"]))
    others = [a for a in range(out.rank) if a != out.chan]
    if along == "other" and not others:
        along = "chan"
    taps = [draw_tap(draw, env) if draw(st.booleans()) else None for _ in range(2)]  # a tap is fan-out: rarer
    second = dict(first, twin=draw_twin(draw), w_bad=nonfinite(draw), tap=taps[1])
    first = dict(first, tap=taps[0])
    op = first["op"]
    if op in ("conv", "convT"):
        second["bias"] = draw(st.booleans())
    if along == "chan":
        axis = out.chan
        if op in ("conv", "convT"):
            group = draw(st.sampled_from(divisors(state.shape[1])))
            second.update(group=group, cout=group * draw(st.sampled_from([1, 2, 3])))
            if op == "conv" and first["stride"] == first["dilation"] == 1 and first["auto_pad"] == "NOTSET" \
                    and draw(st.booleans()):  # a kernel 2 wider, padded 1 more: the same output size
                second.update(k=[k + 2 for k in first["k"]], pads=[p + 1 for p in first["pads"]], explicit_pads=True,
                              ref=[r for r in first["ref"] if r != "pads"])
        else:
            second["n"] = draw(st.sampled_from([1, 2, 3, 5]))
    else:
        axis = draw(st.sampled_from(others))
    if env.opset >= 11 and draw(st.booleans()):
        axis -= out.rank  # Concat-11 takes a negative axis
    step = {"op": "concat", "axis": axis, "branches": [first, second]}
    joined = advance(state, step)
    if op in ("conv", "convT") and joined.size > MAX_ELEMENTS or math.prod(joined.shape) > MAX_TOTAL:
        return first
    return step


def draw_conv(draw, state: State, env: Env, dims: int, transposed: bool):
    c_in = state.shape[1]
    group = draw(st.sampled_from(divisors(c_in)))
    cout = group * draw(st.sampled_from([1, 2, 3]))
    lengths = state.shape[2:]
    if transposed:
        stride = draw(st.sampled_from([1, 2])) if all(length <= 4 for length in lengths) else 1
        k = [draw(st.integers(1, 3)) for _ in range(dims)]
        out_pad = draw(st.sampled_from([0, 1])) if stride > 1 else 0
        pads = [draw(st.integers(0, k[i % dims] - 1)) for i in range(2 * dims)]
        for i in range(dims):
            while convt_out(lengths[i], k[i], stride, pads[i], pads[i + dims], out_pad) < 1:
                pads[i] = pads[i + dims] = 0
        step = dict(op="convT", dims=dims, cout=cout, group=group, k=k, stride=stride, pads=pads,
                    out_pad=out_pad, bias=draw(st.booleans()), w_bad=nonfinite(draw), twin=draw_twin(draw))
        step["ref"] = []
    else:
        auto_pad = draw(st.sampled_from(["NOTSET", "NOTSET", "NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"]))
        stride = draw(st.sampled_from([1, 2]))
        # onnxruntime: "Dilation not supported for AutoPadType::SAME_UPPER or SAME_LOWER"
        dilation = draw(st.sampled_from([1, 2])) if not auto_pad.startswith("SAME") else 1
        k = [draw(st.integers(1, 3)) for _ in range(dims)]
        pads = [draw(st.integers(0, 1)) if auto_pad == "NOTSET" else 0 for _ in range(2 * dims)]
        for i in range(dims):
            while conv_out(lengths[i], k[i], stride, dilation, pads[i], pads[i + dims], auto_pad) < 1:
                if k[i] > 1:
                    k[i] -= 1
                else:
                    pads[i] += 1
        explicit = auto_pad == "NOTSET" and draw(st.booleans()) or any(pads)
        step = dict(op="conv", dims=dims, cout=cout, group=group, k=k, stride=stride, dilation=dilation,
                    pads=pads, auto_pad=auto_pad, explicit_pads=explicit,
                    bias=draw(st.booleans()), w_bad=nonfinite(draw), twin=draw_twin(draw))
        step["ref"] = draw_refs(draw, env, ["group"] + (["pads"] if step["explicit_pads"] else []))
    new = advance(state, step)
    if new.size > MAX_ELEMENTS:
        return None
    return step


def draw_twin(draw):
    """Another node reading the same weight (and input): the weight is shared."""
    return draw(st.integers(0, 11)) == 11


def draw_refs(draw, env: Env, names):
    if not env.in_func:
        return []
    return draw(st.lists(st.sampled_from(names), unique=True, max_size=len(names)))


def draw_site(draw, state: State, env: Env, bn: bool = False) -> dict:
    ops = ["Mul", "Add", "Sub", "Div"]
    if state.rank >= 2 and state.shape[1] > 0:
        ops = ["bn", "Mul", "Add", "bn", "Sub", "Div"]
    op = draw(st.sampled_from(ops)) if not (bn and "bn" in ops) else "bn"
    if op == "bn":
        stats = draw(st.sampled_from(["normal"] * 16 + ["tiny_var", "gamma0", "zero_var", "nan", "neg_var", "inf"]))
        eps = draw(st.sampled_from([1e-5, 1e-3, 0.1]))
        if env.dtype == "float16" and stats in ("tiny_var", "zero_var"):
            eps = 0.1  # s = gamma/sqrt(var+eps) must stay well inside float16's range
        step = dict(op="bn", stats=stats, eps=eps, ref=draw_refs(draw, env, ["epsilon"]))
        if env.opset >= 15 and env.dtype == "float16":
            step["param_dtype"] = draw(st.sampled_from(["float16", "float16", "float32"]))
        extra = draw(st.sampled_from([None] * 6 + ["momentum", "training_mode", "spatial0", "spatial1"]))
        if extra == "training_mode" and env.opset >= 14 or extra == "momentum":
            step["attrs"] = {"training_mode": 0} if extra == "training_mode" else {"momentum": 0.8}
        elif extra in ("spatial0", "spatial1") and env.opset <= 8:
            step["attrs"] = {"spatial": int(extra == "spatial1")}
        return step
    forms = ["chan", "chan_full", "scalar", "chan", "one", "axis1", "chan_full", "elementwise",
             "expand_rank", "bcast_chan"]
    form = draw(st.sampled_from(forms))
    step = dict(op=op, form=form, first=op != "Div" and draw(st.booleans()),
                bad=draw(st.sampled_from([None] * 30 + ["nan", "inf", "zero"])))
    ones = [i for i, d in enumerate(state.shape) if d == 1]
    if form == "expand_rank" and state.rank >= MAX_RANK or form == "bcast_chan" and not ones:
        step["form"] = "chan"
    elif form == "bcast_chan":
        step["axis"] = state.chan if state.chan in ones else draw(st.sampled_from(ones))
        step["size"] = draw(st.sampled_from([3, 2]))
    return step


def draw_layout(draw, state: State, env: Env, kind: str | None = None):
    rank = state.rank
    kind = kind or draw(st.sampled_from(["transpose", "reshape", "flatten", "squeeze", "unsqueeze", "identity"]))
    if kind == "transpose":
        perm = draw_perm(draw, rank, state.chan)
        step = {"op": "transpose", "perm": None if draw(st.integers(0, 5)) == 5 else perm}
        step["ref"] = draw_refs(draw, env, ["perm"]) if step["perm"] is not None else []
        return step
    if kind == "flatten":
        return {"op": "flatten", "axis": draw(st.integers(0, rank))}
    if kind == "squeeze":
        ones = [i for i, d in enumerate(state.shape) if d == 1]
        removable = min(len(ones), rank - 2)  # keep rank >= 2
        if removable >= 1:
            axes = sorted(draw(st.lists(st.sampled_from(ones), unique=True, min_size=1, max_size=removable)))
            everything = len(axes) == len(ones)
            return {"op": "squeeze", "axes": None if everything and draw(st.integers(0, 3)) == 3 else axes}
        kind = "unsqueeze"
    if kind == "unsqueeze":
        if rank >= MAX_RANK:
            return {"op": "identity"}
        count = draw(st.integers(1, min(2, MAX_RANK - rank)))
        axes = sorted(draw(st.permutations(range(rank + count)))[:count])
        return {"op": "unsqueeze", "axes": axes}
    if kind == "reshape":
        return draw_reshape(draw, state, env)
    return {"op": "identity"}


def draw_crossing(draw, state: State, env: Env) -> dict | None:
    """An op a map may cross (a pool, a reduction, a Resize, a Slice, a Pad, a Gather, a
    Split), valid and runnable where it lands, with facts drawn so that it sometimes
    commutes with the maps around it and sometimes not: a max meets a negative scale, an
    average counts its padding, a constant pad holds a value the map moves, the op works
    on the channel axis itself. None where nothing fits."""
    shape, rank = state.shape, state.rank
    if 0 in shape or rank < 2:
        return None
    kinds = ["slice", "pad", "gather", "split", "reduce"]
    if 3 <= rank <= 4 and env.dtype != "float64":  # onnxruntime has no double pools or Resize
        kinds += ["pool", "pool"] + (["resize"] if env.opset >= 11 else [])
    kind = draw(st.sampled_from(kinds))
    axis = draw(st.sampled_from(([state.chan] * 2 if state.chan not in (None, 0) else []) + list(range(1, rank))))
    if kind == "pool":
        kind = draw(st.sampled_from(["MaxPool", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool"]))
        if kind.startswith("Global"):
            return {"op": "pool", "type": kind}
        k = draw(st.integers(1, min(3, *shape[2:])))
        step = {"op": "pool", "type": kind, "k": k, "stride": draw(st.sampled_from([1, 1, 2])),
                "pads": [draw(st.integers(0, k - 1)) for _ in range(2 * (rank - 2))]}
        if kind == "AveragePool":
            step["count_include_pad"] = draw(st.sampled_from([0, 1]))
        return step
    if kind == "reduce":
        count = draw(st.integers(1, max(1, min(2, rank - 2))))
        axes = sorted(draw(st.permutations(list(range(1, rank))))[:count])
        negative = draw(st.booleans())
        return {"op": "reduce", "type": draw(st.sampled_from(["ReduceMean", "ReduceSum", "ReduceMax"])),
                "axes": [a - rank if negative else a for a in axes],
                "keepdims": draw(st.sampled_from([1, 1, 0])) if rank - count >= 2 else 1}
    if kind == "resize":
        scales = [1.0, 1.0] + [draw(st.sampled_from([1.0, 2.0, 2.0])) for _ in range(rank - 2)]
        mode = draw(st.sampled_from(["nearest", "linear"]))
        if mode == "nearest" and draw(st.integers(0, 5)) == 5:
            scales[1] = 2.0  # the channel axis resized: channels copied, no map crosses
        return {"op": "resize", "scales": scales, "mode": mode,
                "ctm": draw(st.sampled_from(["half_pixel", "asymmetric", "align_corners", "half_pixel",
                                             "tf_crop_and_resize"]))}
    if kind == "slice":
        size = shape[axis]
        stride = draw(st.sampled_from([1, 1, 2, -1])) if env.opset >= 10 else 1
        start = draw(st.integers(0, size - 1))
        end = draw(st.integers(start + 1, size + 1)) if stride > 0 else draw(st.integers(-size - 1, start - 1))
        return {"op": "slice", "axis": axis - rank if env.opset >= 10 and draw(st.booleans()) else axis,
                "start": start, "end": end, "step": stride}
    if kind == "pad":
        mode = draw(st.sampled_from(["constant", "constant", "reflect", "edge"]))
        pads = [0] * (2 * rank)
        for a in range(1, rank):
            if a == state.chan and draw(st.integers(0, 3)) != 3:
                continue  # the channel axis is padded rarely: no map crosses that
            limit = min(2, shape[a] - 1) if mode == "reflect" else 2
            pads[a], pads[a + rank] = draw(st.integers(0, limit)), draw(st.integers(0, limit))
        return {"op": "pad", "mode": mode, "pads": pads,
                "value": draw(st.sampled_from([0.0, 0.0, 1.5])) if mode == "constant" else 0.0}
    if kind == "gather":
        size = shape[axis]
        return {"op": "gather", "axis": axis,
                "indices": [draw(st.integers(-size, size - 1)) for _ in range(draw(st.integers(1, min(4, 2 * size))))]}
    if shape[axis] < 2:
        return None
    first = draw(st.integers(1, shape[axis] - 1))
    return {"op": "split", "axis": axis, "sizes": [first, shape[axis] - first], "take": draw(st.sampled_from([0, 1])),
            "rest": draw(st.sampled_from(["unused", "out", "out"])) if env.scope == "main" else "unused"}


def draw_sum(draw, state: State, env: Env) -> dict | None:
    """Parallel branches of one tensor, summed (Add, Sub or Sum): convs of kernel 1 or 3
    with "same" padding and one stride (a BN or a layer-scale Mul after some), the bare
    input or a BN of it (where the widths allow), or a branch through a Relu first. They
    may merge into one conv, a BN after the sum may split over it, a BN before it fork
    into every branch; taps and other tensors make the refusals."""
    shape, rank = state.shape, state.rank
    dims = rank - 2
    if dims not in (1, 2) or 0 in shape[1:] or env.dtype == "float64":
        return None
    c_in = shape[1]
    cout = draw(st.sampled_from([c_in, c_in, 1, 2, 3]))
    stride = draw(st.sampled_from([1, 1, 1, 2]))
    group = draw(st.sampled_from([g for g in divisors(c_in) if cout % g == 0]))
    chains = []
    for _ in range(draw(st.integers(2, 3))):
        kind = draw(st.sampled_from(["conv", "conv", "conv", "identity", "bn", "relu_conv"]))
        if kind in ("identity", "bn") and (stride != 1 or cout != c_in):
            kind = "conv"
        if kind == "identity":
            chains.append([])
            continue
        if kind == "bn":
            chains.append([draw_site(draw, state, env, bn=True)])
            continue
        k = draw(st.sampled_from([1, 3] if min(shape[2:]) >= 3 else [1]))
        conv = dict(op="conv", dims=dims, cout=cout, group=group, k=[k] * dims, stride=stride, dilation=1,
                    pads=[k // 2] * (2 * dims), auto_pad="NOTSET", explicit_pads=True, bias=draw(st.booleans()),
                    w_bad=None, twin=False, ref=[], tap=draw_tap(draw, env) if draw(st.integers(0, 5)) == 5 else None)
        chain = ([{"op": "relu", "tap": None}] if kind == "relu_conv" else []) + [conv]
        after = advance(state, conv)
        extra = draw(st.sampled_from([None, None, "bn", "scale"]))
        if extra == "bn":
            chain.append(dict(draw_site(draw, after, env, bn=True), tap=None))
        elif extra == "scale":
            chain.append(dict(op="Mul", form="chan_full", first=False, bad=None, tap=None))
        chains.append(chain)
    if all(not chain for chain in chains) or advance_all(state, chains[0]).size > MAX_ELEMENTS:
        return None
    join = draw(st.sampled_from(["Add", "Add", "Sum"] + (["Sub"] if len(chains) == 2 else [])))
    return {"op": "sum", "join": join, "chains": chains}


def draw_perm(draw, rank: int, chan: int | None) -> list[int]:
    """Any permutation; a cycle of 3 or more axes; one that moves the channel axis (or
    axis 1, a BN's, or any) to axis 1 or the last axis, where a BN or a MatMul reads
    channels, rotating the axes between (``[0, 2, 3, 1]``, ``[0, 3, 1, 2]``); or the inverse
    of such a move. Cycles are not their own inverse: following an axis through one with
    the permutation instead of its inverse lands elsewhere, and after an inverse move
    exactly where a BN or MatMul would then read it (a wrong fold, not a kept site)."""
    axes = list(range(rank))
    how = draw(st.sampled_from(["any", "cycle", "move", "move", "inverse", "inverse"]))
    if how == "cycle" and rank >= 3:
        chosen = draw(st.permutations(axes))[: draw(st.integers(3, rank))]
        perm = list(axes)
        for i, axis in enumerate(chosen):  # output axis chosen[i] reads input axis chosen[i + 1]
            perm[axis] = chosen[(i + 1) % len(chosen)]
        return perm
    if how in ("move", "inverse") and rank >= 2:
        source = draw(st.sampled_from(sorted({a for a in (chan, 1) if a is not None and a < rank}) + axes))
        target = draw(st.sampled_from(sorted({1, rank - 1} - {source}) or [0]))
        rest = [a for a in axes if a != source]
        perm = rest[:target] + [source] + rest[target:]
        return perm if how == "move" else [int(a) for a in np.argsort(perm)]
    return list(draw(st.permutations(axes)))


def draw_reshape(draw, state: State, env: Env):
    shape, rank = list(state.shape), state.rank
    if 0 in shape and not (state.batch_axis == 0 and shape[0] == 0 and 0 not in shape[1:]):
        return {"op": "identity"}
    first = 1 if state.batch_axis == 0 else 0
    how = draw(st.sampled_from(["merge", "split", "same"]))
    new = list(shape)
    if how == "merge" and rank - first >= 2 and rank > 2:
        i = draw(st.integers(first, rank - 2))
        new[i: i + 2] = [shape[i] * shape[i + 1]]
    elif how == "split" and rank < MAX_RANK and rank > first:
        i = draw(st.integers(first, rank - 1))
        d = shape[i]
        factors = [f for f in divisors(d)] + [1]
        f = draw(st.sampled_from(factors))
        new[i: i + 1] = [f, d // f]
    to = list(new)
    if state.batch_axis == 0 and to and new[0] == shape[0]:
        to[0] = 0  # copy the (possibly symbolic) batch
    if 0 not in shape and draw(st.booleans()):
        candidates = [i for i in range(len(to)) if to[i] != 0]
        if candidates:
            to[draw(st.sampled_from(candidates))] = -1
    step = {"op": "reshape", "to": to}
    if env.opset >= 14 and (0 not in to or shape[0] == 0) and draw(st.integers(0, 3)) == 3:
        step["allowzero"] = 1  # a literal 0 is then a 0, not "copy": same result here
    return step


def draw_nest(draw, state: State, env: Env) -> dict | None:
    kinds = ["if", "loop", "scan"] + (["func", "func"] if env.ir >= 8 else [])
    kind = draw(st.sampled_from(kinds))
    if kind == "scan" and (state.shape[0] == 0 or env.opset < 9):  # Scan-8 is another op
        kind = "if"
    inner = replace(env, scope="func" if kind == "func" else "sub", in_func=env.in_func or kind == "func",
                    depth=env.depth + 1)
    start = scan_inner_state(state) if kind == "scan" else state
    body, _ = draw_steps(draw, start, inner, max_parts=2 if env.depth == 0 else 1)
    step = {"op": kind, "body": body}
    if kind == "func":
        step["calls"] = draw(st.sampled_from([1, 1, 2]))
        step["vary"] = step["calls"] == 2 and draw(st.booleans())
        step["params"] = draw(st.sampled_from(["const", "const", "input", "attr"]))
        step["defaults"] = draw(st.booleans())
        # a call inside another function body may pass its attributes on by reference
        step["forward"] = env.in_func and draw(st.booleans())
    return step


# --- the builder ----------------------------------------------------------------------


class Ctx:
    """One graph being built: the main graph, a subgraph body or a function body."""

    def __init__(self, builder: Builder, kind: str, parent: Ctx | None = None):
        self.b, self.kind, self.parent = builder, kind, parent
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.outputs: list[str] = []
        # function bodies only
        self.func_inputs: list[tuple[str, str]] = []
        self.refs: dict[str, object] = {}

    @property
    def func(self) -> Ctx | None:
        ctx = self
        while ctx is not None and ctx.kind != "func":
            ctx = ctx.parent
        return ctx

    def node(self, op, inputs, attrs=None, refs=(), n_out=1, domain=""):
        outs = [self.b.value(f"{op.lower()}_out") for _ in range(n_out)]
        node = oh.make_node(op, list(inputs), outs, name=self.b.node_name(op), domain=domain, **(attrs or {}))
        if refs:
            func = self.func
            for attr_name in refs:
                value = attrs[attr_name] if attrs and attr_name in attrs else None
                kept = [a for a in node.attribute if a.name != attr_name]
                proto = oh.make_attribute(attr_name, value)
                ref = onnx.AttributeProto(name=attr_name, ref_attr_name=self.b.name(attr_name), type=proto.type)
                del node.attribute[:]
                node.attribute.extend(kept + [ref])
                func.refs[ref.ref_attr_name] = value
        self.nodes.append(node)
        return outs[0] if n_out == 1 else outs

    # constants -------------------------------------------------------------------------

    def _init(self, array, base):
        name = self.b.value(base)
        self.inits.append(onh.from_array(np.asarray(array), name))
        return name

    def _leaf(self, array, base, style):
        """A constant with no computation: initializer (here or outer) or Constant node."""
        if style == "init":
            if self.kind == "main":
                return self._init(array, base)
            if self.kind == "func" or self.b.ir < 4 or self.b.rng.random() < 0.5:
                return self.parent._leaf(array, base, "init") if self.kind != "func" else self._constant(array, base)
            return self._init(array, base)
        return self._constant(array, base)

    def _constant(self, array, base):
        name = self.b.value(base)
        array = np.asarray(array)
        attrs = {"value": onh.from_array(array, name + "_value")}
        if self.b.opset >= 11 and array.ndim >= 1 and array.size and self.func is None and self.b.rng.random() < 0.1:
            # a sparse_value holding every nonzero element (by linear index); not in a
            # function body, where onnxruntime 1.32 may crash (SIGSEGV) creating the session
            where = np.flatnonzero(array)
            attrs = {"sparse_value": oh.make_sparse_tensor(
                onh.from_array(array.reshape(-1)[where], name + "_values"),
                onh.from_array(where.astype(np.int64), name + "_indices"), list(array.shape))}
        elif self.b.opset >= 12 and array.ndim <= 1 and array.size and self.b.rng.random() < 0.3:
            # Constant-12's value_float(s) / value_int(s): float32 and int64 only
            if array.dtype == np.float32:
                attrs = {"value_float": float(array)} if array.ndim == 0 else {"value_floats": array.tolist()}
            elif array.dtype == np.int64 and array.size:
                attrs = {"value_int": int(array)} if array.ndim == 0 else {"value_ints": array.tolist()}
        self.nodes.append(oh.make_node("Constant", [], [name], name=self.b.node_name("Constant"), **attrs))
        return name

    def ints(self, values, base="shape"):
        # Constant-1 (opset < 9) holds float tensors only: int64 constants are initializers there
        style = self.b.rng.choice(["init", "const"]) if self.b.opset >= 9 else "init"
        return self._leaf(np.asarray(values, dtype=np.int64), base, style)

    def param(self, array, base):
        """A float parameter in the recipe's parameter style.

        With ``recipe["share"]``, a step built twice (the two branches of an If) gets the
        same parameters the second time: created once in the enclosing main graph or
        function body, read from both branches."""
        array = np.asarray(array)
        if self.b.recipe.get("share") and self.b.step is not None:
            key = (id(self.b.step), self.b.ordinal, base)
            self.b.ordinal += 1
            owner = self
            while owner.kind == "sub":
                owner = owner.parent
            if key in self.b.shared and self.b.shared[key][0] is owner:
                return self.b.shared[key][1]
            step, self.b.step = self.b.step, None
            name = owner.param(array, base) if owner is not self else self.param(array, base)
            self.b.step = step
            self.b.shared[key] = (owner, name)
            return name
        if self.kind == "func" and self.b.func_params == "input":
            outer = self.parent.param(array, base)
            inner = self.b.value(base + "_in")
            self.func_inputs.append((inner, outer))
            return inner
        if self.kind == "func" and self.b.func_params == "attr":
            # Constant(value=@attr): the tensor is given at the call site
            name, ref = self.b.value(base), self.b.name(base + "_attr")
            node = oh.make_node("Constant", [], [name], name=self.b.node_name("Constant"))
            node.attribute.append(onnx.AttributeProto(name="value", ref_attr_name=ref, type=onnx.AttributeProto.TENSOR))
            self.nodes.append(node)
            self.refs[ref] = onh.from_array(array, ref)
            return name
        style = self.b.recipe["params"]
        if style == "mixed":
            style = self.b.rng.choice(["init", "const", "subgraph"])
        if style != "subgraph":
            return self._leaf(array, base, style)
        how = self.b.rng.choice(["identity", "cast", "reshape"] if array.size else ["identity", "cast"])
        leaf_style = self.b.rng.choice(["init", "const"])
        if how == "identity":
            return self.node("Identity", [self._leaf(array, base, leaf_style)])
        if how == "cast":
            wide = array.astype(np.float64 if array.dtype != np.float64 else np.float32)
            if array.dtype == np.float64:
                wide = array  # a no-op Cast: float32 would round
            return self.node("Cast", [self._leaf(wide, base, leaf_style)], {"to": self.b.elem_of(array.dtype)})
        flat = self._leaf(array.reshape(-1), base, leaf_style)
        return self.node("Reshape", [flat, self.ints(list(array.shape))])


class Builder:
    """Builds a recipe's model; with ``squares``, its *square model* instead.

    The square model has the same structure and draws the same random values, but
    propagates squared magnitudes: every weight, bias and constant is ``c**2``, Gemm's
    alpha and beta are squared, a Sub adds, a Div divides by ``c**2`` and a BN computes
    ``s**2 * (x + mean**2) + beta**2``. Fed ``x**2``, it gives at each output element
    ``S = sum over the paths to it of (product of the squared coefficients) * (squared
    input or constant)``: the mean square of the values the chain combined into that
    element, were their signs random, with no cancellation (a channel whose values cancel
    to near zero has a large S). ``sqrt(S)`` is the magnitude rounding errors scale with
    (tests/test_fuzz.py, ``bound``). Built in float32 for a float16 recipe.
    """

    def __init__(self, recipe: dict, squares: bool = False):
        self.recipe = recipe
        self.squares = squares
        self.rng = np.random.default_rng(recipe["seed"])
        self.np_dtype, self.elem = DTYPES[square_dtype(recipe["dtype"]) if squares else recipe["dtype"]]
        self.opset, self.ir = recipe["opset"], recipe["ir"]
        self.count = 0
        self.functions: list[onnx.FunctionProto] = []
        self.func_params = "const"
        self.cond_name: str | None = None
        self.main = Ctx(self, "main")
        self.graph_inputs: list[onnx.ValueInfoProto] = []
        self.shapes: dict[str, tuple] = {}  # every value's concrete shape
        self.chans: dict[str, int | None] = {}  # where a value's channels are (State.chan)
        self.step: dict | None = None  # the step being built, and how many params it made so far
        self.ordinal = 0
        self.shared: dict[tuple, tuple] = {}

    def name(self, base: str) -> str:
        """A fresh plain name (attributes, functions, graphs)."""
        self.count += 1
        return f"{base}_{self.count}"

    def value(self, base: str) -> str:
        """A fresh value name; with ``names="odd"`` full of characters an identifier lacks."""
        return ("v/ä :0." if self.recipe.get("names") == "odd" else "") + self.name(base)

    def node_name(self, op: str) -> str:
        """Node names: unique, or all empty (ONNX does not require names; onnxruntime
        refuses two equal non-empty ones)."""
        how = self.recipe.get("names", "unique")
        if how == "empty":
            return ""
        return ("n/ä :" if how == "odd" else "") + self.name(op)

    @staticmethod
    def elem_of(dtype) -> int:
        return oh.np_dtype_to_tensor_dtype(np.dtype(dtype))

    # values ------------------------------------------------------------------------------

    def normal(self, shape, scale=1.0):
        return (self.rng.standard_normal(shape) * scale).astype(self.np_dtype)

    def sq(self, array):
        """``array`` in the model, ``array**2`` in the square model (drawing nothing)."""
        return np.square(array) if self.squares else array

    def spoil(self, array, bad):
        """Put one NaN/inf/0 into ``array`` (a copy)."""
        if bad is None or array.size == 0:
            return array
        array = array.copy()
        value = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf, "zero": 0.0}[bad]
        array.reshape(-1)[self.rng.integers(array.size)] = value
        return array

    def cond(self, ctx: Ctx):
        """The If condition: a bool graph input, or a Constant inside a function body."""
        if ctx.func is None:
            if self.cond_name is None:
                self.cond_name = "cond"
                self.graph_inputs.append(oh.make_tensor_value_info("cond", TensorProto.BOOL, []))
            return self.cond_name
        return ctx._constant(np.array(self.recipe["cond"]), "cond")

    # steps -------------------------------------------------------------------------------

    def emit_all(self, ctx: Ctx, value: str, state: State, steps: list[dict]):
        for step in steps:
            value, state = self.emit(ctx, value, state, step)
        return value, state

    def emit(self, ctx: Ctx, x: str, state: State, step: dict):
        op = step["op"]
        new = advance(state, step)
        self.step, self.ordinal = step, 0
        emitter = getattr(self, f"_emit_{op}", None)
        y = emitter(ctx, x, state, step, new) if emitter else self._emit_site(ctx, x, state, step, new)
        self.shapes[y] = new.shape
        self.chans[y] = new.chan
        self.tap(ctx, y, step.get("tap"))
        return y, new

    def tap(self, ctx: Ctx, y: str, tap):
        if tap is None:
            return
        if tap == "out":
            ctx.outputs.append(y)
        elif tap == "relu":
            r = ctx.node("Relu", [y])
            self.shapes[r] = self.shapes[y]
            self.chans[r] = self.chans.get(y)
            if ctx.kind == "main":
                ctx.outputs.append(r)
        elif tap == "sub":
            branches = []
            for op in ("Relu", "Neg"):
                sub = Ctx(self, "sub", ctx)
                out = sub.node(op, [y])
                self.shapes[out] = self.shapes[y]
                branches.append(oh.make_graph(sub.nodes, self.name("tap"), [], [self.vi(out)], sub.inits))
            out = ctx.node("If", [self.cond(ctx)], {"then_branch": branches[0], "else_branch": branches[1]})
            self.shapes[out] = self.shapes[y]
            self.chans[out] = self.chans.get(y)
            ctx.outputs.append(out)

    def vi(self, name, shape=None, elem=None):
        """A value's type (subgraph outputs need no shape)."""
        return oh.make_tensor_value_info(name, elem or self.elem, shape)

    def twin(self, ctx, op, inputs, attrs, step, shape):
        """A second node reading the same weight: the fold must not change it in place."""
        if step.get("twin"):
            other = ctx.node(op, inputs, attrs)
            self.shapes[other] = shape
            if ctx.kind == "main":
                ctx.outputs.append(other)

    def _emit_conv(self, ctx, x, state, step, new):
        dims, c_in, group = step["dims"], state.shape[1], step["group"]
        fan_in = max(1, c_in // group * math.prod(step["k"]))
        w = self.spoil(self.normal([step["cout"], c_in // group, *step["k"]], fan_in ** -0.5), step["w_bad"])
        inputs = [x, ctx.param(self.sq(w), "w")]
        if step["bias"]:
            inputs.append(ctx.param(self.sq(self.normal([step["cout"]], 0.5)), "b"))
        attrs = dict(group=group, strides=[step["stride"]] * dims, dilations=[step["dilation"]] * dims,
                     kernel_shape=list(step["k"]))
        if step["auto_pad"] != "NOTSET":
            attrs["auto_pad"] = step["auto_pad"]
        elif step["explicit_pads"]:
            attrs["pads"] = list(step["pads"])
        y = ctx.node("Conv", inputs, attrs, refs=step["ref"])
        self.twin(ctx, "Conv", inputs, attrs, step, new.shape)
        return y

    def _emit_convT(self, ctx, x, state, step, new):
        dims, c_in, group = step["dims"], state.shape[1], step["group"]
        w = self.spoil(self.normal([c_in, step["cout"] // group, *step["k"]], max(1, c_in) ** -0.5), step["w_bad"])
        inputs = [x, ctx.param(self.sq(w), "w")]
        if step["bias"]:
            inputs.append(ctx.param(self.sq(self.normal([step["cout"]], 0.5)), "b"))
        attrs = dict(group=group, strides=[step["stride"]] * dims, pads=list(step["pads"]),
                     kernel_shape=list(step["k"]))
        if step["out_pad"]:
            attrs["output_padding"] = [step["out_pad"]] * dims
        y = ctx.node("ConvTranspose", inputs, attrs)
        self.twin(ctx, "ConvTranspose", inputs, attrs, step, new.shape)
        return y

    def _emit_gemm(self, ctx, x, state, step, new):
        k = state.shape[0] if step["transA"] else state.shape[1]
        m, n = new.shape
        w = self.normal([n, k] if step["transB"] else [k, n], max(1, k) ** -0.5)
        inputs = [x, ctx.param(self.sq(self.spoil(w, step["w_bad"])), "w")]
        c_shapes = {"none": None, "scalar": [], "one": [1], "n": [n], "1n": [1, n], "mn": [m, n], "m1": [m, 1]}
        c_shape = c_shapes[step["c"]]
        if c_shape is not None:
            inputs.append(ctx.param(self.sq(self.spoil(self.normal(c_shape, 0.5), step["c_bad"])), "c"))
        attrs = dict(transA=step["transA"], transB=step["transB"], alpha=float(self.sq(step["alpha"])),
                     beta=float(self.sq(step["beta"])))
        y = ctx.node("Gemm", inputs, attrs, refs=step["ref"])
        self.twin(ctx, "Gemm", inputs, attrs, step, new.shape)
        return y

    def _emit_matmul(self, ctx, x, state, step, new):
        k, n = state.shape[-1], step["n"]
        b_shape = {"2d": [k, n], "1d": [k], "3d": [step.get("g"), k, n]}[step.get("b", "2d")]
        w = self.spoil(self.normal(b_shape, max(1, k) ** -0.5), step["w_bad"])
        inputs = [x, ctx.param(self.sq(w), "w")]
        y = ctx.node("MatMul", inputs)
        self.twin(ctx, "MatMul", inputs, {}, step, advance(state, {**step, "bias": None}).shape)
        if step["bias"] is None:
            return y
        b = ctx.param(self.sq(self.normal({"n": [n], "1n": [1, n], "scalar": []}[step["bias"]], 0.5)), "bias")
        return ctx.node("Add", [b, y] if step["bias_first"] else [y, b])

    def _emit_bn(self, ctx, x, state, step, new):
        attrs = {"epsilon": step["eps"], **step.get("attrs", {})}
        # spatial=0 (opset <= 8): statistics per element, of shape (C, D1, ...)
        c = list(state.shape[1:]) if attrs.get("spatial") == 0 else state.shape[1]
        r = self.rng
        gamma = r.uniform(0.5, 2.0, c) * r.choice([-1, 1], c)
        beta, mean = r.standard_normal(c), r.standard_normal(c) * 0.5
        var = r.uniform(0.1, 3.0, c)
        gamma, beta, mean, var = (a.reshape(-1) for a in (gamma, beta, mean, var))
        i = r.integers(max(1, gamma.size))
        stats = step["stats"] if gamma.size else "normal"
        if stats == "tiny_var":
            var[i] = 1e-7
        elif stats == "zero_var":
            var[i] = 0.0
        elif stats == "gamma0":
            gamma[i] = 0.0
        elif stats == "neg_var":
            var[i] = -0.5
        elif stats == "nan":
            [gamma, beta, mean, var][r.integers(4)][i] = np.nan
        elif stats == "inf":
            [gamma, beta, mean][r.integers(3)][i] = np.inf
        if self.squares:  # s**2 * (x + mean**2) + beta**2: scale gamma**2 / sqrt(var + eps), var and eps kept
            with np.errstate(invalid="ignore"):
                gamma = np.square(gamma) / np.sqrt(var + step["eps"])
            beta, mean = np.square(beta), -np.square(mean)
        pdtype = self.np_dtype if self.squares else DTYPES[step.get("param_dtype") or self.recipe["dtype"]][0]
        shape = [c] if isinstance(c, int) else c
        names = [ctx.param(a.reshape(shape).astype(pdtype), base)
                 for a, base in zip([gamma, beta, mean, var], ["gamma", "beta", "mean", "var"])]
        return ctx.node("BatchNormalization", [x, *names], attrs, refs=step["ref"])

    def _emit_site(self, ctx, x, state, step, new):
        op, shape, rank = step["op"], state.shape, state.rank
        chan = state.chan
        form = step["form"]
        if form == "axis1" or (form in ("chan", "chan_full") and chan is None):
            chan = 1 if rank >= 2 else None
            form = "chan_full" if form == "axis1" else form
        if form in ("chan", "chan_full") and chan is None:
            form = "scalar"
        if form == "expand_rank" and chan is None and rank >= 2:
            chan = 1
        if form == "expand_rank":  # one more (leading) axis than the data
            c_shape = [1] + ([1] * chan + [shape[chan]] + [1] * (rank - 1 - chan) if chan is not None else [1] * rank)
        elif form == "bcast_chan":  # size on an axis where the data has 1
            c_shape = [1] * step["axis"] + [step["size"]] + [1] * (rank - 1 - step["axis"])
        elif form == "chan":
            c_shape = [shape[chan]] + [1] * (rank - 1 - chan)
        elif form == "chan_full":
            c_shape = [1] * chan + [shape[chan]] + [1] * (rank - 1 - chan)
        elif form == "scalar":
            c_shape = []
        elif form == "one":
            c_shape = [1]
        else:  # elementwise: varies over every non-batch axis
            c_shape = [1 if i == state.batch_axis else d for i, d in enumerate(shape)]
            if state.batch_axis == 0:
                c_shape = c_shape[1:]
        r = self.rng
        if op in ("Mul", "Div"):
            values = r.uniform(0.5, 2.0, c_shape) * r.choice([-1, 1], c_shape)
        else:
            values = r.standard_normal(c_shape)
        values = self.spoil(np.asarray(values, dtype=self.np_dtype), step["bad"])
        c = ctx.param(self.sq(values), "k")
        if self.squares and op == "Sub":  # x - c and c - x: x**2 + c**2
            op = "Add"
        return ctx.node(op, [c, x] if step["first"] else [x, c])

    def _emit_concat(self, ctx, x, state, step, new):
        outs = [self.emit(ctx, x, state, branch)[0] for branch in step["branches"]]
        self.step, self.ordinal = step, 0
        return ctx.node("Concat", outs, {"axis": step["axis"]})

    def _emit_sum(self, ctx, x, state, step, new):
        outs = [self.emit_all(ctx, x, state, chain)[0] for chain in step["chains"]]
        self.step, self.ordinal = step, 0
        if step["join"] == "Sum":
            return ctx.node("Sum", outs)
        if step["join"] == "Sub" and not self.squares:  # the square model adds
            return ctx.node("Sub", outs)
        y = outs[0]
        for out in outs[1:]:
            y = ctx.node("Add", [y, out])
        return y

    def _emit_pool(self, ctx, x, state, step, new):
        if step["type"].startswith("Global"):
            return ctx.node(step["type"], [x])
        dims = state.rank - 2
        attrs = dict(kernel_shape=[step["k"]] * dims, strides=[step["stride"]] * dims, pads=list(step["pads"]))
        if "count_include_pad" in step:
            attrs["count_include_pad"] = step["count_include_pad"]
        return ctx.node(step["type"], [x], attrs)

    def _emit_reduce(self, ctx, x, state, step, new):
        attrs = {"keepdims": step["keepdims"]}
        if step["type"] == "ReduceSum" and self.opset >= 13:
            return ctx.node("ReduceSum", [x, ctx.ints(step["axes"], "axes")], attrs)
        return ctx.node(step["type"], [x], {**attrs, "axes": list(step["axes"])})

    def _emit_resize(self, ctx, x, state, step, new):
        attrs = {"mode": step["mode"], "coordinate_transformation_mode": step["ctm"]}
        roi = ""
        if step["ctm"] == "tf_crop_and_resize":
            rank = state.rank
            roi = ctx._leaf(np.array([0.0] * rank + [1.0] * rank, np.float32), "roi", "init")
            attrs["extrapolation_value"] = 0.5
        return ctx.node("Resize", [x, roi, ctx._leaf(np.array(step["scales"], np.float32), "scales", "init")], attrs)

    def _emit_slice(self, ctx, x, state, step, new):
        if self.opset < 10:
            return ctx.node("Slice", [x], {"starts": [step["start"]], "ends": [step["end"]], "axes": [step["axis"]]})
        inputs = [x] + [ctx.ints([v], base) for v, base in ((step["start"], "starts"), (step["end"], "ends"),
                                                            (step["axis"], "axes"), (step["step"], "steps"))]
        return ctx.node("Slice", inputs)

    def _emit_pad(self, ctx, x, state, step, new):
        if self.opset < 11:
            return ctx.node("Pad", [x], {"pads": list(step["pads"]), "mode": step["mode"],
                                         "value": float(self.sq(step["value"]))})
        inputs = [x, ctx.ints(step["pads"], "pads")]
        if step["mode"] == "constant":
            inputs.append(ctx._leaf(np.array(self.sq(step["value"]), dtype=self.np_dtype), "pad_value", "init"))
        return ctx.node("Pad", inputs, {"mode": step["mode"]})

    def _emit_gather(self, ctx, x, state, step, new):
        return ctx.node("Gather", [x, ctx.ints(step["indices"], "indices")], {"axis": step["axis"]})

    def _emit_split(self, ctx, x, state, step, new):
        if self.opset >= 13:
            outs = ctx.node("Split", [x, ctx.ints(step["sizes"], "split")], {"axis": step["axis"]}, n_out=2)
        else:
            outs = ctx.node("Split", [x], {"axis": step["axis"], "split": list(step["sizes"])}, n_out=2)
        rest = outs[1 - step["take"]]
        shape = list(state.shape)
        shape[step["axis"]] = step["sizes"][1 - step["take"]]
        self.shapes[rest] = tuple(shape)
        if step["rest"] == "out":
            ctx.outputs.append(rest)
        return outs[step["take"]]

    def _emit_relu(self, ctx, x, state, step, new):
        return ctx.node("Relu", [x])

    def _emit_identity(self, ctx, x, state, step, new):
        return ctx.node("Identity", [x])

    def _emit_transpose(self, ctx, x, state, step, new):
        attrs = {"perm": list(step["perm"])} if step["perm"] is not None else {}
        return ctx.node("Transpose", [x], attrs, refs=step.get("ref", []))

    def _emit_reshape(self, ctx, x, state, step, new):
        return ctx.node("Reshape", [x, ctx.ints(step["to"])], {"allowzero": 1} if step.get("allowzero") else {})

    def _emit_flatten(self, ctx, x, state, step, new):
        return ctx.node("Flatten", [x], {"axis": step["axis"]})

    def _axes_node(self, ctx, op, x, axes):
        if axes is None:
            return ctx.node(op, [x])
        if self.opset >= 13:
            return ctx.node(op, [x, ctx.ints(axes, "axes")])
        return ctx.node(op, [x], {"axes": list(axes)})

    def _emit_squeeze(self, ctx, x, state, step, new):
        return self._axes_node(ctx, "Squeeze", x, step["axes"])

    def _emit_unsqueeze(self, ctx, x, state, step, new):
        return self._axes_node(ctx, "Unsqueeze", x, step["axes"])

    # nesting -----------------------------------------------------------------------------

    def _emit_if(self, ctx, x, state, step, new):
        branches = []
        for _ in range(2):  # the same steps in both branches, with different values
            sub = Ctx(self, "sub", ctx)
            out, _ = self.emit_all(sub, x, state, step["body"])
            out = self._sub_output(sub, out, x)
            branches.append(oh.make_graph(sub.nodes, self.name("branch"), [], [self.vi(out)], sub.inits))
        return ctx.node("If", [self.cond(ctx)], {"then_branch": branches[0], "else_branch": branches[1]})

    def _sub_output(self, sub: Ctx, out: str, outer_input: str) -> str:
        """A subgraph output must be produced inside it (not the captured input itself)."""
        sub.outputs = []  # taps inside subgraphs stay dangling readers
        if out == outer_input:
            copy = sub.node("Identity", [out])
            self.shapes[copy] = self.shapes[out]
            return copy
        return out

    def _emit_loop(self, ctx, x, state, step, new):
        """Loop(M=1): the body's scan output is the chain, stacked on a new axis 0 that a
        Squeeze removes. Loop-1 (opset < 11) needs a loop-carried value: a dummy one."""
        body = Ctx(self, "sub", ctx)
        it, cond_in = self.value("iter"), self.value("cond_in")
        cond_out = body.node("Identity", [cond_in])
        body_in = [oh.make_tensor_value_info(it, TensorProto.INT64, []),
                   oh.make_tensor_value_info(cond_in, TensorProto.BOOL, [])]
        body_out = [oh.make_tensor_value_info(cond_out, TensorProto.BOOL, [])]
        loop_in = [ctx.ints(np.array(1, dtype=np.int64), "trips"), ""]
        if self.opset < 11:
            carried = self.value("carried")
            body_in.append(oh.make_tensor_value_info(carried, TensorProto.INT64, []))
            body_out.append(oh.make_tensor_value_info(body.node("Identity", [carried]), TensorProto.INT64, []))
            loop_in.append(ctx.ints(np.array(0, dtype=np.int64), "carried"))
        out, _ = self.emit_all(body, x, state, step["body"])
        out = self._sub_output(body, out, x)
        graph = oh.make_graph(body.nodes, self.name("loop_body"), body_in, body_out + [self.vi(out)], body.inits)
        outs = ctx.node("Loop", loop_in, {"body": graph}, n_out=len(body_out))
        stacked = outs[-1] if isinstance(outs, list) else outs
        return self._axes_node(ctx, "Squeeze", stacked, [0])

    def _emit_scan(self, ctx, x, state, step, new):
        body = Ctx(self, "sub", ctx)
        slice_in = self.value("slice")
        inner = scan_inner_state(state)
        u = self._axes_node(body, "Unsqueeze", slice_in, [0])
        self.shapes[u] = inner.shape
        out, end = self.emit_all(body, u, inner, step["body"])
        body.outputs = []
        size = math.prod(end.shape)
        if size:
            flat = body.node("Reshape", [out, body.ints([size])])
        else:  # Reshape's 0 would copy a dim: flatten to (1, 0) and squeeze instead
            flat = self._axes_node(body, "Squeeze", body.node("Flatten", [out], {"axis": 0}), [0])
        self.shapes[flat] = (size,)
        graph = oh.make_graph(body.nodes, self.name("scan_body"), [self.vi(slice_in, list(state.shape[1:]))],
                              [self.vi(flat)], body.inits)
        return ctx.node("Scan", [x], {"body": graph, "num_scan_inputs": 1})

    def _emit_func(self, ctx, x, state, step, new):
        saved = self.func_params
        self.func_params = step["params"]
        body = Ctx(self, "func", ctx)
        inner_x = self.value("fx")
        self.shapes[inner_x] = state.shape
        out, _ = self.emit_all(body, inner_x, state, step["body"])
        body.outputs = []
        if out == inner_x:
            out = body.node("Identity", [out])
        self.func_params = saved
        fname = self.name("fn")
        refs = dict(body.refs)
        defaults = {}
        if step["defaults"] and refs:
            first = sorted(refs)[0]
            defaults[first] = refs.pop(first)
        opsets = [oh.make_opsetid("", self.opset)]
        if any(node.domain == FUNC_DOMAIN for node in body.nodes):  # it calls another function
            opsets.append(oh.make_opsetid(FUNC_DOMAIN, 1))
        func = oh.make_function(FUNC_DOMAIN, fname, [inner_x] + [i for i, _ in body.func_inputs], [out], body.nodes,
                                opsets, attributes=sorted(refs))
        for key, value in defaults.items():
            func.attribute_proto.append(oh.make_attribute(key, value))
        self.functions.append(func)
        inputs = [x] + [o for _, o in body.func_inputs]
        forward = list(refs) if step.get("forward") else ()
        y = ctx.node(fname, inputs, refs_values(refs), refs=forward, domain=FUNC_DOMAIN)
        if step["calls"] == 2:
            values = dict(refs)
            if step["vary"]:
                values = {k: vary(k, v) for k, v in values.items()}
                values.update({k: vary(k, v) for k, v in defaults.items() if vary(k, v) != v})
            y2 = ctx.node(fname, inputs, refs_values(values), refs=forward, domain=FUNC_DOMAIN)
            self.shapes[y2] = new.shape
            if ctx.kind == "main":
                ctx.outputs.append(y2)
        return y

    # the model ---------------------------------------------------------------------------

    def build(self):
        r = self.recipe
        shape = list(r["input"])
        batch = shape[0]
        state = State(tuple(shape), 0, None)
        in_shape = ["N" if r["dynamic_batch"] else batch] + shape[1:]
        self.graph_inputs.insert(0, self.vi("x", in_shape))
        self.shapes["x"] = state.shape
        y, _ = self.emit_all(self.main, "x", state, r["steps"])
        if y == "x":
            y = self.main.node("Identity", [y])
            self.shapes[y] = state.shape
        outputs = []
        for name in self.main.outputs + [y]:
            if name not in outputs:
                outputs.append(name)
        inputs = list(self.graph_inputs)
        if self.ir < 4 or r["overridable"]:
            for init in self.main.inits:
                if self.ir < 4 or (init.data_type == self.elem and self.rng.random() < 0.4):
                    inputs.append(oh.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
        # Main-graph outputs need a shape field (its dims may be unknown): the checker.
        graph = oh.make_graph(self.main.nodes, "fuzz", inputs,
                              [self.vi(o, [None] * len(self.shapes[o])) for o in outputs], self.main.inits)
        opsets = [oh.make_opsetid("", self.opset)] + ([oh.make_opsetid(FUNC_DOMAIN, 1)] if self.functions else [])
        model = oh.make_model(graph, opset_imports=opsets, functions=self.functions)
        model.ir_version = self.ir
        model = self.finish_types(model)
        x = np.random.default_rng(r["seed"] ^ 0x5EED).standard_normal(shape).astype(DTYPES[r["dtype"]][0])
        feeds = {"x": x.astype(self.np_dtype)}
        if self.cond_name is not None:
            feeds["cond"] = np.array(r["cond"])
        return model, feeds

    def finish_types(self, model):
        """value_info (main graph and subgraphs) and output shapes as the recipe says: all
        that shape inference finds, a random half of it, or none; outputs with their
        inferred shapes or with dims of unknown size."""
        r = self.recipe
        inferred = onnx.shape_inference.infer_shapes(model)
        rng = np.random.default_rng(r["seed"] ^ 0xF00D)
        for graph in graphs_of(inferred):
            keep = [v for v in graph.value_info
                    if (r["value_info"] == "full" or r["value_info"] == "partial" and rng.random() < 0.5)
                    and (self.ir >= 4 or v.type.tensor_type.HasField("shape"))]
            del graph.value_info[:]
            graph.value_info.extend(keep)
        for out, declared in zip(inferred.graph.output, model.graph.output):
            if not r["output_shapes"] or not out.type.tensor_type.HasField("shape"):
                out.CopyFrom(declared)
        return inferred


def graphs_of(model: onnx.ModelProto):
    """The main graph and every subgraph (also inside function bodies)."""
    def sub(graph):
        yield graph
        yield from in_nodes(graph.node)

    def in_nodes(nodes):
        for node in nodes:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    yield from sub(attr.g)
                for g in attr.graphs:
                    yield from sub(g)

    yield from sub(model.graph)
    for function in model.functions:
        yield from in_nodes(function.node)


def serialize(model: onnx.ModelProto, encoding: str) -> bytes:
    """The model's bytes. ``typed``: tensors hold float_data/int64_data/... instead of
    raw_data; ``chunked``: the main graph's last initializers come in a second ``graph``
    field, which protobuf merges into the first (any conforming reader sees one graph)."""
    if encoding == "typed":
        model = onnx.ModelProto.FromString(model.SerializeToString())
        for tensor in all_tensors(model):
            array = onh.to_array(tensor)
            typed = oh.make_tensor(tensor.name, tensor.data_type, list(tensor.dims), array.reshape(-1), raw=False)
            tensor.CopyFrom(typed)
        return model.SerializeToString()
    if encoding == "chunked" and model.graph.initializer:
        head = onnx.ModelProto.FromString(model.SerializeToString())
        cut = max(1, len(head.graph.initializer) // 2)
        tail = onnx.ModelProto()
        tail.graph.initializer.extend(head.graph.initializer[cut:])
        del head.graph.initializer[cut:]
        data = head.SerializeToString() + tail.SerializeToString()
        assert onnx.ModelProto.FromString(data) == model, "chunked encoding must parse to the same model"
        return data
    return model.SerializeToString()


def all_tensors(model: onnx.ModelProto):
    """Every dense TensorProto: initializers and Constant values, subgraphs and functions too."""
    for graph in graphs_of(model):
        yield from graph.initializer
        yield from node_tensors(graph.node)
    for function in model.functions:
        yield from node_tensors(function.node)


def node_tensors(nodes):
    for node in nodes:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR and not attr.ref_attr_name:
                yield attr.t


def refs_values(values: dict) -> dict:
    return {k: v for k, v in sorted(values.items())}


def vary(key: str, value):
    """A different but valid value for a call-site attribute (epsilon, alpha, beta, tensors)."""
    if isinstance(value, onnx.TensorProto):
        return onh.from_array((onh.to_array(value) * 1.5).astype(onh.to_array(value).dtype), value.name)
    base = key.rsplit("_", 1)[0]
    if base == "epsilon":
        return value * 10
    if base in ("alpha", "beta"):
        return value + 0.25
    return value


def build(recipe: dict, squares: bool = False):
    """``(ModelProto, feeds)`` for a recipe, or for its square model (see ``Builder``; its
    feeds are ``x**2``); deterministic."""
    model, feeds = Builder(recipe, squares).build()
    if squares:
        feeds = {name: np.square(value) if value.dtype.kind == "f" else value for name, value in feeds.items()}
    return model, feeds


def square_dtype(dtype: str) -> str:
    return "float32" if dtype == "float16" else dtype


# --- facts about a recipe, for statistics -----------------------------------------------


def walk(steps):
    for step in steps:
        yield step
        if "body" in step:
            yield from walk(step["body"])
        if "branches" in step:
            yield from walk(step["branches"])
        for chain in step.get("chains", []):
            yield from walk(chain)


#: Steps that round their result (a MatMul with its bias Add and a Gemm with C round twice).
ARITH_OPS = {"conv", "convT", "gemm", "matmul", "bn", "Mul", "Add", "Sub", "Div", "pool", "reduce", "resize"}


def path_ops(steps) -> int:
    """Rounding steps on the longest path through ``steps`` (nested bodies included; the
    longer branch of a Concat)."""
    count = 0
    for step in steps:
        op = step["op"]
        if "body" in step:
            count += path_ops(step["body"])
        elif op == "concat":
            count += max(path_ops([branch]) for branch in step["branches"])
        elif op == "sum":  # the longest branch, then the sums
            count += max(path_ops(chain) for chain in step["chains"]) + len(step["chains"]) - 1
        elif op in ARITH_OPS:
            count += 1 + (op == "matmul" and step.get("bias") is not None) + (op == "gemm" and step["c"] != "none")
    return count


def reduction_width(recipe: dict) -> int:
    """The most products any one output element of a linear op sums (its fan-in): the
    length of the widest dot product, whose rounding grows with it."""
    def widest(state: State, steps) -> int:
        width = 1
        for step in steps:
            op = step["op"]
            if op in ("conv", "convT"):
                width = max(width, state.shape[1] // step["group"] * math.prod(step["k"]))
            elif op == "gemm":
                width = max(width, state.shape[0] if step["transA"] else state.shape[1])
            elif op == "matmul":
                width = max(width, state.shape[-1])
            elif op == "scan":
                width = max(width, widest(scan_inner_state(state), step["body"]))
            elif "body" in step:
                width = max(width, widest(state, step["body"]))
            elif op == "concat":
                width = max(width, *(widest(state, [branch]) for branch in step["branches"]))
            elif op == "sum":
                width = max(width, len(step["chains"]), *(widest(state, chain) for chain in step["chains"]))
            elif op in ("pool", "reduce"):  # an average or a sum adds up this many elements
                new = advance(state, step)
                width = max(width, math.prod(state.shape[1:]) // max(1, math.prod(new.shape[1:]))
                            if op == "reduce" or step["type"].startswith("Global") else step["k"] ** (state.rank - 2))
            state = advance(state, step)
        return width

    return widest(State(tuple(recipe["input"]), 0, None), recipe["steps"])


def features(recipe: dict) -> list[str]:
    steps = list(walk(recipe["steps"]))
    ops = {s["op"] for s in steps}
    taps = {s.get("tap") for s in steps} - {None}
    details = {f"gemm transA={s['transA']} transB={s['transB']}" for s in steps if s["op"] == "gemm"}
    details |= {"transpose: " + ("involution" if [s["perm"][p] for p in s["perm"]] == sorted(s["perm"]) else "cycle")
                for s in steps if s["op"] == "transpose" and s["perm"] is not None}
    state = State(tuple(recipe["input"]), 0, None)
    for step in recipe["steps"]:  # the main chain's Concats: along the channel axis or another
        if step["op"] == "concat":
            out = advance(state, step["branches"][0])
            details.add(f"concat along {'the channel axis' if step['axis'] % out.rank == out.chan else 'another axis'}")
        state = advance(state, step)
    return ([f"ir{recipe['ir']}", recipe["dtype"]] + sorted(f"op:{o}" for o in ops)
            + sorted(f"tap:{t}" for t in taps) + sorted(details))
