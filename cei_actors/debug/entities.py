"""Entities in a component's state as plain data: pick one out, compare entity by entity."""

from __future__ import annotations

from typing import Any

#: fields that name an entity in a record of the state, most specific first
ID_FIELDS: tuple[str, ...] = (
    "upid", "resource_id", "instance_id", "node_id", "launch_id", "domain_id", "name", "definition_id",
)


def _names(item: Any, entity: str) -> bool:
    """Does the record ``item`` (a dict) name ``entity`` in one of its own scalar fields?"""
    return isinstance(item, dict) and any(v == entity for v in item.values() if isinstance(v, str))


def only_entity(data: Any, entity: str) -> dict[str, Any]:
    """The parts of a state snapshot ``data`` that are about ``entity``: per section, the
    records naming it (a process, a node and its resources, a domain, a group ...)."""
    out: dict[str, Any] = {}
    if not isinstance(data, dict):
        return out
    for section, value in data.items():
        if isinstance(value, list):
            found = [item for item in value if _names(item, entity)]
            if found:
                out[str(section)] = found
        elif isinstance(value, dict):
            if entity in value:
                out[str(section)] = {entity: value[entity]}
                continue
            hits = {k: v for k, v in value.items() if _names(v, entity)}
            if hits:
                out[str(section)] = hits
            else:
                deeper = only_entity(value, entity)
                if deeper:
                    out[str(section)] = deeper
    return out


def keyed(data: Any) -> Any:
    """``data`` with each list of records turned into a map by the records' id field, so two
    states compare entity by entity instead of position by position."""
    if isinstance(data, dict):
        return {k: keyed(v) for k, v in data.items()}
    if isinstance(data, list) and data and all(isinstance(x, dict) for x in data):
        for field in ID_FIELDS:
            ids = [x.get(field) for x in data]
            if all(isinstance(i, str) for i in ids) and len(set(ids)) == len(ids):
                return {i: keyed(x) for i, x in zip(ids, data, strict=True)}
    return data


def diff(a: Any, b: Any, path: str = "") -> list[dict[str, Any]]:
    """Paths whose values differ between two plain-data trees: ``added``, ``removed`` or
    ``changed``, with the values before and after."""
    if isinstance(a, dict) and isinstance(b, dict):
        changes: list[dict[str, Any]] = []
        for key in sorted(set(a) | set(b), key=str):
            sub = f"{path}.{key}" if path else str(key)
            if key not in a:
                changes.append({"path": sub, "change": "added", "after": b[key]})
            elif key not in b:
                changes.append({"path": sub, "change": "removed", "before": a[key]})
            else:
                changes += diff(a[key], b[key], sub)
        return changes
    if a != b:
        return [{"path": path or "(root)", "change": "changed", "before": a, "after": b}]
    return []


def entity_diff(before: Any, after: Any, entity: str | None = None) -> list[dict[str, Any]]:
    """What changed between two snapshots, entity by entity (only ``entity`` if given)."""
    if entity is not None:
        before, after = only_entity(before, entity), only_entity(after, entity)
    return diff(keyed(before), keyed(after))
