"""Along-direction analysis: the curvature vᵀH(θ)v of a saved direction at other parameters,
and the loss along a direction, L(θ − αv), against its quadratic model
L(θ) − α gᵀv + ½ α² vᵀHv. Where the two part ways, the quadratic (Hessian) picture of the
landscape stops holding; along a negative-curvature eigenvector it shows whether the descent
the model promises is real."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .errors import InputError
from .operator import Operator


def unit(v: np.ndarray | torch.Tensor, n: int) -> np.ndarray:
    """``v`` as a float64 unit vector of length n, with a clear error otherwise."""
    v = np.asarray(v.detach().cpu() if torch.is_tensor(v) else v, dtype=np.float64).reshape(-1)
    if v.shape != (n,):
        raise InputError(f"the direction has {v.size} entries but the model has n = {n} parameters "
                         "(were the vectors saved for the same model and --params selection?)")
    norm = float(np.linalg.norm(v))
    if not (np.isfinite(norm) and norm > 0):
        raise InputError("the direction must be finite and non-zero")
    return v / norm


def curvature_along(op: Operator, v: np.ndarray | torch.Tensor) -> float:
    """vᵀAv / vᵀv (one product)."""
    u = unit(v, op.n)
    return float(u @ np.asarray(op.matvec(u)))


@dataclass(frozen=True)
class LineScan:
    """Loss along θ − αv (v a unit vector) and its quadratic model at θ."""

    alphas: np.ndarray
    loss: np.ndarray
    quadratic: np.ndarray
    loss_at_theta: float
    slope: float              # gᵀv: the model is L − α·slope + ½α²·curvature
    curvature: float

    def to_dict(self) -> dict:
        return {"alphas": self.alphas.tolist(), "loss": self.loss.tolist(), "quadratic_model": self.quadratic.tolist(),
                "loss_at_theta": self.loss_at_theta, "slope": self.slope, "curvature_along_direction": self.curvature,
                "max_model_gap": float(np.abs(self.loss - self.quadratic).max())}


def default_alphas(loss: float, curvature: float, points: int = 41) -> np.ndarray:
    """±a where the quadratic term alone changes the loss by about the loss itself."""
    a = math.sqrt(2 * max(abs(loss), 1e-2) / max(abs(curvature), 1e-8))
    return np.linspace(-a, a, points)


def line_scan(op: Operator, v: np.ndarray | torch.Tensor, alphas: Sequence[float] | None = None) -> LineScan:
    """Loss at θ − αv for each α (one full-data loss each) and the quadratic model (one product)."""
    u = unit(v, op.n)
    loss0, g = op.loss_and_gradient()
    theta = np.asarray(op.parameters, dtype=np.float64)
    slope, curvature = float(np.asarray(g) @ u), curvature_along(op, u)
    alphas = default_alphas(loss0, curvature) if alphas is None else np.asarray(alphas, dtype=np.float64)
    losses = np.array([op.loss_and_gradient(torch.from_numpy(theta - a * u))[0] for a in alphas])
    quadratic = loss0 - alphas * slope + 0.5 * alphas ** 2 * curvature
    return LineScan(alphas=alphas, loss=losses, quadratic=quadratic, loss_at_theta=loss0, slope=slope,
                    curvature=curvature)


def plot_line(scan: LineScan, path: str, title: str = "") -> None:
    """PNG: measured loss and quadratic model against α."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(scan.alphas, scan.loss, "o-", ms=3, label="loss L(θ − αv)")
    ax.plot(scan.alphas, scan.quadratic, "--", label=f"quadratic model (vᵀHv = {scan.curvature:.3g})")
    ax.set_xlabel("α")
    ax.set_ylabel("loss")
    ax.set_title(title or "loss along a direction")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_curvatures(labels: Sequence[str], curvatures: Sequence[float], path: str) -> None:
    """PNG: vᵀH(θ)v at each checkpoint."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(range(len(labels)), curvatures, "o-")
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("vᵀH(θ)v")
    ax.set_title("curvature along a fixed direction")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
