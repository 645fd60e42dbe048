"""Weights left in the model file at load and streamed at save: byte-exact against protobuf.

``bnfold.wire`` cuts large raw_data out of a model before parsing and puts it back while
writing. Every test here compares bytes with what onnx / onnx_ir produce by parsing and
serializing the whole model, and ``EMBEDDED_MIN_BYTES`` is lowered to 0 where the small
test models would otherwise keep every weight inline.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path
from unittest import mock

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as onh
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import bnfold
import bnfold.load
from bnfold import wire
from bnfold._onnx_ir import ir
from bnfold.errors import InputError
from bnfold.load import EmbeddedTensor, load_model
from bnfold.save import save_model
from bnfold.writer import all_tensors
from builders import GraphBuilder, run
from test_equivalence import build, graphs

MODELS = Path(__file__).resolve().parent.parent / "models"
ZOO = sorted(p for p in MODELS.glob("*.onnx") if "broken" not in p.name)
EVERYTHING_CUT, NOTHING_CUT = 0, 2**62


def cut_at(min_bytes: int):
    return mock.patch.object(bnfold.load, "EMBEDDED_MIN_BYTES", min_bytes)


def protobuf_round_trip(path: Path) -> bytes:
    """What parsing and serializing the whole model gives (onnx_ir, no bnfold)."""
    return ir.serde.serialize_model(ir.load(path)).SerializeToString()


def protobuf_fold(path: Path) -> bytes:
    """What folding the fully parsed model (a ModelProto in memory) and serializing it with
    protobuf gives."""
    return bnfold.fold(onnx.load(path)).to_proto().SerializeToString()


def conv_stack(tmp_path: Path, layers: int = 3, channels: int = 16) -> Path:
    """Conv+BN layers with weights well above EMBEDDED_MIN_BYTES."""
    b = GraphBuilder(seed=3)
    y = b.input([1, channels, 4, 4])
    for _ in range(layers):
        y = b.bn(b.node("Conv", [y, b.random([channels, channels, 9, 9])], pads=[4, 4, 4, 4]), channels)
    b.output(y)
    path = tmp_path / "stack.onnx"
    onnx.save(b.model(), path)
    return path


def with_external_data(model: onnx.ModelProto, folder: Path) -> Path:
    """``folder/m.onnx`` with every tensor, subgraphs' too, in ``folder/m.data``."""
    folder.mkdir()
    onnx.save(model, folder / "m.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
              location="m.data", size_threshold=0)
    return folder / "m.onnx"


# --- the wire format ----------------------------------------------------------------------


@settings(max_examples=150)
@given(graphs(), st.sampled_from([0, 1, 24, 100, 10**9]))
def test_split_and_encode_give_back_protobufs_own_bytes(cfg, min_bytes):
    model = build(cfg)[0]
    data = model.SerializeToString()
    split = wire.split_weights(data, min_bytes)
    raw = [len(t.raw_data) for t in model.graph.initializer if t.HasField("raw_data")]
    if split is None:
        assert not any(n >= min_bytes for n in raw)
        return
    skeleton = onnx.ModelProto.FromString(split.skeleton)
    assert sorted(n for n in raw if n >= min_bytes) == sorted(length for _, length in split.spans.values())
    for index, (offset, length) in split.spans.items():
        assert not skeleton.graph.initializer[index].HasField("raw_data")
        assert data[offset:offset + length] == model.graph.initializer[index].raw_data
    lengths = [split.spans[i][1] if i in split.spans else None for i in range(len(skeleton.graph.initializer))]
    pieces = wire.encode_model(split.skeleton, lengths)
    rebuilt = b"".join(p if isinstance(p, bytes) else data[split.spans[p][0]:sum(split.spans[p])] for p in pieces)
    assert rebuilt == data


