"""The crash-point facility (runtime/faults.py): parsing and arming, and a real actor process
ended at each shell point, its successor replaying exactly what was appended before it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from waiting import wait_for

from cei_actors.eventlog import open_log
from cei_actors.runtime import faults
from cei_actors.runtime.client import BadRequest, OutcomeUnknown, ServiceClient
from cei_actors.runtime.control import Start, Status, Stop
from cei_actors.runtime.example import Add, Counters, Dump
from cei_actors.runtime.example_actor import AddLater
from cei_actors.runtime.runner import replay
from cei_actors.runtime.system import lookup, start_actor

ACTOR = "cei_actors.runtime.example_actor.ExampleActor"


def alive(pid: int) -> bool:
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return raw[raw.rindex(b")") + 2:][:1] not in (b"Z", b"X")


@pytest.fixture(autouse=True)
def disarmed():
    faults.arm("", "")
    yield
    faults.arm("", "")


def test_parse_and_arm_per_stream(monkeypatch):
    assert faults.parse("pd:after_append:0.5, after_work.create:1") == [
        ("pd", "after_append", 0.5), (None, "after_work.create", 1.0)]
    for bad, why in [("after_append", "expected"), ("pd:after_append:x", "not a number"),
                     ("after_append:1.5", "within"), ("a:b:c:0.1", "expected"), ("pd::0.1", "expected")]:
        with pytest.raises(ValueError, match=why):
            faults.arm(bad, "pd")
        assert faults.armed() == {}  # a bad spec arms nothing
    assert faults.arm("pd:after_append:0.5,epum:after_effects:1,after_work:0.25", "pd") == {
        "after_append": 0.5, "after_work": 0.25}
    monkeypatch.setenv(faults.ENV, "provisioner:after_work.create:0.3")
    assert faults.arm(None, "provisioner") == {"after_work.create": 0.3}
    assert faults.arm(None, "pd") == {}
    assert faults.arm("", "provisioner") == {}  # the config's key wins over the environment


def test_a_point_fires_by_name_or_detail_and_never_when_unarmed(tmp_path):
    code = (
        "import sys; from cei_actors.runtime import faults as f\n"
        "f.crash_point('after_append'); f.crash_point('after_work', 'list')\n"
        "f.arm(sys.argv[1], 'provisioner')\n"
        "f.crash_point('after_effects'); f.crash_point('after_work', 'list')\n"
        "print('survived', flush=True); f.crash_point('after_work', 'create')\n"
        "print('not reached')\n"
    )
    run = subprocess.run([sys.executable, "-c", code, "after_work.create:1,after_effects:0"],
                         capture_output=True, text=True, timeout=30)
    assert run.returncode == faults.EXIT_CODE
    assert run.stdout == "survived\n"
    assert f"cei crash point after_work.create fired (pid {run.stderr.split('pid ')[1]}" in run.stderr
    run = subprocess.run([sys.executable, "-c", code, "after_work:1"], capture_output=True, text=True,
                         timeout=30)
    assert (run.returncode, run.stdout) == (faults.EXIT_CODE, "")  # 'after_work' matches every kind


def crash_at(tcp_system, tmp_path, point: str, message) -> tuple[dict, int]:
    """An example actor armed with ``point`` (probability 1): two adds, then ``message`` ends
    its process; a successor under the same name replays the log. Returns (its Dump, head)."""
    url = f"sqlite:///{tmp_path}/log.db"
    name = f"crash-{point}"
    first = start_actor(tcp_system, ACTOR, Start(url), global_name=name)
    with ServiceClient(tcp_system, first, timeout=10) as client:
        client.call(Add("a", 1))
        client.call(Add("a", 2))
        pid = client.call(Status())["pid"]
        client.call(Stop())
    wait_for(lambda: not alive(pid), what="the first actor to stop")
    wait_for(lambda: lookup(tcp_system, name) is None, what="the name to be freed")
    armed = start_actor(tcp_system, ACTOR, Start(url, config={"crash_at": f"example:{point}:1"}),
                        global_name=name)
    with ServiceClient(tcp_system, armed, timeout=5) as client:
        pid = client.call(Status())["pid"]
        try:
            client.call(message)
            answered = True
        except OutcomeUnknown:
            answered = False
        if point == "after_append":
            assert not answered  # the crash came before the reply
    wait_for(lambda: not alive(pid), what="the armed actor to die")
    wait_for(lambda: lookup(tcp_system, name) is None, what="the name to be freed")
    second = start_actor(tcp_system, ACTOR, Start(url), global_name=name)
    with ServiceClient(tcp_system, second, timeout=10) as client:
        dump, head = client.call(Dump()), client.call(Status())["head"]
        client.call(Stop())
    with open_log(url) as log:
        assert replay(Counters(), log, "example").counters == dump["counters"]
    return dump, head


def test_after_work_the_result_is_lost_and_nothing_recorded(tcp_system, tmp_path):
    dump, head = crash_at(tcp_system, tmp_path, "after_work.add", AddLater("a", 10))
    assert dump["counters"] == {"a": 3} and head == 2


def test_after_append_the_event_is_kept_though_never_acknowledged(tcp_system, tmp_path):
    dump, head = crash_at(tcp_system, tmp_path, "after_append", Add("a", 10))
    assert dump["counters"] == {"a": 13} and head == 3


def test_after_effects_the_event_is_kept(tcp_system, tmp_path):
    dump, head = crash_at(tcp_system, tmp_path, "after_effects", Add("a", 10))
    assert dump["counters"] == {"a": 13} and head == 3


def test_a_bad_spec_refuses_start(tcp_system, tmp_path):
    with pytest.raises(BadRequest, match="crash point"):
        start_actor(tcp_system, ACTOR, Start(f"sqlite:///{tmp_path}/log.db",
                                             config={"crash_at": "after_append:2"}))
    assert os.environ.get(faults.ENV) is None
