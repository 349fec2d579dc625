"""The per-epoch loop as the user runs it: a CIFAR-variant ResNet with BatchNorm trained on real
data (scikit-learn's digits upsampled to 32×32×3, or CIFAR-10 from --data-root when present),
and after every epoch λ_max and λ_min of the full-data Hessian through the eigen-service (Ray
workers, warm starts, the default path) at rtol 1e-2 on λ_max and 5e-2 on λ_min.

Per epoch: the service's full-data product equivalents (FPE), wall time, values, intervals, and
a tight reference (an independent cold in-process solve). On the same checkpoints (every
``--peer-every``-th epoch), each given the same accuracy target, capped at ``--cap`` FPE per end:

* the user's own best method: power iteration with growing batches (128 samples, then 1,000,
  then all; a stage ends when the estimate moves by < 1e-3 relative), and the same on
  H − λ_max·I for λ_min;
* PyHessian (its power iteration, its products: λ_max only);
* hessian-eigenthings' ``lanczos`` (its recurrence and converged flags, on hessdist's products);
* scipy's eigsh (ARPACK), once for LA and once for SA at the target as its tol.

Each peer stops by its own rule (what its user gets); whether it then is within the target of
the reference is recorded, and for the iterative peers the oracle FPE (the first point within
the target, had it been told when) as a lower bound.

Width is reduced for 2 CPU cores (--width 4); on a GPU pass --width 64 --blocks 2,2,2,2.
"""
from __future__ import annotations

import argparse
import copy
import importlib
import os
import statistics
import tempfile
import time

import numpy as np
import torch
from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh
from torch import nn

from hessdist.examples import cifar10, cifar10_dir, digits_images
from hessdist.curvature import CurvatureOperator
from hessdist.models import resnet_small_cifar
from hessdist.solvers.lanczos import lanczos

from .common import write
from .solver_products import first_within

RTOL = {"LA": 1e-2, "SA": 5e-2}
STAGES = (128, 1000)


class Capped(Exception):
    """A peer asked for more products than the cap allows."""


class Counted:
    """hessdist's in-process operator restricted to the first ``samples`` samples, counting FPE."""

    def __init__(self, model, data, samples: int | None, total: int, cap: float, spent: list):
        x, y = data
        x, y = (x, y) if samples is None else (x[:samples], y[:samples])
        self.op = CurvatureOperator(model, "cross_entropy", (x, y), batch_size=512, mode="auto")
        self.fraction, self.cap, self.spent = len(y) / total, cap, spent

    def matvec(self, v: np.ndarray) -> np.ndarray:
        if self.spent[0] + self.fraction > self.cap + 1e-9:
            raise Capped
        self.spent[0] += self.fraction
        return np.asarray(self.op.matvec(np.asarray(v, dtype=np.float64)))


def power_growing(model, data, ref: dict, cap: float) -> dict:
    """Power iteration on growing batches, each stage ending when the estimate moves by less than
    1e-3 relative (PyHessian's rule); λ_min by the same on H − λ_max·I. ``own``: where the last
    stage's rule stopped it; ``oracle``: the first FPE from which the estimate stays within the
    target (it had to be told when)."""
    total = len(data[1])
    out, shift = {}, 0.0
    for end, key in (("LA", "lambda_max"), ("SA", "lambda_min")):
        spent, history, est = [0.0], [], None
        v = np.random.default_rng(0).standard_normal(sum(p.numel() for p in model.parameters()))
        v /= np.linalg.norm(v)
        try:
            for samples in (*(s for s in STAGES if s < total), None):
                op, prev = Counted(model, data, samples, total, cap, spent), None
                while True:
                    w = op.matvec(v) - shift * v
                    est = float(v @ w) + shift
                    if samples is None:
                        history.append((spent[0], est))
                    v = w / np.linalg.norm(w)
                    if prev is not None and abs(est - prev) <= 1e-3 * abs(prev):
                        break
                    prev = est
        except Capped:
            pass
        own_ok = est is not None and abs(est - ref[key]) <= RTOL[end] * abs(ref[key]) and spent[0] < cap
        oracle = first_within(history, ref[key], RTOL[end])
        out[end] = {"reached": bool(own_ok), "fpe": spent[0], "estimate": est,
                    "oracle_fpe": oracle, "capped": spent[0] >= cap - 1e-9}
        if end == "LA":
            shift = est if est is not None else ref["lambda_max"]
    return out


