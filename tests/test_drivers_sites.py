"""Site descriptions -> drivers, validation, and the NodeState mapping. No network."""

from __future__ import annotations

import random
import socket

import pytest
from libcloud.compute.drivers.ec2 import EC2NodeDriver, EucNodeDriver, NimbusNodeDriver
from libcloud.compute.types import NodeState

from cei_actors.provisioner.drivers import (
    EC2_REGIONS,
    NODE_STATE_TO_INSTANCE_STATE,
    InvalidCredentials,
    InvalidSite,
    LocalProcessDriver,
    SimulatedCloudDriver,
    driver_for_site,
    instance_state_for,
    validate_site,
)

CREDS = {"access_key": "AKIDEXAMPLE", "secret_key": "s3cret", "key_name": "phantomkey"}


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


class FixedClock:
    def now(self) -> float:
        return 42.0


# ---------------------------------------------------------------------- real clouds


@pytest.mark.parametrize("region", EC2_REGIONS)
def test_ec2_driver_per_region(region):
    d = driver_for_site({"type": "ec2", "region": region}, CREDS)
    assert isinstance(d, EC2NodeDriver)
    assert d.region_name == region
    assert d.connection.host == f"ec2.{region}.amazonaws.com"
    assert d.connection.secure and d.connection.port == 443
    assert d.key == "AKIDEXAMPLE" and d.secret == "s3cret"


def test_ec2_defaults_to_us_east_1():
    assert validate_site({"type": "ec2"}) == {"type": "ec2", "region": "us-east-1", "secure": True}
    d = driver_for_site({"type": "ec2"}, CREDS)
    assert d.region_name == "us-east-1"


def test_ec2_request_timeout_is_applied_offline():
    d = driver_for_site({"type": "ec2"}, CREDS, timeout=60)
    assert d.connection.timeout == 60
    assert d.connection.connection.session.timeout == 60


def test_nimbus_driver_at_host_port():
    site = {"type": "nimbus", "host": "svc.example.org", "port": 8444, "path": "/api/cloud"}
    d = driver_for_site(site, CREDS)
    assert isinstance(d, NimbusNodeDriver)
    assert (d.connection.host, d.connection.port) == ("svc.example.org", 8444)
    assert d.connection.secure
    assert d.path == "/api/cloud"


def test_openstack_uses_ec2_compatible_api():
    site = {
        "type": "openstack",
        "host": "nova.example.org",
        "port": "8773",
        "path": "/services/Cloud",
        "secure": False,
    }
    d = driver_for_site(site, CREDS)
    assert isinstance(d, EucNodeDriver)
    assert (d.connection.host, d.connection.port) == ("nova.example.org", 8773)
    assert not d.connection.secure
    assert d.path == "/services/Cloud"


def test_openstack_without_path_keeps_libcloud_default():
    d = driver_for_site({"type": "openstack", "host": "h.example", "port": 8773}, CREDS)
    assert d.path == "/services/Eucalyptus"


# ---------------------------------------------------------------------- sim and local


def test_sim_site_builds_configured_simulated_cloud():
    clock = FixedClock()
    rng = random.Random(5)
    site = {
        "type": "sim",
        "boot_delay": [5, 10],
        "max_instances": 3,
        "lose_reply_rate": 0.1,
        "vanish_rate": 0.001,
        "api_latency": 0.5,
        "name": "sim-site",
    }
    d = driver_for_site(site, None, clock=clock, rng=rng)
    assert isinstance(d, SimulatedCloudDriver)
    assert d.clock is clock and d.rng is rng
    assert d.boot_delay == (5.0, 10.0) and d.max_instances == 3
    assert d.lose_reply_rate == 0.1 and d.vanish_rate == 0.001
    node = d.create_node("n", "m1.small", "ami-x", ex_clienttoken="t")  # no real sleep
    assert node.state == NodeState.PENDING


def test_sim_site_seed_makes_runs_repeatable():
    def boot_times(seed):
        d = driver_for_site(
            {"type": "sim", "seed": seed, "boot_delay": [0, 100]}, None, clock=FixedClock()
        )
        return [d.create_node("n", "s", "i").extra["boot_at"] for _ in range(5)]

    assert boot_times(1) == boot_times(1) != boot_times(2)


def test_local_site_builds_local_driver(tmp_path):
    site = {
        "type": "local",
        "state_dir": str(tmp_path),
        "command": "sleep 1",
        "vars": {"a": 1},
        "grace_period": 1,
    }
    d = driver_for_site(site, None)
    assert isinstance(d, LocalProcessDriver)
    assert d.state_dir == tmp_path.resolve() and d.command == "sleep 1"
    assert d.grace_period == 1.0 and d.vars == {"a": 1}


