"""libcloud's EC2 driver (through the Provisioner's CloudWorker) against moto's EC2 server.

moto runs as its own process on a loopback port (``cei_actors.testing.moto_server``); boto3,
which ships with moto, plays the operator who changes things behind our back.
"""

from __future__ import annotations

import base64

import pytest
from libcloud.compute.drivers.ec2 import EC2NodeDriver

from cei_actors.provisioner.cloud import CloudWorker
from cei_actors.provisioner.drivers import InvalidSite, driver_for_site, validate_site
from cei_actors.provisioner.drivers.ec2 import CEIEC2NodeDriver, ec2_driver
from cei_actors.provisioner.logic import _failure
from cei_actors.provisioner.sealing import CredentialsKey
from cei_actors.testing.moto_server import MotoServer, unavailable_reason

pytestmark = pytest.mark.skipif(unavailable_reason() is not None,
                                reason=unavailable_reason() or "")

KEY = CredentialsKey(CredentialsKey.generate())


@pytest.fixture(scope="module")
def moto():
    with MotoServer() as server:
        yield server


def sealed(creds: dict) -> dict:
    view, token = KEY.seal(creds, 0.0)
    from cei_actors.provisioner.sealing import entry_from_event

    return entry_from_event(view, token)


def payload(moto: MotoServer, node_id: str, image: str | None = None, creds: dict | None = None,
            **extra) -> dict:
    return {
        "account": '["", "moto", ""]', "site": "moto", "definition": validate_site(moto.site()),
        "credentials": sealed(creds or moto.credentials()), "system": "cei-",
        "node_id": node_id, "launch_id": f"launch-{node_id}", "client_token": f"cei-tok-{node_id}",
        "image": image or moto.image_id(), "size": "t2.micro", "keyname": None,
        "userdata": f"hello {node_id}", "caller": "alice", "deployable_type": "dt1", **extra,
    }


def instances(moto: MotoServer, **filters: str) -> list[dict]:
    ec2 = moto.boto3()
    flt = [{"Name": k, "Values": [v]} for k, v in filters.items()]
    out = ec2.describe_instances(Filters=flt) if flt else ec2.describe_instances()
    return [i for r in out["Reservations"] for i in r["Instances"]]


def test_the_site_builds_libclouds_ec2_driver_at_the_configured_endpoint(moto):
    site = validate_site(moto.site())
    assert site == {"type": "ec2", "region": "us-east-1", "host": "127.0.0.1",
                    "port": moto.port, "secure": False}
    driver = driver_for_site(site, moto.credentials())
    assert isinstance(driver, EC2NodeDriver) and isinstance(driver, CEIEC2NodeDriver)
    assert (driver.connection.host, driver.connection.port) == ("127.0.0.1", moto.port)
    # the same site without an endpoint is the region itself
    real = driver_for_site({"type": "ec2", "region": "eu-west-1"}, moto.credentials())
    assert real.connection.host == "ec2.eu-west-1.amazonaws.com"
    for bad, key in (({"type": "ec2", "port": 5000}, "port"),
                     ({"type": "ec2", "host": "http://x", "port": 5000}, "host"),
                     ({"type": "ec2", "host": "h", "port": 70000}, "port")):
        with pytest.raises(InvalidSite) as err:
            validate_site(bad)
        assert err.value.key == key


def test_create_tags_describe_and_terminate(moto):
    worker = CloudWorker(credentials_key=KEY)
    p = payload(moto, "n-create")
    made = worker.create(p)
    assert made.error_kind is None, made.error
    assert made.iaas_id.startswith("i-") and made.private_ip and made.public_ip
    [inst] = instances(moto, **{"tag:cei:node_id": "n-create"})
    assert inst["InstanceId"] == made.iaas_id and inst["ClientToken"] == "cei-tok-n-create"
    tags = {t["Key"]: t["Value"] for t in inst["Tags"]}
    assert tags == {"Name": "n-create", "cei:system": "cei-", "cei:node_id": "n-create",
                    "cei:launch_id": "launch-n-create", "cei:caller": "alice",
                    "cei:deployable_type": "dt1"}
    attr = moto.boto3().describe_instance_attribute(InstanceId=made.iaas_id, Attribute="userData")
    assert base64.b64decode(attr["UserData"]["Value"]).decode() == "hello n-create"

    listed = worker.list({**p, "seq": 1})
    assert listed.error_kind is None, listed.error
    vm = next(v for v in listed.vms if v["iaas_id"] == made.iaas_id)
    assert vm["client_token"] == "cei-tok-n-create" and vm["state"] in ("PENDING", "STARTED")
    booting = worker.list({**p, "seq": 0, "node_ids": [made.iaas_id]})
    assert [v["iaas_id"] for v in booting.vms] == [made.iaas_id] and booting.partial

    gone = worker.destroy({**p, "iaas_id": made.iaas_id})
    assert gone.error_kind is None, gone.error
    [inst] = instances(moto, **{"tag:cei:node_id": "n-create"})
    assert inst["State"]["Name"] == "terminated"
    listed = worker.list({**p, "seq": 2})
    assert {v["iaas_id"]: v["state"] for v in listed.vms}[made.iaas_id] == "TERMINATED"


