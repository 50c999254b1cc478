"""The Provisioner's cloud work: create, destroy and list through libcloud drivers.

:class:`CloudWorker` turns the ``Work`` payloads of :mod:`.logic` into driver calls and
their outcomes into result messages; every exception becomes an ``error_kind`` (timeout,
quota, auth, not_found, other) and text, never a crash. The actor runs these handlers in
its worker pool; tests and benchmarks call them directly.

Drivers are built with :func:`~.drivers.driver_for_site` and cached per cloud account. The
payload's credentials are a sealed entry (:mod:`.sealing`), opened here with the operator's
key just before a driver is built; a clear value never goes back into a message or event.
Simulated and local sites keep one shared driver (it *is* the cloud); real clouds get one
driver per worker thread, since libcloud connections are not thread-safe.
"""

from __future__ import annotations

import json
import random
import threading
from collections.abc import Callable, Mapping
from typing import Any

from libcloud.common.types import InvalidCredsError
from libcloud.compute.base import Node, NodeDriver, NodeImage, NodeSize

from .drivers import driver_for_site, instance_state_for
from .drivers.ec2 import CEIEC2NodeDriver, node_tags, tag_filters
from .drivers.simcloud import Clock
from .messages import CreateResult, DestroyResult, ListResult
from .sealing import CredentialsKey, open_entry

__all__ = ["CloudWorker", "DriverFactory", "classify_error", "vm_record"]

#: ``(site definition, credentials) -> NodeDriver``.
DriverFactory = Callable[[Mapping[str, Any], Mapping[str, Any] | None], NodeDriver]

_SHARED_TYPES = ("sim", "local")
_QUOTA_MARKERS = ("InstanceLimitExceeded", "InsufficientInstanceCapacity", "QuotaExceeded",
                  "Quota exceeded", "VcpuLimitExceeded")
_NOT_FOUND_MARKERS = ("InvalidInstanceID.NotFound", "InvalidInstanceID.Malformed")


def classify_error(exc: BaseException) -> str:
    """The ``error_kind`` of a cloud exception."""
    text = str(exc)
    if isinstance(exc, TimeoutError) or type(exc).__name__ in ("Timeout", "ReadTimeout",
                                                               "ConnectTimeout"):
        return "timeout"
    if isinstance(exc, InvalidCredsError) or "AuthFailure" in text:
        return "auth"
    if any(marker in text for marker in _QUOTA_MARKERS):
        return "quota"
    if any(marker in text for marker in _NOT_FOUND_MARKERS):
        return "not_found"
    return "other"


def _error_text(exc: BaseException) -> str:
    value = getattr(exc, "value", None)  # libcloud's errors: str() is the repr of this
    text = (value if isinstance(value, str) else str(exc)).strip()
    return text if text else type(exc).__name__


def vm_record(node: Node) -> dict[str, Any]:
    """A listed VM as the core sees it."""
    extra = node.extra or {}
    return {
        "iaas_id": str(node.id),
        "state": instance_state_for(node.state),
        "client_token": extra.get("client_token") or None,
        "public_ip": node.public_ips[0] if node.public_ips else None,
        "private_ip": node.private_ips[0] if node.private_ips else None,
        "hostname": extra.get("dns_name") or None,
    }


#: A driver whose listings hand out the same Node again while its VM is unchanged, and
#: never change a Node handed out, says so by this attribute (the simulated cloud, SIM6):
#: a listed Node's record is then built once, and listings share it (read-only; RT4).
SHARES_LISTED_NODES = "shares_listed_nodes"
#: Where such a Node keeps its record: on itself, so it goes with the Node (RT9: a lookup by
#: attribute, where a ``WeakKeyDictionary`` made a weak reference per lookup).
_RECORD = "_cei_vm_record"


def _shared_record(node: Node) -> dict[str, Any]:
    record: dict[str, Any] | None = node.__dict__.get(_RECORD)
    if record is None:
        record = node.__dict__[_RECORD] = vm_record(node)
    return record


