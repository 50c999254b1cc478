"""EPUMClient: typed calls to the EPU Management Service.

It wraps a runtime ``ServiceClient`` (or anything with ``call(message, timeout=None)``
returning the ``Ok`` value and raising on an ``ErrorReply``, and ``tell(message)``).
"""

from __future__ import annotations

from typing import Any

from .messages import (
    AddDomain,
    AddDomainDefinition,
    DescribeDomain,
    DescribeDomainDefinition,
    ListDomainDefinitions,
    ListDomains,
    NodeHeartbeat,
    ReconfigureDomain,
    RegisterNeed,
    RemoveDomain,
    RemoveDomainDefinition,
    SensorData,
    SubscribeDomain,
    UnsubscribeDomain,
    UpdateDomainDefinition,
)


def dotted_config(settings: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{"preserve_n": 3, "health.monitor_health": True}`` -> sectioned config.

    Undotted keys go to ``engine_conf``; ``section.key`` reaches general or health.
    """
    out: dict[str, dict[str, Any]] = {}
    for key, value in settings.items():
        section, dot, name = key.partition(".")
        if not dot:
            section, name = "engine_conf", key
        out.setdefault(section, {})[name] = value
    return out


class EPUMClient:
    """Requests to EPUM, each returning the reply's value; errors raise (from the transport)."""

    def __init__(self, service: Any, caller: str | None = None, timeout: float | None = None) -> None:
        self.service = service
        self.caller = caller
        self.timeout = timeout

    def _call(self, message: Any) -> Any:
        return self.service.call(message, timeout=self.timeout)

    # definitions
    def add_domain_definition(self, definition_id: str, definition: dict) -> Any:
        return self._call(AddDomainDefinition(definition_id, definition))

    def update_domain_definition(self, definition_id: str, definition: dict) -> Any:
        return self._call(UpdateDomainDefinition(definition_id, definition))

    def remove_domain_definition(self, definition_id: str) -> Any:
        return self._call(RemoveDomainDefinition(definition_id))

    def describe_domain_definition(self, definition_id: str) -> dict:
        return self._call(DescribeDomainDefinition(definition_id))

    def list_domain_definitions(self) -> list[str]:
        return self._call(ListDomainDefinitions())

    # domains
    def add_domain(self, domain_id: str, definition_id: str, config: dict | None = None,
                   subscriber: str | None = None) -> dict:
        return self._call(AddDomain(domain_id, definition_id, config or {}, self.caller, subscriber))

    def reconfigure_domain(self, domain_id: str, config: dict) -> dict:
        return self._call(ReconfigureDomain(domain_id, config, self.caller))

    def remove_domain(self, domain_id: str) -> dict:
        return self._call(RemoveDomain(domain_id, self.caller))

    def describe_domain(self, domain_id: str) -> dict:
        return self._call(DescribeDomain(domain_id, self.caller))

    def list_domains(self) -> list[str]:
        return self._call(ListDomains(self.caller))

    def subscribe_domain(self, domain_id: str, subscriber: str) -> list[str]:
        return self._call(SubscribeDomain(domain_id, subscriber, self.caller))

    def unsubscribe_domain(self, domain_id: str, subscriber: str) -> list[str]:
        return self._call(UnsubscribeDomain(domain_id, subscriber, self.caller))

    def register_need(self, domain_id: str, count: int, retirable_nodes: list[str] | None = None) -> dict:
        return self._call(RegisterNeed(domain_id, count, list(retirable_nodes or []), self.caller))

    # inputs (fire and forget)
    def heartbeat(self, node_id: str, state: str, timestamp: float, error: str | None = None,
                  failed_processes: list | None = None, agent: str | None = None) -> None:
        self.service.tell(NodeHeartbeat(node_id, state, timestamp, error, failed_processes, agent))

    def sensor_data(self, domain_id: str, metric: str, values: dict[str, float],
                    domain_value: float | None = None) -> None:
        self.service.tell(SensorData(domain_id, metric, values, domain_value, self.caller))
