"""Export trained nets to ONNX the way users do, and describe what each exporter emitted.

Two exporters ship with torch and they treat BatchNormalization differently:

* TorchScript (``dynamo=False``): in its default ``training=EVAL`` mode with constant
  folding it fuses Conv+BN itself (not Gemm+BN). The zoo exports with
  ``training=PRESERVE`` on an eval-mode net, which keeps every BN as an inference
  ``BatchNormalization``; ``training=TRAINING`` gives the broken training-mode BN
  (extra outputs; ``training_mode=1`` from opset 14).
* dynamo (the default since torch 2.9): ``optimize=True`` (its default) folds BN
  away; ``optimize=False`` keeps one inference BN per module. It implements opset
  18 and version-converts down; a request below what the converter can reach
  silently stays at 18, so the manifest records requested and emitted opsets.

Both get a dynamic batch axis named ``batch``. Files are written as the exporter
wrote them (never re-serialised) so their bytes are what a user would get.
This module also holds the small helpers the zoo and the tests share:
:func:`describe` (what is in an ONNX file), :func:`run_onnx` (onnxruntime with all
graph optimisations off, so ORT's own Conv+BN fusion cannot hide anything),
:func:`write_npz` (byte-reproducible .npz) and the manifest reader/writer. Only
:func:`export` needs torch.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import logging
import os
import warnings
import zipfile
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

EXPORTERS = ("torchscript", "dynamo")
EXPORTER_TAGS = {"torchscript": "ts", "dynamo": "dynamo"}
BATCH_DIM = "batch"
MANIFEST_NAME = "MANIFEST.json"
MANIFEST_FORMAT = 1


@contextlib.contextmanager
def quiet(extra_loggers: tuple[str, ...] = (), level: int = logging.ERROR) -> Iterator[None]:
    """Silence exporter chatter (prints, warnings, logging) so a progress bar survives;
    ``extra_loggers`` are silenced too, all of them at ``level`` and above."""
    names = ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript", *extra_loggers)
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(level)
    sink = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def export(
    net,
    example,
    path: str | os.PathLike,
    *,
    exporter: str,
    opset: int,
    optimize: bool = False,
    training_mode: bool = False,
    input_name: str = "input",
    output_name: str = "logits",
) -> dict[str, Any]:
    """Export ``net`` to ``path``; return the options used (for the manifest).

    The net is deep-copied first: a training-mode export runs the forward pass and
    would otherwise update the caller's running statistics.
    """
    import torch

    if exporter not in EXPORTERS:
        raise ValueError(f"unknown exporter {exporter!r}; known: {', '.join(EXPORTERS)}")
    net = copy.deepcopy(net)
    net.train(training_mode)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    options: dict[str, Any] = {"opset_version": opset}
    with quiet():
        if exporter == "torchscript":
            mode = torch.onnx.TrainingMode.TRAINING if training_mode else torch.onnx.TrainingMode.PRESERVE
            options.update(dynamo=False, training=mode.name, do_constant_folding=not training_mode)
            torch.onnx.export(
                net, (example,), str(path), dynamo=False, opset_version=opset,
                training=mode, do_constant_folding=not training_mode,
                input_names=[input_name], output_names=[output_name],
                dynamic_axes={input_name: {0: BATCH_DIM}, output_name: {0: BATCH_DIM}},
            )
        else:
            options.update(dynamo=True, optimize=optimize, model_mode="train" if training_mode else "eval")
            program = torch.onnx.export(
                net, (example,), dynamo=True, opset_version=opset, optimize=optimize,
                input_names=[input_name], output_names=[output_name],
                dynamic_shapes=({0: torch.export.Dim(BATCH_DIM)},), verbose=False,
            )
            program.save(str(path), external_data=False)
    return options


# --------------------------------------------------------------------------- describing


def _attr(node, name, default=None):
    import onnx

    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def describe(path: str | os.PathLike) -> dict[str, Any]:
    """What an ONNX file holds: opset, BN nodes (and whether in training form), op counts."""
    import onnx

    model = onnx.load(str(path))
    g = model.graph
    bns = [n for n in g.node if n.op_type == "BatchNormalization"]

    def shape(vi):
        return [d.dim_param if d.HasField("dim_param") else d.dim_value for d in vi.type.tensor_type.shape.dim]

    return {
        "opset": next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None),
        "ir_version": model.ir_version,
        "bn_count": len(bns),
        # training_mode=1 (opset >= 14) or the opset-9..13 form with running-stat outputs
        "bn_training_mode_attr": sum(1 for n in bns if _attr(n, "training_mode", 0) == 1),
        "bn_with_extra_outputs": sum(1 for n in bns if len([o for o in n.output if o]) > 1),
        "bn_nodes": [n.name for n in bns],
        "op_counts": dict(sorted(Counter(n.op_type for n in g.node).items())),
        "inputs": {vi.name: shape(vi) for vi in g.input if vi.name not in {i.name for i in g.initializer}},
        "outputs": {vi.name: shape(vi) for vi in g.output},
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
    }


def sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def run_onnx(path_or_bytes, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """Run a model in onnxruntime (CPU) with every graph optimisation disabled."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    src = str(path_or_bytes) if isinstance(path_or_bytes, (str, os.PathLike)) else path_or_bytes
    sess = ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    return sess.run(None, dict(feeds))


def write_npz(path: str | os.PathLike, arrays: Mapping[str, np.ndarray]) -> None:
    """``np.savez_compressed`` with fixed zip timestamps, so equal arrays give equal bytes."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for key, arr in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue(), compresslevel=9)
    os.replace(tmp, path)


def load_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


# --------------------------------------------------------------------------- manifest


def load_manifest(folder: str | os.PathLike) -> dict[str, Any] | None:
    p = Path(folder) / MANIFEST_NAME
    if not p.exists():
        return None
    return json.loads(p.read_text())


def write_manifest(folder: str | os.PathLike, manifest: dict[str, Any]) -> Path:
    """Write MANIFEST.json atomically, models sorted by file name, stable key order."""
    p = Path(folder) / MANIFEST_NAME
    manifest = dict(manifest)
    manifest["models"] = sorted(manifest.get("models", []), key=lambda e: e["file"])
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, p)
    return p