class CloudWorker:
    """Create / destroy / list handlers over cached drivers (thread-safe)."""

    def __init__(
        self,
        *,
        clock: Clock | None = None,
        rng: random.Random | None = None,
        iaas_timeout: float | None = 60.0,
        driver_factory: DriverFactory | None = None,
        credentials_key: CredentialsKey | None = None,
    ) -> None:
        self.clock = clock
        self.rng = rng
        self.iaas_timeout = iaas_timeout
        self.driver_factory = driver_factory
        self.credentials_key = credentials_key
        self._lock = threading.Lock()
        self._shared: dict[tuple[str, str], NodeDriver] = {}
        self._local = threading.local()

    def handlers(self) -> dict[str, Callable[[dict[str, Any]], Any]]:
        return {"create": self.create, "destroy": self.destroy, "list": self.list}

    # ---- drivers

    def _build(self, definition: Mapping[str, Any], creds: Mapping[str, Any] | None) -> NodeDriver:
        if self.driver_factory is not None:
            return self.driver_factory(definition, creds)
        timeout = None if definition.get("type") in _SHARED_TYPES else self.iaas_timeout
        return driver_for_site(definition, creds, clock=self.clock, rng=self.rng, timeout=timeout)

    def driver(self, payload: Mapping[str, Any]) -> NodeDriver:
        """The driver for a work payload's account (built once per account and definition).

        Raises :class:`~.sealing.SealError` if the account's credentials cannot be opened."""
        definition, entry = payload["definition"], payload.get("credentials")
        key = (payload["account"], json.dumps([definition, entry], sort_keys=True, default=str))
        if definition.get("type") in _SHARED_TYPES:
            with self._lock:
                driver = self._shared.get(key)
                if driver is None:
                    driver = self._shared[key] = self._build(definition, self._open(entry))
            return driver
        cache = getattr(self._local, "drivers", None)
        if cache is None:
            cache = self._local.drivers = {}
        driver = cache.get(key)
        if driver is None:
            driver = cache[key] = self._build(definition, self._open(entry))
        return driver

    def _open(self, entry: Mapping[str, Any] | None) -> dict[str, Any] | None:
        return None if entry is None else open_entry(entry, self.credentials_key)

    def shared_drivers(self) -> list[NodeDriver]:
        with self._lock:
            return list(self._shared.values())

    def close(self) -> None:
        with self._lock:
            self._shared.clear()

    # ---- work handlers

    def create(self, payload: dict[str, Any]) -> CreateResult:
        nid, token = payload["node_id"], payload["client_token"]
        try:
            driver = self.driver(payload)
            kwargs: dict[str, Any] = {"ex_clienttoken": token}
            if payload.get("userdata") is not None:
                kwargs["ex_userdata"] = payload["userdata"]
            if payload.get("keyname"):
                kwargs["ex_keyname"] = payload["keyname"]
            if payload.get("system"):
                kwargs["ex_metadata"] = node_tags(
                    payload["system"], nid, payload.get("launch_id"), payload.get("caller"),
                    payload.get("deployable_type"), payload.get("domain"))
            size_id = payload.get("size") or "default"
            image_id = payload.get("image") or "default"
            node = driver.create_node(
                name=nid,
                size=NodeSize(id=size_id, name=size_id, ram=None, disk=None, bandwidth=None,
                              price=None, driver=driver),
                image=NodeImage(id=image_id, name=image_id, driver=driver),
                **kwargs,
            )
            if not isinstance(node, Node):  # e.g. libcloud read no VM in the answer
                raise TypeError(f"the cloud's answer to the create named no VM ({node!r:.80})")
        except Exception as exc:  # every cloud failure becomes a result, never a crash
            return CreateResult(nid, token, error_kind=classify_error(exc),
                                error=_error_text(exc))
        vm = vm_record(node)
        return CreateResult(nid, token, iaas_id=vm["iaas_id"], public_ip=vm["public_ip"],
                            private_ip=vm["private_ip"], hostname=vm["hostname"])

    def destroy(self, payload: dict[str, Any]) -> DestroyResult:
        iaas_id = payload["iaas_id"]
        args = {"iaas_id": iaas_id, "account": payload["account"], "node_id": payload.get("node_id")}
        try:
            driver = self.driver(payload)
            node = Node(id=iaas_id, name=None, state=None, public_ips=[], private_ips=[],
                        driver=driver)
            driver.destroy_node(node)
        except Exception as exc:
            return DestroyResult(**args, error_kind=classify_error(exc), error=_error_text(exc))
        return DestroyResult(**args)

    def list(self, payload: dict[str, Any]) -> ListResult:
        """List the account's VMs; with ``node_ids`` only those (a partial listing)."""
        account, seq = payload["account"], payload["seq"]
        wanted = payload.get("node_ids")
        partial = wanted is not None
        try:
            driver = self.driver(payload)
            kwargs: dict[str, Any] = {}
            if isinstance(driver, CEIEC2NodeDriver) and payload.get("system"):
                kwargs["ex_filters"] = tag_filters(payload["system"])  # this system's VMs only
            if partial:
                try:
                    nodes = driver.list_nodes(ex_node_ids=list(wanted), **kwargs)
                except TypeError:  # the driver cannot filter: filter here
                    ids = set(wanted)
                    nodes = [n for n in driver.list_nodes() if str(n.id) in ids]
            else:
                nodes = driver.list_nodes(**kwargs)
            if getattr(driver, SHARES_LISTED_NODES, False):
                vms = [n.__dict__.get(_RECORD) or _shared_record(n) for n in nodes]
            else:
                vms = [vm_record(n) for n in nodes]
        except Exception as exc:
            return ListResult(account, seq, error_kind=classify_error(exc), error=_error_text(exc),
                              partial=partial)
        return ListResult(account, seq, vms, partial=partial)
