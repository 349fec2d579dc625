"""``hessdist`` command line: ``hessdist eigs`` computes extreme eigenpairs of a full-dataset
loss Hessian (or GGN), on a local Ray cluster by default, an existing one with ``--address``,
or in-process with ``--workers 0``."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from .errors import HessdistError, InputError
from .examples import EXAMPLES, cifar10_dir, get_example
from .hvp import CURVATURES, MODES, CurvatureOperator
from .imports import module_root, resolve
from .params import load_state
from .solvers.lanczos import lanczos, parse_which


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
                 f"{info['seconds']:.1f}s"]
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


def make_operator(args: argparse.Namespace, job: Job, say: Callable[[str], None]):
    """The in-process operator (``--workers 0``) or a worker group on Ray; returns
    (operator, cleanup function, description of the workers)."""
    dtype = getattr(torch, args.dtype)
    params = args.params.split(",") if args.params else None
    if args.workers == 0:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        factory = resolve(job.data_factory) if isinstance(job.data_factory, str) else job.data_factory
        op = CurvatureOperator(job.model, job.loss, factory(), curvature=args.curvature, mode=args.mode,
                               batch_size=args.batch_size, dtype=dtype, device=device, params=params)
        return op, (lambda: None), {"workers": 0, "device": device}
    from .dist import DistributedOperator, OperatorSpec, WorkerGroup, connect, default_workers
    workers = args.workers if args.workers is not None else default_workers()
    gpus = args.gpus_per_worker if args.gpus_per_worker is not None else (1 if torch.cuda.is_available() else 0)
    started = connect(args.address, num_cpus=max(os.cpu_count() or 1, workers), runtime_env=job.runtime_env())
    say(f"{'started a local Ray cluster' if started else 'joined the Ray cluster'}; "
        f"starting {workers} worker(s) ({gpus} GPU each) ...")
    spec = OperatorSpec(model=job.model_factory, data=job.data_factory, loss=job.loss,
                        curvature=args.curvature, mode=args.mode, batch_size=args.batch_size,
                        dtype=args.dtype, params=tuple(params) if params else None)
    group = WorkerGroup(spec, workers, gpus_per_worker=gpus)
    op = DistributedOperator(group)
    op.set_parameters(job.model.state_dict())

    def cleanup():
        import ray
        group.shutdown()
        if started:
            ray.shutdown()

    return op, cleanup, {"workers": workers, "gpus_per_worker": gpus, "group": group}


def cmd_eigs(args: argparse.Namespace) -> int:
    say = (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    which = parse_which(args.which)
    t0 = time.perf_counter()
    job = build_job(args, say)
    op, cleanup, info = make_operator(args, job, say)
    try:
        if args.k > op.n:
            raise InputError(f"--k {args.k} exceeds the number of parameters n = {op.n}")
        if not args.no_check:
            op.check_determinism(seed=args.seed)
        check_hvps = op.hvps
        progress = None if args.quiet else ProgressLine(args.max_hvps)
        result = lanczos(op, which=which, k=args.k, tol=args.tol, max_hvps=args.max_hvps,
                         budget_s=args.budget_s, seed=args.seed, return_vectors=False, callback=progress)
        if progress:
            progress.close()
        group = info.pop("group", None)
        out = {**result.to_dict(), "n_params": op.n, "n_samples": op.n_samples, **info,
               "check_hvps": check_hvps, "total_seconds": time.perf_counter() - t0,
               "curvature": args.curvature, "dtype": args.dtype, "mode": args.mode, "tol": args.tol,
               "data": job.data_note, "example": args.example,
               "workers_replaced": len(group.replacements) if group else 0}
    finally:
        cleanup()
    print(format_table(out))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)
        say(f"wrote {args.json}")
    return 0 if result.converged else 2


def cmd_serve(args: argparse.Namespace) -> int:
    from . import service
    from .dist import OperatorSpec, connect, default_workers
    job = build_job(args, lambda msg: print(msg, file=sys.stderr, flush=True))
    connect(args.address or "auto", runtime_env=job.runtime_env())
    spec = OperatorSpec(model=job.model_factory, data=job.data_factory, loss=job.loss,
                        curvature=args.curvature, mode=args.mode, batch_size=args.batch_size,
                        dtype=args.dtype, params=tuple(args.params.split(",")) if args.params else None)
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


def format_table(out: dict) -> str:
    lines = [f"{'end':<9}{'i':>3}  {'eigenvalue':>16}  {'residual':>10}  {'bound':>10}  converged"]
    for end in ("largest", "smallest", "largest_magnitude"):
        if end not in out:
            continue
        for i, value in enumerate(out[end]):
            lines.append(f"{end[:8]:<9}{i:>3}  {value:>16.9g}  {out['residual_norms'][end][i]:>10.2e}  "
                         f"{out['error_bounds'][end][i]:>10.2e}  {'yes' if out['converged_pairs'][end][i] else 'NO'}")
    lines.append(f"{out['hvps']} products (+{out['check_hvps']} for the determinism check) in "
                 f"{out['seconds']:.2f} s; n = {out['n_params']:,} parameters, N = {out['n_samples']:,} "
                 f"samples, {out['workers']} worker(s); stopped: {out['stop_reason']}"
                 + (f"; {out['workers_replaced']} worker group rebuild(s)" if out["workers_replaced"] else ""))
    if not out["converged"]:
        lines.append("WARNING: not every pair met --tol; the values above are estimates within their residuals")
    if out["data"].startswith("SYNTHETIC"):
        lines.append(f"NOTE: {out['data']}")
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
    p.add_argument("--mode", choices=MODES, default="forward", help="how products are computed")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--params", help="comma-separated parameter names or patterns (default: all)")
    p.add_argument("--workers", type=int, help="Ray workers (default: one per GPU, else 2); 0 = in-process")
    p.add_argument("--gpus-per-worker", type=float)
    p.add_argument("--address", help="join a Ray cluster: auto or HOST:PORT (default: start a local one)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the results as JSON to this path")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="hessdist", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("eigs", help="extreme eigenvalues of the full-dataset loss Hessian")
    add_problem_options(p)
    p.add_argument("--which", default="LA,SA", help="LA (largest), SA (smallest), LM; comma-separated")
    p.add_argument("--k", type=int, default=1, help="pairs per end")
    p.add_argument("--tol", type=float, default=1e-4, help="residual tolerance relative to max|λ|")
    p.add_argument("--max-hvps", type=int, help="stop after this many products")
    p.add_argument("--budget-s", type=float, help="stop before this many seconds")
    p.add_argument("--no-check", action="store_true", help="skip the determinism check (3 products)")
    p.set_defaults(func=cmd_eigs)

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
