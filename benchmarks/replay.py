"""Replay-based debugging at scale: ``why`` and ``state --at`` in the middle of a long log.

A PD log of ``1,000,000 x scale`` events is built once and cached in the work directory
(``--workdir``, default the system's temp directory): realistic PD events appended in
batches of 2,000 straight into a SQLite log (``ProcessScheduled``, ``ProcessAssigned``,
``ProcessMoved`` to PENDING, RUNNING and EXITED, ``ProcessesForgotten`` every 20,000 events,
100 nodes of 10 slots, about 1,000 processes alive at a time, and every 997th process held
back by a constraint no node meets until it is killed 5,000 events later), with a snapshot
of the folded state every 60,000 events, all kept.

Measured at the middle of the log, by the Python API behind ``cei log``:

- ``state at middle``: :meth:`Replay.state` at the middle offset, from the newest snapshot
  below it; baseline: the same state folded from the first event (no snapshot).
- ``why at middle``: :func:`why` for a process waiting there (its kind, its history, every
  node's verdict), with snapshots; baseline: the same with the snapshots ignored.
- the same two without snapshots, against reading (decoding) the events up to the middle
  as the fold reads them (rows, a repeated spec decoded once: RS5), the floor of any replay.

- the same two without snapshots, from the reader's checkpoint cache (decision RS2): the
  first fold (which leaves a checkpoint at the middle) and later ones (which start there).

The with-snapshot, no-snapshot and cached figures are the best of ``--repeat`` runs (3), each
with a fresh reader (the first fold with a cache and the decoding baseline run once); the reader's cache is off except for the cached figures (its own directory, removed
after). CPU seconds are in the notes (the machine may be shared).

    python -m benchmarks.replay [--scale 1.0] [--workdir DIR] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

try:
    import cei_actors  # noqa: F401
except ImportError:  # run as a file from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import msgpack  # noqa: E402

from cei_actors.debug import Replay, why  # noqa: E402
from cei_actors.debug.reader import paused_gc  # noqa: E402
from cei_actors.eventlog import Snapshot, open_log  # noqa: E402
from cei_actors.eventlog.batch import SharedValues  # noqa: E402
from cei_actors.launch.components import component_for  # noqa: E402
from cei_actors.pd import states as ps  # noqa: E402
from cei_actors.pd.events import (  # noqa: E402
    NodeAdded,
    ProcessAssigned,
    ProcessesForgotten,
    ProcessMoved,
    ProcessScheduled,
    ResourceAdded,
)

GOAL = "why and state --at in the middle of a 1M-event log: <= 1 s with snapshots, <= 3 s without"
FORMAT = 1  # bump when the generated log changes: a cached log of another format is rebuilt
NODES, SLOTS, LIVE = 100, 10, 1000
BATCH, SNAPSHOT_EVERY, FORGET_EVERY = 2000, 60_000, 20_000
T0 = 1_790_000_000.0


def _spec(constraints: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "command": ["sleep", "60"], "constraints": {"engine": "e1", **(constraints or {})}, "engine": "e1",
        "node_exclusive": None, "queueing_mode": ps.QUEUE_ALWAYS, "restart_mode": ps.RESTART_NEVER,
        "subscribers": [], "configuration": {}, "min_start_interval": None,
        "omit_from_system_restart": False, "env": None, "cwd": None, "definition_id": None, "name": None,
    }


def events(total: int) -> Any:
    """``(time, event)`` pairs of a busy PD, ``total`` of them."""
    t = T0
    n = 0
    for k in range(NODES):
        yield t, NodeAdded(f"n{k}", "pd_domain_e1", "e1", {"site": "here", "hostname": f"h{k}"}, t)
        yield t, ResourceAdded(f"a{k}", f"n{k}", SLOTS, t)
        n += 2
    spec, held_spec = _spec(), _spec({"site": "nowhere"})
    live: list[tuple[str, str]] = []  # (upid, resource) in start order
    ended: list[str] = []
    held: list[tuple[int, str]] = []  # (kill at event count, upid)
    free = [f"a{k}" for k in range(NODES) for _ in range(SLOTS)]
    i = 0
    while n < total:
        t += 0.01
        if held and held[0][0] <= n:
            _, upid = held.pop(0)
            yield t, ProcessMoved(upid, 0, ps.TERMINATED, t, "killed")
            ended.append(upid)
            n += 1
            continue
        if n % FORGET_EVERY < 1 and ended:
            yield t, ProcessesForgotten(ended, t)
            ended = []
            n += 1
            continue
        if len(live) >= LIVE or not free:
            upid, rid = live.pop(0)
            yield t, ProcessMoved(upid, 0, ps.EXITED, t)
            ended.append(upid)
            free.append(rid)
            n += 1
            continue
        upid = f"p{i}"
        i += 1
        if i % 997 == 0:
            yield t, ProcessScheduled(upid, 0, held_spec, t)
            yield t, ProcessMoved(upid, 0, ps.WAITING, t)
            held.append((n + 5000, upid))
            n += 2
            continue
        rid = free.pop()
        yield t, ProcessScheduled(upid, 0, spec, t)
        yield t, ProcessAssigned(upid, 0, rid, t)
        yield t, ProcessMoved(upid, 0, ps.PENDING, t)
        yield t, ProcessMoved(upid, 0, ps.RUNNING, t)
        live.append((upid, rid))
        n += 4


def build(path: Path, total: int) -> None:
    """Write the log at ``path`` (a fresh file), snapshots included."""
    tmp = path.with_name(path.name + ".part")
    for leftover in (tmp, Path(f"{tmp}.id"), Path(f"{tmp}-wal"), Path(f"{tmp}-shm")):
        leftover.unlink(missing_ok=True)
    component = component_for("pd")
    log = open_log(f"sqlite:///{tmp}", keep_snapshots=10_000)
    fence = log.acquire("pd")
    state = component.initial_state()
    registry = component.registry
    head, pending, next_snap = 0, [], SNAPSHOT_EVERY
    for t, event in events(total):
        pending.append(registry.to_pending(event, t))
        state = component.apply(state, event)
        if len(pending) >= BATCH or head + len(pending) >= next_snap:
            head = log.append(fence, head, pending)
            pending = []
            if head >= next_snap:
                data = msgpack.packb(component.snapshot(state), use_bin_type=True)
                log.save_snapshot(Snapshot("pd", head, t, component.snapshot_version, data))
                next_snap += SNAPSHOT_EVERY
    if pending:
        head = log.append(fence, head, pending)
    log.close()
    for suffix in ("", ".id"):
        os.replace(f"{tmp}{suffix}", f"{path}{suffix}")


def cached_log(workdir: Path, total: int) -> tuple[str, float]:
    """The log's URL (built if missing) and how long building took (0: cached)."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / f"cei-replay-bench-v{FORMAT}-{total}.sqlite"
    built = 0.0
    if not path.exists():
        t = time.perf_counter()
        build(path, total)
        built = time.perf_counter() - t
    return f"sqlite:///{path}", built


