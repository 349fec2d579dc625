"""hessdist against peer tools on the same trained model, the same data (all samples, one batch
for the peers), float64 everywhere: full-dataset Hessian-vector products and wall time to λ_max
within 1e-3 and λ_min within 1e-2 (relative error |est − true| / |true|), and whether each tool
can give λ_min at all.

* hessdist: one Lanczos run for both ends; the oracle count is the first product after which
  both estimates stay inside the tolerances, and the run's own stop at tol 1e-4 is reported too.
* PyHessian: power iteration (largest |λ| only) on its single-batch path, its own stopping rule
  at tol 1e-3; products counted by wrapping ``pyhessian.hessian.hessian_vector_product``.
* hessian-eigenthings: Lanczos with full reorthogonalisation. It has no adaptive stop (the
  caller fixes ``max_iter``), so one ``lanczos_tridiagonal`` run is made and every prefix read
  off: the prefix of m steps is exactly what ``lanczos(max_iter=m)`` returns.
* curvlinops: ``HessianLinearOperator`` through ``scipy.sparse.linalg.eigsh`` (ARPACK), once for
  LA and once for SA at tol 1e-3, and once with ``which="BE", k=2`` (both ends in one run).

Every product is counted where the tool asks for it (one column = one product). Seconds include
building the tool's operator object; they are measured on a shared CPU, so read them as rough.
The reference is a dense eigendecomposition when n ≤ --dense-max, else a tight hessdist Lanczos
solve (tol 1e-9) whose smallest and largest Ritz residuals are re-checked with explicit products.
"""
from __future__ import annotations

import argparse
import copy
import importlib
import importlib.metadata
import json
import os
import time
import traceback
from typing import Callable

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator, eigsh
from threadpoolctl import threadpool_limits
from torch import nn

import hessdist
from hessdist.curvature import CurvatureOperator
from hessdist.solvers.lanczos import lanczos

from .common import RESULTS, ray_operator, trained_model, write
from .solver_products import first_within

TOL_MAX, TOL_MIN = 1e-3, 1e-2
Data = tuple[torch.Tensor, torch.Tensor]
PEERS = {"pyhessian": "PyHessian", "hessian_eigenthings": "hessian-eigenthings",
         "curvlinops": "curvlinops-for-pytorch"}


class CapReached(Exception):
    """Raised by a counting wrapper when a tool asks for more products than the cap."""


class Counter:
    """Counts products and remembers when each finished (seconds since ``t0``)."""

    def __init__(self, cap: int):
        self.cap, self.n, self.times, self.t0 = cap, 0, {}, time.perf_counter()

    def tick(self, columns: int = 1) -> None:
        if self.n + columns > self.cap:
            raise CapReached(f"more than {self.cap} products")
        self.n += columns
        self.times[self.n] = time.perf_counter() - self.t0

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0


def rel(est: float | None, true: float) -> float | None:
    return None if est is None else abs(est - true) / abs(true)


def reached(history: list[tuple[int, float]], true: float, tol: float, times: dict, offset: float = 0.0) -> dict:
    """Products and seconds after which the estimates in ``history`` stay within tol·|true|."""
    n = first_within(history, true, tol)
    return {"products": n, "seconds": None if n is None else offset + times[n]}


def counted_scipy(A: LinearOperator, counter: Counter) -> LinearOperator:
    def mv(v):
        counter.tick(1 if np.ndim(v) == 1 else np.shape(v)[1])
        return A @ v
    return LinearOperator(A.shape, matvec=mv, matmat=mv, rmatvec=mv, dtype=np.float64)


