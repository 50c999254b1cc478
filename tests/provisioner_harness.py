"""Drive the Provisioner core synchronously: a Runner on a memory log, a fake clock, and a
CloudWorker on a simulated cloud whose work the test runs step by step."""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable
from typing import Any

from cei_actors.eventlog import open_log
from cei_actors.provisioner.cloud import CloudWorker
from cei_actors.provisioner.drivers import validate_credentials, validate_site
from cei_actors.provisioner.logic import Provisioner
from cei_actors.provisioner.messages import AddDeployableType, AddSite
from cei_actors.provisioner.sealing import CredentialsKey
from cei_actors.runtime.core import Decision, Send, SetTimer, Work
from cei_actors.runtime.messages import ErrorReply, Ok
from cei_actors.runtime.runner import Runner, replay

SIM_SITE = {"type": "sim", "seed": 7}
DT = {
    "mappings": {"sim1": {"iaas_image": "ami-sim-base", "iaas_allocation": "t1.micro"}},
    "contextualization": {"method": "userdata", "userdata": "node ${name}"},
}


class FakeClock:
    """A clock for the Runner (callable) and for the simulated cloud (``now()``)."""

    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def now(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


#: The operator's credentials key of every harness (the core seals with it, the worker opens).
KEY_BYTES = CredentialsKey.generate()
KEY = CredentialsKey(KEY_BYTES)


def make_core(credentials_key: CredentialsKey | None = KEY, **config: Any) -> Provisioner:
    base = {"query_interval": 10.0, "disappear_grace": 30.0}
    base.update(config)
    return Provisioner.from_config(
        base, site_validator=validate_site, credentials_validator=validate_credentials,
        credentials_key=credentials_key,
    )


class Harness:
    """One Provisioner "actor" with its effects held for the test to perform."""

    def __init__(self, url: str | None = None, clock: FakeClock | None = None,
                 worker: CloudWorker | None = None, seed: int = 1,
                 snapshot_every: int = 10**9, **config: Any) -> None:
        self.url = url or f"memory://{uuid.uuid4().hex}"
        self.clock = clock or FakeClock()
        self.worker = worker or CloudWorker(clock=self.clock, rng=random.Random(seed),
                                            credentials_key=KEY)
        self.config = config
        self.seed = seed
        self.snapshot_every = snapshot_every
        self.work: list[Work] = []
        self.timers: dict[str, tuple[float, Any]] = {}
        self.sent: list[Send] = []
        self.runner: Runner = None  # type: ignore[assignment]
        self.start()

    # ---- lifecycle

    def start(self) -> Decision:
        self.work, self.timers = [], {}
        self.runner = Runner(make_core(**self.config), open_log(self.url), clock=self.clock,
                             rng=random.Random(self.seed),
                             snapshot_every=self.snapshot_every)
        d = self.runner.recover()
        self._effects(d)
        return d

    def crash(self) -> Decision:
        """The actor dies: work not yet run is lost; a new one recovers from the log."""
        return self.start()

    @property
    def state(self):  # noqa: ANN201
        return self.runner.state

    @property
    def core(self) -> Provisioner:
        return self.runner.component

    # ---- messages

    def handle(self, msg: Any) -> Any:
        d = self.runner.handle(msg)
        self._effects(d)
        return d.reply

    def ok(self, msg: Any) -> Any:
        reply = self.handle(msg)
        assert isinstance(reply, Ok), reply
        return reply.value

    def error(self, msg: Any) -> ErrorReply:
        head = self.runner.head
        reply = self.handle(msg)
        assert isinstance(reply, ErrorReply), reply
        assert self.runner.head == head, "a refused request wrote events"
        return reply

    def _effects(self, d: Decision) -> None:
        for e in d.effects:
            if isinstance(e, Work):
                self.work.append(e)
            elif isinstance(e, SetTimer):
                self.timers[e.key] = (self.clock.t + e.delay, e.message)
            elif isinstance(e, Send):
                self.sent.append(e)
            else:
                raise AssertionError(f"unknown effect {e!r}")

    # ---- work and timers

    def perform(self, work: Work) -> Any:
        return self.worker.handlers()[work.kind](work.payload)

    def run_one(self, index: int = 0, deliver: bool = True) -> Any:
        work = self.work.pop(index)
        result = self.perform(work)
        if deliver:
            self.handle(result)
        return result

    def drain(self, limit: int = 100_000, kinds: tuple[str, ...] | None = None) -> int:
        n = 0
        while n < limit:
            idx = next((i for i, w in enumerate(self.work) if kinds is None or w.kind in kinds),
                       None)
            if idx is None:
                break
            self.run_one(idx)
            n += 1
        return n

    def fire(self, key: str) -> None:
        _, msg = self.timers.pop(key)
        self.handle(msg)

    def reconcile(self) -> None:
        """List every account and run everything that follows to quiescence."""
        self.handle(self._query())
        self.drain()

    @staticmethod
    def _query() -> Any:
        from cei_actors.provisioner.messages import QuerySites

        return QuerySites()

    # ---- setup helpers

    def setup_sim(self, site: str = "sim1", definition: dict | None = None) -> None:
        self.ok(AddSite(site, dict(definition or SIM_SITE)))
        self.ok(AddDeployableType("dt1", DT))

    def cloud(self, site_payload_account: str | None = None):  # noqa: ANN201
        drivers = self.worker.shared_drivers()
        assert len(drivers) <= 1, drivers
        return drivers[0] if drivers else None

    def replayed(self):  # noqa: ANN201
        return replay(self.core, self.runner.log, self.core.stream)


def sim_vms(driver) -> list:  # noqa: ANN001
    """Every VM the simulated cloud ever made (internal view, for invariants)."""
    with driver._lock:
        return list(driver._vms.values())


def first(seq: list, pred: Callable[[Any], bool]) -> Any:
    return next(x for x in seq if pred(x))
