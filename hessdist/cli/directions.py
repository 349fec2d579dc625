"""``hessdist curvature | line``: the curvature along a saved direction over checkpoints, and the
loss along a direction against its quadratic model."""
from __future__ import annotations

import argparse
import os
import time

import numpy as np

from ..directions import curvature_along, line_scan, plot_curvatures, plot_line
from ..errors import InputError
from ..solvers.lanczos import lanczos
from ..solvers.ritz import parse_which
from .common import END_KEYS, add_problem_options, load_checkpoint, load_vectors, run_problem, write_png

def pick_direction(args: argparse.Namespace) -> np.ndarray:
    end, _, index = args.vector.partition(":")
    vectors = load_vectors(args.direction)
    end = END_KEYS.get(end, end)
    if end not in vectors:
        raise InputError(f"{args.direction!r} holds {sorted(vectors)}, not {args.vector!r}")
    block = vectors[end]
    i = int(index or 0)
    if not 0 <= i < block.shape[1]:
        raise InputError(f"{args.direction!r} holds {block.shape[1]} {end} vector(s); --vector index {i} is out of range")
    return block[:, i]


def cmd_curvature(args: argparse.Namespace) -> int:
    direction = pick_direction(args)

    def body(op, job, say):
        rows, t0, hvps0, fpe0 = [], time.perf_counter(), op.hvps, op.fpe
        for path in args.checkpoints or [None]:
            if path is not None:
                op.set_parameters(load_checkpoint(path))
            rows.append({"checkpoint": path or "(model as given)", "curvature": curvature_along(op, direction)})
            say(f"{rows[-1]['checkpoint']}: vᵀHv = {rows[-1]['curvature']:.8g}")
        write_png(args.png, lambda path: plot_curvatures([os.path.basename(r["checkpoint"]) for r in rows],
                                                         [r["curvature"] for r in rows], path), say)
        out = {"direction": args.direction, "vector": args.vector, "curvatures": rows,
               "hvps": op.hvps - hvps0, "fpe": op.fpe - fpe0, "seconds": time.perf_counter() - t0}
        table = "\n".join(f"{r['checkpoint']:<40} vᵀHv = {r['curvature']:+.8g}" for r in rows)
        return out, table, 0

    return run_problem(args, body)


def cmd_line(args: argparse.Namespace) -> int:
    def body(op, job, say):
        t0, hvps0, fpe0 = time.perf_counter(), op.hvps, op.fpe
        if args.direction:
            direction, source = pick_direction(args), f"{args.direction} [{args.vector}]"
        else:
            which = parse_which(args.which)[0]
            say(f"computing the {which} eigenvector first ...")
            res = lanczos(op, which=which, k=1, tol=args.tol, seed=args.seed)
            direction, source = res.pairs[which].vectors[:, 0], f"{which} eigenvector (λ = {res.pairs[which].values[0]:.6g})"
        alphas = None
        if args.alphas:
            lo, hi, count = args.alphas.split(",")
            alphas = np.linspace(float(lo), float(hi), int(count))
        scan = line_scan(op, direction, alphas)
        write_png(args.png, lambda path: plot_line(scan, path, title=f"loss along {source}"), say)
        out = {**scan.to_dict(), "direction": source, "hvps": op.hvps - hvps0, "fpe": op.fpe - fpe0,
               "seconds": time.perf_counter() - t0}
        table = (f"along {source}: L(θ) = {scan.loss_at_theta:.6g}, gᵀv = {scan.slope:.3g}, vᵀHv = {scan.curvature:.6g}; "
                 f"α ∈ [{scan.alphas[0]:.3g}, {scan.alphas[-1]:.3g}]: largest |loss − quadratic model| = "
                 f"{out['max_model_gap']:.3g}")
        return out, table, 0

    return run_problem(args, body)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("curvature", help="vᵀH(θ)v of a saved direction at one or more checkpoints")
    add_problem_options(p)
    p.add_argument("--direction", required=True, help="vector file (from eigs --save-vectors or the service)")
    p.add_argument("--vector", default="largest:0", help="which saved vector: END:INDEX (default largest:0)")
    p.add_argument("--checkpoints", nargs="+", help="state_dict files to evaluate at (default: --checkpoint/the model)")
    p.add_argument("--png", help="plot the curvatures here")
    p.set_defaults(func=cmd_curvature)

    p = sub.add_parser("line", help="loss along a direction against its quadratic model")
    add_problem_options(p)
    p.add_argument("--direction", help="vector file; default: compute the --which eigenvector first")
    p.add_argument("--vector", default="largest:0", help="which saved vector: END:INDEX")
    p.add_argument("--which", default="SA", help="eigenvector to compute when no --direction (LA or SA)")
    p.add_argument("--tol", type=float, default=1e-4)
    p.add_argument("--alphas", help="MIN,MAX,COUNT (default: where the quadratic term ≈ the loss)")
    p.add_argument("--png", help="plot loss and model here")
    p.set_defaults(func=cmd_line)
