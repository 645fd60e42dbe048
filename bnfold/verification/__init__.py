"""Prove in onnxruntime that a candidate model computes what the original computes.

Split by job, as Polygraphy splits its comparator:

- ``feeds``: model signatures, ``--shape``/``--input-range`` parsing, random and npz inputs;
- ``runner``: the onnxruntime child process (``bnfold._ort_worker``);
- ``compare``: tolerances and the comparison of arrays (pure numpy);
- ``report``: the report, its JSON form and its rich rendering;
- ``api``: ``verify``, which plans the runs and ties the others together.
"""

from bnfold._ort_worker import CPU, CUDA, PROGRESS_PREFIX
from bnfold.verification.api import (
    DEFAULT_BATCH,
    DEFAULT_SAMPLES,
    DEFAULT_SEED,
    METRICS,
    PROVIDER_ALIASES,
    VerifyOptions,
    inference_copy,
    model_files,
    parse_channel_axes,
    parse_providers,
    preflight,
    verify,
    verify_or_discard,
)
from bnfold.verification.compare import (
    DEFAULT_CHANNEL_TOLERANCES,
    DEFAULT_NOISE_FACTOR,
    DEFAULT_TOLERANCES,
    EXACT,
    Difference,
    Tolerance,
    Top1,
    compare_arrays,
    default_tolerance,
    output_scale,
    resolve_tolerance,
    top1,
)
from bnfold.verification.feeds import (
    INTEGER_INPUT_HIGH,
    InputData,
    ModelSignature,
    TensorSignature,
    model_signature,
    parse_input_ranges,
    parse_shape,
    parse_shapes,
    resolve_input_shapes,
)
from bnfold.verification.report import (
    OPTIMIZATION_DEFAULT,
    OPTIMIZATION_DISABLED,
    REPORT_SCHEMA_VERSION,
    OutputComparison,
    RunId,
    VerifyReport,
    render_report,
)

__all__ = [
    "CPU",
    "CUDA",
    "DEFAULT_BATCH",
    "DEFAULT_CHANNEL_TOLERANCES",
    "DEFAULT_NOISE_FACTOR",
    "DEFAULT_SAMPLES",
    "DEFAULT_SEED",
    "DEFAULT_TOLERANCES",
    "Difference",
    "EXACT",
    "INTEGER_INPUT_HIGH",
    "InputData",
    "METRICS",
    "ModelSignature",
    "OPTIMIZATION_DEFAULT",
    "OPTIMIZATION_DISABLED",
    "OutputComparison",
    "PROGRESS_PREFIX",
    "PROVIDER_ALIASES",
    "REPORT_SCHEMA_VERSION",
    "RunId",
    "TensorSignature",
    "Tolerance",
    "Top1",
    "VerifyOptions",
    "VerifyReport",
    "compare_arrays",
    "default_tolerance",
    "inference_copy",
    "model_files",
    "model_signature",
    "output_scale",
    "parse_channel_axes",
    "parse_input_ranges",
    "parse_providers",
    "parse_shape",
    "parse_shapes",
    "preflight",
    "render_report",
    "resolve_input_shapes",
    "resolve_tolerance",
    "top1",
    "verify",
    "verify_or_discard",
]
