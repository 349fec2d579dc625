"""Does a search on a data subset pay? Full-data product equivalents (FPE) to λ_max and λ_min at
the per-value accuracy of the per-epoch contract (rtol 1e-2 on λ_max, 5e-2 on λ_min, certified
on the full data), for:

* ``plain``: one Lanczos run on all the data (cold: a random start);
* ``subset f``: Lanczos on a fixed fraction f of the data, whose Ritz vectors warm-start the
  full-data run that certifies the answer (``hessdist.solvers.certify.subset_search``);
* ``warm`` / ``warm + subset 5%``: the same at the next checkpoint, started from the previous
  checkpoint's eigenvectors (the per-epoch situation), and started from the checkpoint's OWN
  eigenvectors (``warm_from_exact``: the limit of a settled run, where a subset's vectors can
  only blur what the start already holds);
* Alain, Le Roux & Manzagol's fixed 5% subset: its own extreme eigenpairs (solved tightly) against
  the full data's — eigenvalue differences and eigenvector angles.

Data: scikit-learn's digits expanded by a FIXED set of 13 pixel shifts (23,361 real images,
``hessdist.examples.digits_shifted``), and the plain 1,797 digits as the small-data case. Models
are trained by minibatch SGD; products in float32 (``mode="auto"``; returned pairs confirmed with
real products, counted), the reference a tight float64 Lanczos solve. Medians over seeds.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from hessdist.examples import digits, digits_shifted
from hessdist.curvature import CurvatureOperator
from hessdist.models import digits_cnn, digits_mlp
from hessdist.solvers.certify import DEFAULT_FRACTION, MIN_SUBSET_SAMPLES, angles, subset_fraction, subset_search
from hessdist.solvers.lanczos import lanczos
from hessdist.solvers.starts import warm_start_vector

from .common import merged_rows, write
from .warm_start import train_epochs

RTOL = {"LA": 1e-2, "SA": 5e-2}
FRACTIONS = (0.01, 0.02, 0.05, 0.1, 0.2)
PROBLEMS = {   # name: (model factory, data, SGD epochs, learning rate)
    "shifted-digits-mlp": (lambda: digits_mlp(hidden=32), digits_shifted, 3, 0.05),
    "shifted-digits-cnn": (lambda: digits_cnn(width=8), digits_shifted, 2, 0.05),
    "digits-cnn-1797": (lambda: digits_cnn(width=8), digits, 4, 0.05),
}


def operator(model, data, dtype=torch.float32) -> CurvatureOperator:
    return CurvatureOperator(model, "cross_entropy", data, dtype=dtype, batch_size=4096, mode="auto")


def reference(model, data) -> dict:
    """λ_max, λ_min and their eigenvectors from a tight float64 solve."""
    op = operator(model, data, torch.float64)
    res = lanczos(op, which="LA,SA", tol=1e-10, max_hvps=min(op.n, 1500), seed=12345)
    return {"lambda_max": float(res.largest.values[0]), "lambda_min": float(res.smallest.values[0]),
            "converged": res.converged, "hvps": res.hvps,
            "vectors": {"LA": res.largest.vectors, "SA": res.smallest.vectors}}


def errors(res, ref: dict) -> dict:
    """Relative errors against the reference, and whether the certified accuracy holds there."""
    e_max = abs(res.largest.values[0] - ref["lambda_max"]) / abs(ref["lambda_max"])
    e_min = abs(res.smallest.values[0] - ref["lambda_min"]) / abs(ref["lambda_min"])
    return {"err_max": float(e_max), "err_min": float(e_min), "within_rtol": bool(e_max <= RTOL["LA"] and e_min <= RTOL["SA"])}


def summarise(runs: list[dict]) -> dict:
    return {"fpe_median": statistics.median(r["fpe"] for r in runs), "fpe": [r["fpe"] for r in runs],
            "all_converged": all(r["converged"] for r in runs), "all_within_rtol": all(r["within_rtol"] for r in runs),
            "runs": runs}


def run_plain(op, ref, seeds, previous=None) -> dict:
    runs = []
    for s in seeds:
        v0 = None if previous is None else warm_start_vector(previous, op.n, s)
        res = lanczos(op, which="LA,SA", rtol=RTOL, v0=v0, seed=s)
        runs.append({"seed": s, "fpe": res.fpe, "hvps": res.hvps, "converged": res.converged,
                     "stop_reason": res.stop_reason, **errors(res, ref)})
    return summarise(runs)


def run_subset(op, ref, fraction, seeds, previous=None) -> dict:
    runs = []
    for s in seeds:
        found = subset_search(op, which="LA,SA", rtol=RTOL, fraction=fraction, previous=previous, seed=s)
        res = found.result
        runs.append({"seed": s, "fpe": res.fpe, "hvps": res.hvps, "converged": res.converged,
                     "stop_reason": res.stop_reason, "search_fpe": found.subset["fpe"],
                     "full_fpe": found.subset["full_fpe"], "n_samples": found.subset["n_samples"],
                     "angles_deg": {w: found.subset[n]["angles_deg"][0] for w, n in (("LA", "largest"), ("SA", "smallest"))},
                     **errors(res, ref)})
    return summarise(runs)


def alain_five_percent(model, data, ref) -> dict:
    """The fixed 5% subset's own extreme eigenpairs (tight float64 solve) against the full data's."""
    op = operator(model, data, torch.float64).subset(0.05)
    res = lanczos(op, which="LA,SA", tol=1e-10, max_hvps=min(op.n, 1500), seed=12345)
    out = {"n_samples": op.n_samples}
    for w, key in (("LA", "lambda_max"), ("SA", "lambda_min")):
        value = float(res.pairs[w].values[0])
        out[key] = value
        out[f"{key}_relative_difference"] = (value - ref[key]) / abs(ref[key])
        out[f"{key}_angle_deg"] = angles(res.pairs[w].vectors, ref["vectors"][w])[0]
    return out


def trained(name: str):
    """(model, data, epochs, the state after each SGD epoch, one more epoch at lr/100)."""
    factory, data_fn, epochs, lr = PROBLEMS[name]
    data = data_fn()
    model = factory()
    t0 = time.perf_counter()
    states = train_epochs(model, data, epochs, lr)
    settled = train_epochs(model, data, 1, lr / 100, seed=1)[0]     # one more at lr/100: a settled Hessian
    print(name, f"trained {epochs + 1} epochs in {time.perf_counter() - t0:.0f} s", flush=True)
    return model, data, epochs, states, settled


def warm_from_exact(op, ref, seeds) -> dict:
    """Plain warm vs warm + 5% subset when the previous vectors are this checkpoint's own."""
    return {"plain_warm": run_plain(op, ref, seeds, ref["vectors"]),
            "subset_warm_5_percent": run_subset(op, ref, 0.05, seeds, ref["vectors"])}