# -- reference and sanity check ----------------------------------------------------------------
def reference(op: CurvatureOperator, dense_max: int) -> dict:
    """Exact extreme eigenvalues: dense eigh for n ≤ dense_max, else tight Lanczos + explicit
    residuals ‖Hx − θx‖ (an eigenvalue lies within that distance of θ)."""
    t0 = time.perf_counter()
    if op.n <= dense_max:
        H = np.concatenate([op.matmat(np.eye(op.n)[:, i:i + 256]) for i in range(0, op.n, 256)], axis=1)
        w = np.linalg.eigvalsh((H + H.T) / 2)
        return {"method": "dense eigh", "lambda_max": float(w[-1]), "lambda_min": float(w[0]),
                "asymmetry": float(np.abs(H - H.T).max() / np.abs(H).max()), "seconds": time.perf_counter() - t0}
    res = lanczos(op, which="LA,SA", k=1, tol=1e-9, max_hvps=min(op.n, 1000), seed=123)
    out = {"method": "hessdist lanczos tol 1e-9, residuals re-checked with explicit products", "converged": res.converged,
           "hvps": res.hvps}
    for key, pairs in (("lambda_max", res.largest), ("lambda_min", res.smallest)):
        x, theta = pairs.vectors[:, 0], float(pairs.values[0])
        x = np.asarray(x) / np.linalg.norm(np.asarray(x))
        out[key] = theta
        out[f"{key}_residual"] = float(np.linalg.norm(op.matvec(x) - theta * x))
    out["seconds"] = time.perf_counter() - t0
    return out


# -- the tools ------------------------------------------------------------------------------------
def run_hessdist(model: nn.Module, data: Data, true: tuple[float, float], cap: int, workers: int = 0) -> dict:
    """hessdist in-process, or with ``workers`` Ray worker actors (1 CPU each) on a local Ray
    cluster started here; setup (cluster, workers, process group) is counted in the seconds."""
    t0 = time.perf_counter()
    if workers:
        with ray_operator(model, data, workers, dtype="float64", batch_size=2048, mode="double-backward") as op:
            return _hessdist_solve(op, true, cap, time.perf_counter() - t0, workers)
    op = CurvatureOperator(model, "cross_entropy", data, dtype=torch.float64, batch_size=2048,
                           mode="double-backward")
    return _hessdist_solve(op, true, cap, time.perf_counter() - t0, workers)


def _hessdist_solve(op, true: tuple[float, float], cap: int, setup: float, workers: int) -> dict:
    hist_max, hist_min, times = [], [], {}

    def record(s: dict) -> None:
        times[s["hvps"]] = s["seconds"]
        hist_max.append((s["hvps"], float(s["LA"][0][0])))
        hist_min.append((s["hvps"], float(s["SA"][0][0])))

    res = lanczos(op, which="LA,SA", k=1, tol=1e-4, max_hvps=cap, seed=0, callback=record)
    assert op.hvps == res.hvps
    mx, mn = reached(hist_max, true[0], TOL_MAX, times, setup), reached(hist_min, true[1], TOL_MIN, times, setup)
    both = max(mx["products"], mn["products"]) if mx["products"] and mn["products"] else None
    return {"max": mx, "min": mn, "both": {"products": both, "seconds": both and setup + times[both]},
            "own_stop": {"rule": "residual ≤ 1e-4·max|θ|, both ends", "products": res.hvps,
                         "seconds": setup + res.seconds, "stop_reason": res.stop_reason,
                         "err_max": rel(float(res.largest.values[0]), true[0]),
                         "err_min": rel(float(res.smallest.values[0]), true[1])},
            "counting": "Operator.hvps (one per column)", "setup_s": setup,
            "how": "hessdist.lanczos(which='LA,SA', k=1, tol=1e-4), double-backward products"
                   + (f", {workers} Ray workers (1 CPU each, gloo)" if workers else ", in-process")}


