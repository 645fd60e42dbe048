"""Prove in onnxruntime that a candidate model computes what the original computes.

Split by job, as Polygraphy splits its comparator:

- ``feeds``: model signatures, ``--shape``/``--input-range`` parsing, random and npz inputs;
- ``runner``: the onnxruntime child process (``bnfold._ort_worker``);
- ``compare``: tolerances and the comparison of arrays (pure numpy);
- ``report``: the report, its JSON form and its rich rendering;
- ``api``: ``verify``, which plans the runs and ties the others together.

The names below are imported from their modules on first use, so that importing
``bnfold.verification.runner`` (which the CLI does to start onnxruntime's process before
anything else) does not import onnx, onnx_ir and numpy first.
"""

import importlib

#: Each public name and the module that defines it.
_HOME = {
    "CPU": "bnfold._ort_worker",
    "CUDA": "bnfold._ort_worker",
    "PROGRESS_PREFIX": "bnfold._ort_worker",
    "DEFAULT_BATCH": "bnfold.verification.api",
    "DEFAULT_SAMPLES": "bnfold.verification.api",
    "DEFAULT_SEED": "bnfold.verification.api",
    "METRICS": "bnfold.verification.api",
    "PROVIDER_ALIASES": "bnfold.verification.api",
    "VerifyOptions": "bnfold.verification.api",
    "inference_copy": "bnfold.verification.api",
    "model_files": "bnfold.verification.api",
    "parse_channel_axes": "bnfold.verification.api",
    "parse_providers": "bnfold.verification.api",
    "preflight": "bnfold.verification.api",
    "verify": "bnfold.verification.api",
    "verify_or_discard": "bnfold.verification.api",
    "DEFAULT_CHANNEL_TOLERANCES": "bnfold.verification.compare",
    "DEFAULT_NOISE_FACTOR": "bnfold.verification.compare",
    "DEFAULT_TOLERANCES": "bnfold.verification.compare",
    "EXACT": "bnfold.verification.compare",
    "Difference": "bnfold.verification.compare",
    "Tolerance": "bnfold.verification.compare",
    "Top1": "bnfold.verification.compare",
    "compare_arrays": "bnfold.verification.compare",
    "default_tolerance": "bnfold.verification.compare",
    "output_scale": "bnfold.verification.compare",
    "resolve_tolerance": "bnfold.verification.compare",
    "top1": "bnfold.verification.compare",
    "INTEGER_INPUT_HIGH": "bnfold.verification.feeds",
    "InputData": "bnfold.verification.feeds",
    "ModelSignature": "bnfold.verification.feeds",
    "TensorSignature": "bnfold.verification.feeds",
    "model_signature": "bnfold.verification.feeds",
    "parse_input_ranges": "bnfold.verification.feeds",
    "parse_shape": "bnfold.verification.feeds",
    "parse_shapes": "bnfold.verification.feeds",
    "resolve_input_shapes": "bnfold.verification.feeds",
    "OPTIMIZATION_DEFAULT": "bnfold.verification.report",
    "OPTIMIZATION_DISABLED": "bnfold.verification.report",
    "REPORT_SCHEMA_VERSION": "bnfold.verification.report",
    "OutputComparison": "bnfold.verification.report",
    "RunId": "bnfold.verification.report",
    "VerifyReport": "bnfold.verification.report",
    "render_report": "bnfold.verification.report",
}

__all__ = sorted(_HOME)


def __getattr__(name: str):
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value
