"""Calling a service actor from outside the actor system: typed results, typed failures.

``ServiceClient(asys, address).call(message)`` sends ``Request(rid, message)`` and waits for
the ``Response`` with that request id, skipping anything else that arrives (a late reply to an
earlier, timed-out call, for instance). ``Ok(value)`` gives ``value``; an ``ErrorReply``
raises the :class:`RequestFailed` subclass for its code. A request that cannot be delivered
raises :class:`Unavailable` (nothing happened). A request that was sent but got no reply in
time raises :class:`OutcomeUnknown`, which is *not* a ``RequestFailed``: the actor may have
recorded it, or may still (a held request is served after a failover), so the caller must
look before it acts as if nothing happened (docs/decisions.md C1).

On the TCP base each client uses its own private endpoint of the actor system (its own
socket), so clients in different threads do not take each other's replies; one client is
used by one thread at a time (calls are serialised by a lock). On the simple base, which runs
actors in the calling thread, the client uses the system handle itself.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from thespian.actors import ActorAddress, ActorSystem, PoisonMessage

from .control import Request, Response
from .messages import ErrorReply, Ok


class RequestFailed(Exception):
    """A request was refused or could not be served; nothing it asked for happened."""

    code = "internal"

    def __init__(self, message: str, code: str | None = None, request: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.request = request
        if code is not None:
            self.code = code


class BadRequest(RequestFailed):
    code = "bad_request"


class NotFound(RequestFailed):
    code = "not_found"


class Conflict(RequestFailed):
    code = "conflict"


class Forbidden(RequestFailed):
    code = "forbidden"


class Unavailable(RequestFailed):
    """Not served: the actor is not leading, recovering, stopped, unreachable or too slow."""

    code = "unavailable"


class InternalError(RequestFailed):
    code = "internal"


class OutcomeUnknown(Exception):  # noqa: N818 - the name says what the caller knows
    """A request was sent and no reply came in time: it may have taken effect, or may still.

    Not a :class:`RequestFailed` (whose promise is that nothing happened). ``request`` is the
    message's type name; ``check`` is how to find out (set by callers who know, e.g. the CLI's
    ``cei process describe UPID``), else empty.
    """

    code = "outcome_unknown"

    def __init__(self, message: str, request: str = "", check: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.request = request
        self.check = check


_BY_CODE: dict[str, type[RequestFailed]] = {
    cls.code: cls for cls in (BadRequest, NotFound, Conflict, Forbidden, Unavailable, InternalError)
}


def error_for(reply: ErrorReply) -> RequestFailed:
    """The exception for an :class:`ErrorReply` (unknown codes become :class:`InternalError`)."""
    cls = _BY_CODE.get(reply.code, InternalError)
    return cls(reply.message, reply.code, reply.request)


def unwrap(reply: Any) -> Any:
    """The value of an ``Ok``; raise for an ``ErrorReply``; other replies are returned as is."""
    if isinstance(reply, Ok):
        return reply.value
    if isinstance(reply, ErrorReply):
        raise error_for(reply)
    return reply


class ServiceClient:
    """Request/response calls to one actor; see the module docstring."""

    def __init__(self, asys: ActorSystem, address: ActorAddress, timeout: float = 10.0) -> None:
        if not isinstance(address, ActorAddress):
            raise TypeError(f"not an actor address: {address!r}")
        self.asys = asys
        self.address = address
        self.timeout = timeout
        self._lock = threading.Lock()
        self._ctx_manager = None
        self._ctx: Any = None
        self._closed = False

    def _endpoint(self) -> Any:
        if self._ctx is None:
            name = self.asys.capabilities.get("Thespian ActorSystem Name", "")
            if name == "simpleSystem":
                self._ctx = self.asys
            else:
                self._ctx_manager = self.asys.private()
                self._ctx = self._ctx_manager.__enter__()
        return self._ctx

    def call(self, message: Any, timeout: float | None = None, *,
             waiting: Callable[[], None] | None = None, every: float = 0.5) -> Any:
        """Send ``message`` and return the reply's value.

        Raises :class:`RequestFailed` subclasses (refused, or not delivered: nothing happened)
        and :class:`OutcomeUnknown` (sent, no reply within ``timeout``). ``waiting``, if given,
        is called about every ``every`` seconds while no reply has come; an exception it raises
        ends the wait (the request stays sent).
        """
        limit = self.timeout if timeout is None else timeout
        rid = uuid.uuid4().hex
        name = type(message).__name__
        with self._lock:
            if self._closed:
                raise RuntimeError("ServiceClient is closed")
            ctx = self._endpoint()
            start = time.monotonic()
            deadline = start + limit
            first = limit if waiting is None else min(limit, every)
            reply = ctx.ask(self.address, Request(rid, message), first)
            if reply is None and time.monotonic() - start < first - 0.05:
                raise Unavailable(f"{name}: could not deliver to {self.address} (no such actor?)", request=name)
            while True:
                if isinstance(reply, Response) and reply.rid == rid:
                    return unwrap(reply.reply)
                if isinstance(reply, PoisonMessage):
                    poison = reply.poisonMessage
                    if isinstance(poison, Request) and poison.rid == rid:
                        raise InternalError(f"{name}: the actor failed handling it: {reply.details}", request=name)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                if reply is None and waiting is not None:
                    waiting()
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                reply = ctx.listen(remaining if waiting is None else min(remaining, every))
                if reply is None and deadline - time.monotonic() <= 0:
                    break
        raise OutcomeUnknown(
            f"{name}: sent to {self.address}, no reply within {limit:g}s (actor stopped, "
            "failing over, or overloaded): it may have taken effect, or may still",
            request=name,
        )

    def pump(self, seconds: float) -> None:
        """Let the actors run for ``seconds``: the simple base runs them only while a caller
        waits in it (a stray late reply that arrives meanwhile is dropped, as a call would);
        on the TCP base, where they run on their own, just wait."""
        end = time.monotonic() + max(seconds, 0.0)
        with self._lock:
            if self._closed:
                raise RuntimeError("ServiceClient is closed")
            ctx = self._endpoint()
            if ctx is not self.asys:
                time.sleep(max(seconds, 0.0))
                return
            while (remaining := end - time.monotonic()) > 0:
                ctx.listen(remaining)

    def tell(self, message: Any) -> None:
        """Send ``message`` without waiting; the actor sends no reply (refusals are only logged)."""
        with self._lock:
            if self._closed:
                raise RuntimeError("ServiceClient is closed")
            self._endpoint().tell(self.address, Request("", message))

    def close(self) -> None:
        """Release the private endpoint (TCP base)."""
        with self._lock:
            self._closed = True
            manager, self._ctx_manager, self._ctx = self._ctx_manager, None, None
        if manager is not None:
            manager.__exit__(None, None, None)

    def __enter__(self) -> ServiceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = [
    "BadRequest",
    "Conflict",
    "Forbidden",
    "InternalError",
    "NotFound",
    "OutcomeUnknown",
    "RequestFailed",
    "ServiceClient",
    "Unavailable",
    "error_for",
    "unwrap",
]
