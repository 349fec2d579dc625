"""The process group's collectives as the workers use them: a flat sum, and the agreement that
keeps a failure on one rank from stranding the others inside a collective."""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..curvature import Agreement
from ..errors import HessdistError


class PeerFailed(HessdistError):
    """Another rank failed the same call; its own error is the one the driver reports."""


def all_reduce_sum(t: torch.Tensor) -> None:
    dist.all_reduce(t, op=dist.ReduceOp.SUM)


def agree_across_ranks(device: torch.device) -> Agreement:
    """Every rank says whether its local part failed (one flag per rank, all-reduced) before any
    sum: a failure anywhere then raises everywhere — the failing rank's own error there, PeerFailed
    on the others — and no rank is left inside a collective its peers never enter."""
    def agree(error: BaseException | None) -> None:
        flags = torch.zeros(dist.get_world_size(), dtype=torch.float64, device=device)
        flags[dist.get_rank()] = error is not None
        dist.all_reduce(flags, op=dist.ReduceOp.SUM)
        if error is not None:
            raise error
        if flags.any():
            raise PeerFailed(f"rank(s) {flags.nonzero().flatten().tolist()} failed the same pass")
    return agree
