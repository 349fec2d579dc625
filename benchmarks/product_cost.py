"""Product cost: one full-dataset curvature product (per column) divided by one full-dataset
gradient, per way of computing it — forward-over-reverse or double-backward, eager or
``torch.compile``d (forward only: torch.compile does not support double backward), block width k (columns per data pass), channels-last — on the digits models
(real data) and ResNet-18 on CIFAR-shaped images (SYNTHETIC unless CIFAR-10 is on disk).

Ratios are like for like (a compiled product over a compiled gradient, eager over eager), and
every configuration's product is compared with the eager forward product of the same vectors, so
a fast configuration that computes something else shows up. The mode ``auto`` would choose is
recorded too. Precision is float32 throughout (the production setting); the effect of lower
precisions on eigenvalues is in ``precision.py``.
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from hessdist.examples import cifar10, cifar10_dir
from hessdist.curvature import CurvatureOperator
from hessdist.models import resnet18_cifar

from .common import merged_rows, trained_model, write

MODES = ("forward", "double-backward")


def problem(name: str, samples: int):
    """(model, data, note)."""
    if name == "resnet18-cifar":
        root = os.environ.get("HESSDIST_DATA_ROOT", "data")
        torch.manual_seed(0)
        note = "CIFAR-10" if cifar10_dir(root) else "SYNTHETIC CIFAR-shaped (no CIFAR-10 under ./data)"
        return resnet18_cifar(), cifar10(root=root, n_samples=samples), note
    model, data = trained_model(name)
    return model, data, "real (scikit-learn digits)"


def timed(fn, repeats: int, sync) -> tuple[float, float, object]:
    """(first call, best of ``repeats`` later calls) in seconds, and the last result."""
    t = time.perf_counter()
    out = fn()
    sync()
    first = time.perf_counter() - t
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        sync()
        best = min(best, time.perf_counter() - t)
    return first, best, out


def compiled_gradient_time(op: CurvatureOperator, repeats: int, sync) -> tuple[float, float]:
    """The full-dataset gradient with its per-batch function ``torch.compile``d, so that a
    compiled product is compared with a compiled gradient too."""
    value_and_grad = torch.compile(torch.func.grad_and_value(op.products.loss_sum), dynamic=False)
    p = tuple(op.layout.gather(op.model))

    def gradient():
        return sum(op.layout.flatten(value_and_grad(p, b)[0]).double() for b in op.batches)

    first, best, _ = timed(gradient, repeats, sync)
    return first, best


def configurations(conv: bool, widths: tuple[int, ...], compile_too: bool) -> list[dict]:
    out = [{"mode": m, "compiled": False, "channels_last": cl, "k": k}
           for m in MODES for k in widths for cl in ((False, True) if conv else (False,))]
    if compile_too:
        out += [{"mode": "forward", "compiled": True, "channels_last": False, "k": k} for k in widths]
    return out


def measure(name: str, samples: int, batch_size: int, repeats: int, widths: tuple[int, ...],
            compile_too: bool, device: str) -> dict:
    model, data, note = problem(name, samples)
    conv = any(isinstance(m, torch.nn.Conv2d) for m in model.modules())

    def build(**kw):
        return CurvatureOperator(model, "cross_entropy", data, batch_size=batch_size, device=device, **kw)

    sync = (lambda: torch.cuda.synchronize()) if device.startswith("cuda") else (lambda: None)
    base = build(mode="forward")
    g_first, g_best, _ = timed(base.loss_and_gradient, repeats, sync)
    gc_first, gc_best = compiled_gradient_time(base, repeats, sync) if compile_too else (None, None)
    V = torch.randn(base.n, max(widths), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    reference = base.matmat(V)
    row = {"problem": name, "data": note, "n_params": base.n, "n_samples": base.n_samples,
           "batch_size": batch_size, "device": device, "gradient_s": g_best, "gradient_compiled_s": gc_best,
           "gradient_compiled_first_call_s": gc_first, "auto_mode": build(mode="auto").mode, "configs": []}
    for cfg in configurations(conv, widths, compile_too):
        k = cfg["k"]
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        op = build(mode=cfg["mode"], compiled=cfg["compiled"], channels_last=cfg["channels_last"])
        first, best, out = timed(lambda: op.matmat(V[:, :k]), repeats, sync)
        err = float((out - reference[:, :k]).norm() / reference[:, :k].norm())
        per_column = best / k
        row["configs"].append({**cfg, "first_call_s": first, "product_s": best, "per_column_s": per_column,
                               "ratio_to_gradient": per_column / g_best,
                               "ratio_to_compiled_gradient": per_column / gc_best if gc_best else None,
                               "ratio_like_for_like": per_column / (gc_best if cfg["compiled"] else g_best),
                               "rel_diff_vs_forward_eager": err,
                               "peak_device_bytes": op.describe()["peak_device_bytes"]})
        print(f"{name} {cfg}: {per_column:.3f} s/column = {per_column / g_best:.2f}× gradient "
              f"(first call {first:.1f} s; diff {err:.1e})", flush=True)
    best_cfg = min(row["configs"], key=lambda c: c["ratio_like_for_like"])
    row["best"] = {k: best_cfg[k] for k in ("mode", "compiled", "channels_last", "k", "ratio_like_for_like")}
    return row


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--problems", nargs="+", default=["digits-mlp", "digits-cnn", "resnet18-cifar"])
    ap.add_argument("--resnet-samples", type=int, default=128,
                    help="CIFAR-shaped images for ResNet-18 (50000 on a GPU; a product on 2 CPU cores takes ~0.1 s per image)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--widths", default="1,4", help="block widths k to time")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile configurations")
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    widths = tuple(int(w) for w in args.widths.split(","))
    rows = []
    for name in args.problems:
        batch = 64 if name == "resnet18-cifar" and device == "cpu" else 256
        rows.append(measure(name, args.resnet_samples, batch, args.repeats, widths, not args.no_compile, device))
    write("product_cost", {"precision": "float32", "goal": "≤ 2.5× gradient on GPU with compile",
                           "gpu_note": "GPU figures: not measured" if device == "cpu" else device,
                           "rows": merged_rows("product_cost", rows)})


if __name__ == "__main__":
    main()
