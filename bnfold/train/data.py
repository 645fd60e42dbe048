"""The digits data every zoo model is trained and checked on.

scikit-learn ships ``load_digits`` (1,797 8x8 greyscale digits, grey levels 0..16)
inside the wheel, so the zoo needs no download and every machine sees the same
bytes. The train/test split is fixed (stratified, ``random_state=0``, 360 test
images) so the test inputs written next to each model are reproducible and the
accuracies in ``models/MANIFEST.json`` mean the same thing everywhere.

This module needs numpy and scikit-learn only, not torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SPLIT_SEED = 0
TEST_SIZE = 360
N_CLASSES = 10
GREY_LEVELS = 16.0
CLIP_FRAMES = 4

#: Input layouts the architectures consume. Each maps the raw (N, 64) pixels to
#: the array a model's ONNX input takes.
LAYOUTS = {
    "flat": "(N, 64) pixels scaled to [0, 1]",
    "flat_raw": "(N, 64) raw grey levels 0..16 (the model normalises its own input)",
    "image": "(N, 1, 8, 8) pixels scaled to [0, 1]",
    "sequence": "(N, 8, 8) = (N, features, time): the 8 image rows as 8 time steps of 8 pixels",
    "clip": f"(N, 1, {CLIP_FRAMES}, 8, 8): {CLIP_FRAMES} stacked frames of the digit sliding right one pixel per frame",
}


@dataclass(frozen=True)
class Digits:
    """Raw pixels (float32, 0..16, shape (N, 64)) and int64 labels, split once."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load_digits_split() -> Digits:
    """The fixed stratified split of scikit-learn's bundled digits."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = x.astype(np.float32)
    y = y.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=TEST_SIZE, stratify=y, random_state=SPLIT_SEED
    )
    return Digits(
        np.ascontiguousarray(x_tr),
        np.ascontiguousarray(y_tr),
        np.ascontiguousarray(x_te),
        np.ascontiguousarray(y_te),
    )


def as_layout(x: np.ndarray, layout: str) -> np.ndarray:
    """Reshape raw (N, 64) pixels into the given layout (float32, C-contiguous)."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != 64:
        raise ValueError(f"expected raw digits of shape (N, 64), got {x.shape}")
    n = x.shape[0]
    if layout == "flat_raw":
        out = x
    elif layout == "flat":
        out = x / GREY_LEVELS
    elif layout == "image":
        out = (x / GREY_LEVELS).reshape(n, 1, 8, 8)
    elif layout == "sequence":
        # rows are time steps: (N, row, col) -> (N, col=features, row=time)
        out = (x / GREY_LEVELS).reshape(n, 8, 8).transpose(0, 2, 1)
    elif layout == "clip":
        img = (x / GREY_LEVELS).reshape(n, 8, 8)
        frames = np.zeros((n, 1, CLIP_FRAMES, 8, 8), dtype=np.float32)
        for t in range(CLIP_FRAMES):
            frames[:, 0, t, :, t:] = img[:, :, : 8 - t]
        out = frames
    else:
        raise ValueError(f"unknown layout {layout!r}; known: {', '.join(LAYOUTS)}")
    return np.ascontiguousarray(out, dtype=np.float32)
