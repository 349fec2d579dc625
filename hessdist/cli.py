"""``hessdist`` command line: ``hessdist eigs`` computes extreme eigenpairs of a full-dataset
loss Hessian (or GGN), on a local Ray cluster by default, an existing one with ``--address``,
or in-process with ``--workers 0``."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from .directions import curvature_along, line_scan, plot_curvatures, plot_line
from .errors import HessdistError, InputError
from .examples import EXAMPLES, cifar10_dir, get_example
from .hvp import CURVATURES, MODES, CurvatureOperator
from .imports import module_root, resolve
from .params import load_state
from .solvers.certify import solve
from .solvers.lanczos import draw_seed, lanczos
from .solvers.ritz import parse_which
from .solvers.slq import slq
from .solvers.trace import hutchinson, hutchpp


@dataclass
class Job:
    """What to differentiate: factories (callables or import paths), loss, trained state, notes."""

    model_factory: Any
    data_factory: Any
    loss: Any
    model: nn.Module
    import_paths: tuple[str, ...]
    data_note: str

    def runtime_env(self) -> dict | None:
        """Ray runtime_env that ships the user's own modules (not installed ones) to workers."""
        roots = sorted({r for r in (module_root(p) for p in self.import_paths) if r})
        return {"py_modules": roots} if roots else None


