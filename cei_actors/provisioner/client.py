"""ProvisionerClient: typed calls to the Provisioner (nodes and the registry).

It wraps a runtime ``ServiceClient`` (or anything with ``call(message, timeout=None)``
returning the ``Ok`` value and raising on an ``ErrorReply``, and ``tell(message)``).
"""

from __future__ import annotations

import time
from typing import Any

from .messages import (
    AddCredentials,
    AddDeployableType,
    AddSite,
    DescribeCredentials,
    DescribeDeployableType,
    DescribeNodes,
    DescribeProvisioner,
    DescribeSite,
    DumpState,
    Enable,
    ListCredentials,
    ListDeployableTypes,
    ListSites,
    Lookup,
    Provision,
    RemoveCredentials,
    RemoveDeployableType,
    RemoveSite,
    Subscribe,
    TerminateAll,
    TerminateNodes,
    Unsubscribe,
    UpdateCredentials,
    UpdateDeployableType,
    UpdateSite,
)

__all__ = ["ProvisionerClient"]


class ProvisionerClient:
    """Requests to the Provisioner on behalf of ``caller`` (None: the superuser)."""

    def __init__(self, service: Any, caller: str | None = None,
                 timeout: float | None = None) -> None:
        self.service = service
        self.caller = caller
        self.timeout = timeout

    def _call(self, message: Any, timeout: float | None = None) -> Any:
        return self.service.call(message, timeout=timeout if timeout is not None else self.timeout)

    # ---- nodes

    def provision(self, launch_id: str, deployable_type: str, site: str, node_ids: list[str],
                  vars: dict[str, Any] | None = None, allocation: str | None = None) -> dict:
        """``{"launch_id", "nodes": [...]}``; the same call again changes nothing."""
        return self._call(Provision(launch_id, deployable_type, site, list(node_ids),
                                    dict(vars or {}), self.caller, allocation))

    def terminate_nodes(self, node_ids: list[str]) -> list[dict]:
        return self._call(TerminateNodes(list(node_ids), self.caller))

    def terminate_all(self, wait: bool = False, timeout: float = 60.0,
                      poll: float = 0.2) -> bool:
        """Disable provisioning and terminate every node; True once none is below TERMINATED.

        With ``wait``, repeat until then (or ``timeout`` seconds) and return the last answer.
        """
        done = self._call(TerminateAll())
        end = time.monotonic() + timeout
        while wait and not done and time.monotonic() < end:
            time.sleep(poll)
            done = self._call(TerminateAll())
        return bool(done)

    def enable(self) -> None:
        self._call(Enable())

    def describe_nodes(self, node_ids: list[str] | None = None) -> list[dict]:
        return self._call(DescribeNodes(None if node_ids is None else list(node_ids), self.caller))

    def describe_node(self, node_id: str) -> dict:
        return self.describe_nodes([node_id])[0]

    def dump_state(self, node_ids: list[str]) -> int:
        """Have each node's record sent to the subscribers again; the number of records sent."""
        return self._call(DumpState(list(node_ids)))

    def subscribe(self, name: str) -> None:
        self._call(Subscribe(name))

    def unsubscribe(self, name: str) -> None:
        self._call(Unsubscribe(name))

    def status(self) -> dict:
        return self._call(DescribeProvisioner())

    # ---- registry: sites

    def add_site(self, name: str, definition: dict) -> dict:
        return self._call(AddSite(name, dict(definition), self.caller))

    def update_site(self, name: str, definition: dict) -> dict:
        return self._call(UpdateSite(name, dict(definition), self.caller))

    def remove_site(self, name: str) -> None:
        self._call(RemoveSite(name, self.caller))

    def describe_site(self, name: str) -> dict:
        return self._call(DescribeSite(name, self.caller))

    def list_sites(self) -> list[str]:
        return self._call(ListSites(self.caller))

    # ---- registry: deployable types

    def add_dt(self, name: str, definition: dict) -> dict:
        return self._call(AddDeployableType(name, dict(definition), self.caller))

    def update_dt(self, name: str, definition: dict) -> dict:
        return self._call(UpdateDeployableType(name, dict(definition), self.caller))

    def remove_dt(self, name: str) -> None:
        self._call(RemoveDeployableType(name, self.caller))

    def describe_dt(self, name: str) -> dict:
        return self._call(DescribeDeployableType(name, self.caller))

    def list_dts(self) -> list[str]:
        return self._call(ListDeployableTypes(self.caller))

    # ---- registry: credentials

    def add_credentials(self, site: str, credentials: dict,
                        credential_type: str = "site") -> None:
        self._call(AddCredentials(site, dict(credentials), self.caller, credential_type))

    def update_credentials(self, site: str, credentials: dict,
                           credential_type: str = "site") -> None:
        self._call(UpdateCredentials(site, dict(credentials), self.caller, credential_type))

    def remove_credentials(self, site: str, credential_type: str = "site") -> None:
        self._call(RemoveCredentials(site, self.caller, credential_type))

    def describe_credentials(self, site: str, credential_type: str = "site") -> dict:
        """The stored credentials, masked: each secret value is ``****`` and a fingerprint."""
        return self._call(DescribeCredentials(site, self.caller, credential_type))

    def list_credentials(self, credential_type: str = "site") -> list[str]:
        return self._call(ListCredentials(self.caller, credential_type))

    def lookup(self, deployable_type: str, site: str, vars: dict[str, Any] | None = None,
               allocation: str | None = None) -> dict:
        return self._call(Lookup(deployable_type, site, self.caller, allocation,
                                 dict(vars or {})))
