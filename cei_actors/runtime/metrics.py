"""Prometheus metrics: what each component counts, how it reaches the host's scrape endpoint.

Every component replica (and every EEAgent) builds a small :class:`MetricsReport` of plain
data on its own thread, every ``interval`` seconds and at once when its leadership changes,
and sends it to the host's :class:`MetricsCollector` actor (global name ``metrics``). The
collector keeps the newest report of each sender and serves them all on one HTTP endpoint
with ``prometheus_client`` (bound to 127.0.0.1 unless the plan says otherwise). No component
serves HTTP, and nothing is computed for a scrape beyond rendering the reports
(docs/decisions.md MT1).

What is counted:

- by the runtime, for every replica (:class:`LogStats` in the runner, :class:`ShellStats` in
  the shell): events appended by type, appends and their latency (a histogram), recoveries
  and how long the last took, snapshots (count, size, time), messages handled by type,
  heartbeats received, launches, leadership, epoch, log head, mode, held messages;
- from the component's state, by a pure function per component (``metrics(state)`` in each
  ``actor.py``), only on the leader: processes, nodes and instances by state, queue
  lengths, need vs have. A standby sends the runtime figures only, so sums over replicas
  never count a state twice.

:data:`METRICS` names every metric with its type and help; the README lists them.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from thespian.actors import Actor

from .messages import InvalidMessage, Message

logger = logging.getLogger(__name__)

#: The global actor name of a host's collector.
COLLECTOR_NAME = "metrics"
#: The collector's actor class (created by the launcher).
COLLECTOR_CLASS = "cei_actors.runtime.metrics.MetricsCollector"
#: Seconds between two reports of a replica, unless the plan's ``metrics.interval`` says.
DEFAULT_INTERVAL = 1.0
#: A sender not heard from for this many intervals (at least ``STALE_MIN`` s) is shown as
#: ``cei_up 0`` and its other figures are dropped; after ``FORGET`` s it is forgotten.
STALE_INTERVALS = 3
STALE_MIN = 5.0
FORGET = 600.0
#: Upper bounds (s) of the append latency histogram's buckets.
APPEND_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

#: A sample: (metric name, labels, value).
Sample = tuple[str, dict[str, str], float]

#: Every metric: name -> (type, help). Labels ``component`` and ``replica`` (the sender: a
#: replica name such as ``pd.1``, or ``eeagent:<node id>``) are on every series.
METRICS: dict[str, tuple[str, str]] = {
    # the runtime, every replica
    "cei_up": ("gauge", "1 if the replica reported within the last intervals, else 0"),
    "cei_leader": ("gauge", "1 if the replica leads its stream"),
    "cei_epoch": ("gauge", "the epoch of the replica's fence (its leadership term in the log)"),
    "cei_log_head": ("gauge", "the log offset the replica's state reflects"),
    "cei_mode": ("gauge", "1 for the replica's mode (idle, standby, recovering, ready, suspended, down)"),
    "cei_held_messages": ("gauge", "messages held until the replica serves (recovering, suspended)"),
    "cei_work_outstanding": ("gauge", "blocking work (cloud calls, launches) in flight"),
    "cei_messages": ("counter", "messages handled, by type"),
    "cei_heartbeats_received": ("counter", "heartbeats received from EEAgents"),
    "cei_events_appended": ("counter", "events appended to the log, by type"),
    "cei_appends": ("counter", "appends (batches of events) written to the log"),
    "cei_append_seconds": ("histogram", "latency of one append to the log"),
    "cei_launches": ("counter", "launches: processes dispatched (pd, eeagent), nodes launched "
                                "(provisioner), instances requested (epum), copies scheduled (ha)"),
    "cei_recoveries": ("counter", "times the replica recovered its state and started leading"),
    "cei_recovery_seconds": ("gauge", "how long the last recovery (fence, replay, reconcile) took"),
    "cei_snapshots": ("counter", "snapshots written"),
    "cei_snapshot_bytes": ("gauge", "size of the last snapshot written or loaded"),
    "cei_snapshot_seconds": ("gauge", "how long writing the last snapshot took"),
    # the PD, leader only
    "cei_pd_processes": ("gauge", "processes by state"),
    "cei_pd_queued_processes": ("gauge", "processes waiting for a slot (REQUESTED, WAITING, DIED_REQUESTED)"),
    "cei_pd_nodes": ("gauge", "nodes the PD knows, by engine"),
    "cei_pd_resources": ("gauge", "execution resources (EEAgents) by state"),
    "cei_pd_slots": ("gauge", "slots of the resources, by engine"),
    "cei_pd_slots_used": ("gauge", "slots assigned to processes, by engine"),
    "cei_pd_engine_need": ("gauge", "nodes the PD needs for an engine"),
    "cei_pd_agent_requests": ("gauge", "requests queued for EEAgents, not yet sent"),
    # EPUM, leader only
    "cei_epum_domains": ("gauge", "domains"),
    "cei_epum_instances": ("gauge", "instances by domain and state"),
    "cei_epum_domain_need": ("gauge", "instances a domain's engine wants (preserve_n or its target)"),
    "cei_epum_domain_have": ("gauge", "instances of a domain that count against its need (below TERMINATING)"),
    "cei_epum_pending_requests": ("gauge", "requests to the Provisioner not yet acknowledged, by kind"),
    # the Provisioner, leader only
    "cei_provisioner_nodes": ("gauge", "nodes by state"),
    "cei_provisioner_pending_requests": ("gauge", "nodes requested but not launched (launch), or terminating (terminate)"),
    # HA, leader only
    "cei_ha_groups": ("gauge", "process groups"),
    "cei_ha_group_target": ("gauge", "copies a group wants"),
    "cei_ha_group_copies": ("gauge", "copies a group has (not terminating)"),
    # EEAgents
    "cei_eeagent_processes": ("gauge", "processes on the agent's node, by state"),
    "cei_eeagent_heartbeats_sent": ("counter", "heartbeats sent to the PD"),
}


# ------------------------------------------------------------------------------- the figures


@dataclass
class Histogram:
    """Observations in fixed buckets (``bounds``: upper bounds, +Inf implied)."""

    bounds: tuple[float, ...] = APPEND_BUCKETS
    counts: list[int] = field(default_factory=list)
    total: float = 0.0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def to_data(self) -> list[Any]:
        """``[bounds, counts (one per bucket and +Inf, not cumulative), sum]``."""
        return [list(self.bounds), list(self.counts), self.total]


@dataclass
class LogStats:
    """What a :class:`~.runner.Runner` wrote: kept by the runner, read by the shell."""

    events: collections.Counter[str] = field(default_factory=collections.Counter)
    appends: int = 0
    append_seconds: Histogram = field(default_factory=Histogram)
    snapshots: int = 0
    snapshot_bytes: int = 0
    snapshot_seconds: float = 0.0

    def appended(self, pending: Iterable[Any], seconds: float) -> None:
        """Count one append of ``pending`` (events with a ``type``) that took ``seconds``."""
        events = self.events
        for event in pending:
            events[event.type] += 1
        self.appends += 1
        hist = self.append_seconds
        hist.counts[bisect.bisect_left(hist.bounds, seconds)] += 1
        hist.total += seconds

    def snapshot(self, size: int, seconds: float) -> None:
        self.snapshots += 1
        self.snapshot_bytes = size
        self.snapshot_seconds = seconds


@dataclass
class ShellStats:
    """What a shell counts besides its runner: messages, heartbeats, recoveries."""

    messages: collections.Counter[str] = field(default_factory=collections.Counter)
    heartbeats: int = 0
    recoveries: int = 0
    recovery_seconds: float = 0.0


def runtime_samples(status: dict[str, Any], log: LogStats | None, shell: ShellStats,
                    launch_events: Iterable[str] = ()) -> list[Sample]:
    """The runtime's samples of one replica from its ``status()``, its runner's and its shell's
    counts; ``launch_events``: the event types that count as launches."""
    out: list[Sample] = [
        ("cei_leader", {}, 1.0 if status.get("leader") and status.get("mode") == "ready" else 0.0),
        ("cei_epoch", {}, float(status.get("epoch") or 0)),
        ("cei_log_head", {}, float(status.get("head") or 0)),
        ("cei_mode", {"mode": str(status.get("mode"))}, 1.0),
        ("cei_held_messages", {}, float(status.get("held") or 0)),
        ("cei_work_outstanding", {}, float(status.get("work") or 0)),
        ("cei_heartbeats_received", {}, float(shell.heartbeats)),
        ("cei_recoveries", {}, float(shell.recoveries)),
        ("cei_recovery_seconds", {}, shell.recovery_seconds),
    ]
    out += [("cei_messages", {"type": t}, float(n)) for t, n in sorted(shell.messages.items())]
    if log is not None:
        launches = sum(log.events.get(t, 0) for t in launch_events)
        out += [("cei_events_appended", {"type": t}, float(n)) for t, n in sorted(log.events.items())]
        out += [
            ("cei_appends", {}, float(log.appends)),
            ("cei_launches", {}, float(launches)),
            ("cei_snapshots", {}, float(log.snapshots)),
            ("cei_snapshot_bytes", {}, float(log.snapshot_bytes)),
            ("cei_snapshot_seconds", {}, log.snapshot_seconds),
        ]
    return out


def counts(name: str, label: str, counter: dict[str, int] | collections.Counter[str],
           keep_zero: Iterable[str] = ()) -> list[Sample]:
    """One sample per key of ``counter`` (zeros dropped unless named in ``keep_zero``)."""
    keys = set(keep_zero) | {k for k, v in counter.items() if v}
    return [(name, {label: str(k)}, float(counter.get(k, 0))) for k in sorted(keys)]


# ------------------------------------------------------------------------------- the messages


@dataclass(frozen=True)
class ReportMetrics(Message):
    """Send a :class:`MetricsReport` to ``to`` every ``interval`` seconds and whenever the
    leadership changes (``to`` None: stop). ``name``: the sender's name in the reports (a
    replica name such as ``pd.1``). Reply: ``Ok(None)``."""

    plain_data = False  # holds an actor address
    max_bytes = None

    to: Any
    name: str
    interval: float = DEFAULT_INTERVAL

    def check(self) -> None:
        if not self.name:
            raise InvalidMessage("ReportMetrics.name: must not be empty")
        if not 0 < self.interval <= 3600:
            raise InvalidMessage(f"ReportMetrics.interval: expected 0 < seconds <= 3600, got {self.interval!r}")


@dataclass(frozen=True)
class MetricsReport(Message):
    """One sender's figures: ``samples`` (``[name, labels, value]``; counters are totals since
    the sender started) and ``histograms`` (``[name, labels, bounds, counts, sum]``)."""

    max_bytes = None

    source: str
    component: str
    interval: float
    samples: list
    histograms: list = field(default_factory=list)


@dataclass(frozen=True)
class ServeMetrics(Message):
    """Ask the collector to serve on ``address:port`` (0: a free port). Reply:
    ``Ok({"address", "port", "url", "pid"})``; asked again, it answers where it serves."""

    address: str = "127.0.0.1"
    port: int = 0

    def check(self) -> None:
        if not 0 <= self.port <= 65535:
            raise InvalidMessage(f"ServeMetrics.port: expected 0..65535, got {self.port}")
        if not self.address:
            raise InvalidMessage("ServeMetrics.address: must not be empty")


def make_report(source: str, component: str, interval: float, samples: list[Sample],
                histograms: list[tuple[str, dict[str, str], Histogram]] = ()) -> MetricsReport:
    """A :class:`MetricsReport` of plain data (lists, str labels, float values)."""
    return MetricsReport(
        source, component, float(interval),
        [[n, {str(k): str(v) for k, v in labels.items()}, float(v)] for n, labels, v in samples],
        [[n, dict(labels), *h.to_data()] for n, labels, h in histograms],
    )


# ------------------------------------------------------------------------------- the collector


@dataclass
class _Received:
    report: MetricsReport
    at: float


class Reports:
    """The newest report of each sender, rendered as Prometheus metric families.

    Thread-safe: reports arrive on the actor's thread, scrapes on the HTTP server's.
    """

    def __init__(self, clock: Any = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._latest: dict[str, _Received] = {}

    def add(self, report: MetricsReport) -> None:
        with self._lock:
            self._latest[report.source] = _Received(report, self._clock())

    def collect(self) -> Iterator[Any]:
        """prometheus_client's collector protocol: the metric families, one per name."""
        from prometheus_client.metrics_core import Metric

        now = self._clock()
        with self._lock:
            for source in [s for s, r in self._latest.items() if now - r.at > FORGET]:
                del self._latest[source]
            latest = sorted(self._latest.items())
        families: dict[str, Metric] = {}

        def family(name: str) -> Metric:
            if name not in families:
                kind, doc = METRICS.get(name, ("gauge", ""))
                families[name] = Metric(name, doc, kind)
            return families[name]

        for source, got in latest:
            report = got.report
            base = {"component": report.component, "replica": source}
            fresh = now - got.at <= max(STALE_INTERVALS * report.interval, STALE_MIN)
            family("cei_up").add_sample("cei_up", base, 1.0 if fresh else 0.0)
            if not fresh:
                continue
            for name, labels, value in report.samples:
                kind = METRICS.get(name, ("gauge", ""))[0]
                family(name).add_sample(name + ("_total" if kind == "counter" else ""),
                                        {**base, **labels}, value)
            for name, labels, bounds, bucket_counts, total in report.histograms:
                metric = family(name)
                running = 0
                for bound, n in zip([*bounds, float("inf")], bucket_counts, strict=True):
                    running += n
                    le = "+Inf" if bound == float("inf") else repr(float(bound))
                    metric.add_sample(name + "_bucket", {**base, **labels, "le": le}, float(running))
                metric.add_sample(name + "_count", {**base, **labels}, float(running))
                metric.add_sample(name + "_sum", {**base, **labels}, float(total))
        yield from families.values()


