"""preserve_n: keep exactly N instances alive (the original's SimplestEngine)."""

from __future__ import annotations

from typing import Any

from .base import Control, Engine, Key, State, is_count, is_opt_str, pick_to_destroy


class PreserveNEngine(Engine):
    documentation = (
        "Keeps preserve_n instances alive: replaces unhealthy or lost ones, launches or "
        "destroys (randomly chosen) instances to match. Only preserve_n can be reconfigured."
    )
    CONFIG = {
        "preserve_n": Key(required=True, check=is_count, expect="an integer >= 0",
                          doc="how many instances to keep"),
        "site": Key(check=is_opt_str, expect="a site name", reconfigurable=False),
        "deployable_type": Key(check=is_opt_str, expect="a deployable type", reconfigurable=False),
        "allocation": Key(check=is_opt_str, expect="an allocation", reconfigurable=False),
        # the original's names for the same three
        "force_site": Key(check=is_opt_str, expect="a site name", reconfigurable=False),
        "epuworker_type": Key(check=is_opt_str, expect="a deployable type", reconfigurable=False),
        "epuworker_allocation": Key(check=is_opt_str, expect="an allocation", reconfigurable=False),
    }

    def _launch_args(self) -> dict[str, Any]:
        c = self.conf
        return {
            "site": c.get("site") or c.get("force_site"),
            "deployable_type": c.get("deployable_type") or c.get("epuworker_type"),
            "allocation": c.get("allocation") or c.get("epuworker_allocation"),
        }

    def decide(self, control: Control, state: State) -> None:
        killed = self.destroy_unhealthy(control, state)
        n = self.conf["preserve_n"]
        valid = state.count_valid() - len(killed)
        if valid < n:
            args = self._launch_args()
            for _ in range(n - valid):
                control.launch(**args)
        elif valid > n:
            gone = set(killed)
            candidates = [i for i in state.valid_ids() if i not in gone]
            control.destroy_instances(pick_to_destroy(control, state, candidates, valid - n),
                                      reason="scale down", figures={"valid": valid, "preserve_n": n})
