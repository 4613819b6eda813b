"""An agent's view of the Pending orders it could take (offer.py, agent.PendingOrders): sorted,
content-free, claimable from the first page; and the lazy division of the queue (fleet.divide)."""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Iterator
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.orders import AGENT_A, AGENT_B, CREATED, NOW, order_body, read, store
from workorder_operator import fleet, offer
from workorder_operator import lifecycle as lc
from workorder_operator.agent import Agent, PendingOrders, order_sort_key
from workorder_operator.kube import Page
from workorder_operator.model import WorkOrder
from workorder_operator.targeting import AgentIdentity

AGENT_C = "00000000-0000-4000-8000-000000000099"
BIG = "payload: " + "x" * 4000 + "\n"


def uid(i: int) -> str:
    return f"00000000-0000-4000-9000-{i:012d}"


def body(i: int, *, priority: int = 0, created: dt.datetime = CREATED, rv: int = 1, **spec: Any) -> dict[str, Any]:
    """A Pending order as the operator leaves it (initialised), 4 KB of content."""
    b = order_body({"yamlContent": BIG, "priority": priority, **spec}, name=f"wo-{i:03d}", uid=uid(i), created=created,
                   resource_version=str(rv))  # fmt: skip
    return store(b, lc.initialise(read(b), NOW))


def everyone(_: WorkOrder) -> bool:
    return True


def test_candidates_come_in_offer_order_whatever_order_they_were_put_in() -> None:
    later = CREATED + dt.timedelta(seconds=1)
    bodies = [body(1, created=later), body(2, priority=7, created=later), body(3, priority=7), body(4, priority=-1),
              body(5), body(0, created=later)]  # fmt: skip
    expected = sorted((read(b) for b in bodies), key=order_sort_key)
    for ordering in (bodies, list(reversed(bodies))):
        view = offer.Offer()
        for b in ordering:
            c = offer.candidate(b, everyone)
            assert c is not None
            view.put(c)
        assert [c.key for c in view] == [o.key for o in expected]
        assert len(view) == 6 and "team-a/wo-002" in view


def test_a_newer_version_replaces_the_old_and_only_the_version_tried_is_discarded() -> None:
    view = offer.Offer()
    old = offer.candidate(body(1, rv=1), everyone)
    new = offer.candidate(body(1, rv=2, priority=3), everyone)
    assert old is not None and new is not None
    view.put(old)
    other = body_candidate(body(2))
    view.put(other)
    view.put(new)  # the same order, moved up by its new priority
    assert old.resource_version != new.resource_version
    assert [(c.key, c.resource_version) for c in view] == [
        ("team-a/wo-001", new.resource_version),
        ("team-a/wo-002", other.resource_version),
    ]
    assert not view.discard(old.key, old.resource_version)  # a claim round tried the old version
    assert view.get(old.key) is new
    assert view.discard(new.key, new.resource_version)
    assert [c.key for c in view] == ["team-a/wo-002"]
    assert view.remove("team-a/wo-002") and not view.remove("team-a/wo-002") and len(view) == 0


def body_candidate(b: dict[str, Any]) -> offer.Candidate:
    c = offer.candidate(b, everyone)
    assert c is not None
    return c


def test_only_orders_the_agent_takes_are_kept() -> None:
    agent = Agent(None, AGENT_A, work_types=["build"], labels=["zone-a"])  # type: ignore[arg-type]
    assert offer.candidate(body(1), agent.takes) is not None
    assert offer.candidate(body(2, workType="test"), agent.takes) is None
    assert offer.candidate(body(3, targeting={"labels": ["zone-b"]}), agent.takes) is None
    assert offer.candidate(body(4, targeting={"labels": ["zone-a"]}), agent.takes) is not None
    claimed = store(body(5), lc.claim(read(body(5)), AgentIdentity(AGENT_B), NOW))
    assert offer.candidate(claimed, agent.takes) is None  # not Pending


def test_a_candidate_keeps_no_content_yet_builds_the_same_claim_write_as_the_whole_order() -> None:
    # An order with a past: a history, conditions, an error, a targeting, managed fields.
    agent = AgentIdentity(AGENT_A, ("zone-a",))
    b = body(1, targeting={"labels": ["zone-a"]}, maxRetries=5, claimTimeoutSeconds=60)
    b["metadata"]["managedFields"] = [{"manager": "x", "subresource": "status", "time": "2024-05-01T12:00:00Z"}]
    b = store(b, lc.claim(read(b), agent, NOW))
    b = store(b, lc.fail(read(b), AGENT_A, 1, "boom", NOW, retryable=True))
    b = store(b, lc.due(read(b), NOW + dt.timedelta(hours=1)))
    full = read(b)
    assert full.status.phase == "Pending" and full.status.history and full.raw_status.get("conditions")
    c = offer.candidate(b, everyone)
    assert c is not None
    assert BIG.encode() not in c.body and b"managedFields" not in c.body and len(c.body) < 2000
    assert c.stored() == offer.without_content(b)
    small = c.order()
    assert small.spec.yaml_content == ""  # no content, not some stand-in for it
    later = NOW + dt.timedelta(hours=2)
    assert lc.claim(small, agent, later, "alice") == lc.claim(full, agent, later, "alice")
    assert (small.key, small.uid, small.resource_version, small.spec.targeting) == (
        full.key, full.uid, full.resource_version, full.spec.targeting)  # fmt: skip
    assert c.sort_key == order_sort_key(full) and c.facts == fleet.Facts.of(full)
    assert c.facts.targeting == full.spec.targeting and c.facts.targeting is not None


