"""Failover: kill -9 of a leader -> the first command served by its successor, hot vs cold.

For each log (ZooKeeper, SQLite) and each history size (1k and 100k events; 1M with
``--scale``), a log is filled with that many events whose state grows with them (the example
``Counters`` component, one new counter per event, so the state and its snapshot are in
proportion to the history: ~16 MB of snapshot at 1M), with a snapshot ``TAIL`` events before
the head, as a leader leaves it. Then, on the thespian TCP base (one OS process per actor), a
leader and one standby run on it, and ``--kills`` times (>= 10): a command through the leader,
the standby caught up (hot: its followed head equals the leader's; cold: it waits in
``recovering``), then ``SIGKILL`` to the leader's process and at once one command (``Add``) to
the standby, which holds it until it leads. The figure is the time from the kill to that
command's reply (min / median / max). The successor then leads and a fresh standby is started
for the next kill. Every reply is checked (nothing lost or doubled). Cold runs first, then hot
on the same log. A configuration that fails is reported (``config.errors``) and skipped.

- ``cold`` (component config ``standby: cold``, the old behaviour and the baseline, measured
  in the same run): the standby loads the snapshot and replays the tail after it wins.
- ``hot`` (``standby: hot``, the default): the standby follows the log; taking over costs the
  fence write plus the records after its followed head.

ZooKeeper: a standalone server started here (``cei_actors.testing.zkserver``, tickTime 500 ms,
so session timeouts of 1 to 10 s are allowed, forceSync on); the log URL carries
``session_timeout`` (``--session-timeout``, default 2 s), which is also the election's: a killed
leader's election node lasts until its session expires, so the target is that plus 1 s. SQLite:
the kernel releases the dead leader's ``flock`` at once; a standby polls it every 0.2 s.

    python -m benchmarks.failover [--json] [--scale] [--kills 10] [--session-timeout 2]
                                  [--sizes 1000,100000] [--logs zk,sqlite]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator

try:
    import cei_actors  # noqa: F401
except ImportError:  # run as a file from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import msgpack  # noqa: E402
from kazoo.client import KazooClient  # noqa: E402

from cei_actors.eventlog import Snapshot, open_log  # noqa: E402
from cei_actors.runtime.client import ServiceClient  # noqa: E402
from cei_actors.runtime.control import Request, Response, Start, Status, Stop  # noqa: E402
from cei_actors.runtime.example import Add, CounterAdded, Counters, CounterState  # noqa: E402
from cei_actors.runtime.messages import Ok  # noqa: E402
from cei_actors.runtime.system import TCP_BASE, shutdown_system, start_actor, start_system  # noqa: E402
from cei_actors.testing.zkserver import ZkServer  # noqa: E402

GOAL = (
    "kill -9 of a leader -> first command served by the new leader <= session timeout + 1 s "
    "(ZooKeeper; SQLite: <= 1 s), flat from 1k to 1M events of history"
)
ACTOR = "cei_actors.runtime.example_actor.ExampleActor"
STREAM = "example"
TAIL = 1_000  # events after the snapshot, at most half the history
FILL_BATCH = 1_000  # events per append while filling
SIZES = (1_000, 100_000)
#: The actors' logging: warnings and worse, to stderr (stdout is the table or the JSON).
LOG_DEFS = {
    "version": 1,
    "handlers": {"err": {"class": "logging.StreamHandler", "stream": "ext://sys.stderr", "level": "WARNING"}},
    "root": {"handlers": ["err"], "level": "WARNING"},
}
SCALE_SIZES = (1_000, 100_000, 1_000_000)


def fill(url: str, n: int) -> None:
    """``n`` events, one new counter each, and a snapshot ``min(TAIL, n // 2)`` before the head."""
    registry = Counters.registry
    tail = min(TAIL, n // 2)
    state = CounterState()
    with open_log(url) as log:
        fence = log.acquire(STREAM)
        head = 0
        while head < n:
            k = min(FILL_BATCH, n - head)
            events = [CounterAdded(f"k{i:07d}", 1, 1_700_000_000.0 + i) for i in range(head, head + k)]
            head = log.append(fence, head, [registry.to_pending(e, e.at) for e in events])
            if head <= n - tail:
                for e in events:
                    state.counters[e.name] = 1
            if head == n - tail and tail < n:
                blob = msgpack.packb(Counters().snapshot(state), use_bin_type=True)
                log.save_snapshot(Snapshot(STREAM, head, time.time(), Counters.snapshot_version, blob))


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.01)


def _dead(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


class Pair:
    """A leader and one standby of the example component on ``url``."""

    def __init__(self, asys, url: str, mode: str) -> None:
        self.asys, self.mode = asys, mode
        self.start = Start(url, config={"standby": mode})
        self.leader = start_actor(asys, ACTOR, self.start, timeout=600)
        self.standby = self._standby()
        self.key, self.value = f"x-{mode}", 0  # a counter of this pair's own

    def _standby(self):
        return start_actor(self.asys, ACTOR, self.start, wait=False)

    def status(self, address, timeout: float = 60) -> dict:
        with ServiceClient(self.asys, address, timeout=timeout) as c:
            return c.call(Status())

    def ready(self, timeout: float) -> None:
        """A command through the leader, then the standby caught up (hot) or waiting (cold)."""
        with ServiceClient(self.asys, self.leader, timeout=60) as c:
            self.value += 1
            got = c.call(Add(self.key, 1))
            if got != self.value:
                raise RuntimeError(f"leader answered {got}, expected {self.value}")
            head = c.call(Status())["head"]
        want = "standby" if self.mode == "hot" else "recovering"

        def caught_up():
            s = self.status(self.standby)
            return s["mode"] == want and (self.mode == "cold" or s["head"] == head)

        _wait(caught_up, timeout, f"the {self.mode} standby")

    def kill_and_serve(self, timeout: float) -> float:
        """SIGKILL the leader, send one command to the standby; seconds until its reply."""
        pid = self.status(self.leader)["pid"]
        rid = uuid.uuid4().hex
        with self.asys.private() as ctx:
            t0 = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            ctx.tell(self.standby, Request(rid, Add(self.key, 1)))
            deadline = t0 + timeout
            while True:
                msg = ctx.listen(max(deadline - time.monotonic(), 0.01))
                if isinstance(msg, Response) and msg.rid == rid:
                    elapsed = time.monotonic() - t0
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError("the standby did not serve within the timeout")
        self.value += 1
        if msg.reply != Ok(self.value):
            raise RuntimeError(f"the new leader answered {msg.reply}, expected Ok({self.value})")
        _wait(lambda: _dead(pid), 10, "the killed leader to be gone")
        self.leader, self.standby = self.standby, self._standby()
        return elapsed

    def stop(self) -> None:
        for address in (self.leader, self.standby):
            with contextlib.suppress(Exception), ServiceClient(self.asys, address, timeout=10) as c:
                c.call(Stop())


def measure(asys, url: str, mode: str, kills: int, serve_timeout: float) -> list[float]:
    pair = Pair(asys, url, mode)
    times = []
    try:
        for _ in range(kills):
            pair.ready(timeout=600)
            times.append(pair.kill_and_serve(serve_timeout))
    finally:
        pair.stop()
    return times


@contextlib.contextmanager
def zookeeper() -> Iterator[ZkServer]:
    with ZkServer(heap="2g") as server:
        yield server


def run(sizes: tuple[int, ...], logs: tuple[str, ...], kills: int, session: float,
        say=print) -> tuple[list[dict], dict]:
    work = tempfile.mkdtemp(prefix="bench-failover-")
    figures: dict[tuple[str, int, str], list[float]] = {}
    config: dict = {"kills": kills, "sizes": list(sizes), "logs": list(logs), "tail": TAIL,
                    "session_timeout_s": session, "zk_tick_ms": None, "errors": []}
    errors: list[str] = config["errors"]
    stack = contextlib.ExitStack()
    try:
        zk = stack.enter_context(zookeeper()) if "zk" in logs else None
        if zk is not None:
            config["zk_tick_ms"] = zk.tick_time_ms
            admin = KazooClient(hosts=zk.hosts, timeout=10)
            admin.start(timeout=30)
            stack.callback(admin.close)
            stack.callback(admin.stop)
        asys = start_system(TCP_BASE, log_defs=LOG_DEFS)
        stack.callback(shutdown_system, asys)
        for log in logs:
            for n in sizes:
                if log == "zk":
                    chroot = f"/bench-failover/{uuid.uuid4().hex[:8]}"
                    url = f"zk://{zk.hosts}{chroot}?session_timeout={session:g}"
                else:
                    chroot = None
                    url = f"sqlite:///{work}/{log}-{n}.db"
                t = time.monotonic()
                fill(url, n)
                say(f"  {log} {n:,} events: filled in {time.monotonic() - t:.1f} s")
                for mode in ("cold", "hot"):  # on the same log: a few events more for hot
                    say(f"    {mode}: ", end="")
                    try:
                        times = measure(asys, url, mode, kills, serve_timeout=session + 600)
                    except Exception as exc:
                        errors.append(f"{log}, {_size(n)} events, {mode}: {type(exc).__name__}: {exc}")
                        say(f"FAILED: {errors[-1]}")
                        continue
                    figures[(log, n, mode)] = times
                    say(f"min {min(times):.3f} median {statistics.median(times):.3f} max {max(times):.3f} s")
                if chroot is not None:
                    admin.delete(chroot, recursive=True)
    finally:
        stack.close()
        shutil.rmtree(work, ignore_errors=True)
    results = []
    for log in logs:
        for n in sizes:
            cold = figures.get((log, n, "cold"))
            hot = figures.get((log, n, "hot"))
            size = _size(n)
            for mode, times, base in (("cold", cold, None), ("hot", hot, cold)):
                if times is None:
                    continue  # failed: see config["errors"]
                for stat, fn in (("min", min), ("median", statistics.median), ("max", max)):
                    value = fn(times)
                    baseline = fn(base) if base is not None else None
                    results.append({
                        "metric": f"failover {mode} {stat} s ({log}, {size} events)",
                        "value": round(value, 4),
                        "unit": "s",
                        "baseline": None if baseline is None else round(baseline, 4),
                        "ratio": None if baseline is None else round(value / baseline, 3),
                    })
        if log == "zk":
            results.append({"metric": "failover session timeout s (zk)", "value": session, "unit": "s",
                            "baseline": None, "ratio": None})
    return results, config


def _size(n: int) -> str:
    return f"{n // 1_000_000}M" if n >= 1_000_000 and n % 1_000_000 == 0 else (
        f"{n // 1000}k" if n % 1000 == 0 else str(n))


def verdicts(results: list[dict], session: float) -> list[str]:
    out = []
    for x in results:
        if not x["metric"].startswith("failover hot median"):
            continue
        zk = "(zk," in x["metric"]
        target = session + 1.0 if zk else 1.0
        out.append(f"{x['metric']}: {x['value']:.3f} s (target {target:g} s) -> "
                   f"{'met' if x['value'] <= target else 'NOT met'}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--scale", action="store_true", help="also 1,000,000 events of history")
    ap.add_argument("--kills", type=int, default=10, help="kills per configuration (default 10)")
    ap.add_argument("--session-timeout", type=float, default=2.0,
                    help="ZooKeeper session timeout in seconds (1 to 10 with tickTime 500 ms)")
    ap.add_argument("--sizes", help="comma-separated history sizes (default 1000,100000)")
    ap.add_argument("--logs", default="zk,sqlite", help="comma-separated: zk, sqlite")
    args = ap.parse_args(argv)
    sizes = tuple(int(s) for s in args.sizes.split(",")) if args.sizes else (
        SCALE_SIZES if args.scale else SIZES)
    logs = tuple(x.strip() for x in args.logs.split(",") if x.strip())
    if not set(logs) <= {"zk", "sqlite"} or not logs:
        ap.error("--logs: zk and/or sqlite")
    if args.kills < 1 or min(sizes) < 2:
        ap.error("--kills must be >= 1 and sizes >= 2")

    def say(*a, **kw):
        if not args.json:
            print(*a, **kw, flush=True)

    say(f"Failover benchmark: {args.kills} kills per configuration, sizes {', '.join(map(_size, sizes))}, "
        f"logs {', '.join(logs)}, ZooKeeper session timeout {args.session_timeout:g} s")
    results, config = run(sizes, logs, args.kills, args.session_timeout, say)
    if args.json:
        print(json.dumps({"results": results, "goal": GOAL, "config": config}))
        return 0
    print(f"\ngoal: {GOAL}\n")
    header = ("metric", "value", "unit", "baseline (cold)", "ratio")
    rows = [(x["metric"], f"{x['value']:.3f}", x["unit"],
             "" if x["baseline"] is None else f"{x['baseline']:.3f}",
             "" if x["ratio"] is None else f"{x['ratio']:.3f}") for x in results]
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    for k, line in enumerate([header, *rows]):
        print("  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                        for i, (c, w) in enumerate(zip(line, widths, strict=True))))
        if k == 0:
            print("  ".join("-" * w for w in widths))
    for line in verdicts(results, args.session_timeout):
        print("  " + line)
    for line in config["errors"]:
        print("  FAILED " + line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
