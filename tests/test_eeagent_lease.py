"""The agent's side of the PD lease, pure (decision PD9)."""

from __future__ import annotations

import pytest

from cei_actors.eeagent.lease import AgentLease


def test_a_grant_runs_from_when_the_heartbeat_was_sent():
    lease = AgentLease.start(10.0, now=100.0)
    assert lease.until == 110.0 and not lease.expired(109.99) and lease.expired(110.0)
    s1 = lease.sending(105.0)
    s2 = lease.sending(106.0)
    assert lease.granted(s2, 10.0) and lease.until == 116.0
    s3 = lease.sending(107.0)
    assert lease.granted(s3, 2.0) and lease.until == 116.0  # never shortened
    assert not lease.granted(s1, 10.0)  # older than a grant already taken: forgotten
    assert lease.until == 116.0


def test_the_first_grant_replaces_the_agents_guess_later_ones_only_extend():
    lease = AgentLease.start(30.0, now=0.0)
    s = lease.sending(1.0)
    assert lease.granted(s, 5.0)
    assert lease.fence == 5.0 and lease.until == 6.0  # the PD's fence, not our 30 s
    assert lease.renew_every() == 1.25
    s1, s2 = lease.sending(4.0), lease.sending(5.0)
    assert lease.granted(s2, 5.0) and lease.until == 10.0
    assert not lease.granted(s1, 5.0) and lease.until == 10.0


def test_unknown_grants_and_bad_fences():
    lease = AgentLease.start(10.0, now=0.0)
    assert not lease.granted(7, 10.0) and lease.until == 10.0
    with pytest.raises(ValueError):
        AgentLease.start(0.0, now=0.0)
