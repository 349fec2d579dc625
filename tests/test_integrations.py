"""The Lightning and Hugging Face callbacks: a tiny float64 MLP trained for a few epochs on real
digits; what each callback logged at each epoch equals an in-process solve at the parameters
saved at that epoch (same seed, same warm-start chain), and its intervals contain the dense
eigenvalues of the float64 Hessian. The service path: a real local Ray cluster and
eigen-service, the logged values equal to the service's history."""
from __future__ import annotations

import concurrent.futures
import csv
import threading
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, Logger
from transformers import Trainer, TrainerCallback, TrainingArguments

from hessdist.curvature import CurvatureOperator
from hessdist.errors import HessdistError, InputError, Superseded
from hessdist.examples import digits
from hessdist.integrations import DEFAULT_RTOL, HessianSolveWarning, SpectrumMonitor
from hessdist.integrations.background import Pending
from hessdist.integrations.monitor import require
from hessdist.integrations.huggingface import HessianCallback as HFHessianCallback
from hessdist.integrations.lightning import HessianCallback as PLHessianCallback
from hessdist.solvers.certify import solve

N_SAMPLES, SEED = 256, 0


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One intra-op thread for the training thread and one for the solver thread: on a shared
    2-core machine, OpenMP teams of 2 from both threads (and other processes) oversubscribe the
    cores and their spinning makes these small products up to 40x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data():
    x, y = digits()
    return x[:N_SAMPLES].double(), y[:N_SAMPLES]


def mlp(seed: int = 0) -> nn.Module:
    """64 → 8 → 10 tanh, float64: 610 parameters, a dense Hessian in well under a second."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 8), nn.Tanh(), nn.Linear(8, 10)).double()


def clone_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def dense_eigenvalues(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """Eigenvalues of the dense float64 Hessian of the mean cross-entropy, from torch.func.hessian
    of the loss over all samples in one batch (independent of hessdist's operator)."""
    names = [n for n, _ in net.named_parameters()]
    shapes = [p.shape for _, p in net.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in net.parameters()])

    def loss(t):
        params = {n: c.reshape(s) for n, c, s in zip(names, t.split([s.numel() for s in shapes]), shapes)}
        return F.cross_entropy(functional_call(net, params, (x,)), y)

    return np.linalg.eigvalsh(torch.func.jacrev(torch.func.jacrev(loss))(theta).numpy())


def reference_chain(model: nn.Module, states: list[dict], loss, data, **operator_options) -> list:
    """In-process solves at the saved states, chained as the callbacks chain them: the same
    seed, options and accuracy, each warm-started from the previous one's eigenvectors."""
    previous, out = None, []
    for state in states:
        model.load_state_dict(state)
        op = CurvatureOperator(model, loss, data, dtype=torch.float64, **operator_options)
        res = solve(op, which="LA,SA", k=1, tol=None, rtol=DEFAULT_RTOL, seed=SEED, previous=previous).result
        previous = {w: p.vectors for w, p in res.pairs.items()}
        out.append(res)
    return out


def check_against_reference(logged: list[dict], model: nn.Module, states: list[dict], loss, data,
                            **operator_options) -> None:
    """Every logged value equals the reference solve's (:func:`reference_chain` at the saved
    ``states`` of ``model``, whose ``net`` is the network) to 1e-8 relative; the certified
    intervals contain the dense eigenvalues; products and warm starts agree."""
    references = reference_chain(model, states, loss, data, **operator_options)
    dense = []
    for state in states:
        model.load_state_dict(state)
        dense.append(dense_eigenvalues(model.net, *data))
    assert len(logged) == len(references) == len(dense)
    for i, (m, ref, ev) in enumerate(zip(logged, references, dense)):
        for name, pair, exact in (("lambda_max", ref.largest, ev[-1]), ("lambda_min", ref.smallest, ev[0])):
            key = f"hessian/{name}"
            assert m[key] == pytest.approx(float(pair.values[0]), rel=1e-8, abs=1e-14), (i, name)
            lo, hi = pair.intervals[0]
            assert m[f"{key}_lo"] == pytest.approx(lo, rel=1e-8, abs=1e-14), (i, name)
            assert m[f"{key}_hi"] == pytest.approx(hi, rel=1e-8, abs=1e-14), (i, name)
            assert m[f"{key}_residual"] == pytest.approx(float(pair.residual_norms[0]), rel=1e-6, abs=1e-14)
            slack = 1e-10 * abs(ev).max()
            assert m[f"{key}_lo"] - slack <= exact <= m[f"{key}_hi"] + slack, (i, name, exact, lo, hi)
            # and accurate as asked: λ_max to 1%, λ_min to 5% (plus the absolute tol floor near 0)
            assert abs(m[key] - exact) <= DEFAULT_RTOL[pair.which] * abs(exact) + 1e-6 * abs(ev).max()
        assert m["hessian/hvps"] == ref.hvps and m["hessian/fpe"] == pytest.approx(ref.fpe, rel=1e-12)
        assert m["hessian/converged"] == float(ref.converged) == 1.0
        assert m["hessian/warm_start"] == float(i > 0)


