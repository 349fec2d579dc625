"""Fixtures shared by test modules."""
import os
import secrets
import shutil
import tempfile

import pytest
import ray
import torch

# One compute thread per process. `make test` runs two pytest processes with Ray workers and
# driver subprocesses on two cores; torch's default of a thread per core in every process
# oversubscribes them, and the threads then wait on one another (measured: 100 small solves
# 4 s with one thread, 61 s with the default beside another test process). Subprocesses and
# Ray heads started from here inherit the variable.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

from .service_setup import ray_head


def pytest_configure(config):
    """A folder the session's pytest processes share (dense references computed once, by the
    first process to need them: tests/helpers.py ``shared``); xdist workers inherit it."""
    if not hasattr(config, "workerinput") and "HESSDIST_TEST_SHARED" not in os.environ:
        config.hessdist_shared = os.environ["HESSDIST_TEST_SHARED"] = tempfile.mkdtemp(prefix="hessdist-tests-")


#: the slowest files, slowest first (measured: tests/*.py sum of durations). `make test` gives each
#: of its two processes whole files in collection order; a long file started last leaves the other
#: process idle while it runs, so they go first (longest-processing-time-first scheduling)
SLOWEST_FIRST = ("test_workers.py", "test_service.py", "test_worker_failures.py", "test_service_options.py",
                 "test_cli.py", "test_gpu_suite.py")


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))       # stable: each file stays whole


def pytest_unconfigure(config):
    folder = getattr(config, "hessdist_shared", None)
    if folder:
        shutil.rmtree(folder, ignore_errors=True)
        os.environ.pop("HESSDIST_TEST_SHARED", None)


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray cluster for one test module (16 logical CPUs: room for the worker groups a
    module keeps for all its tests beside those a test makes), shipping this folder to its
    workers so that they import the tests' factories."""
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    ray.init(address="local", num_cpus=16, include_dashboard=False, runtime_env={"py_modules": [tests_dir]},
             logging_level="ERROR")
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def digits_checkpoint(tmp_path_factory) -> str:
    """The digits-mlp example trained once per test process (as `--example digits-mlp` trains it),
    saved as a state_dict: drivers and `--checkpoint` load it instead of each training again."""
    import torch
    from hessdist.examples import get_example
    ex = get_example("digits-mlp")
    model = ex.model()
    ex.train(model, ex.data())
    path = str(tmp_path_factory.mktemp("digits") / "digits_mlp.pt")
    torch.save(model.state_dict(), path)
    return path


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

