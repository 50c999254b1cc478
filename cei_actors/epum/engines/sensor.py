"""sensor: scale between minimum_vms and maximum_vms on a metric.

The metric is sampled over the valid instances (``sample_function``: Average, Maximum,
Minimum or Sum; for Average the divisor is the larger of the number of samples and of valid
instances, so instances without data pull it down; with no per-instance samples the domain
sample is used). Above ``scale_up_threshold`` the target becomes valid + ``scale_up_n_vms``,
below ``scale_down_threshold`` valid - ``scale_down_n_vms``, clamped to [min, max]; after a
change no further scaling for ``cooldown_period`` seconds. Unlike the original, the cooldown
does not stop replacing failed instances. The target and the cooldown are engine memory, so
they survive failover.
"""

from __future__ import annotations

from typing import Any

from .base import (
    SENSOR_KEYS,
    Control,
    Engine,
    EngineConfigError,
    Key,
    State,
    is_count,
    is_nonneg_number,
    is_number,
    is_str,
)
from .needy import NEEDY_KEYS, NeedyMixin

SAMPLE_FUNCTIONS = ("Average", "Maximum", "Minimum", "Sum")


def sample(data: dict | None, valid_ids: list[str], function: str) -> float | None:
    """The metric's value over ``valid_ids`` (None if there is no data)."""
    if not data:
        return None
    values = data.get("values") or {}
    samples = [float(values[i]) for i in valid_ids if i in values]
    if not samples:
        dv = data.get("domain")
        return None if dv is None else float(dv)
    if function == "Maximum":
        return max(samples)
    if function == "Minimum":
        return min(samples)
    if function == "Sum":
        return sum(samples)
    return sum(samples) / max(len(samples), len(valid_ids))


class SensorEngine(NeedyMixin, Engine):
    documentation = __doc__ or ""
    CONFIG = {
        "minimum_vms": Key(required=True, check=is_count, expect="an integer >= 0"),
        "maximum_vms": Key(required=True, check=is_count, expect="an integer >= 0"),
        "metric": Key(required=True, check=is_str, expect="a metric name"),
        "sample_function": Key(check=lambda v: v in SAMPLE_FUNCTIONS,
                               expect=" or ".join(SAMPLE_FUNCTIONS)),
        "cooldown_period": Key(check=is_nonneg_number, expect="seconds >= 0"),
        "scale_up_threshold": Key(required=True, check=is_number, expect="a number"),
        "scale_up_n_vms": Key(check=is_count, expect="an integer >= 0"),
        "scale_down_threshold": Key(required=True, check=is_number, expect="a number"),
        "scale_down_n_vms": Key(check=is_count, expect="an integer >= 0"),
        **NEEDY_KEYS,
        **SENSOR_KEYS,
    }

    @classmethod
    def check_config(cls, conf: dict[str, Any]) -> None:
        if conf["minimum_vms"] > conf["maximum_vms"]:
            raise EngineConfigError("engine_conf: minimum_vms must be <= maximum_vms")
        if conf["scale_down_threshold"] >= conf["scale_up_threshold"]:
            raise EngineConfigError("engine_conf: scale_down_threshold must be < scale_up_threshold")

    def _clamp(self, n: int) -> int:
        return max(self.conf["minimum_vms"], min(self.conf["maximum_vms"], n))

    def decide(self, control: Control, state: State) -> None:
        c, mem = self.conf, self.memory
        killed = self.destroy_unhealthy(control, state)
        gone = set(killed)
        valid_ids = [i for i in state.valid_ids() if i not in gone]
        valid = len(valid_ids)
        target = self._clamp(mem.get("target", c["minimum_vms"]))
        until = mem.get("cooldown_until", 0.0)
        if control.now >= until:
            value = sample(state.sensor_data.get(c["metric"]), valid_ids,
                           c.get("sample_function", "Average"))
            new = target
            if value is not None and value > c["scale_up_threshold"]:
                new = self._clamp(valid + c.get("scale_up_n_vms", 1))
            elif value is not None and value < c["scale_down_threshold"]:
                new = self._clamp(valid - c.get("scale_down_n_vms", 1))
            if new != target:
                target = new
                cooldown = float(c.get("cooldown_period", 0))
                if cooldown > 0:
                    mem["cooldown_until"] = control.now + cooldown
                    control.wake_after(cooldown)
        else:
            control.wake_after(until - control.now)
        mem["target"] = target
        self.reconcile(control, state, target, killed)