def eigenthings_lanczos(op: CurvatureOperator, ref: dict, cap: int) -> dict:
    """hessian-eigenthings' ``lanczos`` (its recurrence and its converged flags, tol = the
    target) on hessdist's products, one end per call as its API works: from its default
    max_iter (2k) doubling until its own flag says converged — what a user without an adaptive
    stop does — every run paid for. ``oracle_fpe``: the shortest run within the target."""
    import hessian_eigenthings as he

    out = {}
    for end, key in (("LA", "lambda_max"), ("SA", "lambda_min")):
        count, steps, oracle, result = [0], 2, None, None
        A = he.LambdaOperator(lambda q: torch.as_tensor(op.matvec(q.double())), op.n, dtype=torch.float64)
        counted = he.LambdaOperator(lambda q: (count.__setitem__(0, count[0] + 1), A.matvec(q))[1], op.n,
                                    dtype=torch.float64)
        while count[0] + steps <= cap:
            result = he.lanczos(counted, k=1, max_iter=steps, tol=RTOL[end], which=end, seed=0, reorthogonalize=True)
            value = float(result.eigenvalues[0])
            within = abs(value - ref[key]) <= RTOL[end] * abs(ref[key])
            oracle = oracle or (steps if within else None)
            if bool(result.converged[0]):
                break
            steps *= 2
        value = None if result is None else float(result.eigenvalues[0])
        ok = result is not None and bool(result.converged[0]) and abs(value - ref[key]) <= RTOL[end] * abs(ref[key])
        out[end] = {"reached": bool(ok), "fpe": count[0], "estimate": value, "last_max_iter": steps,
                    "oracle_fpe": oracle}
    return out


def arpack(op: CurvatureOperator, ref: dict, cap: int) -> dict:
    """scipy eigsh (ARPACK), once per end, with the target as its tol (its criterion is per value)."""
    out = {}
    for end, key in (("LA", "lambda_max"), ("SA", "lambda_min")):
        count = [0]

        def mv(v):
            count[0] += 1 if np.ndim(v) == 1 else np.shape(v)[1]
            if count[0] > cap:
                raise Capped
            return np.asarray(op.matmat(np.asarray(v, dtype=np.float64).reshape(op.n, -1))).reshape(np.shape(v))

        A = LinearOperator((op.n, op.n), matvec=mv, matmat=mv, dtype=np.float64)
        try:
            value = float(eigsh(A, k=1, which=end, tol=RTOL[end], v0=np.random.default_rng(0).standard_normal(op.n),
                                return_eigenvectors=False)[0])
            ok = abs(value - ref[key]) <= RTOL[end] * abs(ref[key])
            out[end] = {"reached": ok, "fpe": count[0], "estimate": value}
        except (Capped, ArpackNoConvergence):
            out[end] = {"reached": False, "fpe": min(count[0], cap), "estimate": None, "capped": True}
    return out


