"""Hand onnxruntime a model whose large weights it maps from the model file instead of parsing.

Loading a model with embedded weights, onnxruntime parses each weight into a protobuf
string; under ORT_ENABLE_ALL its NCHWc layout transformer then makes a reordered copy
while the parsed one is still held, and a session peaks at about three times the weights
(``bench/verify_memory.py``). Given a skeleton of the model in which each large
main-graph initializer is external data pointing into the model file itself (the offset
and length ``load`` found when it cut the weights out), onnxruntime maps those bytes
instead: the same model and the same bytes, one copy fewer, and no parse. The skeleton is
loaded from memory with the model's folder named in a session option; onnxruntime's
optimizers honour that option from 1.21 on; the worker gives older ones the path
(``_ort_worker.FIRST_MAPPING_VERSION``).
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx

from bnfold.load import file_identity
from bnfold.source import Source


def mapped_model(source: Source) -> dict | None:
    """``{"model": skeleton bytes, "folder": the model file's folder, "file": its path,
    "identity": what the file was}`` for a model file with weights cut out at load; None when
    there is nothing to map (weights already external, small, or a file ``load`` parsed
    whole). The worker maps only a file whose identity is unchanged: offsets into another
    file would be other bytes."""
    if not source.spans or source.path is None:
        return None
    real = Path(source.path).resolve()  # onnxruntime refuses data reached through a link out of the folder
    if not _fits_onnxruntime(real):
        return None
    skeleton = onnx.ModelProto()
    skeleton.CopyFrom(source.proto)
    for tensor in skeleton.graph.initializer:
        span = source.spans.get(tensor.name)
        if span is None:
            continue
        offset, length = span
        tensor.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", real.name), ("offset", str(offset)), ("length", str(length))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
    return {"model": skeleton.SerializeToString(), "folder": str(real.parent), "file": str(real),
            "identity": list(file_identity(os.stat(real)))}


#: onnxruntime's limit on the length of a session option's value (the folder).
_OPTION_VALUE_LIMIT = 1024


def _fits_onnxruntime(real: Path) -> bool:
    """The file name can be a protobuf string (UTF-8) and the folder a session option."""
    try:
        real.name.encode("utf-8")
        folder = str(real.parent).encode("utf-8")
    except UnicodeEncodeError:  # a name of undecodable bytes (surrogate escapes)
        return False
    return len(folder) <= _OPTION_VALUE_LIMIT
