"""What a warm start can save along a training run, and what bounds it: the per-epoch loop of
``epochs.py`` (the same BatchNorm ResNet on real digits at 32×32, the same training), solved
in-process after every epoch at the per-epoch contract (rtol 1e-2 on λ_max, 5e-2 on λ_min,
float32 products, confirmations counted) three ways:

* ``cold``: a random start;
* ``warm``: hessdist's warm start (the sum of the previous epoch's *warm-solved* eigenvectors
  plus a little noise), chained epoch to epoch as the eigen-service chains it;
* ``oracle``: started from this epoch's own eigenvectors (from a tight solve, not counted) — the
  floor no warm start can beat: the products that certify an answer already in hand.

Also per epoch: the overlap |cos| between consecutive epochs' eigenvectors (tight solves) and
λ_max/|λ_min|, which together say where between the oracle and the cold cost a warm start
lands. Full-data product equivalents (FPE) throughout; 2 CPU cores (no GPU needed: counts).
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from torch import nn

from hessdist.curvature import CurvatureOperator
from hessdist.examples import digits_images
from hessdist.models import resnet_small_cifar
from hessdist.solvers.lanczos import lanczos, warm_start_vector

from .common import write
from .epochs import RTOL

TIGHT = {"LA": 1e-5, "SA": 1e-4}        # what epochs.py's reference asks: above the float32 floor


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


def vectors(res) -> dict[str, np.ndarray]:
    return {w: p.vectors for w, p in res.pairs.items()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--width", type=int, default=4)
    args = ap.parse_args(argv)
    model, states, data = train(args.epochs, args.width)
    op = CurvatureOperator(model, "cross_entropy", data, batch_size=512, mode="auto", dtype=torch.float32)
    rows, warm_prev, ref_prev, t0 = [], None, None, time.perf_counter()
    for epoch, state in enumerate(states, start=1):
        op.set_parameters(state)
        ref = lanczos(op, which="LA,SA", rtol=TIGHT, tol=1e-9, seed=10_000 + epoch, max_hvps=300)
        exact = vectors(ref)
        cold = lanczos(op, which="LA,SA", rtol=RTOL, seed=epoch)
        warm = cold if warm_prev is None else lanczos(
            op, which="LA,SA", rtol=RTOL, seed=epoch, v0=warm_start_vector(warm_prev, op.n, epoch))
        oracle = lanczos(op, which="LA,SA", rtol=RTOL, seed=epoch, v0=warm_start_vector(exact, op.n, epoch))
        warm_prev = vectors(warm)
        row = {"epoch": epoch, "lambda_max": float(ref.largest.values[0]), "lambda_min": float(ref.smallest.values[0]),
               "reference_converged": ref.converged,
               "ratio_max_over_abs_min": float(ref.largest.values[0] / abs(ref.smallest.values[0])),
               "overlap_with_previous_epoch": None if ref_prev is None else {
                   w: float(abs(ref_prev[w][:, 0] @ exact[w][:, 0])) for w in ("LA", "SA")},
               **{name: {"fpe": r.fpe, "converged": r.converged, "confirm_hvps": r.confirm_hvps,
                         "relative_error": {w: float(abs(r.pairs[w].values[0] - ref.pairs[w].values[0])
                                                    / abs(ref.pairs[w].values[0])) for w in ("LA", "SA")}}
                  for name, r in (("cold", cold), ("warm", warm), ("oracle", oracle))}}
        ref_prev = exact
        rows.append(row)
        print({k: row[k] for k in ("epoch", "ratio_max_over_abs_min", "overlap_with_previous_epoch")},
              {n: row[n]["fpe"] for n in ("cold", "warm", "oracle")}, flush=True)
        later = rows[1:]
        summary = {f"median_fpe_after_first_{n}": statistics.median(r[n]["fpe"] for r in later) if later else None
                   for n in ("cold", "warm", "oracle")}
        write("warm_chain", {"config": {**vars(args), "n_params": op.n, "n_samples": op.n_samples, "rtol": RTOL,
                                        "data": "scikit-learn digits upsampled to 32×32×3 (real, 1,797 images)",
                                        "seconds": time.perf_counter() - t0},
                             "rows": rows, "summary": summary})


if __name__ == "__main__":
    main()
