"""``verify --precision fp16``: a model converted to fp16 by onnxconverter-common.

The conversion is the library's ``float16.convert_float_to_float16`` with the model's
inputs and outputs kept float32 (the same feeds run both versions; outputs compare with
the float32 reference) and its value clamping switched off: ``min_positive_val=0`` and
``max_finite_val=inf`` make the weights' conversion numpy's IEEE cast (round to nearest
even, beyond 65504 to inf, up to 2^-25 to 0), as onnxruntime's Cast computes it and as
``bnfold fold --target fp16`` counts it. The library's defaults clamp weights into
[1e-7, 1e4] instead, which hides an overflow as a saturated, still wrong, weight.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

from bnfold.errors import InputError
from bnfold.runtime import require_converter

#: The arguments bnfold converts with (docs/precision.md).
CONVERT_ARGUMENTS = {"keep_io_types": True, "min_positive_val": 0.0, "max_finite_val": math.inf}


def converter_version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("onnxconverter-common")
    except importlib.metadata.PackageNotFoundError:
        return "?"


def convert_fp16(path: str | Path, folder: Path, name: str) -> str:
    """Write ``path`` converted to fp16 into ``folder`` (weights in ``NAME.fp16.onnx.data``)
    and return the new model's path; a model the converter refuses is an InputError."""
    require_converter("--precision fp16")
    import onnx
    from onnxconverter_common import float16

    try:
        model = onnx.load(str(path))
    except Exception as exc:  # onnx raises several types for unreadable files
        raise InputError(f"--precision fp16: cannot read {path} ({_first_line(exc)})") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            converted = float16.convert_float_to_float16(model, **CONVERT_ARGUMENTS)
    except Exception as exc:  # the converter raises ValueError, AttributeError, ... on models it cannot take
        raise InputError(f"--precision fp16: onnxconverter-common cannot convert {path} ({_first_line(exc)})") from None
    target = Path(folder) / f"{name}.fp16.onnx"
    onnx.save(converted, str(target), save_as_external_data=True, all_tensors_to_one_file=True,
              location=f"{target.name}.data", size_threshold=1024)
    return str(target)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
