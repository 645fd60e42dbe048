"""Train the model zoo: real BN statistics learned on digits, exported like users export.

Needs the ``[train]`` extra (torch, onnxscript, scikit-learn). Importing this package
does not import torch; torch is imported by the submodules that need it
(:mod:`.nets`, :mod:`.fit`) and by :func:`build_zoo` when it runs, so ``import
bnfold`` and ``bnfold --help`` stay torch-free. Call :func:`require_torch` to get a
clear error when the extra is missing.
"""

from __future__ import annotations

from typing import Any

from bnfold.errors import InputError

INSTALL_HINT = "pip install torch==2.13.0 && pip install -e '.[train]' (from a clone of bnfold)"


class TrainExtraMissing(InputError):
    """torch (or onnxscript / scikit-learn) is not installed: exit 2 from the CLI."""


def require_torch() -> None:
    """Raise :class:`TrainExtraMissing` naming the install command if the extra is absent."""
    import importlib.util

    missing = []
    try:
        import torch  # noqa: F401  (imported for real: a broken install counts as missing)
    except ImportError:
        missing.append("torch")
    missing += [m for m in ("onnxscript", "sklearn") if importlib.util.find_spec(m) is None]
    if missing:
        raise TrainExtraMissing(f"bnfold train needs {', '.join(missing)}: {INSTALL_HINT}")


def build_zoo(*args: Any, **kwargs: Any):
    """See :func:`bnfold.train.zoo.build_zoo` (imported lazily)."""
    require_torch()
    from .zoo import build_zoo as _build

    return _build(*args, **kwargs)


__all__ = ["INSTALL_HINT", "TrainExtraMissing", "build_zoo", "require_torch"]
