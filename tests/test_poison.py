"""Poison requests (issue 12 §1, §2): content that cannot be stored is refused, never written.

A request holding something that does not read back equal (a tuple map key, an int over
msgpack's range, a set, NaN) or too large a field gets ``bad_request`` naming the field; the
leader keeps leading (same epoch), nothing is appended, the log replays and a restart recovers.
Checked on a real PD actor (thespian TCP base) on SQLite and on a real ZooKeeper, and as a
hypothesis property over every message type of every component (pure runners, memory logs).
"""

from __future__ import annotations

import collections
import dataclasses
import random
import types
import typing
import uuid
from typing import Any, get_args, get_origin, get_type_hints

import pytest
from epum_harness import definition
from hypothesis import HealthCheck, given, settings
from hypothesis import example as hypothesis_example
from hypothesis import strategies as st
from pd_harness import Sim
from pd_harness import config as pd_sim_config
from pd_system import CallError, PDSystem, pd_config
from provisioner_harness import DT, SIM_SITE, make_core

import cei_actors.eeagent.messages as eeagent_messages
import cei_actors.epum.messages as epum_messages
import cei_actors.ha.messages as ha_messages
import cei_actors.pd.messages as pd_messages
import cei_actors.provisioner.messages as provisioner_messages
import cei_actors.runtime.example as example
import cei_actors.runtime.example_actor as example_actor
from cei_actors.eeagent.messages import AgentHeartbeat
from cei_actors.epum.logic import EPUM
from cei_actors.epum.messages import AddDomain, AddDomainDefinition, NodeState
from cei_actors.eventlog import codec, open_log
from cei_actors.eventlog.batch import MAX_EVENT_BYTES
from cei_actors.ha.logic import HA
from cei_actors.ha.messages import CreateGroup, HAPass
from cei_actors.pd.logic import ProcessDispatcher
from cei_actors.pd.messages import CreateDefinition, DescribeProcess, ScheduleProcess
from cei_actors.provisioner.messages import AddDeployableType, AddSite, Provision
from cei_actors.runtime.control import Status
from cei_actors.runtime.messages import MAX_REQUEST_BYTES, ErrorReply, Message, Ok
from cei_actors.runtime.runner import Runner, replay

# ---- the reproductions, against a real PD actor ------------------------------------------------

#: (upid, ScheduleProcess keyword arguments, what the bad_request must say)
POISON = [
    ("tuple-key", {"configuration": {(1, 2): "v"}}, "ScheduleProcess.configuration[(1, 2)]: a map key of type tuple"),
    ("huge-int", {"configuration": {"k": 2**70}}, "ScheduleProcess.configuration['k']: int 1180591620717411303424 is out of msgpack's range"),
    ("set", {"configuration": {"k": {1, 2}}}, "ScheduleProcess.configuration['k']: a set is not msgpack data"),
    ("nan", {"configuration": {"k": float("nan")}}, "ScheduleProcess.configuration['k']: NaN"),
    ("surrogate", {"command": ["echo", "\ud800"]}, "ScheduleProcess.command[1]: str is not valid UTF-8"),
    ("3mb", {"command": ["echo", "x" * (3 << 20)]}, "ScheduleProcess.command: 3145739 bytes encoded"),
]


def _status(system: PDSystem) -> dict[str, Any]:
    return system.asys.ask(system.pd, Status(), 10).value


def _poison_survives(log_url: str, workdir: str) -> None:
    conf = pd_config()
    system = PDSystem(log_url, workdir, conf)
    try:
        c = system.client
        c.schedule_process("before", command=["true"])
        st0 = _status(system)
        for upid, kw, says in POISON:
            with pytest.raises(CallError) as info:
                c.schedule_process(upid, **{"command": ["true"], **kw})
            reply = info.value.reply
            assert reply.code == "bad_request", reply
            assert says in reply.message, reply.message
            st1 = _status(system)
            assert (st1["mode"], st1["leader"], st1["epoch"], st1["head"]) == (
                "ready", True, st0["epoch"], st0["head"],
            ), (upid, st1)
        assert "limit of 262144 bytes" in info.value.reply.message  # the 3 MB one names the limit
        c.schedule_process("after", command=["true"])
        assert _status(system)["epoch"] == st0["epoch"]
    finally:
        system.close()
    with open_log(log_url) as log:
        replayed = replay(ProcessDispatcher(conf), log, "pd")  # decodes every record
    assert set(replayed.processes) == {"before", "after"}
    again = PDSystem(log_url, workdir, conf)  # a restart recovers
    try:
        assert again.client.describe_process("after")["upid"] == "after"
        with pytest.raises(CallError, match="no process 'tuple-key'"):
            again.client.describe_process("tuple-key")
    finally:
        again.close()