# ---------------------------------------------------------------------- bad sites


@pytest.mark.parametrize(
    ("site", "key", "text"),
    [
        ({}, "type", "missing key 'type'"),
        ({"type": "azure"}, "type", "unknown site type 'azure'"),
        ({"type": "ec2", "region": "us-east-2"}, "region", "us-east-2"),
        ({"type": "ec2", "regoin": "us-east-1"}, "regoin", "unknown key 'regoin'"),
        ({"type": "ec2", "secure": "yes"}, "secure", "not a boolean"),
        ({"type": "nimbus", "port": 8444}, "host", "missing key 'host'"),
        ({"type": "openstack", "host": "h"}, "port", "missing key 'port'"),
        ({"type": "nimbus", "host": "h", "port": 0}, "port", "not a valid port"),
        ({"type": "nimbus", "host": "h", "port": "http"}, "port", "not a valid port"),
        ({"type": "nimbus", "host": "h", "port": True}, "port", "not a valid port"),
        ({"type": "nimbus", "host": "http://h", "port": 1}, "host", "not a host name"),
        ({"type": "openstack", "host": "h", "port": 1, "path": "x"}, "path", "must start with"),
        ({"type": "sim", "lose_reply_rate": 1.5}, "lose_reply_rate", "in [0.0, 1.0]"),
        ({"type": "sim", "boot_delay": [10, 5]}, "boot_delay", "min <= max"),
        ({"type": "sim", "max_instances": -1}, "max_instances", ">= 0"),
        ({"type": "sim", "vanish": 0.1}, "vanish", "unknown key"),
        ({"type": "local", "command": "x"}, "state_dir", "missing key 'state_dir'"),
        ({"type": "local", "state_dir": "/tmp/x"}, "command", "missing key 'command'"),
        ({"type": "local", "state_dir": "/tmp/x", "command": []}, "command", "command must"),
    ],
)
def test_bad_sites_name_the_offending_key(site, key, text):
    with pytest.raises(InvalidSite) as info:
        validate_site(site)
    assert info.value.key == key
    assert text in str(info.value)
    with pytest.raises(InvalidSite):
        driver_for_site(site, CREDS)


def test_site_must_be_a_mapping():
    with pytest.raises(InvalidSite):
        validate_site(["ec2"])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("creds", "key"),
    [
        (None, "access_key"),
        ({}, "access_key"),
        ({"access_key": "a"}, "secret_key"),
        ({"access_key": "", "secret_key": "s"}, "access_key"),
        ({"access_key": "a", "secret_key": "s", "key_name": 3}, "key_name"),
    ],
)
@pytest.mark.parametrize("site", [{"type": "ec2"}, {"type": "nimbus", "host": "h", "port": 1}])
def test_real_clouds_need_credentials(site, creds, key):
    with pytest.raises(InvalidCredentials) as info:
        driver_for_site(site, creds)
    assert isinstance(info.value, InvalidSite) and info.value.key == key


def test_sim_and_local_need_no_credentials(tmp_path):
    driver_for_site({"type": "sim"}, None)
    driver_for_site({"type": "local", "state_dir": str(tmp_path), "command": ["true"]}, None)


# ---------------------------------------------------------------------- state mapping


@pytest.mark.parametrize(
    ("state", "name"),
    [
        (NodeState.RUNNING, "STARTED"),
        (NodeState.REBOOTING, "STARTED"),
        (NodeState.PENDING, "PENDING"),
        (NodeState.TERMINATED, "TERMINATED"),
        (NodeState.STOPPED, "TERMINATED"),
        (NodeState.UNKNOWN, "ERROR_RETRYING"),
        (NodeState.STARTING, "PENDING"),
        (NodeState.ERROR, "ERROR_RETRYING"),
        (NodeState.STOPPING, "ERROR_RETRYING"),
        ("running", "STARTED"),
        ("something-new", "ERROR_RETRYING"),
    ],
)
def test_node_state_mapping(state, name):
    assert instance_state_for(state) == name


def test_every_libcloud_state_maps_to_a_provisioner_state():
    names = {"STARTED", "PENDING", "TERMINATED", "ERROR_RETRYING"}
    assert set(NODE_STATE_TO_INSTANCE_STATE.values()) <= names
    for state in NodeState:
        assert instance_state_for(state) in names


def test_network_guard_is_effective():
    """The fixture above would catch a driver that talks to the network."""
    d = driver_for_site({"type": "ec2"}, CREDS, timeout=1)
    with pytest.raises(AssertionError, match="network access attempted"):
        d.list_nodes()
