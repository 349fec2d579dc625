"""Loss functions by name. Contract: ``loss(outputs, targets)`` is the MEAN over the batch's
samples; hessdist multiplies by the batch size so the full-dataset mean weights every sample
equally, however the data are batched or sharded."""
from __future__ import annotations

from typing import Callable, Union

import torch
import torch.nn.functional as F

from .errors import InputError
from .imports import resolve

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def mse(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean squared error; integer class targets are one-hot encoded to the output width."""
    if not targets.is_floating_point():
        targets = F.one_hot(targets, outputs.shape[-1]).to(outputs.dtype)
    # written out rather than F.mse_loss, whose forward-over-reverse derivative hits a
    # "ZeroTensors are immutable" error in torch.func
    return ((outputs - targets.reshape(outputs.shape)) ** 2).mean()


LOSSES: dict[str, LossFn] = {"cross_entropy": F.cross_entropy, "mse": mse}


def get_loss(spec: Union[str, LossFn]) -> LossFn:
    """A loss by name (``cross_entropy``, ``mse``), import path (``pkg.mod:fn``) or callable."""
    if callable(spec):
        return spec
    if spec in LOSSES:
        return LOSSES[spec]
    if isinstance(spec, str) and ":" in spec:
        return resolve(spec)
    raise InputError(f"unknown loss {spec!r}; use one of {sorted(LOSSES)} or an import path 'pkg.mod:fn'")
