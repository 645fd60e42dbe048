"""The model zoo: which nets are trained, how each is exported, which are broken on purpose.

A :class:`Job` trains one network; its :class:`Artifact` s are the ONNX files exported
from that one set of weights (so e.g. ``cnn_ts13`` and ``cnn_dynamo18`` hold the same
function). The matrix is chosen to cover both exporters and opsets 13/17/18 without
bloating ``models/``: every architecture as TorchScript opset 13 and dynamo opset 18,
plus TorchScript 17, dynamo 17 and the dynamo ``optimize=True`` output for the CNN and
TorchScript 17 for the MLP.

Broken models ``bnfold inspect`` must reject, each built the way the mistake happens:

* ``cnn-trainmode_ts13`` / ``_ts17`` - the trained CNN exported without ``model.eval()``
  (``training=TRAINING``): BN normalises with batch statistics (opset 13: extra
  running-stat outputs; opset 17: ``training_mode=1``).
* ``cnn-nostats_ts17`` - the CNN's parameters restored from a checkpoint that saved
  ``named_parameters()`` only (``load_state_dict(strict=False)``): running statistics
  were never updated, mean 0 / var 1 everywhere.
* ``mlp-deadpixel_dynamo18`` - input-normalising BN trained with cumulative averaging
  (``momentum=None``) on raw pixels: the digits' always-blank pixels give channels whose
  running variance is exactly 0. (The healthy ``mlp-inputnorm`` twin is trained with
  dequantisation jitter, which is what keeps those channels alive.)

:func:`build_zoo` writes ``<name>.onnx``, ``<name>.npz`` (the model's real test inputs,
keyed by its ONNX input name), ``digits_test_labels.npz`` and ``MANIFEST.json``.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bnfold.errors import InputError

from . import data as D
from . import export as E

LABELS_FILE = "digits_test_labels.npz"
DEFAULT_MODEL = "cnn_ts13.onnx"
#: a healthy model's BN channels must have running variance above this
HEALTHY_MIN_VAR = 1e-3
#: exported (eval) ONNX vs torch eval, max |diff| tolerated before the build fails
EXPORT_ATOL = 1e-4


@dataclass(frozen=True)
class Artifact:
    """One exported ONNX file of a job's trained net."""

    exporter: str
    opset: int
    optimize: bool = False
    training_mode: bool = False
    variant: str = ""  # appended to the job name: cnn-trainmode_ts13
    health: str = "healthy"
    expected_problems: tuple[str, ...] = ()


@dataclass(frozen=True)
class Job:
    """One trained network and the files exported from it."""

    name: str
    architecture: str
    description: str
    epochs: int
    artifacts: tuple[Artifact, ...]
    net_kwargs: Mapping[str, Any] = field(default_factory=dict)
    input_noise: float = 0.0
    seed: int = 0
    lr: float = 3e-3
    parameters_from: str | None = None  # copy only the parameters of that job's trained net
    expect_all_folded: bool = True  # every BN has a linear neighbour it can fold into


def artifact_name(job: Job, art: Artifact) -> str:
    stem = f"{job.name}-{art.variant}" if art.variant else job.name
    return f"{stem}_{E.EXPORTER_TAGS[art.exporter]}{art.opset}{'opt' if art.optimize else ''}"


TS13 = Artifact("torchscript", 13)
TS17 = Artifact("torchscript", 17)
DY17 = Artifact("dynamo", 17)
DY18 = Artifact("dynamo", 18)