def test_a_pending_order_is_kept_in_a_few_hundred_bytes() -> None:
    """Its status is mostly what every Pending order's is (the preset dictionary): 100,000 orders
    take tens of MB, not GB."""
    c = body_candidate(body(1))
    assert len(c.body) < 300 and c.stored() == offer.without_content(body(1))


def test_an_unreadable_order_raises_for_the_caller_to_skip() -> None:
    b = body(1)
    b["metadata"]["creationTimestamp"] = "0000-01-01T00:00:00Z"
    try:
        offer.candidate(b, everyone)
    except (KeyError, ValueError, TypeError):
        return
    raise AssertionError("an unreadable order was taken")


# --- the lazy division of the queue ---------------------------------------------------------------


def reference_divide(
    candidates: list[WorkOrder], me: fleet.Presence, peers: list[fleet.Presence], now: dt.datetime,
    steal_delay: float, limit: int | None,
) -> list[WorkOrder]:  # fmt: skip
    """The division as it was first written: every candidate ranked, then cut at the limit."""
    agents = [me, *(p for p in peers if p.agent.id.lower() != me.agent.id.lower())]
    mine = me.agent.id.lower()
    out: list[WorkOrder] = []
    for priority in sorted({o.spec.priority for o in candidates}, reverse=True):
        same = [o for o in candidates if o.spec.priority == priority]
        rank = {o.uid: (r.index(mine) if mine in (r := fleet.ranking(o, agents)) else len(agents)) for o in same}
        out += [o for o in same if rank[o.uid] == 0]
        late = [
            o for o in same if rank[o.uid] != 0 and now - fleet.waiting_since(o) >= dt.timedelta(seconds=steal_delay)
        ]
        out += sorted(late, key=lambda o: rank[o.uid])
    return out if limit is None else out[:limit]


def presence(agent_id: str, types: tuple[str, ...] = ()) -> fleet.Presence:
    return fleet.Presence("team-a", fleet.lease_name(agent_id), AgentIdentity(agent_id), types, "", ("team-a",),
                          30.0, NOW)  # fmt: skip


@settings(max_examples=150, deadline=None)
@given(
    orders=st.lists(
        st.tuples(st.integers(0, 2), st.integers(0, 5), st.booleans(), st.sampled_from(["build", "test"])),
        max_size=30,
    ),
    peers=st.lists(st.sampled_from([AGENT_B, AGENT_C]), unique=True, max_size=2),
    picky_peer=st.booleans(),
    elapsed=st.integers(0, 12),
    limit=st.none() | st.integers(1, 12),
)
def test_the_lazy_division_is_the_division_of_the_whole_list_cut_at_the_limit(
    orders: list[tuple[int, int, bool, str]], peers: list[str], picky_peer: bool, elapsed: int, limit: int | None
) -> None:
    built = []
    for i, (priority, age, retried, work_type) in enumerate(orders):
        b = body(i, priority=priority, created=CREATED + dt.timedelta(seconds=age), workType=work_type)
        if retried:  # back to Pending after a claim: it waits from its last status change
            b = store(b, lc.claim(read(b), AgentIdentity(AGENT_B), CREATED + dt.timedelta(seconds=age + 1)))
            b = store(b, lc.release(read(b), AGENT_B, 1, CREATED + dt.timedelta(seconds=age + 3)))
        built.append(read(b))
    in_offer_order = sorted(built, key=order_sort_key)
    me = presence(AGENT_A)
    seen = [presence(p, ("build",) if picky_peer else ()) for p in peers]
    now = CREATED + dt.timedelta(seconds=elapsed)
    expected = reference_divide(in_offer_order, me, seen, now, 2.0, limit)
    read_so_far: list[WorkOrder] = []

    def lazily() -> Iterator[WorkOrder]:
        for o in in_offer_order:
            read_so_far.append(o)
            yield o

    ranks: dict[str, int] = {}
    assert fleet.divide(lazily(), me, seen, now, 2.0, limit=limit, ranks=ranks) == expected
    assert set(ranks) <= {o.uid for o in read_so_far}
    # Candidates (no content) give the same answer as the orders.
    candidates = [body_candidate(b) for b in map(order_body_of, in_offer_order)]
    got = fleet.divide(iter(candidates), me, seen, now, 2.0, limit=limit, facts=lambda c: c.facts)
    assert [c.key for c in got] == [o.key for o in expected]
    if limit is not None and len(expected) == limit and not seen:
        assert len(read_so_far) == limit  # alone, the first `limit` are the answer: nothing more is read


