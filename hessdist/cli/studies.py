"""``hessdist verify | decompose | rank | along | subset``: the seeds' studies, one command each
(:mod:`hessdist.studies`), in-process or on Ray workers with the same numbers."""
from __future__ import annotations

import argparse
import os
from typing import Callable

import numpy as np

from ..data import load_shard
from ..errors import InputError
from ..imports import resolve
from ..solvers.lanczos import lanczos
from ..studies.along import SCALES, along, plot_along
from ..studies.decompose import CURVATURES, decompose, plot_decomposition
from ..studies.rank import EXACT_MAX_N, rank
from ..studies.subset_vs_full import compare_subset, plot_subset
from ..studies.verify import MAX_N, check_size, reference_hessian, verify
from .common import add_problem_options, load_checkpoint, load_vectors, run_problem, write_png


def every_tenth(total: int, what: str, say) -> Callable[[int], None]:
    """A progress callback that says ``done/total what`` each time another tenth is done."""
    shown = [0]

    def progress(done: int) -> None:
        if done * 10 // total > shown[0] or done == total:
            shown[0] = done * 10 // total
            say(f"  {done:,}/{total:,} {what}")

    return progress


def cmd_verify(args: argparse.Namespace) -> int:
    def body(op, job, say):
        check_size(op.n, args.max_n)                       # before the reference, which costs as much
        reference = None
        if args.curvature == "hessian":
            say(f"the float64 reference: torch.func.hessian of the full-data loss (n = {op.n}) ...")
            factory = resolve(job.data_factory) if isinstance(job.data_factory, str) else job.data_factory
            params = tuple(args.params.split(",")) if args.params else None
            data = load_shard(factory, 0, 1)
            reference = reference_hessian(job.model, job.loss, data, params,
                                          callback=every_tenth(op.n_samples, "samples", say))
        say(f"the dense matrix from {op.n} products of unit vectors ...")
        out = verify(op, k=args.k, tol=args.tol, seed=args.seed, reference=reference, max_n=args.max_n,
                     callback=every_tenth(op.n, "columns", say))
        out.update(hvps=op.hvps, fpe=op.fpe, seconds=out["dense_seconds"])
        lines = [f"asymmetry ‖M − Mᵀ‖/‖M‖ = {out['asymmetry']:.2e}"]
        if reference is not None:
            lines.append(f"products against torch.func.hessian (float64): ‖M − H‖/‖H‖ = {out['product_error']:.2e}, "
                         f"largest entry error {out['product_max_error']:.2e} of the largest entry")
        else:
            lines.append(f"no torch.func reference for the {args.curvature} (Hessian only): eigh of the products' matrix")
        for end, e in out["ends"].items():
            for i, (s, x, inside) in enumerate(zip(e["solver"], e["eigh"], e["eigh_in_interval"])):
                lines.append(f"{end}[{i}]  solver {s:+.10g}  eigh {x:+.10g}  rel. error {abs(s - x) / abs(x):.1e}  "
                             f"eigh in the certified interval: {'yes' if inside else 'NO'}")
        lines.append("PASSED: every certified interval holds eigh's value" if out["passed"] else
                     "FAILED: a certified interval misses eigh's value")
        for miss in out["misses"]:
            if miss["copies"] > 1:
                lines.append(f"  {miss['end']}[{miss['index']}]: eigh has {miss['copies']} copies of λ = "
                             f"{miss['eigh']:.6g}; one Krylov vector finds only the copies rounding lets it see: "
                             f"ask for fewer pairs, or solve with a block of ≥ {miss['copies']} columns (eigs --block)")
        return out, "\n".join(lines), 0 if out["passed"] else 3

    return run_problem(args, body)


