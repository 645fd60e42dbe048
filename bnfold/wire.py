"""The protobuf wire format of a ModelProto, just enough to keep weight bytes out of Python.

Reading: ``split_weights`` walks the top levels of a model file (model -> graph ->
initializer -> raw_data) and returns a *skeleton* (the file with the raw_data of large
main-graph initializers cut out) plus where each cut tensor's bytes lie in the file.
Parsing the skeleton costs what the graph costs, not what the weights cost; the weights
stay in the file and are read by offset only where a fold needs them.

Writing: ``encode_model`` is the inverse. It takes a serialized model whose main-graph
initializers are described but hold no data, and the byte length of each, and yields the
pieces of the full model file in protobuf's canonical field order. The caller writes the
data of each tensor where ``encode_model`` yields its index, straight from wherever it
lies, so the model is never assembled in memory. Both directions produce exactly the
bytes protobuf itself would.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

MODEL_GRAPH = 7
GRAPH_INITIALIZER = 5
TENSOR_SEGMENT = 3
TENSOR_RAW_DATA = 9
TENSOR_EXTERNAL_DATA = 13
TENSOR_DATA_LOCATION = 14

VARINT, FIXED64, LENGTH_DELIMITED, FIXED32 = 0, 1, 2, 5


class Malformed(ValueError):
    """The bytes are not a protobuf message of the expected shape."""


@dataclass(frozen=True)
class Split:
    """A model file with the raw_data of some main-graph initializers cut out.

    ``spans`` maps an initializer's position in ``graph.initializer`` to the offset and
    length of its raw_data bytes in the original buffer.
    """

    skeleton: bytes
    spans: dict[int, tuple[int, int]]


def encode_varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _tag(number: int, wire_type: int) -> bytes:
    return encode_varint(number << 3 | wire_type)


def _read_varint(buffer, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise Malformed("truncated or overlong varint")
        byte = buffer[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def fields(buffer, start: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
    """``(number, wire_type, field_start, value_start, value_end)`` for each field of the
    message in ``buffer[start:end]``; for a length-delimited field the value is its payload."""
    pos = start
    while pos < end:
        field_start = pos
        key, pos = _read_varint(buffer, pos, end)
        number, wire_type = key >> 3, key & 7
        if number == 0:
            raise Malformed("field number 0")
        if wire_type == VARINT:
            _, value_end = _read_varint(buffer, pos, end)
        elif wire_type == FIXED64:
            value_end = pos + 8
        elif wire_type == FIXED32:
            value_end = pos + 4
        elif wire_type == LENGTH_DELIMITED:
            length, pos = _read_varint(buffer, pos, end)
            value_end = pos + length
        else:  # groups: ONNX has none
            raise Malformed(f"wire type {wire_type}")
        if value_end > end:
            raise Malformed("field runs past the end of its message")
        yield number, wire_type, field_start, pos, value_end
        pos = value_end


def split_weights(buffer, min_bytes: int) -> Split | None:
    """Cut the raw_data of main-graph initializers of at least ``min_bytes`` out of a model.

    None when the bytes are not a model this can cut exactly (malformed, no graph or
    more than one, nothing large enough): the caller then parses the whole file, and
    protobuf's own parser reports what is wrong.
    """
    try:
        graphs = [f for f in fields(buffer, 0, len(buffer)) if f[0] == MODEL_GRAPH]
        if len(graphs) != 1 or graphs[0][1] != LENGTH_DELIMITED:
            return None
        _, _, graph_field, graph_start, graph_end = graphs[0]
        graph_parts: list = []
        spans: dict[int, tuple[int, int]] = {}
        index = -1  # of the initializer in graph.initializer
        for number, wire_type, field_start, start, end in fields(buffer, graph_start, graph_end):
            cut = None
            if number == GRAPH_INITIALIZER:
                index += 1
                if wire_type == LENGTH_DELIMITED:
                    cut = _raw_data_field(buffer, start, end, min_bytes)
            if cut is None:
                graph_parts.append(bytes(buffer[field_start:end]))
                continue
            raw_field_start, raw_start, raw_end = cut
            tensor = bytes(buffer[start:raw_field_start]) + bytes(buffer[raw_end:end])
            graph_parts += [_tag(GRAPH_INITIALIZER, LENGTH_DELIMITED), encode_varint(len(tensor)), tensor]
            spans[index] = (raw_start, raw_end - raw_start)
    except (Malformed, IndexError):
        return None
    if not spans:
        return None
    graph = b"".join(graph_parts)
    skeleton = b"".join([bytes(buffer[:graph_field]), _tag(MODEL_GRAPH, LENGTH_DELIMITED), encode_varint(len(graph)),
                         graph, bytes(buffer[graph_end:])])
    return Split(skeleton, spans)


def _raw_data_field(buffer, start: int, end: int, min_bytes: int) -> tuple[int, int, int] | None:
    """``(field_start, data_start, data_end)`` of a TensorProto's one raw_data field, if the
    tensor holds its data there alone and it is large enough to be worth cutting."""
    found = None
    for number, wire_type, field_start, value_start, value_end in fields(buffer, start, end):
        if number in (TENSOR_SEGMENT, TENSOR_EXTERNAL_DATA, TENSOR_DATA_LOCATION):
            return None
        if number == TENSOR_RAW_DATA:
            if found is not None or wire_type != LENGTH_DELIMITED:
                return None  # protobuf would keep the last one: leave such oddities to it
            found = (field_start, value_start, value_end)
    if found is None or found[2] - found[1] < min_bytes:
        return None
    return found


def encode_model(model: bytes, data_lengths: Sequence[int | None]) -> Iterator[bytes | int]:
    """The pieces of a model file: ``bytes`` to write as they are, and an ``int`` ``i`` where
    initializer ``i``'s raw_data bytes (``data_lengths[i]`` of them) go.

    ``model`` is a serialized ModelProto; main-graph initializer ``i`` with a length in
    ``data_lengths`` is a placeholder whose data fields (raw_data, external_data,
    data_location) are dropped (None: write that initializer as it is). The raw_data field
    goes where protobuf would put it (after the tensor's name, before its doc_string), and
    the length prefixes of the tensors and the graph account for it, so the output equals
    what serializing the filled-in model would give.
    """
    graphs = [f for f in fields(model, 0, len(model)) if f[0] == MODEL_GRAPH]
    if len(graphs) != 1:
        raise Malformed("a model to encode needs exactly one graph")
    _, _, graph_field, graph_start, graph_end = graphs[0]
    pieces: list[bytes | int] = []
    graph_length = 0
    index = 0
    for number, _, field_start, start, end in fields(model, graph_start, graph_end):
        length = data_lengths[index] if number == GRAPH_INITIALIZER and index < len(data_lengths) else None
        index += number == GRAPH_INITIALIZER
        if length is None:
            pieces.append(model[field_start:end])
            graph_length += end - field_start
            continue
        before, after = _without_data(model, start, end)
        raw_header = _tag(TENSOR_RAW_DATA, LENGTH_DELIMITED) + encode_varint(length)
        tensor_length = len(before) + len(raw_header) + length + len(after)
        header = _tag(GRAPH_INITIALIZER, LENGTH_DELIMITED) + encode_varint(tensor_length)
        pieces += [header + before + raw_header, index - 1, after]
        graph_length += len(header) + tensor_length
    if index < sum(length is not None for length in data_lengths):
        raise Malformed("fewer initializers in the model than data lengths given")
    yield model[:graph_field] + _tag(MODEL_GRAPH, LENGTH_DELIMITED) + encode_varint(graph_length)
    yield from (piece for piece in pieces if piece != b"")
    yield model[graph_end:]


def _without_data(buffer: bytes, start: int, end: int) -> tuple[bytes, bytes]:
    """A TensorProto's fields other than its data, split where raw_data belongs in
    canonical (ascending field number) order."""
    before, after = [], []
    for number, _, field_start, _, value_end in fields(buffer, start, end):
        if number in (TENSOR_RAW_DATA, TENSOR_EXTERNAL_DATA, TENSOR_DATA_LOCATION):
            continue
        (before if number < TENSOR_RAW_DATA else after).append(buffer[field_start:value_end])
    return b"".join(before), b"".join(after)
