"""The ``cei`` command (DESIGN.md §6): errors are one line on stderr, exit 1; usage errors exit 2;
a request sent without a reply in time exits 3 (outcome unknown, see :data:`EXIT_STATUS`)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from ..eventlog import EventLogError
from ..runtime.client import OutcomeUnknown, RequestFailed
from . import (
    completion,
    definition,
    demo,
    domain,
    ha,
    logcmds,
    metrics,
    node,
    process,
    provisioner,
    registry,
    simcmds,
    system,
    systemboot,
)
from .common import UsageError, seconds
from .output import FORMATS, CliError, Output

#: Exit statuses, as ``cei --help`` lists them.
EXIT_STATUS = """exit status:
  0  done
  1  error: refused or failed; nothing it asked for happened (or a check failed)
  2  usage error
  3  outcome unknown: the request was sent but no reply came in time (a failover, an
     overloaded or stopped component); it may have taken effect, or may still. Check with
     the matching describe (the message names it) before you act. A retry never does the
     work twice for `process schedule` (same --upid; without --upid the id it sends is
     printed first), `process terminate`, `definition create|update|remove`, `domain
     add|reconfigure|remove` (a retried add may answer "already exists"), `node terminate`,
     `system-boot` and `provisioner provision` (same --node-id, printed likewise); it does
     for `process restart` (each call is a new round: check the round first). A read
     (list, describe, status) without a reply changed nothing: see `cei status`."""

#: Requests that only read (their timeout changes nothing), by message type (``DumpState``
#: and ``DumpAgentState`` are not: they make a component resend what it knows).
READS = ("Dump", "Status", "Get")

#: The command groups, in the order ``cei --help`` lists them.
GROUPS = (system, demo, process, definition, domain, node, systemboot, provisioner, registry, logcmds, simcmds, ha,
          completion, metrics)


def version() -> str:
    """This package's version (as installed), e.g. ``0.1.0``."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("cei-actors")
    except PackageNotFoundError:
        return "unknown"


def output_options(parser: argparse.ArgumentParser, top: bool) -> None:
    """``--json``, ``-o FORMAT`` and ``--no-headers``: on the top parser with defaults, on every
    subcommand's parser without (SUPPRESS), so they count wherever they are given."""
    kw: dict = {} if top else {"default": argparse.SUPPRESS}
    parser.add_argument("--json", action="store_true", help="machine output: one JSON document on stdout "
                        "(same as -o json)", **kw)
    parser.add_argument("-o", "--output", choices=FORMATS, metavar="FORMAT",
                        help=f"output format: {', '.join(FORMATS)} (default: tables for people)",
                        **({"default": None} if top else kw))
    parser.add_argument("--no-headers", action="store_true", help="tables without titles and header rows",
                        **kw)


def say_error(message: object) -> None:
    """Print ``cei: MESSAGE`` on stderr as one line: control characters that came from the
    user's input (newlines, carriage returns, escapes) are shown escaped, never obeyed."""
    text = "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in str(message).strip())
    print(f"cei: {text}", file=sys.stderr)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # usage errors: one line, exit 2
        say_error(message)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cei", description="Common Execution Infrastructure, as event-sourced actors",
                     epilog=EXIT_STATUS, formatter_class=argparse.RawDescriptionHelpFormatter)
    output_options(parser, top=True)
    parser.add_argument("--version", action="version", version=f"cei {version()}")
    parser.add_argument("--home", default=os.environ.get("CEI_HOME", ".cei"), help="runtime files and the embedded log (default ./.cei or $CEI_HOME)")
    parser.add_argument("--request-timeout", type=seconds, default=10.0, metavar="SECONDS",
                        help="how long to wait for each reply of the system (default 10; "
                             "no reply in time: exit 3)")
    parser.add_argument("--log", dest="log_url", default=None, help="log URL (default: the running system's, else sqlite under --home)")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="show library logging on stderr (-v: info, -vv: debug); off by default")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    for group in GROUPS:
        group.register(sub)
    for p in _subcommand_parsers(parser):
        output_options(p, top=False)
    return parser


