"""The matchmaker: the one place for the PD's scheduling rules. Pure and incremental.

Rules (the original's, §4.3 of the reference):

- **Candidates**: resources in state OK, on a node that is not retiring, with a free slot
  (``slots - assigned - foreign``), whose properties satisfy the process's constraints.
  Properties are the node's properties plus ``engine``, ``node_id`` and ``resource_id``; a
  constraint is equality, or membership when its value is a list. ``engine`` is always
  constrained.
- **Order**: FIFO by queue sequence. A process that matches nothing is not looked at again
  until the resources it could use change.
- **Placement**: bin-packing across nodes (occupied nodes first, fewest free slots first; empty
  nodes last, in the order they became empty), balance within a node (the least-used
  candidate resource of the chosen node).
- **node_exclusive**: a process with tag T never goes to a node that holds a live process
  with tag T.
- **Throttling**: from the third dispatch on, a process waits until its last dispatch plus its
  minimum time between starts.
- **No slot**: the queueing mode says whether the process waits (WAITING) or is REJECTED; a
  throttled process waits.

How it stays incremental. Processes with the same engine and constraints share a **pool**:
the nodes that can host them, bucketed by how many of their slots the pool can use. Processes
of a pool with the same node_exclusive tag form a **class**; members of a class are
interchangeable for placement, so when a class's oldest member finds no slot the whole class
is *clean* and is skipped until a node of its pool gains capacity (or loses the tag), which
marks it *dirty* again. A pass pops dirty classes from a heap ordered by their oldest
member's sequence, so placement stays FIFO across classes. Placing one process costs
O(log classes + buckets) plus the nodes skipped for its tag; a heartbeat or a new node
costs work for the pools that node belongs to.

The index is derived data: the fold (``state.py``) keeps it in step with every event, a
snapshot restore rebuilds it, and a pass that finds nothing only flips cached "clean" marks,
which never change an outcome, only save work.
"""

from __future__ import annotations

import collections
import heapq
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..plaindata import count
from . import states as ps

if TYPE_CHECKING:  # pragma: no cover
    from .state import Node, Process, Resource

PoolKey = tuple[str, tuple[tuple[str, Any], ...]]
ClassKey = tuple[PoolKey, str | None]

_EMPTY = -1  # location of a node with no used slot at all
IDLE_POOLS = 32  # pools kept without a queued process (see Matchmaker._drop_pool_if_unused)


