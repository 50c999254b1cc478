"""``validate``: each field read once, the message sized once by the reused packer (RT10)."""

from __future__ import annotations

from dataclasses import dataclass

import msgpack
import pytest

from cei_actors.pd.messages import ScheduleProcess, ScheduleProcesses
from cei_actors.runtime import messages
from cei_actors.runtime.messages import InvalidMessage, Message, validate


@dataclass(frozen=True)
class _Small(Message):
    name: str
    data: dict | None = None

    max_bytes = 64


_VALUES = [([1, "a", None], False), ([{"k": [1, 2]}, b"x" * 300], False), (["\u00e9" * 40], False),
           ([{1, 2}], True), ([ScheduleProcess("p1")], True), ([[ScheduleProcess("p1", command=["a"])], None], True)]


@pytest.mark.parametrize("values, inside", _VALUES, ids=repr)
def test_a_message_is_sized_as_msgpack_with_messages_and_sets_as_lists(values, inside, monkeypatch):
    """Plain data is sized by the reused packer; only messages or sets inside build one with
    ``default``; the size is msgpack's either way."""
    expected = len(msgpack.packb(values, use_bin_type=True, default=messages._packable))
    built = []
    real = msgpack.packb
    monkeypatch.setattr(msgpack, "packb", lambda *a, **k: built.append(1) or real(*a, **k))
    assert messages._encoded_size(values) == expected
    assert bool(built) == inside


def test_refusals_name_the_field_as_before():
    validate(_Small("a", {"k": 1}))
    with pytest.raises(InvalidMessage, match=r"_Small.data: \d+ bytes encoded; the whole request is \d+ bytes"):
        validate(_Small("a", {"k": "x" * 100}))
    with pytest.raises(InvalidMessage, match="_Small.name: expected str, got int"):
        validate(_Small(1))  # type: ignore[arg-type]
    with pytest.raises(InvalidMessage, match="tuple reads back as a list"):
        validate(_Small("a", {"k": (1,)}))
    odd = _Small.__new__(_Small)  # unpickled without __init__: a field is missing
    object.__setattr__(odd, "data", {})
    with pytest.raises(InvalidMessage, match="_Small: field 'name' is missing"):
        validate(odd)
    validate(ScheduleProcesses([ScheduleProcess("p1"), ScheduleProcess("p2", command=["x"])]))


def test_a_message_missing_a_field_is_refused_for_its_first_field_in_error():
    odd = _Small.__new__(_Small)  # unpickled without __init__, a bad field before the missing one
    object.__setattr__(odd, "data", (1,))
    with pytest.raises(InvalidMessage, match="_Small: field 'name' is missing"):
        validate(odd)

    @dataclass(frozen=True)
    class _Two(Message):
        first: int
        second: str

    odd = _Two.__new__(_Two)
    object.__setattr__(odd, "first", "x")
    with pytest.raises(InvalidMessage, match="_Two.first: expected int"):
        validate(odd)


def test_messages_of_one_and_no_field_and_non_messages_are_judged_as_before_rt16():
    """RT16 reads every field of a message class at once, kept per class: a class of one
    field or none is read as such, and what is not a message dataclass is refused each time
    (nothing is kept for it)."""

    @dataclass(frozen=True)
    class _One(Message):
        only: int

    @dataclass(frozen=True)
    class _None(Message):
        pass

    @dataclass(frozen=True)
    class _NotMessage:  # a dataclass, not a Message
        only: int = 1

    for _ in range(2):  # the second time from what the first kept
        validate(_One(3))
        validate(_None())
        with pytest.raises(InvalidMessage, match="_One.only: expected int, got str"):
            validate(_One("x"))  # type: ignore[arg-type]
        for odd in (_NotMessage(), {"a": 1}, None):
            with pytest.raises(InvalidMessage, match="not a message"):
                validate(odd)
    assert _NotMessage not in messages._shapes and _One in messages._shapes


@pytest.mark.parametrize("upid, refusal", [
    ("", "ScheduleProcess.upid: must not be empty"),
    ("a\0b", "ScheduleProcess.upid: at most 256 characters, no NUL or newline"),
    ("a\nb", "ScheduleProcess.upid: at most 256 characters, no NUL or newline"),
    ("x" * 257, "ScheduleProcess.upid: at most 256 characters, no NUL or newline"),
    ("x" * 256, None), ("p-1\t\r", None),
])
def test_a_process_id_is_refused_as_before_rt17(upid, refusal):
    if refusal is None:
        validate(ScheduleProcess(upid))
        return
    with pytest.raises(InvalidMessage) as caught:
        validate(ScheduleProcess(upid))
    assert str(caught.value) == refusal