def cmd_decompose(args: argparse.Namespace) -> int:
    def body(op, job, say):
        points = [(os.path.basename(p), load_checkpoint(p)) for p in args.checkpoints] if args.checkpoints else \
            [("(model as given)", None)]
        def progress(label, rows):
            say(f"{label}: " + ", ".join(f"{c} λ ∈ [{r['smallest']:.4g}, {r['largest']:.4g}] tr {r['trace']:.4g}"
                                         for c, r in rows.items()))

        rows = decompose(op, points, tol=args.tol, trace_hvps=args.trace_hvps, seed=args.seed, callback=progress)
        write_png(args.png, lambda path: plot_decomposition(rows, path), say)
        parts = [r for point in rows for r in point["curvatures"].values()]
        out = {"checkpoints": rows, "tol": args.tol, "trace_hvps": args.trace_hvps,
               "hvps": sum(r["hvps"] for r in parts), "fpe": sum(r["fpe"] for r in parts),
               "seconds": sum(r["seconds"] for r in parts)}
        table = []
        for point in rows:
            table.append(f"{point['checkpoint']}:")
            for c in CURVATURES:
                r = point["curvatures"][c]
                table.append(f"  {c:<17} λ_max {r['largest']:+.6g}  λ_min {r['smallest']:+.6g}  trace {r['trace']:+.6g} "
                             f"[{r['trace_interval'][0]:.4g}, {r['trace_interval'][1]:.4g}]")
        return out, "\n".join(table), 0

    return run_problem(args, body)


def cmd_rank(args: argparse.Namespace) -> int:
    def body(op, job, say):
        out = rank(op, threshold=args.threshold, relative=args.relative, method=args.method,
                   exact_max_n=args.exact_max_n, probes=args.probes, steps=args.steps, confidence=args.confidence,
                   seed=args.seed)
        table = (f"|λ| > {out['threshold']:.4g}: {out['positive']:.1f} positive + {out['negative']:.1f} negative = "
                 f"{out['rank']:.1f} of n = {out['n']:,}; "
                 + ("exact" if out["method"] == "exact" else
                    f"{100 * out['confidence']:g}% interval [{out['interval'][0]:.1f}, {out['interval'][1]:.1f}]")
                 + f" ({out['how']})")
        return out, table, 0

    return run_problem(args, body)


