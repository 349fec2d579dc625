"""Trainer callbacks: the Hessian's extreme eigenvalues every N epochs (or steps) while training.

* :mod:`hessdist.integrations.lightning` — ``HessianCallback`` for PyTorch Lightning
  (``pip install 'hessdist[lightning]'``), logging through ``trainer.loggers``;
* :mod:`hessdist.integrations.huggingface` — ``HessianCallback`` for ``transformers.Trainer``
  (``pip install 'hessdist[huggingface]'``), logging through ``trainer.log``.

Both are thin adapters over :class:`hessdist.integrations.monitor.SpectrumMonitor`, which decides
when to solve, submits to an eigen-service or solves in a background thread, collects finished
solves without blocking training and turns each into flat ``hessian/...`` metrics. The framework
modules are not imported here, so neither framework is needed to import this package.
"""
from .monitor import SpectrumMonitor
from .solves import DEFAULT_RTOL, DEFAULT_WHICH, HessianSolveWarning, Solve, solve_metrics

__all__ = ["DEFAULT_RTOL", "DEFAULT_WHICH", "HessianSolveWarning", "Solve", "SpectrumMonitor", "solve_metrics"]
