"""Event types, schema versions, upcasting and the stored batch format."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cei_actors.eventlog import (
    CorruptLog,
    EventRegistry,
    NewerEventVersion,
    Record,
    UnknownEventType,
)
from cei_actors.eventlog.batch import decode_batch, encode_batch
from cei_actors.eventlog.records import PendingEvent

events = EventRegistry("test")


@events.register("NodeRequested", version=3)
@dataclass(frozen=True, slots=True)
class NodeRequested:
    node_id: str
    site: str
    count: int


@events.upcaster("NodeRequested", from_version=1)
def _v1(body):
    return {**body, "site": "default"}


@events.upcaster("NodeRequested", from_version=2)
def _v2(body):
    return {**body, "count": 1}


def rec(type_name: str, version: int, body: dict) -> Record:
    return Record("s", 7, type_name, version, 0.0, 1, body)


def test_round_trip():
    e = NodeRequested("n1", "ec2", 2)
    p = events.to_pending(e, 12.5)
    assert (p.type, p.version, p.timestamp) == ("NodeRequested", 3, 12.5)
    assert events.from_record(rec(p.type, p.version, p.body)) == e


def test_older_versions_are_upcast_step_by_step():
    assert events.from_record(rec("NodeRequested", 1, {"node_id": "n"})) == NodeRequested("n", "default", 1)
    assert events.from_record(rec("NodeRequested", 2, {"node_id": "n", "site": "x"})) == NodeRequested("n", "x", 1)


def test_unknown_and_newer_are_refused_naming_stream_and_offset():
    with pytest.raises(UnknownEventType, match="'s' at offset 7.*'Nope'"):
        events.from_record(rec("Nope", 1, {}))
    with pytest.raises(NewerEventVersion, match="'s' at offset 7"):
        events.from_record(rec("NodeRequested", 4, {}))
    with pytest.raises(CorruptLog, match="does not fit"):
        events.from_record(rec("NodeRequested", 3, {"node_id": "n", "bogus": 1}))


def test_unregistered_class_and_double_registration():
    with pytest.raises(TypeError):
        events.to_pending(object(), 0.0)
    with pytest.raises(ValueError):
        events.register("NodeRequested")(NodeRequested)


def test_batch_decode_checks_place_and_size():
    blob = encode_batch("s", 5, 2, [PendingEvent("T", 1, 0.0, {"a": 1})])
    records, end = decode_batch(blob, "s", 5)
    assert end and records[0].offset == 5 and records[0].epoch == 2
    with pytest.raises(CorruptLog, match="belongs to"):
        decode_batch(blob, "s", 6)
    with pytest.raises(CorruptLog, match="exceeds"):
        decode_batch(blob, "s", 5, max_bytes=10)
    with pytest.raises(CorruptLog, match="truncated"):
        decode_batch(b"CE", "s", 5)


bodies = st.dictionaries(
    st.text(max_size=8),
    st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1), st.text(max_size=20), st.binary(max_size=20)),
    max_size=5,
)


@given(st.lists(st.tuples(st.text(min_size=1, max_size=10), st.integers(1, 9), bodies), min_size=1, max_size=20))
def test_batch_round_trip_property(rows):
    pending = [PendingEvent(t, v, 1.5, b) for t, v, b in rows]
    records, _ = decode_batch(encode_batch("s", 1, 3, pending), "s", 1)
    assert [(r.type, r.version, r.body) for r in records] == [(p.type, p.version, p.body) for p in pending]
    assert [r.offset for r in records] == list(range(1, len(rows) + 1))


@given(st.binary(max_size=200))
def test_random_bytes_never_decode_silently(data):
    with pytest.raises(CorruptLog):
        decode_batch(data, "s", 1)


@pytest.mark.parametrize("n", [0, 1, 15, 16, 65535, 65536])
@pytest.mark.parametrize("group_end", [True, False])
def test_batch_bytes_are_msgpack_packers_own(n, group_end):
    """A batch's header is written by hand (no Packer per batch): the bytes are the ones
    msgpack's Packer writes, at every array header size."""
    import msgpack

    from cei_actors.eventlog.batch import _seal, encode_rows

    rows = [msgpack.packb(["T", 1, 0.5, {"i": i % 3}]) for i in range(n)]
    packer = msgpack.Packer(use_bin_type=True)
    head = (packer.pack_array_header(5) + packer.pack("st") + packer.pack(70_000) + packer.pack(3)
            + packer.pack(group_end) + packer.pack_array_header(n))
    assert encode_rows("st", 70_000, 3, rows, group_end) == _seal(b"CEB1", head + b"".join(rows))


