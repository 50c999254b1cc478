"""The ``cei`` console script: a Ctrl-C while the command's modules load (a second or two on a
busy host) ends it with ``cei: interrupted`` and status 130, not a traceback."""

from __future__ import annotations

import signal
import sys


def entry() -> None:
    """Load :mod:`cei_actors.cli` and run it; exits with its status."""
    try:
        from .cli import main
    except KeyboardInterrupt:
        print("cei: interrupted (nothing was done)", file=sys.stderr)
        raise SystemExit(130) from None
    status = main(exiting=True)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # exiting: a late Ctrl-C changes nothing now
    raise SystemExit(status)
