"""The eigen-service on a real Ray cluster started with `ray start --head`, used from separate
driver processes as a trainer would."""
import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.ray
HESSDIST = [sys.executable, "-m", "hessdist.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def ray_head(env: dict):
    """A Ray head of its own (`ray start --head --block`) under ``env``, stopped by ending that
    process; yields its address once the port answers. Its --temp-dir is short: Ray's socket
    paths under it must stay within the 107-byte Unix limit."""
    temp_dir = tempfile.mkdtemp(prefix="ray")
    port = free_port()
    ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
    log = open(os.path.join(temp_dir, "head.log"), "w")
    head = subprocess.Popen([ray_cli, "start", "--head", "--block", f"--port={port}", "--num-cpus=6",
                             "--include-dashboard=false", f"--temp-dir={temp_dir}"],
                            stdout=log, stderr=subprocess.STDOUT, env={**env, "RAY_USAGE_STATS_ENABLED": "0"})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert head.poll() is None, open(log.name).read()[-3000:]
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.5)
    time.sleep(3)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        head.terminate()
        head.wait(timeout=120)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster():
    """A head with token authentication, as the cluster/ configs start it: the head and every
    driver share the token through RAY_AUTH_MODE=token and RAY_AUTH_TOKEN."""
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    with ray_head(dict(os.environ)) as address:
        yield address
    for k, v in saved.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def driver(address: str, code: str, timeout: int = 600, runtime_env: dict | None = None) -> dict:
    """Run ``code`` in a separate Python process connected to the cluster; it prints one JSON.
    ``runtime_env``: the job's (inherited by a service it starts, and by that service's workers)."""
    script = "import json, ray, torch, hessdist\n" \
             f"ray.init(address={address!r}, namespace='hessdist', logging_level='ERROR', " \
             f"runtime_env={runtime_env!r})\n" + textwrap.dedent(code)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


TRAINER = """
from hessdist.examples import get_example
ex = get_example("digits-mlp")
model = ex.model(); ex.train(model, ex.data())
def nudged(step):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["1.weight"] += 1e-3 * step * torch.ones_like(state["1.weight"])
    return state
h = hessdist.connect("svc")
"""