def run_pyhessian(model: nn.Module, data: Data, true: tuple[float, float], cap: int, check: Callable,
                  tols: tuple[float, float] = (TOL_MAX, TOL_MIN)) -> dict:
    ph = importlib.import_module("pyhessian.hessian")   # the module (the package rebinds the name)

    model, (x, y) = copy.deepcopy(model).double(), data
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)     # PyHessian draws its vectors in the default dtype
    original = ph.hessian_vector_product
    try:
        t0 = time.perf_counter()
        h = ph.hessian(model, nn.CrossEntropyLoss(), data=(x.double(), y), cuda=False)
        setup = time.perf_counter() - t0
        v = [torch.randn_like(p) for p in h.params]
        sanity = check(torch.cat([t.reshape(-1) for t in original(h.gradsH, h.params, v)]),
                       torch.cat([t.reshape(-1) for t in v]))

        def power(max_iter: int, tol: float) -> tuple[float, Counter, list]:
            """One counted call of its power iteration (same seed every call)."""
            counter, history = Counter(max_iter + 1), []

            def counted(gradsH, params, v):
                counter.tick()
                Hv = original(gradsH, params, v)
                history.append((counter.n, float(sum((a * b).sum() for a, b in zip(Hv, v)))))
                return Hv

            ph.hessian_vector_product = counted
            torch.manual_seed(0)
            counter.t0 = time.perf_counter()
            values, _ = h.eigenvalues(maxIter=max_iter, tol=tol, top_n=1)
            return float(values[0]), counter, history

        value, own, _ = power(cap, 1e-3)
        steps = 2 * own.n
        while True:         # tol=0 never stops early: the same iterates, run on until the target
            _, counter, history = power(steps, 0.0)
            mx = reached(history, true[0], tols[0], counter.times, setup)
            if (mx["products"] and mx["products"] < steps) or steps >= cap:
                break
            steps = min(2 * steps, cap)
    finally:
        ph.hessian_vector_product = original
        torch.set_default_dtype(default)
    return {"max": mx, "min": {"cannot": "largest magnitude only"}, "both": {"cannot": "no λ_min"},
            "own_stop": {"rule": "|Δλ| < 1e-3·|λ| (its default)", "products": own.n,
                         "seconds": setup + own.times[own.n], "err_max": rel(value, true[0]), "err_min": None},
            "sanity_rel_diff": sanity, "counting": "wrapped pyhessian.hessian.hessian_vector_product",
            "how": "hessian(model, CrossEntropyLoss(), data=(X, y), cuda=False).eigenvalues(top_n=1, tol=1e-3)"}


def _tridiagonal_prefixes(td, tol: float) -> tuple[list, list, dict]:
    """Per prefix m: (m, LA Ritz value), (m, SA Ritz value), and the first m at which the
    tool's own residual test |β_m s_m,i| < tol·|θ_i| passes for each end."""
    a, b = td.alphas.numpy(), td.betas.numpy()
    hist_max, hist_min, flags = [], [], {}
    for m in range(1, len(a) + 1):
        T = np.diag(a[:m]) + np.diag(b[:m - 1], 1) + np.diag(b[:m - 1], -1)
        theta, S = np.linalg.eigh(T)
        beta = b[m - 1] if m - 1 < len(b) else td.last_beta
        for end, i, hist in (("LA", -1, hist_max), ("SA", 0, hist_min)):
            hist.append((m, float(theta[i])))
            if end not in flags and abs(S[-1, i]) * beta < tol * abs(theta[i]):
                flags[end] = m
    return hist_max, hist_min, flags


