"""A long-lived eigen-service on a shared token-authenticated cluster: bfloat16/float16 state
dicts, a bounded queue (reject or coalesce), vector retention, a relative out-dir, bad options,
and what it writes to disk."""
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from .service_setup import HESSDIST, driver

pytestmark = pytest.mark.ray


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
t0 = time.monotonic()
try:                                  # the old handle: a clear error at once, not a restart wait
    h.status()
    gone = None
except hessdist.WorkerError as exc:
    gone = {{"message": str(exc), "seconds": time.monotonic() - t0}}
h = service.start("keep", spec(), 1, {str(out)!r}, keep_vectors=2)
after = h.result(h.submit(nudged(model, 9), step=9, tol=1e-3, seed=0))
print(json.dumps({{"pruned": [r.get("vectors_pruned") for r in first + [after]], "files": files,
                  "status": {{k: status[k] for k in ("keep_vectors", "vector_files", "solves")}},
                  "warm": after["warm_start"], "gone": gone, "files_after": sorted(os.listdir({str(out / "vectors")!r})),
                  "steps": [e["step"] for e in h.history()]}}))
h.stop()
""")
    assert got["files"] == ["step-2.pt", "step-3.pt"]
    assert "is gone: it was stopped" in got["gone"]["message"] and got["gone"]["seconds"] < 10, got["gone"]
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
