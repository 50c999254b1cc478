"""Which pure component owns which stream, for tools that replay a log without a running system."""

from __future__ import annotations

import importlib
from typing import Any, cast

from ..runtime.core import Component

#: stream name -> "module:Class" of its component (built with its default configuration)
COMPONENTS: dict[str, str] = {
    "provisioner": "cei_actors.provisioner.logic:Provisioner",
    "epum": "cei_actors.epum.logic:EPUM",
    "pd": "cei_actors.pd.logic:ProcessDispatcher",
    "ha": "cei_actors.ha.logic:HA",
    "example": "cei_actors.runtime.example:Counters",
}

class UnknownStream(LookupError):
    """A stream no known component owns."""


def component_class(stream: str) -> type[Component[Any]]:
    """The class of the component that owns ``stream`` (its replicas share a stream, e.g. ``pd``)."""
    spec = COMPONENTS.get(stream) or COMPONENTS.get(stream.split(".", 1)[0])
    if spec is None:
        known = ", ".join(sorted(COMPONENTS))
        raise UnknownStream(f"no component owns stream {stream!r} (known: {known})")
    module, _, name = spec.partition(":")
    return cast("type[Component[Any]]", getattr(importlib.import_module(module), name))


def component_for(stream: str, config: dict[str, Any] | None = None) -> Component[Any]:
    """A component able to fold ``stream`` (its replicas share a stream, e.g. ``pd``)."""
    cls = component_class(stream)
    return cls.for_replay() if config is None else cls(**config)
