"""What lower precision does to the eigenvalues: λ_max and λ_min of the same trained model from
products in float64 (the reference), float32 (the default), bfloat16, and — on a GPU — float32
with TF32 matmuls/convolutions. Same solver, same start vector, same stopping rule; the relative
error of each end against float64 and whether the residual tolerance could be met at all.
"""
from __future__ import annotations

import argparse

import torch

from hessdist.curvature import CurvatureOperator
from hessdist.solvers.lanczos import lanczos

from .common import trained_model, write

SETTINGS = {"float64": (torch.float64, False), "float32": (torch.float32, False),
            "bfloat16": (torch.bfloat16, False), "tf32": (torch.float32, True)}


def measure(name: str, tol: float, max_hvps: int, device: str) -> dict:
    model, data = trained_model(name)
    row = {"problem": name, "tol": tol, "max_hvps": max_hvps, "settings": {}}
    for setting, (dtype, tf32) in SETTINGS.items():
        if tf32 and not device.startswith("cuda"):
            row["settings"][setting] = {"status": "not measured (TF32 is a CUDA precision; no GPU was lent)"}
            continue
        op = CurvatureOperator(model, "cross_entropy", data, batch_size=2048, dtype=dtype, device=device,
                               mode="forward", tf32=tf32)
        res = lanczos(op, which="LA,SA", k=1, tol=tol, max_hvps=max_hvps, return_vectors=False)
        row["settings"][setting] = {
            "status": "ok", "lambda_max": float(res.largest.values[0]), "lambda_min": float(res.smallest.values[0]),
            "residual_max": float(res.largest.residual_norms[0]), "residual_min": float(res.smallest.residual_norms[0]),
            "converged": bool(res.converged), "hvps": res.hvps, "seconds": res.seconds}
    ref = row["settings"]["float64"]
    for s in row["settings"].values():
        if s["status"] == "ok":
            s["rel_err_max"] = abs(s["lambda_max"] - ref["lambda_max"]) / abs(ref["lambda_max"])
            s["rel_err_min"] = abs(s["lambda_min"] - ref["lambda_min"]) / abs(ref["lambda_min"])
    print(name, {k: (v.get("lambda_max"), v.get("lambda_min"), v.get("rel_err_max"), v.get("rel_err_min"))
                 for k, v in row["settings"].items()}, flush=True)
    return row


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--problems", nargs="+", default=["digits-mlp", "digits-cnn"])
    ap.add_argument("--tol", type=float, default=1e-5)
    ap.add_argument("--max-hvps", type=int, default=300)
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    write("precision", {"device": device, "rows": [measure(p, args.tol, args.max_hvps, device) for p in args.problems]})


if __name__ == "__main__":
    main()
