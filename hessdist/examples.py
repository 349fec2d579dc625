"""Built-in model+data pairs for ``--example NAME``: real offline data where it exists.

* ``digits-mlp`` / ``digits-cnn``: scikit-learn's bundled 8×8 digits (1,797 real images),
  networks trained for a few seconds, deterministically, so the Hessian is a trained network's.
* ``resnet18-cifar``: ResNet-18 on CIFAR-10 read from ``root`` in its standard python-pickle
  format (``cifar-10-batches-py/data_batch_1..5``) when present; otherwise a SYNTHETIC
  CIFAR-shaped set, which every output says loudly.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import pickle
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from . import models
from .data import strided_shard
from .errors import InputError

CIFAR_MEAN = np.array([0.4914, 0.4822, 0.4465], dtype=np.float32)
CIFAR_STD = np.array([0.2470, 0.2435, 0.2616], dtype=np.float32)


@dataclass(frozen=True)
class Example:
    """A model factory, a data factory (``rank``/``world_size`` keywords), a loss, and an optional
    deterministic training run that turns the factory's model into a trained one."""

    model: Callable[[], nn.Module]
    data: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    loss: str
    train: Callable[[nn.Module, tuple[torch.Tensor, torch.Tensor]], None] | None
    description: str


@functools.lru_cache(maxsize=1)
def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits (pixels 0..16, labels) read from the file it ships, as
    ``sklearn.datasets.load_digits`` reads it but without importing ``sklearn.datasets``
    (a second of start-up in every worker and driver); that loader where the file is not.
    Read-only arrays, read once per process."""
    path = os.path.join(os.path.dirname(importlib.util.find_spec("sklearn").origin), "datasets", "data",
                        "digits.csv.gz")
    if os.path.exists(path):
        table = np.loadtxt(path, delimiter=",")
        X, y = table[:, :-1], table[:, -1].astype(int)
    else:
        from sklearn.datasets import load_digits as sklearn_digits
        X, y = sklearn_digits(return_X_y=True)
    X.flags.writeable = y.flags.writeable = False           # cached: shared by every caller
    return X, y


def digits(rank: int = 0, world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits as float32 inputs in [0, 1] (flattened 8×8) and int64 labels."""
    X, y = load_digits()
    data = torch.tensor(X / 16.0, dtype=torch.float32), torch.tensor(y, dtype=torch.int64)
    return strided_shard(data, rank, world_size)


#: the fixed pixel shifts of ``digits_shifted``: the identity, the 8 one-pixel neighbours and
#: the 4 two-pixel moves along the axes (13 copies of every image)
SHIFTS = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)) + ((-2, 0), (2, 0), (0, -2), (0, 2))


