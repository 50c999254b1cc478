"""The two HA policies: their parameters and how many copies each wants.

- ``npreserving``: ``preserve_n`` copies, always.
- ``sensor``: between ``minimum_processes`` and ``maximum_processes`` from a metric, as EPUM's
  sensor engine does for VMs: the metric is sampled over the group's live copies
  (``sample_function``: Average, Maximum, Minimum or Sum; per-copy values are keyed by upid,
  else the group-wide value is used). Above ``scale_up_threshold`` the target becomes live +
  ``scale_up_n_processes``, below ``scale_down_threshold`` live - ``scale_down_n_processes``,
  clamped to the bounds; after a change no further scaling for ``cooldown_period`` seconds
  (replacing dead copies is never held back). The metric comes from the sensor interface
  of ``cei_actors.epum.sensors``: ``sensor_type`` ``"message"`` (pushed with ``SensorData``,
  ``domain_id`` = the group name), ``"simulated"``, or a dotted path to a ``Sensor``, read
  every ``sample_period`` seconds with ``sensor_config``.
"""

from __future__ import annotations

from typing import Any

from ..epum.engines.base import Key, is_count, is_nonneg_number, is_number, is_str
from ..epum.engines.sensor import SAMPLE_FUNCTIONS, sample
from ..epum.sensors import DEFAULT_SAMPLE_PERIOD, PUSHED, check_sensor_type

NPRESERVING: dict[str, Key] = {
    "preserve_n": Key(required=True, check=is_count, expect="an integer >= 0"),
}
SENSOR: dict[str, Key] = {
    "minimum_processes": Key(required=True, check=is_count, expect="an integer >= 0"),
    "maximum_processes": Key(required=True, check=is_count, expect="an integer >= 0"),
    "metric": Key(required=True, check=is_str, expect="a metric name"),
    "scale_up_threshold": Key(required=True, check=is_number, expect="a number"),
    "scale_down_threshold": Key(required=True, check=is_number, expect="a number"),
    "scale_up_n_processes": Key(check=is_count, expect="an integer >= 0"),
    "scale_down_n_processes": Key(check=is_count, expect="an integer >= 0"),
    "cooldown_period": Key(check=is_nonneg_number, expect="seconds >= 0"),
    "sample_function": Key(check=lambda v: v in SAMPLE_FUNCTIONS, expect=" or ".join(SAMPLE_FUNCTIONS)),
    "sensor_type": Key(check=is_str, expect='"message", "simulated" or a dotted path to a Sensor'),
    "sensor_config": Key(check=lambda v: isinstance(v, dict), expect="a dict"),
    "sample_period": Key(check=lambda v: is_number(v) and v > 0, expect="seconds > 0"),
}
KEYS = {"npreserving": NPRESERVING, "sensor": SENSOR}


def check_parameters(policy: str, params: dict[str, Any]) -> None:
    """Raise ValueError naming the first unknown, missing or bad parameter."""
    keys = KEYS[policy]
    unknown = sorted(set(params) - set(keys))
    if unknown:
        raise ValueError(f"{policy}: unknown parameter(s) {', '.join(map(str, unknown))} "
                         f"(expected {', '.join(keys)})")
    for name, key in keys.items():
        if name not in params:
            if key.required:
                raise ValueError(f"{policy}: parameter {name} is required ({key.expect})")
            continue
        if key.check is not None and not key.check(params[name]):
            raise ValueError(f"{policy}: parameter {name} must be {key.expect}, got {params[name]!r}")
    if policy == "sensor":
        if params["minimum_processes"] > params["maximum_processes"]:
            raise ValueError("sensor: minimum_processes must be <= maximum_processes")
        if params["scale_down_threshold"] >= params["scale_up_threshold"]:
            raise ValueError("sensor: scale_down_threshold must be < scale_up_threshold")
        try:
            check_sensor_type(params.get("sensor_type", "message"))
        except ValueError as exc:
            raise ValueError(f"sensor: {exc}") from None


def clamp(params: dict[str, Any], n: int) -> int:
    return max(params["minimum_processes"], min(params["maximum_processes"], n))


def initial_target(policy: str, params: dict[str, Any], current: int | None = None) -> int:
    """The target a policy starts with (or keeps, ``current``, after a reconfigure)."""
    if policy == "npreserving":
        return int(params["preserve_n"])
    return clamp(params, params["minimum_processes"] if current is None else current)


def sensor_target(params: dict[str, Any], live: list[str], data: dict | None) -> tuple[int | None, float | None]:
    """``(target, value)``: the target the metric asks for given the ``live`` copies (None: no
    data, or the value is between the thresholds)."""
    value = sample(data, live, params.get("sample_function", "Average"))
    if value is None:
        return None, None
    if value > params["scale_up_threshold"]:
        return clamp(params, len(live) + params.get("scale_up_n_processes", 1)), value
    if value < params["scale_down_threshold"]:
        return clamp(params, len(live) - params.get("scale_down_n_processes", 1)), value
    return None, value


def pulled(params: dict[str, Any]) -> bool:
    """True if the policy reads a sensor itself (not pushed)."""
    return params.get("sensor_type", "message") not in PUSHED


def sample_period(params: dict[str, Any]) -> float:
    return float(params.get("sample_period", DEFAULT_SAMPLE_PERIOD))
