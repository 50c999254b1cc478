"""A host container that embeds CEI, in the shape of the observatory's capability container.

The container owns its process: it has start and quit hooks and a ``run()`` loop. CEI lives
inside it through :class:`cei_actors.embed.CEI`; the container schedules one process through
the embedded Process Dispatcher, waits for it to finish, prints its state and quits.

    python examples/host_container.py [--base simpleSystemBase] [--home DIR] [--log URL]

On ``multiprocTCPBase`` (default) the process runs on an EEAgent "VM" booted by the local
cloud driver (EPUM and the Provisioner at work); on ``simpleSystemBase`` everything runs in
this process, on a static node (an in-system EEAgent).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import yaml

from cei_actors.embed import CEI
from cei_actors.launch.plan import Plan, load_plan

#: A plan for the simple base: no clouds, one static node.
STATIC_PLAN = {
    "log": "sqlite:///${home}/log.sqlite",
    "components": {"pd": {"config": {"dispatch_retry_seconds": 2.0}}},
    "pd": {"engines": {"default": {"slots": 2, "heartbeat_period": 1}}},
    "static_nodes": [{"node_id": "node-1"}],
}


class Container:
    """A minimal capability container: services are started in ``on_start``, stopped in
    ``on_quit``; ``run`` does the container's work between them."""

    def __init__(self, base: str, home: Path, log_url: str | None) -> None:
        self.base = base
        self.home = home
        self.log_url = log_url
        self.cei: CEI | None = None

    def plan(self) -> Plan | None:
        if self.base == "multiprocTCPBase":
            return None  # the built-in plan
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

    def work(self) -> int:
        assert self.cei is not None
        pd = self.cei.pd
        pd.schedule_process("hello", command=["sh", "-c", "echo hello"])
        proc = pd.wait_process("hello", ["EXITED", "FAILED", "REJECTED"], timeout=60)
        print(f"process hello: {proc['state']} ({proc['msg']})", flush=True)
        return 0 if proc["state"] == "EXITED" else 1

    def run(self) -> int:
        self.on_start()
        try:
            return self.work()
        finally:
            self.on_quit()


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
