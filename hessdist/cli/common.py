"""What every ``hessdist`` command shares: the model/data/loss job, the operator (in-process or
a Ray worker group), the run frame (determinism check, JSON, table, cleanup), checkpoints and
saved vectors, and the progress line."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ..batch_products import CURVATURES, MODES
from ..curvature import CurvatureOperator
from ..data import PLACEMENTS
from ..errors import InputError
from ..examples import EXAMPLES, cifar10_dir, get_example
from ..imports import module_root, resolve
from ..objective import BatchLoss
from ..params import load_state
from ..solvers.starts import draw_seed

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


def job_loss(args: argparse.Namespace, default: Any) -> Any:
    """``--loss`` (pairs contract), or ``--batch-loss``/``--batch-samples`` (any batch)."""
    if args.batch_samples and not args.batch_loss:
        raise InputError("--batch-samples counts the samples a --batch-loss averages over; give --batch-loss too")
    if not args.batch_loss:
        return args.loss or default
    if args.loss:
        raise InputError("give --loss (a loss of outputs and targets) or --batch-loss (a loss of model and batch), "
                         "not both")
    return BatchLoss(args.batch_loss, args.batch_samples)


def build_job(args: argparse.Namespace, say: Callable[[str], None]) -> Job:
    if args.example:
        if args.model or args.data:
            raise InputError("give either --example or --model/--data, not both")
        ex = get_example(args.example, args.data_root, args.n_samples)
        model_factory, data_factory, loss, paths = ex.model, ex.data, job_loss(args, ex.loss), ()
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
        loss = job_loss(args, "cross_entropy")
        paths = tuple(p for p in (args.model, args.data, args.loss, args.batch_loss, args.batch_samples)
                      if p and ":" in p)
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
            "channels_last": args.channels_last, "tf32": args.tf32, "placement": args.data_placement,
            "loader_workers": args.loader_workers}


def operator_spec(args: argparse.Namespace, job: Job):
    from ..workers import OperatorSpec
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
    from ..workers import DistributedOperator, WorkerGroup, connect, worker_layout
    started = connect(args.address, num_cpus=max(os.cpu_count() or 1, args.workers or 2),
                      runtime_env=job.runtime_env())
    workers, gpus, chosen = worker_layout(args.workers, args.gpus_per_worker)
    say(f"{'started a local Ray cluster' if started else 'joined the Ray cluster'}; starting {chosen} ...")
    group = WorkerGroup(operator_spec(args, job), workers, gpus_per_worker=gpus, min_workers=args.min_workers,
                        grow_timeout_s=args.grow_timeout)
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


END_KEYS = {"largest": "LA", "smallest": "SA", "largest_magnitude": "LM"}


END_NAMES = {v: k for k, v in END_KEYS.items()}


def write_png(path: str | None, draw: Callable[[str], None], say: Callable[[str], None]) -> None:
    """``draw(path)`` and say so, when a --png path was given."""
    if path:
        draw(path)
        say(f"wrote {path}")


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


def add_problem_options(p: argparse.ArgumentParser) -> None:
    """Options that say which curvature of which model on which data."""
    p.add_argument("--example", choices=sorted(EXAMPLES), help="a built-in model+data pair")
    p.add_argument("--model", help="MOD:FN returning an nn.Module")
    p.add_argument("--data", help="MOD:FN returning a Dataset or (inputs, targets); may take rank, world_size")
    p.add_argument("--loss", help="cross_entropy (default), mse, or MOD:FN(outputs, targets) -> batch mean")
    p.add_argument("--batch-loss", help="for batches of any shape (dicts, keyword models): model_loss "
                   "(model(**batch).loss) or MOD:FN(model, batch) -> mean over the batch's samples")
    p.add_argument("--batch-samples", help="what --batch-loss averages over: rows, predicted_tokens "
                   "(a causal LM's labels[:, 1:] != -100; the default for causal_lm, else rows) or "
                   "MOD:FN(batch) -> count")
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
    p.add_argument("--data-placement", choices=PLACEMENTS, default="auto",
                   help="keep each shard on the device, stream it from host memory/disk on every product, or auto "
                   "(on the device when it takes at most half the free memory)")
    p.add_argument("--loader-workers", type=int, default=0, help="DataLoader processes when streaming a Dataset")
    p.add_argument("--params", help="comma-separated parameter names or patterns (default: all)")
    p.add_argument("--workers", type=int, help="Ray workers (default: one per GPU in the cluster, else 2); 0 = in-process")
    p.add_argument("--min-workers", type=int,
                   help="after a node is lost, go on with as few as this many workers (default: all of them)")
    p.add_argument("--grow-timeout", type=float, metavar="S",
                   help="when the cluster's live nodes cannot hold the workers, wait S seconds for a node to join "
                        "(an autoscaler, a lost node restarting) before shrinking or failing (default 120; 0 on a "
                        "fixed cluster)")
    p.add_argument("--gpus-per-worker", type=float,
                   help="whole GPUs per worker (default: 1 when the cluster has GPUs, else 0)")
    p.add_argument("--address", help="join a Ray cluster: auto or HOST:PORT (default: start a local one)")
    p.add_argument("--seed", type=int, help="random seed (default: drawn fresh; the JSON reports it)")
    p.add_argument("--json", help="write the results as JSON to this path")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.add_argument("--no-check", action="store_true", help="skip the determinism check (3 products)")
