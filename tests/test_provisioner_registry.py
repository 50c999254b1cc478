"""The deployable type registry (DTRS): validation, ${var} rendering, scoping, lookup."""

from __future__ import annotations

import pytest
from provisioner_harness import DT, KEY, SIM_SITE, Harness

from cei_actors.provisioner import registry as dtrs
from cei_actors.provisioner.drivers import REAL_SITE_TYPES
from cei_actors.provisioner.messages import (
    AddCredentials,
    AddDeployableType,
    AddSite,
    DescribeCredentials,
    DescribeDeployableType,
    DescribeSite,
    ListCredentials,
    ListDeployableTypes,
    ListSites,
    Lookup,
    Provision,
    RemoveCredentials,
    RemoveDeployableType,
    RemoveSite,
    TerminateNodes,
    UpdateCredentials,
    UpdateDeployableType,
    UpdateSite,
)
from cei_actors.provisioner.sealing import mask, open_entry

EC2 = {"type": "ec2", "region": "us-west-2"}
CREDS = {"access_key": "AK", "secret_key": "SK", "key_name": "mykey"}
EC2_DT = {"mappings": {"ec2": {"iaas_image": "ami-1", "iaas_allocation": "m1.small"}}}


def test_credential_site_types_match_the_drivers():
    assert set(REAL_SITE_TYPES) == dtrs.CREDENTIAL_SITE_TYPES


@pytest.mark.parametrize(
    "template, vars, out",
    [
        ("a ${x} b", {"x": 1}, "a 1 b"),
        ("$x$$", {"x": "y"}, "y$"),
        ("${d}", {"d": {"b": [1, 2], "a": None}}, '{"a": null, "b": [1, 2]}'),
        ("${l}|${t}", {"l": ["p", 2], "t": True}, '["p", 2]|true'),
        ("no vars", {}, "no vars"),
    ],
)
def test_render(template, vars, out):
    assert dtrs.render(template, vars) == out


def test_render_missing_var_is_a_validation_failure():
    with pytest.raises(dtrs.LookupFailed) as info:
        dtrs.render("hello ${who} from ${where}", {"who": "me"})
    assert info.value.reason == "DTRS_VALIDATION_FAILED"
    assert "'where' is missing" in info.value.state_desc


@pytest.mark.parametrize(
    "definition, text",
    [
        ({}, "'mappings' must map sites"),
        ({"mappings": {"s": {"iaas_allocation": "m1"}}}, "needs iaas_image"),
        ({"mappings": {"s": {"iaas_image": ""}}}, "non-empty string"),
        ({"mappings": {"s": {"iaas_image": "a", "imagee": "b"}}}, "unknown key 'imagee'"),
        ({"mappings": {"s": {"iaas_image": "a"}}, "extra": 1}, "unknown key 'extra'"),
        ({"mappings": {"s": {"iaas_image": "a"}}, "contextualization": {"method": "chef"}},
         "method 'chef' is not supported"),
        ({"mappings": {"s": {"iaas_image": "a"}}, "contextualization": {"method": "userdata"}},
         "needs a 'userdata' string"),
        ({"mappings": {"s": {"iaas_image": "a"}},
          "contextualization": {"method": "userdata", "userdata": "cost $5"}},
         "invalid placeholder"),
        ("not a dict", "must be a mapping"),
    ],
)
def test_dt_validation(definition, text):
    with pytest.raises(dtrs.RegistryError, match=text):
        dtrs.validate_dt("dt", definition)


def test_site_validation_uses_the_injected_validator_and_reserves_common():
    with pytest.raises(dtrs.RegistryError, match="reserved"):
        dtrs.validate_site("common::x", SIM_SITE)
    with pytest.raises(dtrs.RegistryError, match="needs a string 'type'"):
        dtrs.validate_site("x", {})
    with pytest.raises(dtrs.RegistryError, match="not plain data"):
        dtrs.validate_site("x", {"type": "sim", "f": object()})
    with pytest.raises(dtrs.RegistryError, match="invalid"):
        dtrs.validate_site("bad name", SIM_SITE)


@pytest.fixture
def h():
    harness = Harness()
    harness.setup_sim()
    return harness


def test_site_operations_and_scoping(h):
    assert h.error(AddSite("sim1", SIM_SITE)).code == "conflict"
    assert "unknown key 'colour'" in h.error(AddSite("x", {"type": "sim", "colour": 1})).message
    assert "region" in h.error(AddSite("x", {"type": "ec2", "region": "mars-1"})).message
    h.ok(AddSite("sim1", {"type": "sim", "seed": 99}, caller="alice"))  # shadows the common one
    assert h.ok(DescribeSite("sim1", caller="alice"))["seed"] == 99
    assert h.ok(DescribeSite("sim1", caller="bob"))["seed"] == 7
    assert h.ok(DescribeSite("common::sim1", caller="alice"))["seed"] == 7
    h.ok(AddSite("own", SIM_SITE, caller="alice"))
    assert h.ok(ListSites(caller="alice")) == ["own", "sim1"]
    assert h.ok(ListSites(caller="bob")) == ["sim1"]
    assert h.error(DescribeSite("own", caller="bob")).code == "not_found"
    h.ok(UpdateSite("own", {"type": "sim", "seed": 3}, caller="alice"))
    assert h.ok(DescribeSite("own", caller="alice")) == {"type": "sim", "seed": 3}
    assert h.error(UpdateSite("nope", SIM_SITE)).code == "not_found"
    h.ok(RemoveSite("own", caller="alice"))
    assert h.error(RemoveSite("own", caller="alice")).code == "not_found"
    assert h.replayed() == h.state


