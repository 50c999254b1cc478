"""Foundation demo: an event-sourced actor survives ``kill -9`` because its state is its log.

Starts the example counters actor on thespian's TCP base (127.0.0.1 only) with a SQLite log
under ``HOME``, adds to some counters, kills the actor's OS process with SIGKILL, starts a
new actor on the same log and shows that it rebuilt the same state by replay.

    python -m cei_actors.runtime.demo [HOME]      # HOME defaults to a temporary directory
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import time
from pathlib import Path

from ..eventlog import open_log
from . import procfs
from .client import ServiceClient
from .control import Start, Status, Stop
from .example import Add, Counters, Dump
from .runner import replay
from .system import TCP_BASE, lookup, shutdown_system, start_actor, start_system

ACTOR = "cei_actors.runtime.example_actor.ExampleActor"
NAME = "demo-counters"


def _say(text: str) -> None:
    print(text, flush=True)


def _wait_dead(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = procfs.stat(pid)
        if s is None or s.dead:
            return True
        time.sleep(0.02)
    return False


def main(home: Path) -> int:
    """Run the demo with its log under ``home``; returns 0 if the replayed state matched."""
    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    url = f"sqlite:///{home.resolve()}/demo-log.db"
    _say(f"1. Starting an actor system on thespian's {TCP_BASE} (127.0.0.1 only).")
    asys = start_system(TCP_BASE)
    try:
        _say(f"   admin on 127.0.0.1:{asys.cei_admin_port}; event log {url}")
        first = start_actor(asys, ACTOR, Start(url), global_name=NAME)
        with ServiceClient(asys, first) as client:
            status = client.call(Status())
            _say(f"2. The counters actor runs as pid {status['pid']}, leading stream "
                 f"'{status['stream']}' at epoch {status['epoch']} (head {status['head']}).")
            for name, amount in [("apples", 3), ("pears", 5), ("apples", 4), ("plums", 1), ("pears", -2)]:
                value = client.call(Add(name, amount))
                _say(f"   add {amount:+d} to {name:<6} -> {value}")
            before = client.call(Dump())
            pid = client.call(Status())["pid"]
        _say(f"   state: {before['counters']}")
        _say(f"3. kill -9 {pid}: the actor's process dies without any chance to clean up.")
        os.kill(pid, signal.SIGKILL)
        if not _wait_dead(pid):
            _say("   the process did not die")
            return 1
        deadline = time.monotonic() + 10
        while lookup(asys, NAME) is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        _say("4. Starting a new actor on the same log: it takes the stream's lock, bumps the "
             "epoch (fencing any earlier writer) and replays the events.")
        second = start_actor(asys, ACTOR, Start(url), global_name=NAME)
        with ServiceClient(asys, second) as client:
            after = client.call(Dump())
            status = client.call(Status())
            _say(f"   new pid {status['pid']}, epoch {status['epoch']}, head {status['head']}")
            _say(f"   state: {after['counters']}")
            client.call(Stop())
        with open_log(url) as log:
            state = replay(Counters(), log, "example")
        replayed = {"counters": state.counters, "ticks": state.ticks}
        if after == before == replayed:
            _say("5. The new actor's state is equal by replay to the state before the kill.")
            return 0
        _say(f"5. MISMATCH: before {before}, after {after}, replay {replayed}")
        return 1
    finally:
        shutdown_system(asys)


if __name__ == "__main__":
    if len(sys.argv) > 1:
        raise SystemExit(main(Path(sys.argv[1])))
    with tempfile.TemporaryDirectory(prefix="cei-demo-") as tmp:
        raise SystemExit(main(Path(tmp)))
