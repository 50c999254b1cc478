"""A host's network settings (runtime/network.py): checked as plan keys, CLI flags and agent
flags; a wildcard or an unprotected routable address is refused and starts nothing."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest
import yaml

from cei_actors.eeagent.__main__ import parse_pd
from cei_actors.launch.plan import PlanError, load_plan
from cei_actors.runtime.network import Network, NetworkError, split_host_port
from cei_actors.runtime.secure import new_secret_file


def test_default_is_loopback_and_accepts_local_peers():
    net = Network.build()
    assert (net.listen, net.advertise, net.allow) == ("127.0.0.1", "127.0.0.1", ())
    assert net.is_loopback and net.permits("127.0.0.1")


@pytest.mark.parametrize("kwargs, message", [
    ({"listen": "0.0.0.0", "allow": ["10.0.0.0/8"]}, "refused unless allowed explicitly"),
    ({"listen": "0.0.0.0", "allow": ["10.0.0.0/8"], "allow_wildcard": True}, "needs an advertise address"),
    ({"listen": "::"}, "IPv6 is not supported"),
    ({"listen": "198.18.0.1"}, "name the peer networks"),
    ({"listen": "198.18.0.1", "allow": ["nonsense"]}, "CIDR"),
    ({"listen": "a.b.c.d"}, "expected an IPv4 address"),
    ({"listen": "0.0.0.0", "advertise": "0.0.0.0", "allow": ["10.0.0.0/8"], "allow_wildcard": True},
     "peers cannot connect"),
])
def test_bad_settings_are_refused_in_one_line(kwargs, message):
    with pytest.raises(NetworkError, match=message) as info:
        Network.build(**kwargs)
    assert "\n" not in str(info.value)


def test_wildcard_when_allowed_and_the_allowlist():
    net = Network.build("0.0.0.0", "198.18.0.1", ["198.18.0.0/30"], allow_wildcard=True)
    assert net.advertise == "198.18.0.1" and not net.is_loopback
    assert net.permits("198.18.0.2") and net.permits("198.18.0.1")
    assert not net.permits("198.18.0.100") and not net.permits("127.0.0.1") and not net.permits("junk")
    assert Network.build("198.18.0.5", allow="198.18.0.0/30").permits("198.18.0.5")  # itself


def test_addresses_of_admins():
    assert split_host_port("198.18.0.1:1900") == ("198.18.0.1", 1900)
    assert split_host_port("1900", "198.18.0.2") == ("198.18.0.2", 1900)
    for bad in ("198.18.0.1:x", "198.18.0.1:70000", "host:1900", "::1:1900"):
        with pytest.raises(NetworkError):
            split_host_port(bad)
    assert parse_pd("198.18.0.1:1900/pd.1") == [("198.18.0.1:1900", "pd.1")]
    assert parse_pd("1900") == [("1900", None)]
    # every host's admin, joined by commas (a userdata's pd may list them so)
    assert parse_pd("198.18.0.1:1900,198.18.0.2:1900") == [("198.18.0.1:1900", None),
                                                           ("198.18.0.2:1900", None)]
    for bad in ("198.18.0.1:1900,", ",1900", "host:1900,1900"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_pd(bad)


def _plan(tmp_path, network):
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump({"log": "sqlite:///${home}/log.sqlite", "components": {"pd": {}},
                                    "pd": {"engines": {"default": {"slots": 1}}}, "network": network}))
    return path


def test_plan_network_keys(tmp_path):
    secret = new_secret_file(tmp_path / "secret")
    plan = load_plan(_plan(tmp_path, {
        "listen": "198.18.0.1", "allow": ["198.18.0.0/24"], "admin_port": 1900,
        "join": "198.18.0.2:1900", "peers": ["198.18.0.3:1900", "1901"], "secret_file": str(secret),
    }), home=tmp_path / "home")
    assert plan.network == Network("198.18.0.1", "198.18.0.1", ("198.18.0.0/24",))
    assert (plan.admin_port, plan.join, plan.peers) == (1900, "198.18.0.2:1900", ("198.18.0.3:1900", "198.18.0.1:1901"))
    assert plan.secret_file == str(secret)
    assert load_plan(_plan(tmp_path, None), home=tmp_path / "home").network == Network()


@pytest.mark.parametrize("network, key", [
    ({"listen": "0.0.0.0", "allow": ["198.18.0.0/24"]}, "network: listen 0.0.0.0 binds every interface"),
    ({"listen": "198.18.0.1"}, "network: listen 198.18.0.1 is reachable"),
    ({"listen": "198.18.0.1", "allow": "198.18.0.0/24", "colour": "red"}, "network.colour: unknown key"),
    ({"admin_port": 70000}, "network.admin_port"),
    ({"peers": ["nowhere"]}, "network.peers.0"),
    ({"secret_file": "/nonexistent/secret"}, "network.secret_file: cannot read"),
    ({"allow_wildcard": "yes"}, "network.allow_wildcard"),
])
def test_bad_plan_network_keys(tmp_path, network, key):
    with pytest.raises(PlanError, match=key):
        load_plan(_plan(tmp_path, network), home=tmp_path / "home")


def test_cei_up_refuses_a_wildcard_and_starts_nothing(tmp_path):
    home = tmp_path / "home"
    proc = subprocess.run([sys.executable, "-m", "cei_actors.cli", "--home", str(home), "up",
                           "--listen", "0.0.0.0", "--allow", "198.18.0.0/24"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "refused unless allowed explicitly" in proc.stderr and "--allow-wildcard" in proc.stderr
    assert not (home / "system.json").exists()
    agent = subprocess.run([sys.executable, "-m", "cei_actors.eeagent", "--node-id", "n", "--pd", "198.18.0.1:1900",
                            "--state-dir", str(tmp_path / "agent"), "--secret-file", str(new_secret_file(tmp_path / "s")),
                            "--listen", "198.18.0.9"], capture_output=True, text=True, timeout=60)
    assert agent.returncode == 2 and "name the peer networks" in agent.stderr
