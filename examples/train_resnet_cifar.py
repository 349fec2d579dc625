"""Train a CIFAR ResNet for a few epochs, asking a hessdist service for λ_max and λ_min of the
full-dataset Hessian after every epoch; then plot both against epoch (with their error bounds)
and the convergence of the last solve.

    python examples/train_resnet_cifar.py --data-root ~/data --epochs 5          # ResNet-18, GPU
    python examples/train_resnet_cifar.py --arch tiny --n-samples 512 --epochs 3  # a CPU run

CIFAR-10 is read from --data-root in its standard python-pickle format; without it the data are
SYNTHETIC and CIFAR-shaped, which the plot title says. The service runs on a local Ray cluster
started here (or joins --address).
"""
from __future__ import annotations

import argparse
import functools
import json
import os

import ray
import torch

import hessdist
from hessdist import service
from hessdist.workers import OperatorSpec, connect
from hessdist.examples import cifar10_dir, get_example
from hessdist.hooks import SpectrumHook
from hessdist.models import ResNet


def make_model(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return ResNet() if arch == "resnet18" else ResNet(blocks=(1, 1, 1, 1), width=8)


def plot(history: list[dict], trace: list[dict], title: str, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(15, 4))
    steps = [h["step"] for h in history]
    for end, ax, color in (("largest", a, "C0"), ("smallest", b, "C3")):
        ax.errorbar(steps, [h[end][0] for h in history], yerr=[h["error_bounds"][end][0] for h in history],
                    marker="o", color=color, capsize=3)
        ax.set(xlabel="epoch", ylabel=f"λ_{'max' if end == 'largest' else 'min'}", title=f"λ_{'max' if end == 'largest' else 'min'} by epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))      # epochs are whole numbers: no 0.5 ticks
    hv = [t["hvps"] for t in trace]
    c.semilogy(hv, [t["LA"][1][0] for t in trace], label="residual λ_max")
    c.semilogy(hv, [t["SA"][1][0] for t in trace], label="residual λ_min")
    c.set(xlabel="products", ylabel="residual ‖Hx − θx‖", title="convergence of the last solve (in-process replay)")
    c.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--arch", choices=("resnet18", "tiny"), default="resnet18")
    ap.add_argument("--data-root", default="data")
    ap.add_argument("--n-samples", type=int, help="first N training images (default: all 50,000)")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--workers", type=int, help="eigen workers (default: one per GPU, else 2 on the CPU)")
    ap.add_argument("--address", help="join a Ray cluster instead of starting a local one")
    ap.add_argument("--tol", type=float, default=1e-3)
    ap.add_argument("--out-dir", default="hessdist-out/example")
    args = ap.parse_args()

    data_fn = get_example("resnet18-cifar", args.data_root, args.n_samples).data    # root made absolute
    model_fn = functools.partial(make_model, args.arch)
    label = "CIFAR-10" if cifar10_dir(os.path.abspath(args.data_root)) else "SYNTHETIC CIFAR-shaped data"
    print(f"data: {label}")
    connect(args.address)
    gpus = 1 if torch.cuda.is_available() else 0
    workers = args.workers or (torch.cuda.device_count() if gpus else 2)
    svc = service.start("example-" + args.arch, OperatorSpec(model=model_fn, data=data_fn, batch_size=128),
                        workers, args.out_dir, gpus_per_worker=gpus)
    hook = SpectrumHook(svc, which="LA,SA", tol=args.tol, max_hvps=200)

    device = "cuda" if gpus else "cpu"
    model = model_fn().to(device)
    x, y = data_fn()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 128):
            idx = perm[i:i + 128]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[idx].to(device)), y[idx].to(device)).backward()
            opt.step()
        hook.after_epoch(model, epoch)          # returns at once; the service computes meanwhile
        print(f"epoch {epoch} trained; spectrum submitted")
    history = hook.results()
    for h in history:
        print(json.dumps({k: h[k] for k in ("step", "largest", "smallest", "converged", "hvps", "seconds")}))

    # the convergence plot replays the last solve in-process, recording Ritz values per product
    trace: list[dict] = []
    op = hessdist.CurvatureOperator(model.cpu(), "cross_entropy", (x, y), batch_size=128)
    hessdist.lanczos(op, which="LA,SA", tol=args.tol, max_hvps=200, callback=trace.append)
    plot(history, trace, f"{args.arch} on {label}", os.path.join(args.out_dir, "spectrum.png"))
    svc.stop()
    ray.shutdown()


if __name__ == "__main__":
    main()
