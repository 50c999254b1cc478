"""Embedding CEI in a host program (a capability container, a test, any Python process).

    from cei_actors.embed import CEI

    with CEI(home="/var/lib/myhost/cei") as cei:        # the built-in plan, SQLite log in home
        cei.pd.schedule_process("p1", command=["sh", "-c", "echo hello"])
        cei.pd.wait_process("p1", ["EXITED", "FAILED"])

``base`` chooses thespian's system base: ``multiprocTCPBase`` (default; every component in a
child process on 127.0.0.1, and the local cloud's EEAgent "VMs" can join it) or
``simpleSystemBase`` (everything in the host's thread, run while a client call waits; the
local cloud driver needs an admin port, so use a plan with ``static_nodes`` there).

Being told what happens: :meth:`CEI.subscribe` delivers process, node, domain and HA status
changes, read from the components' logs (``cei_actors.subscribe``), to a callback on a thread
it owns, as an iterator or an asyncio stream, resumable from a saved ``cursor``::

    sub = cei.subscribe(lambda c: print(c.kind, c.key, c.state), kinds=["process", "ha"])
    ...
    sub.close()

``wait_process`` and ``wait_group`` of ``cei.pd`` and ``cei.ha`` wait on these changes instead
of asking every few milliseconds. On the simple base the actors run only while the host is
inside a CEI call: let them run with :meth:`CEI.run_for` while waiting for callbacks.

Errors: a refused request raises a ``RequestFailed`` subclass (nothing happened); a request
sent without a reply within ``timeout`` raises :class:`OutcomeUnknown` (it may have taken
effect, or may still: look before acting; ``schedule_process(..., once=True)`` is safe to
retry with the same upid).

The host keeps its process: nothing here installs signal handlers, configures logging (on
the TCP base the actors' log goes to ``HOME/system.log``; on the simple base records go to
the host's own ``logging`` setup) or exits. The only process-wide change is the one every
system start makes: thespian's TCP transport is bound to 127.0.0.1 (docs/decisions.md R1) and
authenticates every message with the key in ``HOME/secret`` (TA1), one key per process.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from .epum.client import EPUMClient
from .ha.client import HAClient
from .launch.launcher import (
    Connection,
    LaunchError,
    Progress,
    log_defs,
    start_components,
    stop_components,
    sweep_leftovers,
)
from .launch.plan import Plan, load_plan
from .pd.client import PDClient
from .provisioner.client import ProvisionerClient
from .runtime.client import OutcomeUnknown, RequestFailed
from .runtime.secure import SECRET_FILE, ensure_secret_file
from .runtime.system import BASES, SIMPLE_BASE, TCP_BASE, shutdown_system, start_system
from .subscribe import Change, Subscription, Watcher

__all__ = ["CEI", "Change", "LaunchError", "OutcomeUnknown", "RequestFailed", "Subscription"]


class CEI:
    """CEI services running inside this process's care; see the module docstring.

    ``plan``: a :class:`~.launch.plan.Plan`, a path to a plan file, or None (built-in plan).
    ``log_url`` overrides the plan's log. ``home`` holds the log and the nodes' files; None
    means a fresh temporary directory, removed again by :meth:`stop` (and the log with it).
    """

    def __init__(
        self,
        plan: Plan | str | Path | None = None,
        *,
        base: str = TCP_BASE,
        log_url: str | None = None,
        home: str | Path | None = None,
        timeout: float = 10.0,
        progress: Progress | None = None,
    ) -> None:
        if base not in BASES:
            raise ValueError(f"base {base!r}: expected one of {', '.join(BASES)}")
        self.base = base
        self.timeout = timeout
        self._plan_arg = plan
        self._log_url = log_url
        self._home_arg = home
        self._progress = progress or (lambda _line: None)
        self.home: Path | None = None
        self.plan: Plan | None = None
        self.info: dict[str, Any] | None = None
        self._asys: Any = None
        self._conn: Connection | None = None
        self._temporary = False
        self._watcher: Watcher | None = None
        self._watchers: list[Watcher] = []  # resumed subscriptions' own
        self._watch_lock = threading.Lock()

    def start(self) -> CEI:
        """Start the actor system and every component; returns once all are ready."""
        if self._conn is not None:
            raise LaunchError("already started")
        if self._home_arg is None:
            self.home = Path(tempfile.mkdtemp(prefix="cei-embed-"))
            self._temporary = True
        else:
            self.home = Path(self._home_arg).expanduser().resolve()
            self.home.mkdir(parents=True, exist_ok=True)
        try:
            plan = self._plan_arg
            if isinstance(plan, Plan):
                if self._log_url is not None:
                    plan = dataclasses.replace(plan, log_url=self._log_url)
            else:
                plan = load_plan(None if plan is None else Path(plan), home=self.home,
                                 log_url=self._log_url)
            self.plan = plan
            defs = log_defs(self.home / "system.log") if self.base == TCP_BASE else None
            secret = ensure_secret_file(self.home / SECRET_FILE) if self.base == TCP_BASE else None
            self._asys = start_system(self.base, log_defs=defs, secret_file=secret)
            self.info = start_components(self._asys, plan, self.home, self._progress)
            self._conn = Connection(self._asys, self.info, self.timeout, owned=True, watch=False)
        except BaseException:
            self._teardown()
            raise
        return self

    @property
    def connection(self) -> Connection:
        if self._conn is None:
            raise LaunchError("CEI is not started")
        return self._conn

    @property
    def pd(self) -> PDClient:
        """A client of the Process Dispatcher's leader (its waits use the subscriptions)."""
        pd = self.connection.pd
        if self._can_watch():
            pd.changes, pd.pump = self.watcher, self._pump()
        return pd

    @property
    def epum(self) -> EPUMClient:
        """A client of EPUM's leader."""
        return self.connection.epum

    @property
    def provisioner(self) -> ProvisionerClient:
        """A client of the Provisioner's leader."""
        return self.connection.provisioner

    @property
    def ha(self) -> HAClient:
        """A client of the HA service's leader (its waits use the subscriptions)."""
        ha = self.connection.ha
        if self._can_watch():
            ha.changes, ha.pump = self.watcher, self._pump()
        return ha

    # ---- being told what happens ----------------------------------------------------------

    def _can_watch(self) -> bool:
        url = (self.info or {}).get("log_url") or ""
        return not (url.startswith("memory://") and self.base != SIMPLE_BASE)

    def _watcher_args(self) -> dict[str, Any]:
        if not self._can_watch():
            raise LaunchError("subscriptions read the log, and a memory:// log lives in the "
                              "components' processes on the TCP base: use a SQLite or ZooKeeper log")
        return self.connection.watcher_args()

    def watcher(self) -> Watcher:
        """The shared :class:`~cei_actors.subscribe.Watcher` (started on first use, at the
        current heads; stopped by :meth:`stop`)."""
        with self._watch_lock:
            if self._watcher is None or not self._watcher.running:
                self._watcher = Watcher(**self._watcher_args()).start()
            return self._watcher

    def subscribe(self, callback: Callable[[Change], Any] | None = None, *,
                  kinds: Iterable[str] | None = None, upids: Iterable[str] | None = None,
                  groups: Iterable[str] | None = None, nodes: Iterable[str] | None = None,
                  domains: Iterable[str] | None = None,
                  since: Mapping[str, int] | str | None = None,
                  max_pending: int = 10_000) -> Subscription:
        """Changes (``kinds`` of process, node, domain, ha; all by default) of the named
        entities (processes by ``upids`` or HA ``groups``; no names: every entity).

        ``since``: None: first the current state of each matching entity (``resync``), then
        every change; ``"now"``: only changes from now; a cursor (a change's ``cursor``, or
        the subscription's): every change after it, the same a host that kept running would
        have had. ``callback``: called on a thread the subscription owns, one change at a
        time; without one, take the changes with ``get``, by iterating, or ``stream()``."""
        filters = {"kinds": kinds, "upids": upids, "groups": groups, "nodes": nodes,
                   "domains": domains, "max_pending": max_pending}
        if since is None or since == "now":
            return self.watcher().subscribe(callback, current=since is None, **filters)
        if not isinstance(since, Mapping) or not all(
                isinstance(k, str) and isinstance(v, int) and v >= 0 for k, v in since.items()):
            raise ValueError(f"since: expected None, 'now' or a cursor {{stream: offset}}, not {since!r}")
        w = Watcher(**self._watcher_args(), since=since)
        subs: list[Subscription] = []
        try:  # subscribed before the watcher follows on: a change right after the cursor is not lost
            w.start(lambda: subs.append(w.subscribe(callback, owns_watcher=True, **filters)))
        except BaseException:
            w.stop()
            raise
        with self._watch_lock:
            self._watchers = [x for x in self._watchers if x.running]
            self._watchers.append(w)
        return subs[0]

    def _pump(self) -> Callable[[float], None] | None:
        if self.base != SIMPLE_BASE:
            return None
        return self.run_for

    def run_for(self, seconds: float) -> None:
        """Let the system run for ``seconds``: on the simple base the actors run only while
        the host is inside a CEI call; on the TCP base this just sleeps."""
        if self.base != SIMPLE_BASE:
            time.sleep(seconds)
            return
        self.connection.service("pd").pump(seconds)

    def status(self) -> dict[str, Any]:
        return self.connection.status()

    def stop(self) -> dict[str, Any]:
        """Terminate the nodes, stop the components and the actor system (the log stays,
        unless ``home`` was a temporary directory). Safe to call twice."""
        result: dict[str, Any] = {"stopped": [], "nodes_terminated": None, "killed": []}
        with self._watch_lock:
            watchers = [w for w in (self._watcher, *self._watchers) if w is not None]
            self._watcher, self._watchers = None, []
        for w in watchers:
            w.stop()
        if self._conn is not None:
            try:
                stop_components(self._conn, self._progress, result)
            finally:
                self._conn.close()
                self._conn = None
        result["killed"] = self._teardown()
        return result

    def _teardown(self) -> list[int]:
        killed: list[int] = []
        if self._asys is not None:
            try:
                shutdown_system(self._asys)
            finally:
                self._asys = None
        if self.home is not None:
            dirs = [Path(d) for d in (self.info or {}).get("node_dirs", [])] + [self.home / "static"]
            killed = sweep_leftovers(dirs)
            if self._temporary:
                shutil.rmtree(self.home, ignore_errors=True)
                self._temporary = False
        return killed

    def __enter__(self) -> CEI:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