def _subcommand_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """Every parser below ``parser`` (each once, aliases included)."""
    found: list[argparse.ArgumentParser] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                found += [child, *_subcommand_parsers(child)]
    return found


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse a command line; everything after the first ``--`` is the COMMAND to run
    (``args.cmdline``), whatever options came before it."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    tail = None
    if "--" in argv:
        cut = argv.index("--")
        argv, tail = argv[:cut], argv[cut + 1:]
    args = parser.parse_args(argv)
    if args.json and args.output not in (None, "json"):
        parser.error(f"--json and -o {args.output}: give one")
    args.output = args.output or ("json" if args.json else None)
    args.json = args.output in ("json", "yaml", "name")
    if tail is not None:
        if not hasattr(args, "cmdline"):
            parser.error(f"{args.command}: takes no COMMAND after --")
        if args.cmdline:
            parser.error(f"{args.command}: give the COMMAND after -- only")
        args.cmdline = tail
    return args


def quiet_libraries(verbose: int) -> None:
    """Library logging (kazoo's reconnect attempts, thespian's) stays off the terminal unless
    asked for: errors reach the user as the command's one line. ``-v``: INFO, ``-vv``: DEBUG."""
    root = logging.getLogger()
    if verbose:
        logging.basicConfig(level=logging.DEBUG if verbose > 1 else logging.INFO, stream=sys.stderr,
                            format="%(asctime)s %(name)s %(levelname)s %(message)s")
    elif not root.handlers:
        root.addHandler(logging.NullHandler())  # no handler would mean logging's lastResort: stderr


def main(argv: Sequence[str] | None = None, *, exiting: bool = False) -> int:
    """Run the ``cei`` command; returns the exit status (the console script exits with it).
    ``exiting``: the process ends when this returns (the console script), so a command may
    leave SIGINT ignored once its outcome is settled (``up``, decision OP8)."""
    args = parse(argv)
    args.exiting = exiting
    quiet_libraries(args.verbose)
    home = Path(args.home).absolute()
    args.home = home
    if args.log_url is not None:
        from ..launch.plan import absolute_log_url

        args.log_url = absolute_log_url(args.log_url)
    args.explicit_log_url = args.log_url
    if args.log_url is None:  # the log of the home's system (up or down), else the embedded default
        from ..launch.launcher import remembered_log_url

        args.log_url = remembered_log_url(home) or f"sqlite:///{home / 'log.sqlite'}"
    out = Output(args.output, headers=not args.no_headers)
    try:
        return int(args.func(args, out) or 0)
    except UsageError as exc:
        say_error(exc)
        return 2
    except RequestFailed as exc:
        say_error(exc.message)
        return 1
    except OutcomeUnknown as exc:
        if exc.request.startswith(("Describe", "List")) or exc.request in READS:  # nothing to have taken effect: say what to look at
            text = exc.message.split(": it may have taken effect")[0]
            say_error(f"no reply: {text}; a read changes nothing (`cei status` shows what serves)")
            return 3
        check = f"; check with `{exc.check}`" if exc.check else ""
        print(f"cei: outcome unknown: {exc.message}{check}", file=sys.stderr)
        return 3
    except CliError as exc:
        if not exc.quiet or not args.json:
            say_error(exc)
        return getattr(exc, "exit_status", 1)
    except BrokenPipeError:  # e.g. piped into head: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (EventLogError, LookupError, ValueError, OSError) as exc:
        say_error(exc)
        return 1
    except KeyboardInterrupt:
        print("cei: interrupted", file=sys.stderr)
        return 130


def entry() -> None:
    """``python -m cei_actors.cli``: the console script's :func:`cei_actors.cli_entry.entry`."""
    from ..cli_entry import entry as console

    console()
