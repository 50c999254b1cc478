"""An in-process simulated cloud behind libcloud's ``NodeDriver`` interface.

It behaves like an EC2-style IaaS: creates are idempotent by client token, nodes boot
(PENDING -> RUNNING) after a random delay on an injected clock, destroyed nodes show
TERMINATED for a while and then drop out of listings, ids are never reused, and a quota
rejects creates with an ``InstanceLimitExceeded`` error. Faults are injected with seeded
randomness: failed creates, timeouts, lost replies (the VM exists but the caller sees a
timeout), authentication failure, and nodes that die or vanish out of band.

Time only moves when the injected clock moves; states are recomputed on every call.
"""

from __future__ import annotations

import datetime
import heapq
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from libcloud.common.exceptions import BaseHTTPError
from libcloud.common.types import InvalidCredsError
from libcloud.compute.base import Node, NodeDriver, NodeImage, NodeLocation, NodeSize
from libcloud.compute.types import NodeState

__all__ = [
    "Clock",
    "SimulatedCloudDriver",
    "SimulatedCloudError",
    "SimulatedTimeout",
    "SimCloudStats",
    "WallClock",
]


class Clock(Protocol):
    """Anything with ``now() -> float`` (seconds)."""

    def now(self) -> float: ...


class WallClock:
    """The real clock: ``time.time()``."""

    def now(self) -> float:
        return time.time()


class SimulatedCloudError(BaseHTTPError):
    """An API error from the simulated cloud, shaped like libcloud's EC2 errors.

    ``str(exc)`` is ``"<ErrorCode>: <message>"``; ``error_code`` holds the code alone.
    """

    def __init__(self, error_code: str, message: str, http_code: int = 400) -> None:
        super().__init__(http_code, f"{error_code}: {message}")
        self.error_code = error_code


class SimulatedTimeout(TimeoutError):
    """A simulated API timeout (``socket.timeout`` is ``TimeoutError``).

    ``reply_lost`` is True when the request took effect and only the reply was lost.
    """

    def __init__(self, message: str, *, reply_lost: bool = False) -> None:
        super().__init__(message)
        self.reply_lost = reply_lost


@dataclass(frozen=True)
class SimCloudStats:
    """A snapshot of the simulated cloud's counters."""

    creates_attempted: int
    vms_created: int
    destroys_attempted: int
    vms_destroyed: int
    killed: int
    vanished: int
    live: int


# Internal lifecycle of a simulated VM (EC2's instance states).
_PENDING = "pending"
_RUNNING = "running"
_SHUTTING_DOWN = "shutting-down"
_TERMINATED = "terminated"

_LIBCLOUD_STATE = {
    _PENDING: NodeState.PENDING,
    _RUNNING: NodeState.RUNNING,
    _SHUTTING_DOWN: NodeState.UNKNOWN,  # as libcloud's EC2 driver maps it
    _TERMINATED: NodeState.TERMINATED,
}


@dataclass
class _VM:
    id: str
    seq: int
    name: str
    client_token: str | None
    image_id: str
    size_id: str
    userdata: str | None
    created_at: float
    boot_at: float
    private_ip: str
    public_ip: str
    status: str = _PENDING
    hazard_gen: int = 0  # bumps when fault rates change; stale hazard events are ignored
    terminated_at: float | None = None
    gone: bool = False  # no longer listed (lingered out or vanished)
    reason: str | None = None  # why it terminated: destroyed, killed, vanished
    #: the listing's Node for the VM as it is; None once a field the Node shows changes
    listed: Node | None = None

    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)
        if name in _LISTED_FIELDS:  # a listing builds the VM's Node again (RT9)
            object.__setattr__(self, "listed", None)


#: The fields of a :class:`_VM` that change after it is created and that its Node shows.
_LISTED_FIELDS = frozenset(("status", "terminated_at", "reason"))


def _ip(base: tuple[int, int], seq: int) -> str:
    n = seq % (1 << 16)
    return f"{base[0]}.{base[1]}.{n >> 8}.{n & 0xFF}"


