"""bnfold: audit, fold and verify BatchNormalization in ONNX models.

The public API: ``fold`` (returns the folded model and a ledger), ``inspect`` (per-BN
inference-readiness findings), ``verify`` (onnxruntime comparison) and ``recalibrate``
(running statistics recomputed from data). Heavy modules are
imported on first use so that ``bnfold --help`` stays fast.
"""

__version__ = "0.1.0"

__all__ = ["__version__", "fold", "inspect", "recalibrate", "verify"]


def __getattr__(name: str):
    if name == "fold":
        from bnfold.engine import fold

        return fold
    if name == "inspect":
        from bnfold.audit import inspect

        return inspect
    if name == "recalibrate":
        from bnfold.recalibration import recalibrate

        return recalibrate
    if name == "verify":
        from bnfold.verification import verify

        return verify
    raise AttributeError(f"module 'bnfold' has no attribute {name!r}")
