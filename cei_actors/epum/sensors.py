"""Sensors: where the metrics that drive the sensor and overflow engines come from.

A domain chooses its source with ``engine_conf.sensor_type``:

- ``"message"``: metrics are pushed to EPUM with ``SensorData(domain_id, metric, values,
  domain_value)`` (e.g. by a monitoring agent); nothing is pulled.
- ``"simulated"``: :class:`SimulatedSensor`, a deterministic function of time for tests
  and simulations.
- a dotted path ``"pkg.module:Class"`` (or ``pkg.module.Class``) to your own :class:`Sensor`.

A pulled sensor is read every ``engine_conf.sample_period`` seconds (default 90). The decider
asks the shell for ``Work("sensor", payload)``; the shell runs :func:`run_sensor` in its
worker pool (blocking I/O is fine there) and feeds the returned ``SensorReadings`` back to
EPUM, which records them as an event (so they survive failover) and re-runs the engine.

**Adding a real source** (CloudWatch, Prometheus, OpenTSDB, ...)::

    class PrometheusSensor(Sensor):
        def read(self, request: SensorRequest) -> SensorResult:
            url = request.config["url"]             # from engine_conf.sensor_config
            ...                                     # query; may block, may raise
            return SensorResult(values={iid: value for iid, value in ...}, domain_value=None)

then set ``engine_conf`` to ``{"sensor_type": "mypkg.sensors:PrometheusSensor",
"sensor_config": {"url": ...}, "metric": "load", ...}``. ``request.instances`` maps each
valid instance id to its ``{site, iaas_id, hostname, public_ip, private_ip}``, so the sensor
can find each VM in the metric source. A raised exception is logged and the engine keeps its
last data. Keep the returned values small: they are persisted.
"""

from __future__ import annotations

import importlib
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from .messages import SensorReadings

logger = logging.getLogger(__name__)

DEFAULT_SAMPLE_PERIOD = 90.0
#: Sensor types that are pushed, not pulled.
PUSHED = frozenset({"message"})


@dataclass(frozen=True)
class SensorRequest:
    owner: str
    domain_id: str
    metric: str
    now: float
    instances: dict[str, dict[str, Any]] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SensorResult:
    values: dict[str, float] = field(default_factory=dict)
    domain_value: float | None = None


class Sensor(ABC):
    """A metric source, read in the shell's worker pool."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config

    @abstractmethod
    def read(self, request: SensorRequest) -> SensorResult:
        """The metric's current samples for the domain's instances (may block or raise)."""


class SimulatedSensor(Sensor):
    """A step function of time: ``sensor_config = {"steps": [[t0, v0], [t1, v1], ...]}``.

    The value at ``now`` is that of the last step with ``t <= now`` (none before the first).
    With ``"per_instance": true`` every instance gets that value; otherwise it is the domain
    value.
    """

    def read(self, request: SensorRequest) -> SensorResult:
        value = None
        for t, v in sorted(request.config.get("steps", []), key=lambda s: s[0]):
            if t <= request.now:
                value = float(v)
        if value is None:
            return SensorResult()
        if request.config.get("per_instance"):
            return SensorResult(values={i: value for i in request.instances})
        return SensorResult(domain_value=value)


SENSORS: dict[str, type[Sensor]] = {"simulated": SimulatedSensor}


def load_sensor(name: str) -> type[Sensor]:
    """The sensor class for a short name or a dotted path."""
    if name in SENSORS:
        return SENSORS[name]
    module_name, sep, attr = name.partition(":")
    if not sep:
        module_name, _, attr = name.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ValueError(f"sensor {name!r} cannot be loaded: {exc}") from None
    if not (isinstance(cls, type) and issubclass(cls, Sensor)):
        raise ValueError(f"sensor {name!r} is not a Sensor subclass")
    return cls


def check_sensor_type(name: str) -> None:
    """Raise ValueError unless ``name`` is pushed or loadable."""
    if name not in PUSHED:
        load_sensor(name)


def run_sensor(payload: dict[str, Any]) -> SensorReadings:
    """The shell's ``Work("sensor", payload)`` handler: read the sensor, report readings."""
    owner, domain_id, metric = payload["owner"], payload["domain_id"], payload["metric"]
    try:
        cls = load_sensor(payload["sensor_type"])
        request = SensorRequest(owner, domain_id, metric, payload["now"],
                                payload.get("instances", {}), payload.get("config", {}))
        result = cls(request.config).read(request)
        values = {str(k): float(v) for k, v in result.values.items()}
        dv = None if result.domain_value is None else float(result.domain_value)
        return SensorReadings(owner, domain_id, metric, values, dv)
    except Exception as exc:  # reported back, logged by EPUM
        return SensorReadings(owner, domain_id, metric, {}, None, f"{type(exc).__name__}: {exc}")