def test_the_row_checked_is_the_row_stored():
    """``to_checked`` keeps the row it encoded and read back; a batch stores exactly it (no
    second encoding), and an event carrying recorded inputs is encoded with them."""
    import msgpack

    from cei_actors.eventlog.batch import encode_event

    e = NodeRequested("n1", "ec2", 2)
    p = events.to_checked(e, 12.5)
    assert p == events.to_pending(e, 12.5)  # the row is not part of the event's identity
    assert p.row == msgpack.packb(["NodeRequested", 3, 12.5, {"node_id": "n1", "site": "ec2", "count": 2}])
    assert encode_event(p) is p.row
    records, _ = decode_batch(encode_batch("s", 1, 1, [p]), "s", 1)
    assert events.from_record(records[0]) == e
    with_input = PendingEvent(p.type, p.version, p.timestamp, p.body, [b"x"])
    assert msgpack.unpackb(encode_event(with_input))[4] == [b"x"]


@dataclass(frozen=True, slots=True)
class _Loose:
    items: object
    when: float


events.register("Loose")(_Loose)


@pytest.mark.parametrize("value, why", [
    ((1, 2), "a tuple reads back as a list"),
    ({1, 2}, "a set is not msgpack data"),
    (float("nan"), "NaN never reads back equal"),
    ([object()], "object is not plain data"),
    (2**64, "out of msgpack's range"),
])
def test_to_checked_refuses_what_would_not_read_back_equal(value, why):
    from cei_actors.eventlog import UnstorableEvent

    with pytest.raises(UnstorableEvent, match=why):
        events.to_checked(_Loose(value, 1.0), 0.0)
    assert events.to_checked(_Loose([1, 2], 1.0), 0.0).row is not None


# ---- RT1: the read-back check compares bodies for plain dataclasses -------------------------


@dataclass(frozen=True, slots=True)
class _Tupled:  # normalizes in __post_init__: a list field reads back equal as a tuple
    items: object

    def __post_init__(self):
        if isinstance(self.items, list):
            object.__setattr__(self, "items", tuple(self.items))


@dataclass(frozen=True)
class _LooseEq:  # equal whatever its value: anything that packs reads back "equal"
    items: object

    def __eq__(self, other):
        return isinstance(other, _LooseEq)

    __hash__ = object.__hash__


@dataclass(frozen=True, eq=False)
class _NoEq:  # identity: never reads back equal
    items: object


@dataclass(frozen=True)
class _Uncompared:  # a field the generated __eq__ does not compare
    items: object
    note: object = dataclasses.field(default=None, compare=False)


for _cls in (_Tupled, _LooseEq, _NoEq, _Uncompared):
    events.register(_cls.__name__)(_cls)


def _old_to_checked(event, ts):
    """What ``to_checked`` decided before RT1: build the event from the row read back and
    compare it with ``==``."""
    import msgpack

    from cei_actors.eventlog import UnstorableEvent

    body = {f.name: getattr(event, f.name) for f in dataclasses.fields(event)}
    try:
        row = msgpack.packb([events.type_name(event), 1, ts, body], use_bin_type=True)
    except Exception:
        raise UnstorableEvent("does not pack") from None
    try:
        same = type(event)(**msgpack.unpackb(row, raw=False, strict_map_key=False)[3]) == event
    except Exception:
        same = False
    if not same:
        raise UnstorableEvent("does not read back equal")


_VALUES = [1, -2, 2.5, float("inf"), float("nan"), "x", b"y", None, True, [1, [2]], (1, 2),
           {"a": (1,)}, {"a": [1, {"b": None}]}, {1: "int key"}, {(1, 2): "tuple key"}, {1, 2},
           2**64, [float("nan")], _Tupled([1]), "\ud800"]


@pytest.mark.parametrize("cls", [_Loose, _Tupled, _LooseEq, _NoEq, _Uncompared])
@pytest.mark.parametrize("value", _VALUES, ids=repr)
def test_to_checked_accepts_and_refuses_what_it_did_before_rt1(cls, value):
    """The plain dataclass path (body compared with the body read back) decides as building
    the event and comparing did, for plain classes and every other kind."""
    from cei_actors.eventlog import UnstorableEvent

    event = cls(value, 1.0) if cls is _Loose else cls(value)
    try:
        _old_to_checked(event, 0.0)
        expected = None
    except UnstorableEvent:
        expected = UnstorableEvent
    if expected is None:
        assert events.to_checked(event, 0.0).row is not None
    else:
        with pytest.raises(UnstorableEvent):
            events.to_checked(event, 0.0)


def test_only_dataclasses_built_and_compared_as_generated_take_the_body_comparison():
    from cei_actors.epum import events as epum_events
    from cei_actors.eventlog.codec import _plain_dataclass
    from cei_actors.pd import events as pd_events
    from cei_actors.provisioner import events as prov_events

    assert _plain_dataclass(_Loose) and _plain_dataclass(NodeRequested)
    assert not any(map(_plain_dataclass, (_Tupled, _LooseEq, _NoEq, _Uncompared)))
    for registry in (pd_events.events, epum_events.events, prov_events.events):  # the fast path is the one taken
        assert all(e.plain for e in registry._by_name.values()), registry.namespace