def order_body_of(o: WorkOrder) -> dict[str, Any]:
    b = order_body({"yamlContent": BIG, "priority": o.spec.priority, "workType": o.spec.work_type}, name=o.name,
                   uid=o.uid, resource_version=o.resource_version, created=o.created_at)  # fmt: skip
    b["status"] = o.raw_status
    return b


def test_division_stops_reading_once_the_limit_is_reached() -> None:
    me, peer = presence(AGENT_A), presence(AGENT_B)
    orders = [read(body(i)) for i in range(200)]
    count = 0

    def lazily() -> Iterator[WorkOrder]:
        nonlocal count
        for o in orders:
            count += 1
            yield o

    mine = fleet.divide(lazily(), me, [peer], CREATED, 2.0, limit=5)
    assert len(mine) == 5 and count == orders.index(mine[-1]) + 1
    # A priority whose own and stolen orders reach the limit exactly: the next priority is not read
    # past its first order (the one that says the priority ended).
    urgent = [read(body(i, priority=1)) for i in range(1000, 1004)]
    count = 0
    orders = [*urgent, *orders]
    late = CREATED + dt.timedelta(seconds=2)
    assert len(fleet.divide(lazily(), me, [peer], late, 2.0, limit=4)) == 4 and count == 5


# --- the agent's live view ------------------------------------------------------------------------


class Pages:
    """`orders.pages` whose second page waits until the test lets it come; a watch that waits for stop."""

    def __init__(self, pages: list[list[dict[str, Any]]], stop: threading.Event) -> None:
        self.listing = pages
        self.release = threading.Event()
        self.listings = 0
        self.stop = stop

    def pages(self, *_: Any, **__: Any) -> Iterator[Page]:
        self.listings += 1
        for k, page in enumerate(self.listing):
            if k == 1:
                assert self.release.wait(10), "the test never let the second page come"
            yield Page(page, str(100 + k))

    def watch(self, *_: Any, **__: Any) -> Any:
        stop = self.stop

        class Watch:
            gone = False

            def __iter__(self) -> Iterator[tuple[str, dict[str, Any]]]:
                stop.wait(10)
                return iter(())

            def stop(self) -> None:
                stop.set()

        return Watch()


def agent_with(fake: Pages, page_size: int = 2) -> Agent:
    agent = Agent(None, AGENT_A, page_size=page_size)  # type: ignore[arg-type]
    agent.orders = fake  # type: ignore[assignment]
    return agent


def test_the_first_page_is_claimable_before_the_listing_ends_and_the_offer_is_exact_once_it_has() -> None:
    stop = threading.Event()
    first, second = [body(3), body(4)], [body(1, priority=5), body(2)]
    fake = Pages([first, second], stop)
    pending = PendingOrders(agent_with(fake), stop)
    pending.start()
    try:
        assert pending.changed.wait(5), "no wake-up after the first page"
        assert [o.name for o in pending.snapshot()] == ["wo-003", "wo-004"]  # best effort while listing
        chosen = pending.choose(lambda cs, n: [next(iter(cs))])
        assert chosen[0].key == "team-a/wo-003"
        pending.changed.clear()
        fake.release.set()
        assert pending.changed.wait(5)
        deadline = threading.Event()
        while len(pending) < 4 and not deadline.wait(0.01):
            pass
        assert [o.name for o in pending.snapshot()] == ["wo-001", "wo-002", "wo-003", "wo-004"]
    finally:
        pending.stop()
        fake.release.set()


def test_a_new_listing_replaces_the_view_when_it_is_complete_and_drops_what_it_no_longer_brings() -> None:
    stop = threading.Event()
    fake = Pages([[body(1), body(2)]], stop)
    fake.release.set()
    pending = PendingOrders(agent_with(fake), stop)
    pending._list()
    assert [o.name for o in pending.snapshot()] == ["wo-001", "wo-002"]
    # A re-list (410 Gone): page 1 brings wo-002 only; until page 2 is in, the old view stands.
    fake.listing = [[body(2, rv=7)], [body(3)]]
    fake.release.clear()
    relist = threading.Thread(target=pending._list)
    relist.start()
    try:
        relist.join(0.3)
        assert relist.is_alive()
        assert [o.name for o in pending.snapshot()] == ["wo-001", "wo-002"]
    finally:
        fake.release.set()
        relist.join(5)
    assert [(o.name, o.resource_version) for o in pending.snapshot()] == [
        ("wo-002", "8"),
        ("wo-003", "2"),
    ]  # initialised: +1