def load_checkpoint(path: str) -> dict[str, torch.Tensor]:
    """A state_dict from ``path`` (safely: ``weights_only=True``); a dict wrapping it under
    ``state_dict`` / ``model_state_dict`` / ``model`` is unwrapped."""
    if not os.path.isfile(path):
        raise InputError(f"checkpoint {path!r} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:          # torch raises several types for unreadable/unsafe files
        raise InputError(f"cannot load checkpoint {path!r} with weights_only=True ({exc}); save it with "
                         "torch.save(model.state_dict(), path)") from exc
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise InputError(f"checkpoint {path!r} holds a {type(state).__name__}, not a state_dict")
    return state


def build_job(args: argparse.Namespace, say: Callable[[str], None]) -> Job:
    if args.example:
        if args.model or args.data:
            raise InputError("give either --example or --model/--data, not both")
        ex = get_example(args.example, args.data_root, args.n_samples)
        model_factory, data_factory, loss, paths = ex.model, ex.data, args.loss or ex.loss, ()
        note = "real"
        if args.example == "resnet18-cifar" and cifar10_dir(args.data_root) is None:
            note = "SYNTHETIC CIFAR-shaped data (no CIFAR-10 under --data-root)"
            say(f"WARNING: CIFAR-10 not found under --data-root {args.data_root!r}; using {note}. "
                "Point --data-root at a folder with cifar-10-batches-py/ for real data.")
    else:
        if not (args.model and args.data):
            raise InputError("give --model MOD:FN and --data MOD:FN, or --example NAME "
                             f"(one of {sorted(EXAMPLES)})")
        model_factory, data_factory = args.model, args.data
        resolve(args.model), resolve(args.data)             # fail here, clearly, not on a worker
        loss = args.loss or "cross_entropy"
        paths = tuple(p for p in (args.model, args.data, loss) if ":" in p)
        ex, note = None, "user data"
    factory = resolve(model_factory) if isinstance(model_factory, str) else model_factory
    model = factory()
    if not isinstance(model, nn.Module):
        raise InputError(f"the model factory returned a {type(model).__name__}, not a torch.nn.Module")
    if args.checkpoint:
        load_state(model, load_checkpoint(args.checkpoint))
    elif ex is not None and ex.train is not None:
        say(f"training {args.example} briefly (deterministic full-batch Adam) ...")
        ex.train(model, ex.data())
    return Job(model_factory, data_factory, loss, model, paths, note)


class ProgressLine:
    """Products done, current extreme Ritz values and residuals, on stderr."""

    def __init__(self, max_hvps: int | None, stream=sys.stderr):
        self.max_hvps, self.stream, self.tty = max_hvps, stream, stream.isatty()

    def __call__(self, info: dict) -> None:
        parts = [f"hvps {info['hvps']}" + (f"/{self.max_hvps}" if self.max_hvps else ""),
                 f"fpe {info['fpe']:.2f}", f"{info['seconds']:.1f}s"] + ([info["phase"]] if "phase" in info else [])
        for which, (values, res) in ((w, info[w]) for w in ("LA", "SA", "LM") if w in info):
            if len(values):
                parts.append(f"{which} {values[0]:+.6g} (r {res[0]:.1e})")
        line = " | ".join(parts)
        if self.tty:
            self.stream.write("\r" + line.ljust(100))
        elif info["hvps"] % 10 == 0:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")


def operator_options(args: argparse.Namespace) -> dict:
    """The product options every operator (in-process, workers, service) is built with."""
    return {"curvature": args.curvature, "mode": args.mode, "batch_size": args.batch_size,
            "params": tuple(args.params.split(",")) if args.params else None, "compiled": args.compile,
            "channels_last": args.channels_last, "tf32": args.tf32}


def operator_spec(args: argparse.Namespace, job: Job):
    from .dist import OperatorSpec
    return OperatorSpec(model=job.model_factory, data=job.data_factory, loss=job.loss, dtype=args.dtype,
                        **operator_options(args))


def make_operator(args: argparse.Namespace, job: Job, say: Callable[[str], None]):
    """The in-process operator (``--workers 0``) or a worker group on Ray; returns
    (operator, cleanup function, description of the workers)."""
    if args.workers == 0:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        factory = resolve(job.data_factory) if isinstance(job.data_factory, str) else job.data_factory
        op = CurvatureOperator(job.model, job.loss, factory(), dtype=getattr(torch, args.dtype), device=device,
                               **operator_options(args))
        return op, (lambda: None), {"workers": 0, "device": device}
    from .dist import DistributedOperator, WorkerGroup, connect, default_workers
    workers = args.workers if args.workers is not None else default_workers()
    gpus = args.gpus_per_worker if args.gpus_per_worker is not None else (1 if torch.cuda.is_available() else 0)
    started = connect(args.address, num_cpus=max(os.cpu_count() or 1, workers), runtime_env=job.runtime_env())
    say(f"{'started a local Ray cluster' if started else 'joined the Ray cluster'}; "
        f"starting {workers} worker(s) ({gpus} GPU each) ...")
    group = WorkerGroup(operator_spec(args, job), workers, gpus_per_worker=gpus)
    op = DistributedOperator(group)
    op.set_parameters(job.model.state_dict())

    def cleanup():
        import ray
        group.shutdown()
        if started:
            ray.shutdown()

    return op, cleanup, {"workers": workers, "gpus_per_worker": gpus, "group": group}


def run_problem(args: argparse.Namespace, body: Callable[[Any, Job, Callable[[str], None]], tuple[dict, str, int]]) -> int:
    """The frame every analysis command shares: build the model and operator (local Ray cluster
    by default), check determinism, run ``body(op, job, say)`` → (results, table, exit code), add
    the problem's description, print the table, write ``--json``, and always release the workers."""
    say = (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    t0 = time.perf_counter()
    args.seed = draw_seed(args.seed)            # one seed for the whole run, reported in the JSON
    job = build_job(args, say)
    op, cleanup, info = make_operator(args, job, say)
    try:
        if not args.no_check:
            op.check_determinism(seed=args.seed)
        check_hvps = op.hvps
        out, table, code = body(op, job, say)
        group = info.pop("group", None)
        products = op.describe()
        out = {**out, "n_params": op.n, "n_samples": op.n_samples, **info, "check_hvps": check_hvps,
               "total_seconds": time.perf_counter() - t0, "curvature": args.curvature, "dtype": args.dtype,
               "mode": products.get("mode", args.mode), "products": products, "data": job.data_note,
               "example": args.example, "seed": args.seed,
               "workers_replaced": len(group.replacements) if group else 0}
    finally:
        cleanup()
    print(table)
    print(problem_line(out))
    if out["data"].startswith("SYNTHETIC"):
        print(f"NOTE: {out['data']}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)
        say(f"wrote {args.json}")
    return code


def problem_line(out: dict) -> str:
    return (f"{out['hvps']} products, {out['fpe']:.2f} full-data product equivalents (+{out['check_hvps']} for "
            f"the determinism check) in {out['seconds']:.2f} s; "
            f"n = {out['n_params']:,} parameters, N = {out['n_samples']:,} samples, {out['workers']} worker(s)"
            + (f"; {out['workers_replaced']} worker group rebuild(s)" if out["workers_replaced"] else "")
            + product_line(out.get("products") or {}))


def product_line(products: dict) -> str:
    if not products:
        return ""
    flags = [name for name in ("compiled", "channels_last", "tf32") if products.get(name)]
    memory = [f"{label} {products[key] / 2**20:,.0f} MiB" for key, label in
              (("peak_device_bytes", "device"), ("peak_host_rss_bytes", "host RSS")) if products.get(key)]
    return (f"\nproducts: {products['mode']}{' + ' + ', '.join(flags) if flags else ''}, micro-batch "
            f"{products['micro_batch']}; peak memory per worker: {', '.join(memory)}")


def load_vectors(path: str) -> dict[str, np.ndarray]:
    """Saved eigenvectors ({"largest": (n, k), "smallest": (n, k)}, the service's {"LA", "SA"},
    or one tensor), loaded with ``weights_only=True``; keys normalised to LA/SA/LM."""
    if not os.path.isfile(path):
        raise InputError(f"vector file {path!r} does not exist (write one with hessdist eigs --save-vectors)")
    data = torch.load(path, map_location="cpu", weights_only=True)
    if torch.is_tensor(data):
        data = {"LA": data if data.ndim == 2 else data[:, None]}
    if not isinstance(data, dict):
        raise InputError(f"{path!r} holds a {type(data).__name__}, not eigenvectors")
    return {END_KEYS.get(k, k): np.asarray(v, dtype=np.float64) for k, v in data.items()}


END_KEYS = {"largest": "LA", "smallest": "SA", "largest_magnitude": "LM"}


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
    """``--subset``: ``auto`` (search on a subset when the data are large enough for it to pay),
    ``off``, or a fraction."""
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
                       block=args.block, max_basis=args.max_basis, confidence=args.confidence, callback=progress)
        result, out = answer.result, answer.to_dict()
        if progress:
            progress.close()
        if args.save_vectors:
            torch.save({END_NAMES[w]: torch.from_numpy(p.vectors) for w, p in result.pairs.items()}, args.save_vectors)
            say(f"saved eigenvectors to {args.save_vectors}")
        out.update(warm_start=args.warm_start)
        return out, format_table(out), 0 if result.converged else 2

    return run_problem(args, body)


END_NAMES = {v: k for k, v in END_KEYS.items()}


def cmd_density(args: argparse.Namespace) -> int:
    def body(op, job, say):
        progress = None if args.quiet else (lambda i: say(f"probe {i['probe']}/{i['probes']}: {i['hvps']} products, "
                                                          f"{i['seconds']:.1f}s"))
        d = slq(op, probes=args.probes, steps=args.steps, seed=args.seed, callback=progress)
        grid, phi = d.density(sigma=args.sigma, points=args.points)
        out = {"grid": grid.tolist(), "density": phi.tolist(), "sigma": args.sigma or d.default_sigma(),
               "support": list(d.support), "moments": d.moments(3).tolist(), "probes": args.probes,
               "nodes": [t.tolist() for t in d.nodes], "weights": [w.tolist() for w in d.weights],
               "tridiagonals": [T.tolist() for T in d.tridiagonals], "hvps": d.hvps, "fpe": d.fpe,
               "seconds": d.seconds}
        if args.png:
            plot_density(grid, phi, args.png)
            say(f"wrote {args.png}")
        table = (f"spectral density from {args.probes} probes × {args.steps} steps: support "
                 f"[{d.support[0]:.6g}, {d.support[1]:.6g}], trace/n ≈ {out['moments'][1]:.6g}, "
                 f"σ = {out['sigma']:.3g}")
        return out, table, 0

    return run_problem(args, body)


def cmd_trace(args: argparse.Namespace) -> int:
    def body(op, job, say):
        estimator = hutchpp if args.method == "hutch++" else hutchinson
        est = estimator(op, hvps=args.hvps, block=args.block, seed=args.seed, confidence=args.confidence)
        out = est.to_dict()
        table = (f"trace ≈ {est.value:.8g} ± {est.std_error:.2g} (std. error); {100 * est.confidence:g}% interval "
                 f"[{est.interval[0]:.8g}, {est.interval[1]:.8g}] ({est.method}, {est.samples} samples)")
        return out, table, 0

    return run_problem(args, body)


def cmd_count(args: argparse.Namespace) -> int:
    lower = args.threshold if args.threshold is not None else args.lower
    if lower is None and args.upper is None:
        raise InputError("give --threshold T (count eigenvalues ≥ T) or an interval --lower A --upper B")

    def body(op, job, say):
        d = slq(op, probes=args.probes, steps=args.steps, seed=args.seed)
        c = d.count(-math.inf if lower is None else lower, math.inf if args.upper is None else args.upper,
                    confidence=args.confidence)
        out = {**c.to_dict(), "probes": args.probes, "steps": args.steps, "hvps": d.hvps, "fpe": d.fpe,
               "seconds": d.seconds}
        table = (f"eigenvalues in [{c.lower:.6g}, {c.upper:.6g}]: ≈ {c.estimate:.1f}; "
                 f"{100 * c.confidence:g}% interval [{c.interval[0]:.1f}, {c.interval[1]:.1f}] "
                 f"(probe std. error {c.probe_std_error:.2g}, boundary mass {c.boundary_mass:.2g})")
        return out, table, 0

    return run_problem(args, body)


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
        if args.png:
            plot_curvatures([os.path.basename(r["checkpoint"]) for r in rows], [r["curvature"] for r in rows], args.png)
            say(f"wrote {args.png}")
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
        if args.png:
            plot_line(scan, args.png, title=f"loss along {source}")
            say(f"wrote {args.png}")
        out = {**scan.to_dict(), "direction": source, "hvps": op.hvps - hvps0, "fpe": op.fpe - fpe0,
               "seconds": time.perf_counter() - t0}
        table = (f"along {source}: L(θ) = {scan.loss_at_theta:.6g}, gᵀv = {scan.slope:.3g}, vᵀHv = {scan.curvature:.6g}; "
                 f"α ∈ [{scan.alphas[0]:.3g}, {scan.alphas[-1]:.3g}]: largest |loss − quadratic model| = "
                 f"{out['max_model_gap']:.3g}")
        return out, table, 0

    return run_problem(args, body)


def plot_density(grid: np.ndarray, phi: np.ndarray, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.semilogy(grid, np.maximum(phi, 1e-12))
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density (Gaussian-smoothed)")
    ax.set_title("Hessian spectral density (SLQ)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cmd_serve(args: argparse.Namespace) -> int:
    from . import service
    from .dist import connect, default_workers
    job = build_job(args, lambda msg: print(msg, file=sys.stderr, flush=True))
    connect(args.address or "auto", runtime_env=job.runtime_env())
    spec = operator_spec(args, job)
    gpus = args.gpus_per_worker if args.gpus_per_worker is not None else (1 if torch.cuda.is_available() else 0)
    workers = args.workers if args.workers is not None else default_workers()
    out_dir = args.out_dir or os.path.join("hessdist-out", args.name)
    handle = service.start(args.name, spec, workers, out_dir, gpus_per_worker=gpus)
    print(json.dumps(handle.status(), indent=2))
    return 0


def cmd_manage(args: argparse.Namespace) -> int:
    from . import service
    handle = service.connect(args.name, args.address or "auto")
    if args.command == "status":
        print(json.dumps(handle.status(), indent=2))
    elif args.command == "scale":
        print(json.dumps(handle.scale(args.workers), indent=2))
    else:
        handle.stop()
        print(f"stopped service {args.name!r} and its workers")
    return 0


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


def add_problem_options(p: argparse.ArgumentParser) -> None:
    """Options that say which curvature of which model on which data."""
    p.add_argument("--example", choices=sorted(EXAMPLES), help="a built-in model+data pair")
    p.add_argument("--model", help="MOD:FN returning an nn.Module")
    p.add_argument("--data", help="MOD:FN returning a Dataset or (inputs, targets); may take rank, world_size")
    p.add_argument("--loss", help="cross_entropy (default), mse, or MOD:FN(outputs, targets) -> batch mean")
    p.add_argument("--checkpoint", help="state_dict file (loaded with weights_only=True)")
    p.add_argument("--data-root", default=os.environ.get("HESSDIST_DATA_ROOT", "data"),
                   help="folder holding cifar-10-batches-py/ (resnet18-cifar)")
    p.add_argument("--n-samples", type=int, help="use the first N samples (resnet18-cifar)")
    p.add_argument("--curvature", choices=CURVATURES, default="hessian")
    p.add_argument("--mode", choices=MODES, default="auto",
                   help="how products are computed (auto: the faster exact mode, timed on the first batch)")
    p.add_argument("--compile", action="store_true", help="torch.compile the batch product (pays off on long runs)")
    p.add_argument("--channels-last", action="store_true", help="NHWC convolution weights and image batches")
    p.add_argument("--tf32", action="store_true", help="TensorFloat-32 matmuls/convolutions (CUDA; lower precision)")
    p.add_argument("--dtype", choices=("float32", "float64", "bfloat16"), default="float32")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--params", help="comma-separated parameter names or patterns (default: all)")
    p.add_argument("--workers", type=int, help="Ray workers (default: one per GPU, else 2); 0 = in-process")
    p.add_argument("--gpus-per-worker", type=float)
    p.add_argument("--address", help="join a Ray cluster: auto or HOST:PORT (default: start a local one)")
    p.add_argument("--seed", type=int, help="random seed (default: drawn fresh; the JSON reports it)")
    p.add_argument("--json", help="write the results as JSON to this path")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.add_argument("--no-check", action="store_true", help="skip the determinism check (3 products)")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="hessdist", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
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
    p.add_argument("--max-basis", type=int, help="basis vectors kept before a thick restart (default: 4 GiB)")
    p.add_argument("--confidence", type=float, default=0.999, help="for the probabilistic 'nothing beyond' limits")
    p.add_argument("--warm-start", help="start from the eigenvectors in this file (from --save-vectors)")
    p.add_argument("--save-vectors", help="write the eigenvectors here (torch.save of {largest, smallest})")
    p.add_argument("--subset", default="auto", help="auto (default: search on a fixed 5%% of the data when there "
                   "are enough samples for it to pay, then certify on all of it), off, or a fraction")
    p.set_defaults(func=cmd_eigs)

    p = sub.add_parser("density", help="spectral density by stochastic Lanczos quadrature")
    add_problem_options(p)
    p.add_argument("--probes", type=int, default=10)
    p.add_argument("--steps", type=int, default=80, help="Lanczos steps (products) per probe")
    p.add_argument("--sigma", type=float, help="Gaussian smoothing width (default: support / steps)")
    p.add_argument("--points", type=int, default=1000, help="grid points")
    p.add_argument("--png", help="plot the density here")
    p.set_defaults(func=cmd_density)

    p = sub.add_parser("trace", help="trace of the curvature with an error bar")
    add_problem_options(p)
    p.add_argument("--method", choices=("hutch++", "hutchinson"), default="hutch++")
    p.add_argument("--hvps", type=int, default=60, help="products to spend")
    p.add_argument("--block", type=int, default=8, help="columns per product call")
    p.add_argument("--confidence", type=float, default=0.95)
    p.set_defaults(func=cmd_trace)

    p = sub.add_parser("count", help="number of eigenvalues above a threshold or in an interval (SLQ)")
    add_problem_options(p)
    p.add_argument("--threshold", type=float, help="count eigenvalues ≥ this (a numerical rank)")
    p.add_argument("--lower", type=float)
    p.add_argument("--upper", type=float)
    p.add_argument("--probes", type=int, default=10)
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--confidence", type=float, default=0.95)
    p.set_defaults(func=cmd_count)

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

    p = sub.add_parser("serve", help="start a named, detached eigen-service on a Ray cluster")
    add_problem_options(p)
    p.add_argument("--name", required=True)
    p.add_argument("--out-dir", help="history and eigenvectors (default hessdist-out/NAME)")
    p.set_defaults(func=cmd_serve)
    for name, text in (("status", "show a service's workers, queue and latest result"),
                       ("stop", "remove a service and its workers"),
                       ("scale", "replace a service's worker group by one of --workers workers")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--name", required=True)
        p.add_argument("--address", help="Ray cluster (default auto)")
        if name == "scale":
            p.add_argument("--workers", type=int, required=True)
        p.set_defaults(func=cmd_manage)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except HessdistError as exc:
        print(f"hessdist: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