def test_split_leaves_what_protobuf_must_decide_to_protobuf():
    tensor = onh.from_array(np.arange(8, dtype=np.float32), "w")
    graph = oh.make_graph([], "g", [], [oh.make_tensor_value_info("w", onnx.TensorProto.FLOAT, [8])], [tensor])
    data = oh.make_model(graph).SerializeToString()
    graph_field = oh.make_model(graph).graph.SerializeToString()
    twice_raw = tensor.SerializeToString() + b"\x4a\x00"  # a second raw_data: protobuf keeps the last
    twice_graph = data + b"\x3a" + wire.encode_varint(len(graph_field)) + graph_field

    assert wire.split_weights(data, 0) is not None
    assert wire.split_weights(twice_graph, 0) is None
    assert wire.split_weights(data[:-3], 0) is None
    assert wire.split_weights(b"\x08" * 20, 0) is None
    assert wire._raw_data_field(twice_raw, 0, len(twice_raw), 0) is None


# --- load and save ------------------------------------------------------------------------


@pytest.mark.parametrize("min_bytes", [EVERYTHING_CUT, NOTHING_CUT])
@pytest.mark.parametrize("path", ZOO, ids=lambda p: p.stem)
def test_load_then_save_is_byte_identical_to_protobuf(tmp_path, path, min_bytes):
    with cut_at(min_bytes):
        model = load_model(path)
        save_model(model, tmp_path / "out.onnx")
    cut = [v for v in model.graph.initializers.values() if isinstance(v.const_value, EmbeddedTensor)]
    assert bool(cut) == (min_bytes == EVERYTHING_CUT)
    assert (tmp_path / "out.onnx").read_bytes() == protobuf_round_trip(path)


@pytest.mark.parametrize("path", ZOO, ids=lambda p: p.stem)
def test_folding_weights_left_in_the_file_equals_folding_parsed_ones(tmp_path, path):
    outputs = []
    for min_bytes in (EVERYTHING_CUT, NOTHING_CUT):
        with cut_at(min_bytes):
            bnfold.fold(path).save(tmp_path / f"{min_bytes}.onnx")
        outputs.append((tmp_path / f"{min_bytes}.onnx").read_bytes())
    assert outputs[0] == outputs[1] == protobuf_fold(path)


@settings(max_examples=60)
@given(graphs())
def test_random_graphs_fold_the_same_from_a_file(cfg):
    model, feeds, _ = build(cfg)
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "in.onnx"
        onnx.save(model, source)
        with cut_at(EVERYTHING_CUT):
            bnfold.fold(source).save(Path(folder) / "out.onnx")
        streamed = (Path(folder) / "out.onnx").read_bytes()
        assert streamed == protobuf_fold(source)
        expected, actual = run(model, feeds), run(onnx.ModelProto.FromString(streamed), feeds)
    tolerance = 2e-2 if cfg["dtype"] == np.float16 else 1e-4
    for want, got in zip(expected, actual):
        np.testing.assert_allclose(got, want, rtol=tolerance, atol=tolerance)


def test_large_weights_stay_in_the_file_until_written(tmp_path):
    path = conv_stack(tmp_path)
    model = load_model(path)
    weights = [v.const_value for v in model.graph.initializers.values() if v.const_value.nbytes >= 2**14]

    assert weights and all(isinstance(t, EmbeddedTensor) for t in weights)
    assert not bnfold.load.has_external_data(model)
    bnfold.fold(model).save(tmp_path / "out.onnx")
    assert (tmp_path / "out.onnx").read_bytes() == protobuf_fold(path)
    assert not (tmp_path / "out.onnx.data").exists()


def test_the_output_is_protobufs_serialization_of_the_output_model(tmp_path):
    """docs/io.md: the embedded output is byte-identical to ``result.to_proto()``
    serialized by protobuf, weights streamed from the input file or not, also where the
    input holds what onnx_ir would drop (unknown fields), so that rebuilding the model
    with ``onnx_ir.serde.serialize_model`` gives other bytes."""
    from richgen import add_unknown

    model = onnx.load(conv_stack(tmp_path))
    add_unknown(model, 1)
    add_unknown(model.graph, 2)
    add_unknown(model.graph.node[0], 3)
    path = tmp_path / "unknown.onnx"
    path.write_bytes(model.SerializeToString())
    with cut_at(EVERYTHING_CUT):
        result = bnfold.fold(path)
        result.save(tmp_path / "out.onnx")
        expected = bnfold.fold(path).to_proto().SerializeToString()
    written = (tmp_path / "out.onnx").read_bytes()
    assert written == expected
    assert written != ir.serde.serialize_model(bnfold.fold(path).model).SerializeToString()
    assert b"bnfold-unknown-2" in written


