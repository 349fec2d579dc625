"""Products to reach λ_max within 1e-3 and λ_min within 1e-2 (relative) at epoch E, starting cold
(one random vector; a random block of 3) or warm from epoch E−1's eigenvectors (as a block with
a random column appended, or summed into one vector plus a little noise — hessdist's warm start,
``warm_start_vector``), with scipy's LOBPCG (run per end, warm) as the peer block method. The
overlap |cos| between the two epochs' eigenvectors says how much a warm start can reuse.

Models are trained for a few epochs of minibatch SGD; the operator is float64 and exact.
"Oracle" counts stop the moment both ends are within tolerance (Ritz values move monotonically,
so they stay there); "tol 1e-4" counts use the solver's own residual stopping rule.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator, lobpcg
from torch import nn

from hessdist.examples import cifar10, digits
from hessdist.curvature import CurvatureOperator
from hessdist.models import ResNet, digits_cnn
from hessdist.solvers.lanczos import lanczos
from hessdist.solvers.starts import warm_start_vector

from .common import merged_rows, write

TOL_MAX, TOL_MIN = 1e-3, 1e-2


class Reached(Exception):
    pass


def train_epochs(model: nn.Module, data, epochs: int, lr: float, batch: int = 64, seed: int = 0,
                 late_lr: float | None = None) -> list[dict]:
    """Minibatch SGD with momentum; returns the state_dict after every epoch. With ``late_lr``,
    the last two epochs run at that rate (the late phase of a schedule)."""
    torch.manual_seed(seed)
    x, y = data
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    states = []
    for epoch in range(epochs):
        if late_lr is not None and epoch == epochs - 2:
            for group in opt.param_groups:
                group["lr"] = late_lr
        model.train()
        for idx in torch.randperm(len(y)).split(batch):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
        model.eval()
        states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return states


def problem(name: str):
    """(model, data, epochs, lr, late_lr, note)."""
    if name == "digits-cnn":
        return digits_cnn(width=8), digits(), 4, 0.05, None, "real (scikit-learn digits)"
    if name == "digits-cnn-late":
        return digits_cnn(width=8), digits(), 6, 0.05, 0.005, "real (scikit-learn digits)"
    if name == "digits-cnn-settled":            # late training: small steps, a slowly moving Hessian
        return digits_cnn(width=8), digits(), 8, 0.05, 0.0005, "real (scikit-learn digits)"
    if name == "resnet-cifar-subset":
        x, y = cifar10(n_samples=256)
        model = ResNet(blocks=(1, 1, 1, 1), width=4)
        return model, (x, y), 4, 0.05, 0.005, "SYNTHETIC CIFAR-shaped data unless CIFAR-10 is under ./data"
    raise SystemExit(f"unknown problem {name}")


def oracle_products(op, lmax, lmin, **kw) -> int | None:
    """Products until both ends are within tolerance (None if never, within max_hvps)."""
    def check(s):
        if abs(s["LA"][0][0] - lmax) <= TOL_MAX * abs(lmax) and abs(s["SA"][0][0] - lmin) <= TOL_MIN * abs(lmin):
            raise Reached(s["hvps"])
    try:
        lanczos(op, which="LA,SA", k=1, tol=1e-14, return_vectors=False, callback=check, **kw)
    except Reached as r:
        return int(r.args[0])
    return None


def self_stopped(op, lmax, lmin, **kw) -> dict:
    res = lanczos(op, which="LA,SA", k=1, tol=1e-4, return_vectors=False, **kw)
    return {"hvps": res.hvps, "err_max": abs(res.largest.values[0] - lmax) / abs(lmax),
            "err_min": abs(res.smallest.values[0] - lmin) / abs(lmin), "stop_reason": res.stop_reason}


def lobpcg_products(op, X0: np.ndarray, largest: bool, target: float, rel: float, max_iter: int = 200) -> int | None:
    """scipy LOBPCG for one end from block X0; products (columns) until within rel·|target|."""
    counts = []

    def mm(V):
        V = np.asarray(V, dtype=np.float64).reshape(op.n, -1)
        counts.append((counts[-1] if counts else 0) + V.shape[1])
        return op.matmat(V)

    A = LinearOperator(op.shape, matvec=mm, matmat=mm, dtype=np.float64)
    _, _, history = lobpcg(A, X0, largest=largest, tol=1e-12, maxiter=max_iter, retLambdaHistory=True)
    for i, lam in enumerate(history):
        value = float(np.max(lam) if largest else np.min(lam))
        if abs(value - target) <= rel * abs(target):
            return counts[min(i, len(counts) - 1)]
    return None


def run(name: str) -> dict:
    model, data, epochs, lr, late_lr, note = problem(name)
    states = train_epochs(model, data, epochs, lr, late_lr=late_lr)
    op = CurvatureOperator(model, "cross_entropy", data, dtype=torch.float64, batch_size=2048,
                           mode="double-backward")
    op.set_parameters(states[-2])
    prev = lanczos(op, which="LA,SA", k=1, tol=1e-8, seed=11)
    op.set_parameters(states[-1])
    ref = lanczos(op, which="LA,SA", k=1, tol=1e-9, seed=123)
    lmax, lmin = float(ref.largest.values[0]), float(ref.smallest.values[0])
    previous = np.column_stack([prev.largest.vectors, prev.smallest.vectors])
    summed = warm_start_vector({"LA": prev.largest.vectors, "SA": prev.smallest.vectors}, op.n, seed=1)
    starts = {"cold_single": {}, "cold_block3": {"block": 3}, "warm_block": {"v0": previous},
              "warm_single_sum": {"v0": summed}}
    row = {"problem": name, "data": note, "epochs": epochs, "lr": lr, "last_two_epochs_lr": late_lr, "n_params": op.n, "n_samples": op.n_samples,
           "lambda_max": lmax, "lambda_min": lmin, "previous_epoch": {
               "lambda_max": float(prev.largest.values[0]), "lambda_min": float(prev.smallest.values[0])},
           # |cos| between the previous epoch's eigenvector and this one's: what a warm start can reuse
           "eigenvector_overlap": {
               "LA": float(abs(prev.largest.vectors[:, 0] @ ref.largest.vectors[:, 0])),
               "SA": float(abs(prev.smallest.vectors[:, 0] @ ref.smallest.vectors[:, 0]))}}
    for label, kw in starts.items():
        row[label] = {"oracle_hvps": oracle_products(op, lmax, lmin, seed=0, **kw),
                      "tol1e-4": self_stopped(op, lmax, lmin, seed=0, **kw)}
        print(label, row[label], flush=True)
    rng = np.random.default_rng(0)
    hi = lobpcg_products(op, np.column_stack([prev.largest.vectors, rng.standard_normal(op.n)]), True, lmax, TOL_MAX)
    lo = lobpcg_products(op, np.column_stack([prev.smallest.vectors, rng.standard_normal(op.n)]), False, lmin, TOL_MIN)
    row["scipy_lobpcg_warm_per_end"] = {"LA": hi, "SA": lo, "total": hi + lo if hi and lo else None}
    cold = row["cold_single"]["oracle_hvps"]
    for label in ("warm_block", "warm_single_sum"):
        warm = row[label]["oracle_hvps"]
        row[f"ratio_{label}_to_cold"] = warm / cold if cold and warm else None
    print(row, flush=True)
    return row


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--problems", default="digits-cnn,digits-cnn-late,digits-cnn-settled,resnet-cifar-subset")
    args = ap.parse_args(argv)
    done = []
    for p in args.problems.split(","):          # written after each problem: a long run keeps what it has
        done.append(run(p))
        write("warm_start", {"tolerances": {"lambda_max": TOL_MAX, "lambda_min": TOL_MIN},
                             "rows": merged_rows("warm_start", done)})


if __name__ == "__main__":
    main()
