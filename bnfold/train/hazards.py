"""Digits-trained nets whose folds hurt the next step's precision (``--target``): the
models docs/precision.md and the tests show each precision problem on, trained in
seconds on the CPU, not part of the committed zoo.

- ``depthwise``: a MobileNet-style stack (stem conv, then depthwise 3x3 + BN + ReLU6 and
  pointwise 1x1 + BN + ReLU6 blocks) trained with a high learning rate, which leaves a
  few depthwise channels (nearly) dead: their tiny running variance multiplies their
  folded weights by up to ``1 / sqrt(eps)``, and per-tensor int8 of the folded weight
  gives the others a few levels (``int8-range-spread``, Nagel et al. 2019).
- ``tiny-variance``: BN on the input pixels (input normalisation) with ``eps = 1e-12``
  (the epsilon BERT's normalisation layers use), trained with sensor noise of amplitude
  1e-6: the always-blank pixels get a running variance near 1e-13, and the fold into
  the first Linear multiplies their weights by ~1e6 (``fp16-overflow``; in fp16 the
  folded model computes NaN where the original computes its logits).
- ``dead-channel``: a digits CNN whose two least important channels of the first BN were
  switched off (gamma scaled by 1e-6, as network slimming's L1 penalty leaves them, the
  statistics kept): the fold scales those channels' weights into fp16's subnormal range
  and below it (``fp16-underflow``).

The zoo's ``mlp-deadpixel_dynamo18`` is the other dead-channel model: BN on raw pixels
with exactly zero variance on the blank ones, whose fold multiplies those input columns
by ``1 / sqrt(eps)`` (``int8-range-spread`` along the input channels).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import data as D

HAZARDS = ("depthwise", "tiny-variance", "dead-channel")


def net(name: str, width: int = 32, blocks: int = 4):
    """The untrained network of a hazard model."""
    from torch import nn

    if name == "depthwise":
        layers = [nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU6()]
        for _ in range(blocks):
            layers += [nn.Conv2d(width, width, 3, padding=1, groups=width), nn.BatchNorm2d(width), nn.ReLU6(),
                       nn.Conv2d(width, width, 1), nn.BatchNorm2d(width), nn.ReLU6()]
        return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, D.N_CLASSES))
    if name == "tiny-variance":
        return nn.Sequential(nn.BatchNorm1d(64, eps=1e-12, momentum=None), nn.Linear(64, 32), nn.ReLU(),
                             nn.Linear(32, D.N_CLASSES))
    if name == "dead-channel":
        return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                             nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                             nn.Flatten(), nn.Linear(16 * 4 * 4, D.N_CLASSES))
    raise ValueError(f"unknown hazard model {name!r}; known: {', '.join(HAZARDS)}")


#: (input layout, epochs, learning rate, input noise) of each model.
TRAINING = {"depthwise": ("image", 10, 3e-2, 0.0), "tiny-variance": ("flat", 10, 3e-3, 1e-6),
            "dead-channel": ("image", 10, 3e-3, 0.0)}


def build(name: str, folder: str | Path, seed: int = 0, lr: float | None = None, digits=None) -> dict:
    """Train the hazard model ``name`` on digits, export it (TorchScript, opset 13, BNs
    kept) to ``folder/NAME.onnx`` with its test inputs in ``folder/NAME.npz``; return
    paths, the test labels and torch's test accuracy."""
    import torch

    from .export import export
    from .fit import deterministic, fit, predict

    digits = digits or D.load_digits_split()
    layout, epochs, default_lr, noise = TRAINING[name]
    x, x_test = D.as_layout(digits.x_train, layout), D.as_layout(digits.x_test, layout)
    with deterministic(seed):
        model = net(name)
        fit(model, x, digits.y_train, epochs=epochs, lr=default_lr if lr is None else lr, seed=seed,
            input_noise=noise)
        if name == "dead-channel":
            _switch_off(model[1], 2)
    folder = Path(folder)
    path = folder / f"{name}.onnx"
    export(model, torch.from_numpy(x_test[:2]), path, exporter="torchscript", opset=13)
    np.savez(folder / f"{name}.npz", input=x_test)
    accuracy = float(np.mean(predict(model, x_test).argmax(axis=1) == digits.y_test))
    return {"onnx": path, "inputs": folder / f"{name}.npz", "labels": digits.y_test, "accuracy": accuracy}


def _switch_off(bn, count: int) -> None:
    """Scale gamma of the ``count`` channels with the smallest |gamma| by 1e-6 (network
    slimming's result: channels whose scale the L1 penalty drove to ~0)."""
    import torch

    with torch.no_grad():
        order = torch.argsort(bn.weight.abs())[:count]
        bn.weight[order] *= 1e-6
