"""The device suite cannot rot: its --smoke runs every check's code on the CPU (tiny sizes), and
without a GPU the suite writes "not measured", never an estimate."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def suite(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "benchmarks.gpu_suite", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env={**os.environ, **(env or {})})


def test_smoke_runs_every_check_and_each_passes(tmp_path):
    out = tmp_path / "smoke.json"
    run = suite("--smoke", "--out", str(out), "--also-write", str(tmp_path / "copy"))
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads(out.read_text())
    assert result["status"].startswith("smoke") and result["passed"]
    assert json.loads((tmp_path / "copy" / "smoke.json").read_text()) == result
    checks = result["checks"]
    assert list(checks) == ["environment", "determinism", "data_paths", "collectives", "cost", "headline", "products"]
    assert all(c["passed"] for c in checks.values())
    rows = {(r["problem"], r["config"]): r for r in checks["products"]["rows"]}
    assert rows[("digits CNN+BN", "float64 forward")]["relative_error"] < 1e-12
    assert rows[("digits CNN+BN", "float32 forward compiled")]["compiles"] >= 1
    assert checks["collectives"]["ray"]["relative_gap"] < 1e-10
    assert all(checks["determinism"]["train_mode_refused"].values())
    full = checks["headline"]["variants"]["float32"]["full_data"]
    assert full["converged"] and full["goal_60s_met"] == (full["whole_call_s"] < 60)


def test_without_a_gpu_the_suite_says_not_measured(tmp_path):
    out = tmp_path / "suite.json"
    assert suite("--out", str(out), env={"CUDA_VISIBLE_DEVICES": ""}).returncode == 0    # no GPU seen
    result = json.loads(out.read_text())
    assert result["status"] == "not measured" and "checks" not in result
