"""needy: the PD's engine. Its target comes from ``RegisterNeed`` (preserve_n, retirable_nodes).

``maximum_vms`` (optional) caps the need. On scale-down the retirable nodes go first, then random ones. With ``unique_key`` each new
instance gets ``extravars[unique_key]`` = the first value of ``unique_values`` not held by a
live instance (values of dead instances are reused); when none is left it launches no more.
"""

from __future__ import annotations

import logging
from typing import Any

from .base import (
    VALID_STATES,
    Control,
    Engine,
    EngineConfigError,
    Key,
    State,
    is_count,
    is_opt_str,
    is_str_list,
    pick_to_destroy,
)

logger = logging.getLogger(__name__)


def unique_values(conf: dict[str, Any]) -> list[str]:
    raw = conf.get("unique_values") or []
    if isinstance(raw, str):
        return [v.strip() for v in raw.split(",") if v.strip()]
    return [str(v) for v in raw]


#: Keys shared by needy-style engines (also used by the sensor engine).
NEEDY_KEYS: dict[str, Key] = {
    "iaas_site": Key(check=is_opt_str, expect="a site name"),
    "iaas_allocation": Key(check=is_opt_str, expect="an allocation"),
    "deployable_type": Key(check=is_opt_str, expect="a deployable type"),
    "retirable_nodes": Key(check=is_str_list, expect="a list of instance ids",
                           doc="destroyed first on scale-down"),
    "unique_key": Key(check=is_opt_str, expect="an extravars key"),
    "unique_values": Key(check=lambda v: isinstance(v, str) or is_str_list(v),
                         expect="a list of strings or a comma-separated string"),
}


class NeedyMixin:
    """Launch and scale-down shared by needy-style engines."""

    conf: dict[str, Any]

    def reconcile(self, control: Control, state: State, target: int, killed: list[str]) -> None:
        valid = state.count_valid() - len(killed)
        if valid > target:
            candidates = state.valid_id_set().difference(killed)  # ordered only if needed (RT5)
            first = self.conf.get("retirable_nodes") or []
            control.destroy_instances(
                pick_to_destroy(control, state, candidates, valid - target, first), reason="scale down",
                figures={"valid": valid, "target": target, "retirable_first": list(first)},
            )
        elif valid < target:
            self.launch_n(control, state, target - valid, killed)

    def launch_n(self, control: Control, state: State, n: int, killed: list[str]) -> None:
        c = self.conf
        args = {"site": c.get("iaas_site"), "deployable_type": c.get("deployable_type"),
                "allocation": c.get("iaas_allocation")}
        key = c.get("unique_key")
        free: list[str] = []
        if key:
            gone = set(killed)
            used = set()
            for iid in state.ids_in(VALID_STATES):
                if iid in gone:
                    continue
                v = state.get_instance(iid).extravars.get(key)  # type: ignore[union-attr]
                if v is not None:
                    used.add(str(v))
            free = [v for v in unique_values(c) if v not in used]
        for _ in range(n):
            if key:
                if not free:
                    logger.error("domain %s: no unique value left for %r; not launching more",
                                 state.domain_id, key)
                    return
                control.launch(**args, extravars={key: free.pop(0)})
            else:
                control.launch(**args)


class NeedyEngine(NeedyMixin, Engine):
    documentation = __doc__ or ""
    CONFIG = {
        "preserve_n": Key(check=is_count, expect="an integer >= 0", doc="the need (default 0)"),
        "maximum_vms": Key(check=lambda v: v is None or is_count(v), expect="an integer >= 0",
                           doc="a cap on the need"),
        **NEEDY_KEYS,
    }

    @classmethod
    def check_config(cls, conf: dict[str, Any]) -> None:
        if conf.get("unique_values") and not conf.get("unique_key"):
            raise EngineConfigError("engine_conf: unique_values needs unique_key")

    def decide(self, control: Control, state: State) -> None:
        killed = self.destroy_unhealthy(control, state)
        target = self.conf.get("preserve_n", 0)
        cap = self.conf.get("maximum_vms")
        if cap is not None:
            target = min(target, cap)
        self.reconcile(control, state, target, killed)
