"""What the service tests share: a Ray head of their own started with `ray start --head`, and
driver processes connected to it as a trainer's would be, and the message a failed subprocess
leaves in an assertion."""
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time

HESSDIST = [sys.executable, "-m", "hessdist.cli"]
#: the prefix Ray puts at the start of a line it forwards from an actor or task (coloured or
#: not): "(EigenService pid=28113)", "(pid=12)", "(Worker pid=3, ip=10.0.0.2)"
FORWARDED = re.compile(r"^\s*(?:\x1b\[[\d;]*m)?\((?:[\w.:]+ )?pid=\d+")


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


def failure(proc: subprocess.CompletedProcess, limit: int = 4000) -> str:
    """A failed process's stderr for an assertion message: its own lines first (the lines Ray
    forwards from actors, such as a lost node's crash dumps, would bury the traceback), then
    the last of the forwarded ones."""
    own, forwarded = [], []
    for line in proc.stderr.splitlines():
        (forwarded if FORWARDED.search(line) else own).append(line)
    return "\n".join(own)[-limit:] + "\n--- forwarded from actors (last lines) ---\n" + \
        "\n".join(forwarded[-15:])[-limit // 2:]


def driver(address: str, code: str, timeout: int = 600, runtime_env: dict | None = None, lines: int = 1):
    """Run ``code`` in a separate Python process connected to the cluster; it prints one JSON
    (or ``lines`` of them, returned as a list: one driver process for several checks).
    ``runtime_env``: the job's (inherited by a service it starts, and by that service's workers)."""
    script = "import json, ray, torch, hessdist\n" \
             f"ray.init(address={address!r}, namespace='hessdist', logging_level='ERROR', " \
             f"runtime_env={runtime_env!r})\n" + textwrap.dedent(code)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, failure(proc)
    printed = [json.loads(line) for line in proc.stdout.strip().splitlines()[-lines:]]
    return printed[0] if lines == 1 else printed