def hashable(value: Any) -> Any:
    """A hashable stand-in for a property or constraint value (lists become tuples)."""
    if isinstance(value, list | tuple):
        return tuple(hashable(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((str(k), hashable(v)) for k, v in value.items()))
    return value


def constraint_key(constraints: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    """Constraints other than ``engine`` as a sorted hashable tuple."""
    if len(constraints) == 1 and "engine" in constraints:
        return ()  # the usual case
    return tuple(sorted((k, hashable(v)) for k, v in constraints.items() if k != "engine"))


def mismatch(properties: Mapping[str, Any], ckey: tuple[tuple[str, Any], ...]) -> str | None:
    """The first constraint key ``properties`` do not meet (equality, or membership for a
    list), or None when they meet every one."""
    for key, want in ckey:
        if key not in properties:
            return key
        have = hashable(properties[key])
        if isinstance(want, tuple):
            if have not in want:
                return key
        elif have != want:
            return key
    return None


def satisfies(properties: Mapping[str, Any], ckey: tuple[tuple[str, Any], ...]) -> bool:
    """Do ``properties`` meet every constraint (equality, or membership for a list)?"""
    return mismatch(properties, ckey) is None


#: Why a node or resource cannot take a process now (the codes :meth:`Matchmaker.verdict`
#: reports; placement takes the same checks).
ENGINE = "engine"  # the node runs another engine
CONSTRAINT = "constraint"  # a constraint key does not match
RETIRING = "retiring"  # the node is offered to EPUM for retirement
NO_AGENT = "no_agent"  # no EEAgent has reported from the node yet
AGENT_STATE = "agent_state"  # the agent is not OK (WARNING, MISSING, DISABLED)
NO_FREE_SLOT = "no_free_slot"
NODE_EXCLUSIVE = "node_exclusive"  # the node holds a live process with the same tag
FITS = "fits"  # nothing stops it: the next pass places it there


def resource_block(res: Resource, ckey: tuple[tuple[str, Any], ...]) -> str | None:
    """Why ``res`` cannot take a process with constraints ``ckey`` (None: it has a free slot)."""
    if res.state != ps.RESOURCE_OK:
        return AGENT_STATE
    if res.slots - len(res.assigned) - res.foreign <= 0:
        return NO_FREE_SLOT
    if ckey and mismatch(res.properties, ckey) is not None:
        return CONSTRAINT
    return None


def node_constraint_miss(node: Node, ckey: tuple[tuple[str, Any], ...]) -> str | None:
    """The first constraint key no resource of ``node`` can ever meet (None: some may)."""
    if not ckey:
        return None
    props = dict(node.properties)
    props["node_id"] = node.node_id
    props["engine"] = node.engine
    for key, want in ckey:
        if key == "resource_id":
            ok = any(
                (r in want) if isinstance(want, tuple) else r == want for r in node.resources
            )
            if not ok:
                return key
            continue
        if mismatch(props, ((key, want),)) is not None:
            return key
    return None


def exclusive_holder(node: Node, tag: str | None) -> str | None:
    """The process holding node_exclusive ``tag`` on ``node`` (None: the tag is free there)."""
    return node.tags.get(tag) if tag is not None else None


def engine_by_definition(
    definition: Mapping[str, Any] | None, process_engines: Mapping[str, str], default: str | None
) -> str | None:
    """Engine selection when the request names none: the longest dotted prefix of the
    definition's ``module.class`` (or its id) in ``process_engines`` wins, else ``default``."""
    if definition is not None and process_engines:
        ex = definition.get("executable") or {}
        if ex.get("module") and ex.get("class"):
            key = f"{ex['module']}.{ex['class']}"
        else:
            key = definition["definition_id"]
        best, engine = -1, None
        for prefix, eng in process_engines.items():
            if (key == prefix or key.startswith(prefix + ".")) and len(prefix) > best:
                engine, best = eng, len(prefix)
        if engine is not None:
            return engine
    return default


def throttle_until(proc: Process, default_interval: float) -> float:
    """When ``proc`` may be dispatched again: the minimum time between starts from its third
    dispatch on (original), and not before its crash-loop backoff ends (decision OP3)."""
    if proc.dispatches < 2 or proc.last_dispatch is None:
        return proc.retry_at
    interval = proc.min_start_interval
    if interval is None:
        interval = default_interval
    return max(proc.last_dispatch + interval if interval > 0 else 0.0, proc.retry_at)


class FifoSet:
    """An insertion-ordered set with O(1) amortized ``first`` (a dict plus a deque).

    A plain dict is not enough: after many deletions at its front, ``next(iter(d))`` walks
    every deleted slot until the dict is resized, which made a large pass quadratic.
    Deletion here is lazy; the deque is compacted when it holds mostly stale entries.

    After :meth:`sort_members` the members then present are kept in a heap by the sort key
    (ties by arrival), ahead of the deque of later adds: a later sort moves only the adds
    since the last one into the heap (decision SC9).
    """

    __slots__ = ("_live", "_order", "_tick", "_heap", "_key")

    def __init__(self) -> None:
        self._live: dict[Any, tuple[int, Any]] = {}
        #: members added since the last sort (all of them if never sorted), in arrival order
        self._order: collections.deque[tuple[Any, int]] = collections.deque()
        self._tick = 0
        #: (sort key, tick, member): the members present at the last sort, lazily deleted
        #: (an entry is live while ``_live`` holds its member with its tick)
        self._heap: list[tuple[Any, int, Any]] = []
        self._key: Callable[[Any], Any] | None = None

    @classmethod
    def of(cls, keys: Iterable[Any]) -> FifoSet:
        """The set of distinct ``keys`` in this order, as if each was added in turn."""
        made = cls()
        entries = [(key, tick) for tick, key in enumerate(keys, 1)]
        made._order = collections.deque(entries)
        made._live = {key: (tick, None) for key, tick in entries}
        made._tick = len(entries)
        return made

    def add(self, key: Any, value: Any = None) -> None:
        """Add ``key`` at the end (moving it there if present)."""
        self._tick += 1
        self._live[key] = (self._tick, value)
        self._order.append((key, self._tick))
        if len(self._order) + len(self._heap) > 2 * len(self._live) + 32:
            self._compact()

    def discard(self, key: Any) -> None:
        self._live.pop(key, None)

    def sort_members(self, key: Callable[[Any], Any]) -> None:
        """Order the present members by ``key`` (stable); later adds go after them as ever.

        The members added since the last sort go into the heap of sorted members (all of
        them again if ``key`` is another function than the last sort's): a bucket of a pool
        reused after idling costs what changed in it, not its size (decisions SC4, SC9)."""
        if key != self._key:  # (a bound method equals the same one made again)
            if self._heap:  # ties keep the present order: renumber the members in it
                members = [(k, self._live[k][1]) for k in self]
                self._heap, self._order, self._live = [], collections.deque(), {}
                self._tick = 0
                for k, value in members:
                    self.add(k, value)
            self._key = key
        live, heap = self._live, self._heap
        for k, t in self._order:
            if live.get(k, (0,))[0] == t:
                heapq.heappush(heap, (key(k), t, k))
        self._order.clear()

    def _compact(self) -> None:
        live = self._live
        self._order = collections.deque((k, t) for k, t in self._order if live.get(k, (0,))[0] == t)
        if len(self._heap) > len(live):
            self._heap = [e for e in self._heap if live.get(e[2], (0,))[0] == e[1]]
            heapq.heapify(self._heap)

    def first(self) -> tuple[Any, Any] | None:
        """``(key, value)`` of the oldest member, or None."""
        live = self._live
        heap = self._heap
        while heap:
            _, tick, key = heap[0]
            entry = live.get(key)
            if entry is not None and entry[0] == tick:
                return key, entry[1]
            heapq.heappop(heap)
        order = self._order
        while order:
            key, tick = order[0]
            entry = live.get(key)
            if entry is not None and entry[0] == tick:
                return key, entry[1]
            order.popleft()
        return None

    def __iter__(self) -> Iterator[Any]:
        live = self._live
        for _, tick, key in sorted(self._heap) if self._heap else ():
            entry = live.get(key)
            if entry is not None and entry[0] == tick:
                yield key
        for key, tick in self._order:
            entry = live.get(key)
            if entry is not None and entry[0] == tick:
                yield key

    def __contains__(self, key: Any) -> bool:
        return key in self._live

    def __len__(self) -> int:
        return len(self._live)

    def __bool__(self) -> bool:
        return bool(self._live)


@dataclass(eq=False)
class Pool:
    """The nodes that can host processes of one (engine, constraints) and their free slots."""

    key: PoolKey
    engine: str
    ckey: tuple[tuple[str, Any], ...]
    #: node_id -> location: _EMPTY, or k >= 1 = free slots usable by this pool (occupied node)
    where: dict[str, int] = field(default_factory=dict)
    #: buckets[k] = occupied nodes with k usable free slots (in the order they arrived there)
    buckets: list[FifoSet] = field(default_factory=lambda: [FifoSet()])
    empty: FifoSet = field(default_factory=FifoSet)
    members: set[str] = field(default_factory=set)
    classes: dict[ClassKey, Klass] = field(default_factory=dict)


@dataclass(eq=False)
class Klass:
    """Queued processes of one pool and one node_exclusive tag, oldest first."""

    key: ClassKey
    pool: Pool
    tag: str | None
    items: FifoSet = field(default_factory=FifoSet)  # upid -> queue seq, oldest first
    dirty: bool = True


class Matchmaker:
    """The placement index over a PD state's nodes, resources and queued processes."""

    def __init__(
        self,
        processes: dict[str, Process],
        nodes: dict[str, Node],
        resources: dict[str, Resource],
        *,
        min_start_interval: float = 2.0,
    ) -> None:
        self.processes = processes
        self.nodes = nodes
        self.resources = resources
        self.min_start_interval = min_start_interval
        self.pools: dict[PoolKey, Pool] = {}
        self.node_pools: dict[str, set[PoolKey]] = {}
        self.engine_nodes: dict[str, dict[str, None]] = {}
        self.prop_index: dict[tuple[str, Any], set[str]] = {}
        self.classes: dict[ClassKey, Klass] = {}
        self.where: dict[str, ClassKey] = {}  # queued upid -> its class
        self.throttled: list[tuple[float, int, str]] = []  # (until, seq, upid), lazy
        self.throttled_set: dict[str, float] = {}
        #: queued processes that need a verdict (placed, WAITING or REJECTED), in order
        self.fresh: dict[str, None] = {}
        self._heap: list[tuple[int, int, ClassKey]] = []  # (head seq, tiebreak, class)
        self._tie = 0
        #: pools without a queued process, kept (and kept in step) for the next one to use,
        #: oldest first; beyond IDLE_POOLS the oldest goes
        self._idle: collections.OrderedDict[PoolKey, None] = collections.OrderedDict()

    # ---- nodes and resources --------------------------------------------------------------

    def add_node(self, node: Node) -> None:
        """A node appeared (or its resources changed): index it and join matching pools."""
        nid = node.node_id
        self.engine_nodes.setdefault(node.engine, {})[nid] = None
        for entry in set(self._node_entries(node)):
            self.prop_index.setdefault(entry, set()).add(nid)
        pools = self.node_pools.setdefault(nid, set())
        for pkey, pool in self.pools.items():
            if pool.engine == node.engine and pkey not in pools and self._may_match(node, pool):
                pools.add(pkey)
                pool.members.add(nid)
        self.touch_node(node, grew=True)

    def _node_entries(self, node: Node) -> Iterable[tuple[str, Any]]:
        yield ("node_id", node.node_id)
        yield ("engine", node.engine)
        for k, v in node.properties.items():
            yield (k, hashable(v))
        for rid in node.resources:
            yield ("resource_id", rid)

    def _may_match(self, node: Node, pool: Pool) -> bool:
        return node_constraint_miss(node, pool.ckey) is None

    def remove_node(self, node: Node) -> None:
        nid = node.node_id
        for pkey in self.node_pools.pop(nid, ()):
            pool = self.pools.get(pkey)
            if pool is not None:
                self._unplace(pool, nid)
                pool.members.discard(nid)
        engine_nodes = self.engine_nodes.get(node.engine)
        if engine_nodes is not None:
            engine_nodes.pop(nid, None)
        for entry in set(self._node_entries(node)):
            s = self.prop_index.get(entry)
            if s is not None:
                s.discard(nid)
                if not s:
                    del self.prop_index[entry]

    def refresh_node(self, node: Node) -> None:
        """Re-index a node whose resource set changed (resource ids are properties)."""
        self.remove_node(node)
        self.add_node(node)

    def touch_node(self, node: Node, *, grew: bool = False) -> None:
        """Re-bucket ``node`` in its pools after its slots, tags or candidacy changed.

        Pools where the node's usable capacity rose (or, with ``grew``, may have risen:
        a tag went away, the node is new) get their classes marked dirty.
        """
        for pkey in self.node_pools.get(node.node_id, ()):
            pool = self.pools[pkey]
            before = pool.where.get(node.node_id)
            after = self._place(pool, node)
            if after is None:
                continue
            if grew or before is None or (before != _EMPTY and (after == _EMPTY or after > before)):
                self._dirty_pool(pool)

    def _usable(self, node: Node, pool: Pool) -> int:
        if node.retiring:
            return 0
        free = 0
        ckey = pool.ckey
        resources = self.resources
        for rid in node.resources:
            res = resources[rid]
            if resource_block(res, ckey) is None:
                free += res.slots - len(res.assigned) - res.foreign
        return free

    def _place(self, pool: Pool, node: Node) -> int | None:
        nid = node.node_id
        free = self._usable(node, pool)
        if free <= 0:
            loc = None
        elif node.used == 0:
            loc = _EMPTY
        else:
            loc = free
        old = pool.where.get(nid)
        if old == loc:
            return loc
        if old is not None:
            if old == _EMPTY:
                pool.empty.discard(nid)
            else:
                pool.buckets[old].discard(nid)
        if loc is None:
            pool.where.pop(nid, None)
        else:
            pool.where[nid] = loc
            if loc == _EMPTY:
                pool.empty.add(nid)
            else:
                while len(pool.buckets) <= loc:
                    pool.buckets.append(FifoSet())
                pool.buckets[loc].add(nid)
        return loc

    def _unplace(self, pool: Pool, nid: str) -> None:
        old = pool.where.pop(nid, None)
        if old is None:
            return
        if old == _EMPTY:
            pool.empty.discard(nid)
        else:
            pool.buckets[old].discard(nid)

    # ---- pools and classes -----------------------------------------------------------------

    def _pool(self, engine: str, ckey: tuple[tuple[str, Any], ...]) -> Pool:
        pkey = (engine, ckey)
        pool = self.pools.get(pkey)
        if pool is not None:
            if self._idle.pop(pkey, 0) is None:
                self._reorder(pool)
            return pool
        pool = Pool(pkey, engine, ckey)
        self.pools[pkey] = pool
        candidates: Iterable[str]
        if not ckey:
            candidates = self.engine_nodes.get(engine, {})
        else:
            sets: list[set[str]] = []
            for key, want in ckey:
                values = want if isinstance(want, tuple) else (want,)
                s: set[str] = set()
                for v in values:
                    s |= self.prop_index.get((key, v), set())
                sets.append(s)
            sets.sort(key=len)
            found = set(sets[0]).intersection(*sets[1:]) if sets else set()
            ours = self.engine_nodes.get(engine, {})
            candidates = sorted((n for n in found if n in ours), key=lambda n: self.nodes[n].seq)
        for nid in candidates:
            node = self.nodes[nid]
            if self._may_match(node, pool):
                pool.members.add(nid)
                self.node_pools.setdefault(nid, set()).add(pkey)
                self._place(pool, node)
        return pool

    def _reorder(self, pool: Pool) -> None:
        """Order an idle pool's buckets by node sequence, as a pool built now would be
        (within a bucket the first node wins: reuse must not change the choice). A bucket's
        members since its last sort join its sorted ones (decisions SC4, SC9)."""
        seq = self._node_seq
        for bucket in pool.buckets:
            if bucket:
                bucket.sort_members(seq)
        if pool.empty:
            pool.empty.sort_members(seq)

    def _node_seq(self, nid: str) -> int:
        """A node's sequence (unique and fixed): the order :meth:`_reorder` sorts by."""
        return self.nodes[nid].seq

    def _drop_pool_if_unused(self, pool: Pool) -> None:
        """A pool whose last class went stays, idle, for the next process like it: building
        one scans the engine's nodes, and a queue that drains after every placement would
        rebuild it for every process. Only the oldest beyond ``IDLE_POOLS`` go."""
        if pool.classes:
            return
        self._idle[pool.key] = None
        while len(self._idle) > IDLE_POOLS:
            key, _ = self._idle.popitem(last=False)
            old = self.pools.pop(key)
            for nid in old.members:
                pools = self.node_pools.get(nid)
                if pools is not None:
                    pools.discard(key)

    def _klass(self, proc: Process) -> Klass:
        ckey = constraint_key(proc.constraints)
        pkey = (proc.engine, ckey)
        key = (pkey, proc.node_exclusive)
        klass = self.classes.get(key)
        if klass is None:
            pool = self._pool(proc.engine, ckey)
            klass = Klass(key, pool, proc.node_exclusive)
            self.classes[key] = klass
            pool.classes[key] = klass
        return klass

    def _dirty_pool(self, pool: Pool) -> None:
        for klass in pool.classes.values():
            if not klass.dirty:
                klass.dirty = True
                self._push(klass)

    def _push(self, klass: Klass) -> None:
        head = klass.items.first()
        if head is not None:
            self._tie += 1
            heapq.heappush(self._heap, (head[1], self._tie, klass.key))

    # ---- the queue ----------------------------------------------------------------------------

    def enqueue(self, proc: Process) -> None:
        """``proc`` entered the queue (REQUESTED/DIED_REQUESTED) with sequence ``proc.seq``."""
        if proc.state in ps.FRESH:
            self.fresh[proc.upid] = None
        until = throttle_until(proc, self.min_start_interval)
        if until > 0:
            self.throttled_set[proc.upid] = until
            heapq.heappush(self.throttled, (until, proc.seq, proc.upid))
            return
        self._into_class(proc)

    def _into_class(self, proc: Process) -> None:
        klass = self._klass(proc)
        was_empty = not klass.items
        klass.items.add(proc.upid, proc.seq)
        self.where[proc.upid] = klass.key
        if klass.dirty and was_empty:
            self._push(klass)

    def dequeue(self, upid: str) -> None:
        """``upid`` left the queue (placed, terminated, rejected, ...)."""
        self.fresh.pop(upid, None)
        self.throttled_set.pop(upid, None)
        key = self.where.pop(upid, None)
        if key is None:
            return
        klass = self.classes[key]
        klass.items.discard(upid)
        if not klass.items:
            del self.classes[key]
            del klass.pool.classes[key]
            self._drop_pool_if_unused(klass.pool)

    def waited(self, upid: str) -> None:
        """``upid`` got its verdict (WAITING) and stays queued."""
        self.fresh.pop(upid, None)

    def release_throttled(self, now: float) -> None:
        """Move processes whose throttle has passed into their classes (fresh again)."""
        heap = self.throttled
        while heap and heap[0][0] <= now:
            until, _, upid = heapq.heappop(heap)
            if self.throttled_set.get(upid) != until:
                continue
            del self.throttled_set[upid]
            proc = self.processes[upid]
            self.fresh[upid] = None
            self._into_class(proc)

    def next_throttle(self) -> float | None:
        """The earliest time a throttled process becomes eligible, or None."""
        heap = self.throttled
        while heap and self.throttled_set.get(heap[0][2]) != heap[0][0]:
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def is_throttled(self, upid: str) -> bool:
        return upid in self.throttled_set

    def pending(self) -> bool:
        """False when a pass would do nothing: no class to try, no process waiting for a
        verdict, none throttled."""
        return bool(self._heap or self.fresh or self.throttled)

    # ---- matching -------------------------------------------------------------------------------

    def next_placement(self) -> tuple[Process, Resource] | None:
        """The oldest queued process that has a slot now, and the resource to put it on.

        The caller records the placement (which updates this index) before asking again.
        None when no dirty class can place anything; those classes are then clean.
        """
        heap = self._heap
        classes = self.classes
        while heap:
            seq, _, key = heap[0]
            klass = classes.get(key)
            if klass is None or not klass.dirty or not klass.items:
                heapq.heappop(heap)
                continue
            head = klass.items.first()
            assert head is not None
            head_upid, head_seq = head
            if head_seq != seq:
                self._tie += 1
                heapq.heapreplace(heap, (head_seq, self._tie, key))
                continue
            res = self._find(klass)
            if res is None:
                heapq.heappop(heap)
                klass.dirty = False
                continue
            return self.processes[head_upid], res
        return None

    def _find(self, klass: Klass) -> Resource | None:
        pool = klass.pool
        tag = klass.tag
        nodes = self.nodes
        buckets = pool.buckets
        for k in range(1, len(buckets)):
            bucket = buckets[k]
            if not bucket:
                continue
            if tag is None:
                first = bucket.first()
                assert first is not None
                return self._pick(nodes[first[0]], pool)
            for nid in bucket:
                node = nodes[nid]
                if exclusive_holder(node, tag) is None:
                    return self._pick(node, pool)
        first = pool.empty.first()  # an empty node holds no process, hence no tag
        if first is not None:
            return self._pick(nodes[first[0]], pool)
        return None

    def _pick(self, node: Node, pool: Pool) -> Resource:
        best: Resource | None = None
        best_used = 0
        ckey = pool.ckey
        for rid in node.resources:
            res = self.resources[rid]
            if resource_block(res, ckey) is not None:
                continue
            used = len(res.assigned) + res.foreign
            if best is None or used < best_used:
                best, best_used = res, used
        assert best is not None, "a bucketed node has a candidate resource"
        return best

    # ---- explaining -----------------------------------------------------------------------------

    def verdict(self, proc: Process, node: Node) -> dict[str, Any]:
        """Why ``node`` cannot take ``proc`` now, by the checks placement makes (``reason``
        one of the codes above, with the figures it used); ``FITS`` when nothing stops it."""
        ckey = constraint_key(proc.constraints)
        out: dict[str, Any] = {"node_id": node.node_id}
        if node.engine != proc.engine:
            return {**out, "reason": ENGINE, "wanted": proc.engine, "had": node.engine}
        key = node_constraint_miss(node, ckey)
        if key is not None:
            want = dict(ckey)[key]
            had = list(node.resources) if key == "resource_id" else node.properties.get(key)
            return {**out, "reason": CONSTRAINT, "key": key, "wanted": want, "had": had}
        if node.retiring:
            return {**out, "reason": RETIRING}
        if not node.resources:
            return {**out, "reason": NO_AGENT}
        blocks = {rid: resource_block(self.resources[rid], ckey) for rid in node.resources}
        if all(b is not None for b in blocks.values()):
            for code in (NO_FREE_SLOT, CONSTRAINT, AGENT_STATE):  # the most telling first
                rids = [rid for rid, b in blocks.items() if b == code]
                if rids:
                    break
            res = [self.resources[r] for r in rids]
            if code == NO_FREE_SLOT:
                return {**out, "reason": code, "slots": sum(r.slots for r in res),
                        "assigned": sum(len(r.assigned) for r in res),
                        "foreign": sum(r.foreign for r in res), "resources": rids}
            if code == CONSTRAINT:
                r = res[0]
                key = mismatch(r.properties, ckey)
                assert key is not None
                return {**out, "reason": code, "key": key, "wanted": dict(ckey)[key],
                        "had": r.properties.get(key), "resources": rids}
            return {**out, "reason": code, "states": {r.resource_id: r.state for r in res}}
        holder = exclusive_holder(node, proc.node_exclusive)
        if holder is not None:
            return {**out, "reason": NODE_EXCLUSIVE, "tag": proc.node_exclusive, "held_by": holder}
        return {**out, "reason": FITS}

    def held_back(self, proc: Process, now: float, cache: dict[Any, str] | None = None) -> str:
        """One line (no ": ", so YAML shows it plain): what keeps queued ``proc`` from a slot
        now, from :meth:`verdict` on each node of its engine (what ``cei log why`` shows node
        by node), and its throttle; "" when a node fits (the next pass places it). ``cache``:
        one dict across the calls of one read, so one engine, constraints and tag are judged
        once."""
        parts = []
        until = self.throttled_set.get(proc.upid)
        if until is not None and until > now:
            parts.append(f"throttled, next start in {until - now:.0f} s")
        key = (proc.engine, constraint_key(proc.constraints), proc.node_exclusive)
        nodes = cache.get(key) if cache is not None else None
        if nodes is None:
            nodes = self._nodes_held_back(proc)
            if cache is not None:
                cache[key] = nodes
        return "; ".join(parts + ([nodes] if nodes else []))

    def _nodes_held_back(self, proc: Process) -> str:
        ids = self.engine_nodes.get(proc.engine) or {}
        if not ids:
            return f"no node of engine {proc.engine!r} yet"
        by: dict[str, list[dict[str, Any]]] = {}
        for nid in ids:
            v = self.verdict(proc, self.nodes[nid])
            if v["reason"] == FITS:
                return ""
            by.setdefault(v["reason"], []).append(v)
        misses: dict[str, list[dict[str, Any]]] = {}
        for v in by.get(CONSTRAINT, ()):
            misses.setdefault(v["key"], []).append(v)
        texts = []
        for key, vs in misses.items():
            had = ", ".join(dict.fromkeys(repr(_shown(v["had"])) for v in vs))
            texts.append(f"constraint {key}={_shown(vs[0]['wanted'])!r}, "
                         f"{count(len(vs), 'node')} {'has' if len(vs) == 1 else 'have'} {had}")
        for code, one, many in ((NO_FREE_SLOT, "has no free slot", "have no free slot"),
                                (NODE_EXCLUSIVE, f"holds node_exclusive {proc.node_exclusive!r}",
                                 f"hold node_exclusive {proc.node_exclusive!r}"),
                                (NO_AGENT, "has no EEAgent yet", "have no EEAgent yet"),
                                (AGENT_STATE, "has its agent not OK", "have their agents not OK"),
                                (RETIRING, "is retiring", "are retiring")):
            n = len(by.get(code, ()))
            if n:
                texts.append(f"{count(n, 'node')} {one if n == 1 else many}")
        return f"no node fits ({'; '.join(texts)})"


def _shown(value: Any) -> Any:
    """A constraint or property value as given (a tuple made from a list is a list again)."""
    return [_shown(v) for v in value] if isinstance(value, tuple) else value


def naive_place(
    queue: list[Process],
    nodes: Mapping[str, Node],
    resources: Mapping[str, Resource],
) -> list[tuple[str, str]]:
    """The original's algorithm as a full rescan (the benchmark's baseline).

    For each queued process in order it gathers every candidate resource, groups them per
    node, sorts occupied nodes by free slots and picks the least-used resource. Mutates the
    resources' ``assigned`` and the nodes' ``used``/``tags`` like a placement would.
    """
    out: list[tuple[str, str]] = []
    for proc in queue:
        ckey = constraint_key(proc.constraints)
        per_node: dict[str, list[Resource]] = {}
        for res in resources.values():
            node = nodes[res.node_id]
            if res.engine != proc.engine or res.state != ps.RESOURCE_OK or node.retiring:
                continue
            if len(res.assigned) + res.foreign >= res.slots:
                continue
            if ckey and not satisfies(res.properties, ckey):
                continue
            if proc.node_exclusive is not None and proc.node_exclusive in node.tags:
                continue
            per_node.setdefault(res.node_id, []).append(res)
        if not per_node:
            continue
        occupied = []
        empty = []
        for nid, rs in per_node.items():
            free = sum(r.slots - len(r.assigned) - r.foreign for r in rs)
            (occupied if nodes[nid].used else empty).append((free, nodes[nid].seq, nid))
        occupied.sort()
        empty.sort(key=lambda t: t[1])
        _, _, nid = (occupied or empty)[0]
        res = min(per_node[nid], key=lambda r: len(r.assigned) + r.foreign)
        res.assigned[proc.upid] = proc.round
        node = nodes[nid]
        node.used += 1
        if proc.node_exclusive is not None:
            node.tags[proc.node_exclusive] = proc.upid
        out.append((proc.upid, res.resource_id))
    return out
