"""Streamed vs resident shards: one product (best of ``--repeats``) with the data kept on the
device, and read again on every product from tensors in host memory, from a map-style Dataset
(one sample at a time, as from disk) without and with DataLoader processes. On a CPU the
"device" is host memory, so this measures what re-reading and re-batching cost; on a GPU the
host-to-device copy adds to it (overlapped with compute by the one-batch-ahead copy stream)."""
from __future__ import annotations

import argparse

import numpy as np
import torch
from torch.utils.data import Dataset

from hessdist.curvature import CurvatureOperator
from hessdist.examples import digits_shifted

from .common import best_of, trained_model, write


class Samples(Dataset):
    """A map-style dataset returning one (input, target) at a time."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=1024)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    rows = []
    for problem in ("digits-mlp", "digits-cnn"):
        model, _ = trained_model(problem)
        x, y = digits_shifted()
        sources = {"tensors": ("device", (x, y), 0), "tensors ": ("stream", (x, y), 0),
                   "Dataset": ("stream", Samples(x, y), 0), "Dataset, 2 loader processes": ("stream", Samples(x, y), 2)}
        resident = None
        for source, (placement, data, loader_workers) in sources.items():
            op = CurvatureOperator(model, "cross_entropy", data, batch_size=args.batch_size, mode="double-backward",
                                   placement=placement, loader_workers=loader_workers)
            v = np.random.default_rng(0).standard_normal((op.n, 1))
            seconds = best_of(lambda: op.matmat(v), args.repeats)
            resident = resident or seconds
            rows.append({"problem": problem, "n_samples": op.n_samples, "source": source.strip(), "placement": placement,
                         "loader_workers": loader_workers, "product_s": seconds, "ratio_to_resident": seconds / resident})
            print(rows[-1], flush=True)
    write("streaming", {"note": f"shifted digits ({rows[0]['n_samples']:,} real images), CPU, batch {args.batch_size}",
                        "rows": rows})


if __name__ == "__main__":
    main()
