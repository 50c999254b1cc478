"""Replay-based debugging: read a recorded log at any point and ask why.

The Python API behind ``cei log why/trace/state/diff``::

    with Replay("sqlite:///home/log.sqlite") as r:     # opened read-only
        answer = why(r, "my-process", at="-10m")        # or an offset, or an ISO-8601 time
        timeline = trace(r, "my-process")
        reports = verify(r)                             # replay against the current code
"""

from .entities import diff, entity_diff, keyed, only_entity
from .reader import BadAt, Replay, human_time, open_read_only, parse_at
from .verify import Difference, StreamReport, verify
from .why import UnknownEntity, mentions, trace, verdict_text, why

__all__ = [
    "BadAt",
    "Difference",
    "Replay",
    "StreamReport",
    "UnknownEntity",
    "diff",
    "entity_diff",
    "human_time",
    "keyed",
    "mentions",
    "only_entity",
    "open_read_only",
    "parse_at",
    "trace",
    "verdict_text",
    "verify",
    "why",
]
