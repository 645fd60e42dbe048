"""Which onnxruntime build is installed, and a one-line answer when there is none.

``onnxruntime`` (CPU) and ``onnxruntime-gpu`` install the same module, ``onnxruntime``,
and installing one over the other leaves a mix of their files. So bnfold depends on
neither: the extras pick one (``bnfold[cpu]``, ``bnfold[gpu]``), and installing or
upgrading bnfold never replaces the build a user has. Folding and inspecting do not need
onnxruntime; verify and recalibrate check for it before they start.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util

from bnfold.errors import BnfoldError

#: As the README installs bnfold: from a clone, with an extra.
INSTALL_HINT = "pip install '.[cpu]', or '.[gpu]' for onnxruntime-gpu and CUDA (from a clone of bnfold)"
#: The distributions that provide the module ``onnxruntime`` for the providers bnfold runs.
BUILDS = ("onnxruntime", "onnxruntime-gpu")


class RuntimeMissing(BnfoldError):
    """onnxruntime is not installed: exit 2 from the CLI, with the install command."""


def require_onnxruntime(command: str) -> None:
    """Raise RuntimeMissing, naming both builds, if the module ``onnxruntime`` is absent."""
    if importlib.util.find_spec("onnxruntime") is None:
        raise RuntimeMissing(f"{command} runs models in onnxruntime, which is not installed: {INSTALL_HINT}")


def installed_builds() -> list[str]:
    """Which of BUILDS pip has installed (their metadata, without importing onnxruntime)."""
    found = []
    for name in BUILDS:
        try:
            importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        found.append(name)
    return found


def runtime_notes() -> list[str]:
    """A note when both builds are installed: their shared files are whichever came last."""
    builds = installed_builds()
    if len(builds) < 2:
        return []
    return [f"both {' and '.join(builds)} are installed; they share the module onnxruntime and overwrite each "
            "other's files: pip uninstall -y onnxruntime onnxruntime-gpu, then " + INSTALL_HINT]


#: `verify --precision fp16` converts models with onnxconverter-common (the [precision] extra).
CONVERTER_HINT = "pip install '.[precision]' (onnxconverter-common; from a clone of bnfold)"


class ConverterMissing(BnfoldError):
    """onnxconverter-common is not installed: exit 2 from the CLI, with the install command."""


def require_converter(option: str) -> None:
    """Raise ConverterMissing if onnxconverter-common, which converts models to fp16, is absent."""
    if importlib.util.find_spec("onnxconverter_common") is None:
        raise ConverterMissing(f"{option} converts the models with onnxconverter-common, which is not installed: "
                               f"{CONVERTER_HINT}")