def serve(address, out_dir, name="svc", workers=2):
    proc = subprocess.run(HESSDIST + ["serve", "--name", name, "--example", "digits-mlp", "--workers", str(workers),
                                      "--address", address, "--out-dir", str(out_dir), "--dtype", "float64"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout[proc.stdout.index("{"):])


def test_service_lifecycle(cluster, tmp_path):
    out_dir = tmp_path / "svc"
    status = serve(cluster, out_dir)
    assert status["workers"] == 2 and status["solves"] == 0 and status["n_params"] == 2410

    # a second driver: three submits at different parameters, results in order, status meanwhile
    got = driver(cluster, TRAINER + """
futures = [h.submit(nudged(s), step=s, rtol={"LA": 1e-5, "SA": 1e-3}, compare_cold=(s == 2), seed=0)
           for s in (0, 1, 2)]          # a fixed seed: the warm and cold solves start alike, every run
during = h.status()
results = [h.result(f) for f in futures]
print(json.dumps({"steps": [r["step"] for r in results], "warm": [r["warm_start"] for r in results],
                  "hvps": [r["hvps"] for r in results], "fpe": [r["fpe"] for r in results],
                  "cold": results[2].get("cold_hvps"), "fpe_saved": results[2].get("fpe_saved"),
                  "met": [r["met"] for r in results], "widths": [r["relative_widths"] for r in results],
                  "subset": [r["subset"] for r in results],
                  "during": during, "largest": results[0]["largest"], "n": len(h.history())}))
""")
    assert got["steps"] == [0, 1, 2] and got["warm"] == [False, True, True] and got["n"] == 3
    assert got["during"]["running"] is not None or got["during"]["queued"]
    assert got["hvps"][2] < got["cold"] and got["fpe_saved"] > 0      # warm start saves full-data work
    # 1,797 samples: too few for a 5% subset to pay, so every product is a full-data one
    assert got["subset"] == [None] * 3 and got["fpe"] == got["hvps"]
    for met, widths in zip(got["met"], got["widths"]):            # each end to its own relative accuracy
        assert met == {"largest": ["rtol"], "smallest": ["rtol"]}
        assert widths["largest"][0] <= 1e-5 and widths["smallest"][0] <= 1e-3
    lines = (out_dir / "history.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [0, 1, 2]
    assert sorted(os.listdir(out_dir / "vectors")) == ["step-0.pt", "step-1.pt", "step-2.pt"]

    # a worker killed during a solve: it completes, the history has no gap or duplicate
    pid = driver(cluster, TRAINER + "print(json.dumps(h.status()))")["worker_pids"][-1]
    got = driver(cluster, TRAINER + f"""
import os, signal, time
fut = h.submit(nudged(3), step=3, tol=1e-12, max_hvps=400)   # float32 never reaches 1e-12: 400 products
for _ in range(400):                                          # kill mid-solve, however fast products are
    if h.status()["running"] is not None:
        break
    time.sleep(0.05)
time.sleep(0.5)
os.kill({pid}, signal.SIGKILL)
r = h.result(fut)
print(json.dumps({{"replaced": r["workers_replaced"], "steps": [e["step"] for e in h.history()]}}))
""")
    assert got["replaced"] >= 1 and got["steps"] == [0, 1, 2, 3]

    # restart: stop, serve again on the same out_dir; history reloaded, next solve warm-starts
    subprocess.run(HESSDIST + ["stop", "--name", "svc", "--address", cluster], check=True, timeout=120,
                   capture_output=True)
    status = serve(cluster, out_dir)
    assert status["solves"] == 4
    got = driver(cluster, TRAINER + """
from hessdist.hooks import SpectrumHook
hook = SpectrumHook(h, tol=1e-6)
model.load_state_dict(nudged(4))
hook.after_epoch(model, 4)
r, = hook.results()
print(json.dumps({"warm": r["warm_start"], "steps": [e["step"] for e in h.history()]}))
""")
    assert got["warm"] and got["steps"] == [0, 1, 2, 3, 4]

    # scale between solves; status from the CLI; duplicate step refused with a message
    proc = subprocess.run(HESSDIST + ["scale", "--name", "svc", "--workers", "1", "--address", cluster],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and json.loads(proc.stdout)["workers"] == 1, proc.stderr[-3000:]
    got = driver(cluster, TRAINER + """
try:
    h.result(h.submit(nudged(4), step=4))
    print(json.dumps({"error": None}))
except hessdist.InputError as exc:
    print(json.dumps({"error": str(exc), "status": h.status()}))
""")
    assert "already in the history" in got["error"] and got["status"]["last_error"]["step"] == 4

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
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "6 solves, steps 0 to 5" in proc.stdout and "warm vs cold (compare_cold, 1 solves)" in proc.stdout
    assert (out_dir / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out_dir / "report.txt").read_text().startswith("6 solves")


def test_report_without_a_history_names_the_fix(tmp_path):
    proc = subprocess.run(HESSDIST + ["report", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "no history.jsonl" in proc.stderr and "--out-dir" in proc.stderr


def test_explicit_address_presents_the_token(tmp_path):
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
        proc = run(["serve", "--name", "tok", "--example", "digits-mlp", "--workers", "1",
                    "--out-dir", str(tmp_path / "svc")], {"HOME": str(home)})
        assert proc.returncode == 0 and json.loads(proc.stdout[proc.stdout.index("{"):])["workers"] == 1, \
            proc.stderr[-3000:]
        # RAY_AUTH_TOKEN and RAY_AUTH_TOKEN_PATH, from a HOME with no token file
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        (tmp_path / "token").write_text(token)
        for env in ({"RAY_AUTH_TOKEN": token}, {"RAY_AUTH_TOKEN_PATH": str(tmp_path / "token")}):
            proc = run(["status", "--name", "tok"], {"HOME": str(elsewhere), **env}, timeout=120)
            assert proc.returncode == 0 and json.loads(proc.stdout)["workers"] == 1, proc.stderr[-3000:]
        # no token, and a wrong one: fail fast, naming token authentication and how to supply it
        for env, says in (({}, "found no token"), ({"RAY_AUTH_TOKEN": secrets.token_hex(32)}, "was rejected")):
            t0 = time.monotonic()
            proc = run(["status", "--name", "tok"], {"HOME": str(elsewhere), **env}, timeout=120)
            assert proc.returncode == 1 and "requires token authentication" in proc.stderr, proc.stderr[-3000:]
            assert says in proc.stderr and "RAY_AUTH_TOKEN_PATH" in proc.stderr
            assert time.monotonic() - t0 < 30         # interpreter start and imports included
        assert run(["stop", "--name", "tok"], {"HOME": str(home)}, timeout=120).returncode == 0


def test_a_killed_cli_driver_leaves_no_workers_behind(cluster):
    """`hessdist eigs --address` killed mid-solve: Ray's ownership removes its worker actors and
    their placement group; every CPU it reserved comes back."""
    got = driver(cluster, f"""
import os, signal, subprocess, sys, time
free = lambda: ray.available_resources().get("CPU", 0)
baseline = free()
cli = subprocess.Popen({HESSDIST!r} + ["eigs", "--example", "digits-mlp", "--workers", "2", "--address", {cluster!r},
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
ex.train(model, data)
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
h = service.start("nodes", spec, 3, sys.argv[1], group_options={"min_workers": 1, "start_timeout_s": 15})

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


def test_service_across_node_losses_between_and_during_solves(tmp_path):
    """The service on a simulated multi-node cluster (a head without CPUs, a 2-CPU and a 1-CPU
    node): a node removed between two solves, another during a solve (a fresh node added
    before it). Every answer arrives and its certified intervals contain the in-process float64
    eigenvalues; the group shrinks to what is left; history and warm starts are intact."""
    proc = subprocess.run([sys.executable, "-c", SERVICE_ON_NODES, str(tmp_path / "svc")], capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["steps"] == [0, 1, 2]
    assert [r["warm_start"] for r in got["results"]] == [False, True, True]
    assert got["results"][0]["workers"] == 3 and got["results"][1]["workers"] == 2 and got["workers"] == 1
    for r, ref in zip(got["results"], got["references"]):
        for end in ("largest", "smallest"):
            lo, hi = r["intervals"][end][0]
            slack = 1e-9 * abs(ref[end])
            assert lo - slack <= ref[end] <= hi + slack, (r["step"], end, ref[end], lo, hi)


# -- a long-lived service on a shared cluster: dtypes, a bounded queue, vector retention, out-dir --

#: PyTorch's warning for a tensor made on a read-only array (one from Ray's object store)
NOT_WRITABLE = "The given NumPy array is not writable"
#: a job whose service, and that service's workers, fail on that warning instead of printing it
WARNING_IS_ERROR = {"env_vars": {"PYTHONWARNINGS": f"error:{NOT_WRITABLE}"}}

SERVICE = """
import functools, os, re, time, warnings
from hessdist import service
from hessdist.models import digits_mlp
from hessdist.workers import OperatorSpec
warnings.filterwarnings("error", message=%r)

def spec(hidden=32):
    return OperatorSpec(model=functools.partial(digits_mlp, hidden=hidden), data="hessdist.examples:digits",
                        batch_size=2048, dtype="float64")

def nudged(model, step):
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state["1.weight"] += 1e-3 * step
    return state

def wait_running(h, step):
    for _ in range(600):
        if (h.status()["running"] or {}).get("step") == step:
            return
        time.sleep(0.02)
    raise AssertionError(f"step {step} never ran")
""" % NOT_WRITABLE


def test_submit_sends_bfloat16_and_float16_state_dicts_at_their_exact_values():
    """In-process: what ``submit`` puts in the object store. bfloat16 (and float8) have no NumPy
    dtype: they become float32, which holds every one of their values exactly."""
    from hessdist.errors import InputError
    from hessdist.service import host_array
    x = torch.randn(257, dtype=torch.float32) * 3
    for dtype, sent in ((torch.bfloat16, np.float32), (torch.float16, np.float16), (torch.float64, np.float64),
                        (torch.float8_e4m3fn, np.float32), (torch.int64, np.int64)):
        value = (x * 10).to(dtype)
        arr = host_array("w", value)
        assert arr.dtype == sent and arr.flags.writeable
        assert torch.equal(torch.from_numpy(arr).double(), value.double())      # the same values, every one
        value.zero_()                                                           # the trainer goes on
        assert torch.from_numpy(arr).double().abs().sum() > 0                   # a copy of its own
    with pytest.raises(InputError, match="'w' is a str"):
        host_array("w", "weights")


def test_bfloat16_and_float16_state_dicts_solve_at_their_exact_values(cluster, tmp_path):
    """A bfloat16 state_dict (a model trained in bf16) and a float16 one: submit accepts them
    and the service solves at exactly their values, i.e. equals a solve at their float32
    upcast. Run in a job whose service and workers fail on PyTorch's read-only-array warning."""
    got = driver(cluster, SERVICE + f"""
h = service.start("dtypes", spec(), 1, {str(tmp_path / "svc")!r})
model = digits_mlp()
f32 = nudged(model, 0)
half = {{dtype: {{k: v.to(dtype) for k, v in f32.items()}} for dtype in (torch.bfloat16, torch.float16)}}
states = [half[torch.bfloat16], {{k: v.float() for k, v in half[torch.bfloat16].items()}},
          half[torch.float16], {{k: v.float() for k, v in half[torch.float16].items()}}, f32]
futures = [h.submit(state, step=s, which="LA", rtol=1e-11, seed=0) for s, state in enumerate(states)]
results = [h.result(f) for f in futures]
print(json.dumps({{"largest": [r["largest"][0] for r in results], "intervals": [r["intervals"]["largest"][0] for r in results],
                  "steps": [e["step"] for e in h.history()], "last_error": h.status()["last_error"],
                  "files": sorted(os.listdir({str(tmp_path / "svc" / "vectors")!r}))}}))
h.stop()
""", runtime_env=WARNING_IS_ERROR)
    assert got["steps"] == [0, 1, 2, 3, 4] and got["last_error"] is None
    assert len(got["files"]) == 5                       # every solve's vectors saved (without the warning)
    bf16, bf16_up, f16, f16_up, f32 = got["largest"]
    for half, up in ((bf16, bf16_up), (f16, f16_up)):
        assert abs(half - up) <= 3e-11 * abs(up), (half, up)
    assert abs(bf16 - f32) > 1e-7 * abs(f32)           # bf16 rounding moves λ_max: the equality above is not vacuous


def plasma_objects(address: str) -> str:
    return "from ray._private.internal_api import memory_summary\n" \
           "def plasma():\n" \
           f"    text = memory_summary(address={address!r}, stats_only=True)\n" \
           "    return int(re.search(r'Plasma memory usage .*?(\\d+) objects', text).group(1))\n" \
           "def settled(expected):\n" \
           "    for _ in range(100):\n" \
           "        if plasma() <= expected:\n" \
           "            break\n" \
           "        time.sleep(0.2)\n" \
           "    return plasma()\n"


def test_a_full_queue_rejects_or_coalesces_and_releases_the_dropped_parameters(cluster, tmp_path):
    """max_queued=1. 'reject': a submit that finds the queue full raises QueueFull naming the
    option, and nothing of it is kept. 'coalesce': the older queued steps make way for the newest;
    their futures raise Superseded (which step, superseded by which), never hang; their parameter
    copies leave the object store at once. The parameters (38,410 of them, 154 KB) are big enough
    to live in Ray's object store, so each copy held is a plasma object that can be counted."""
    got = driver(cluster, SERVICE + plasma_objects(cluster) + f"""
model = digits_mlp(hidden=512)
out, base = {{}}, plasma()
for mode in ("reject", "coalesce"):
    h = service.start(mode, spec(hidden=512), 1, os.path.join({str(tmp_path)!r}, mode), max_queued=1, when_full=mode)
    long = h.submit(nudged(model, 0), step=0, tol=1e-14, budget_s=1.5)    # runs 1.5 s: the others queue behind it
    wait_running(h, 0)
    futures, refused = {{}}, []
    for s in (1, 2, 3):
        try:
            futures[s] = h.submit(nudged(model, s), step=s, tol=1e-3)
        except hessdist.HessdistError as exc:
            refused.append({{"step": s, "type": type(exc).__name__, "message": str(exc)}})
    during = h.status()
    outcomes = {{}}
    for s, f in futures.items():
        try:
            outcomes[s] = h.result(f, timeout_s=120)["step"]
        except service.Superseded as exc:
            outcomes[s] = {{"type": type(exc).__name__, "message": str(exc), "step": exc.step, "by": exc.by}}
    h.result(long)
    out[mode] = {{"refused": refused, "queued": during["queued"], "rejected": during["rejected"],
                 "superseded": during["superseded"], "outcomes": outcomes,
                 "steps": [e["step"] for e in h.history()], "held": settled(base + 1) - base}}
    h.stop()
    out[mode]["after_stop"] = settled(base) - base
print(json.dumps(out))
""")
    reject, coalesce = got["reject"], got["coalesce"]
    assert reject["queued"] == [1] and reject["rejected"] == 2 and reject["superseded"] == 0
    assert [r["step"] for r in reject["refused"]] == [2, 3] and {r["type"] for r in reject["refused"]} == {"QueueFull"}
    message = reject["refused"][0]["message"]
    assert "max_queued=1" in message and "--max-queued" in message and "step 2 was not queued" in message
    assert reject["outcomes"] == {"1": 1} and reject["steps"] == [0, 1]

    assert coalesce["refused"] == [] and coalesce["queued"] == [3] and coalesce["superseded"] == 2
    assert coalesce["outcomes"]["3"] == 3 and coalesce["steps"] == [0, 3]
    for s, by in (("1", 2), ("2", 3)):
        lost = coalesce["outcomes"][s]
        assert lost["type"] == "Superseded" and (lost["step"], lost["by"]) == (int(s), by)
        assert f"step {s} was superseded by step {by}" in lost["message"]
    # once idle, a service holds one parameter copy (its workers' current parameters): no
    # superseded, refused or finished request keeps one alive
    assert reject["held"] == 1 and coalesce["held"] == 1, got
    assert reject["after_stop"] == 0 and coalesce["after_stop"] == 0, got


def test_keep_vectors_keeps_the_newest_solves_and_a_restart_warm_starts(cluster, tmp_path):
    """keep_vectors=2: only the two most recently *solved* steps keep their vector files
    (steps come in any order); history.jsonl keeps every entry and names what each solve
    pruned; a restarted service finds the newest vectors and warm-starts from them."""
    out = tmp_path / "svc"
    got = driver(cluster, SERVICE + f"""
model = digits_mlp()
h = service.start("keep", spec(), 1, {str(out)!r}, keep_vectors=2)
first = [h.result(h.submit(nudged(model, s), step=s, tol=1e-3, seed=0)) for s in (5, 1, 3, 2)]
files = sorted(os.listdir({str(out / "vectors")!r}))
status = h.status()
h.stop()
h = service.start("keep", spec(), 1, {str(out)!r}, keep_vectors=2)
after = h.result(h.submit(nudged(model, 9), step=9, tol=1e-3, seed=0))
print(json.dumps({{"pruned": [r.get("vectors_pruned") for r in first + [after]], "files": files,
                  "status": {{k: status[k] for k in ("keep_vectors", "vector_files", "solves")}},
                  "warm": after["warm_start"], "files_after": sorted(os.listdir({str(out / "vectors")!r})),
                  "steps": [e["step"] for e in h.history()]}}))
h.stop()
""")
    assert got["files"] == ["step-2.pt", "step-3.pt"]
    assert got["status"] == {"keep_vectors": 2, "vector_files": 2, "solves": 4}
    assert got["pruned"] == [None, None, [5], [1], [3]]
    assert got["warm"] and got["files_after"] == ["step-2.pt", "step-9.pt"]
    assert got["steps"] == [5, 1, 3, 2, 9]
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [e["step"] for e in history] == [5, 1, 3, 2, 9] and history[2]["vectors_pruned"] == [5]


def test_serve_makes_a_relative_out_dir_absolute_at_the_client(cluster, tmp_path):
    """`hessdist serve --out-dir runs/x` from some directory: the service writes to that
    directory's runs/x (not to a folder relative to its own Ray working directory), serve says
    where, and status shows it with the queue and retention options."""
    serve_args = ["serve", "--name", "rel", "--model", "hessdist.models:digits_mlp", "--data", "hessdist.examples:digits",
                  "--workers", "1", "--address", cluster, "--out-dir", "runs/x", "--max-queued", "3",
                  "--when-full", "coalesce", "--keep-vectors", "2"]
    proc = subprocess.run(HESSDIST + serve_args, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    status = json.loads(proc.stdout[proc.stdout.index("{"):])
    where = str(tmp_path / "runs" / "x")
    assert status["out_dir"] == where and (tmp_path / "runs" / "x" / "vectors").is_dir()
    assert f"out-dir: {where} on the service's node" in proc.stderr
    assert (status["max_queued"], status["when_full"], status["keep_vectors"]) == (3, "coalesce", 2)
    proc = subprocess.run(HESSDIST + ["stop", "--name", "rel", "--address", cluster], timeout=120, capture_output=True)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("option, value, says", [("--keep-vectors", "0", "expected a whole number >= 1"),
                                                 ("--max-queued", "-1", "expected a whole number >= 0"),
                                                 ("--when-full", "block", "invalid choice: 'block'")])
def test_serve_refuses_bad_queue_and_retention_options(option, value, says, capsys):
    from hessdist.cli import parser
    with pytest.raises(SystemExit) as exit_:
        parser().parse_args(["serve", "--name", "x", option, value])
    assert exit_.value.code == 2 and f"{option}: {says}" in capsys.readouterr().err


def test_saving_vectors_from_the_object_store_raises_no_warning(tmp_path):
    """The service saves eigenvectors that may be read-only arrays (out of Ray's object store):
    with PyTorch's read-only-array warning made an error, they are saved and read back alike.
    In a fresh process: PyTorch gives that warning once per process."""
    script = textwrap.dedent(f"""
        import warnings
        import numpy as np, torch
        from hessdist.history import History
        warnings.filterwarnings("error", message={NOT_WRITABLE!r})
        history = History({str(tmp_path)!r})
        vectors = {{"LA": np.arange(6.0).reshape(3, 2), "SA": np.ones((3, 1))}}
        for v in vectors.values():
            v.flags.writeable = False               # as Ray hands out arrays from its object store
        history.record({{"step": 7, "hvps": np.int64(3)}}, vectors)
        back = history.load_vectors(7)
        assert all(np.array_equal(back[k], vectors[k]) for k in vectors)
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
    assert json.loads((tmp_path / "history.jsonl").read_text()) == {"step": 7, "hvps": 3}


def test_report_ticks_the_step_axis_at_whole_steps():
    """Epochs are whole numbers: the report's step axis is never ticked at 0.5 (a few steps, gaps,
    many steps)."""
    import matplotlib.pyplot as plt
    from hessdist.report import figure

    def entry(step):
        return {"step": step, "largest": [1.0 + step], "smallest": [-0.1], "fpe": 3.0, "warm_start": step > 0,
                "intervals": {"largest": [[0.9 + step, 1.1 + step]], "smallest": [[-0.2, None]]}}

    for steps in ([0], [0, 1, 2], [1, 4, 9], list(range(30)), list(range(0, 300, 7))):
        fig = figure([entry(s) for s in steps], "t")
        fig.canvas.draw()
        for ax in fig.axes:
            lo, hi = ax.get_xlim()
            ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
            assert ticks and all(float(t).is_integer() for t in ticks), (steps, ticks)
        plt.close(fig)
