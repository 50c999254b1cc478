"""The ``cei-agent`` contextualization: registry checks, rendering per launch and per node,
and the agent's ``--from-userdata`` start (its refusals; the full start is in
test_provisioner_ec2.py against moto)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from provisioner_harness import Harness

from cei_actors.provisioner import contextualization as cz
from cei_actors.provisioner.messages import AddDeployableType, AddSite, Provision
from cei_actors.runtime.messages import ErrorReply

CTX = {"method": "cei-agent", "pd": "${pd_host}:1900", "secret_ref": "file:/etc/cei/secret",
       "slots": "${slots}", "heartbeat": "${heartbeat}", "fence": 15, "epum_name": "epum"}
DT = {"mappings": {"sim1": {"iaas_image": "ami-sim-base", "iaas_allocation": "t1.micro"}},
      "contextualization": CTX}


def test_a_launch_renders_once_and_each_node_gets_its_id():
    h = Harness()
    h.ok(AddSite("sim1", {"type": "sim", "seed": 1}))
    h.ok(AddDeployableType("agent", DT))
    h.ok(Provision("L1", "agent", "sim1", ["a", "b"],
                   {"pd_host": "198.18.0.1", "slots": 4, "heartbeat": 1.5}))
    creates = {w.payload["node_id"]: w.payload["userdata"] for w in h.work if w.kind == "create"}
    assert set(creates) == {"a", "b"}
    for nid, userdata in creates.items():
        doc = cz.parse_userdata(userdata)
        assert doc == {"version": 1, "node_id": nid, "pd": "198.18.0.1:1900",
                       "secret_ref": "file:/etc/cei/secret", "slots": 4, "heartbeat": 1.5,
                       "fence": 15, "epum_name": "epum"}
        assert cz.agent_args(doc) == [
            "--node-id", nid, "--pd", "198.18.0.1:1900", "--secret-file", "/etc/cei/secret",
            "--epum-name", "epum", "--slots", "4", "--heartbeat", "1.5", "--fence", "15"]
    # the launch's record keeps the shared document; no node id in it
    assert '"node_id"' not in h.state.launches["L1"].userdata


def test_a_missing_var_or_a_bad_number_fails_the_node_not_the_actor():
    h = Harness()
    h.ok(AddSite("sim1", {"type": "sim", "seed": 1}))
    h.ok(AddDeployableType("agent", DT))
    reply = h.ok(Provision("L1", "agent", "sim1", ["a"], {"pd_host": "h", "slots": 2}))
    assert reply["nodes"][0]["state"] == "FAILED"
    assert reply["nodes"][0]["state_desc"] == (
        "DTRS_VALIDATION_FAILED: cei-agent template variable 'heartbeat' is missing")
    reply = h.ok(Provision("L2", "agent", "sim1", ["b"],
                           {"pd_host": "h", "slots": "many", "heartbeat": 1}))
    assert reply["nodes"][0]["state_desc"] == (
        "DTRS_VALIDATION_FAILED: cei-agent slots is 'many', not a number")
    assert not [w for w in h.work if w.kind == "create"]


@pytest.mark.parametrize("ctx, text", [
    ({**CTX, "secret_ref": "s3cr3t"}, "secret_ref must be file:/ABSOLUTE/PATH"),
    ({**CTX, "secret_ref": "file:relative"}, "secret_ref must be file:/ABSOLUTE/PATH"),
    ({**CTX, "secret": "s3cr3t"}, "unknown key 'secret'"),
    ({k: v for k, v in CTX.items() if k != "pd"}, "needs a string 'pd'"),
    ({**CTX, "slots": -1}, "slots must be a number >= 0"),
    ({**CTX, "pd": "${"}, "invalid placeholder"),
])
def test_bad_definitions_are_refused_and_write_nothing(ctx, text):
    h = Harness()
    reply = h.error(AddDeployableType("agent", {**DT, "contextualization": ctx}))
    assert isinstance(reply, ErrorReply) and text in reply.message, reply.message


@pytest.mark.parametrize("data, text", [
    (b"#!/bin/sh\necho hi\n", "does not start with '#cei-agent v1'"),
    (b"#cei-agent v1\n{nope\n", "JSON is malformed"),
    (b'#cei-agent v1\n{"version":1,"pd":"127.0.0.1:1","secret_ref":"file:/s"}\n', "no node_id"),
    (b'#cei-agent v1\n{"version":1,"node_id":"n","pd":"127.0.0.1:1","secret_ref":"x"}\n',
     "secret_ref must be file:"),
    (b"\xff\xfe", "not UTF-8"),
])
def test_the_agent_refuses_bad_userdata_in_one_line(tmp_path, data, text):
    path = tmp_path / "user-data"
    path.write_bytes(data)
    with pytest.raises(cz.InvalidUserdata, match=text):
        cz.parse_userdata(data)
    run = subprocess.run([sys.executable, "-m", "cei_actors.eeagent", "--from-userdata", str(path)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert run.stderr.count("\n") == 1 and text in run.stderr, run.stderr


def test_options_given_beside_the_userdata_override_it(tmp_path):
    from cei_actors.eeagent.__main__ import build_parser, expand_userdata

    userdata = cz.for_node(cz.render_agent(
        {"method": "cei-agent", "pd": "127.0.0.1:1900", "secret_ref": "file:/etc/cei/secret",
         "slots": 3}, {}), "n7")
    path = tmp_path / "user-data"
    path.write_text(userdata)
    args = build_parser().parse_args(expand_userdata(
        ["--from-userdata", str(path), "--pd", "127.0.0.1:2000", "--state-dir", "/tmp/x"]))
    assert (args.node_id, args.pd, args.slots, args.secret_file, args.state_dir) == (
        "n7", [[("127.0.0.1:2000", None)]], 3, "/etc/cei/secret", "/tmp/x")
    # a userdata naming every host's admin gives them all; without a --pd beside it, they stand
    path.write_text(cz.for_node(cz.render_agent(
        {"method": "cei-agent", "pd": "198.18.0.1:1900,198.18.0.2:1900",
         "secret_ref": "file:/etc/cei/secret"}, {}), "n8"))
    args = build_parser().parse_args(expand_userdata(["--from-userdata", str(path)]))
    assert args.pd == [[("198.18.0.1:1900", None), ("198.18.0.2:1900", None)]]
    with pytest.raises(ValueError, match="No such file"):
        expand_userdata(["--from-userdata", str(tmp_path / "missing")])
