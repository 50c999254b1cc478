"""EPUM decider pass and instance update cost, and how they grow with the state.

Two shapes, each at two sizes (default: 100 and 1,000 domains x 10 instances; 1 domain x
1,000 and x 10,000 instances; ``--scale N`` multiplies the sizes). For each, on a memory
log through the Runner (decide + fold + append):

- ``update``: one Provisioner notification (``NodeStateChanged``) for a random instance.
- ``pass_one_change``: one instance lost, then one decider pass (its domain's engine
  decides and launches a replacement).
- ``pass_idle``: a decider pass when nothing changed.

Baseline, measured in the same run: the original's way of doing the same work. Its decider
re-read every domain and instance each pass and decided every domain (here: every domain
marked dirty plus a copy of every instance record per pass), and it found an instance's
domain by scanning every domain (here: that scan before the same update). ``ratio`` =
value / baseline for times (below 1 is better). ``growth`` = per-operation time at the
large size / at the small size: about 1 means the cost follows the changes, not the
state; 10 would be linear in the state.

    python -m benchmarks.epum [--scale N] [--repeat R] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
import uuid
from typing import Any

try:
    import cei_actors  # noqa: F401
except ImportError:  # run as a file from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cei_actors.epum.logic import EPUM  # noqa: E402
from cei_actors.epum.messages import AddDomain, AddDomainDefinition, DeciderPass  # noqa: E402
from cei_actors.eventlog import open_log  # noqa: E402
from cei_actors.provisioner.messages import NodeStateChanged, Provision  # noqa: E402
from cei_actors.runtime.core import Send  # noqa: E402
from cei_actors.runtime.runner import Runner  # noqa: E402

GOAL = "decider pass and instance update cost independent of state size (growth ~1x at 10x state)"


class Bench:
    """An EPUM Runner with ``domains`` x ``per_domain`` RUNNING instances."""

    def __init__(self, domains: int, per_domain: int, seed: int = 1) -> None:
        self.t = 1000.0
        self.rng = random.Random(seed)
        self.runner = Runner(EPUM(timers=False), open_log(f"memory://bench-{uuid.uuid4().hex}"),
                             clock=lambda: self.t, rng=random.Random(seed), snapshot_every=10**9)
        self.runner.recover()
        self.counter = 0
        self.runner.handle(AddDomainDefinition("def", {"general": {"engine_class": "preserve_n"}}))
        for i in range(domains):
            self.runner.handle(AddDomain(f"d{i}", "def", {"engine_conf": {"preserve_n": per_domain}}))
        self.answer(self.runner.handle(DeciderPass()).effects)

    def node(self, iid: str, state: str, **extra: Any) -> NodeStateChanged:
        self.counter += 1
        return NodeStateChanged({"node_id": iid, "state": state, "update_counter": self.counter,
                                 "launch_id": "l", "site": "local", "hostname": f"h{self.counter}",
                                 **extra})

    def answer(self, effects: list[Any]) -> None:
        """The Provisioner: every Provision becomes RUNNING at once."""
        msgs = [self.node(nid, "RUNNING") for e in effects
                if isinstance(e, Send) and isinstance(e.message, Provision) for nid in e.message.node_ids]
        for k in range(0, len(msgs), 5000):
            self.runner.handle_many(msgs[k:k + 5000])

    def running_ids(self) -> list[str]:
        return [i.instance_id for i in self.runner.state.instances.values() if i.state == "RUNNING"]


def timed(fn, n: int) -> float:
    """Median seconds per call over ``n`` calls."""
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def measure(domains: int, per_domain: int, repeat: int) -> dict[str, float]:
    t0 = time.perf_counter()
    b = Bench(domains, per_domain)
    setup = time.perf_counter() - t0
    st = b.runner.state
    assert len(st.instances) == domains * per_domain, len(st.instances)
    ids = b.running_ids()
    out: dict[str, float] = {"setup_s": setup}

    def update():
        b.runner.handle(b.node(b.rng.choice(ids), "RUNNING"))

    out["update"] = timed(update, repeat * 20)

    def update_scan():  # the original: find the domain by scanning every domain
        iid = b.rng.choice(ids)
        next(d for d in st.domains.values() if iid in d.instances)
        b.runner.handle(b.node(iid, "RUNNING"))

    out["update_baseline"] = timed(update_scan, repeat * 20)

    def idle_pass():
        b.t += 5.0
        b.runner.handle(DeciderPass())

    out["pass_idle"] = timed(idle_pass, repeat * 5)

    live = list(ids)

    def one_change():
        b.t += 5.0
        victim = live.pop(b.rng.randrange(len(live)))
        b.runner.handle(b.node(victim, "TERMINATED"))
        t0 = time.perf_counter()
        d = b.runner.handle(DeciderPass())
        dt = time.perf_counter() - t0
        b.answer(d.effects)
        live.extend(e.message.node_ids[0] for e in d.effects if isinstance(e.message, Provision))
        return dt

    out["pass_one_change"] = statistics.median(one_change() for _ in range(repeat * 5))

    def full_pass():  # the original: read every record, decide every domain
        b.t += 5.0
        _ = [inst.describe() for inst in st.instances.values()]
        st.vol.dirty.update(st.domains)
        b.runner.handle(DeciderPass())

    out["pass_baseline"] = timed(full_pass, max(3, repeat))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scale", type=int, default=1, help="multiply the sizes (default 1)")
    p.add_argument("--repeat", type=int, default=10, help="samples per measure (x5 to x20)")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    s = a.scale
    shapes = {
        "many_domains": [(100 * s, 10), (1000 * s, 10)],
        "one_big_domain": [(1, 1000 * s), (1, 10000 * s)],
    }
    results: list[dict[str, Any]] = []
    rows: list[tuple[str, ...]] = []
    for shape, sizes in shapes.items():
        small, large = (measure(d, n, a.repeat) for d, n in sizes)
        for size, m in zip(sizes, (small, large), strict=True):
            label = f"{size[0]}x{size[1]}"
            for metric, base in (("update", "update_baseline"), ("pass_one_change", "pass_baseline"),
                                 ("pass_idle", "pass_baseline")):
                value, baseline = m[metric], m[base]
                results.append({
                    "metric": f"{shape}.{label}.{metric}", "value": round(value * 1e6, 2), "unit": "us",
                    "baseline": round(baseline * 1e6, 2), "ratio": round(value / baseline, 4),
                    "per_second": round(1 / value, 1),
                })
                rows.append((shape, label, metric, f"{value * 1e6:9.1f}", f"{1 / value:10.0f}",
                             f"{baseline * 1e6:10.1f}", f"{value / baseline:7.3f}"))
            rows.append((shape, label, "setup", f"{m['setup_s']:8.2f}s", "", "", ""))
        for metric in ("update", "pass_one_change", "pass_idle"):
            g = large[metric] / small[metric]
            results.append({"metric": f"{shape}.growth.{metric}", "value": round(g, 3), "unit": "x",
                            "baseline": round(large[{"update": "update_baseline"}.get(metric, "pass_baseline")]
                                              / small[{"update": "update_baseline"}.get(metric, "pass_baseline")], 3),
                            "ratio": None})
            rows.append((shape, "10x state", f"growth {metric}", f"{g:8.2f}x", "", "", ""))
    if a.json:
        print(json.dumps({"benchmark": "epum", "goal": GOAL, "scale": s, "results": results}, indent=1))
        return 0
    print(f"EPUM decider/update cost (goal: {GOAL})")
    head = ("shape", "size", "metric", "us/op", "ops/s", "baseline us", "ratio")
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
