"""Per-process curvature products of the full-dataset mean loss times a block:

    A V = (1/N) Σ_batches Σ_{i in batch} ∇²ℓ_i(θ) V

for the Hessian; the GGN, the empirical Fisher and the residual H − G in their place
(:mod:`hessdist.batch_products` says what each is).

A batch's product is computed in one of three ``mode``s (forward-over-reverse, double
backward, finite differences: :mod:`hessdist.batch_products`). The exact modes agree to
rounding; ``"auto"`` times forward and double-backward on the first
batch and keeps the faster (``mode`` then names the one chosen). Sums are accumulated in float64
and divided by the total sample count, so an uneven last batch or unequal shards do not bias the
mean. ``reducer`` (an in-place SUM over processes) turns the per-shard sum into the full-dataset
sum; ``agree`` runs first, so that an error on one process (NaN in its shard, out of memory)
reaches every process instead of leaving the others waiting inside the sum.

Speed options, each measured in ``benchmarks/product_cost.py``: ``compiled`` (``torch.compile``
of the batch product; one compilation per batch shape and block width), ``channels_last``
(convolution weights and image batches in NHWC), ``tf32`` (CUDA only: TensorFloat-32 matmuls
and convolutions, an opt-in lower precision whose effect on eigenvalues is in
``benchmarks/results/precision.json``). Data stay on the compute device. When the device runs
out of memory, a batch is split into micro-batches of half the size and redone (same sum, more
passes), with a warning — never with a different answer.
"""
from __future__ import annotations

import contextlib
import copy
import resource
import sys
import time
import warnings
from typing import Callable, Mapping, Sequence, Union

import torch
from torch import nn

from .basis import basis_room
from .batch_products import (MODES, BatchProducts, check_curvature, explained, missing_derivative,
                             no_exact_mode)
from .compiled import CompiledProduct
from .data import Batch, Batches, DataLike, StreamedBatches, load_batches, rows, take
from .errors import InputError, OutOfMemory
from .losses import LossFn
from .objective import BatchLoss, objective_of
from .operator import Operator
from .operator_checks import OperatorChecks
from .params import ParameterLayout, load_state
from .precision import float32_precision

Reducer = Callable[[torch.Tensor], None]
#: called by every process after its local part of a data pass with the error it met (or None);
#: raises on every process when any failed, so that none is left waiting inside a collective
Agreement = Callable[[Union[BaseException, None]], None]


def _alone(error: BaseException | None) -> None:
    """The agreement of a single process: its own error, if any."""
    if error is not None:
        raise error
RSS_UNIT = 1 if sys.platform == "darwin" else 1024      # ru_maxrss: bytes on macOS, KiB on Linux


def products_exact(dtype: torch.dtype, tf32: bool, mode: str) -> bool:
    """Whether products in this configuration are exact to float64 rounding."""
    return dtype == torch.float64 and not tf32 and mode != "finite-difference"


class MicroBatchWarning(UserWarning):
    """The device ran out of memory and batches are now split into smaller micro-batches."""