def test_a_hard_linked_model_file_folds(tmp_path):
    path = conv_stack(tmp_path)
    os.link(path, tmp_path / "link.onnx")  # onnx_ir refuses hard-linked *external data* files

    bnfold.fold(path).save(tmp_path / "out.onnx")
    assert (tmp_path / "out.onnx").read_bytes() == protobuf_fold(path)


def test_a_model_file_replaced_after_loading_is_an_error_not_wrong_weights(tmp_path):
    path = conv_stack(tmp_path)
    result = bnfold.fold(path)
    (tmp_path / "other").mkdir()
    os.replace(conv_stack(tmp_path / "other", layers=2), path)

    with pytest.raises(InputError, match="changed after it was loaded"):
        result.save(tmp_path / "out.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other", "stack.onnx"]


@pytest.mark.parametrize("code", [errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP])
def test_copy_without_the_kernel_copy_gives_the_same_bytes(tmp_path, monkeypatch, code):
    path = conv_stack(tmp_path)
    expected = protobuf_round_trip(path)

    def refuse(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "copy_file_range", refuse)
    save_model(load_model(path), tmp_path / "out.onnx")
    assert (tmp_path / "out.onnx").read_bytes() == expected


def test_external_weights_written_inline_when_asked(tmp_path):
    path = conv_stack(tmp_path)
    external = with_external_data(onnx.load(path), tmp_path / "ext")

    bnfold.fold(external).save(tmp_path / "inline.onnx", external_data=False)
    bnfold.fold(path).save(tmp_path / "reference.onnx")
    assert (tmp_path / "inline.onnx").read_bytes() == (tmp_path / "reference.onnx").read_bytes()


def test_text_format_output_holds_the_same_model(tmp_path):
    path = conv_stack(tmp_path, layers=1)
    bnfold.fold(path).save(tmp_path / "out.onnx")
    bnfold.fold(path).save(tmp_path / "out.textproto")

    binary = onnx.load(tmp_path / "out.onnx")
    text = onnx.load(tmp_path / "out.textproto")
    assert text.SerializeToString() == binary.SerializeToString()


def test_external_data_round_trips_in_both_layouts_subgraphs_included(tmp_path):
    from test_fold import _if_model

    rng = np.random.default_rng(5)
    source = with_external_data(_if_model(rng), tmp_path / "ext")
    feeds = {"x": rng.standard_normal((1, 3, 5, 5)).astype(np.float32), "cond": np.array(True)}
    expected = run(source, feeds)

    save_model(load_model(source), tmp_path / "inline.onnx")
    save_model(load_model(source), tmp_path / "external.onnx", external_data="w.bin")

    inline = onnx.load(tmp_path / "inline.onnx", load_external_data=False)
    tensors = [tensor for tensor, _ in all_tensors(inline)]
    assert tensors and not any(t.data_location == onnx.TensorProto.EXTERNAL for t in tensors)
    for saved in ("inline.onnx", "external.onnx"):
        for want, got in zip(expected, run(tmp_path / saved, feeds)):
            np.testing.assert_array_equal(got, want)


def test_external_data_cut_short_after_loading_is_an_error_and_no_output(tmp_path):
    path = conv_stack(tmp_path)
    external = with_external_data(onnx.load(path), tmp_path / "ext")
    model = load_model(external)
    os.truncate(external.parent / "m.data", 1000)

    with pytest.raises(InputError, match="ends before"):
        save_model(model, tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()
