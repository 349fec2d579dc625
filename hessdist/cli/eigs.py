"""``hessdist eigs``: extreme eigenpairs with per-value accuracy, on the default path (warm
start, subset search and full-data certification; see :func:`hessdist.solvers.certify.solve`)."""
from __future__ import annotations

import argparse

import torch

from ..errors import InputError
from ..solvers.certify import solve
from ..solvers.ritz import parse_which
from .common import END_NAMES, ProgressLine, add_problem_options, load_vectors, run_problem

def parse_rtol(text: str | None) -> float | dict[str, float] | None:
    """``--rtol``: one number for every end (``0.01``) or one per end (``LA=0.01,SA=0.05``)."""
    if text is None:
        return None
    try:
        if "=" not in text:
            return float(text)
        return {end.strip().upper(): float(value) for end, value in (part.split("=") for part in text.split(","))}
    except ValueError:
        raise InputError(f"--rtol takes a number (0.01) or one per end (LA=0.01,SA=0.05), got {text!r}") from None


def parse_subset(text: str) -> float | str | None:
    """``--subset``: ``off``, a fraction, or ``auto`` (a subset search on a cold start when the
    data are large enough)."""
    if text in ("auto", "off"):
        return None if text == "off" else text
    try:
        return float(text)
    except ValueError:
        raise InputError(f"--subset takes auto, off or a fraction such as 0.05, got {text!r}") from None


def cmd_eigs(args: argparse.Namespace) -> int:
    which = parse_which(args.which)
    warm = load_vectors(args.warm_start) if args.warm_start else None
    rtol, subset = parse_rtol(args.rtol), parse_subset(args.subset)
    tol = args.tol if args.tol is not None or rtol is not None else 1e-4

    def body(op, job, say):
        if args.k > op.n:
            raise InputError(f"--k {args.k} exceeds the number of parameters n = {op.n}")
        progress = None if args.quiet else ProgressLine(args.max_hvps)
        answer = solve(op, which=which, k=args.k, tol=tol, rtol=rtol, previous=warm, subset=subset,
                       max_hvps=args.max_hvps, max_fpe=args.max_fpe, budget_s=args.budget_s, seed=args.seed,
                       block=args.block, max_basis=args.max_basis, basis_dtype=getattr(torch, args.basis_dtype),
                       confidence=args.confidence, callback=progress)
        result, out = answer.result, answer.to_dict()
        if progress:
            progress.close()
        if args.save_vectors:
            torch.save({END_NAMES[w]: torch.from_numpy(p.vectors) for w, p in result.pairs.items()}, args.save_vectors)
            say(f"saved eigenvectors to {args.save_vectors}")
        out.update(warm_start=args.warm_start)
        return out, format_table(out), 0 if result.converged else 2

    return run_problem(args, body)


MET = {"rtol": "rtol", "tol": "tol", None: "NO"}


def format_table(out: dict) -> str:
    lines = [f"{'end':<9}{'i':>3}  {'eigenvalue':>16}  {'residual':>10}  {'r/|θ|':>9}  {'interval':>32}  met"]
    floored = False
    for end in ("largest", "smallest", "largest_magnitude"):
        if end not in out:
            continue
        for i, value in enumerate(out[end]):
            lo, hi = (("-inf" if b is None and j == 0 else "inf" if b is None else f"{b:.9g}")
                      for j, b in enumerate(out["intervals"][end][i]))
            width = out["relative_widths"][end][i]
            met = out["met"][end][i]
            floored |= met == "tol" and bool(out["accuracy"].get("rtol"))
            lines.append(f"{end[:8]:<9}{i:>3}  {value:>16.9g}  {out['residual_norms'][end][i]:>10.2e}  "
                         f"{'inf' if width is None else f'{width:.1e}':>9}  {'[' + lo + ', ' + hi + ']':>32}  {MET[met]}")
    for end, limit in out.get("limits", {}).items():
        lines.append(f"with probability ≥ {out['confidence']}: no eigenvalue {'above' if end == 'largest' else 'below'} "
                     f"{limit:.9g}")
    lines.append(f"stopped: {out['stop_reason']}" + (f" after {out['restarts']} thick restart(s)" if out.get("restarts") else ""))
    if floored:
        lines.append(f"met 'tol': a value too close to 0 for relative accuracy, within tol·max|θ| "
                     f"({out['accuracy']['tol']:g}·max|θ|) instead")
    if out.get("subset"):
        sub = out["subset"]
        lines.append(f"searched on {100 * sub['data_fraction']:.3g}% of the data ({sub['n_samples']:,} samples, "
                     f"{sub['fpe']:.2f} FPE), certified on all of it ({sub['full_fpe']:.0f} FPE)")
    if not out["converged"]:
        lines.append("WARNING: not every pair met the accuracy asked for; the values above are estimates within "
                     "their intervals")
    return "\n".join(lines)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eigs", help="extreme eigenvalues of the full-dataset loss Hessian")
    add_problem_options(p)
    p.add_argument("--which", default="LA,SA", help="LA (largest), SA (smallest), LM; comma-separated")
    p.add_argument("--k", type=int, default=1, help="pairs per end")
    p.add_argument("--rtol", help="accuracy per value: residual ≤ RTOL·|λ| (0.01, or per end: LA=0.01,SA=0.05)")
    p.add_argument("--tol", type=float, help="residual ≤ TOL·max|λ| (default 1e-4; with --rtol the floor for "
                   "values near 0, default 1e-6)")
    p.add_argument("--max-hvps", type=int, help="stop after this many products (never exceeded)")
    p.add_argument("--max-fpe", type=float, help="stop after this many full-data product equivalents (never exceeded)")
    p.add_argument("--budget-s", type=float, help="stop before this many seconds")
    p.add_argument("--block", type=int, help="columns per product call (default: the start block's width)")
    p.add_argument("--max-basis", type=int, help="basis vectors kept before a thick restart (default: half "
                   "a GPU's free memory, or 4 GiB of host memory, per worker; the basis is sharded, so W "
                   "workers keep W times as many)")
    p.add_argument("--basis-dtype", choices=("float64", "float32"), default="float64",
                   help="float32: twice the basis vectors in the same memory (pairs confirmed with real products)")
    p.add_argument("--confidence", type=float, default=0.999, help="for the probabilistic 'nothing beyond' limits")
    p.add_argument("--warm-start", help="start from the eigenvectors in this file (from --save-vectors)")
    p.add_argument("--save-vectors", help="write the eigenvectors here (torch.save of {largest, smallest})")
    p.add_argument("--subset", default="off", help="off (default), a fraction (search on it first, then certify "
                   "on all the data), or auto (5%% on a cold start with enough samples)")
    p.set_defaults(func=cmd_eigs)