JOBS: tuple[Job, ...] = (
    Job("mlp", "mlp", "Linear -> BN1d -> ReLU x2 -> Linear: the textbook Dense+BN net (Gemm -> BN).",
        epochs=20, artifacts=(TS13, TS17, DY18)),
    Job("mlp-inputnorm", "mlp-inputnorm",
        "BN1d on the raw pixels (input normalisation), then Linear -> ReLU -> BN1d x2 -> Linear: "
        "no BN has a linear producer; each folds forward into the Linear that reads it. "
        "Trained with dequantisation jitter.",
        epochs=20, artifacts=(TS13, DY18), input_noise=1.0),
    Job("cnn", "cnn",
        "Conv2d -> BN2d -> ReLU, strided conv, depthwise conv + BN, bias-free 1x1 conv + BN, "
        "Linear -> BN1d -> ReLU -> Linear.",
        epochs=10,
        artifacts=(
            TS13, TS17, DY17, DY18,
            Artifact("dynamo", 18, optimize=True),
            Artifact("torchscript", 13, training_mode=True, variant="trainmode",
                     health="training-mode", expected_problems=("training-mode",)),
            Artifact("torchscript", 17, training_mode=True, variant="trainmode",
                     health="training-mode", expected_problems=("training-mode",)),
        )),
    Job("cnn-nostats", "cnn",
        "The trained cnn's parameters restored from a parameters-only checkpoint "
        "(load_state_dict(strict=False)): running statistics never updated (mean 0 / var 1).",
        epochs=0, parameters_from="cnn",
        artifacts=(Artifact("torchscript", 17, health="untrained-stats", expected_problems=("untrained-stats",)),)),
    Job("resnet", "resnet", "Residual blocks; the strided block's 1x1 projection shortcut has its own BN "
        "(BN on both branches of the Add).", epochs=10, artifacts=(TS13, DY18)),
    Job("autoencoder", "autoencoder",
        "Conv encoder; decoder ConvTranspose2d -> BN2d with groups=1 and groups=4; sigmoid output.",
        epochs=15, artifacts=(TS13, DY18)),
    Job("seq1d", "seq1d", "Conv1d -> BN1d over the 8 image rows as a sequence (BN on 3-D tensors).",
        epochs=15, artifacts=(TS13, DY18)),
    Job("clip3d", "clip3d", "Conv3d -> BN3d on a 4-frame clip of the digit sliding right (BN on 5-D tensors).",
        epochs=8, artifacts=(TS13, DY18)),
    Job("mlp-deadpixel", "mlp-inputnorm",
        "The input-normalising MLP trained without jitter and with cumulative BN averaging "
        "(momentum=None): the always-blank border pixels leave running variance exactly 0.",
        epochs=10, net_kwargs={"momentum": None},
        artifacts=(Artifact("dynamo", 18, health="zero-variance", expected_problems=("zero-variance",)),)),
)

JOBS_BY_NAME = {j.name: j for j in JOBS}
ARTIFACT_NAMES = {artifact_name(j, a): (j, a) for j in JOBS for a in j.artifacts}


@dataclass
class ZooEvent:
    """Progress report from :func:`build_zoo`.

    kind: "plan" (``total`` work units), "epoch" (one unit; ``metrics['loss']``),
    "trained" (``metrics`` = torch eval test metric), "exported" (one unit; ``entry``).
    """

    kind: str
    job: str = ""
    step: int = 0
    total: int = 0
    metrics: dict[str, float] | None = None
    entry: dict[str, Any] | None = None


ProgressFn = Callable[[ZooEvent], None]


def select(only: str | Iterable[str] | None) -> dict[str, list[Artifact]]:
    """Jobs and artifacts to write for ``--only`` (job names, file stems or file names)."""
    if only is None:
        return {j.name: list(j.artifacts) for j in JOBS}
    names = [only] if isinstance(only, str) else list(only)
    picked: dict[str, list[Artifact]] = {}
    for raw in names:
        name = raw.removesuffix(".onnx")
        if name in JOBS_BY_NAME:
            picked[name] = list(JOBS_BY_NAME[name].artifacts)
        elif name in ARTIFACT_NAMES:
            job, art = ARTIFACT_NAMES[name]
            arts = picked.setdefault(job.name, [])
            if art not in arts:
                arts.append(art)
        else:
            known = ", ".join(sorted([*JOBS_BY_NAME, *ARTIFACT_NAMES]))
            raise InputError(f"unknown zoo model {raw!r}; known: {known}")
    return picked