def run_eigenthings(model: nn.Module, data: Data, true: tuple[float, float], cap: int, check: Callable,
                    tols: tuple[float, float] = (TOL_MAX, TOL_MIN)) -> dict:
    import hessian_eigenthings as he

    model, (x, y) = copy.deepcopy(model).double().eval(), data
    t0 = time.perf_counter()
    op = he.HessianOperator(model, [(x.double(), y)], he.supervised_loss(nn.CrossEntropyLoss()))
    setup = time.perf_counter() - t0
    v = torch.randn(op.size, dtype=torch.float64)
    sanity = check(op.matvec(v), v)
    matvec = op.matvec
    steps = 32
    while True:             # prefixes are exact, so grow the run until both targets are met
        counter = Counter(steps)

        def counted(u, counter=counter):
            counter.tick()
            return matvec(u)

        op.matvec = counted
        v0 = torch.randn(op.size, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        td = he.lanczos_tridiagonal(op, v0, steps, reorthogonalize=True)
        hist_max, hist_min, flags = _tridiagonal_prefixes(td, tol=1e-4)
        mx = reached(hist_max, true[0], tols[0], counter.times, setup)
        mn = reached(hist_min, true[1], tols[1], counter.times, setup)
        if (mx["products"] and mn["products"] and max(mx["products"], mn["products"]) < steps) \
                or steps >= min(cap, op.size - 1):
            break
        steps = min(2 * steps, cap, op.size - 1)
    op.matvec = matvec
    both = max(mx["products"], mn["products"]) if mx["products"] and mn["products"] else None
    own = max(flags.values()) if len(flags) == 2 else None
    return {"max": mx, "min": mn,
            "both": {"products": both, "seconds": both and setup + counter.times[both],
                     "public_lanczos_two_calls": mx["products"] + mn["products"] if both else None},
            "own_stop": {"rule": "none adaptive: max_iter is the caller's; first m where its "
                                 "converged flag (|β s| < 1e-4·|θ|) holds at both ends",
                         "products": own, "seconds": own and setup + counter.times[own],
                         "first_flag": flags, "run_length": td.iterations,
                         "err_max": own and rel(hist_max[own - 1][1], true[0]),
                         "err_min": own and rel(hist_min[own - 1][1], true[1])},
            "sanity_rel_diff": sanity, "counting": "wrapped HessianOperator.matvec",
            "how": "lanczos_tridiagonal(HessianOperator, reorthogonalize=True); prefix m = "
                   "lanczos(max_iter=m, which='LA' or 'SA'), which does one end per call"}


def run_curvlinops(model: nn.Module, data: Data, true: tuple[float, float], cap: int, check: Callable) -> dict:
    import curvlinops

    model, (x, y) = copy.deepcopy(model).double().eval(), data
    params = [p for p in model.parameters() if p.requires_grad]
    out = {}
    for label, which, k in (("LA", "LA", 1), ("SA", "SA", 1), ("BE", "BE", 2)):
        t0 = time.perf_counter()
        H = curvlinops.HessianLinearOperator(model, nn.CrossEntropyLoss(), params, [(x.double(), y)],
                                             check_deterministic=False).to_scipy(np.float64)
        setup = time.perf_counter() - t0
        if label == "LA":
            v = np.random.default_rng(1).standard_normal(H.shape[0])
            sanity = check(torch.from_numpy(H @ v), torch.from_numpy(v))
        counter = Counter(cap)
        counter.t0 = time.perf_counter()
        try:
            w = eigsh(counted_scipy(H, counter), k=k, which=which, tol=1e-3,
                      v0=np.random.default_rng(0).standard_normal(H.shape[0]), return_eigenvectors=False)
            out[label] = {"products": counter.n, "seconds": setup + counter.elapsed(),
                          "err_max": rel(float(w.max()), true[0]) if which != "SA" else None,
                          "err_min": rel(float(w.min()), true[1]) if which != "LA" else None}
        except CapReached:
            out[label] = {"products": None, "note": f"not converged within {cap} products"}
    la, sa = out["LA"], out["SA"]

    def entry(run: dict, err: str, tol: float) -> dict:
        ok = run.get("products") and run[err] <= tol
        return {"products": run["products"] if ok else None, "seconds": run.get("seconds") if ok else None,
                "rel_err": run.get(err), "basis": "eigsh's own stop (tol 1e-3)"}

    both = la["products"] + sa["products"] if la.get("products") and sa.get("products") else None
    return {"max": entry(la, "err_max", TOL_MAX), "min": entry(sa, "err_min", TOL_MIN),
            "both": {"products": both, "seconds": both and la["seconds"] + sa["seconds"]},
            "own_stop": {"rule": "eigsh tol 1e-3, LA run + SA run", "products": both,
                         "seconds": both and la["seconds"] + sa["seconds"], "err_max": la.get("err_max"),
                         "err_min": sa.get("err_min")},
            "eigsh_BE_k2": out["BE"], "sanity_rel_diff": sanity,
            "counting": "wrapped the scipy LinearOperator from HessianLinearOperator.to_scipy()",
            "how": "eigsh(HessianLinearOperator(..., check_deterministic=False).to_scipy(), k=1, "
                   "which='LA' / 'SA', tol=1e-3)"}


def _seconds(entry: dict) -> float:
    """The run's headline time: its own stop, else both ends, else λ_max."""
    times = [entry[k].get("seconds") for k in ("own_stop", "both", "max")]
    return next((t for t in times if t), float("inf"))


def run(problem: str, cap: int, dense_max: int, repeats: int = 1, threads: int = 1) -> dict:
    """All tools on one problem, every solve on ``threads`` torch and BLAS threads."""
    model, data = trained_model(problem)   # default threads, as solver_products.py trains it: the
    default = torch.get_num_threads()      # CNN's training differs across thread counts
    torch.set_num_threads(threads)
    try:
        with threadpool_limits(threads):
            return {**_run_tools(problem, model, data, cap, dense_max, repeats), "threads": threads}
    finally:
        torch.set_num_threads(default)


def _run_tools(problem: str, model: nn.Module, data: Data, cap: int, dense_max: int, repeats: int) -> dict:
    op = CurvatureOperator(model, "cross_entropy", data, dtype=torch.float64, batch_size=2048,
                           mode="double-backward")
    ref = reference(op, dense_max)
    true = (ref["lambda_max"], ref["lambda_min"])
    print(problem, "reference", ref, flush=True)

    def check(Hv: torch.Tensor, v: torch.Tensor) -> float:
        """Relative difference between a peer's product and hessdist's: the same Hessian?"""
        ours = op.matvec(v.detach().to(torch.float64))
        return float((Hv.detach() - ours).norm() / ours.norm())

    row = {"problem": problem, "n_params": op.n, "n_samples": op.n_samples, "lambda_max": true[0],
           "lambda_min": true[1], "reference": ref, "cap": cap, "repeats": repeats, "tools": []}
    tools: list[tuple[str, Callable[[], dict] | None]] = [
        ("hessdist", lambda: run_hessdist(model, data, true, cap)),
        ("hessdist (2 Ray workers)", lambda: run_hessdist(model, data, true, cap, workers=2)),
        ("PyHessian", lambda: run_pyhessian(model, data, true, cap, check)),
        ("hessian-eigenthings", lambda: run_eigenthings(model, data, true, cap, check)),
        ("curvlinops + eigsh", lambda: run_curvlinops(model, data, true, cap, check))]
    for (tool, fn), module in zip(tools, [None, None, *PEERS]):
        entry = {"tool": tool}
        if module:
            try:
                __import__(module)
                entry["version"] = importlib.metadata.version(PEERS[module])
            except ImportError as exc:
                entry.update(status="not installed", note=str(exc))
                row["tools"].append(entry)
                continue
        else:
            entry["version"] = hessdist.__version__
        try:        # counts are deterministic; keep the fastest of `repeats` runs
            runs = [fn() for _ in range(repeats)]
            entry.update(status="ok", **min(runs, key=_seconds), load_avg_1min=os.getloadavg()[0])
        except Exception as exc:        # a failing peer is a result, not a crash
            traceback.print_exc()
            entry.update(status="error", note=f"{type(exc).__name__}: {exc}")
        print(json.dumps(entry), flush=True)
        row["tools"].append(entry)
    return row


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", default="digits-mlp,digits-cnn")
    ap.add_argument("--cap", type=int, default=400, help="most products any one solve may use")
    ap.add_argument("--dense-max", type=int, default=3000, help="dense reference up to this n")
    ap.add_argument("--threads", type=int, default=1, help="torch and BLAS threads (same for every tool)")
    ap.add_argument("--repeats", type=int, default=1, help="time each tool this often, keep the fastest")
    args = ap.parse_args(argv)
    old = os.path.join(RESULTS, "peers.json")
    rows = json.load(open(old))["rows"] if os.path.exists(old) else []
    for p in args.problems.split(","):          # written after every problem: nothing lost if stopped
        rows = [r for r in rows if r["problem"] != p] + [run(p, args.cap, args.dense_max, args.repeats, args.threads)]
        write("peers", {"tolerances": {"lambda_max": TOL_MAX, "lambda_min": TOL_MIN},
                        "rows": rows})


if __name__ == "__main__":
    main()
