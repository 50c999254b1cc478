"""``memory://`` logs: an append notifies the space's readers only when one waits (RT15)."""

from __future__ import annotations

import threading
import time
import uuid

from cei_actors.eventlog import PendingEvent, open_log


def ev(i: int) -> PendingEvent:
    return PendingEvent("Thing", 1, 1000.0 + i, {"i": i})


class _CountingCondition:
    """The space's condition, counting its notifies."""

    def __init__(self, inner: threading.Condition) -> None:
        self.inner, self.notified = inner, 0

    def notify_all(self) -> None:
        self.notified += 1
        self.inner.notify_all()

    def wait(self, timeout: float | None = None) -> bool:
        return self.inner.wait(timeout)


def _until(cond, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.001)


def test_an_append_notifies_only_when_a_reader_waits_and_wakes_it():
    url = f"memory://{uuid.uuid4().hex}"
    log, follower = open_log(url), open_log(url)
    try:
        space = log._space
        counting = space.changed = _CountingCondition(space.changed)
        fence = log.acquire("s")
        log.append(fence, 0, [ev(1)])
        log.append(fence, 1, [ev(2), ev(3)])
        assert counting.notified == 0  # nobody waited: no notify

        got: list[int] = []
        reader = threading.Thread(target=lambda: got.extend(r.offset for r in follower.tail("s", 3, timeout=30)))
        started = time.monotonic()
        reader.start()
        _until(lambda: space.waiting == 1)
        log.append(fence, 3, [ev(4)])
        reader.join(30)
        assert got == [4] and time.monotonic() - started < 20  # woken, not timed out
        assert counting.notified == 1 and space.waiting == 0
    finally:
        log.close()
        follower.close()
