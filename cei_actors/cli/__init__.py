"""The ``cei`` command (DESIGN.md §6): errors are one line on stderr, exit 1; usage errors exit 2."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from ..eventlog import EventLogError
from . import logcmds
from .output import CliError, Output


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # usage errors: one line, exit 2
        print(f"cei: {message}", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cei", description="Common Execution Infrastructure, as event-sourced actors")
    parser.add_argument("--json", action="store_true", help="machine output: one JSON document on stdout")
    parser.add_argument("--home", default=os.environ.get("CEI_HOME", ".cei"), help="runtime files and the embedded log (default ./.cei or $CEI_HOME)")
    parser.add_argument("--log", dest="log_url", default=None, help="log URL (default: sqlite under --home)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    logcmds.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``cei`` command; returns the exit status (the console script exits with it)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    home = Path(args.home).absolute()
    args.home = home
    if args.log_url is None:
        args.log_url = f"sqlite:///{home / 'log.sqlite'}"
    out = Output(args.json)
    try:
        return int(args.func(args, out) or 0)
    except CliError as exc:
        if not exc.quiet or not args.json:
            print(f"cei: {exc}", file=sys.stderr)
        return 1
    except (EventLogError, LookupError, ValueError, OSError) as exc:
        print(f"cei: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("cei: interrupted", file=sys.stderr)
        return 130


def entry() -> None:
    raise SystemExit(main())
