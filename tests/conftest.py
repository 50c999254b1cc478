"""Shared pytest configuration: fixtures live in plain modules and are imported here."""

from fixtures_actors import tcp_system  # noqa: F401
from fixtures_zk import (  # noqa: F401  (pytest finds fixtures and hooks by name here)
    _zk_admin,
    pytest_itemcollected,
    zk_client,
    zk_ensemble,
    zk_hosts,
    zk_server,
)