def test_poison_requests_are_refused_and_the_pd_keeps_leading_sqlite(tmp_path):
    _poison_survives(f"sqlite:///{tmp_path}/log.sqlite", str(tmp_path))


def test_poison_requests_are_refused_and_the_pd_keeps_leading_zookeeper(zk_hosts, tmp_path):
    _poison_survives(f"zk://{zk_hosts}", str(tmp_path))


# ---- the last line: an event that would not read back is never written -------------------------


def test_pd_event_over_the_limit_is_refused_and_the_state_rebuilt(monkeypatch):
    """The PD applies events inside decide (PD1): a refused decision rebuilds its state from
    the log under the same fence; the batch's other messages are kept."""
    sim = Sim(pd_sim_config())
    sim.add_node("n1")
    sim.ok(ScheduleProcess("small", command=["true"]))
    epoch, head = sim.runner.fence.epoch, sim.runner.head
    monkeypatch.setattr(codec, "MAX_EVENT_BYTES", 4096)
    decisions = sim.runner.handle_many(
        [
            ScheduleProcess("ok1", command=["true"]),
            ScheduleProcess("big", command=["echo", "x" * 5000]),
            ScheduleProcess("ok2", command=["true"]),
        ]
    )
    replies = [d.reply for d in decisions]
    assert isinstance(replies[0], Ok) and isinstance(replies[2], Ok), replies
    assert replies[1].code == "bad_request" and "over the limit of 4096 bytes" in replies[1].message
    assert "its field spec" in replies[1].message or "field" in replies[1].message
    assert sim.runner.ready and sim.runner.fence.epoch == epoch and sim.runner.head > head
    assert "big" not in sim.state.processes
    assert {"small", "ok1", "ok2"} <= set(sim.state.processes)
    monkeypatch.undo()
    assert sim.replayed().to_data() == sim.state.to_data()
    assert sim.err(DescribeProcess("big")).code == "not_found"
    sim.crash()
    assert {"small", "ok1", "ok2"} <= set(sim.state.processes)


def test_limits_are_documented_figures():
    assert MAX_REQUEST_BYTES == 256 * 1024 and MAX_EVENT_BYTES == 512 * 1024
    assert MAX_REQUEST_BYTES <= MAX_EVENT_BYTES // 2


# ---- the fuzz: every message type of every component ---------------------------------------


def _messages_of(*modules: Any) -> list[type]:
    out = []
    for mod in modules:
        for value in vars(mod).values():
            if (
                isinstance(value, type)
                and issubclass(value, Message)
                and value.__module__ == mod.__name__
                and dataclasses.is_dataclass(value)
            ):
                out.append(value)
    return sorted(out, key=lambda c: (c.__module__, c.__name__))


IDS = ["p1", "p2", "d1", "n1", "n1-a0", "e1", "pd_domain_e1", "d", "def", "sim1", "dt1", "a", "pd", "x"]
STATES = ["RUNNING", "PENDING", "TERMINATED", "FAILED", "EXITED", "500-RUNNING", "REQUESTED"]
DEEP: Any = []
for _ in range(600):
    DEEP = [DEEP]
SPECIAL = [DEEP, "y" * (300 * 1024), {1, 2}, frozenset({"a"}), (1, 2), object(), b"\x00\xff", 2**64, -(2**63) - 1]
#: Maps that look honest but one value or key does not read back equal.
POISON_MAPS = [
    {(1, 2): "v"}, {"k": 2**70}, {"k": {1, 2}}, {"k": float("nan")}, {"k": "\ud800"}, {"k": (1, 2)},
    {"k": DEEP}, {"process": {"minimum_time_between_starts": float("nan")}}, {"exec": "true", "argv": ("a",)},
]

plain_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 100),
    st.floats(allow_nan=False, allow_infinity=False, width=32),
    st.sampled_from(IDS + STATES),
    st.text(max_size=6),
)
hostile_scalars = st.one_of(
    plain_scalars,
    st.sampled_from([2**63, 2**64 - 1, 2**64, -(2**63), -(2**63) - 1, 2**70]),
    st.floats(),  # NaN and infinities included
    st.sampled_from(["\ud800", "é", ""]),
    st.binary(max_size=4),
)


