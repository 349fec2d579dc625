"""The eigen-service on a real Ray cluster started with `ray start --head` (token authentication
on), used from separate driver processes as a trainer would: its life (serve, solve, a worker
and the service killed, restart, scale, stop, report), tokens presented from every place Ray
documents, a killed CLI driver, and nodes lost between and during solves."""
import json
import os
import secrets
import subprocess
import sys
import time

import pytest

from .service_setup import HESSDIST, driver, failure, ray_head

pytestmark = pytest.mark.ray


def trainer(checkpoint: str) -> str:
    """A trainer's driver: the trained digits MLP, its parameters nudged per step, a handle on "svc"."""
    return f"""
from hessdist.examples import get_example
model = get_example("digits-mlp").model()
model.load_state_dict(torch.load({checkpoint!r}, weights_only=True))
""" + """
def nudged(step):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["1.weight"] += 1e-3 * step * torch.ones_like(state["1.weight"])
    return state
h = hessdist.connect("svc")
"""


def serve(address, out_dir, checkpoint, name="svc", workers=2):
    proc = subprocess.run(HESSDIST + ["serve", "--name", name, "--example", "digits-mlp", "--checkpoint", checkpoint,
                                      "--workers", str(workers), "--address", address, "--out-dir", str(out_dir),
                                      "--dtype", "float64"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, failure(proc)
    return json.loads(proc.stdout[proc.stdout.index("{"):])


def test_service_lifecycle(cluster, tmp_path, digits_checkpoint):
    out_dir = tmp_path / "svc"
    TRAINER = trainer(digits_checkpoint)
    status = serve(cluster, out_dir, digits_checkpoint)
    assert status["workers"] == 2 and status["solves"] == 0 and status["n_params"] == 2410

    # a second driver: three submits at different parameters, results in order, status meanwhile;
    # then a worker killed during a solve: it completes, the history has no gap or duplicate
    got, killed = driver(cluster, TRAINER + """
futures = [h.submit(nudged(s), step=s, rtol={"LA": 1e-5, "SA": 1e-3}, compare_cold=(s == 2), seed=0)
           for s in (0, 1, 2)]          # a fixed seed: the warm and cold solves start alike, every run
during = h.status()
results = [h.result(f) for f in futures]
print(json.dumps({"steps": [r["step"] for r in results], "warm": [r["warm_start"] for r in results],
                  "hvps": [r["hvps"] for r in results], "fpe": [r["fpe"] for r in results],
                  "cold": results[2].get("cold_fpe"), "fpe_saved": results[2].get("fpe_saved"),
                  "far": [{e: abs(r["limits"][e] - r[e][0]) / max(abs(r[e][0]), 1e-3 * r["largest"][0])
                           for e in r["limits"]} for r in results],       # rtol with the tol 1e-6 floor
                  "met": [r["met"] for r in results], "widths": [r["relative_widths"] for r in results],
                  "subset": [r["subset"] for r in results],
                  "during": during, "largest": results[0]["largest"], "n": len(h.history())}))

import os, signal, time
pid = h.status()["worker_pids"][-1]
fut = h.submit(nudged(3), step=3, tol=1e-12, max_hvps=200)   # long enough for the kill to land mid-solve
for _ in range(400):                                          # kill mid-solve, however fast products are
    if h.status()["running"] is not None:
        break
    time.sleep(0.05)
time.sleep(0.5)
os.kill(pid, signal.SIGKILL)
r = h.result(fut)
print(json.dumps({"replaced": r["workers_replaced"], "steps": [e["step"] for e in h.history()]}))
""", lines=2)
    assert got["steps"] == [0, 1, 2] and got["warm"] == [False, True, True] and got["n"] == 3
    assert got["during"]["running"] is not None or got["during"]["queued"]
    # the warm and the cold solve are compared as run, each certified with its far side (which
    # is what a k = 1 solve pays for, warm or cold: tests/test_spectrum.py)
    assert got["fpe_saved"] == got["cold"] - got["fpe"][2] and abs(got["fpe_saved"]) <= 0.1 * got["cold"]
    assert all(far["largest"] <= 1e-5 and far["smallest"] <= 1e-3 for far in got["far"])
    # no subset search by default: every product is a full-data one
    assert got["subset"] == [None] * 3 and got["fpe"] == got["hvps"]
    for met, widths in zip(got["met"], got["widths"]):            # each end to its own relative accuracy
        assert met == {"largest": ["rtol"], "smallest": ["rtol"]}
        assert widths["largest"][0] <= 1e-5 and widths["smallest"][0] <= 1e-3
    lines = (out_dir / "history.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [0, 1, 2, 3]
    assert sorted(os.listdir(out_dir / "vectors")) == ["step-0.pt", "step-1.pt", "step-2.pt", "step-3.pt"]
    assert killed["replaced"] >= 1 and killed["steps"] == [0, 1, 2, 3]

    # restart: stop, serve again on the same out_dir; history reloaded, next solve warm-starts
    subprocess.run(HESSDIST + ["stop", "--name", "svc", "--address", cluster], check=True, timeout=120,
                   capture_output=True)
    status = serve(cluster, out_dir, digits_checkpoint)
    assert status["solves"] == 4
    # scale between solves (here, right after the restart), from the CLI
    proc = subprocess.run(HESSDIST + ["scale", "--name", "svc", "--workers", "1", "--address", cluster],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and json.loads(proc.stdout)["workers"] == 1, failure(proc)
    # one driver: a trainer's hook solves step 4, warm from the reloaded history; then the same
    # parameters give the recorded answer, and a duplicate step is refused with a message
    warm, got = driver(cluster, TRAINER + """
import copy
from hessdist.hooks import SpectrumHook
hook = SpectrumHook(h, tol=1e-6)
trained = copy.deepcopy(model)            # the trainer's model at step 4; nudged() reads the checkpoint's
trained.load_state_dict(nudged(4))
hook.after_epoch(trained, 4)
r, = hook.results()
print(json.dumps({"warm": r["warm_start"], "steps": [e["step"] for e in h.history()]}))
again = h.result(h.submit(nudged(4), step=4))      # the same parameters: the recorded answer
try:
    h.result(h.submit(nudged(6), step=4))
    print(json.dumps({"error": None}))
except hessdist.InputError as exc:
    print(json.dumps({"error": str(exc), "status": h.status(), "again": again, "recorded": h.history()[-1]}))
""", lines=2)
    assert warm["warm"] and warm["steps"] == [0, 1, 2, 3, 4]
    assert "already in the history, solved at other parameters" in got["error"]
    assert got["status"]["last_error"]["step"] == 4 and got["status"]["solves"] == 5
    assert got["status"]["workers"] == 1
    assert got["again"] == {**got["recorded"], "from_history": True}

    # the service's own process killed mid-solve: the waiting trainer gets a clear error (no hang);
    # Ray restarts the service, which reloads its history and warm-starts the next solve
    got = driver(cluster, TRAINER + """
import os, signal, time
fut = h.submit(nudged(5), step=5, tol=1e-12, max_hvps=400)
while h.status()["running"] is None:
    time.sleep(0.05)
os.kill(h.status()["pid"], signal.SIGKILL)
try:
    h.result(fut, timeout_s=120)
    error = None
except hessdist.WorkerError as exc:
    error = str(exc)
for _ in range(240):
    try:
        status = h.status(timeout_s=5)
        break
    except Exception:
        time.sleep(0.5)
r = h.result(h.submit(nudged(5), step=5, rtol={"LA": 1e-3, "SA": 1e-2}))
print(json.dumps({"error": error, "solves": status["solves"], "warm": r["warm_start"],
                  "steps": [e["step"] for e in h.history()]}))
""")
    assert "died while this request was queued or running" in got["error"] and "submit this step again" in got["error"]
    assert got["solves"] == 5 and got["warm"] and got["steps"] == [0, 1, 2, 3, 4, 5]
    subprocess.run(HESSDIST + ["stop", "--name", "svc", "--address", cluster], check=True, timeout=120,
                   capture_output=True)
    proc = subprocess.run(HESSDIST + ["status", "--name", "svc", "--address", cluster],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "no hessdist service named 'svc'" in proc.stderr

    # the history rendered for a person: a PNG and a summary (no cluster needed)
    proc = subprocess.run(HESSDIST + ["report", str(out_dir)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, failure(proc)
    assert "6 solves, steps 0 to 5" in proc.stdout and "warm vs cold (compare_cold, 1 solves)" in proc.stdout
    assert (out_dir / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out_dir / "report.txt").read_text().startswith("6 solves")


def test_report_without_a_history_names_the_fix(tmp_path):
    proc = subprocess.run(HESSDIST + ["report", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "no history.jsonl" in proc.stderr and "--out-dir" in proc.stderr


def test_explicit_address_presents_the_token(tmp_path, digits_checkpoint):
    """A token made with `ray get-auth-token --generate` (written to ~/.ray/auth_token), then a plain
    `ray start --head`, which turns token authentication on when it finds one, then hessdist with
    an explicit --address: the token is found wherever Ray documents it; without one, a message
    naming token authentication comes in seconds."""
    home = tmp_path / "home"
    home.mkdir()
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH") and k != "RAY_ADDRESS"}
    ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
    subprocess.run([ray_cli, "get-auth-token", "--generate"], env={**clean, "HOME": str(home)}, check=True,
                   capture_output=True, timeout=120)
    token = (home / ".ray" / "auth_token").read_text().strip()
    with ray_head({**clean, "HOME": str(home)}) as address:

        def run(args, env, timeout=300):
            return subprocess.run(HESSDIST + args + ["--address", address], capture_output=True, text=True,
                                  timeout=timeout, env={**clean, **env})

        # the default token file (the head's own HOME): serve and stop, as the user did
        proc = run(["serve", "--name", "tok", "--example", "digits-mlp", "--checkpoint", digits_checkpoint, "--workers", "1",
                    "--out-dir", str(tmp_path / "svc")], {"HOME": str(home)})
        assert proc.returncode == 0 and json.loads(proc.stdout[proc.stdout.index("{"):])["workers"] == 1, \
            failure(proc)
        # RAY_AUTH_TOKEN and RAY_AUTH_TOKEN_PATH, from a HOME with no token file
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        (tmp_path / "token").write_text(token)
        for env in ({"RAY_AUTH_TOKEN": token}, {"RAY_AUTH_TOKEN_PATH": str(tmp_path / "token")}):
            proc = run(["status", "--name", "tok"], {"HOME": str(elsewhere), **env}, timeout=120)
            assert proc.returncode == 0 and json.loads(proc.stdout)["workers"] == 1, failure(proc)
        # no token, and a wrong one: fail fast, naming token authentication and how to supply it
        for env, says in (({}, "found no token"), ({"RAY_AUTH_TOKEN": secrets.token_hex(32)}, "was rejected")):
            t0 = time.monotonic()
            proc = run(["status", "--name", "tok"], {"HOME": str(elsewhere), **env}, timeout=120)
            assert proc.returncode == 1 and "requires token authentication" in proc.stderr, failure(proc)
            assert says in proc.stderr and "RAY_AUTH_TOKEN_PATH" in proc.stderr
            assert time.monotonic() - t0 < 30         # interpreter start and imports included
        assert run(["stop", "--name", "tok"], {"HOME": str(home)}, timeout=120).returncode == 0


def test_a_killed_cli_driver_leaves_no_workers_behind(cluster, digits_checkpoint):
    """`hessdist eigs --address` killed mid-solve: Ray's ownership removes its worker actors and
    their placement group; every CPU it reserved comes back."""
    got = driver(cluster, f"""
import os, signal, subprocess, sys, time
free = lambda: ray.available_resources().get("CPU", 0)
baseline = free()
cli = subprocess.Popen({HESSDIST!r} + ["eigs", "--example", "digits-mlp", "--checkpoint", {digits_checkpoint!r},
                                       "--workers", "2", "--address", {cluster!r},
                                       "--tol", "1e-14", "--max-hvps", "100000", "--quiet"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
deadline = time.monotonic() + 240
while free() > baseline - 2 and time.monotonic() < deadline:
    time.sleep(0.2)
held = baseline - free()
time.sleep(2)                                   # mid-solve
cli.send_signal(signal.SIGKILL)
cli.wait()
t0 = time.monotonic()
while free() < baseline and time.monotonic() - t0 < 120:
    time.sleep(0.5)
print(json.dumps({{"baseline": baseline, "held": held, "after": free(), "seconds": time.monotonic() - t0}}))
""")
    assert got["held"] >= 2 and got["after"] == got["baseline"], got


SERVICE_ON_NODES = """
import json, os, sys, time
import ray, torch
from ray.cluster_utils import Cluster
import hessdist
from hessdist import service
from hessdist.curvature import CurvatureOperator
from hessdist.examples import get_example
from hessdist.solvers.lanczos import lanczos
from hessdist.workers import OperatorSpec, connect

ex = get_example("digits-mlp")
model, data = ex.model(), ex.data()
model.load_state_dict(torch.load(sys.argv[2], weights_only=True))
base = {k: v.detach().clone() for k, v in model.state_dict().items()}

def nudged(step):
    state = {k: v.clone() for k, v in base.items()}
    state["1.weight"] += 1e-3 * step * torch.ones_like(state["1.weight"])
    return state

def reference(step):
    model.load_state_dict(nudged(step))
    op = CurvatureOperator(model, "cross_entropy", data, dtype=torch.float64, batch_size=2048)
    res = lanczos(op, which="LA,SA", k=1, rtol={"LA": 1e-10, "SA": 1e-8}, tol=1e-14, seed=0)
    return {"largest": float(res.largest.values[0]), "smallest": float(res.smallest.values[0])}

cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
big, small = cluster.add_node(num_cpus=2), cluster.add_node(num_cpus=1)
cluster.wait_for_nodes()
connect(cluster.address)
spec = OperatorSpec(model="hessdist.models:digits_mlp", data="hessdist.examples:digits", batch_size=2048,
                    dtype="float64")
h = service.start("nodes", spec, 3, sys.argv[1], group_options={"min_workers": 1, "start_timeout_s": 15,
                                                                     "grow_timeout_s": 0})

def solve(step, during=None):
    for attempt in range(3):
        fut = h.submit(nudged(step), step=step, rtol={"LA": 1e-6, "SA": 1e-4})
        if during and attempt == 0:
            time.sleep(0.3)
            during()
        try:
            return h.result(fut, timeout_s=600)
        except hessdist.WorkerError as exc:       # the service's own node was lost: it restarted
            assert "submit this step again" in str(exc), exc
            for _ in range(600):
                try:
                    h.status(timeout_s=5)
                    break
                except Exception:
                    time.sleep(0.5)

results = [solve(0)]
cluster.remove_node(small)                        # between solves
results.append(solve(1))
extra = cluster.add_node(num_cpus=1)
results.append(solve(2, during=lambda: cluster.remove_node(big)))   # during a solve
out = {"results": [{k: r[k] for k in ("step", "largest", "smallest", "intervals", "warm_start", "workers",
                                      "workers_replaced")} for r in results],
       "references": [reference(s) for s in (0, 1, 2)], "steps": [e["step"] for e in h.history()],
       "workers": h.status()["workers"]}
h.stop()
ray.shutdown()
cluster.shutdown()
print(json.dumps(out))
"""


def test_service_across_node_losses_between_and_during_solves(tmp_path, digits_checkpoint):
    """The service on a simulated multi-node cluster (a head without CPUs, a 2-CPU and a 1-CPU
    node): a node removed between two solves, another during a solve (a fresh node added
    before it). Every answer arrives and its certified intervals contain the in-process float64
    eigenvalues; the group shrinks to what is left; history and warm starts are intact."""
    proc = subprocess.run([sys.executable, "-c", SERVICE_ON_NODES, str(tmp_path / "svc"), digits_checkpoint], capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, failure(proc)
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["steps"] == [0, 1, 2]
    assert [r["warm_start"] for r in got["results"]] == [False, True, True]
    assert got["results"][0]["workers"] == 3 and got["results"][1]["workers"] == 2 and got["workers"] == 1
    for r, ref in zip(got["results"], got["references"]):
        for end in ("largest", "smallest"):
            lo, hi = r["intervals"][end][0]
            slack = 1e-9 * abs(ref[end])
            assert lo - slack <= ref[end] <= hi + slack, (r["step"], end, ref[end], lo, hi)
