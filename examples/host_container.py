"""A host container that embeds CEI and reacts to what happens, in the shape of the
observatory's capability container.

The container owns its process: it has start and quit hooks and a ``run()`` loop. CEI lives
inside it through :class:`cei_actors.embed.CEI`. The container subscribes to process, node and
HA changes (a callback on a thread the API owns), runs one process to its end, then keeps a
service alive under HA (``npreserving``, 2 copies), kills one copy's
node, waits until HA has replaced the copy, and shows the callbacks it received.

    python examples/host_container.py [--base simpleSystemBase] [--home DIR] [--log URL]

On ``multiprocTCPBase`` (default) the copies run on EEAgent "VMs" booted by the local cloud
driver (EPUM and the Provisioner at work), one slot each; killing a node kills its EEAgent,
and the VM dies with it. On ``simpleSystemBase`` everything runs in this process on static nodes (in-system
EEAgents, which cannot be killed from outside), so the copy's process is killed instead.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from cei_actors.embed import CEI, Change
from cei_actors.launch.plan import Plan, load_plan

#: A plan for the simple base: no clouds, two static nodes, the HA service.
STATIC_PLAN = {
    "log": "sqlite:///${home}/log.sqlite",
    "components": {"pd": {"config": {"dispatch_retry_seconds": 2.0}},
                   "ha": {"config": {"poll_interval": 1.0}}},
    "pd": {"engines": {"default": {"slots": 2, "heartbeat_period": 1}}},
    "static_nodes": [{"node_id": "node-1"}, {"node_id": "node-2"}],
}
#: The service HA keeps alive (a marker in its command finds its processes).
SERVICE = ["sleep", "3600.25"]


class Container:
    """A minimal capability container: services are started in ``on_start``, stopped in
    ``on_quit``; ``run`` does the container's work between them; ``on_change`` is told."""

    def __init__(self, base: str, home: Path, log_url: str | None) -> None:
        self.base = base
        self.home = home
        self.log_url = log_url
        self.cei: CEI | None = None
        self.seen: list[Change] = []
        self._cv = threading.Condition()

    def plan(self) -> Plan:
        if self.base == "multiprocTCPBase":
            # the built-in plan, with one slot per node: each copy gets a node of its own
            # (a waiting node_exclusive process does not raise the PD's need for nodes)
            plan = load_plan(None, home=self.home, log_url=self.log_url)
            engines = {k: {**v, "slots": 1} for k, v in plan.pd["engines"].items()}
            return dataclasses.replace(plan, pd={**plan.pd, "engines": engines})
        path = self.home / "static-plan.yaml"
        path.write_text(yaml.safe_dump(STATIC_PLAN))
        return load_plan(path, home=self.home, log_url=self.log_url)

    def on_start(self) -> None:
        self.cei = CEI(self.plan(), base=self.base, log_url=self.log_url, home=self.home,
                       progress=lambda line: print(f"[cei] {line}", flush=True))
        self.cei.start()

    def on_quit(self) -> None:
        if self.cei is not None:
            self.cei.stop()
            self.cei = None

    # ---- being told --------------------------------------------------------------------------

    def on_change(self, c: Change) -> None:
        """Called by CEI on its own thread, once per change, in order."""
        if c.kind == "process":
            where = f" on {c.data['node_id']}" if c.data and c.data.get("node_id") else ""
            print(f"[callback] process {c.key} {c.state} round {c.data['round'] if c.data else '-'}"
                  f"{where}{f' (HA group {c.group})' if c.group else ''}", flush=True)
        elif c.kind == "ha":
            why = f" ({c.data['why']})" if c.data else ""
            print(f"[callback] ha {c.key} {c.state}{why}", flush=True)
        else:
            print(f"[callback] {c.kind} {c.key} {c.state} [{c.stream}]", flush=True)
        with self._cv:
            self.seen.append(c)
            self._cv.notify_all()

    def wait_until(self, what: str, cond: Callable[[], bool], timeout: float = 120.0) -> None:
        """Wait for the callbacks to make ``cond`` true (on the simple base the actors run only
        while the host is inside a CEI call: let them run meanwhile)."""
        assert self.cei is not None
        deadline = time.monotonic() + timeout
        with self._cv:
            while not cond():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no {what} within {timeout:g}s")
                if self.base == "simpleSystemBase":
                    self._cv.release()
                    try:
                        self.cei.run_for(min(remaining, 0.1))
                    finally:
                        self._cv.acquire()
                else:
                    self._cv.wait(remaining)

    def _since(self, mark: int, kind: str, key: str | None = None, state: str | None = None) -> bool:
        return any(c.kind == kind and (key is None or c.key == key) and (state is None or c.state == state)
                   for c in self.seen[mark:])

    # ---- the work ----------------------------------------------------------------------------

    def work(self) -> int:
        assert self.cei is not None
        cei = self.cei
        sub = cei.subscribe(self.on_change, kinds=["process", "node", "ha"], since="now")
        try:
            pd = cei.pd
            pd.schedule_process("hello", command=["sh", "-c", "echo hello"])
            proc = pd.wait_process("hello", ["EXITED", "FAILED", "REJECTED"], timeout=60)
            print(f"process hello: {proc['state']} ({proc['msg']})", flush=True)

            cei.ha.create_group("web", "npreserving", {"preserve_n": 2},
                                {"command": SERVICE, "restart_mode": "never"})
            self.wait_until("STEADY web", lambda: self._since(0, "ha", "web", "STEADY"))
            group = cei.ha.wait_group("web", "STEADY", timeout=30)
            victim = group["copies"][0]
            print(f"HA group web: STEADY, copies {[c['upid'] for c in group['copies']]}", flush=True)

            mark = len(self.seen)
            self.kill(victim["node_id"])
            self.wait_until(f"end of copy {victim['upid']}",
                            lambda: any(c.kind == "process" and c.key == victim["upid"]
                                        and c.state in ("FAILED", "TERMINATED") for c in self.seen[mark:]))
            self.wait_until("STEADY web again", lambda: self._since(mark, "ha", "web", "STEADY"))
            group = cei.ha.wait_group("web", "STEADY", timeout=30)
            copies = [c["upid"] for c in group["copies"]]
            print(f"HA group web: STEADY again, copies {copies} (replaced {victim['upid']})", flush=True)
            cei.ha.remove_group("web")
            self.wait_until("web removed", lambda: self._since(mark, "ha", "web", "REMOVED"))
        finally:
            sub.close()
        counts = collections.Counter(c.kind for c in self.seen)
        print("callbacks received: " + ", ".join(f"{k} {n}" for k, n in sorted(counts.items())),
              flush=True)
        ok = proc["state"] == "EXITED" and victim["upid"] not in copies and len(copies) == 2
        return 0 if ok else 1

    def kill(self, node_id: str) -> None:
        """Kill the node (TCP base: its EEAgent, so the local "VM" dies) or, on static nodes,
        the copy's process on it."""
        if self.base == "multiprocTCPBase":
            pids = [p for p in _pids(["cei_actors.eeagent"]) if _arg(p, "--node-id") == node_id]
            print(f"killing node {node_id} (EEAgent pid {pids})", flush=True)
        else:
            pids = [p for p in _pids(SERVICE) if _node_of(p) == node_id] or _pids(SERVICE)[:1]
            print(f"killing the copy's process on static node {node_id} (pid {pids})", flush=True)
        for pid in pids:
            os.kill(pid, signal.SIGKILL)

    def run(self) -> int:
        self.on_start()
        try:
            return self.work()
        finally:
            self.on_quit()


def _pids(words: list[str]) -> list[int]:
    """Processes of this user whose command line holds ``words`` in a row."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        n = len(words)
        if any(argv[i:i + n] == words for i in range(len(argv) - n + 1)):
            out.append(int(entry.name))
    return sorted(out)


def _arg(pid: int, option: str) -> str | None:
    """The value of ``option`` on the command line of ``pid``."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return None
    return next((argv[i + 1] for i in range(len(argv) - 1) if argv[i] == option), None)


def _node_of(pid: int) -> str | None:
    """The static node whose EEAgent started ``pid`` (from the directory it runs in)."""
    try:
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return None
    return next((part for part in Path(cwd).parts if part.startswith("node-")), None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", default="multiprocTCPBase",
                        choices=["multiprocTCPBase", "simpleSystemBase"])
    parser.add_argument("--home", type=Path, default=None)
    parser.add_argument("--log", default=None, help="log URL (default: SQLite under home)")
    args = parser.parse_args(argv)
    if args.home is not None:
        return Container(args.base, args.home.resolve(), args.log).run()
    with tempfile.TemporaryDirectory(prefix="cei-host-") as tmp:
        return Container(args.base, Path(tmp), args.log).run()


if __name__ == "__main__":
    sys.exit(main())
