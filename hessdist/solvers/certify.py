"""Search on a fixed data subset, then certify on all the data.

A product over a fraction f of the data costs f full-data product equivalents (FPE). The search
runs Lanczos on a fixed subset (samples spread evenly over the data); its Ritz vectors then
warm-start a Lanczos run on the full data, which stops only when the requested accuracy holds
for the full-data operator, its far side included (the start's random part) — so the answer
is certified on all the data whatever the subset said (a subset overstates both ends on
average; the certified values do not). That far side costs about what a cold run's does, so
the search's f-weighted products are mostly what is lost (benchmarks/results/subset.json,
rerun 2026-12-08 on the shifted digits: every fraction from 1% to 20% costs 60.8–70.2 FPE
against 56–58 plain on the MLP, 33.6–38.2 against 31–33 on the CNN), so the default path
searches only when asked. ``subset_fraction`` is the choice ``subset="auto"`` makes.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Mapping, Sequence, Union

import numpy as np

from ..errors import InputError
from ..operator import Operator
from .lanczos import lanczos
from .starts import warm_start_vector
from .results import END_NAMES, EigenResult
from .ritz import parse_which

#: ``subset="auto"``'s search fraction and the fewest samples a search may use (chosen on 23,361
#: real digits images, benchmarks/results/subset.json, before the full-data run waited for its
#: far side: then the search paid from about 500 samples and cost the same from 1% to 10%)
DEFAULT_FRACTION = 0.05
MIN_SUBSET_SAMPLES = 1000
#: above this fraction a search saves too little to be worth a second run
MAX_FRACTION = 0.25


def subset_fraction(n_samples: int, fraction: float | None = None) -> float | None:
    """The fraction the default path searches on — ``fraction`` (default 5%), raised to
    ``MIN_SUBSET_SAMPLES`` samples — or None when that would exceed ``MAX_FRACTION``: data this
    small have no subset that represents them, and the plain solve is cheaper."""
    f = DEFAULT_FRACTION if fraction is None else float(fraction)
    if not 0 < f <= 1:
        raise InputError(f"the subset fraction must lie in (0, 1], got {fraction}")
    f = max(f, MIN_SUBSET_SAMPLES / max(n_samples, 1))
    return f if f <= MAX_FRACTION else None


@dataclass(frozen=True)
class Answer:
    """A certified full-data ``result`` and, when a subset was searched first, ``subset``: what
    the search said, how close it came, and its share of the cost (the result's ``hvps``,
    ``fpe`` and ``seconds`` cover both runs)."""

    result: EigenResult
    subset: dict | None = None

    def to_dict(self) -> dict:
        return {**self.result.to_dict(), "subset": self.subset}


def angles(X: np.ndarray, Y: np.ndarray) -> list[float]:
    """Angles (degrees) between matching columns, sign-blind."""
    cos = np.abs(np.sum(X * Y, axis=0)) / (np.linalg.norm(X, axis=0) * np.linalg.norm(Y, axis=0))
    return np.degrees(np.arccos(np.clip(cos, 0.0, 1.0))).tolist()


def subset_search(op: Operator, *, which: Union[str, Sequence[str]] = ("LA", "SA"), k: int = 1,
                  fraction: float = DEFAULT_FRACTION, previous: Mapping[str, np.ndarray] | None = None,
                  max_hvps: int | None = None, max_fpe: float | None = None, budget_s: float | None = None,
                  seed: int | None = None, **options) -> Answer:
    """Lanczos on ``op.subset(fraction)`` (warm-started from ``previous`` eigenvectors when
    given), then Lanczos on ``op`` from one vector rich in the subset's Ritz vectors (and in
    ``previous``: a subset can lose what they knew), to the same accuracy (``tol``/``rtol`` and the other ``options`` of :func:`lanczos`). ``max_hvps``,
    ``max_fpe`` and ``budget_s`` bound the two runs together."""
    ends = parse_which(which)
    if not 0 < fraction < 1:
        raise InputError(f"fraction must lie in (0, 1), got {fraction} (1 is the plain full-data solve)")
    t0 = time.perf_counter()
    callback = options.pop("callback", None)
    return_vectors = options.pop("return_vectors", True)
    sub = op.subset(fraction)
    v0 = None if not previous else warm_start_vector(previous, op.n, seed)
    found = lanczos(sub, which=ends, k=k, max_hvps=max_hvps, max_fpe=max_fpe, budget_s=budget_s, seed=seed,
                    v0=v0, callback=callback and (lambda info: callback({**info, "phase": "subset"})), **options)
    found_vectors = {f"subset {w}": p.vectors for w, p in found.pairs.items()}
    start = warm_start_vector({**(previous or {}), **found_vectors}, op.n, found.seed)
    left = dict(max_hvps=None if max_hvps is None else max(1, max_hvps - found.hvps),
                max_fpe=None if max_fpe is None else max(max_fpe - found.fpe, 1e-12),
                budget_s=None if budget_s is None else max(0.0, budget_s - (time.perf_counter() - t0)))

    def progress(info: dict) -> None:
        callback({**info, "phase": "full", "hvps": found.hvps + info["hvps"], "fpe": found.fpe + info["fpe"],
                  "seconds": time.perf_counter() - t0})

    full = lanczos(op, which=ends, k=k, v0=start, seed=found.seed, return_vectors=True,
                   callback=callback and progress, **left, **options)
    search = {"fraction": fraction, "n_samples": sub.n_samples, "data_fraction": sub.data_fraction,
              "hvps": found.hvps, "fpe": found.fpe, "seconds": found.seconds, "stop_reason": found.stop_reason,
              "warm_start": v0 is not None, "full_hvps": full.hvps, "full_fpe": full.fpe}
    for w in ends:
        name, s, c = END_NAMES[w], found.pairs[w], full.pairs[w]
        search[name] = {"values": s.values.tolist(), "certified_values": c.values.tolist(),
                        "relative_differences": ((s.values - c.values) / np.abs(c.values)).tolist(),
                        "angles_deg": angles(s.vectors, c.vectors) if c.vectors is not None else None}
    pairs = full.pairs if return_vectors else {w: dataclasses.replace(p, vectors=None) for w, p in full.pairs.items()}
    result = EigenResult(pairs=pairs, hvps=found.hvps + full.hvps, fpe=found.fpe + full.fpe,
                         seconds=time.perf_counter() - t0, stop_reason=full.stop_reason,
                         confidence=full.confidence, restarts=found.restarts + full.restarts, krylov_degree=None,
                         seed=found.seed, accuracy=full.accuracy, confirm_hvps=full.confirm_hvps,
                         confirmation=full.confirmation, rounding_gap=full.rounding_gap,
                         recoveries=found.recoveries + full.recoveries,
                         products_redone=found.products_redone + full.products_redone,
                         basis_peak_bytes=max(found.basis_peak_bytes, full.basis_peak_bytes))
    return Answer(result=result, subset=search)


def solve(op: Operator, *, which: Union[str, Sequence[str]] = ("LA", "SA"), k: int = 1,
          previous: Mapping[str, np.ndarray] | None = None, subset: float | str | None = None,
          seed: int | None = None, **options) -> Answer:
    """The default path (``hessdist eigs``, the eigen-service): one Lanczos run on all the data,
    warm-started from ``previous`` eigenvectors when given. ``subset``: a fraction searches on
    that much of the data first (:func:`subset_search`), ``"auto"`` does so on a cold start with
    data large enough (:func:`subset_fraction`); None or 1 never, the default. A search cannot
    pay for a k = 1 answer at the contract's accuracy: the full-data run waits for its start's
    far side whatever the subset found, so the search's products are added, not saved
    (benchmarks/subset.py, cold, fractions 1–20% of the shifted digits: 60.8–70.2 FPE against
    56–58 plain on the MLP, 33.6–38.2 against 31–33 on the CNN); from good previous eigenvectors
    a subset's vectors only blur them. ``options`` go to :func:`lanczos`."""
    fraction = (None if previous else subset_fraction(op.n_samples)) if subset == "auto" else subset
    if fraction is not None and float(fraction) < 1:
        return subset_search(op, which=which, k=k, fraction=float(fraction), previous=previous, seed=seed, **options)
    v0 = warm_start_vector(previous, op.n, seed) if previous else None
    if previous and v0 is None:
        raise InputError(f"the previous eigenvectors do not have n = {op.n} entries (another model or --params?)")
    return Answer(result=lanczos(op, which=which, k=k, v0=v0, seed=seed, **options))


#: the accuracy of a per-step solve (service, callbacks) that names neither ``tol`` nor ``rtol``
STEP_TOL = 1e-4


def solve_step(op: Operator, previous: Mapping[str, np.ndarray] | None, *, tol: float | None = None,
               rtol=None, **options) -> tuple[Answer, dict]:
    """One solve of a per-step series (the eigen-service, the training callbacks): :func:`solve`
    warm-started from ``previous`` (None or empty: cold), at ``tol`` 1e-4 when no accuracy is
    named; returns the answer and its entry (``answer.to_dict()`` with ``warm_start``)."""
    tol = STEP_TOL if tol is None and rtol is None else tol
    answer = solve(op, previous=previous or None, tol=tol, rtol=rtol, **options)
    return answer, {**answer.to_dict(), "warm_start": bool(previous)}