def pyhessian(model, data, ref: dict, cap: int) -> dict:
    """PyHessian's top eigenvalue (its power iteration with its default tol 1e-3, its products on
    the data in one batch, float32): λ_max only."""
    try:
        ph = importlib.import_module("pyhessian.hessian")
    except ImportError as exc:
        return {"LA": {"reached": False, "fpe": None, "note": f"not installed ({exc})"},
                "SA": {"reached": False, "fpe": None, "note": "not installed"}}
    count, original = [0], ph.hessian_vector_product

    def counted(gradsH, params, v):
        if count[0] >= cap:
            raise Capped
        count[0] += 1
        return original(gradsH, params, v)

    ph.hessian_vector_product = counted
    try:
        torch.manual_seed(0)
        h = ph.hessian(copy.deepcopy(model).eval(), nn.CrossEntropyLoss(), data=data, cuda=False)
        value = float(h.eigenvalues(maxIter=cap, tol=1e-3, top_n=1)[0][0])
        ok = abs(value - ref["lambda_max"]) <= RTOL["LA"] * abs(ref["lambda_max"])
        la = {"reached": ok, "fpe": count[0], "estimate": value}
    except Capped:
        la = {"reached": False, "fpe": cap, "estimate": None, "capped": True}
    finally:
        ph.hessian_vector_product = original
    return {"LA": la, "SA": {"reached": False, "fpe": None, "note": "cannot: largest magnitude only"}}


def run_peers(model, data, op, ref: dict, cap: int) -> dict:
    """Every peer on this checkpoint; ``both_fpe``: the FPE for both ends when both were reached
    with the peer's own stopping rule (None otherwise)."""
    peers = {}
    for name, fn in (("power iteration, growing batches", lambda: power_growing(model, data, ref, cap)),
                     ("PyHessian", lambda: pyhessian(model, data, ref, cap)),
                     ("hessian-eigenthings lanczos", lambda: eigenthings_lanczos(op, ref, cap)),
                     ("scipy eigsh LA + SA", lambda: arpack(op, ref, cap))):
        t0 = time.perf_counter()
        entry = fn()
        reached = all(entry[e]["reached"] for e in ("LA", "SA"))
        entry["both_fpe"] = entry["LA"]["fpe"] + entry["SA"]["fpe"] if reached else None
        entry["seconds"] = time.perf_counter() - t0
        peers[name] = entry
        print(f"    {name}: {entry}", flush=True)
    return peers


