"""``--watch``: print a listing again whenever it changes, until Ctrl-C (as ``kubectl get -w``).

The listing is asked for with the same requests as without ``--watch`` (decision UX3). When
the command's connection follows the system's logs (its :class:`~cei_actors.subscribe.Watcher`,
decision S2; not for a ``memory://`` log) it is asked again as soon as the PD, EPUM or HA
records a change, and every ``--interval`` seconds (default 10) for what the logs do not hold
(replica health, the Provisioner's view); otherwise every ``--interval`` seconds (default 2)
(decision UX5). On a terminal the screen is redrawn; piped, each new version follows the last
(one JSON document per line with ``--json``, YAML documents with ``-o yaml``)."""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

from .output import Output, plain

#: Seconds between two looks without a followed log, and with one (a change redraws at once).
POLL_INTERVAL, SLOW_POLL_INTERVAL = 2.0, 10.0
#: Least seconds between two looks caused by changes (a burst of changes costs one look).
MIN_GAP = 0.2


def watch_option(p: argparse.ArgumentParser) -> None:
    """Add ``-w/--watch`` and ``--interval`` to a listing's parser."""
    p.add_argument("-w", "--watch", action="store_true", help="print it again whenever it changes (until Ctrl-C)")
    from .common import seconds

    p.add_argument("--interval", type=seconds, default=None, metavar="SECONDS",
                   help=f"with --watch: how often to look again (default {POLL_INTERVAL:g}; "
                        f"{SLOW_POLL_INTERVAL:g} when the system's logs are followed, as a change "
                        "is then shown at once)")


@contextlib.contextmanager
def _changes(conn: Any) -> Iterator[Any]:
    """A subscription to every change the connection's log watcher sees, or None when the
    connection does not follow the logs (or they cannot be opened)."""
    if conn is None or not getattr(conn, "_watch", False):
        yield None
        return
    try:
        sub = conn.watcher().subscribe()
    except Exception:  # e.g. the log cannot be opened from here: poll instead
        yield None
        return
    try:
        yield sub
    finally:
        sub.close()


def watch(args: argparse.Namespace, out: Output, fetch: Callable[[], Any], render: Callable[[Any], None]) -> int:
    """Render ``fetch()`` once; with ``args.watch``, again each time its data change."""
    if not getattr(args, "watch", False):
        render(fetch())
        return 0
    interval = args.interval  # positive and finite: the parser's `seconds`
    try:
        with _changes(getattr(args, "_connection", None)) as sub:
            if interval is None:
                interval = POLL_INTERVAL if sub is None else SLOW_POLL_INTERVAL
            every = f"on change and every {interval:g}s" if sub is not None else f"every {interval:g}s"
            _loop(out, fetch, render, sub, interval, every)
    except KeyboardInterrupt:  # the way a watch ends
        return 0
    return 0


def _loop(out: Output, fetch: Callable[[], Any], render: Callable[[Any], None], sub: Any,
          interval: float, every: str) -> None:
    last: Any = None
    first = True
    while True:
        looked = time.monotonic()
        data = fetch()
        key = plain(data)
        if key != last:
            if out.tty and not out.json:
                out.stream.write("\x1b[H\x1b[2J")  # home, clear: redraw in place
                out.line(f"{every}, {time.strftime('%H:%M:%SZ', time.gmtime())} (Ctrl-C ends)")
            elif not first and out.format == "yaml":
                out.stream.write("---\n")
            elif not first and not out.json:
                out.line("")
            render(data)
            out.stream.flush()
            last, first = key, False
        if sub is None or sub.closed:
            time.sleep(interval)  # a poll interval between two looks
            continue
        if sub.get(timeout=interval) is None:
            continue  # the slow poll: nothing the logs hold changed
        time.sleep(max(0.0, looked + MIN_GAP - time.monotonic()))  # let a burst settle
        while sub.get(timeout=0) is not None:  # one look covers every change so far
            pass
