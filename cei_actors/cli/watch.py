"""``--watch``: print a listing again whenever it changes, until Ctrl-C (as ``kubectl get -w``).

The listing is asked for again every ``--interval`` seconds (default 2) with the same requests
as without ``--watch`` (decision UX3). On a terminal the screen is redrawn; piped, each new
version follows the last (one JSON document per line with ``--json``, YAML documents with
``-o yaml``)."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

from .output import Output, plain


def watch_option(p: argparse.ArgumentParser) -> None:
    """Add ``-w/--watch`` and ``--interval`` to a listing's parser."""
    p.add_argument("-w", "--watch", action="store_true", help="print it again whenever it changes (until Ctrl-C)")
    p.add_argument("--interval", type=float, default=2.0, metavar="SECONDS",
                   help="with --watch: how often to look (default 2)")


def watch(args: argparse.Namespace, out: Output, fetch: Callable[[], Any], render: Callable[[Any], None]) -> int:
    """Render ``fetch()`` once; with ``args.watch``, again each time its data change."""
    if not getattr(args, "watch", False):
        render(fetch())
        return 0
    if not 0 < args.interval < float("inf"):
        from .common import UsageError

        raise UsageError(f"--interval: expected a positive number of seconds, got {args.interval:g}")
    last: Any = None
    first = True
    try:
        while True:
            data = fetch()
            key = plain(data)
            if key != last:
                if out.tty and not out.json:
                    out.stream.write("\x1b[H\x1b[2J")  # home, clear: redraw in place
                    out.line(f"every {args.interval:g}s, {time.strftime('%H:%M:%S')} (Ctrl-C ends)")
                elif not first and out.format == "yaml":
                    out.stream.write("---\n")
                elif not first and not out.json:
                    out.line("")
                render(data)
                out.stream.flush()
                last, first = key, False
            time.sleep(args.interval)  # a poll interval between two looks
    except KeyboardInterrupt:  # the way a watch ends
        return 0