def load_data(args) -> tuple[tuple[torch.Tensor, torch.Tensor], str]:
    if cifar10_dir(args.data_root):
        return cifar10(root=args.data_root, n_samples=args.n_samples), "CIFAR-10 (real)"
    x, y = digits_images(size=args.size)
    return (x, y), f"scikit-learn digits upsampled to {args.size}×{args.size}×3 (real, 1,797 images)"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--width", type=int, default=4)
    ap.add_argument("--blocks", default="1,1,1")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--data-root", default=os.environ.get("HESSDIST_DATA_ROOT", "data"))
    ap.add_argument("--n-samples", type=int)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--peer-every", type=int, default=3, help="run the peers on epochs 1, 1+k, 1+2k, …")
    ap.add_argument("--cap", type=int, default=150, help="most FPE a peer may spend per end")
    args = ap.parse_args(argv)

    import ray

    from hessdist import service
    from hessdist.workers import OperatorSpec, connect

    (x, y), data_note = load_data(args)
    blocks = tuple(int(b) for b in args.blocks.split(","))
    model = resnet_small_cifar(width=args.width, blocks=blocks)
    n = sum(p.numel() for p in model.parameters())
    print(f"{n:,} parameters, {len(y):,} samples: {data_note}", flush=True)
    connect(num_cpus=args.workers + 1)
    spec = OperatorSpec(model=lambda: resnet_small_cifar(width=args.width, blocks=blocks),
                        data=lambda rank, world_size: (x[rank::world_size], y[rank::world_size]),
                        batch_size=512, mode="auto", dtype="float32")
    out_dir = tempfile.mkdtemp(prefix="hessdist-epochs-")
    svc = service.start("epochs-benchmark", spec, args.workers, out_dir)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.epochs)
    gen = torch.Generator().manual_seed(0)
    rows, t_loop = [], time.perf_counter()
    try:
        for epoch in range(1, args.epochs + 1):
            model.train()
            t0 = time.perf_counter()
            for idx in torch.randperm(len(y), generator=gen).split(args.batch):
                opt.zero_grad()
                nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
                opt.step()
            sched.step()
            model.eval()
            train_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            r = svc.result(svc.submit(model.state_dict(), step=epoch, rtol=RTOL))
            solve_wall = time.perf_counter() - t0
            op = CurvatureOperator(model, "cross_entropy", (x, y), batch_size=512, mode="auto")
            t0 = time.perf_counter()
            ref_res = lanczos(op, which="LA,SA", k=2, rtol={"LA": 1e-5, "SA": 1e-4}, tol=1e-9, max_hvps=800,
                              seed=10_000 + epoch)
            ref = {"lambda_max": float(ref_res.largest.values[0]), "lambda_min": float(ref_res.smallest.values[0]),
                   "converged": ref_res.converged, "fpe": ref_res.fpe, "seconds": time.perf_counter() - t0,
                   "relative_widths": {"LA": float(ref_res.largest.relative_widths[0]),
                                       "SA": float(ref_res.smallest.relative_widths[0])}}
            err = {"LA": abs(r["largest"][0] - ref["lambda_max"]) / abs(ref["lambda_max"]),
                   "SA": abs(r["smallest"][0] - ref["lambda_min"]) / abs(ref["lambda_min"])}
            row = {"epoch": epoch, "train_seconds": train_s, "lr": sched.get_last_lr()[0],
                   "hessdist": {"fpe": r["fpe"], "hvps": r["hvps"], "wall_seconds": solve_wall,
                                "solve_seconds": r["seconds"], "warm_start": r["warm_start"],
                                "largest": r["largest"][0], "smallest": r["smallest"][0],
                                "intervals": r["intervals"], "relative_widths": r["relative_widths"],
                                "met": r["met"], "converged": r["converged"], "stop_reason": r["stop_reason"],
                                "subset": r.get("subset"), "relative_error_vs_reference": err,
                                "within_target": bool(err["LA"] <= RTOL["LA"] and err["SA"] <= RTOL["SA"])},
                   "reference": ref}
            print(f"epoch {epoch}: hessdist {r['fpe']:.1f} FPE {solve_wall:.1f} s λ_max {r['largest'][0]:.5g} "
                  f"λ_min {r['smallest'][0]:.4g} (ref {ref['lambda_max']:.5g} {ref['lambda_min']:.4g}) "
                  f"within target: {row['hessdist']['within_target']}", flush=True)
            if (epoch - 1) % args.peer_every == 0:
                row["peers"] = run_peers(model, (x, y), op, ref, args.cap)
            rows.append(row)
            write("epochs", {"config": {**vars(args), "n_params": n, "n_samples": len(y), "data": data_note,
                                        "rtol": RTOL, "loop_seconds": time.perf_counter() - t_loop},
                             "rows": rows, "summary": summary(rows)})
    finally:
        svc.stop()
        ray.shutdown()


def summary(rows: list[dict]) -> dict:
    """Median FPE after the first epoch, the first epoch's FPE, and the ratio to the best peer on
    the checkpoints the peers ran on."""
    fpe = [r["hessdist"]["fpe"] for r in rows]
    ratios = []
    for r in rows:
        best = [p["both_fpe"] for p in r.get("peers", {}).values() if p.get("both_fpe")]
        if best:
            ratios.append({"epoch": r["epoch"], "hessdist_fpe": r["hessdist"]["fpe"], "best_peer_fpe": min(best),
                           "ratio": r["hessdist"]["fpe"] / min(best)})
    return {"first_epoch_fpe": fpe[0], "median_fpe_after_first": statistics.median(fpe[1:]) if len(fpe) > 1 else None,
            "all_within_target": all(r["hessdist"]["within_target"] for r in rows),
            "all_converged": all(r["hessdist"]["converged"] for r in rows),
            "median_wall_seconds": statistics.median(r["hessdist"]["wall_seconds"] for r in rows),
            "versus_best_peer": ratios,
            "median_ratio_to_best_peer": statistics.median(x["ratio"] for x in ratios) if ratios else None}


if __name__ == "__main__":
    main()
