"""Cloud drivers for the Provisioner, all behind libcloud's ``NodeDriver`` interface.

- :class:`SimulatedCloudDriver`: an in-process EC2-like cloud with virtual-time boots,
  quotas and injected faults (tests, sims, benchmarks).
- :class:`LocalProcessDriver`: "VMs" are processes on this host (the lightweight launch).
- :func:`driver_for_site`: site description + credentials -> driver (libcloud's own
  drivers for EC2, Nimbus and OpenStack).
- :func:`instance_state_for`: libcloud ``NodeState`` -> Provisioner state name.
"""

from .local import CommandSpec, LocalNodeNotFound, LocalProcessDriver
from .simcloud import (
    Clock,
    SimCloudStats,
    SimulatedCloudDriver,
    SimulatedCloudError,
    SimulatedTimeout,
    WallClock,
)
from .sites import (
    EC2_REGIONS,
    REAL_SITE_TYPES,
    SITE_TYPES,
    InvalidCredentials,
    InvalidSite,
    driver_for_site,
    validate_credentials,
    validate_site,
)
from .states import NODE_STATE_TO_INSTANCE_STATE, instance_state_for

__all__ = [
    "EC2_REGIONS",
    "NODE_STATE_TO_INSTANCE_STATE",
    "REAL_SITE_TYPES",
    "SITE_TYPES",
    "Clock",
    "CommandSpec",
    "InvalidCredentials",
    "InvalidSite",
    "LocalNodeNotFound",
    "LocalProcessDriver",
    "SimCloudStats",
    "SimulatedCloudDriver",
    "SimulatedCloudError",
    "SimulatedTimeout",
    "WallClock",
    "driver_for_site",
    "instance_state_for",
    "validate_credentials",
    "validate_site",
]
