"""The Provisioner as a thespian actor: the runtime's event-sourced shell around :class:`Provisioner`.

``Start(log_url, config=...)`` configures it. Config keys:

- the core's keys (:data:`~.logic.CONFIG_KEYS`): ``query_interval``, ``boot_query_interval``,
  ``disappear_grace``, ``create_concurrency``, ``terminator_concurrency``,
  ``destroy_retry_delay``, ``reaper_interval``, ``record_max_age``, ``client_token_prefix``,
  ``default_user``, ``subscribers``, ``destroy_zombies``;
- ``iaas_timeout``: seconds per real-cloud API request (default 60);
- ``credentials_key_file``: the operator's key file (mode 0600) that seals credentials at
  rest (see :mod:`.sealing`); without it, credentials are refused. The launcher sets it to
  ``HOME/credentials.key`` unless the plan names one;
- ``driver_factory``: ``"module:function"`` (or a callable) ``(site, credentials) ->
  NodeDriver`` replacing :func:`~.drivers.driver_for_site` (tests, custom clouds);
- the shell's ``workers`` (default: enough for every create, destroy and listing in flight),
  ``group_commit``, ``max_batch``.

Cloud calls (``create``, ``destroy``, ``list``) run in the shell's worker pool through a
:class:`~.cloud.CloudWorker`; their results come back to the core as messages. Drivers are
built per site from the registry's site description and the caller's credentials.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from ..runtime.core import SHELL_CONFIG_KEYS
from ..runtime.metrics import Sample, counts
from ..runtime.shell import EventSourcedActor
from .cloud import CloudWorker, DriverFactory
from .drivers import validate_credentials, validate_site
from .logic import CONFIG_KEYS, Provisioner
from .sealing import CredentialsKey
from .state import ProvisionerState

__all__ = ["ACTOR_KEYS", "ProvisionerActor", "check_config_keys", "metrics", "resolve_factory"]

#: Config keys of the actor itself (besides the core's and the shell's).
ACTOR_KEYS = {"iaas_timeout": 60.0, "driver_factory": None, "credentials_key_file": None}


def resolve_factory(spec: Any) -> DriverFactory | None:
    """A driver factory from a callable or a ``"module:function"`` string."""
    if spec is None or callable(spec):
        return spec
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(f"driver_factory {spec!r}: expected 'module:function' or a callable")
    module, _, name = spec.partition(":")
    factory = getattr(importlib.import_module(module), name)
    if not callable(factory):
        raise ValueError(f"driver_factory {spec!r} is not callable")
    return factory


def check_config_keys(config: dict) -> None:
    """Raise ``ValueError`` naming any key that is not the core's, the actor's or the shell's."""
    unknown = sorted(set(config) - set(CONFIG_KEYS) - set(ACTOR_KEYS) - SHELL_CONFIG_KEYS)
    if unknown:
        raise ValueError(
            f"unknown provisioner config key(s): {', '.join(unknown)} (known: "
            f"{', '.join([*CONFIG_KEYS, *ACTOR_KEYS, *sorted(SHELL_CONFIG_KEYS)])})"
        )


def metrics(state: ProvisionerState) -> list[Sample]:
    """The Provisioner's figures (:mod:`~cei_actors.runtime.metrics`): nodes by state (every
    record it holds, as ``describe_nodes``), nodes requested or terminating."""
    by_state: dict[str, int] = {}
    for node in state.nodes.values():
        by_state[node.state] = by_state.get(node.state, 0) + 1
    return [*counts("cei_provisioner_nodes", "state", by_state),
            ("cei_provisioner_pending_requests", {"kind": "launch"}, float(len(state.requested))),
            ("cei_provisioner_pending_requests", {"kind": "terminate"}, float(len(state.terminating)))]


class ProvisionerActor(EventSourcedActor):
    """The Provisioner service actor (see the module docstring for its config)."""

    workers = 32
    launch_events = ("NodeLaunched",)

    def metrics(self, state: ProvisionerState) -> list[Sample]:
        return metrics(state)

    def setup(self, config: dict) -> None:
        check_config_keys(config)
        if "workers" not in config:
            creates = int(config.get("create_concurrency", CONFIG_KEYS["create_concurrency"]))
            destroys = int(config.get("terminator_concurrency",
                                      CONFIG_KEYS["terminator_concurrency"]))
            config["workers"] = creates + destroys + 4
        timeout = config.get("iaas_timeout", ACTOR_KEYS["iaas_timeout"])
        path = config.get("credentials_key_file")
        self.credentials_key = None if path is None else CredentialsKey.load(path)
        self.cloud = CloudWorker(
            iaas_timeout=None if timeout is None else float(timeout),
            driver_factory=resolve_factory(config.get("driver_factory")),
            credentials_key=self.credentials_key,
        )

    def make_component(self, config: dict) -> Provisioner:
        core = {k: v for k, v in config.items() if k in CONFIG_KEYS}
        return Provisioner.from_config(
            core, site_validator=validate_site, credentials_validator=validate_credentials,
            credentials_key=self.credentials_key,
        )

    def teardown(self) -> None:
        cloud = getattr(self, "cloud", None)
        if cloud is not None:
            cloud.close()

    def work_handlers(self) -> dict[str, Callable[[Any], Any]]:
        return self.cloud.handlers()
