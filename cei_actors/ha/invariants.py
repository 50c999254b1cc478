"""What must hold of the HA service's state after every event (``cei log check``, simulations)."""

from __future__ import annotations

from .state import HAState


def broken(state: HAState) -> list[str]:
    """Descriptions of every invariant ``state`` breaks.

    Per group: never more counted copies than the target (HA terminates the surplus before it
    lowers a target and schedules only up to it), so once the PD has confirmed the
    terminations no more than N copies run; every copy indexed under its group.
    """
    problems: list[str] = []
    for name, g in state.groups.items():
        if g.name != name:
            problems.append(f"group {g.name} is stored under {name}")
        active = g.active()
        if len(active) > g.target:
            problems.append(f"group {name} counts {len(active)} copies for a target of {g.target}")
        if g.removing and active:
            problems.append(f"group {name} is being removed yet counts {len(active)} copies")
        for upid, c in g.copies.items():
            if c.upid != upid or state.owner.get(upid) != name:
                problems.append(f"copy {upid} of group {name} is not indexed under it")
    for upid, name in state.owner.items():
        g = state.groups.get(name)
        if g is None or upid not in g.copies:
            problems.append(f"copy {upid} is indexed under group {name}, which does not hold it")
    return problems
