"""A service's out-dir: ``history.jsonl`` (one JSON line per solve, in the order solved) and
``vectors/step-<step>.pt`` (each solve's eigenvectors, the newest ``keep_vectors`` steps' or
all). Written so that a crash never leaves a history line without its vectors; read by a
restarted service (to warm-start again) and by ``hessdist report``. No Ray here."""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import numpy as np
import torch

HISTORY = "history.jsonl"


def plain(value: Any) -> Any:
    """JSON for the NumPy scalars and arrays a result may hold (an np.int64 product count)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def parameters_digest(state: dict[str, np.ndarray]) -> str:
    """A SHA-256 of a state_dict's names, dtypes, shapes and values: whether a step submitted
    again is the one already solved (then its recorded answer is the answer)."""
    digest = hashlib.sha256()
    for key in sorted(state):
        value = np.ascontiguousarray(state[key])
        digest.update(f"{key}|{value.dtype.str}|{value.shape}|".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def read_history(out_dir: str) -> list[dict]:
    """The solves recorded in ``out_dir/history.jsonl``, in the order they were written ([] if none)."""
    path = os.path.join(out_dir, HISTORY)
    if not os.path.exists(path):
        return []
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def filesystem(path: str) -> str | None:
    """The type of the filesystem ``path`` lies on (``ext4``, ``nfs4``, ...), from /proc/mounts."""
    try:
        with open("/proc/mounts") as fh:
            mounts = [line.split()[1:3] for line in fh if len(line.split()) >= 3]
    except OSError:
        return None
    path = os.path.realpath(path)
    best = max((m for m in mounts if path == m[0] or path.startswith(m[0].rstrip("/") + "/")),
               key=lambda m: len(m[0]), default=None)
    return best[1] if best else None


class History:
    """The solves recorded in ``out_dir`` (``entries``, oldest first) and their vector files."""

    def __init__(self, out_dir: str, keep_vectors: int | None = None):
        self.out_dir, self.keep_vectors = os.path.abspath(out_dir), keep_vectors
        os.makedirs(os.path.join(self.out_dir, "vectors"), exist_ok=True)
        self.entries = read_history(self.out_dir)

    def vectors_path(self, step: int) -> str:
        return os.path.join(self.out_dir, "vectors", f"step-{step}.pt")

    def load_vectors(self, step: int) -> dict[str, np.ndarray]:
        path = self.vectors_path(step)
        if not os.path.exists(path):
            return {}
        return {k: v.numpy() for k, v in torch.load(path, weights_only=True).items()}

    def latest_vectors(self) -> dict[str, np.ndarray]:
        """The newest solve's eigenvectors ({} before the first): what the next solve warm-starts from."""
        return self.load_vectors(self.entries[-1]["step"]) if self.entries else {}

    def record(self, entry: dict, vectors: dict[str, np.ndarray]) -> None:
        """Vectors first, then one appended (flushed, fsynced) history line, then the vector
        files ``keep_vectors`` no longer keeps (named in the entry, ``vectors_pruned``): a crash
        between them leaves an unreferenced or an unpruned vector file, never a history line
        without vectors. The line is encoded before anything is written."""
        prune = self._to_prune([*self.entries, entry])
        if prune:
            entry["vectors_pruned"] = prune
        line = json.dumps(entry, default=plain)
        # torch.tensor copies: torch.from_numpy would share the array, and an array that came
        # out of the object store is read-only (PyTorch warns, and a tensor on it must not be written)
        torch.save({k: torch.tensor(np.asarray(v)) for k, v in vectors.items()}, self.vectors_path(entry["step"]))
        with open(os.path.join(self.out_dir, HISTORY), "a") as fh:
            fh.write(line + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        for step in prune:
            try:
                os.remove(self.vectors_path(step))
            except FileNotFoundError:
                pass
        self.entries.append(entry)

    def _to_prune(self, entries: list[dict]) -> list[int]:
        """Steps whose vector files are older than the newest ``keep_vectors`` solves (in the
        order they were solved: the newest is what the next solve warm-starts from)."""
        if self.keep_vectors is None:
            return []
        newest = {e["step"] for e in entries[-self.keep_vectors:]}
        return [e["step"] for e in entries[:-self.keep_vectors]
                if e["step"] not in newest and os.path.exists(self.vectors_path(e["step"]))]

    def vector_files(self) -> tuple[int, int]:
        """(count, bytes) of the vector files in the out-dir."""
        folder = os.path.join(self.out_dir, "vectors")
        try:
            sizes = [entry.stat().st_size for entry in os.scandir(folder) if entry.name.endswith(".pt")]
        except OSError:
            return 0, 0
        return len(sizes), sum(sizes)