# -- PyTorch Lightning ---------------------------------------------------------------------------
class LitMLP(pl.LightningModule):
    def __init__(self, net: nn.Module, lr: float = 0.5):
        super().__init__()
        self.net, self.lr = net, lr

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y.long())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class LitSnapshots(Callback):
    """The module's state at every training epoch end, keyed by global step."""

    def __init__(self):
        self.states: dict[int, dict] = {}

    def on_train_epoch_end(self, trainer, pl_module):
        self.states[trainer.global_step] = clone_state(pl_module)


def wait_for_solves(hessian: SpectrumMonitor, timeout_s: float = 120) -> None:
    """Until the solves requested so far have finished (not collected: the callback's own hooks
    do that), so that the next hooks have results to log during training."""
    done, running = concurrent.futures.wait([p.future for p in hessian._pending], timeout=timeout_s)
    assert not running


class Gate(Callback):
    """Keeps the background solves waiting until the third epoch starts, and checks there that
    training got that far with two solves requested and none finished: requests do not block.
    Then lets them finish before that epoch's first batch, so that the callback's per-batch polls
    log them during training, and records at train end (before the callback's own end, which
    waits for the rest) what had been collected."""

    def __init__(self, gate: threading.Event, hessian: SpectrumMonitor):
        self.gate, self.hessian, self.seen, self.before_end = gate, hessian, None, None

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 2:
            self.seen = (list(self.hessian.pending), list(self.hessian.results))
            self.gate.set()
            wait_for_solves(self.hessian)

    def on_train_end(self, trainer, pl_module):
        self.before_end = [s.step for s in self.hessian.results]


def lightning_trainer(callbacks, logger, epochs):
    return pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=logger, callbacks=callbacks,
                      enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                      log_every_n_steps=1, num_sanity_val_steps=0)


def test_lightning_logs_match_in_process_solves(data, tmp_path):
    x, y = data
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64, shuffle=False)
    training_thread, gate = threading.get_ident(), threading.Event()

    def gated_cross_entropy(outputs, targets):      # the solves, off the training thread, wait for the gate
        if threading.get_ident() != training_thread:
            assert gate.wait(timeout=120)
        return F.cross_entropy(outputs, targets)

    hessian = PLHessianCallback(gated_cross_entropy, (x, y), seed=SEED, operator_options={"batch_size": 128},
                                poll_interval_s=0.0)
    snapshots, gate_cb = LitSnapshots(), Gate(gate, hessian)
    module = LitMLP(mlp())
    lightning_trainer([snapshots, gate_cb, hessian], CSVLogger(tmp_path, name="csv"), epochs=3).fit(module, loader)

    steps = sorted(snapshots.states)
    assert steps == [4, 8, 12]                      # 256 samples in batches of 64: 4 steps an epoch
    pending, finished = gate_cb.seen
    assert pending == [(4, 1), (8, 2)] and finished == []      # two epochs trained while both solves waited
    assert gate_cb.before_end == [4, 8]             # logged by the callback's polls during the third epoch
    assert [s.step for s in hessian.results] == steps and not hessian.errors and not hessian.pending

    # what reached the CSV logger's file, with the step and epoch each result belongs to
    with open(tmp_path / "csv" / "version_0" / "metrics.csv") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("hessian/lambda_max")]
    rows.sort(key=lambda r: int(r["step"]))
    assert [int(r["step"]) for r in rows] == steps
    assert [float(r["hessian/step"]) for r in rows] == steps and [float(r["hessian/epoch"]) for r in rows] == [1, 2, 3]
    logged = [{k: float(v) for k, v in r.items() if k.startswith("hessian/") and v != ""} for r in rows]

    check_against_reference(logged, LitMLP(mlp(seed=1)), [snapshots.states[s] for s in steps], "cross_entropy",
                            data, batch_size=128)
    # the parameters moved between epochs: the test would see a solve at the wrong epoch's parameters
    assert len({round(m["hessian/lambda_max"], 6) for m in logged}) == 3


