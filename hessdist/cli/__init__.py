"""``hessdist`` command line: ``hessdist eigs`` computes extreme eigenpairs of a full-dataset
loss Hessian (or GGN), on a local Ray cluster by default, an existing one with ``--address``,
or in-process with ``--workers 0``. One module per command group."""
from __future__ import annotations

import argparse
import sys

from ..errors import HessdistError
from . import directions, eigs, service, spectrum, studies

COMMAND_GROUPS = (eigs, spectrum, directions, studies, service)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="hessdist", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    for group in COMMAND_GROUPS:
        group.add_parsers(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except HessdistError as exc:
        print(f"hessdist: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