class CurvatureOperator(OperatorChecks, Operator):
    """The Hessian (or ``curvature``: GGN, empirical Fisher, H − G) of ``loss`` averaged over
    ``data``, as a symmetric operator on the flat vector of the model's selected parameters (see
    :class:`ParameterLayout` for the order).
    ``loss``: a name or ``loss(outputs, targets)`` for (inputs, targets) batches, or a
    :class:`~hessdist.objective.BatchLoss` for batches of any shape (see :mod:`hessdist.objective`).

    The model is copied, cast to ``dtype``, moved to ``device`` and put in eval mode (BatchNorm
    uses running statistics, dropout is off) unless ``eval_mode=False``. ``basis_share``: the
    share of the GPU's free memory a solver's default Krylov basis may take (see
    :func:`~hessdist.basis.basis_room`; a monitor on the training's GPU asks for less)."""

    def __init__(self, model: nn.Module, loss: Union[str, LossFn, BatchLoss], data: DataLike | Batches | StreamedBatches, *,
                 curvature: str = "hessian", mode: str = "forward", batch_size: int = 256,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 params: Sequence[str] | None = None, eval_mode: bool = True,
                 reducer: Reducer | None = None, agree: Agreement | None = None, compiled: bool = False,
                 channels_last: bool = False,
                 tf32: bool = False, placement: str = "auto", loader_workers: int = 0,
                 data_columns: tuple[str, str] | None = None, compile_width: int = 1,
                 basis_share: float = 0.5):
        if mode not in MODES:
            raise InputError(f"mode must be one of {MODES}, got {mode!r}")
        self.objective = objective_of(loss)
        check_curvature(curvature, mode, self.objective.pairs)
        if compiled and mode == "double-backward":
            raise InputError("torch.compile does not support double backward; use mode='forward' (or 'auto') "
                             "with compiled=True (CLI: --mode forward --compile)")
        self.device = torch.device(device)
        if tf32 and self.device.type != "cuda":
            raise InputError("tf32 is a CUDA matmul/convolution precision; drop --tf32 on a CPU device")
        self.curvature, self.mode, self.dtype = curvature, mode, dtype
        self.exact = products_exact(dtype, tf32, mode)
        self.compiled, self.channels_last, self.tf32, self.eval_mode = compiled, channels_last, tf32, eval_mode
        self.compile_width = compile_width
        if not 0 < basis_share <= 1:
            raise InputError(f"basis_share is a share of the GPU's free memory in (0, 1], got {basis_share}")
        self.basis_share = basis_share
        #: the float32 settings the last data pass ran under (see :mod:`hessdist.precision`)
        self.fp32_precision: dict[str, str] | None = None
        memory_format = torch.channels_last if channels_last else torch.preserve_format
        self.model = copy.deepcopy(model).to(device=self.device, dtype=dtype, memory_format=memory_format)
        if eval_mode:
            self.model.eval()
        self.layout = ParameterLayout.of(self.model, params)
        self.n = self.layout.n
        self.products = BatchProducts(self.model, self.objective, self.layout, dtype)
        self.batches = data if isinstance(data, (Batches, StreamedBatches)) else load_batches(
            data, batch_size, dtype=dtype, device=self.device, placement=placement, loader_workers=loader_workers,
            channels_last=channels_last, columns=data_columns, pairs=self.objective.pairs)
        #: rows per forward pass; halved when the device runs out of memory
        self.micro_batch = rows(self.batches.first()) if isinstance(self.batches, StreamedBatches) else max(
            rows(b) for b in self.batches)
        self._reduce, self._agree = reducer or (lambda t: None), agree or _alone
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.n_samples = self._count_samples(self.batches)
        self._check_first_batch()
        if curvature == "empirical-fisher":
            self._check_sample_mean()
        if mode == "auto":          # compiled: forward is the only exact mode torch.compile supports
            self.mode = "forward" if compiled else self._fastest_mode()
        self._batch_product = self._product_function(self.mode, compiled)
        self._warm_up()

    def subset(self, fraction: float) -> "CurvatureOperator":
        """A view over ⌈fraction · local samples⌉ of this process's samples, spread evenly over
        them (same model, same parameters; see :meth:`Batches.spread`); its products count
        ``fraction`` of a full one in ``fpe``, exactly (by samples). With a reducer, every
        process must call it together."""
        if not 0 < fraction <= 1:
            raise InputError(f"fraction must lie in (0, 1], got {fraction}")
        view = copy.copy(self)
        view.batches, view.hvps, view.fpe = self.batches.spread(fraction), 0, 0.0
        view.n_samples = self._count_samples(view.batches)
        view.data_fraction = self.data_fraction * view.n_samples / self.n_samples
        view._warm_up()
        return view

    def with_curvature(self, curvature: str) -> "CurvatureOperator":
        """The same model, data and settings with another ``curvature`` (``decompose`` compares
        H, G, S and the empirical Fisher at one θ without rebuilding anything)."""
        check_curvature(curvature, self.mode, self.objective.pairs)
        view = copy.copy(self)
        view.curvature, view.hvps, view.fpe, view.rounding_gaps = curvature, 0, 0.0, None
        if curvature == "empirical-fisher":
            view._check_sample_mean()
        view._batch_product = view._product_function(view.mode, view.compiled)
        view._warm_up()
        return view

    def _count_samples(self, batches: Batches | StreamedBatches) -> int:
        """Samples in ``batches`` over every process: rows for a pairs loss, else what the
        objective counts (one pass over the data, no model)."""
        local = batches.n_rows if self.objective.pairs else sum(self.objective.count(b) for b in batches)
        total = torch.tensor([float(local)], dtype=torch.float64, device=self.device)
        self._reduce(total)
        if total.item() <= 0:
            raise InputError("the data hold no samples the loss counts (e.g. every label is -100)")
        return int(total.item())

    def _product_function(self, mode: str, compiled: bool) -> Callable:
        fn = self.products.function(self.curvature, mode)
        return CompiledProduct(fn, self.compile_width) if compiled else fn

    def _warm_up(self) -> None:
        """Compile the product now for every batch size these data hold (resident data: all of
        them; streamed: the first), so that no compilation lands inside a solve."""
        if not isinstance(self._batch_product, CompiledProduct):
            return
        resident = not isinstance(self.batches, StreamedBatches)
        sizes = {rows(b): b for b in (self.batches if resident else [self.batches.first()])}
        p = self.layout.gather(self.model)
        T = torch.zeros(1, self.n, dtype=self.dtype, device=self.device)      # padded to the compiled width
        with self._precision():
            for i, batch in enumerate(sizes.values()):
                self._over_micro_batches(lambda b: self._batch_product(p, b, T), batch, i, "compilation")

    def _fastest_mode(self, repeats: int = 3) -> str:
        """Time one single-column product on the first batch in each exact mode (after a warm-up
        call) and return the faster; these products are not counted in ``hvps``."""
        batch = self.batches.first()
        p = self.layout.gather(self.model)
        T = torch.randn(1, self.n, generator=torch.Generator().manual_seed(0)).to(self.device, self.dtype)
        seconds, failure = {}, None
        for mode in ("forward", "double-backward"):
            fn = self._product_function(mode, compiled=False)

            def product():
                self._over_micro_batches(lambda b: fn(p, b, T), batch, 0, "curvature product")
                self._synchronize()

            with self._precision():
                try:
                    product()                   # warm-up
                except (NotImplementedError, RuntimeError) as exc:
                    if not missing_derivative(exc):
                        raise
                    seconds[mode], failure = float("inf"), exc   # no such derivative here: the other mode
                    continue
                t0 = time.perf_counter()
                for _ in range(repeats):
                    product()
            seconds[mode] = time.perf_counter() - t0
        total = torch.tensor(list(seconds.values()), dtype=torch.float64, device=self.device)
        self._reduce(total)                     # every rank sums the same timings: one choice for all
        if not bool(torch.isfinite(total).any()):
            raise no_exact_mode(failure)
        return list(seconds)[int(total.argmin())]

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def basis_bytes(self) -> int:
        return basis_room(self.device, self.basis_share)

    def describe(self) -> dict:
        """How products are computed, and peak memory: on the device since the operator was built
        (CUDA only), and the process's peak resident memory (host; everything the process holds)."""
        device = int(torch.cuda.max_memory_allocated(self.device)) if self.device.type == "cuda" else None
        compiled = self._batch_product if isinstance(self._batch_product, CompiledProduct) else None
        return {"mode": self.mode, "compiled": self.compiled, "channels_last": self.channels_last,
                "tf32": self.tf32, "fp32_precision": self.fp32_precision,
                "compiles": compiled.compiles if compiled else 0,
                "compile_seconds": compiled.compile_seconds if compiled else 0.0,
                "compile_width": self.compile_width if compiled else None,
                "micro_batch": self.micro_batch, "device": str(self.device),
                "data": self.batches.placement,
                "peak_device_bytes": device,
                "peak_host_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * RSS_UNIT}

    # -- parameters -------------------------------------------------------------------------
    def set_parameters(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load a full ``state_dict`` (parameters and buffers) into the operator's model copy."""
        load_state(self.model, state)

    @property
    def parameters(self) -> torch.Tensor:
        """The current flat parameter vector θ (float64, length n), on the host: callers hand it
        to numpy, Ray or a checkpoint, none of which read device memory."""
        return self.layout.flatten(self.layout.gather(self.model)).to("cpu", torch.float64)

    # -- loss ---------------------------------------------------------------------------------
    def _at(self, theta: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        """The selected parameters: current, or the flat vector θ."""
        return tuple(self.layout.gather(self.model) if theta is None else self.layout.unflatten(
            torch.as_tensor(theta).to(self.device, self.dtype)))

    def loss(self, theta: torch.Tensor | None = None) -> float:
        """Full-dataset mean loss at θ (default: current): one forward pass, no gradient."""
        p = self._at(theta)
        with torch.no_grad():
            total = self._sum_over_data(lambda b: self.products.loss_sum(p, b).reshape(1), "loss", (1,))
        return float(total[0]) / self.n_samples

    def loss_and_gradient(self, theta: torch.Tensor | None = None) -> tuple[float, torch.Tensor]:
        """Full-dataset mean loss and its gradient (float64, length n, on the host) at θ
        (default: current)."""
        p = self._at(theta)
        value_and_grad = torch.func.grad_and_value(self.products.loss_sum)

        def batch(b):
            g, value = value_and_grad(p, b)
            return torch.cat([value.reshape(1), self.layout.flatten(g)])

        total = self._sum_over_data(batch, "loss and gradient", (self.n + 1,))
        total /= self.n_samples
        return float(total[0]), total[1:].cpu()

    # -- products -----------------------------------------------------------------------------
    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        total = self.local_sum(V)
        self._reduce(total)
        return (total / self.n_samples).T.to(V.device)

    def local_sum(self, V: torch.Tensor) -> torch.Tensor:
        """(k, n) float64: Σ over THIS process's samples of ∇²ℓᵢ V, not yet summed over the other
        processes nor divided by the sample count (a sharded basis reduce-scatters it)."""
        T = V.T.to(device=self.device, dtype=self.dtype).contiguous()   # (k, n): one row per column
        p = self.layout.gather(self.model)
        return self._sum_over_data(lambda b: self._batch_product(p, b, T), "curvature product", tuple(T.shape),
                                   reduce=False)

    def _sum_over_data(self, fn: Callable[[Batch], torch.Tensor], what: str, shape: tuple[int, ...],
                       reduce: bool = True) -> torch.Tensor:
        """Σ over every batch of ``fn(batch)`` (of ``shape``) in float64, then (``reduce``) the
        reducer; zeros when no micro-batch holds a sample the loss counts, so the sum still has
        its shape."""
        total, error = None, None
        try:
            with self._precision():
                for i, b in enumerate(self.batches):
                    part = self._over_micro_batches(fn, b, i, what)
                    if part is not None:
                        total = part if total is None else total.add_(part)
        except Exception as exc:          # NaN in one shard, out of memory on one device: tell every process
            error = explained(exc, self.mode)
        self._agree(error)
        if total is None:
            total = torch.zeros(shape, dtype=torch.float64, device=self.device)
        if reduce:
            self._reduce(total)
        return total

    def _over_micro_batches(self, fn: Callable[[Batch], torch.Tensor], batch: Batch, index: int,
                            what: str) -> torch.Tensor | None:
        """``fn`` summed over slices of at most ``micro_batch`` rows; on out-of-memory the
        micro-batch is halved and the batch redone (sums of per-sample terms: the same result)."""
        def summed():
            total = None
            for start in range(0, rows(batch), self.micro_batch):
                piece = take(batch, slice(start, start + self.micro_batch))
                if not self.objective.pairs and self.objective.count(piece) == 0:
                    continue                 # no sample the loss counts (a mean over none is 0/0)
                part = fn(piece)
                self._check_finite(part, index, what)
                total = part.to(torch.float64) if total is None else total.add_(part)
            return total

        return self._retry_on_oom(summed)

    def _retry_on_oom(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``fn()``, called again with a halved ``micro_batch`` each time the device runs out of memory."""
        while True:
            try:
                return fn()
            except torch.OutOfMemoryError as exc:
                self._halve_micro_batch(exc)

    def _halve_micro_batch(self, exc: BaseException) -> None:
        if self.micro_batch == 1:
            raise OutOfMemory(f"out of memory on {self.device} with ONE sample per micro-batch: the model and "
                              "its second-order graph do not fit. Use fewer parameters (--params), float32 "
                              "instead of float64, a larger device, or more workers with smaller models") from exc
        if not self.eval_mode:
            raise OutOfMemory(f"out of memory on {self.device} at {self.micro_batch} samples per batch; a "
                              "train-mode model (batch statistics) cannot be split without changing the answer, "
                              "so pass a smaller batch_size (--batch-size)") from exc
        old, self.micro_batch = self.micro_batch, self.micro_batch // 2
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        warnings.warn(f"out of memory on {self.device} at {old} samples per pass; continuing with micro-batches "
                      f"of {self.micro_batch} (same result, more passes; set batch_size={self.micro_batch} "
                      "to start there)", MicroBatchWarning, stacklevel=2)

    @contextlib.contextmanager
    def _precision(self):
        """IEEE float32 (or TF32, when asked) for the duration of a data pass (see :mod:`hessdist.precision`)."""
        with float32_precision(self.tf32) as flags:
            self.fp32_precision = flags
            yield