def test_packb_is_msgpacks_with_a_reused_packer():
    import msgpack

    from cei_actors.eventlog import batch

    values = [[1, "a", b"b", 2.5, None, {"k": [True]}], "x" * 70_000, {1: 2}, []]
    for value in values:
        assert batch.packb(value) == msgpack.packb(value, use_bin_type=True)
    packer = batch._PACKERS.packer
    for bad in ([1, {2}], [1, 2**70]):
        with pytest.raises((TypeError, OverflowError)):
            batch.packb(bad)
        assert batch.packb([1, 2]) == msgpack.packb([1, 2])  # nothing of the failed pack is left
    assert batch._PACKERS.packer is not packer  # a failed packer is replaced
    packer = batch._PACKERS.packer
    assert batch.packb(b"z" * (2 << 20)) == msgpack.packb(b"z" * (2 << 20))
    assert not hasattr(batch._PACKERS, "packer")  # a packer whose buffer grew that big is dropped


# ---- RT8: rows of scalars are not decoded, their round trip is exact --------------------------


class _Mode(str):  # a str subclass that reads back as a plain str, equal only to itself
    def __eq__(self, other):
        return other is self

    __hash__ = str.__hash__


class _Odd(float):
    pass


def _scalars():
    import enum

    class Level(enum.IntEnum):
        HIGH = 3

    return [0, -1, 2**64 - 1, 2**64, -(2**63), -(2**63) - 1, 0.0, -0.0, 1e308, float("inf"),
            float("-inf"), float("nan"), _Odd(1.5), _Odd("nan"), True, False, None, "", "é€😀",
            "\ud800", "a\0b", _Mode("x"), Level.HIGH, b"", [1], {"a": 1}]


@pytest.mark.parametrize("value", _scalars(), ids=repr)
def test_a_row_of_scalars_is_accepted_and_stored_as_the_decoding_check_decided(value, monkeypatch):
    """Without the decode, ``to_checked`` accepts and refuses what the check before RT8 (and
    before RT1) did, and stores the same bytes; only rows of exact scalar types skip it."""
    import msgpack

    from cei_actors.eventlog import UnstorableEvent, codec

    decoded = []
    real = codec._unpackb
    monkeypatch.setattr(codec, "_unpackb", lambda *a, **k: decoded.append(1) or real(*a, **k))
    event = _Loose(value, 2.5)
    try:
        _old_to_checked(event, 0.0)
        accepted = True
    except UnstorableEvent:
        accepted = False
    if accepted:
        p = events.to_checked(event, 0.0)
        assert p == PendingEvent("Loose", 1, 0.0, {"items": value, "when": 2.5})
        assert p.row == msgpack.packb(["Loose", 1, 0.0, {"items": value, "when": 2.5}], use_bin_type=True)
    else:
        with pytest.raises(UnstorableEvent):
            events.to_checked(event, 0.0)
    try:
        msgpack.packb(value, use_bin_type=True)
        packs = True
    except Exception:
        packs = False
    exact = type(value) in (int, float, str, bool, type(None)) and value == value
    assert bool(decoded) == (packs and not exact)


def test_only_exactly_registered_plain_classes_skip_the_decode(monkeypatch):
    from cei_actors.eventlog import codec

    decoded = []
    real = codec._unpackb
    monkeypatch.setattr(codec, "_unpackb", lambda *a, **k: decoded.append(1) or real(*a, **k))
    events.to_checked(NodeRequested("n1", "s", 2), 1.0)
    assert not decoded
    events.to_checked(_Uncompared("x", None), 1.0)  # not a plain dataclass: decoded, built
    assert decoded
    odd = EventRegistry("odd")
    named = odd.register(_Mode("Named"))(dataclass(frozen=True)(type("Named", (), {"__annotations__": {"a": int}})))
    decoded.clear()
    odd.to_checked(named(1), 1.0)  # a name that is not an exact str: decoded
    assert decoded


def test_a_pending_event_built_by_its_slots_is_the_constructors():
    from cei_actors.eventlog.codec import _pending

    p = _pending("T", 2, 1.5, {"a": 1}, b"row")
    q = PendingEvent("T", 2, 1.5, {"a": 1}, None, b"row")
    assert type(p) is PendingEvent and p == q and repr(p) == repr(q)
    assert all(getattr(p, f.name) == getattr(q, f.name) for f in dataclasses.fields(PendingEvent))
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.body = {}  # type: ignore[misc]