def shift_images(images: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Images (N, H, W) moved by (dy, dx) pixels, zero-filled (no wrap-around)."""
    out = np.zeros_like(images)
    h, w = images.shape[1:]
    out[:, max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        images[:, max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


def digits_shifted(rank: int = 0, world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits expanded by the FIXED pixel shifts ``SHIFTS``: 23,361 real images
    (computed once, never redrawn), interleaved image by image so that any leading fraction
    holds every digit and every shift."""
    X, y = load_digits()
    images = (X / 16.0).reshape(-1, 8, 8)
    shifted = np.stack([shift_images(images, dy, dx) for dy, dx in SHIFTS], axis=1)    # (N, S, 8, 8)
    data = (torch.tensor(shifted.reshape(-1, 64), dtype=torch.float32),
            torch.tensor(np.repeat(y, len(SHIFTS)), dtype=torch.int64))
    return strided_shard(data, rank, world_size)


def digits_images(rank: int = 0, world_size: int = 1, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits as CIFAR-shaped images: 8×8 upsampled (bilinear) to size×size,
    copied to 3 channels and normalised (1,797 real images, NCHW float32)."""
    x, y = digits()
    img = torch.nn.functional.interpolate(x.reshape(-1, 1, 8, 8), size=size, mode="bilinear", align_corners=False)
    img = (img - img.mean()) / img.std()
    return strided_shard((img.repeat(1, 3, 1, 1).contiguous(), y), rank, world_size)


def train_full_batch(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor], steps: int = 300,
                     lr: float = 0.01, seed: int = 0) -> None:
    """Deterministic full-batch Adam on cross-entropy: a trained network in a few seconds."""
    torch.manual_seed(seed)
    x, y = data
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()


def cifar10_dir(root: str | None) -> str | None:
    """The ``cifar-10-batches-py`` folder under ``root`` (or ``root`` itself), if present."""
    for d in ([root, os.path.join(root, "cifar-10-batches-py")] if root else []):
        if os.path.isfile(os.path.join(d, "data_batch_1")):
            return d
    return None


def cifar10(rank: int = 0, world_size: int = 1, root: str | None = None, n_samples: int | None = None,
            train: bool = True, synthetic: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10 (normalised NCHW float32, int64 labels) from ``root`` in the standard pickle format,
    or — when absent and ``synthetic`` — a synthetic CIFAR-shaped set (fixed seed, labels from a
    random linear teacher so the loss has structure). ``n_samples`` takes the first samples only."""
    d = cifar10_dir(root)
    if d is None and not synthetic:
        raise InputError(f"CIFAR-10 is not under {root!r} on this worker's node, though the driver found it "
                         "there: put the same cifar-10-batches-py/ at that path on every node")
    if d is None:
        n = n_samples or 50_000
        gen = torch.Generator().manual_seed(1234)
        x = torch.randn(n, 3, 32, 32, generator=gen)
        teacher = torch.randn(3 * 32 * 32, 10, generator=gen)
        y = (x.reshape(n, -1) @ teacher).argmax(1)
    else:
        files = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
        xs, ys = [], []
        for f in files:
            with open(os.path.join(d, f), "rb") as fh:
                batch = pickle.load(fh, encoding="bytes")
            xs.append(np.asarray(batch[b"data"], dtype=np.uint8))
            ys.extend(batch[b"labels"])
        raw = np.concatenate(xs)[:n_samples].reshape(-1, 3, 32, 32).astype(np.float32) / 255.0
        x = torch.from_numpy((raw - CIFAR_MEAN[:, None, None]) / CIFAR_STD[:, None, None])
        y = torch.tensor(ys[: len(x)], dtype=torch.int64)
    return strided_shard((x, y), rank, world_size)


EXAMPLES: dict[str, Example] = {
    "digits-mlp": Example(models.digits_mlp, digits, "cross_entropy", train_full_batch,
                          "64-32-10 tanh MLP (2,410 parameters) on scikit-learn's digits (1,797 real images)"),
    "digits-cnn": Example(models.digits_cnn, digits, "cross_entropy",
                          functools.partial(train_full_batch, steps=150),
                          "2-layer CNN with BatchNorm (eval) (4,010 parameters) on scikit-learn's digits"),
    "digits-resnet": Example(models.resnet_small_cifar, digits_images, "cross_entropy",
                             functools.partial(train_full_batch, steps=60, lr=0.02),
                             "CIFAR-variant ResNet with BatchNorm, 3 stages of width 4/8/16 (5,214 parameters), on "
                             "scikit-learn's digits upsampled to 32×32×3 (1,797 real images)"),
    "resnet18-cifar": Example(models.resnet18_cifar, cifar10, "cross_entropy", None,
                              "ResNet-18 (CIFAR variant, 11.2M parameters) on CIFAR-10 from --data-root, "
                              "else SYNTHETIC CIFAR-shaped data"),
}


def get_example(name: str, data_root: str | None = None, n_samples: int | None = None) -> Example:
    """The named example, with its data factory bound to ``data_root`` / ``n_samples``. The root
    is made absolute here (a worker runs in a directory of its own), and a worker that does not
    find the real data the driver found fails instead of using the synthetic set."""
    if name not in EXAMPLES:
        raise InputError(f"unknown example {name!r}; choose one of {sorted(EXAMPLES)}")
    ex = EXAMPLES[name]
    if name == "resnet18-cifar":
        root = os.path.abspath(data_root) if data_root else None
        return Example(ex.model, functools.partial(cifar10, root=root, n_samples=n_samples,
                                                   synthetic=cifar10_dir(root) is None),
                       ex.loss, ex.train, ex.description)
    if n_samples is not None:
        raise InputError("--n-samples applies to resnet18-cifar only; the digits examples use all 1,797 images")
    return ex
