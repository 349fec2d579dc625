"""A batch product under ``torch.compile`` with few, counted shapes, and no silent fall-back.

``torch.compile`` specialises on every input shape: a vmapped forward-over-reverse product
cannot take a symbolic batch or column count (PyTorch refuses both; tried on 2.13). Each new
shape is a compilation — tens of seconds for a ResNet on a GPU — and past Dynamo's
recompile limit it quietly runs the function eagerly. So here:

* columns go through in chunks of a fixed ``width``, the last one padded with zero columns
  (whose products are zero and dropped): one column shape, whatever k a solver asks for;
* rows take the few sizes the data give (full micro-batches, the shard's last partial one, a
  subset's, each halving after running out of memory); the operator compiles the sizes it
  knows up front;
* ``compiles`` and ``compile_seconds`` are counted, and a shape beyond ``limit`` compilations
  fails with a message instead of falling back to eager.
"""
from __future__ import annotations

import time
from typing import Callable

import torch

from .errors import InputError

BatchProduct = Callable[..., torch.Tensor]


class CompiledProduct:
    """``fn(p, batch, T)`` (T: (k, n), one row per column) compiled, with ``width`` columns per call."""

    def __init__(self, fn: BatchProduct, width: int = 1, limit: int = 16):
        if width < 1:
            raise InputError(f"the compiled column width must be a positive integer, got {width}")
        self.width, self.limit = width, limit
        #: compilations so far, and the seconds the calls that compiled took
        self.compiles, self.compile_seconds = 0, 0.0
        self._fn = torch.compile(fn, dynamic=False, backend=self._backend)

    def _backend(self, gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        self.compiles += 1
        return torch._dynamo.lookup_backend("inductor")(gm, example_inputs)

    def _call(self, p, batch, T: torch.Tensor) -> torch.Tensor:
        before, t = self.compiles, time.perf_counter()
        try:
            with torch._dynamo.config.patch(recompile_limit=self.limit, fail_on_recompile_limit_hit=True):
                out = self._fn(p, batch, T)
        except torch._dynamo.exc.FailOnRecompileLimitHit:
            raise InputError(f"torch.compile has compiled the product for {self.limit} input shapes already; "
                             "the batches keep changing shape (a DataLoader with varying batch sizes?). Use fixed "
                             "batch sizes, or drop --compile") from None
        if self.compiles > before:
            self.compile_seconds += time.perf_counter() - t
        return out

    def __call__(self, p, batch, T: torch.Tensor) -> torch.Tensor:
        k, parts = T.shape[0], []
        for start in range(0, k, self.width):
            chunk = T[start:start + self.width]
            if len(chunk) < self.width:
                chunk = torch.cat([chunk, chunk.new_zeros(self.width - len(chunk), T.shape[1])])
            parts.append(self._call(p, batch, chunk))
        return torch.cat(parts)[:k]