_IMAGES = (("ami-sim-base", "sim base image"), ("ami-sim-eeagent", "sim image with EEAgent"))
# id, name, ram MB, disk GB, price per hour
_SIZES = (
    ("t1.micro", "Micro", 613, 8, 0.02),
    ("m1.small", "Small", 1740, 160, 0.06),
    ("m1.large", "Large", 7680, 850, 0.24),
    ("c1.xlarge", "Extra Large compute", 7168, 1690, 0.58),
)


class SimulatedCloudDriver(NodeDriver):
    """A thread-safe, in-process EC2-like cloud for tests, sims and benchmarks.

    Options (all keyword-only; every rate is a probability in [0, 1] unless stated):

    - ``clock``: object with ``now()``; default :class:`WallClock`.
    - ``rng``: a seeded ``random.Random``; default ``random.Random(0)``.
    - ``boot_delay``: ``(min, max)`` seconds (uniform) or one number; PENDING until it passes.
    - ``api_latency``: seconds each API call takes; slept with ``sleep``.
    - ``sleep``: the sleeping function; default ``time.sleep`` with the wall clock and a
      no-op when a clock is injected (virtual time is not advanced by the driver).
    - ``create_failure_rate``: a create raises ``InsufficientInstanceCapacity``, no VM made.
    - ``lose_reply_rate``: a create makes the VM but raises :class:`SimulatedTimeout`.
    - ``timeout_rate``: any API call raises :class:`SimulatedTimeout` without effect.
    - ``max_instances``: quota of live (pending/running) VMs; beyond it creates raise an
      error whose text contains ``InstanceLimitExceeded``. None: unlimited.
    - ``auth_failure``: every API call raises libcloud's ``InvalidCredsError``.
    - ``vanish_rate`` / ``kill_rate``: per-second hazard rates (not probabilities) for a
      running node to disappear from listings / turn TERMINATED out of band; its lifetime
      is exponential with mean ``1 / rate`` seconds.
    - ``terminated_linger``: seconds a TERMINATED node stays listed (EC2: about an hour).
    - ``shutdown_delay``: seconds a destroyed node spends shutting down (listed with
      libcloud state UNKNOWN, as the EC2 driver does) before TERMINATED.
    - ``strict_catalog``: refuse images and sizes not in :meth:`list_images` /
      :meth:`list_sizes` (EC2's ``InvalidAMIID.NotFound``); default accepts any id.
    - ``region``, ``id_prefix``: cosmetic.

    The fault options are attributes and may be changed while the cloud runs.
    """

    type = "cei-simcloud"
    name = "CEI simulated cloud"
    website = "https://example.invalid/cei-simcloud"
    #: an unchanged VM is listed as the same Node, which is never changed (see
    #: :meth:`_listed_node`): ``CloudWorker`` builds its record once (decision RT4)
    shares_listed_nodes = True
    api_name = "cei-simcloud"
    features: dict[str, list[str]] = {"create_node": []}

    def __init__(
        self,
        *,
        clock: Clock | None = None,
        rng: random.Random | None = None,
        boot_delay: float | Sequence[float] = (0.0, 0.0),
        api_latency: float = 0.0,
        sleep: Callable[[float], Any] | None = None,
        create_failure_rate: float = 0.0,
        lose_reply_rate: float = 0.0,
        timeout_rate: float = 0.0,
        max_instances: int | None = None,
        auth_failure: bool = False,
        vanish_rate: float = 0.0,
        kill_rate: float = 0.0,
        terminated_linger: float = 60.0,
        shutdown_delay: float = 0.0,
        strict_catalog: bool = False,
        region: str = "sim-1",
        id_prefix: str = "i-",
    ) -> None:
        # Deliberately no BaseDriver.__init__: there is no connection to build.
        self.key = None
        self.secret = None
        self.secure = False
        self.region = region
        self.clock: Clock = clock if clock is not None else WallClock()
        if sleep is None:
            sleep = time.sleep if clock is None else _no_sleep
        self.sleep = sleep
        self.rng = rng if rng is not None else random.Random(0)
        self.boot_delay = _delay_range(boot_delay)
        self.api_latency = float(api_latency)
        self.create_failure_rate = float(create_failure_rate)
        self.lose_reply_rate = float(lose_reply_rate)
        self.timeout_rate = float(timeout_rate)
        self.max_instances = max_instances
        self.auth_failure = bool(auth_failure)
        self.terminated_linger = float(terminated_linger)
        self.shutdown_delay = float(shutdown_delay)
        self.strict_catalog = bool(strict_catalog)
        self.id_prefix = id_prefix

        self._lock = threading.RLock()
        self._vms: dict[str, _VM] = {}  # every VM ever made (ids are never reused)
        self._listed: dict[str, _VM] = {}  # VMs the cloud still lists, in creation order
        self._by_token: dict[str, str] = {}
        self._events: list[tuple[float, int, str, str, int]] = []  # (t, n, kind, vm id, gen)
        self._event_n = 0
        self._hazard_gen = 0
        self._vanish_rate = float(vanish_rate)
        self._kill_rate = float(kill_rate)
        self._seq = 0
        self._live = 0
        self._creates_attempted = 0
        self._vms_created = 0
        self._destroys_attempted = 0
        self._vms_destroyed = 0
        self._killed = 0
        self._vanished = 0
        #: if a list, every id ``destroy_node`` is asked for is appended (the simulator's VM
        #: watcher sets and drains it); None: nothing is kept
        self.destroy_requests: list[str] | None = None

    @property
    def vanish_rate(self) -> float:
        """Hazard rate (per second) at which a running node vanishes from listings."""
        return self._vanish_rate

    @vanish_rate.setter
    def vanish_rate(self, value: float) -> None:
        with self._lock:
            self._vanish_rate = float(value)
            self._redraw_hazards()

    @property
    def kill_rate(self) -> float:
        """Hazard rate (per second) at which a running node turns TERMINATED out of band."""
        return self._kill_rate

    @kill_rate.setter
    def kill_rate(self, value: float) -> None:
        with self._lock:
            self._kill_rate = float(value)
            self._redraw_hazards()

    # ------------------------------------------------------------------ catalog

    def list_images(self, location: NodeLocation | None = None) -> list[NodeImage]:
        self._api_call()
        return [NodeImage(id=i, name=n, driver=self) for i, n in _IMAGES]

    def list_sizes(self, location: NodeLocation | None = None) -> list[NodeSize]:
        self._api_call()
        return [
            NodeSize(id=i, name=n, ram=ram, disk=disk, bandwidth=None, price=price, driver=self)
            for i, n, ram, disk, price in _SIZES
        ]

    def list_locations(self) -> list[NodeLocation]:
        self._api_call()
        return [
            NodeLocation(
                id=f"{self.region}{z}", name=f"{self.region}{z}", country="SIM", driver=self
            )
            for z in ("a", "b")
        ]

    # ------------------------------------------------------------------ nodes

    def create_node(  # type: ignore[override]
        self,
        name: str,
        size: NodeSize | str,
        image: NodeImage | str,
        location: NodeLocation | None = None,
        auth: Any = None,
        ex_clienttoken: str | None = None,
        ex_userdata: str | None = None,
        ex_keyname: str | None = None,
        **kwargs: Any,
    ) -> Node:
        """Create (or, for a known client token, return) one VM.

        A repeated token returns the VM made for it, whatever its state now; a repeated
        token with a different image or size raises ``IdempotentParameterMismatch``.
        """
        size_id = _object_id(size)
        image_id = _object_id(image)
        with self._lock:
            self._creates_attempted += 1
        self._api_call()
        with self._lock:
            now = self.clock.now()
            self._advance(now)
            if ex_clienttoken is not None and ex_clienttoken in self._by_token:
                vm = self._vms[self._by_token[ex_clienttoken]]
                if (vm.image_id, vm.size_id) != (image_id, size_id):
                    raise SimulatedCloudError(
                        "IdempotentParameterMismatch",
                        f"client token {ex_clienttoken!r} was used with other parameters",
                    )
                return self._to_node(vm)
            if self.strict_catalog:
                if image_id not in {i for i, _ in _IMAGES}:
                    raise SimulatedCloudError(
                        "InvalidAMIID.NotFound", f"The image id '[{image_id}]' does not exist"
                    )
                if size_id not in {s[0] for s in _SIZES}:
                    raise SimulatedCloudError(
                        "InvalidParameterValue", f"Invalid value '{size_id}' for InstanceType"
                    )
            if self._chance(self.create_failure_rate):
                raise SimulatedCloudError(
                    "InsufficientInstanceCapacity",
                    "There is no capacity available for the requested instance type",
                    http_code=500,
                )
            if self.max_instances is not None and self._live >= self.max_instances:
                raise SimulatedCloudError(
                    "InstanceLimitExceeded",
                    f"Your quota allows for 0 more running instance(s). You requested at "
                    f"least 1 (limit {self.max_instances})",
                )
            vm = self._new_vm(now, name, ex_clienttoken, image_id, size_id, ex_userdata)
            if self._chance(self.lose_reply_rate):
                raise SimulatedTimeout(
                    "simulated timeout: the create succeeded but its reply was lost",
                    reply_lost=True,
                )
            return self._to_node(vm)

    def list_nodes(self, ex_node_ids: Sequence[str] | None = None) -> list[Node]:  # type: ignore[override]
        """Nodes currently listed (TERMINATED ones linger for ``terminated_linger`` s)."""
        self._api_call()
        with self._lock:
            self._advance(self.clock.now())
            vms = self._listed.values()
            if ex_node_ids is not None:
                wanted = set(ex_node_ids)
                vms = [vm for vm in vms if vm.id in wanted]
            return [n if (n := vm.listed) is not None else self._listed_node(vm) for vm in vms]

    def destroy_node(self, node: Node | str) -> bool:  # type: ignore[override]
        """Terminate a node. Destroying a listed TERMINATED node is a no-op success;
        an unknown or no-longer-listed id raises ``InvalidInstanceID.NotFound``."""
        node_id = _object_id(node)
        with self._lock:
            self._destroys_attempted += 1
            if self.destroy_requests is not None:
                self.destroy_requests.append(node_id)
        self._api_call()
        with self._lock:
            now = self.clock.now()
            self._advance(now)
            vm = self._vms.get(node_id)
            if vm is None or vm.gone:
                raise SimulatedCloudError(
                    "InvalidInstanceID.NotFound", f"The instance ID '{node_id}' does not exist"
                )
            if vm.status in (_PENDING, _RUNNING):
                self._vms_destroyed += 1
                vm.reason = "destroyed"
                if self.shutdown_delay > 0:
                    self._live -= 1
                    vm.status = _SHUTTING_DOWN
                    self._schedule(now + self.shutdown_delay, "shutdown", vm)
                else:
                    self._terminate(vm, now, "destroyed")
            return True

    def reboot_node(self, node: Node | str) -> bool:  # type: ignore[override]
        """A no-op on a live node (True); False on a terminated one."""
        node_id = _object_id(node)
        self._api_call()
        with self._lock:
            self._advance(self.clock.now())
            vm = self._vms.get(node_id)
            if vm is None or vm.gone:
                raise SimulatedCloudError(
                    "InvalidInstanceID.NotFound", f"The instance ID '{node_id}' does not exist"
                )
            return vm.status in (_PENDING, _RUNNING)

    # ------------------------------------------------------------------ out of band

    def kill(self, node_id: str) -> None:
        """The node dies out of band: TERMINATED now, listed for a while, then gone."""
        with self._lock:
            now = self.clock.now()
            self._advance(now)
            vm = self._require(node_id)
            if vm.status in (_PENDING, _RUNNING):
                self._killed += 1
                self._terminate(vm, now, "killed")
            elif vm.status == _SHUTTING_DOWN:  # was being destroyed anyway
                self._terminate(vm, now, "destroyed")

    def vanish(self, node_id: str) -> None:
        """The node disappears from the cloud's listings at once, with no TERMINATED."""
        with self._lock:
            now = self.clock.now()
            self._advance(now)
            vm = self._require(node_id)
            if not vm.gone:
                if vm.status != _TERMINATED:
                    self._vanished += 1
                    self._terminate(vm, now, "vanished")
                self._unlist(vm)

    # ------------------------------------------------------------------ introspection

    def stats(self) -> SimCloudStats:
        """Counters for tests and benchmarks (live counts pending + running VMs)."""
        with self._lock:
            self._advance(self.clock.now())
            return SimCloudStats(
                creates_attempted=self._creates_attempted,
                vms_created=self._vms_created,
                destroys_attempted=self._destroys_attempted,
                vms_destroyed=self._vms_destroyed,
                killed=self._killed,
                vanished=self._vanished,
                live=self._live,
            )

    @property
    def creates_attempted(self) -> int:
        return self.stats().creates_attempted

    @property
    def vms_created(self) -> int:
        return self.stats().vms_created

    @property
    def destroys(self) -> int:
        return self.stats().vms_destroyed

    @property
    def live_count(self) -> int:
        return self.stats().live

    def node_for_token(self, client_token: str) -> Node | None:
        """The node made for ``client_token`` (even if no longer listed), or None.
        Not an API call: no latency, no faults."""
        with self._lock:
            self._advance(self.clock.now())
            vm_id = self._by_token.get(client_token)
            return self._to_node(self._vms[vm_id]) if vm_id is not None else None

    # ------------------------------------------------------------------ internals

    def _api_call(self) -> None:
        """One API round trip: latency, then the call-level faults."""
        if self.api_latency > 0:
            self.sleep(self.api_latency)
        if self.auth_failure:
            raise InvalidCredsError(
                "AuthFailure: AWS was not able to validate the provided access credentials"
            )
        with self._lock:
            timed_out = self._chance(self.timeout_rate)
        if timed_out:
            raise SimulatedTimeout("simulated timeout: the request did not reach the cloud")

    def _chance(self, p: float) -> bool:
        return p > 0 and (p >= 1 or self.rng.random() < p)

    def _new_vm(
        self,
        now: float,
        name: str,
        token: str | None,
        image_id: str,
        size_id: str,
        userdata: str | None,
    ) -> _VM:
        self._seq += 1
        seq = self._seq
        lo, hi = self.boot_delay
        delay = lo if hi <= lo else self.rng.uniform(lo, hi)
        vm = _VM(
            id=f"{self.id_prefix}{seq:08x}",
            seq=seq,
            name=name,
            client_token=token,
            image_id=image_id,
            size_id=size_id,
            userdata=userdata,
            created_at=now,
            boot_at=now + delay,
            private_ip=_ip((10, 0), seq),
            public_ip=_ip((198, 18), seq),
        )
        self._vms[vm.id] = vm
        self._listed[vm.id] = vm
        if token is not None:
            self._by_token[token] = vm.id
        self._vms_created += 1
        self._live += 1
        self._schedule(vm.boot_at, "boot", vm)
        self._advance(now)
        return vm

    def _require(self, node_id: str) -> _VM:
        vm = self._vms.get(node_id)
        if vm is None:
            raise KeyError(node_id)
        return vm

    def _schedule(self, t: float, kind: str, vm: _VM) -> None:
        self._event_n += 1
        heapq.heappush(self._events, (t, self._event_n, kind, vm.id, vm.hazard_gen))

    def _terminate(self, vm: _VM, t: float, reason: str) -> None:
        """Move a not yet terminated VM to TERMINATED at time ``t``."""
        if vm.status in (_PENDING, _RUNNING):
            self._live -= 1
        vm.status = _TERMINATED
        vm.terminated_at = t
        if vm.reason is None:
            vm.reason = reason
        self._schedule(t + self.terminated_linger, "gone", vm)

    def _unlist(self, vm: _VM) -> None:
        vm.gone = True
        self._listed.pop(vm.id, None)

    def _draw_hazards(self, vm: _VM, t: float) -> None:
        """Schedule a running VM's out-of-band death (exponential, so memoryless)."""
        if self._vanish_rate > 0:
            self._schedule(t + self.rng.expovariate(self._vanish_rate), "vanish", vm)
        if self._kill_rate > 0:
            self._schedule(t + self.rng.expovariate(self._kill_rate), "kill", vm)

    def _redraw_hazards(self) -> None:
        now = self.clock.now()
        self._advance(now)
        self._hazard_gen += 1
        for vm in self._listed.values():
            if vm.status == _RUNNING:
                vm.hazard_gen = self._hazard_gen
                self._draw_hazards(vm, now)

    def _advance(self, now: float) -> None:
        """Apply every scheduled transition due by ``now``, in time order."""
        events = self._events
        while events and events[0][0] <= now:
            t, _, kind, vm_id, gen = heapq.heappop(events)
            vm = self._vms[vm_id]
            if vm.gone:
                continue
            if kind == "boot":
                if vm.status == _PENDING:
                    vm.status = _RUNNING
                    vm.hazard_gen = self._hazard_gen
                    self._draw_hazards(vm, t)
            elif kind in ("vanish", "kill"):
                if vm.status != _RUNNING or gen != vm.hazard_gen:
                    continue
                if kind == "vanish":
                    self._vanished += 1
                    self._terminate(vm, t, "vanished")
                    self._unlist(vm)
                else:
                    self._killed += 1
                    self._terminate(vm, t, "killed")
            elif kind == "shutdown":
                if vm.status == _SHUTTING_DOWN:
                    self._terminate(vm, t, "destroyed")
            elif kind == "gone" and vm.status == _TERMINATED:
                self._unlist(vm)

    def _listed_node(self, vm: _VM) -> Node:
        """``vm``'s Node for a listing, built again only when the VM changed since the last
        listing (a large simulated cloud is listed every query; docs/decisions.md SIM6: a
        change of a field in ``_LISTED_FIELDS`` drops it). Listings share these Nodes:
        readers must not change them."""
        node = vm.listed
        if node is None:
            node = vm.listed = self._to_node(vm)
        return node

    def _to_node(self, vm: _VM) -> Node:
        public = [vm.public_ip] if vm.status == _RUNNING else []
        private = [vm.private_ip] if vm.status in (_PENDING, _RUNNING, _SHUTTING_DOWN) else []
        return Node(
            id=vm.id,
            name=vm.name,
            state=_LIBCLOUD_STATE[vm.status],
            public_ips=public,
            private_ips=private,
            driver=self,
            size=NodeSize(
                id=vm.size_id,
                name=vm.size_id,
                ram=None,
                disk=None,
                bandwidth=None,
                price=None,
                driver=self,
            ),
            image=NodeImage(id=vm.image_id, name=vm.image_id, driver=self),
            created_at=_utc(vm.created_at),
            extra={
                "client_token": vm.client_token,
                "status": vm.status,
                "instance_id": vm.id,
                "launch_time": vm.created_at,
                "boot_at": vm.boot_at,
                "terminated_at": vm.terminated_at,
                "reason": vm.reason,
                "userdata": vm.userdata,
                "region": self.region,
            },
        )


def _no_sleep(_seconds: float) -> None:
    return None


def _delay_range(value: float | Sequence[float]) -> tuple[float, float]:
    if isinstance(value, int | float):
        lo = hi = float(value)
    else:
        lo, hi = (float(v) for v in value)
    if lo < 0 or hi < lo:
        raise ValueError(f"boot_delay must be 0 <= min <= max, got {value!r}")
    return lo, hi


def _object_id(obj: Any) -> str:
    return str(obj) if isinstance(obj, str) else str(obj.id)


def _utc(ts: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(ts, tz=datetime.UTC)