def test_a_site_in_use_cannot_be_removed(h):
    h.ok(Provision("L1", "dt1", "sim1", ["n1"], {"name": "x"}))
    assert h.error(RemoveSite("sim1")).code == "conflict"
    h.drain()
    h.ok(TerminateNodes(["n1"]))
    h.drain()
    h.ok(RemoveSite("sim1"))


def test_dt_operations_and_fallback_to_common(h):
    assert h.error(AddDeployableType("dt1", DT)).code == "conflict"
    assert h.ok(DescribeDeployableType("dt1", caller="alice")) == DT  # common fallback
    mine = {"mappings": {"sim1": {"iaas_image": "mine"}}}
    h.ok(AddDeployableType("dt1", mine, caller="alice"))
    assert h.ok(DescribeDeployableType("dt1", caller="alice")) == mine
    h.ok(AddDeployableType("dt2", mine, caller="alice"))
    assert h.ok(ListDeployableTypes(caller="alice")) == ["dt1", "dt2"]
    assert h.ok(ListDeployableTypes()) == ["dt1"]
    assert h.error(DescribeDeployableType("dt2", caller="bob")).code == "not_found"
    h.ok(UpdateDeployableType("dt2", DT, caller="alice"))
    h.ok(RemoveDeployableType("dt2", caller="alice"))
    assert h.error(RemoveDeployableType("dt2", caller="alice")).code == "not_found"
    assert "unknown key" in h.error(AddDeployableType("dt3", {"mappings": {}, "x": 1})).message
    node = h.ok(Lookup("dt1", "sim1", caller="alice", allocation="m1.large"))["node"]
    assert node["iaas_image"] == "mine" and node["iaas_allocation"] == "m1.large"


def test_credentials_are_per_caller_and_needed_for_real_clouds(h):
    h.ok(AddSite("ec2", EC2))
    h.ok(AddDeployableType("web", EC2_DT))
    assert h.error(AddCredentials("nowhere", CREDS, caller="alice")).code == "not_found"
    assert "secret_key" in h.error(AddCredentials("ec2", {"access_key": "a"}, "alice")).message
    assert "not supported" in h.error(AddCredentials("ec2", CREDS, "alice", "chef")).message
    h.ok(AddCredentials("ec2", CREDS, caller="alice"))
    assert h.error(AddCredentials("ec2", CREDS, caller="alice")).code == "conflict"
    assert h.ok(DescribeCredentials("ec2", caller="alice")) == mask(CREDS, KEY.fingerprint)
    assert h.error(DescribeCredentials("ec2", caller="bob")).code == "not_found"
    assert h.ok(ListCredentials(caller="alice")) == ["ec2"]
    node = h.ok(Lookup("web", "ec2", caller="alice"))["node"]
    assert node["iaas_sshkeyname"] == "mykey" and node["credentials_owner"] == "alice"
    assert "no credentials" in h.error(Lookup("web", "ec2", caller="bob")).message
    value = h.ok(Provision("L1", "web", "ec2", ["b1"], {}, caller="bob"))
    assert value["nodes"][0]["state_desc"].startswith("DTRS_LOOKUP_FAILED")
    h.ok(UpdateCredentials("ec2", {**CREDS, "key_name": "other"}, caller="alice"))
    assert h.ok(Lookup("web", "ec2", caller="alice"))["node"]["iaas_sshkeyname"] == "other"
    h.ok(RemoveCredentials("ec2", caller="alice"))
    assert h.ok(ListCredentials(caller="alice")) == []
    assert h.replayed() == h.state


def test_credentials_in_use_cannot_be_removed(h):
    h.ok(AddSite("ec2", EC2))
    h.ok(AddDeployableType("web", EC2_DT))
    h.ok(AddCredentials("ec2", CREDS, caller="alice"))
    h.ok(Provision("L1", "web", "ec2", ["a1"], {}, caller="alice"))
    assert h.error(RemoveCredentials("ec2", caller="alice")).code == "conflict"
    work = h.work[0]
    assert open_entry(work.payload["credentials"], KEY) == CREDS
    assert work.payload["keyname"] == "mykey"


def test_lookup_errors(h):
    assert h.error(Lookup("nope", "sim1")).code == "not_found"
    assert h.error(Lookup("dt1", "nowhere")).code == "not_found"
    err = h.error(Lookup("dt1", "sim1"))  # ${name} missing
    assert err.code == "bad_request" and "DTRS_VALIDATION_FAILED" in err.message
    h.ok(AddSite("sim2", SIM_SITE))
    assert "no mapping for site 'sim2'" in h.error(Lookup("dt1", "sim2")).message
    node = h.ok(Lookup("dt1", "sim1", vars={"name": "n"}))["node"]
    assert node["userdata"] == "node n" and node["needs_nimbus_ctx"] is False


def test_registry_snapshot_round_trip(h):
    h.ok(AddSite("ec2", EC2))
    h.ok(AddCredentials("ec2", CREDS, caller="alice"))
    data = h.core.snapshot(h.state)
    assert h.core.restore(data) == h.state