# -- Hugging Face transformers -------------------------------------------------------------------
class TinyClassifier(nn.Module):
    """A Trainer-ready model: forward(x, labels) returns a dict with "loss" and "logits"."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x, labels=None):
        logits = self.net(x)
        return {"logits": logits} if labels is None else {"loss": F.cross_entropy(logits, labels), "logits": logits}


class DictDataset(torch.utils.data.Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


class HFSnapshots(TrainerCallback):
    """The model's state at every epoch end, keyed by global step; before the second epoch, waits
    for the solve requested at the first, so that the callback's step-end polls log it then."""

    def __init__(self, hessian: SpectrumMonitor):
        self.states: dict[int, dict] = {}
        self.hessian = hessian

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        self.states[state.global_step] = clone_state(model)

    def on_epoch_begin(self, args, state, control, **kwargs):
        if round(state.epoch) == 1:
            wait_for_solves(self.hessian)


def logits_cross_entropy(outputs, targets):
    return F.cross_entropy(outputs["logits"], targets)


def hf_trainer(model, data, tmp_path, epochs: int) -> Trainer:
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), num_train_epochs=epochs, per_device_train_batch_size=64,
                             learning_rate=0.05, use_cpu=True, report_to=[], save_strategy="no",
                             logging_strategy="no", disable_tqdm=True, remove_unused_columns=False, seed=SEED,
                             dataloader_num_workers=0)
    return Trainer(model=model, args=args, train_dataset=DictDataset(*data))


def test_huggingface_logs_match_in_process_solves(data, tmp_path):
    x, y = data
    trainer = hf_trainer(TinyClassifier(mlp()), data, tmp_path, epochs=2)
    # defaults throughout (dtype from the float64 model, operator batch size), polling every step
    hessian = HFHessianCallback(logits_cross_entropy, (x, y), seed=SEED, poll_interval_s=0.0).attach(trainer)
    snapshots = HFSnapshots(hessian)
    trainer.add_callback(snapshots)
    trainer.train()

    steps = sorted(snapshots.states)
    assert steps == [4, 8]                          # 256 samples in batches of 64
    assert [s.step for s in hessian.results] == steps and not hessian.errors and not hessian.pending
    logged = [e for e in trainer.state.log_history if "hessian/lambda_max" in e]
    logged.sort(key=lambda e: e["hessian/step"])
    assert [e["hessian/step"] for e in logged] == steps and [e["hessian/epoch"] for e in logged] == [1.0, 2.0]
    # the first was logged during the second epoch, by its first step (the trainer stamps its
    # current step: hence hessian/step); the last one at the end of training, after train_runtime
    history = trainer.state.log_history
    end = next(i for i, e in enumerate(history) if "train_runtime" in e)
    assert logged[0]["step"] <= 5 and history.index(logged[0]) < end
    assert logged[1]["step"] == 8 and history.index(logged[1]) > end

    check_against_reference(logged, TinyClassifier(mlp(seed=1)), [snapshots.states[s] for s in steps],
                            logits_cross_entropy, data)
    assert len({round(e["hessian/lambda_max"], 6) for e in logged}) == 2


def test_huggingface_callback_must_be_bound(data, tmp_path):
    x, y = data
    cb = HFHessianCallback(logits_cross_entropy, (x, y))
    trainer = hf_trainer(TinyClassifier(mlp()), data, tmp_path, epochs=1)
    trainer.add_callback(cb)                        # added, but not bound: it could not log
    with pytest.raises(InputError, match=r"attach\(trainer\)"):
        trainer.train()


# -- the shared core: failures, options, imports --------------------------------------------------
def test_a_failed_solve_is_warned_with_its_cause_and_raised_at_the_end_if_asked(data):
    x, y = data
    training_thread = threading.get_ident()

    def failing_off_thread(outputs, targets):
        if threading.get_ident() != training_thread:
            raise RuntimeError("boom in the loss")
        return F.cross_entropy(outputs, targets)

    model = mlp()
    for raise_on_error in (False, True):
        monitor = SpectrumMonitor(failing_off_thread, (x, y), raise_on_error=raise_on_error, seed=SEED)
        monitor.after_epoch(model, epochs_done=1, step=3)             # returns at once; fails in the background
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if raise_on_error:
                with pytest.raises(HessdistError, match="boom in the loss") as info:
                    monitor.finish(timeout_s=60)
                assert isinstance(info.value.__cause__, RuntimeError)
            else:
                assert monitor.finish(timeout_s=60)[0].error is not None
        messages = [str(w.message) for w in caught if issubclass(w.category, HessianSolveWarning)]
        assert len(messages) == 1 and "step 3" in messages[0] and "RuntimeError: boom in the loss" in messages[0]
        assert [s.step for s in monitor.errors] == [3] and monitor.results == []