def _timed(fn: Any) -> tuple[float, float, Any]:
    """Wall and CPU seconds of ``fn()``, and what it returned."""
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - t, time.process_time() - c, out


def _best(url: str, fn: Any, repeat: int, cache: Path | None = None) -> tuple[float, float, Any]:
    """The best of ``repeat`` runs of ``fn(replay)``, each with a fresh reader."""
    best: tuple[float, float, Any] = (float("inf"), float("inf"), None)
    for _ in range(repeat):  # best of: this machine's load comes and goes
        with Replay(url, cache=cache) as r:
            got = _timed(lambda: fn(r))  # noqa: B023
        best = min(best, got, key=lambda x: x[0])
    return best


def measure(total: int, workdir: Path, repeat: int = 3) -> list[dict[str, Any]]:
    url, built = cached_log(workdir, total)
    label = f"{total / 1e6:g}M" if total >= 1_000_000 else f"{total // 1000}k"
    with Replay(url, cache=None) as r:
        head = r.head("pd")
        mid = head // 2
        snap = max((o for o in r.log.snapshots("pd") if o <= mid), default=0)
        # a process held back at the middle: the newest one scheduled with the constraint
        state = r.state("pd", mid)
        target = max((p for p in state.processes.values() if p.state == ps.WAITING),
                     key=lambda p: p.seq).upid
    state_s, state_c, _ = _best(url, lambda r: r.state("pd", mid), repeat)
    why_s, why_c, answer = _best(url, lambda r: why(r, target, mid), repeat)
    assert answer["state"] == ps.WAITING and answer["nodes"][0]["reason"] == "constraint", answer["nodes"][:1]
    # best of ``repeat`` too: a single run on a shared machine varied 2x (RS4)
    state_full_s, state_full_c, _ = _best(url, lambda r: r.state("pd", mid, snapshots=False), repeat)
    why_full_s, why_full_c, _ = _best(url, lambda r: why(r, target, mid, snapshots=False), repeat)
    def read(r: Replay) -> int:
        fields = r.component("pd").shared_fields()
        with paused_gc():  # as a fold reads (RS1): rows, a repeated spec decoded once (RS5)
            return sum(len(rows) for _, _, rows in r.rows("pd", 1, mid, SharedValues(fields)))

    read_s, read_c, _ = _best(url, read, 1)
    # the reader's checkpoints (RS2): the first fold leaves one at the middle, later ones start there
    cache = workdir / f"cei-replay-bench-cache-{os.getpid()}"
    shutil.rmtree(cache, ignore_errors=True)
    try:
        first_s, first_c, _ = _best(url, lambda r: r.state("pd", mid, snapshots=False), 1, cache)
        cached_s, cached_c, _ = _best(url, lambda r: r.state("pd", mid, snapshots=False), repeat, cache)
        why_cached_s, why_cached_c, _ = _best(url, lambda r: why(r, target, mid, snapshots=False), repeat, cache)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    note = f"offset {mid:,} of {head:,}; newest snapshot below it at {snap:,}"
    decode = "baseline: decoding the events up to the middle as the fold reads them, nothing applied"
    return [
        _r(f"state at middle of {label} events s", state_s, "s", state_full_s,
           note=f"{note}; cpu {state_c:.2f} s; baseline: the same state folded from offset 1"),
        _r(f"why at middle of {label} events s", why_s, "s", why_full_s,
           note=f"why {target} (WAITING, {len(answer['history'])} events of history, "
                f"{len(answer['nodes'])} node verdicts); cpu {why_c:.2f} s; baseline: snapshots ignored"),
        _r(f"state at middle of {label} events, no snapshots s", state_full_s, "s", read_s,
           note=f"no checkpoint either; cpu {state_full_c:.2f} s; {decode} (cpu {read_c:.2f} s)"),
        _r(f"why at middle of {label} events, no snapshots s", why_full_s, "s", read_s,
           note=f"no checkpoint either; cpu {why_full_c:.2f} s; {decode}"),
        _r(f"state at middle of {label} events, no snapshots, first fold with a cache s", first_s, "s",
           state_full_s, note=f"leaves checkpoints (RS2); cpu {first_c:.2f} s; "
                              "baseline: the same fold without a cache"),
        _r(f"state at middle of {label} events, no snapshots, cached s", cached_s, "s", state_full_s,
           note=f"from the checkpoint the first fold left; cpu {cached_c:.2f} s; "
                "baseline: the same fold without a cache"),
        _r(f"why at middle of {label} events, no snapshots, cached s", why_cached_s, "s", why_full_s,
           note=f"cpu {why_cached_c:.2f} s; baseline: the same why without a cache"),
    ] + ([_r(f"building the {label}-event log s", built, "s", None, note="once; cached in the work directory")]
         if built else [])


def _r(metric: str, value: float, unit: str, baseline: float | None, note: str = "") -> dict[str, Any]:
    ratio = (baseline / value) if baseline and value else None  # lower is better: > 1 is a gain
    return {"metric": metric, "value": round(value, 3), "unit": unit,
            "baseline": None if baseline is None else round(baseline, 3),
            "ratio": None if ratio is None else round(ratio, 2), "note": note}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=1.0, help="events = 1,000,000 x scale")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "cei-bench"),
                        help="where the generated log is cached")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs of each figure; the best counts (the first cached fold and decoding run once)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    results = measure(max(10_000, int(1_000_000 * args.scale)), Path(args.workdir), max(1, args.repeat))
    if args.json:
        print(json.dumps({"benchmark": "replay", "goal": GOAL, "results": results}, indent=2))
    else:
        print(f"goal: {GOAL}")
        for r in results:
            base = "" if r["baseline"] is None else f"  (baseline {r['baseline']:,} {r['unit']}, ratio {r['ratio']})"
            print(f"{r['metric']:<52} {r['value']:>10,} {r['unit']}{base}")
            if r["note"]:
                print(f"    {r['note']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
