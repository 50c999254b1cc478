"""The agent's side of the PD's lease (decision PD9). Pure: every method takes ``now``, the
agent's monotonic clock.

Each heartbeat to the PD carries a new ``seq``; the PD answers some with
``LeaseGrant(seq, fence)``. The agent may run its processes until ``fence`` seconds after it
*sent* the granted heartbeat; the PD received it later, and moves the work elsewhere only
``fence + margin`` after that, so the agent has stopped them by then. Before the first grant
the lease runs ``fence`` (the agent's configured value) from the agent's start; the first
grant replaces that guess (the PD's fence may be shorter), later ones only extend the lease.
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: Seconds of the lease before the PD's first grant (the PD's ``fence_time`` default).
DEFAULT_FENCE = 15.0
#: Most heartbeats remembered while waiting for their grants (older ones are forgotten).
MAX_PENDING = 256


@dataclass
class AgentLease:
    fence: float
    until: float
    seq: int = 0
    #: True until the first grant: ``until`` is then our own ``fence`` from our start
    provisional: bool = True
    _sent: dict[int, float] = field(default_factory=dict)

    @classmethod
    def start(cls, fence: float, now: float) -> AgentLease:
        if not fence > 0:
            raise ValueError("fence must be > 0 seconds")
        return cls(float(fence), now + fence)

    def sending(self, now: float) -> int:
        """The ``seq`` of a heartbeat sent at ``now``."""
        self.seq += 1
        self._sent[self.seq] = now
        if len(self._sent) > MAX_PENDING:
            del self._sent[next(iter(self._sent))]
        return self.seq

    def granted(self, seq: int, fence: float) -> bool:
        """Heartbeat ``seq`` was granted ``fence`` seconds; False for an unknown seq."""
        sent = self._sent.get(seq)
        if sent is None:
            return False
        for s in [s for s in self._sent if s <= seq]:
            del self._sent[s]
        self.fence = float(fence)
        if self.provisional:  # the PD's first word replaces our own guess
            self.until = sent + self.fence
            self.provisional = False
        else:
            self.until = max(self.until, sent + self.fence)
        return True

    def expired(self, now: float) -> bool:
        return now >= self.until

    def remaining(self, now: float) -> float:
        return self.until - now

    def renew_every(self) -> float:
        """Heartbeats go out at least this often, so a grant is asked for 4 times a lease."""
        return self.fence / 4
