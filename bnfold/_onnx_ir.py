"""onnx_ir, imported without its eager import of sympy.

onnx_ir imports sympy (about 0.45 s here, a third of a typical fold) for symbolic-shape
arithmetic that bnfold never performs. While onnx_ir is imported, ``sympy`` and
``onnx_ir._symbolic_shapes`` are stand-ins that import the real module on first attribute
access; they leave ``sys.modules`` right after, so every later ``import sympy`` (torch's,
say) gets the real one. Should onnx_ir ever need either at import time, the stand-in
imports it then; should that import fail, onnx_ir is imported the ordinary way.
"""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager

DEFERRED = ("sympy", "onnx_ir._symbolic_shapes")


class _Deferred(types.ModuleType):
    """Stands in for a module until one of its attributes is used."""

    def __getattr__(self, attribute: str):
        return getattr(importlib.import_module(self.__name__), attribute)


@contextmanager
def _deferred(names: tuple[str, ...]) -> Iterator[None]:
    stand_ins = {name: _Deferred(name) for name in names if name not in sys.modules}
    sys.modules.update(stand_ins)
    try:
        yield
    finally:
        for name, stand_in in stand_ins.items():
            if sys.modules.get(name) is stand_in:
                del sys.modules[name]


def _import_onnx_ir() -> types.ModuleType:
    if "onnx_ir" in sys.modules:
        return sys.modules["onnx_ir"]
    try:
        with _deferred(DEFERRED):
            return importlib.import_module("onnx_ir")
    except ImportError:
        for name in [n for n in sys.modules if n == "onnx_ir" or n.startswith("onnx_ir.")]:
            del sys.modules[name]
        return importlib.import_module("onnx_ir")


ir = _import_onnx_ir()
