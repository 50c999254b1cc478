"""Credentials at rest (issue 12 §6): sealed in the log with the operator's key, masked in
every answer and in ``cei log`` output, usable by a standby that holds the same key, and old
logs with clear credentials still replay."""

from __future__ import annotations

import random
import uuid
from pathlib import Path
from typing import Any

import pytest
from provisioner_harness import KEY, KEY_BYTES, FakeClock, Harness

from cei_actors.eventlog import open_log
from cei_actors.eventlog.records import PendingEvent
from cei_actors.private_files import SecretFileError, write_secret_file
from cei_actors.provisioner import events as ev
from cei_actors.provisioner.cloud import CloudWorker
from cei_actors.provisioner.drivers import driver_for_site
from cei_actors.provisioner.messages import (
    AddCredentials,
    AddSite,
    DescribeCredentials,
    ListCredentials,
    QuerySites,
    UpdateCredentials,
)
from cei_actors.provisioner.sealing import CredentialsKey, open_entry
from cei_actors.runtime.runner import fold

SECRET = "SK-8f3e1d0c-very-secret"
ACCESS = "AKIA-0123456789-access"
CREDS = {"access_key": ACCESS, "secret_key": SECRET, "key_name": "mykey"}
EC2 = {"type": "ec2", "region": "us-west-2"}


def raw_text(h: Harness) -> str:
    """Every stored record of the provisioner stream (bodies in full) as one string."""
    return repr(list(h.runner.log.read("provisioner")))


def recording_worker(seen: list[Any], key: CredentialsKey | None, clock: FakeClock) -> CloudWorker:
    """A worker whose 'ec2' driver is a simulated cloud; it records the credentials it got."""

    def factory(site: Any, creds: Any) -> Any:
        seen.append(creds)
        return driver_for_site({"type": "sim", "seed": 1}, None, clock=clock,
                               rng=random.Random(1))

    return CloudWorker(clock=clock, driver_factory=factory, credentials_key=key)


def list_ec2(h: Harness) -> Any:
    """Have the core list every account; run the ec2 listing; its ListResult."""
    h.handle(QuerySites())
    work = next(w for w in h.work if w.kind == "list" and "ec2" in w.payload["account"])
    h.work.remove(work)
    return h.perform(work)


def test_credentials_are_sealed_in_the_log_and_masked_in_answers() -> None:
    h = Harness()
    h.ok(AddSite("ec2", EC2))
    h.ok(AddCredentials("ec2", CREDS, caller="alice"))
    shown = h.ok(DescribeCredentials("ec2", caller="alice"))
    assert shown == {"access_key": f"****{KEY.fingerprint(ACCESS)}",
                     "secret_key": f"****{KEY.fingerprint(SECRET)}", "key_name": "mykey"}
    assert h.ok(ListCredentials(caller="alice")) == ["ec2"]
    text = raw_text(h)
    assert "CredentialsSaved" in text and SECRET not in text and ACCESS not in text
    entry = h.state.registry.credentials["alice"]["site:ec2"]
    assert SECRET not in repr(entry) and open_entry(entry, KEY) == CREDS
    assert h.replayed() == h.state
    # an update with the same values writes nothing; a real change is sealed again
    head = h.runner.head
    h.ok(UpdateCredentials("ec2", dict(CREDS), caller="alice"))
    assert h.runner.head == head
    h.ok(UpdateCredentials("ec2", {**CREDS, "secret_key": SECRET + "2"}, caller="alice"))
    assert h.runner.head == head + 1 and SECRET not in raw_text(h)


def test_log_show_and_state_redaction_hides_tokens_and_clear_values() -> None:
    h = Harness()
    h.ok(AddSite("ec2", EC2))
    h.ok(AddCredentials("ec2", CREDS, caller="alice"))
    core = h.core
    records = list(h.runner.log.read("provisioner"))
    shown = [core.redact_event(r.type, r.body) for r in records]
    assert SECRET not in repr(shown) and "gAAAA" not in repr(shown)  # no Fernet token either
    snap = core.redact_snapshot(core.snapshot(fold(core, records)))
    assert SECRET not in repr(snap) and "gAAAA" not in repr(snap)
    assert snap["registry"]["credentials"]["alice"]["site:ec2"]["key_id"] == KEY.key_id


def test_without_a_key_credentials_are_refused() -> None:
    h = Harness(credentials_key=None)
    h.ok(AddSite("ec2", EC2))
    err = h.error(AddCredentials("ec2", CREDS, caller="alice"))
    assert err.code == "bad_request" and "credentials_key_file" in err.message


