"""What a warm start can save along a training run, and what bounds it: the per-epoch loop of
``epochs.py`` (the same BatchNorm ResNet on real digits at 32×32, the same training), solved
in-process after every epoch at the per-epoch contract (rtol 1e-2 on λ_max, 5e-2 on λ_min,
float32 products, confirmations counted) four ways:

* ``cold``: a random start;
* ``warm``: hessdist's warm start (the sum of the previous epoch's *warm-solved* eigenvectors
  plus a random part of equal weight, :class:`~hessdist.solvers.starts.WarmStart`), chained
  epoch to epoch as the eigen-service chains it, certified as a cold start is: it waits for
  the random part's far side;
* ``warm_unchecked``: the same start vector given as a plain ``v0`` (no far side waited for),
  chained on its own answers — what hessdist did before 2026-12-07: it stops on the residuals;
* ``oracle``: started from this epoch's own eigenvectors (from a tight solve, not counted) — the
  floor no warm start can beat: the products that certify an answer already in hand;
* ``warm_subset``: the warm start's vectors searched on a fixed 15% of the data first, then
  certified on all of it (``subset_search``; forced: the default takes no subset of 1,797
  samples) — whether cheap data pay on a data set this small.

Also the stopping rule's margin: along every run (cold, warm and the tight reference's long
run from a random start), the smallest relative residual r/|θ| at a step whose interval was
certainly wrong — [θ − r, θ] entirely above the reference λ_min, or [θ, θ + r] below λ_max, by
more than float32 rounding explains (1e-5·‖H‖) — i.e. the least ``rtol`` at which this rule
would have stopped there with a wrong answer (nothing a residual can see: an eigenvalue not yet
found).

Also what bounds any stopping rule on these runs, per run (``stopping_steps``): the products it
took before its confirmations (``certified``); the fewest after which both Ritz values already
lay within target of the reference (``oracle``: a rule would have to know the answer to stop
there, and would need no confirmation); and where a gap-based
(Kato–Temple) certificate would have stopped: θ − r²/(b − θ) with b = θ₂ − r₂ the next Ritz
value's interval edge, which holds only if nothing below b was missed, and whether it was wrong.
Against ``epochs.json``'s best peer on the same checkpoints, the oracle stop's products give the
least FPE ratio any stopping rule could reach from these starts.

Measured 2026-12-07 and not kept (the variant is gone from this file): restarting λ_min's
end from a random direction wherever its vector had turned over the epoch before (|cos| < 0.5
between that run's start vector and its answer), without a far side: a median of 14 FPE after
the first epoch against 11 for the unchecked warm start, the worst 22 against 19, and the same
miss at epoch 10. A random part of weight 1e-3 instead of 1 (the first form of ``WarmStart``)
cost 17–30 FPE on epochs 2–5 against 13–23.

Also the rounding gap (:mod:`hessdist.solvers.rounding`): each epoch's reference is made to
confirm, measuring that epoch's gap (``measured_here``; its spread over the epochs is the
margin behind ``SAFETY``), while the other runs see the first epoch's measurement, as a
service would after its first solve (``used``); ``interval_holds_reference`` checks each run's
extreme intervals against the reference's.

Also per epoch: the overlap |cos| between consecutive epochs' eigenvectors (tight solves) and
λ_max/|λ_min|, which together say where between the oracle and the cold cost a warm start
lands. Full-data product equivalents (FPE) throughout; 2 CPU cores (no GPU needed: counts).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np
import torch
from torch import nn

from hessdist.curvature import CurvatureOperator
from hessdist.examples import digits_images
from hessdist.models import resnet_small_cifar
from hessdist.solvers.certify import subset_search
from hessdist.solvers.lanczos import RitzState, lanczos
from hessdist.solvers.starts import warm_start_vector

from .common import RESULTS, write
from .epochs import RTOL

TIGHT = {"LA": 1e-5, "SA": 1e-4}        # what epochs.py's reference asks: above the float32 floor
SUBSET = 0.15                           # the best of 15%, 25%, 40% in a first try on this loop
RUNS = ("cold", "warm", "warm_unchecked", "oracle", "warm_subset")
MISS = 1e-5                             # a miss beyond float32 rounding (~1e-7·‖H‖): by this ·‖H‖


def train(epochs: int, width: int, lr: float = 0.05, batch: int = 64) -> tuple[nn.Module, list[dict], tuple]:
    """``epochs.py``'s training (SGD, momentum 0.9, weight decay 5e-4, cosine schedule, seed 0):
    the model and its state after every epoch."""
    x, y = digits_images(size=32)
    model = resnet_small_cifar(width=width, blocks=(1, 1, 1))
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    gen = torch.Generator().manual_seed(0)
    states = []
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(y), generator=gen).split(batch):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
        sched.step()
        model.eval()
        states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return model, states, (x, y)


def holds(pairs, ref) -> bool:
    """Whether the extreme pair's interval meets the reference's (its value to within its own,
    much tighter, interval)."""
    (lo, hi), (ref_lo, ref_hi) = pairs.intervals[0], ref.intervals[0]
    return bool(lo <= ref_hi and ref_lo <= hi)


def vectors(res) -> dict[str, np.ndarray]:
    return {w: p.vectors for w, p in res.pairs.items()}


def wrong_stop_margin(C: np.ndarray, ref) -> dict[str, float | None]:
    """Per end, the smallest r/|θ| over the steps of one single-vector run (projection ``C``)
    whose interval certainly misses the reference's eigenvalue: the least ``rtol`` at which the
    stopping rule would have certified a wrong value on this run (None: no such step)."""
    lo, hi = ref.smallest.intervals[0][1], ref.largest.intervals[0][0]   # λ_min ≤ lo, λ_max ≥ hi
    slack = MISS * max(abs(lo), abs(hi))
    worst: dict[str, float | None] = {"LA": None, "SA": None}
    for e in range(1, C.shape[1] + 1):
        ritz = RitzState(C, e, min(e + 1, C.shape[0]))
        for w, i, wrong in (("SA", 0, ritz.theta[0] - ritz.residuals[0] > lo + slack),
                            ("LA", -1, ritz.theta[-1] + ritz.residuals[-1] < hi - slack)):
            if wrong and ritz.theta[i] != 0:
                ratio = float(ritz.residuals[i] / abs(ritz.theta[i]))
                worst[w] = ratio if worst[w] is None else min(worst[w], ratio)
    return worst


def stopping_steps(C: np.ndarray, ref) -> dict:
    """On one single-vector run (projection ``C``): the products it took (``certified``), the
    fewest after which both Ritz values lay within ``RTOL`` of the reference (``oracle``), and
    where the Kato–Temple bound would have met ``RTOL`` (``kato_temple``; its residual bound r
    where the next Ritz interval overlaps) and whether that interval missed the reference."""
    want = {"LA": float(ref.largest.values[0]), "SA": float(ref.smallest.values[0])}
    slack = MISS * max(abs(v) for v in want.values())
    oracle = kato = None
    kato_wrong = False
    for e in range(1, C.shape[1] + 1):
        ritz = RitzState(C, e, min(e + 1, C.shape[0]))
        th, r = ritz.theta, ritz.residuals
        if oracle is None and all(abs(th[i] - want[w]) <= RTOL[w] * abs(want[w]) for w, i in (("LA", -1), ("SA", 0))):
            oracle = e
        if kato is None:
            bound = {}
            for w, i, j, side in (("LA", -1, -2, 1.0), ("SA", 0, 1, -1.0)):
                gap = side * (th[i] - th[j]) - r[j] if e > 1 else 0.0
                bound[w] = min(r[i], r[i] ** 2 / gap) if gap > 0 else r[i]
            if all(bound[w] <= RTOL[w] * abs(th[i]) for w, i in (("LA", -1), ("SA", 0))):
                kato = e
                kato_wrong = bool(th[0] - bound["SA"] > want["SA"] + slack or th[-1] + bound["LA"] < want["LA"] - slack)
    return {"certified": C.shape[1], "oracle": oracle, "kato_temple": kato, "kato_temple_wrong": kato_wrong}


def summarise(rows: list[dict]) -> dict:
    """Medians after the first epoch, the stopping-rule bounds, and the least ratio to the best
    peer (``epochs.json``, same checkpoints) that any stopping rule could reach from these starts:
    the oracle stop's products, without confirmations, over the peer's FPE."""
    later = rows[1:]
    summary: dict = {f"median_fpe_after_first_{n}": statistics.median(r[n]["fpe"] for r in later) if later else None
                     for n in RUNS}
    for n in ("cold", "warm", "warm_unchecked"):
        summary[f"worst_fpe_after_first_{n}"] = max((r[n]["fpe"] for r in later), default=None)
    summary["intervals_missing_the_reference"] = [
        {"epoch": r["epoch"], "run": n, "end": w} for r in rows for n in RUNS
        if n in r for w, ok in r[n]["interval_holds_reference"].items() if not ok]
    gaps = [r["rounding_gap"]["measured_here"] for r in rows]
    summary["rounding_gap_ratio_spread"] = max(gaps) / min(gaps)
    summary["confirmations_skipped_warm"] = sum(r["warm"]["confirm_hvps"] == 0 for r in later)
    for name in ("cold", "warm", "warm_unchecked"):
        steps = [r["stopping_steps"][name] for r in later]
        summary[f"median_products_after_first_{name}_oracle_stop"] = statistics.median(
            s["oracle"] for s in steps if s["oracle"] is not None) if steps else None
        summary[f"median_products_after_first_{name}_certified"] = statistics.median(
            s["certified"] for s in steps) if steps else None
    summary["kato_temple_wrong_runs"] = sum(s["kato_temple_wrong"] for r in rows for s in r["stopping_steps"].values())
    summary["kato_temple_runs"] = sum(len(r["stopping_steps"]) for r in rows)
    margins = [(m, r["epoch"], name, w) for r in rows for name, ends in r["wrong_stop_margin"].items()
               for w, m in ends.items() if m is not None]
    least = min(margins, default=None)
    summary["least_rtol_that_would_have_stopped_wrong"] = None if least is None else dict(
        zip(("rtol", "epoch", "run", "end"), least))
    peers_path = os.path.join(RESULTS, "epochs.json")
    by_epoch = {r["epoch"]: r for r in rows}
    if os.path.exists(peers_path):
        bounds = []
        for peer in json.load(open(peers_path))["summary"]["versus_best_peer"]:
            row = by_epoch.get(peer["epoch"])
            steps = row and row["stopping_steps"]["cold" if peer["epoch"] == 1 else "warm"]
            if steps and steps["oracle"] is not None:
                bounds.append({"epoch": peer["epoch"], "oracle_products": steps["oracle"],
                               "best_peer_fpe": peer["best_peer_fpe"],
                               "ratio": steps["oracle"] / peer["best_peer_fpe"]})
        summary["best_possible_versus_best_peer"] = bounds
        summary["best_possible_median_ratio"] = statistics.median(b["ratio"] for b in bounds) if bounds else None
    return summary


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--width", type=int, default=4)
    args = ap.parse_args(argv)
    model, states, data = train(args.epochs, args.width)
    op = CurvatureOperator(model, "cross_entropy", data, batch_size=512, mode="auto", dtype=torch.float32)
    rows, warm_prev, unchecked_prev, ref_prev = [], None, None, None
    t0, chained = time.perf_counter(), None
    for epoch, state in enumerate(states, start=1):
        op.set_parameters(state)
        op.rounding_gaps = None            # the reference confirms, measuring this epoch's gap ...
        ref = lanczos(op, which="LA,SA", rtol=TIGHT, tol=1e-9, seed=10_000 + epoch, max_hvps=300)
        gap_here = op.rounding_gaps["torch.float64"][0]
        chained = chained or op.rounding_gaps
        op.rounding_gaps = chained         # ... the solves see the first epoch's, as a service would
        exact = vectors(ref)
        cold = lanczos(op, which="LA,SA", rtol=RTOL, seed=epoch)
        warm = cold if warm_prev is None else lanczos(
            op, which="LA,SA", rtol=RTOL, seed=epoch, v0=warm_start_vector(warm_prev, op.n, epoch))
        unchecked = cold if unchecked_prev is None else lanczos(
            op, which="LA,SA", rtol=RTOL, seed=epoch, v0=warm_start_vector(unchecked_prev, op.n, epoch).vector)
        oracle = lanczos(op, which="LA,SA", rtol=RTOL, seed=epoch, v0=warm_start_vector(exact, op.n, epoch))
        subset = None if warm_prev is None else subset_search(
            op, which="LA,SA", rtol=RTOL, fraction=SUBSET, previous=warm_prev, seed=epoch).result
        warm_prev, unchecked_prev = vectors(warm), vectors(unchecked)
        row = {"epoch": epoch, "lambda_max": float(ref.largest.values[0]), "lambda_min": float(ref.smallest.values[0]),
               "reference_converged": ref.converged,
               "ratio_max_over_abs_min": float(ref.largest.values[0] / abs(ref.smallest.values[0])),
               "overlap_with_previous_epoch": None if ref_prev is None else {
                   w: float(abs(ref_prev[w][:, 0] @ exact[w][:, 0])) for w in ("LA", "SA")},
               "rounding_gap": {"measured_here": gap_here, "used": chained["torch.float64"][0]},
               **{name: {"fpe": r.fpe, "converged": r.converged, "confirm_hvps": r.confirm_hvps,
                         "relative_error": {w: float(abs(r.pairs[w].values[0] - ref.pairs[w].values[0])
                                                    / abs(ref.pairs[w].values[0])) for w in ("LA", "SA")},
                         "interval_holds_reference": {w: holds(r.pairs[w], ref.pairs[w]) for w in ("LA", "SA")}}
                  for name, r in (("cold", cold), ("warm", warm), ("warm_unchecked", unchecked), ("oracle", oracle),
                                  ("warm_subset", subset))
                  if r is not None},
               "stopping_steps": {name: stopping_steps(r.projected, ref) for name, r in
                                  (("cold", cold), ("warm", warm), ("warm_unchecked", unchecked))
                                  if name == "cold" or warm is not cold},
               "wrong_stop_margin": {name: wrong_stop_margin(r.projected, ref) for name, r in
                                     (("reference", ref), ("cold", cold), ("warm", warm), ("warm_unchecked", unchecked))}}
        ref_prev = exact
        rows.append(row)
        print({k: row[k] for k in ("epoch", "ratio_max_over_abs_min", "overlap_with_previous_epoch")},
              {n: row[n]["fpe"] for n in RUNS if n in row},
              row["wrong_stop_margin"], flush=True)
        summary = summarise(rows)
        write("warm_chain", {"config": {**vars(args), "n_params": op.n, "n_samples": op.n_samples, "rtol": RTOL,
                                        "subset_fraction": SUBSET,
                                        "data": "scikit-learn digits upsampled to 32×32×3 (real, 1,797 images)",
                                        "seconds": time.perf_counter() - t0},
                             "rows": rows, "summary": summary})


if __name__ == "__main__":
    main()
