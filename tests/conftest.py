"""Fixtures shared by test modules."""
import os
import secrets

import pytest
import ray

from .service_setup import ray_head


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray cluster for one test module (10 logical CPUs), shipping this folder to its
    workers so that they import the tests' factories."""
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    ray.init(address="local", num_cpus=10, include_dashboard=False, runtime_env={"py_modules": [tests_dir]},
             logging_level="ERROR")
    yield
    ray.shutdown()


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