def test_a_create_retried_with_its_client_token_makes_no_second_vm(moto):
    """moto ignores ClientToken (EC2 honours it); the driver finds the VM by its tags."""
    worker = CloudWorker(credentials_key=KEY)
    p = payload(moto, "n-token")
    first = worker.create(p)
    again = CloudWorker(credentials_key=KEY).create(p)  # e.g. a new leader re-drives it
    assert first.error_kind is None and again.error_kind is None
    assert again.iaas_id == first.iaas_id
    assert len(instances(moto, **{"tag:cei:node_id": "n-token"})) == 1
    # the token returns its VM whatever its state (decision D6)
    moto.boto3().terminate_instances(InstanceIds=[first.iaas_id])
    assert worker.create(p).iaas_id == first.iaas_id
    assert len(instances(moto, **{"tag:cei:node_id": "n-token"})) == 1
    # another token for the same node is another VM
    other = worker.create({**p, "client_token": "cei-tok-other"})
    assert other.iaas_id != first.iaas_id


def test_a_listing_sees_this_systems_vms_only(moto):
    worker = CloudWorker(credentials_key=KEY)
    ours = worker.create(payload(moto, "n-ours"))
    theirs = worker.create(payload(moto, "n-theirs", system="other-"))
    untagged = moto.boto3().run_instances(ImageId=moto.image_id(), MinCount=1, MaxCount=1,
                                          InstanceType="t2.micro")["Instances"][0]["InstanceId"]
    seen = {v["iaas_id"] for v in worker.list({**payload(moto, "x"), "seq": 1}).vms}
    assert ours.iaas_id in seen
    assert theirs.iaas_id not in seen and untagged not in seen


def test_api_errors_become_failure_reasons(moto):
    worker = CloudWorker(credentials_key=KEY)
    bad_image = worker.create(payload(moto, "n-badami", image="ami-00000000deadbeef"))
    assert bad_image.iaas_id is None and bad_image.error_kind == "other"
    assert _failure(bad_image.error_kind, bad_image.error).startswith(
        "IAAS_PROBLEM: InvalidAMIID.NotFound")
    bad_size = worker.create(payload(moto, "n-badsize", size="x9.nonexistent"))
    assert bad_size.error_kind == "other" and "InvalidInstanceType" in bad_size.error
    assert instances(moto, **{"tag:cei:node_id": "n-badami"}) == []

    missing = worker.destroy({**payload(moto, "x"), "iaas_id": "i-0123456789abcdef0"})
    assert missing.error_kind == "not_found"
    partial = worker.list({**payload(moto, "x"), "seq": 0, "node_ids": ["i-0123456789abcdef0"]})
    assert partial.error_kind == "not_found" and partial.partial

    down = MotoServer()
    dead = worker.list({**payload(moto, "x"), "seq": 1,
                        "definition": validate_site(down.site())})  # nobody listens there
    assert dead.error_kind in ("other", "timeout") and dead.error


def test_bad_credentials_are_iaas_auth():
    with MotoServer() as moto:
        good = moto.make_user()
        image = moto.image_id()
        moto.require_auth()  # from now on only the IAM user's keys work
        worker = CloudWorker(credentials_key=KEY)
        made = worker.create(payload(moto, "n-auth", image=image, creds=good))
        assert made.error_kind is None, made.error
        wrong = {"access_key": good["access_key"], "secret_key": "not-the-secret"}
        for creds in (wrong, {"access_key": "AKIAUNKNOWNKEY000000", "secret_key": "x"}):
            refused = worker.create(payload(moto, "n-auth2", image=image, creds=creds))
            assert refused.error_kind == "auth", refused.error
            assert _failure(refused.error_kind, refused.error).startswith("IAAS_AUTH: AuthFailure")
            listed = worker.list({**payload(moto, "x", image=image, creds=creds), "seq": 1})
            assert listed.error_kind == "auth"


def test_an_answer_that_names_no_vm_is_a_failure_not_a_crash(moto):
    """libcloud's own response class cannot read moto's namespace: it finds no VM."""
    from libcloud.compute.drivers.ec2 import EC2Connection

    class Unreadable(CEIEC2NodeDriver):
        connectionCls = EC2Connection  # libcloud's: no namespace fix

    def factory(site, creds):
        return ec2_driver(validate_site(site), creds["access_key"], creds["secret_key"],
                          cls=Unreadable)

    worker = CloudWorker(credentials_key=KEY, driver_factory=factory)
    result = worker.create(payload(moto, "n-unreadable"))
    assert result.iaas_id is None and result.error_kind == "other"
    assert "named no VM" in result.error
