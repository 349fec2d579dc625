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


def cmd_serve(args: argparse.Namespace) -> int:
    from .. import service
    from ..workers import connect, worker_layout
    job = build_job(args, _say)
    connect(args.address or "auto", runtime_env=job.runtime_env())
    spec = operator_spec(args, job)
    workers, gpus, chosen = worker_layout(args.workers, args.gpus_per_worker)
    _say(f"starting the service with {chosen} ...")
    out_dir = args.out_dir or os.path.join("hessdist-out", args.name)
    handle = service.start(args.name, spec, workers, out_dir, gpus_per_worker=gpus,
                           group_options={"min_workers": args.min_workers})
    print(json.dumps(handle.status(), indent=2))
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
    p.add_argument("--out-dir", help="history and eigenvectors (default hessdist-out/NAME)")
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
