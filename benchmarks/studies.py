"""One reproduction of every study (``hessdist verify | along | subset | decompose | rank``) on a
CNN trained on real data: scikit-learn's digits (1,797 images), a 2-layer BatchNorm CNN of width
4 (1,650 parameters, so that the exact ``rank`` builds its dense matrix in a minute on a laptop;
``verify`` checks the convolution and BatchNorm parameters), trained by the digits examples'
full-batch Adam. Checkpoints
after 0, 10, 40 and 150 steps feed ``decompose``; the last is the one every other study reads.

Each study runs through the command line as a user would (``--workers 0``: in-process; the tests
show the Ray workers give the same numbers) and writes its JSON and figures under
``benchmarks/results/studies/``; ``benchmarks/results/studies.json`` collects the headline
numbers. Every dense reference is float64.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch

from hessdist.cli import main as hessdist
from hessdist.examples import digits, train_full_batch
from hessdist.models import digits_cnn

from .common import RESULTS, write

OUT = os.path.join(RESULTS, "studies")
STEPS = (0, 10, 40, 150)
#: verify's dense float64 reference costs n × N tangent passes: the convolutions and their
#: BatchNorms (360 parameters) keep it to a minute or two on a laptop
VERIFY_PARAMS = "1.*,2.*,4.*,5.*"


def cnn() -> torch.nn.Module:
    """The studies' model: the digits CNN at width 4."""
    return digits_cnn(width=4)


def checkpoints(folder: str) -> list[str]:
    """State dicts after each of ``STEPS`` full-batch Adam steps (the same trajectory: the
    training is deterministic from the same initialisation)."""
    paths = []
    for steps in STEPS:
        model = cnn()
        if steps:
            train_full_batch(model, digits(), steps=steps)
        paths.append(os.path.join(folder, f"step{steps}.pt"))
        torch.save(model.state_dict(), paths[-1])
    return paths


def run(command: str, *options: str) -> dict:
    """``hessdist COMMAND`` on the final checkpoint (printed as it runs); its JSON."""
    path = os.path.join(OUT, f"{command}.json")
    argv = [command, "--model", "benchmarks.studies:cnn", "--data", "hessdist.examples:digits", "--workers", "0",
            "--seed", "0", "--json", path, *options]
    print("$ hessdist " + " ".join(argv), flush=True)
    t0 = time.perf_counter()
    code = hessdist(argv)
    print(f"  exit {code}, {time.perf_counter() - t0:.0f} s", flush=True)
    return json.load(open(path))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--k", type=int, default=10, help="eigenvectors per end for along")
    args = ap.parse_args(argv)
    os.makedirs(OUT, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        paths = checkpoints(folder)
        final = ["--checkpoint", paths[-1]]
        verify = run("verify", *final, "--dtype", "float64", "--params", VERIFY_PARAMS)
        along = run("along", *final, "--dtype", "float64", "--k", str(args.k), "--png", os.path.join(OUT, "along"))
        subset = run("subset", *final, "--fraction", "0.05", "--k", "5", "--png", os.path.join(OUT, "subset.png"))
        decompose = run("decompose", "--checkpoints", *paths, "--png", os.path.join(OUT, "decompose.png"))
        exact = run("rank", *final, "--relative", "1e-2", "--method", "exact")
        os.replace(os.path.join(OUT, "rank.json"), os.path.join(OUT, "rank-exact.json"))
        slq = run("rank", *final, "--relative", "1e-2", "--method", "slq")
    write("studies", {
        "model": "digits CNN, width 4 (1,650 parameters), 150 steps of full-batch Adam; scikit-learn digits (real)",
        "files": sorted(os.listdir(OUT)),
        "verify": {"params": VERIFY_PARAMS, **{k: verify[k] for k in ("n", "asymmetry", "product_error", "passed",
                                                                      "dense_hvps", "misses")}},
        "along": [{"end": end, **{k: r[k] for k in ("eigenvalue", "slope", "fitted_curvature", "optimal_step",
                                                    "best_improvement", "loss_evaluations")}}
                  for end, rows in along["ends"].items() for r in rows],
        "subset": {"fraction": subset["fraction"], "samples": subset["subset_samples"],
                   **{end: {k: e[k] for k in ("full", "subset", "relative_difference", "angle_deg")}
                      for end, e in subset["ends"].items()}},
        "decompose": [{"checkpoint": p["checkpoint"], **{c: {k: r[k] for k in ("largest", "smallest", "trace")}
                                                         for c, r in p["curvatures"].items()}}
                      for p in decompose["checkpoints"]],
        "rank": {"threshold": exact["threshold"], "exact": [exact["positive"], exact["negative"]],
                 "slq": [slq["positive"], slq["negative"]], "slq_interval": slq["interval"],
                 "exact_hvps": exact["hvps"], "slq_hvps": slq["hvps"]},
    })


if __name__ == "__main__":
    main()