def _data(scalars: st.SearchStrategy[Any], hostile: bool) -> st.SearchStrategy[Any]:
    keys = st.one_of(st.sampled_from(IDS + ["process", "engine", "k"]), st.text(max_size=4))
    if hostile:
        keys = keys | st.integers(-2, 2) | st.tuples(st.integers(0, 2), st.integers(0, 2)) | st.none() | st.floats()
    procs = st.fixed_dictionaries(
        {"upid": st.sampled_from(IDS), "round": st.integers(-1 if hostile else 0, 2), "state": st.sampled_from(STATES)},
        optional={"msg": scalars},
    )

    def extend(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
        both = st.one_of(st.lists(inner, max_size=3), st.dictionaries(keys, inner, max_size=3))
        if hostile:
            both = both | st.tuples(inner, inner) | st.frozensets(st.integers(0, 3), max_size=2)
        return both

    tree = st.recursive(st.one_of(scalars, procs), extend, max_leaves=8)
    return tree | st.sampled_from(SPECIAL) | st.sampled_from(POISON_MAPS) if hostile else tree


DATA = {False: _data(plain_scalars, False), True: _data(hostile_scalars, True)}


def _typed(hint: Any, hostile: bool) -> st.SearchStrategy[Any]:  # noqa: PLR0911, PLR0912
    """Values for ``hint``; ``hostile`` adds what a careless or malicious sender could put there."""
    data = DATA[hostile]
    if hint is Any or hint is object:
        return data
    origin, args = get_origin(hint), get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return st.one_of(*[_typed(a, hostile) for a in args])
    if hint is type(None) or hint is None:
        return st.none()
    if origin is typing.Literal:
        return st.sampled_from(args)
    if hint is bool:
        return st.booleans()
    if hint is int:
        ints = st.integers(-2, 50)
        return ints | st.sampled_from([2**64, -(2**63) - 1, 2**70]) if hostile else ints
    if hint is float:
        floats = st.one_of(st.integers(0, 100).map(float), st.just(1000.0))
        return floats | st.floats() if hostile else floats
    if hint is str:
        strs = st.one_of(st.sampled_from(IDS + STATES), st.text(max_size=8))
        return strs | st.sampled_from(["\udcff", "z" * (300 * 1024)]) if hostile else strs
    if hint is bytes:
        return st.binary(max_size=8)
    if hint in (list, tuple, set, frozenset) or origin in (list, tuple, set, frozenset):
        kind = origin or hint
        if kind is tuple and args and args[-1] is not Ellipsis:
            return st.tuples(*[_typed(a, hostile) for a in args])
        item = _typed(args[0], hostile) if args else data
        items = st.lists(item, max_size=3)
        return items.map(kind) if kind is not list else items
    if hint is dict or origin is dict:
        if not args:
            return st.dictionaries(st.sampled_from(IDS + ["process", "engine", "k"]), data, max_size=3) | data.filter(
                lambda v: isinstance(v, dict)
            )
        return st.dictionaries(_typed(args[0], hostile), _typed(args[1], hostile), max_size=3)
    if isinstance(hint, type) and issubclass(hint, Message):
        return st.deferred(lambda: message_of(hint, hostile))
    return data


#: Honest values for fields whose checks want one of a few (by field name), so that honest
#: and poisoned messages get past the checks and into the components' decisions.
FIELD_VALUES: dict[str, list[Any]] = {
    "queueing_mode": ["ALWAYS", "NEVER", "START_ONLY", "RESTART_ONLY"],
    "restart_mode": ["NEVER", "ALWAYS", "ABNORMAL"],
    "definition_type": ["supd"],
    "definition_id": ["d1", "def", None],
    "execution_engine_id": ["e1"],
    "command": [["true"], ["sleep", "1"]],
    "executable": [{"exec": "true"}, {"exec": "sleep", "argv": ["1"]}],
    "upid": ["p1", "p2", "p3"],
    "state": STATES,
    "domain_id": ["d", "pd_domain_e1"],
    "node_id": ["n1", "n2"],
    "eeagent_id": ["n1-a0", "n2-a0"],
    "site": ["sim1"],
    "deployable_type": ["dt1"],
    # HA: groups, policies and what they run
    "name": ["g1", "g2"],
    "policy": ["npreserving", "sensor"],
    "parameters": [{"preserve_n": 1}, {"preserve_n": 3}, {"preserve_n": 0},
                   {"minimum_processes": 1, "maximum_processes": 3, "metric": "load",
                    "scale_up_threshold": 2.0, "scale_down_threshold": 0.5}],
    "process": [{"command": ["true"]}, {"command": ["sleep", "9"], "restart_mode": "NEVER"},
                {"definition_id": "d1", "constraints": {"site": "a"}}],
    "pd": ["pd"],
    "kind": ["describe", "counts", "schedule", "kill"],
}


def _honest(name: str, hint: Any) -> st.SearchStrategy[Any]:
    typed = _typed(hint, False)
    known = FIELD_VALUES.get(name)
    if not known:
        return typed
    return st.integers(0, 5).flatmap(lambda i: typed if i == 0 else st.sampled_from(known))


def _free_form(hint: Any) -> bool:
    """True if ``hint`` admits content of any shape somewhere (Any, a bare dict or list)."""
    if hint is Any or hint is object or hint in (dict, list, tuple, set, frozenset):
        return True
    return any(_free_form(a) for a in get_args(hint))


@st.composite
def message_of(draw: Any, cls: type, hostile: bool | None = None) -> Any:
    """A ``cls`` built from its type hints. Half are honest; the others are poisoned in one
    field (hostile values of its type: tuples, sets, NaN, huge ints, lone surrogates, deep or
    large data; free-form fields are chosen most often) and some also hold one field of any
    type, or miss one, as a hostile pickle could."""
    if hostile is None:
        hostile = draw(st.booleans())
    hints = get_type_hints(cls)
    fields = [f for f in dataclasses.fields(cls) if f.init]
    names = [f.name for f in fields]
    poisoned = wrong = missing = None
    if hostile and names:
        free = [n for n in names if _free_form(hints[n])]
        poisoned = draw(st.sampled_from(free * (4 * len(names)) + names))
        wrong = draw(st.sampled_from([None] * (6 * len(names)) + names))
        missing = draw(st.sampled_from([None] * (20 * len(names)) + names))
    values = {}
    for f in fields:
        optional = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        if f.name == wrong:
            values[f.name] = draw(DATA[True])
        elif f.name == poisoned:
            values[f.name] = draw(_typed(hints[f.name], True))
        elif optional and draw(st.integers(0, 3)) > (2 if f.name in FIELD_VALUES else 0):
            continue
        else:
            values[f.name] = draw(_honest(f.name, hints[f.name]))
    msg = cls(**values)
    if missing is not None:
        object.__delattr__(msg, missing)  # as a hostile pickle could leave it
    return msg


def _pd() -> Runner:
    r = Runner(ProcessDispatcher(pd_sim_config()), open_log(f"memory://{uuid.uuid4().hex}"),
               clock=lambda: 1000.0, rng=random.Random(1))
    r.recover()
    for m in [
        NodeState("n1", "pd_domain_e1", "RUNNING", {}),
        AgentHeartbeat("n1-a0", "n1", 1000.0, []),
        CreateDefinition("d1", {"exec": "true"}),
        ScheduleProcess("p1", command=["true"]),
    ]:
        assert isinstance(r.handle(m).reply, Ok | type(None)), m
    return r


def _epum() -> Runner:
    r = Runner(EPUM({"timers": False}), open_log(f"memory://{uuid.uuid4().hex}"),
               clock=lambda: 1000.0, rng=random.Random(1))
    r.recover()
    assert isinstance(r.handle(AddDomainDefinition("def", definition())).reply, Ok)
    assert isinstance(r.handle(AddDomain("d", "def", {"engine_conf": {"preserve_n": 1}}, subscriber="pd")).reply, Ok)
    return r


def _provisioner() -> Runner:
    r = Runner(make_core(), open_log(f"memory://{uuid.uuid4().hex}"), clock=lambda: 1000.0, rng=random.Random(1))
    r.recover()
    assert isinstance(r.handle(AddSite("sim1", dict(SIM_SITE))).reply, Ok)
    assert isinstance(r.handle(AddDeployableType("dt1", DT)).reply, Ok)
    return r


def _example() -> Runner:
    r = Runner(example_actor.ExampleCounters(), open_log(f"memory://{uuid.uuid4().hex}"),
               clock=lambda: 1000.0, rng=random.Random(1))
    r.recover()
    assert r.handle(example.Add("a", 1)).reply == Ok(1)
    return r


def _ha() -> Runner:
    r = Runner(HA({"pds": ["pd"], "timers": False}), open_log(f"memory://{uuid.uuid4().hex}"),
               clock=lambda: 1000.0, rng=random.Random(1))
    r.recover()
    group = CreateGroup("g1", "npreserving", {"preserve_n": 2}, {"command": ["sleep", "9"]})
    assert isinstance(r.handle(group).reply, Ok), group
    r.handle(HAPass())
    return r


#: component -> (a warmed-up runner, the messages it handles, every other message it may get)
COMPONENTS = {
    "pd": (_pd, [*_messages_of(pd_messages), AgentHeartbeat, NodeState], _messages_of(eeagent_messages, epum_messages)),
    "epum": (_epum, _messages_of(epum_messages), _messages_of(provisioner_messages)),
    "provisioner": (_provisioner, _messages_of(provisioner_messages), _messages_of(epum_messages)),
    "example": (_example, _messages_of(example, example_actor), _messages_of(pd_messages)),
    "ha": (_ha, _messages_of(ha_messages), _messages_of(pd_messages)),
}
COUNTS: collections.Counter[str] = collections.Counter()
INTERNAL: dict[str, str] = {}  # "internal" replies (decide raised on some input), one per kind


@pytest.fixture(scope="module", autouse=True)
def _report_counts() -> Any:
    yield
    if COUNTS:
        print("\nmessage fuzz:", ", ".join(f"{k}={v}" for k, v in sorted(COUNTS.items())))
        for line in INTERNAL:
            print("internal reply:", line)


def _fuzz_one(name: str, messages: list[Any]) -> None:
    make = COMPONENTS[name][0]
    runner = make()
    head = runner.head
    decisions = runner.handle_many(messages)  # nothing escapes
    assert runner.ready and len(decisions) == len(messages)
    COUNTS[f"{name}.examples"] += 1
    COUNTS[f"{name}.messages"] += len(messages)
    for d in decisions:
        code = d.reply.code if isinstance(d.reply, ErrorReply) else "ok"
        COUNTS[f"{name}.{code}"] += 1
        if code == "internal":
            INTERNAL.setdefault(f"{name}: {d.reply.request}: {d.reply.message}"[:160], "")
            # decide raising is a bug: bad input gets a clear error (the example's Crash is on purpose)
            assert d.reply.request == "Crash", d.reply
    COUNTS[f"{name}.events"] += runner.head - head
    component = runner.component
    replayed = replay(component, runner.log, runner.stream)  # every stored event decodes
    assert component.snapshot(replayed) == component.snapshot(runner.state)


#: Per component, a poison found by hand that its own checks let through before this fix (the
#: PD and EPUM wrote undecodable records; the Provisioner's and the example's append failed):
#: always tried first, so the property fails without the fix on every run.
KNOWN_POISON = {
    "pd": ScheduleProcess("p9", command=["true"], configuration={(1, 2): "v"}),
    "epum": AddDomainDefinition("def2", definition(engine_conf={"preserve_n": 1, "k": {(1, 2): 1}})),
    "provisioner": Provision("l1", "dt1", "sim1", ["n\udcff"]),
    "example": example.Add("b", 2**70),
    "ha": CreateGroup("g2", "npreserving", {"preserve_n": 1, (1, 2): 3}, {"command": ["true"]}),
}


def _fuzz_test(name: str, examples: int, slow: bool = False) -> Any:
    _, own, others = COMPONENTS[name]
    # where poison can hide: classes with a free-form field (Any, bare dict or list)
    free = [c for c in own if any(_free_form(h) for h in get_type_hints(c).values())] or own
    classes = st.one_of(st.sampled_from(own), st.sampled_from(free), st.sampled_from(others))
    strategy = st.lists(classes.flatmap(message_of), min_size=1, max_size=4)

    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(strategy)
    @hypothesis_example([KNOWN_POISON[name]])
    def test(messages: list[Any]) -> None:
        _fuzz_one(name, messages)

    test.__name__ = f"test_fuzz_{name}{'_long' if slow else ''}"
    return pytest.mark.slow(test) if slow else test


test_fuzz_pd = _fuzz_test("pd", 150)
test_fuzz_epum = _fuzz_test("epum", 100)
test_fuzz_provisioner = _fuzz_test("provisioner", 100)
test_fuzz_example = _fuzz_test("example", 60)
test_fuzz_ha = _fuzz_test("ha", 100)
test_fuzz_pd_long = _fuzz_test("pd", 3000, slow=True)
test_fuzz_epum_long = _fuzz_test("epum", 2000, slow=True)
test_fuzz_provisioner_long = _fuzz_test("provisioner", 2000, slow=True)
test_fuzz_example_long = _fuzz_test("example", 1000, slow=True)
test_fuzz_ha_long = _fuzz_test("ha", 2000, slow=True)