def _training_order(selected: Iterable[str]) -> list[Job]:
    needed: list[str] = []
    for name in selected:
        job = JOBS_BY_NAME[name]
        if job.parameters_from and job.parameters_from not in needed:
            needed.append(job.parameters_from)
        if name not in needed:
            needed.append(name)
    return [j for j in JOBS if j.name in needed]


def make_net(job: Job):
    from .nets import ARCHITECTURES

    return ARCHITECTURES[job.architecture](**dict(job.net_kwargs))


def train_job(job: Job, digits: D.Digits, *, epochs: int | None = None, trained: Mapping[str, Any] | None = None,
              on_epoch: Callable[[int, float], None] | None = None, max_steps: int | None = None):
    """Build and train the job's net deterministically; returns it in eval mode."""
    from .fit import deterministic, fit

    with deterministic(job.seed):
        net = make_net(job)  # constructed under the seed, so the initial weights are reproducible
        if job.parameters_from:
            source = (trained or {})[job.parameters_from]
            params = {k: v for k, v in source.state_dict().items() if k in dict(net.named_parameters())}
            missing = net.load_state_dict(params, strict=False).missing_keys
            assert all(k.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked") for k in missing)
            net.eval()
            return net
        n_epochs = job.epochs if epochs is None else epochs
        fit(net, D.as_layout(digits.x_train, net.INPUT_LAYOUT), digits.y_train, task=net.TASK,
            epochs=n_epochs, lr=job.lr, seed=job.seed, input_noise=job.input_noise,
            on_epoch=on_epoch, max_steps=max_steps)
    return net


def _min_running_var(net) -> float | None:
    from torch import nn

    vs = [float(m.running_var.min()) for m in net.modules()
          if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_var is not None]
    return min(vs) if vs else None


def expected_bn_problems(net, training_mode: bool) -> list[list[str]]:
    """The problems ``bnfold inspect`` should report per BN, derived from the torch
    module's own state (an oracle independent of the ONNX audit), one list per BN."""
    from torch import nn

    out = []
    for m in net.modules():
        if not isinstance(m, nn.modules.batchnorm._BatchNorm):
            continue
        problems = ["training-mode"] if training_mode else []
        var, mean = m.running_var.detach().numpy(), m.running_mean.detach().numpy()
        if (var < 0).any():
            problems.append("negative-variance")
        if (var == 0).any():
            problems.append("zero-variance")
        if ((var > 0) & (var <= m.eps)).any():
            problems.append("tiny-variance")
        if (mean == 0).all() and (var == 1).all():
            problems.append("untrained-stats")
        out.append(sorted(problems))
    return out


def _metrics(task: str, out: np.ndarray, x: np.ndarray, y: np.ndarray, prefix: str) -> dict[str, float]:
    from .fit import score

    return {f"{prefix}{k}": round(v, 6) for k, v in score(out, x, y, task).items()}


def export_artifact(job: Job, art: Artifact, net, digits: D.Digits, out: Path, *, torch_out: np.ndarray,
                    epochs: int) -> dict[str, Any]:
    """Export one artifact, write its inputs, check it in ORT; return its manifest entry."""
    import torch

    from .nets import count_bn, num_params

    name = artifact_name(job, art)
    x_test = D.as_layout(digits.x_test, net.INPUT_LAYOUT)
    output_name = "logits" if net.TASK == "classification" else "reconstruction"
    example = torch.from_numpy(D.as_layout(digits.x_train[:4], net.INPUT_LAYOUT))
    onnx_path = out / f"{name}.onnx"
    options = E.export(net, example, onnx_path, exporter=art.exporter, opset=art.opset, optimize=art.optimize,
                       training_mode=art.training_mode, input_name="input", output_name=output_name)
    info = E.describe(onnx_path)
    E.write_npz(out / f"{name}.npz", {"input": x_test})
    (ort_out,) = E.run_onnx(onnx_path, {"input": x_test})[:1]
    max_diff = float(np.max(np.abs(ort_out - torch_out)))
    if not art.training_mode and max_diff > EXPORT_ATOL:
        raise RuntimeError(f"{name}: exported ONNX differs from torch eval by {max_diff:g}")
    min_var = _min_running_var(net)
    if art.health == "healthy" and min_var is not None and min_var < HEALTHY_MIN_VAR:
        raise RuntimeError(f"{name}: meant to be healthy but a BN channel has running_var {min_var:g}")
    if info["bn_count"] != (0 if art.optimize else count_bn(net)):
        raise RuntimeError(f"{name}: {info['bn_count']} BatchNormalization nodes for {count_bn(net)} BN modules")
    bn_problems = expected_bn_problems(net, art.training_mode) if info["bn_count"] else []
    found = {p for ps in bn_problems for p in ps}
    if not set(art.expected_problems) <= found or (art.health == "healthy") != (not found):
        raise RuntimeError(f"{name}: meant to be {art.health} but its BN state gives {sorted(found) or 'no problems'}")
    metrics = _metrics(net.TASK, ort_out, x_test, digits.y_test, "test_")
    torch_metrics = _metrics(net.TASK, torch_out, x_test, digits.y_test, "torch_eval_")
    entry: dict[str, Any] = {
        "file": onnx_path.name,
        "name": name,
        "job": job.name,
        "architecture": job.architecture,
        "architecture_class": type(net).__name__,
        "description": job.description,
        "task": net.TASK,
        "health": art.health,
        "expected_problems": list(art.expected_problems),
        "expected_bn_problems": bn_problems,
        # Health problems do not stop a fold (fold reports them); training mode does.
        "expect_all_folded": bool(job.expect_all_folded and art.health != "training-mode"),
        "exporter": art.exporter,
        "export_options": options,
        "opset_requested": art.opset,
        "opset": info["opset"],
        "bn_count": info["bn_count"],
        "bn_modules": count_bn(net),
        "emitted": {k: info[k] for k in ("bn_training_mode_attr", "bn_with_extra_outputs", "bn_nodes",
                                          "op_counts", "ir_version", "producer")},
        "input_name": "input",
        "input_shape": info["inputs"].get("input"),
        "input_layout": net.INPUT_LAYOUT,
        "output_name": output_name,
        "output_shape": info["outputs"].get(output_name),
        "inputs": f"{name}.npz",
        "labels": LABELS_FILE,
        "test_accuracy": metrics.get("test_accuracy"),
        **({"test_mse": metrics["test_mse"]} if "test_mse" in metrics else {}),
        **torch_metrics,
        "max_abs_diff_vs_torch_eval": max_diff,
        "min_running_var": min_var,
        "epochs": epochs,
        "seed": job.seed,
        "params": num_params(net),
        "torch_version": torch.__version__,
        "size_bytes": onnx_path.stat().st_size,
        "sha256": E.sha256(onnx_path),
        "inputs_sha256": E.sha256(out / f"{name}.npz"),
    }
    return entry


def probe_exporters(net, digits: D.Digits) -> dict[str, Any]:
    """What each exporter does to BN when left to its defaults (recorded, not kept as files)."""
    import torch

    x = D.as_layout(digits.x_test, net.INPUT_LAYOUT)
    example = torch.from_numpy(D.as_layout(digits.x_train[:4], net.INPUT_LAYOUT))
    from .fit import predict
    from .nets import count_bn

    eval_out = predict(net, x)
    notes: dict[str, Any] = {"probe_model": "cnn", "bn_modules": count_bn(net)}
    with tempfile.TemporaryDirectory() as tmp, E.quiet():
        p = Path(tmp) / "ts_default.onnx"
        torch.onnx.export(copy.deepcopy(net).eval(), (example,), str(p), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits"])
        d = E.describe(p)
        notes["torchscript_default_eval"] = {
            "options": "dynamo=False, training=EVAL, do_constant_folding=True (defaults)",
            "bn_count": d["bn_count"],
            "meaning": "the exporter fuses Conv+BN itself; BN after Gemm survives",
        }
        p = Path(tmp) / "dy_train.onnx"
        E.export(net, example, p, exporter="dynamo", opset=18, training_mode=True)
        d = E.describe(p)
        (o,) = E.run_onnx(p, {"input": x})
        notes["dynamo_train_mode_net"] = {
            "options": "dynamo=True, optimize=False, net left in train mode",
            "bn_count": d["bn_count"],
            "bn_training_mode_attr": d["bn_training_mode_attr"],
            "bn_with_extra_outputs": d["bn_with_extra_outputs"],
            "outputs_equal_eval_mode": bool(np.allclose(o, eval_out, rtol=1e-4, atol=1e-4)),
        }
        p = Path(tmp) / "dy13.onnx"
        E.export(net, example, p, exporter="dynamo", opset=13)
        notes["dynamo_opset13_request"] = {"opset_requested": 13, "opset_emitted": E.describe(p)["opset"]}
    return notes


def build_zoo(out: str | Path = "models", only: str | Iterable[str] | None = None, epochs: int | None = None,
              progress: ProgressFn | None = None) -> list[dict[str, Any]]:
    """Train, export and describe the zoo (or the ``only`` subset) into ``out``.

    With ``only`` the existing MANIFEST.json is updated in place (entries for the
    regenerated files replaced); without it the manifest is rewritten from scratch.
    Returns the manifest entries written by this call.
    """
    import onnx
    import onnxruntime
    import torch

    from .fit import predict

    emit = progress or (lambda ev: None)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    selected = select(only)
    order = _training_order(selected)
    n_epochs = {j.name: (0 if j.parameters_from else (j.epochs if epochs is None else epochs)) for j in order}
    emit(ZooEvent("plan", total=sum(n_epochs.values()) + sum(len(a) for a in selected.values())))

    digits = D.load_digits_split()
    E.write_npz(out / LABELS_FILE, {"labels": digits.y_test})
    trained: dict[str, Any] = {}
    entries: list[dict[str, Any]] = []
    notes: dict[str, Any] | None = None
    for job in order:
        def on_epoch(ep: int, loss: float, _job=job) -> None:
            emit(ZooEvent("epoch", job=_job.name, step=ep, total=n_epochs[_job.name], metrics={"loss": loss}))

        net = train_job(job, digits, epochs=epochs, trained=trained, on_epoch=on_epoch)
        trained[job.name] = net
        x_test = D.as_layout(digits.x_test, net.INPUT_LAYOUT)
        torch_out = predict(net, x_test)
        emit(ZooEvent("trained", job=job.name, metrics=_metrics(net.TASK, torch_out, x_test, digits.y_test, "")))
        for art in selected.get(job.name, []):
            entry = export_artifact(job, art, net, digits, out, torch_out=torch_out, epochs=n_epochs[job.name])
            entries.append(entry)
            emit(ZooEvent("exported", job=job.name, entry=entry))
        if job.name == "cnn" and job.name in selected:
            notes = probe_exporters(net, digits)

    old = E.load_manifest(out) if only is not None else None
    new_files = {e["file"] for e in entries}
    models = [e for e in (old or {}).get("models", []) if e["file"] not in new_files] + entries
    if notes is not None:
        opt = next((m for m in models if m["exporter"] == "dynamo" and m["export_options"].get("optimize")), None)
        if opt is not None:
            notes["dynamo_optimize_true"] = {"file": opt["file"], "bn_count": opt["bn_count"],
                                             "meaning": "optimize=True folds every BN away"}
    manifest = {
        "format": E.MANIFEST_FORMAT,
        "generator": "bnfold train (bnfold.train.zoo.build_zoo)",
        "torch_version": torch.__version__,
        "onnx_version": onnx.__version__,
        "onnxruntime_version": onnxruntime.__version__,
        "dataset": {
            "name": "sklearn.datasets.load_digits",
            "split": f"stratified train_test_split(test_size={D.TEST_SIZE}, random_state={D.SPLIT_SEED})",
            "test_samples": int(len(digits.y_test)),
            "labels": LABELS_FILE,
            "layouts": D.LAYOUTS,
        },
        "default_model": DEFAULT_MODEL,
        "exporter_notes": notes if notes is not None else (old or {}).get("exporter_notes", {}),
        "models": models,
    }
    E.write_manifest(out, manifest)
    return entries
