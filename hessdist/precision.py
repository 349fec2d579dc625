"""The float32 arithmetic a data pass runs in on a GPU: IEEE float32, or TensorFloat-32 when asked.

PyTorch's defaults differ by library: cuBLAS matmuls run in IEEE float32, but cuDNN
convolutions are allowed TF32 (a 10-bit mantissa). Left alone, a float32 product of a CNN on a
GPU is therefore a TF32 product, with errors near 1e-3·|λ| instead of 1e-7, and tolerances
meant for float32 are never met. Every data pass sets matmuls, convolutions and RNNs
explicitly — ``"ieee"``, or ``"tf32"`` for ``tf32=True`` — and restores the previous settings
afterwards. It uses PyTorch's ``fp32_precision`` settings only (torch ≥ 2.9); mixing them with
the legacy ``allow_tf32`` flags makes PyTorch refuse to read either. On an older torch the
legacy flags are set instead.

The settings are process-wide: a pass on a background thread (the in-process training
callbacks) sets them for the training's own kernels while it runs.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

NEW_API = hasattr(torch.backends.cuda.matmul, "fp32_precision") and hasattr(torch.backends.cudnn, "conv")


def _settings() -> dict[str, object]:
    """The objects whose ``fp32_precision`` a pass sets, by name."""
    return {"matmul": torch.backends.cuda.matmul, "cudnn_conv": torch.backends.cudnn.conv,
            "cudnn_rnn": torch.backends.cudnn.rnn}


def in_force() -> dict[str, str]:
    """The float32 precision each library would use now (``"ieee"``, ``"tf32"``, or ``"none"``:
    PyTorch's default, which is TF32 for cuDNN convolutions)."""
    if NEW_API:
        return {name: str(s.fp32_precision) for name, s in _settings().items()}
    return {"matmul": "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee",
            "cudnn": "tf32" if torch.backends.cudnn.allow_tf32 else "ieee"}


@contextlib.contextmanager
def float32_precision(tf32: bool) -> Iterator[dict[str, str]]:
    """Matmuls, convolutions and RNNs in TF32 (``tf32``) or IEEE float32 inside the block; the
    previous settings afterwards. Yields the settings in force inside."""
    value = "tf32" if tf32 else "ieee"
    if NEW_API:
        saved = {name: s.fp32_precision for name, s in _settings().items()}
        try:
            for s in _settings().values():
                s.fp32_precision = value
            yield in_force()
        finally:
            for name, s in _settings().items():
                s.fp32_precision = saved[name]
        return
    saved_legacy = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
        yield in_force()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved_legacy
