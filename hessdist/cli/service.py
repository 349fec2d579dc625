"""``hessdist serve | status | scale | stop | report``: the named eigen-service on a Ray cluster, and
its history rendered for a person."""
from __future__ import annotations

import argparse
import json
import os
import sys

from .common import add_problem_options, build_job, operator_spec


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _count(least: int):
    """An argparse type: a whole number >= ``least``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = least - 1
        if value < least:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {least}, got {text!r}")
        return value
    return parse


#: filesystems that only their own node sees
LOCAL_FILESYSTEMS = {"ext2", "ext3", "ext4", "xfs", "btrfs", "zfs", "tmpfs", "overlay", "f2fs", "vfat", "ramfs"}


def cmd_serve(args: argparse.Namespace) -> int:
    import ray
    from .. import service
    from ..workers import connect, worker_layout
    max_queued = {None: service.DEFAULT_MAX_QUEUED, 0: None}.get(args.max_queued, args.max_queued)
    service.check_queue_options(max_queued, args.when_full, args.keep_vectors)
    # made absolute here: the service would resolve a relative path against its own working
    # directory, a Ray session folder on whichever node it lands on
    out_dir = os.path.abspath(os.path.expanduser(args.out_dir or os.path.join("hessdist-out", args.name)))
    job = build_job(args, _say)
    connect(args.address or "auto", runtime_env=job.runtime_env())
    spec = operator_spec(args, job)
    workers, gpus, chosen = worker_layout(args.workers, args.gpus_per_worker)
    _say(f"starting the service with {chosen}; history and eigenvectors go to {out_dir} ...")
    handle = service.start(args.name, spec, workers, out_dir, gpus_per_worker=gpus,
                           group_options={"min_workers": args.min_workers, "grow_timeout_s": args.grow_timeout},
                           max_queued=max_queued, when_full=args.when_full, keep_vectors=args.keep_vectors)
    status = handle.status()
    nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
    fs = status.get("out_dir_filesystem")
    _say(f"out-dir: {status['out_dir']} on the service's node {status['node']} ({fs or 'filesystem unknown'})")
    if nodes > 1:
        _say(f"{'WARNING: ' if fs in LOCAL_FILESYSTEMS else ''}this cluster has {nodes} nodes: the out-dir must be "
             "on storage every node sees (NFS, a shared or object-store mount): a service whose node is lost "
             "restarts on another and reads its history and eigenvectors back from there"
             + (f"; {fs} is a local filesystem" if fs in LOCAL_FILESYSTEMS else ""))
    print(json.dumps(status, indent=2))
    return 0


def cmd_manage(args: argparse.Namespace) -> int:
    from .. import service
    handle = service.connect(args.name, args.address or "auto")
    if args.command == "status":
        print(json.dumps(handle.status(), indent=2))
    elif args.command == "scale":
        print(json.dumps(handle.scale(args.workers), indent=2))
    else:
        handle.stop()
        print(f"stopped service {args.name!r} and its workers")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from ..report import render
    path, text = render(args.out_dir, args.png)
    print(text)
    print(f"wrote {path} and report.txt beside it")
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="start a named, detached eigen-service on a Ray cluster")
    add_problem_options(p)
    p.add_argument("--name", required=True)
    p.add_argument("--out-dir", help="history and eigenvectors (default hessdist-out/NAME), made absolute here; "
                   "on a cluster of several nodes it must be on storage every node sees")
    # defaults from hessdist.service, which is not imported here (it imports Ray)
    p.add_argument("--max-queued", type=_count(0), metavar="N",
                   help="steps that may wait behind the running solve, each holding a copy of the parameters "
                   "(default 8; 0 = no limit)")
    p.add_argument("--when-full", choices=("reject", "coalesce"), default="reject",
                   help="a submit that finds the queue full: reject it (the trainer gets QueueFull; default) or "
                   "coalesce (the oldest queued steps make way for it and raise Superseded)")
    p.add_argument("--keep-vectors", type=_count(1), metavar="N",
                   help="keep the eigenvector files of the newest N solves (default: every step's); "
                   "history.jsonl keeps every entry")
    p.set_defaults(func=cmd_serve)
    for name, text in (("status", "show a service's workers, queue and latest result"),
                       ("stop", "remove a service and its workers"),
                       ("scale", "replace a service's worker group by one of --workers workers")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--name", required=True)
        p.add_argument("--address", help="Ray cluster (default auto)")
        if name == "scale":
            p.add_argument("--workers", type=int, required=True)
        p.set_defaults(func=cmd_manage)
    p = sub.add_parser("report", help="render a service's history (OUT_DIR/history.jsonl) as a PNG and a summary")
    p.add_argument("out_dir", metavar="OUT_DIR")
    p.add_argument("--png", help="where to write the figure (default OUT_DIR/report.png)")
    p.set_defaults(func=cmd_report)