class MetricsCollector(Actor):
    """The host's collector: keeps the newest :class:`MetricsReport` of each sender and serves
    them on HTTP (``ServeMetrics``); the server stops with the actor."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reports = Reports()
        self._server: Any = None
        self._where: dict[str, Any] | None = None

    def receiveMessage(self, msg: Any, sender: Any) -> None:  # noqa: N802 - thespian's name
        try:
            self._on_message(msg, sender)
        except Exception:  # nothing may kill the collector
            logger.exception("metrics: failed handling %s", type(msg).__name__)

    def _on_message(self, msg: Any, sender: Any) -> None:
        from thespian.actors import ActorExitRequest

        from .control import Request, Response
        from .messages import ErrorReply, Ok, validate

        if isinstance(msg, MetricsReport):
            try:
                validate(msg)
            except InvalidMessage as exc:
                logger.warning("metrics: report refused: %s", exc)
                return
            self.reports.add(msg)
            return
        if isinstance(msg, ActorExitRequest):
            self._stop()
            return
        rid = None
        if isinstance(msg, Request):
            rid, msg = msg.rid, msg.message
        if not isinstance(msg, ServeMetrics):
            return
        try:
            validate(msg)
            reply: Any = Ok(self._serve(msg))
        except InvalidMessage as exc:
            reply = ErrorReply("bad_request", str(exc), "ServeMetrics")
        except OSError as exc:
            reply = ErrorReply("unavailable", f"cannot serve metrics on {msg.address}:{msg.port}: "
                                              f"{exc.strerror or exc}", "ServeMetrics")
        if rid != "":
            self.send(sender, reply if rid is None else Response(rid, reply))

    def _serve(self, msg: ServeMetrics) -> dict[str, Any]:
        if self._where is None:
            from prometheus_client import CollectorRegistry, start_http_server

            registry = CollectorRegistry(auto_describe=False)
            registry.register(self.reports)
            server, _thread = start_http_server(msg.port, addr=msg.address, registry=registry)
            self._server = server
            port = int(server.server_port)
            host = f"[{msg.address}]" if ":" in msg.address else msg.address
            self._where = {"address": msg.address, "port": port, "pid": os.getpid(),
                           "url": f"http://{host}:{port}/metrics"}
            logger.info("metrics: serving on %s", self._where["url"])
        return dict(self._where)

    def _stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            with contextlib.suppress(Exception):
                server.shutdown()
                server.server_close()


__all__ = [
    "APPEND_BUCKETS",
    "COLLECTOR_CLASS",
    "COLLECTOR_NAME",
    "DEFAULT_INTERVAL",
    "METRICS",
    "Histogram",
    "LogStats",
    "MetricsCollector",
    "MetricsReport",
    "ReportMetrics",
    "Reports",
    "Sample",
    "ServeMetrics",
    "ShellStats",
    "counts",
    "make_report",
    "runtime_samples",
]
