"""Where a Lanczos run starts: a random block, a block of previous eigenvectors, or a
:class:`WarmStart` (previous eigenvectors plus a random part that keeps the far side), and
the seeds behind them."""
from __future__ import annotations

import dataclasses
import secrets
from typing import Mapping

import numpy as np

from ..errors import InputError


def draw_seed(seed: int | None) -> int:
    """``seed``, or a fresh one from the OS when None (reported, so a run can be repeated)."""
    return secrets.randbits(63) if seed is None else int(seed)


@dataclasses.dataclass(frozen=True)
class WarmStart:
    """A start vector u + w·g: u a unit vector from earlier eigenvectors, g uniform on the unit
    sphere, ``noise`` = w. Its random part gives the run a probabilistic far side
    (:class:`~hessdist.solvers.limits.StartKrylov`'s share w/(1 + w)), so a warm run waits for
    it as a cold one does: a warm vector that turned over (the previous λ_min's eigenvector
    now the second) otherwise converges, with a true residual, to an eigenvalue that is not the
    extreme one."""
    vector: np.ndarray
    noise: float

    @property
    def share(self) -> float:
        return self.noise / (1.0 + self.noise)


def start_block(v0: np.ndarray | WarmStart | None, n: int, block: int,
                rng: np.random.Generator) -> tuple[np.ndarray, float | None]:
    """The start columns and the random share of the first (None: no random part). No v0:
    ``block`` random columns. A :class:`WarmStart`: its vector, random in its share. A single
    v0: used as is, with no far side. A block v0 (n, b): a random column put first, so
    directions the previous vectors miss are still searched and ``limit`` applies."""
    if v0 is None:
        return rng.standard_normal((n, block)), 1.0
    warm = isinstance(v0, WarmStart)
    V = np.asarray(v0.vector if warm else v0, dtype=np.float64)
    if V.ndim not in ((1,) if warm else (1, 2)) or V.shape[0] != n:
        raise InputError(f"v0 must be a vector of length n = {n}" + ("" if warm else " or a block (n, b)")
                         + f", got shape {V.shape}")
    if not np.isfinite(V).all():
        raise InputError("v0 must be finite (it holds NaN or inf)")
    if warm:
        return V[:, None], v0.share
    if V.ndim == 1:
        return V[:, None], None
    return np.column_stack([rng.standard_normal(n), V]), 1.0


#: the random part's weight w in a warm start (see :class:`WarmStart`): the far side then costs
#: about what a cold start's does (the quantile scaled by 1/2), and the previous eigenvectors
#: still hold half the start. Measured on benchmarks/warm_chain.py's epochs 2-5: 13-23 FPE at
#: w = 1 against 17-30 at w = 1e-3 (the target then 2·ln 1001 higher) and 12-22 cold.
WARM_NOISE = 1.0


def noise_seed(seed: int) -> int:
    """A seed for a warm start's noise, independent of the random start drawn from ``seed``."""
    return int(np.random.SeedSequence(seed).spawn(1)[0].generate_state(1, np.uint64)[0] >> 1)


def warm_start_vector(previous: Mapping[str, np.ndarray], n: int, seed: int | None = None,
                      noise: float = WARM_NOISE) -> WarmStart | None:
    """One start vector rich in every previous eigenvector (both ends), plus a random part of
    weight ``noise`` that searches the directions they miss and gives the far side. One vector,
    not the block of them, which pays a product per column per step (benchmarks/warm_start.json,
    measured before warm starts waited for their far side). For k = 1 at the per-epoch contract
    the far side decides the cost, so a certified warm start costs about what a cold one does
    (benchmarks/warm_chain.json: a median of 28 FPE against 26); it saves where the residuals
    of more pairs decide (k = 5: tests/test_spectrum.py). ``seed``: the lanczos seed of the run
    it starts (the noise is drawn independently of it)."""
    columns = [v for block in previous.values() for v in np.asarray(block, dtype=np.float64).T]
    if not columns or any(c.shape != (n,) for c in columns):
        return None
    u = sum(c / np.linalg.norm(c) for c in columns)
    g = np.random.default_rng(None if seed is None else noise_seed(seed)).standard_normal(n)
    return WarmStart(u / np.linalg.norm(u) + noise * g / np.linalg.norm(g), noise)