def test_solves_still_running_at_the_end_are_named_not_waited_for_forever(data):
    x, y = data
    training_thread, gate = threading.get_ident(), threading.Event()

    def gated(outputs, targets):
        if threading.get_ident() != training_thread:
            assert gate.wait(timeout=60)
        return F.cross_entropy(outputs, targets)

    monitor = SpectrumMonitor(gated, (x, y), every_n_epochs=None, every_n_steps=2, poll_interval_s=3600)
    model = mlp()
    for step in (1, 2, 2, 3, 4):                    # due at 2 and 4; the repeated step 2 is asked once
        monitor.after_step(model, step=step, epoch=0)
    assert monitor.pending == [(2, 0), (4, 0)] and monitor.poll() == []
    try:
        with pytest.warns(HessianSolveWarning, match=r"2 Hessian solve\(s\) \(steps \[2, 4\]\) still running"):
            assert monitor.finish(timeout_s=0.2) == []
    finally:
        gate.set()
    assert monitor.pending == [] and monitor.results == [] and monitor.errors == []


def test_options_are_checked_up_front_and_imports_name_the_extra(data):
    x, y = data
    with pytest.raises(InputError, match="needs loss= and data="):
        SpectrumMonitor("cross_entropy")
    with pytest.raises(InputError, match="drop loss="):
        SpectrumMonitor("cross_entropy", (x, y), service="svc")
    with pytest.raises(InputError, match="rtol must lie in"):
        SpectrumMonitor("cross_entropy", (x, y), rtol=2.0)
    with pytest.raises(InputError, match="every_n_epochs"):
        SpectrumMonitor("cross_entropy", (x, y), every_n_epochs=0)
    with pytest.raises(InputError, match="process-wide TF32 switch.*hessdist serve --tf32"):
        SpectrumMonitor("cross_entropy", (x, y), operator_options={"tf32": True})
    model = nn.Linear(64, 10)
    assert SpectrumMonitor("cross_entropy", (x, y))._operator_kwargs(model) == {"dtype": torch.float32,
                                                                              "device": torch.device("cpu")}
    on_gpu = SpectrumMonitor("cross_entropy", (x, y), operator_options={"device": "cuda", "basis_share": 0.2})
    assert on_gpu._operator_kwargs(model) == {"dtype": torch.float32, "device": "cuda", "placement": "stream",
                                              "basis_share": 0.2}      # the training's GPU: streamed data
    with pytest.raises(InputError, match="basis_share"):
        CurvatureOperator(model, "cross_entropy", (x, y), basis_share=0.0)
    only_top = SpectrumMonitor("cross_entropy", (x, y), which="LA")     # the default rtol keeps LA's 1%
    assert only_top.rtol == {"LA": 1e-2}
    steps = SpectrumMonitor("cross_entropy", (x, y), every_n_epochs=None, every_n_steps=4)
    assert [s for s in range(13) if steps.due_after_step(s)] == [4, 8, 12] and not steps.due_after_epoch(4)
    with pytest.raises(ImportError, match=r"pip install 'hessdist\[lightning\]'"):
        require("hessdist_no_such_module", "lightning", "PyTorch Lightning")
    with pytest.raises(InputError, match=r"unknown solve_options \['max_hvp'\]"):
        SpectrumMonitor("cross_entropy", (x, y), solve_options={"max_hvp": 10})
    with pytest.raises(InputError, match=r"unknown solve_options \['basis_dtype'\] for an eigen-service"):
        SpectrumMonitor(service="svc", solve_options={"basis_dtype": torch.float32})
    SpectrumMonitor("cross_entropy", (x, y), solve_options={"max_basis": 10, "subset": None, "max_fpe": 5})
    with pytest.raises(InputError, match=r"no submodule 'nett'.*children are \['0', '1', '2'\]"):
        SpectrumMonitor("cross_entropy", (x, y), module="nett").request(mlp(), step=1)


