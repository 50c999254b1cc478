"""Decision engines, found by short name or by dotted path to an :class:`Engine` subclass."""

from __future__ import annotations

import importlib

from .base import Control, Engine, EngineConfigError, InstanceView, Key, State

#: Short names of the engines we ship.
ENGINES = {
    "preserve_n": "cei_actors.epum.engines.preserve_n:PreserveNEngine",
    "simplest": "cei_actors.epum.engines.preserve_n:PreserveNEngine",
    "needy": "cei_actors.epum.engines.needy:NeedyEngine",
    "sensor": "cei_actors.epum.engines.sensor:SensorEngine",
    "overflow": "cei_actors.epum.engines.overflow:OverflowEngine",
}

DEFAULT_ENGINE = "preserve_n"

_cache: dict[str, type[Engine]] = {}


def load_engine(name: str) -> type[Engine]:
    """The engine class for a short name, ``pkg.module.Class`` or ``pkg.module:Class``."""
    cls = _cache.get(name)
    if cls is not None:
        return cls
    path = ENGINES.get(name, name)
    if ":" in path:
        module_name, _, attr = path.partition(":")
    else:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise EngineConfigError(
            f"unknown engine {name!r}: use one of {', '.join(sorted(ENGINES))} or a dotted path"
        )
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise EngineConfigError(f"engine {name!r} cannot be loaded: {exc}") from None
    if not (isinstance(obj, type) and issubclass(obj, Engine)):
        raise EngineConfigError(f"engine {name!r} is not a decision engine (an Engine subclass)")
    _cache[name] = obj
    return obj


__all__ = [
    "DEFAULT_ENGINE",
    "ENGINES",
    "Control",
    "Engine",
    "EngineConfigError",
    "InstanceView",
    "Key",
    "State",
    "load_engine",
]
