"""What the authenticated transport costs: asks and tells over the TCP base, with and without it.

Each mode runs in its own process (the transport's serializer is process-wide and the admin
and actors inherit it when forked): ``hmac`` is the system as it runs (HMAC-SHA256 tag on
every frame, checked before a restricted unpickling); ``plain`` is thespian's unpatched
transport (bare ``pickle``), the baseline. In each: one echo actor; ``--n`` asks, one after
another, of a ``Request`` carrying a process description (about 400 bytes pickled), then
``--n`` tells of it to a counting actor and one ask that returns once all arrived. Three
rounds, the median round counts. Also the codec alone: dumps+loads of the same message per
message, in this process. ``ratio`` = hmac / plain (time per message; above 1 is the cost).

    python -m benchmarks.transport [--n 2000] [--rounds 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import statistics
import subprocess
import sys
import time
from typing import Any

try:
    import cei_actors  # noqa: F401
except ImportError:  # run as a file from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from thespian.actors import Actor  # noqa: E402

from cei_actors.runtime import secure  # noqa: E402
from cei_actors.runtime.control import Request  # noqa: E402

GOAL = "authenticated transport: ask round trip and tell throughput within 10% of the plain transport"


class Echo(Actor):
    """Answers every message with itself."""

    def receiveMessage(self, msg: Any, sender: Any) -> None:  # noqa: N802
        if not isinstance(msg, str | Request):
            return
        self.send(sender, msg)


class Counter(Actor):
    """Counts what it is told; ``"count N"`` answers once N arrived."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = 0
        self.waiting: tuple[Any, int] | None = None

    def receiveMessage(self, msg: Any, sender: Any) -> None:  # noqa: N802
        if isinstance(msg, Request):
            self.seen += 1
        elif isinstance(msg, str) and msg.startswith("count "):
            self.waiting = (sender, int(msg.split()[1]))
        if self.waiting and self.seen >= self.waiting[1]:
            self.send(self.waiting[0], self.seen)
            self.waiting, self.seen = None, 0


def message(i: int) -> Request:
    return Request(f"r{i}", {"upid": f"p{i}", "command": ["sh", "-c", "echo hello; sleep 1"],
                             "configuration": {"k": "v" * 40, "n": i}, "constraints": {"engine": "default"},
                             "restart_mode": "never", "queueing_mode": "always"})


def run_mode(mode: str, n: int, rounds: int) -> dict[str, Any]:
    """One mode, in this process: per-round seconds per ask and per tell."""
    if mode == "plain":
        secure.install = lambda key: None  # thespian's own pickle serializer, as before
    from cei_actors.runtime.system import shutdown_system, start_system

    asys = start_system()
    asks, tells = [], []
    try:
        echo = asys.createActor(Echo)
        counter = asys.createActor(Counter)
        msg = [message(i) for i in range(n)]
        assert asys.ask(echo, msg[0], 10) == msg[0]
        for _ in range(rounds):
            t = time.perf_counter()
            for m in msg:
                if asys.ask(echo, m, 10) != m:
                    raise RuntimeError("echo lost a message")
            asks.append((time.perf_counter() - t) / n)
            t = time.perf_counter()
            for m in msg:
                asys.tell(counter, m)
            if asys.ask(counter, f"count {n}", 60) != n:
                raise RuntimeError("counter lost messages")
            tells.append((time.perf_counter() - t) / n)
    finally:
        shutdown_system(asys)
    return {"ask_s": asks, "tell_s": tells}


def codec_cost(n: int) -> dict[str, float]:
    """Microseconds per dumps+loads of one message: bare pickle vs sealed + restricted."""
    codec = secure._Codec(os.urandom(secure.KEY_BYTES))
    msgs = [(None, message(i)) for i in range(n)]
    t = time.perf_counter()
    for m in msgs:
        pickle.loads(pickle.dumps(m))
    plain = (time.perf_counter() - t) / n * 1e6
    t = time.perf_counter()
    for m in msgs:
        codec.loads(codec.dumps(m))
    sealed = (time.perf_counter() - t) / n * 1e6
    return {"plain_us": round(plain, 2), "hmac_us": round(sealed, 2), "ratio": round(sealed / plain, 3),
            "bytes": len(pickle.dumps(msgs[0]))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.transport", description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--mode", choices=("plain", "hmac"), help=argparse.SUPPRESS)  # one child's run
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.mode:
        print(json.dumps(run_mode(args.mode, args.n, args.rounds)))
        return 0
    raw = {}
    for mode in ("plain", "hmac"):
        out = subprocess.run([sys.executable, "-m", "benchmarks.transport", "--mode", mode, "--n", str(args.n),
                              "--rounds", str(args.rounds)], capture_output=True, text=True, check=True,
                             cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        raw[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    results: dict[str, Any] = {"n": args.n, "rounds": args.rounds}
    for kind in ("ask_s", "tell_s"):
        plain, sealed = (statistics.median(raw[m][kind]) for m in ("plain", "hmac"))
        results[kind.replace("_s", "_us")] = {"plain": round(plain * 1e6, 1), "hmac": round(sealed * 1e6, 1),
                                              "ratio": round(sealed / plain, 3)}
    results["codec"] = codec_cost(args.n)
    if args.json:
        print(json.dumps({"benchmark": "transport", "goal": GOAL, "results": results}, indent=2))
    else:
        for kind in ("ask_us", "tell_us"):
            r = results[kind]
            print(f"{kind[:-3]}: {r['plain']} us plain, {r['hmac']} us hmac, ratio {r['ratio']}")
        c = results["codec"]
        print(f"codec ({c['bytes']} B): {c['plain_us']} us plain, {c['hmac_us']} us hmac, ratio {c['ratio']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