def scales(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise InputError(f"--scales takes comma-separated positive numbers, got {text!r}") from None
    if any(not v > 0 for v in values):
        raise InputError(f"every --scales value must be > 0 (α runs over [−scale, scale]), got {text!r}")
    return values


def cmd_along(args: argparse.Namespace) -> int:
    chosen = scales(args.scales)

    def body(op, job, say):
        if args.vectors:
            vectors = {}
            for end, V in load_vectors(args.vectors).items():
                V = V[:, :args.k] if V.ndim == 2 else V
                if V.ndim != 2 or V.shape[0] != op.n:
                    raise InputError(f"{args.vectors!r} holds {end} vectors of shape {V.shape}; the model has "
                                     f"n = {op.n} parameters (saved for the same model and --params?)")
                AV = np.asarray(op.matmat(V))               # eigenvalues of saved vectors: Rayleigh quotients
                vectors[end] = (np.einsum("ij,ij->j", V, AV) / np.einsum("ij,ij->j", V, V), V)
            source = args.vectors
        else:
            say(f"computing LA({args.k}) and SA({args.k}) first ...")
            res = lanczos(op, which="LA,SA", k=args.k, tol=args.tol, seed=args.seed)
            vectors = {end: (p.values, p.vectors) for end, p in res.pairs.items()}
            source = f"a solve (tol {args.tol})"

        def progress(end, i, r):
            fits = ", ".join(f"{y:.4g} at ±{a}" for a, y in r["fitted_curvature"].items())
            say(f"{end}[{i}] λ = {r['eigenvalue']:.4g}: α* = {r['optimal_step']:.4g}, "
                f"improvement {r['best_improvement']:.3g}, fitted curvature {fits}")

        out = along(op, vectors, scales=chosen, points=args.points, scaled=not args.unscaled, xtol=args.xtol,
                    callback=progress)
        if args.png:
            for path in plot_along(out, args.png):
                say(f"wrote {path}")
        out.update(vectors_from=source, hvps=op.hvps, fpe=op.fpe)
        table = "\n".join(
            f"{end}[{i}] λ {r['eigenvalue']:+.6g}  gᵀv {r['slope']:+.3g}  fitted "
            + " ".join(f"{r['fitted_curvature'][str(a)]:+.4g}@±{a:g}" for a in chosen)
            + f"  α* {r['optimal_step']:.4g}  improvement {r['best_improvement']:.3g}  ({r['loss_evaluations']} losses)"
            for end, rows in out["ends"].items() for i, r in enumerate(rows))
        return out, table, 0

    return run_problem(args, body)


def cmd_subset(args: argparse.Namespace) -> int:
    def body(op, job, say):
        out = compare_subset(op, fraction=args.fraction, k=args.k, tol=args.tol, seed=args.seed)
        write_png(args.png, lambda path: plot_subset(out, path), say)
        table = "\n".join(
            f"{end}[{i}] full {f:+.6g}  subset {s:+.6g}  rel. diff {d:+.2e}  angle {a:5.1f}° (best match {b:5.1f}°)"
            for end, e in out["ends"].items()
            for i, (f, s, d, a, b) in enumerate(zip(e["full"], e["subset"], e["relative_difference"], e["angle_deg"],
                                                    e["best_match_angle_deg"])))
        return out, f"{out['subset_samples']:,} of {out['samples']:,} samples:\n{table}", 0

    return run_problem(args, body)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("verify", help="check the products and the solver against a dense matrix and eigh (small n)")
    add_problem_options(p)
    p.add_argument("--max-n", type=int, default=MAX_N, help=f"refuse models with more parameters (default {MAX_N})")
    p.add_argument("--k", type=int, default=3, help="eigenvalues per end to compare")
    p.add_argument("--tol", type=float, help="the solver's (default 1e-8 for float64 products, else 1e-5)")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("decompose", help="λ_max, λ_min, trace of H, G (GGN), S = H − G and the empirical Fisher")
    add_problem_options(p)
    p.add_argument("--checkpoints", nargs="+", help="state_dict files (default: --checkpoint / the model)")
    p.add_argument("--tol", type=float, default=1e-3, help="residual ≤ tol·‖A‖ for each matrix's extremes")
    p.add_argument("--trace-hvps", type=int, default=60, help="products per Hutch++ trace")
    p.add_argument("--png", help="plot the decomposition over the checkpoints here")
    p.set_defaults(func=cmd_decompose)

    p = sub.add_parser("rank", help="numerical rank: eigenvalues with |λ| > τ, on each side of zero")
    add_problem_options(p)
    p.add_argument("--threshold", type=float, help="τ (absolute)")
    p.add_argument("--relative", type=float, help="τ = RELATIVE × λ_max")
    p.add_argument("--method", choices=("auto", "exact", "slq"), default="auto",
                   help="exact: eigh of the dense matrix (n products); auto: exact for n ≤ --exact-max-n")
    p.add_argument("--exact-max-n", type=int, default=EXACT_MAX_N)
    p.add_argument("--probes", type=int, default=10)
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--confidence", type=float, default=0.95)
    p.set_defaults(func=cmd_rank)

    p = sub.add_parser("along", help="loss along each extreme eigenvector vs its quadratic model, fits, optimal steps")
    add_problem_options(p)
    p.add_argument("--k", type=int, default=5, help="eigenvectors per end (LA and SA)")
    p.add_argument("--vectors", help="saved eigenvectors (eigs --save-vectors) instead of a solve")
    p.add_argument("--tol", type=float, default=1e-5)
    p.add_argument("--scales", default=",".join(map(str, SCALES)), help="α ranges ±a, comma-separated (default 0.1,1)")
    p.add_argument("--points", type=int, default=21, help="α values per scale")
    p.add_argument("--unscaled", action="store_true", help="step θ − αv instead of the paper's θ − α(gᵀv)v")
    p.add_argument("--xtol", type=float, default=1e-3, help="line search tolerance, relative in α")
    p.add_argument("--png", help="figure prefix: writes PREFIX-lines/-fits/-steps/-improvement.png")
    p.set_defaults(func=cmd_along)

    p = sub.add_parser("subset", help="LA(k), SA(k) on a fixed data fraction against all the data")
    add_problem_options(p)
    p.add_argument("--fraction", type=float, default=0.05)
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--tol", type=float, default=1e-4)
    p.add_argument("--png", help="plot eigenvalues and angles here")
    p.set_defaults(func=cmd_subset)
