"""Provisioner throughput: provision and terminate N nodes through the actor on a simulated cloud.

A ``ProvisionerActor`` runs in a real thespian system (default: the TCP base, its own process)
on a real log (default: a SQLite file, the embedded default; ``--log URL`` for another, e.g.
``zk://127.0.0.1:2181/bench``). Its site is the simulated cloud with no boot delay, no latency
and no faults. ``--senders`` client endpoints (threads) tell it N ``Provision`` messages (one
node each, as EPUM sends them); the client waits until no node is REQUESTED; then they tell
``TerminateNodes`` in batches of 100 and the client waits until every node is TERMINATED.
Each phase's rate is nodes / wall time from the first message to the last node done.

Baselines, measured in the same run: the simulated driver's raw ``create_node`` (with a
client token) and ``destroy_node`` rates, called in a loop in this process (``ratio`` = actor
rate / raw rate); and the transport: the same senders telling the same N messages to a no-op
actor (``provision_vs_transport``). Also reported: events written per node (the log's head
growth / N), by type, and how many appends carried them.

    python -m benchmarks.provisioner [--n N] [--scale K] [--senders S] [--log URL|zk] [--json]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from typing import Any

try:
    import cei_actors  # noqa: F401
except ImportError:  # run as a file from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from thespian.actors import Actor, ActorExitRequest  # noqa: E402

from cei_actors.eventlog import open_log  # noqa: E402
from cei_actors.provisioner.client import ProvisionerClient  # noqa: E402
from cei_actors.provisioner.drivers import SimulatedCloudDriver  # noqa: E402
from cei_actors.provisioner.messages import Provision, TerminateNodes  # noqa: E402
from cei_actors.runtime import control  # noqa: E402
from cei_actors.runtime.client import ServiceClient  # noqa: E402
from cei_actors.runtime.system import (  # noqa: E402
    SIMPLE_BASE,
    TCP_BASE,
    shutdown_system,
    start_actor,
    start_system,
)

GOAL = (
    "provision and terminate 10,000 nodes through the actor; report nodes/s and the ratio to the "
    "simulated driver's raw create rate (no target ratio set); events written per node: a small "
    "constant (<= 4)"
)
SITE = {"type": "sim", "seed": 1}
DT = {"mappings": {"sim": {"iaas_image": "ami-sim-base", "iaas_allocation": "t1.micro"}}}
TERMINATE_BATCH = 100


class Sink(Actor):
    """Counts the requests it receives: the transport baseline."""

    def __init__(self, *args: Any) -> None:
        super().__init__()
        self.count = 0

    def receiveMessage(self, msg: Any, sender: Any) -> None:  # noqa: N802 - thespian's name
        if msg == "count":
            self.send(sender, self.count)
        elif isinstance(msg, control.Request):
            self.count += 1


def fire(clients: list[ServiceClient], messages: list[Any]) -> None:
    """Tell ``messages`` spread over the clients, one thread per client."""
    def send(k: int) -> None:
        for message in messages[k :: len(clients)]:
            clients[k].tell(message)

    threads = [threading.Thread(target=send, args=(k,)) for k in range(len(clients))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def transport_rate(asys: Any, n: int, senders: int) -> float:
    """Tells/s of the same messages from the same number of senders to a no-op actor."""
    sink = asys.createActor(Sink if getattr(asys, "cei_base", "") == SIMPLE_BASE
                            else "benchmarks.provisioner.Sink")
    clients = [ServiceClient(asys, sink, timeout=60.0) for _ in range(senders)]
    messages = [Provision(f"launch-{i}", "dt", "sim", [f"node-{i:06d}"], {}) for i in range(n)]
    t0 = time.perf_counter()
    fire(clients, messages)
    while asys.ask(sink, "count", 10) < n:
        time.sleep(0.005)
    elapsed = time.perf_counter() - t0
    for c in clients:
        c.close()
    asys.tell(sink, ActorExitRequest())
    return n / elapsed


def raw_driver_rates(n: int) -> tuple[float, float]:
    """Creates/s and destroys/s of the simulated driver called directly, one thread."""
    driver = SimulatedCloudDriver()
    t0 = time.perf_counter()
    nodes = [driver.create_node(name=f"n{i}", size="t1.micro", image="ami-sim-base",
                                ex_clienttoken=f"raw-{i}") for i in range(n)]
    t1 = time.perf_counter()
    for node in nodes:
        driver.destroy_node(node)
    t2 = time.perf_counter()
    return n / (t1 - t0), n / (t2 - t1)


def wait_until(client: ProvisionerClient, done, timeout: float) -> dict:
    end = time.monotonic() + timeout
    while True:
        status = client.status()
        if done(status["nodes"]):
            return status
        if time.monotonic() > end:
            raise TimeoutError(f"not done in {timeout}s: {status}")
        time.sleep(0.05)


def run(n: int, base: str, log_url: str, concurrency: int, senders: int) -> dict[str, Any]:
    asys = start_system(TCP_BASE if base == "tcp" else SIMPLE_BASE)
    try:
        transport = transport_rate(asys, n, senders)
        config = {"create_concurrency": concurrency, "terminator_concurrency": concurrency,
                  "reaper_interval": 0.0}
        addr = start_actor(asys, "cei_actors.provisioner.actor.ProvisionerActor",
                           control.Start(log_url, config=config, leadership="always"),
                           timeout=60.0)
        service = ServiceClient(asys, addr, timeout=60.0)
        client = ProvisionerClient(service)
        client.add_site("sim", SITE)
        client.add_dt("dt", DT)
        head0 = service.call(control.Status())["head"]
        ids = [f"node-{i:06d}" for i in range(n)]
        clients = [ServiceClient(asys, addr, timeout=60.0) for _ in range(senders)]
        provisions = [Provision(f"launch-{nid}", "dt", "sim", [nid], {}) for nid in ids]
        terminations = [TerminateNodes(ids[i : i + TERMINATE_BATCH])
                        for i in range(0, n, TERMINATE_BATCH)]

        t0 = time.perf_counter()
        fire(clients, provisions)
        wait_until(client, lambda c: sum(c.values()) == n and not c.get("REQUESTED"), 600)
        t1 = time.perf_counter()
        fire(clients, terminations)
        wait_until(client, lambda c: c.get("TERMINATED", 0) == n, 600)
        t2 = time.perf_counter()

        status = service.call(control.Status())
        events = status["head"] - head0
        service.call(control.Stop())
        for c in [service, *clients]:
            c.close()
    finally:
        shutdown_system(asys)
    by_type: collections.Counter[str] = collections.Counter()
    if not log_url.startswith("memory://"):
        log = open_log(log_url)
        try:
            for record in log.read("provisioner", head0 + 1):
                by_type[record.type] += 1
        finally:
            log.close()
    return {
        "provision_s": t1 - t0,
        "terminate_s": t2 - t1,
        "transport": transport,
        "events": events,
        "by_type": dict(by_type),
        "appends": status["stats"]["appends"],
        "batches": status["stats"]["batches"],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=10_000, help="nodes (default 10,000)")
    p.add_argument("--scale", type=int, default=1, help="multiply --n")
    p.add_argument("--base", choices=("tcp", "simple"), default="tcp")
    p.add_argument("--log", default=None,
                   help="log URL (default: a SQLite file in a temp dir; 'zk': a ZooKeeper "
                        "server started for the run)")
    p.add_argument("--concurrency", type=int, default=20,
                   help="create_concurrency and terminator_concurrency (default 20)")
    p.add_argument("--senders", type=int, default=8,
                   help="client endpoints sending in parallel (default 8)")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    n = a.n * a.scale
    tmp = None
    log_url = a.log
    if log_url is None:
        tmp = tempfile.mkdtemp(prefix="cei-bench-prov-")
        log_url = f"sqlite:///{tmp}/log.db"
    zk = None
    if log_url == "zk":
        from cei_actors.testing.zkserver import ZkServer

        tmp = tempfile.mkdtemp(prefix="cei-bench-prov-")
        zk = ZkServer(os.path.join(tmp, "zk"))
        zk.start()
        log_url = f"zk://{zk.hosts}/bench"
    try:
        raw_create, raw_destroy = raw_driver_rates(n)
        m = run(n, a.base, log_url, a.concurrency, a.senders)
    finally:
        if zk is not None:
            zk.stop()
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    prov_rate = n / m["provision_s"]
    term_rate = n / m["terminate_s"]
    both_rate = n / (m["provision_s"] + m["terminate_s"])
    raw_both = n / (n / raw_create + n / raw_destroy)
    per_node = m["events"] / n
    results = [
        {"metric": "provision", "value": round(prov_rate, 1), "unit": "nodes/s",
         "baseline": round(raw_create, 1), "ratio": round(prov_rate / raw_create, 4)},
        {"metric": "provision_vs_transport", "value": round(prov_rate, 1), "unit": "nodes/s",
         "baseline": round(m["transport"], 1), "ratio": round(prov_rate / m["transport"], 4)},
        {"metric": "terminate", "value": round(term_rate, 1), "unit": "nodes/s",
         "baseline": round(raw_destroy, 1), "ratio": round(term_rate / raw_destroy, 4)},
        {"metric": "provision_and_terminate", "value": round(both_rate, 1), "unit": "nodes/s",
         "baseline": round(raw_both, 1), "ratio": round(both_rate / raw_both, 4)},
        {"metric": "events_per_node", "value": round(per_node, 3), "unit": "events",
         "baseline": None, "ratio": None},
    ]
    config = {"n": n, "base": a.base, "senders": a.senders, "log": log_url.split("?")[0], "concurrency": a.concurrency,
              "events_by_type": m["by_type"], "appends": m["appends"], "batches": m["batches"]}
    if a.json:
        print(json.dumps({"benchmark": "provisioner", "goal": GOAL, "results": results,
                          "config": config}))
        return 0
    print(f"Provisioner through the actor, {n:,} nodes, {a.base} base, log {config['log']}")
    print(f"goal: {GOAL}\n")
    head = ("metric", "value", "unit", "baseline", "ratio")
    rows = [head] + [
        (r["metric"], f"{r['value']:,}", r["unit"],
         "" if r["baseline"] is None else f"{r['baseline']:,}",
         "" if r["ratio"] is None else f"{r['ratio']:.3f}")
        for r in results
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
    print("\nbaselines: the simulated driver called directly (create, destroy, both); for\n"
          f"provision_vs_transport, {a.senders} senders telling the same messages to a no-op actor")
    print(f"\nevents by type: {m['by_type']}")
    print(f"appends: {m['appends']:,} for {m['batches']:,} message batches")
    return 0


if __name__ == "__main__":
    sys.exit(main())