def cold(op, ref, seeds, fractions=FRACTIONS) -> dict:
    """Plain vs each subset fraction from a random start (what ``--subset auto`` chooses between)."""
    out = {"plain_cold": run_plain(op, ref, seeds),
           "subset_cold": {str(f): run_subset(op, ref, f, seeds) for f in fractions}}
    print("plain", out["plain_cold"]["fpe"], "subset", {f: r["fpe"] for f, r in out["subset_cold"].items()},
          flush=True)
    return out


#: the parts of a row ``--only`` reruns, each from the trained model and its reference: the
#: entries of the row it replaces
PARTS = {"warm_from_exact": lambda op, ref, seeds: {"warm_from_exact": warm_from_exact(op, ref, seeds)},
         "cold": cold}


def run(name: str, seeds: list[int], fractions=FRACTIONS) -> dict:
    model, data, epochs, states, settled = trained(name)
    model.load_state_dict(states[-2])
    prev_ref = reference(model, data)
    model.load_state_dict(states[-1])
    ref = reference(model, data)
    op = operator(model, data)
    row = {"problem": name, "n_params": op.n, "n_samples": op.n_samples, "epochs": epochs,
           "product_mode": op.mode, "dtype": "float32",
           "reference": {k: v for k, v in ref.items() if k != "vectors"},
           "ratio_max_over_abs_min": ref["lambda_max"] / abs(ref["lambda_min"]),
           "default_fraction": subset_fraction(op.n_samples),
           "eigenvector_overlap_with_previous_checkpoint": {
               w: float(abs(prev_ref["vectors"][w][:, 0] @ ref["vectors"][w][:, 0])) for w in ("LA", "SA")}}
    row.update(cold(op, ref, seeds, fractions))
    row["alain_5_percent"] = alain_five_percent(model, data, ref)
    previous = prev_ref["vectors"]
    row["plain_warm"] = run_plain(op, ref, seeds, previous)
    row["subset_warm_5_percent"] = run_subset(op, ref, 0.05, seeds, previous)
    print(name, "warm", row["plain_warm"]["fpe"], "warm+subset", row["subset_warm_5_percent"]["fpe"], flush=True)
    row["warm_from_exact"] = warm_from_exact(op, ref, seeds)
    # late training: from these eigenvectors to the next, settled checkpoint
    model.load_state_dict(settled)
    settled_ref = reference(model, data)
    settled_op = operator(model, data)
    row["settled"] = {
        "eigenvector_overlap": {w: float(abs(ref["vectors"][w][:, 0] @ settled_ref["vectors"][w][:, 0]))
                                for w in ("LA", "SA")},
        "plain_warm": run_plain(settled_op, settled_ref, seeds, ref["vectors"]),
        "subset_warm_5_percent": run_subset(settled_op, settled_ref, 0.05, seeds, ref["vectors"])}
    print(name, "settled: warm", row["settled"]["plain_warm"]["fpe"], "warm+subset",
          row["settled"]["subset_warm_5_percent"]["fpe"], flush=True)
    return row


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", default=",".join(PROBLEMS))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--only", choices=sorted(PARTS), help="rerun one part, keep the rest of each row (the row's "
                    "'reran' names the parts measured later than the rest)")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = []
    old = {r["problem"]: r for r in merged_rows("subset", [])}
    for name in args.problems.split(","):
        if args.only:
            model, data, _, states, _ = trained(name)
            model.load_state_dict(states[-1])
            part = PARTS[args.only](operator(model, data), reference(model, data), list(range(args.seeds)))
            rows.append({**old[name], **part, "reran": sorted({*old[name].get("reran", ()), args.only})})
        else:
            rows.append(run(name, list(range(args.seeds))))
        write("subset", {"rtol": RTOL, "fractions": list(FRACTIONS),
                         "default_rule": {"fraction": DEFAULT_FRACTION, "min_subset_samples": MIN_SUBSET_SAMPLES},
                         "rows": merged_rows("subset", rows)})


if __name__ == "__main__":
    main()