def test_a_standby_with_the_same_key_uses_the_credentials_another_key_cannot(tmp_path: Path) -> None:
    """Multi-host: a standby elsewhere recovers from the log and opens the credentials with
    its copy of the operator's key file; one with another key gets a clear error."""
    url = f"memory://{uuid.uuid4().hex}"
    clock = FakeClock()
    first = Harness(url=url, clock=clock)
    first.ok(AddSite("ec2", EC2))
    first.ok(AddCredentials("ec2", CREDS))
    copy = tmp_path / "credentials.key"  # the operator copied the key file to this host
    write_secret_file(copy, KEY_BYTES)
    seen: list[Any] = []
    standby = Harness(url=url, clock=clock,
                      worker=recording_worker(seen, CredentialsKey.load(copy), clock))
    assert standby.core.credentials_key is not None
    result = list_ec2(standby)
    assert result.error_kind is None and seen == [CREDS]
    other: list[Any] = []
    stranger = Harness(url=url, clock=clock, worker=recording_worker(
        other, CredentialsKey(CredentialsKey.generate()), clock))
    result = list_ec2(stranger)
    assert result.error_kind == "other" and "sealed with key" in result.error and other == []


def test_old_logs_with_clear_credentials_replay_and_are_sealed_on_the_next_save() -> None:
    url = f"memory://{uuid.uuid4().hex}"
    with open_log(url) as log:
        fence = log.acquire("provisioner")
        site = ev.events.to_pending(ev.SiteSaved("", "ec2", EC2, 1.0), 1.0)
        v1 = PendingEvent("CredentialsSaved", 1, 2.0, {
            "owner": "", "site": "ec2", "credential_type": "site", "credentials": dict(CREDS),
            "at": 2.0})
        log.append(fence, 0, [site, v1])
        seen: list[Any] = []
        clock = FakeClock()
        h = Harness(url=url, clock=clock, worker=recording_worker(seen, KEY, clock))
        shown = h.ok(DescribeCredentials("ec2"))
        assert shown["key_name"] == "mykey" and SECRET not in repr(shown)
        assert shown["secret_key"].startswith("****")
        assert SECRET not in repr(h.core.redact_event("CredentialsSaved", v1.body))
        snap = h.core.redact_snapshot(h.core.snapshot(h.state))
        assert SECRET not in repr(snap) and snap["registry"]["credentials"][""]["site:ec2"]["sealed"] is False
        assert list_ec2(h).error_kind is None and seen == [CREDS]  # still usable
        h.ok(UpdateCredentials("ec2", dict(CREDS)))  # the same values: sealed now
        entry = h.state.registry.credentials[""]["site:ec2"]
        assert "clear" not in entry and open_entry(entry, KEY) == CREDS
        assert h.replayed() == h.state


def test_the_actor_refuses_a_key_file_others_can_read(tmp_path: Path) -> None:
    path = tmp_path / "k"
    path.write_bytes(KEY_BYTES)
    path.chmod(0o644)
    with pytest.raises(SecretFileError, match="chmod 600"):
        CredentialsKey.load(path)
    path.chmod(0o600)
    assert CredentialsKey.load(path).key_id == KEY.key_id
    path.write_bytes(b"not a key")
    with pytest.raises(SecretFileError, match="not a credentials key"):
        CredentialsKey.load(path)


def test_cli_credentials_are_never_in_clear_on_disk_or_in_any_output(tmp_path: Path) -> None:
    """A real system: `cei credentials add`, then the secret is in no answer (CLI, Python
    client, `cei log show/state`) and not in the raw bytes of the SQLite log and its WAL."""
    import json
    import stat

    import yaml
    from test_cli_e2e import cei, cleanup

    from cei_actors.launch.launcher import connect

    home = tmp_path / "cei"
    try:
        cei(home, "up")
        assert stat.S_IMODE((home / "credentials.key").stat().st_mode) == 0o600
        site, creds = tmp_path / "site.yml", tmp_path / "creds.yml"
        site.write_text(yaml.safe_dump(EC2))
        creds.write_text(yaml.safe_dump(CREDS))
        cei(home, "site", "add", "ec2", "--definition", str(site))
        outputs = [cei(home, "credentials", "add", "ec2", "--definition", str(creds)).stdout]
        described = cei(home, "credentials", "describe", "ec2").stdout
        assert json.loads(described)["secret_key"].startswith("****")
        outputs.append(described)
        with connect(home) as conn:
            outputs.append(repr(conn.provisioner.describe_credentials("ec2")))
        for argv in (("show", "provisioner"), ("state", "provisioner")):
            shown = cei(home, "log", *argv).stdout
            assert "****" in shown and "gAAAA" not in shown  # masked; no Fernet token either
            outputs.append(shown)
        for text in outputs:
            assert SECRET not in text and ACCESS not in text, text
        raw = b"".join(p.read_bytes() for p in sorted(home.glob("log.sqlite*")))
        assert b"CredentialsSaved" in raw
        assert SECRET.encode() not in raw and ACCESS.encode() not in raw
    finally:
        cleanup(home)
