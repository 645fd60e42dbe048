"""Deterministic CPU training and evaluation for the zoo's small networks.

Training is plain Adam + cross-entropy (or MSE for the autoencoder) with a seeded
shuffle, one CPU thread and ``torch.use_deterministic_algorithms`` so a rerun on
the same machine and torch version reproduces the same weights bit for bit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import nn


@contextlib.contextmanager
def deterministic(seed: int = 0, threads: int = 1) -> Iterator[None]:
    """Seed torch, force deterministic kernels and a fixed thread count; restore after."""
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_threads = torch.get_num_threads()
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev_det)
        torch.set_num_threads(prev_threads)


def fit(
    net: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    task: str = "classification",
    epochs: int = 5,
    batch_size: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
    input_noise: float = 0.0,
    max_steps: int | None = None,
    on_epoch: Callable[[int, float], None] | None = None,
) -> nn.Module:
    """Train ``net`` in place on (x, y) and leave it in eval mode.

    ``input_noise`` adds uniform jitter in [-a/2, a/2) to every input (dequantisation
    noise for integer grey levels); ``max_steps`` stops early (quick tests).
    ``on_epoch(epoch, mean_loss)`` is called after every epoch.
    """
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    yt = torch.from_numpy(np.ascontiguousarray(y))
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    loss_fn: nn.Module = nn.CrossEntropyLoss() if task == "classification" else nn.MSELoss()
    steps = 0
    net.train()
    for epoch in range(epochs):
        order = torch.randperm(len(xt), generator=gen)
        total, batches = 0.0, 0
        for start in range(0, len(xt), batch_size):
            idx = order[start : start + batch_size]
            if len(idx) < 2:  # BN cannot take batch statistics of one sample
                continue
            xb = xt[idx]
            if input_noise:
                xb = xb + (torch.rand(xb.shape, generator=gen) - 0.5) * input_noise
            target = yt[idx] if task == "classification" else xt[idx]
            opt.zero_grad()
            loss = loss_fn(net(xb), target)
            loss.backward()
            opt.step()
            total += loss.item()
            batches += 1
            steps += 1
            if max_steps is not None and steps >= max_steps:
                break
        if on_epoch is not None:
            on_epoch(epoch + 1, total / max(batches, 1))
        if max_steps is not None and steps >= max_steps:
            break
    net.eval()
    return net


@torch.no_grad()
def predict(net: nn.Module, x: np.ndarray) -> np.ndarray:
    """Eval-mode forward pass (the reference the exported ONNX must reproduce)."""
    was_training = net.training
    net.eval()
    try:
        return net(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).numpy()
    finally:
        net.train(was_training)


def score(output: np.ndarray, x: np.ndarray, y: np.ndarray, task: str) -> dict[str, float]:
    """Test metric of a model output: accuracy for logits, MSE for reconstructions."""
    if task == "classification":
        return {"accuracy": float(np.mean(np.argmax(output, axis=1) == y))}
    return {"mse": float(np.mean((output.reshape(x.shape) - x) ** 2))}