def test_a_lightning_callback_with_a_misspelt_module_stops_before_training(data):
    x, y = data
    cb = PLHessianCallback("cross_entropy", (x, y), module="nett")
    module = LitMLP(mlp())
    before = clone_state(module)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64)
    with pytest.raises(InputError, match="no submodule 'nett'"):
        lightning_trainer([cb], False, epochs=1).fit(module, loader)
    assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items())   # not one step was taken


def test_a_superseded_step_is_listed_not_reported_as_failed(data):
    x, y = data
    monitor = SpectrumMonitor("cross_entropy", (x, y))
    future = concurrent.futures.Future()
    future.set_exception(Superseded("step 3 was superseded by step 4", 3, 4))
    monitor._pending.append(Pending(3, 1.0, future))
    with warnings.catch_warnings():
        warnings.simplefilter("error")                          # no HessianSolveWarning
        assert monitor.poll() == []
    assert monitor.superseded == [3] and monitor.errors == [] and monitor.results == []


# -- the eigen-service path ------------------------------------------------------------------------
class MemoryLogger(Logger):
    """A Lightning logger that keeps what it is given."""

    def __init__(self):
        super().__init__()
        self.rows: list[tuple[int, dict]] = []

    @property
    def name(self):
        return "memory"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.rows.append((step, dict(metrics)))


@pytest.fixture(scope="module")
def ray_cluster():
    import ray
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield
    if started:
        ray.shutdown()


@pytest.mark.ray
def test_lightning_with_the_eigen_service_logs_its_history(ray_cluster, tmp_path):
    from hessdist.models import digits_mlp
    from hessdist.service import start
    from hessdist.workers import OperatorSpec

    spec = OperatorSpec(model="hessdist.models:digits_mlp", data="hessdist.examples:digits", dtype="float64",
                        batch_size=1024)
    handle = start("hessdist-test-callbacks", spec, workers=1, out_dir=str(tmp_path / "svc"))
    try:
        x, y = digits()
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=300, shuffle=False)
        hessian = PLHessianCallback(service="hessdist-test-callbacks", module="net", seed=SEED, wait_timeout_s=300)
        snapshots, logger = LitSnapshots(), MemoryLogger()
        module = LitMLP(digits_mlp(), lr=0.5)      # float32 training; the service solves in float64
        lightning_trainer([snapshots, hessian], logger, epochs=2).fit(module, loader)
        history = handle.history()
    finally:
        handle.stop()

    steps = sorted(snapshots.states)
    assert steps == [6, 12] and [h["step"] for h in history] == steps      # 1,797 samples in batches of 300
    assert [h["warm_start"] for h in history] == [False, True] and not hessian.errors
    logged = sorted((row for row in logger.rows if "hessian/lambda_max" in row[1]), key=lambda r: r[0])
    assert [step for step, _ in logged] == steps
    for (step, m), h in zip(logged, history):
        assert m["hessian/step"] == step and m["hessian/epoch"] == steps.index(step) + 1
        assert m["hessian/lambda_max"] == h["largest"][0] and m["hessian/lambda_min"] == h["smallest"][0]
        assert [m["hessian/lambda_max_lo"], m["hessian/lambda_max_hi"]] == h["intervals"]["largest"][0]
        assert [m["hessian/lambda_min_lo"], m["hessian/lambda_min_hi"]] == h["intervals"]["smallest"][0]
        assert m["hessian/hvps"] == h["hvps"] and m["hessian/fpe"] == h["fpe"]
        assert m["hessian/converged"] == float(h["converged"]) == 1.0
        assert h["seed"] == SEED
    # the service solved at the parameters of each epoch: its intervals hold a tight in-process
    # solve's λ_max and λ_min there (an independent float64 reference, not the service's history)
    for step, h in zip(steps, history):
        net = digits_mlp()
        net.load_state_dict({k.removeprefix("net."): v for k, v in snapshots.states[step].items()})
        op = CurvatureOperator(net, "cross_entropy", (x, y), dtype=torch.float64, batch_size=1024)
        exact = solve(op, which="LA,SA", rtol=1e-9, tol=1e-12, seed=SEED).result
        for end, value in (("largest", exact.largest.values[0]), ("smallest", exact.smallest.values[0])):
            lo, hi = h["intervals"][end][0]
            slack = 1e-8 * abs(exact.largest.values[0])
            assert lo - slack <= value <= hi + slack, (step, end, lo, value, hi)
