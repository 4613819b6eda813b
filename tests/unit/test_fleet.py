"""The fleet of agents (fleet.py): the presence lease format, liveness on a fake clock, whose claims
a lost agent takes with it, and when a Pending order counts as unschedulable; and the engine acting
on them (fast failover, the Schedulable condition) against the in-memory store."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
from typing import Any

import pytest

from tests.unit.orders import AGENT_A, AGENT_B, NOW, order_body, read, store
from tests.unit.test_engine import HANG, Harness, claimed, initialised, uid
from workorder_operator import fleet
from workorder_operator import lifecycle as lc
from workorder_operator.fleet import Sighting
from workorder_operator.lifecycle import TransitionError
from workorder_operator.model import WorkOrder
from workorder_operator.targeting import AgentIdentity

ALICE, BOB = "system:serviceaccount:team-a:alice", "system:serviceaccount:team-a:bob"
A = AgentIdentity(AGENT_A, ("zone-a",), {"arch": "arm64"})


def lease(
    agent: AgentIdentity = A,
    *,
    user: str = ALICE,
    at: dt.datetime = NOW,
    duration: float = 30,
    types: tuple[str, ...] = ("build",),
    namespace: str = "team-a",
    namespaces: tuple[str, ...] | None = None,
    rv: int = 1,
) -> dict[str, Any]:
    body = fleet.lease_body(
        agent,
        work_types=types,
        user=user,
        namespaces=(namespace,) if namespaces is None else namespaces,
        duration=duration,
        now=at,
        acquired=True,
    )
    body["metadata"].update(namespace=namespace, uid=f"lease-{agent.id[:8]}", resourceVersion=str(rv))
    return body


def held(i: int, agent: str, user: str, at: dt.datetime = NOW, **spec: Any) -> dict[str, Any]:
    """An order claimed by `agent` as Kubernetes user `user` (claimTimeoutSeconds 3600 by default)."""
    b = initialised(order_body({"claimTimeoutSeconds": 3600, **spec}, name=f"wo-{i}", uid=uid(i)))
    return store(b, lc.claim(read(b), AgentIdentity(agent, ("zone-a",)), at, user))


def run(test: Any) -> None:
    asyncio.run(test())


# --- the lease format ---------------------------------------------------------------------------


def test_a_lease_says_who_the_agent_is_and_reads_back_the_same() -> None:
    body = lease(namespaces=())
    assert body["metadata"]["name"] == f"workorder-agent-{AGENT_A}"
    assert body["metadata"]["labels"] == {"workorder.dev/presence": "agent", "workorder.dev/agent-id": AGENT_A}
    assert body["spec"]["holderIdentity"] == AGENT_A and body["spec"]["leaseDurationSeconds"] == 30
    p = fleet.parse_lease(body)
    assert p.agent == A and p.work_types == ("build",) and p.user == ALICE and p.cluster_wide and p.namespaces == ()
    # Without the annotation, an agent takes orders where its lease is.
    del body["metadata"]["annotations"]["workorder.dev/namespaces"]
    assert fleet.parse_lease(body).namespaces == ("team-a",)
    assert p.renew_time == NOW and p.duration == 30 and p.key == f"team-a/workorder-agent-{AGENT_A}"
    assert fleet.is_presence(body) and not fleet.is_presence({"metadata": {"name": "workorder-operator"}})


def annotate(body: dict[str, Any], key: str, value: str) -> None:
    body["metadata"]["annotations"][key] = value


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda b: b["spec"].update(holderIdentity="node-1"), "spec.holderIdentity"),
        (lambda b: b["spec"].pop("leaseDurationSeconds"), "spec.leaseDurationSeconds"),
        (lambda b: b["metadata"]["annotations"].update({"workorder.dev/labels": "zone-a"}), "workorder.dev/labels"),
        (lambda b: b["metadata"]["annotations"].update({"workorder.dev/work-types": "{}"}), "workorder.dev/work-types"),
        (
            lambda b: b["metadata"]["annotations"].update({"workorder.dev/namespaces": "[1]"}),
            "workorder.dev/namespaces",
        ),
    ],
)
def test_a_malformed_lease_is_refused_naming_the_field(change: Any, field: str) -> None:
    body = lease()
    change(body)
    with pytest.raises(ValueError, match=field):
        fleet.parse_lease(body)


def test_a_lease_body_is_exactly_the_format_of_the_contract() -> None:
    """An agent in another language reads and writes these very keys (docs/CONTRACT.md)."""
    agent = AgentIdentity(AGENT_A.upper(), ("zone-a", "gpu"), {"zone": "a", "arch": "arm64"})
    renewal = fleet.lease_body(
        agent, work_types=("build", "test"), user=ALICE, namespaces=("team-a", "team-b"), duration=29.6, now=NOW
    )
    assert renewal == {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {
            "name": f"workorder-agent-{AGENT_A}",  # the id in lower case
            "labels": {"workorder.dev/presence": "agent", "workorder.dev/agent-id": AGENT_A},
            "annotations": {
                "workorder.dev/user": ALICE,
                "workorder.dev/work-types": '["build", "test"]',
                "workorder.dev/labels": '["zone-a", "gpu"]',
                "workorder.dev/annotations": '{"arch": "arm64", "zone": "a"}',  # keys sorted: renewals compare equal
                "workorder.dev/namespaces": '["team-a", "team-b"]',
            },
        },
        "spec": {
            "holderIdentity": AGENT_A.upper(),
            "leaseDurationSeconds": 30,
            "renewTime": "2024-05-01T12:30:00.250000Z",
        },
    }
    # Only the announcement that starts a term says when it was acquired.
    start = fleet.lease_body(agent, work_types=(), user=ALICE, namespaces=(), duration=30, now=NOW, acquired=True)
    assert start["spec"] == {**renewal["spec"], "acquireTime": "2024-05-01T12:30:00.250000Z"}
    assert start["metadata"]["annotations"]["workorder.dev/work-types"] == "[]"


def minimal(**spec: Any) -> dict[str, Any]:
    """A lease as a person writes it with kubectl (docs/CONTRACT.md): the user and work types only."""
    return {
        "metadata": {
            "name": f"workorder-agent-{AGENT_A}",
            "namespace": "team-a",
            "annotations": {"workorder.dev/user": ALICE, "workorder.dev/work-types": '["backup"]'},
        },
        "spec": {"holderIdentity": AGENT_A, "leaseDurationSeconds": 30, **spec},
    }


def test_a_minimal_lease_reads_with_the_defaults_of_the_contract() -> None:
    p = fleet.parse_lease(minimal(renewTime="2024-05-01T12:30:00.250000Z"))
    assert p.agent == AgentIdentity(AGENT_A, (), {}) and p.work_types == ("backup",) and p.user == ALICE
    assert p.namespaces == ("team-a",) and p.renew_time == NOW and p.duration == 30
    # Its last sign of life: renewTime, else acquireTime, else none (never renewed).
    later = NOW + dt.timedelta(seconds=10)
    both = minimal(renewTime="2024-05-01T12:30:10.250000Z", acquireTime="2024-05-01T12:30:00.250000Z")
    assert fleet.parse_lease(both).renew_time == later
    assert fleet.parse_lease(minimal(acquireTime="2024-05-01T12:30:00.250000Z")).renew_time == NOW
    assert fleet.parse_lease(minimal()).renew_time is None
    # Without annotations: every work type, no user (so it never speaks for a claim), no targeting.
    bare = minimal()
    del bare["metadata"]["annotations"]
    p = fleet.parse_lease(bare)
    assert (p.work_types, p.user, p.agent.labels, p.agent.annotations) == ((), "", (), {})
    assert fleet.lost_reason(Sighting(p, NOW)) == (
        f"agent {AGENT_A} lost: its presence lease team-a/workorder-agent-{AGENT_A} "
        "was not renewed within 30s + 2s grace"
    )
    # Nor name nor namespace (not yet created): empty, never the string 'None'.
    del bare["metadata"]["name"], bare["metadata"]["namespace"]
    p = fleet.parse_lease(bare)
    assert (p.name, p.namespace, p.namespaces, p.key) == ("", "", ("",), "/")


def test_a_lease_term_is_a_whole_number_of_seconds_from_1_to_3600() -> None:
    assert fleet.parse_lease(minimal(leaseDurationSeconds=1)).duration == 1
    assert fleet.parse_lease(minimal(leaseDurationSeconds=3601)).duration == 3600  # believed up to an hour
    for bad in (0, 1.5, "30"):
        with pytest.raises(ValueError) as refused:
            fleet.parse_lease(minimal(leaseDurationSeconds=bad))
        assert str(refused.value) == f"spec.leaseDurationSeconds: {bad!r} is not a whole number of seconds >= 1"
    # What an agent writes is always in range.
    assert [fleet.lease_body(A, work_types=(), user=ALICE, namespaces=(), duration=d, now=NOW)["spec"]
            ["leaseDurationSeconds"] for d in (0.2, 1.4, 7200)] == [1, 1, 3600]  # fmt: skip


def test_a_malformed_lease_says_which_field_and_what_it_holds() -> None:
    body = lease()
    body["spec"]["holderIdentity"] = "node-1"
    with pytest.raises(ValueError) as refused:
        fleet.parse_lease(body)
    assert str(refused.value).startswith("spec.holderIdentity 'node-1' is not a UUID")
    # The value is quoted up to 80 characters.
    long = "zone-a, " * 20
    body = lease()
    annotate(body, "workorder.dev/labels", long)
    with pytest.raises(ValueError) as refused:
        fleet.parse_lease(body)
    assert str(refused.value) == f"annotation workorder.dev/labels: not JSON ({long[:80]!r})"
    mapping = '{"zone": "' + "a" * 100 + '"}'
    annotate(body, "workorder.dev/labels", mapping)
    with pytest.raises(ValueError) as refused:
        fleet.parse_lease(body)
    assert str(refused.value) == f"annotation workorder.dev/labels: expected a JSON list, got {mapping[:80]!r}"


# --- liveness -----------------------------------------------------------------------------------


def test_an_agent_is_lost_once_its_term_and_the_grace_have_passed_since_its_last_renewal_seen() -> None:
    p = fleet.parse_lease(lease(duration=5))
    seen = NOW + dt.timedelta(seconds=0.3)  # the watch brought it a moment later
    s = Sighting(p, seen)
    assert s.lost_at(2) == seen + dt.timedelta(seconds=7)
    assert s.live(seen + dt.timedelta(seconds=6.99), 2)
    assert not s.live(seen + dt.timedelta(seconds=7), 2)
    # Without a sighting (a person listing agents) the lease's own renewTime counts.
    assert fleet.lost_at(p, None, 2) == NOW + dt.timedelta(seconds=7)


def test_a_slow_or_fast_agent_clock_never_makes_it_lost_early_nor_keeps_it_alive() -> None:
    behind = fleet.parse_lease(lease(at=NOW - dt.timedelta(minutes=10), duration=5))
    assert Sighting(behind, NOW).lost_at(2) == NOW + dt.timedelta(seconds=7)  # counted from when it was seen
    ahead = fleet.parse_lease(lease(at=NOW + dt.timedelta(days=365), duration=5))
    assert Sighting(ahead, NOW).lost_at(2) == NOW + dt.timedelta(seconds=7)  # a year ahead is not believed


def test_a_deleted_lease_is_lost_at_once() -> None:
    s = Sighting(fleet.parse_lease(lease()), NOW, gone_at=NOW + dt.timedelta(seconds=1))
    assert s.lost_at(2) == NOW + dt.timedelta(seconds=1)
    assert fleet.lost_reason(s) == f"agent {AGENT_A} (user {ALICE}) lost: its presence lease team-a/" + (
        f"workorder-agent-{AGENT_A} was deleted"
    )


def test_the_grace_given_is_the_grace_used() -> None:
    p = fleet.parse_lease(lease(duration=5))
    s = Sighting(p, NOW)
    assert s.lost_at(0) == NOW + dt.timedelta(seconds=5)
    assert s.lost_at(10) == NOW + dt.timedelta(seconds=15)
    assert fleet.live([s], NOW + dt.timedelta(seconds=4.99), grace=0) == [p]
    assert fleet.live([s], NOW + dt.timedelta(seconds=5), grace=0) == []
    assert fleet.live([s], NOW + dt.timedelta(seconds=14.99), grace=10) == [p]
    assert fleet.live([s], NOW + dt.timedelta(seconds=15), grace=10) == []


def test_a_lease_never_renewed_is_lost_for_a_person_listing_and_lives_its_term_once_seen() -> None:
    p = fleet.parse_lease(minimal())
    assert fleet.lost_at(p) == dt.datetime.min.replace(tzinfo=dt.UTC) and fleet.lost_at(p) < NOW
    assert Sighting(p, NOW).lost_at() == NOW + dt.timedelta(seconds=32)


def test_a_lapsed_lease_says_who_and_when_it_was_last_renewed() -> None:
    s = Sighting(fleet.parse_lease(lease(duration=5)), NOW)
    assert fleet.lost_reason(s) == (
        f"agent {AGENT_A} (user {ALICE}) lost: its presence lease team-a/workorder-agent-{AGENT_A} "
        "was not renewed within 5s + 2s grace; last renewal 2024-05-01T12:30:00.250000Z"
    )


# --- whose claims -------------------------------------------------------------------------------


def test_a_lease_speaks_only_for_claims_of_its_agent_id_and_its_user_in_its_scope() -> None:
    s = Sighting(fleet.parse_lease(lease()), NOW)
    ours = read(held(1, AGENT_A, ALICE))
    assert fleet.holder_lost_at(ours, [s]) == (s.lost_at(), s)
    # Same agent id, another identity (a forger announcing itself under A's id, or A's id reused):
    # nothing to do with this lease.
    assert fleet.holder_lost_at(read(held(2, AGENT_A, BOB)), [s]) is None
    # A claim that records no user (a minimal agent) is never expired for presence.
    assert fleet.holder_lost_at(read(held(3, AGENT_A, "")), [s]) is None
    assert fleet.holder_lost_at(read(held(4, AGENT_B, ALICE)), [s]) is None
    elsewhere = read(held(5, AGENT_A, ALICE)).model_copy(update={"namespace": "team-b"})
    assert fleet.holder_lost_at(elsewhere, [s]) is None
    # A cluster-wide agent holds claims everywhere.
    everywhere = Sighting(fleet.parse_lease(lease(namespaces=(), namespace="agents")), NOW)
    assert fleet.holder_lost_at(elsewhere, [everywhere]) is not None
    # Not claimed: nothing to expire.
    assert fleet.holder_lost_at(read(initialised(order_body())), [s]) is None


def test_an_agent_announced_in_two_places_lives_while_either_lease_does() -> None:
    old = Sighting(fleet.parse_lease(lease(namespace="agents", namespaces=())), NOW, gone_at=NOW)
    fresh = Sighting(fleet.parse_lease(lease(at=NOW + dt.timedelta(seconds=20))), NOW + dt.timedelta(seconds=20))
    at, which = fleet.holder_lost_at(read(held(1, AGENT_A, ALICE)), [old, fresh]) or (None, None)
    assert which is fresh and at == fresh.lost_at()


# --- schedulability -----------------------------------------------------------------------------


def pending(i: int = 1, **spec: Any) -> WorkOrder:
    return read(initialised(order_body({"workType": "build", **spec}, name=f"wo-{i}", uid=uid(i))))


def test_an_order_no_live_agent_takes_is_unschedulable_after_the_grace_and_clear_once_one_can() -> None:
    agents = [fleet.parse_lease(lease(types=("test",)))]
    order = pending()
    since, change = fleet.scheduling(order, agents, None, NOW, 30)
    assert (since, change) == (NOW, None)  # not yet: the grace has just begun
    since, change = fleet.scheduling(order, agents, since, NOW + dt.timedelta(seconds=29.9), 30)
    assert (since, change) == (NOW, None)
    assert fleet.scheduling(order, agents, since, NOW + dt.timedelta(seconds=30), 30) == (NOW, False)
    marked = read(store(initialised(order_body({"workType": "build"}, name="wo-1", uid=uid(1))),
                        lc.scheduling(order, NOW, (fleet.NO_MATCHING_AGENT, "nobody"))))  # fmt: skip
    assert fleet.unschedulable(marked)
    assert fleet.scheduling(marked, agents, NOW, NOW + dt.timedelta(seconds=60), 30) == (NOW, None)  # written once
    builder = [fleet.parse_lease(lease())]
    assert fleet.scheduling(marked, builder, NOW, NOW + dt.timedelta(seconds=61), 30) == (None, True)
    assert fleet.scheduling(order, builder, NOW, NOW + dt.timedelta(seconds=61), 30) == (None, None)


def test_targeting_and_namespace_decide_who_can_take_an_order() -> None:
    a = fleet.parse_lease(lease(types=()))  # every type, label zone-a, annotation arch=arm64
    assert a.takes(pending(targeting={"labels": ["zone-a"]}))
    assert a.takes(pending(targeting={"annotations": {"arch": "arm64"}}))
    assert not a.takes(pending(targeting={"labels": ["gpu"]}))
    assert not a.takes(pending().model_copy(update={"namespace": "team-b"}))
    message = fleet.no_agent_message(pending(targeting={"labels": ["gpu"]}), [a])
    assert "work type build with targeting labels ['gpu']" in message and "1 live agent announced here" in message


def test_only_initialised_pending_orders_are_judged() -> None:
    fresh = read(order_body({"workType": "build"}))  # conditions not written yet: initialise comes first
    assert fleet.scheduling(fresh, [], None, NOW, 0) == (None, None)
    assert fleet.scheduling(read(held(1, AGENT_A, ALICE)), [], None, NOW, 0) == (None, None)


def test_the_schedulable_mark_is_a_condition_only_and_any_claim_drops_it() -> None:
    b = initialised(order_body({"workType": "build"}))
    marked_body = store(b, lc.scheduling(read(b), NOW, (fleet.NO_MATCHING_AGENT, "no live agent takes it")))
    marked = read(marked_body)
    c = marked.status.condition("Schedulable")
    assert c is not None and (c.status, c.reason) == ("False", "NoMatchingAgent")
    assert marked.status.phase == "Pending" and lc.conditions_true(marked)
    assert {k: v for k, v in marked.raw_status.items() if k != "conditions"} == {
        k: v for k, v in read(b).raw_status.items() if k != "conditions"
    }
    with pytest.raises(TransitionError):
        lc.scheduling(read(b), NOW)  # nothing to clear
    claimed_body = store(marked_body, lc.claim(marked, A, NOW, ALICE))
    assert read(claimed_body).status.condition("Schedulable") is None
    cleared = read(store(marked_body, lc.scheduling(marked, NOW)))
    assert cleared.status.condition("Schedulable") is None and lc.conditions_true(cleared)


def test_an_unschedulable_order_says_all_it_asks_for_and_how_many_agents_are_there() -> None:
    wants = pending(targeting={"agentIds": [AGENT_B], "labels": ["gpu"], "annotations": {"arch": "x86"}})
    targeting = f"agentIds ['{AGENT_B}'], labels ['gpu'], annotations {{'arch': 'x86'}}"
    tail = "announced here; see kubectl workorder agents)"
    assert fleet.no_agent_message(wants, []) == (
        f"no live agent takes work type build with targeting {targeting} in namespace team-a (0 live agents {tail}"
    )
    two = [fleet.parse_lease(lease()), fleet.parse_lease(lease(AgentIdentity(AGENT_B)))]
    elsewhere = fleet.parse_lease(lease(AgentIdentity(AGENT_B), namespace="team-b"))
    assert fleet.no_agent_message(pending(), [*two, elsewhere]) == (
        f"no live agent takes work type build in namespace team-a (2 live agents {tail}"
    )
    assert fleet.no_agent_message(pending(), two[:1]).endswith(f"(1 live agent {tail}")


# --- the engine: fast failover ------------------------------------------------------------------


def test_a_lapsed_lease_expires_its_agents_claims_at_once_and_no_one_elses() -> None:
    """Agent A (user alice) announced with a 5 s lease and holds wo-1 (claimTimeoutSeconds 3600).
    Its lease lapses: wo-1 expires after 5 s + 2 s grace, with AgentLost. B's claim (wo-2), and a
    claim under A's id by another user (wo-3), are untouched."""

    async def test() -> None:
        h = Harness([held(1, AGENT_A, ALICE), held(2, AGENT_B, ALICE), held(3, AGENT_A, BOB)], presence_grace=2)
        h.engine.observe_presence("ADDED", lease(duration=5))
        h.engine.observe_presence("ADDED", lease(AgentIdentity(AGENT_B), duration=5))
        h.engine.lead()
        for _ in range(3):  # B keeps renewing; A does not
            await h.step(2)
            h.engine.observe_presence("MODIFIED", lease(AgentIdentity(AGENT_B), at=h.clock.now, duration=5))
        assert h.phase(1) == "Claimed"  # 6 s: within 5 s + 2 s
        await h.step(1)
        assert [h.phase(i) for i in (1, 2, 3)] == ["Pending", "Claimed", "Claimed"]
        last = h.store.bodies[("team-a", "wo-1")]["status"]
        assert last["history"][-1]["outcome"] == "Expired"
        assert last["lastError"].startswith(f"claim of agent {AGENT_A} (attempt 1) expired: agent {AGENT_A}")
        assert "was not renewed within 5s + 2s grace" in last["lastError"]
        await h.engine.follow()
        reasons = [(name, reason) for name, reason, _ in h.events()]
        assert ("wo-1", "AgentLost") in reasons and ("wo-1", "Expire") in reasons
        assert not any(name != "wo-1" for name, _ in reasons)

    run(test)


def test_a_renewing_agent_keeps_its_claims_and_a_deleted_lease_expires_them_at_once() -> None:
    async def test() -> None:
        h = Harness([held(1, AGENT_A, ALICE)], presence_grace=2)
        h.engine.observe_presence("ADDED", lease(duration=5))
        h.engine.lead()
        for _ in range(10):  # 20 s of renewals every 2 s
            await h.step(2)
            h.engine.observe_presence("MODIFIED", lease(at=h.clock.now, duration=5))
        assert h.phase(1) == "Claimed"
        h.engine.observe_presence("DELETED", lease(duration=5))
        await h.step(0)
        assert h.phase(1) == "Pending"
        assert "was deleted" in h.store.bodies[("team-a", "wo-1")]["status"]["lastError"]
        await h.engine.follow()

    run(test)


def test_an_agent_that_never_announced_keeps_the_timeout_only() -> None:
    async def test() -> None:
        h = Harness([claimed(1, NOW, timeout=60)], presence_grace=2)
        h.engine.lead()
        await h.step(59)
        assert h.phase(1) == "Claimed"
        await h.step(1)
        assert h.phase(1) == "Pending"
        assert "no renewal within 60s" in h.store.bodies[("team-a", "wo-1")]["status"]["lastError"]
        await h.engine.follow()

    run(test)


def test_a_lease_listing_without_a_known_lease_counts_it_deleted() -> None:
    async def test() -> None:
        h = Harness([held(1, AGENT_A, ALICE)], presence_grace=2)
        h.engine.presence_listed([lease()])
        h.engine.lead()
        await h.step(1)
        assert h.phase(1) == "Claimed"
        h.engine.presence_listed([])  # the watch was down while it was deleted
        await h.step(0)
        assert h.phase(1) == "Pending"
        await h.engine.follow()

    run(test)


# --- the engine: unschedulable orders -----------------------------------------------------------


def test_unschedulable_orders_are_marked_after_the_grace_within_a_write_cap_and_cleared_by_an_agent() -> None:
    async def test() -> None:
        bodies = [initialised(order_body({"workType": "build"}, name=f"wo-{i}", uid=uid(i))) for i in range(5)]
        h = Harness(bodies, unschedulable_grace=30, scheduling_writes=3)
        h.engine.observe_presence("ADDED", lease(types=("test",), duration=3600))
        h.engine.lead()
        assert await h.engine.scheduling_pass() == 0
        h.clock.advance(30)
        assert await h.engine.scheduling_pass() == 3  # the cap
        h.deliver()
        assert await h.engine.scheduling_pass() == 2  # the rest, next pass
        h.deliver()
        assert await h.engine.scheduling_pass() == 0  # nothing changed: no write
        for i in range(5):
            c = read(h.store.bodies[("team-a", f"wo-{i}")]).status.condition("Schedulable")
            assert c is not None and c.reason == "NoMatchingAgent" and "work type build" in c.message
        # A build agent appears: the marks are cleared (within the cap per pass).
        h.engine.observe_presence("ADDED", lease(AgentIdentity(AGENT_B), types=("build",), duration=3600))
        assert await h.engine.scheduling_pass() == 3
        h.deliver()
        assert await h.engine.scheduling_pass() == 2
        h.deliver()
        assert all(read(b).status.condition("Schedulable") is None for b in h.store.bodies.values())
        await h.engine.follow()
        warnings = [n for n, reason, _ in h.events() if reason == "NoMatchingAgent"]
        assert sorted(warnings) == [f"wo-{i}" for i in range(5)]

    run(test)


def test_the_takers_key_changes_with_what_agents_take_not_with_their_renewals() -> None:
    def key(*bodies: dict[str, Any]) -> frozenset[tuple[Any, ...]]:
        return fleet.takers_key([fleet.parse_lease(b) for b in bodies])

    base = key(lease())
    assert key(lease(at=NOW + dt.timedelta(seconds=9), duration=60, user=BOB, rv=7)) == base
    assert key(lease(AgentIdentity(AGENT_A.upper(), A.labels, A.annotations))) == base  # ids: any case
    for other in (
        lease(AgentIdentity(AGENT_B, A.labels, A.annotations)),
        lease(AgentIdentity(AGENT_A, ("zone-b",), A.annotations)),
        lease(AgentIdentity(AGENT_A, A.labels, {"arch": "amd64"})),
        lease(types=("test",)),
        lease(namespaces=("team-b",)),
    ):
        assert key(other) != base
    assert key(lease(), lease(AgentIdentity(AGENT_B))) != base
    assert key() == frozenset()


def test_an_idle_pass_judges_only_the_orders_that_changed_or_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    """At 100,000 orders a look at each one costs seconds of CPU every pass: while the agents would
    take the same orders, a pass judges only orders that changed or whose grace is running."""
    judged: list[str] = []
    real = fleet.scheduling

    def counting(order: WorkOrder, *args: Any) -> tuple[dt.datetime | None, bool | None]:
        judged.append(order.name)
        return real(order, *args)

    monkeypatch.setattr(fleet, "scheduling", counting)

    async def test() -> None:
        bodies = [initialised(order_body({"workType": "build"}, name=f"wo-{i}", uid=uid(i))) for i in range(5)]
        bodies.append(initialised(order_body({"workType": "test"}, name="wo-9", uid=uid(9))))
        h = Harness(bodies, unschedulable_grace=30, presence_grace=2)
        h.engine.observe_presence("ADDED", lease(duration=60))  # takes build, not test
        h.engine.lead()

        async def judging() -> list[str]:
            judged.clear()
            await h.engine.scheduling_pass()
            h.deliver()
            return sorted(judged)

        assert len(await judging()) == 6  # the first pass looks at everything
        h.clock.advance(4)
        h.engine.observe_presence("MODIFIED", lease(at=h.clock.now, duration=60, rv=2))  # a renewal
        assert await judging() == ["wo-9"]  # only the one whose grace runs
        h.clock.advance(30)
        assert await judging() == ["wo-9"]  # marked now (its new version is judged once more)
        assert await judging() == ["wo-9"]
        assert await judging() == []  # marked, and nothing changed: nothing to judge
        h.engine.observe("MODIFIED", store(h.store.bodies[("team-a", "wo-2")], lc.claim(
            read(h.store.bodies[("team-a", "wo-2")]), AgentIdentity(AGENT_A), h.clock.now, ALICE)))  # fmt: skip
        assert await judging() == ["wo-2"]
        # The agent lapses (no event: time alone): everything is judged again.
        h.clock.advance(40)
        assert len(await judging()) == 6
        await h.engine.follow()

    run(test)


def test_a_new_order_a_live_agent_would_take_waits_without_a_write_until_none_would() -> None:
    """On a backlog the initialise write was a request per order that the claim makes anyway."""

    async def test() -> None:
        bodies = [order_body({"workType": "build"}, name="wo-1", uid=uid(1)),
                  order_body({"workType": "test"}, name="wo-2", uid=uid(2))]  # fmt: skip
        h = Harness(bodies, unschedulable_grace=30, presence_grace=2)
        h.engine.observe_presence("ADDED", lease(duration=60))  # takes build, not test
        h.engine.lead()
        await h.engine.scheduling_pass()
        await h.step(10)  # past the initialise grace (5 s)

        def conditions(name: str) -> Any:
            return h.store.bodies[("team-a", name)]["status"].get("conditions")

        assert conditions("wo-1") is None  # an agent will claim it: nothing written
        assert conditions("wo-2") is not None  # nobody would: "waiting for an agent", as before
        await h.engine.scheduling_pass()
        await h.step(10)
        assert conditions("wo-1") is None
        h.engine.observe_presence("DELETED", lease(duration=60))
        await h.engine.scheduling_pass()
        await h.step(0)
        assert [c["reason"] for c in conditions("wo-1")] == ["Pending"] * 3
        await h.engine.follow()

    run(test)


def test_a_lost_agent_no_longer_makes_orders_schedulable() -> None:
    async def test() -> None:
        h = Harness([initialised(order_body({"workType": "build"}))], unschedulable_grace=10, presence_grace=2)
        h.engine.observe_presence("ADDED", lease(duration=5))
        h.engine.lead()
        h.clock.advance(6)
        assert await h.engine.scheduling_pass() == 0  # still live: 5 s + 2 s
        h.clock.advance(1)
        await h.engine.scheduling_pass()  # lost: the grace of the order starts now
        h.clock.advance(10)
        assert await h.engine.scheduling_pass() == 1
        await asyncio.wait_for(h.engine.follow(), HANG)

    run(test)


# --- dividing the queue -------------------------------------------------------------------------


def test_rendezvous_weights_are_stable_and_spread_orders_evenly_over_agents() -> None:
    assert fleet.weight("ABC", "DEF") == fleet.weight("abc", "def")  # ids are compared in lower case
    assert fleet.weight(uid(1), AGENT_A) == int.from_bytes(hashlib.sha256(f"{uid(1)}/{AGENT_A}".encode()).digest()[:8])
    agents = [fleet.parse_lease(lease(AgentIdentity(f"00000000-0000-4000-8000-{k:012d}"), types=()))
              for k in range(4)]  # fmt: skip
    owners = [fleet.ranked_first(pending(i), agents) for i in range(400)]
    counts = {a.agent.id: owners.count(a.agent.id) for a in agents}
    assert all(60 <= c <= 140 for c in counts.values()), counts
    # Adding a fifth agent moves only the orders it now ranks first (about a fifth of them).
    fifth = fleet.parse_lease(lease(AgentIdentity("00000000-0000-4000-8000-000000000099"), types=()))
    moved = [i for i in range(400) if fleet.ranked_first(pending(i), [*agents, fifth]) != owners[i]]
    assert all(fleet.ranked_first(pending(i), [*agents, fifth]) == fifth.agent.id for i in moved)
    assert 40 <= len(moved) <= 130


def test_an_agent_tries_the_orders_it_ranks_first_and_any_that_waited_past_the_steal_delay() -> None:
    me = fleet.parse_lease(lease(AgentIdentity(AGENT_A), types=()))
    peer = fleet.parse_lease(lease(AgentIdentity(AGENT_B), types=()))
    orders = [pending(i) for i in range(40)]
    fresh = orders[0].created_at  # just created
    mine = fleet.divide(orders, me, [peer], fresh, steal_delay=2)
    theirs = fleet.divide(orders, peer, [me], fresh, steal_delay=2)
    assert mine and theirs and not {o.uid for o in mine} & {o.uid for o in theirs}
    assert {o.uid for o in mine} | {o.uid for o in theirs} == {o.uid for o in orders}
    assert mine == [o for o in orders if o in mine]  # offer order kept
    # A peer that does not take the work type ranks nothing: everything is mine.
    picky = fleet.parse_lease(lease(AgentIdentity(AGENT_B), types=("other",)))
    assert fleet.divide(orders, me, [picky], fresh) == orders
    # Past the steal delay every order is anyone's, its own share first.
    later = fleet.divide(orders, me, [peer], fresh + dt.timedelta(seconds=2), steal_delay=2)
    assert later == mine + [o for o in orders if o not in mine]
    # Priority first, always: a higher-priority order of the peer's comes before a lower one of mine.
    urgent = next(pending(i, priority=5) for i in range(100, 200)
                  if fleet.ranked_first(pending(i), [me, peer]) == AGENT_B)  # fmt: skip
    assert fleet.divide([urgent, *orders], me, [peer], fresh + dt.timedelta(seconds=2), 2)[0] == urgent  # offer order
    # An order back to Pending after a claim waits from its last status change, not its creation.
    i = next(i for i in range(50, 100) if fleet.ranked_first(pending(i), [me, peer]) == AGENT_B)
    b = held(i, AGENT_B, ALICE, at=fresh + dt.timedelta(hours=1))
    released = read(store(b, lc.release(read(b), AGENT_B, 1, fresh + dt.timedelta(hours=1, seconds=1))))
    assert fleet.divide([released], me, [peer], fresh + dt.timedelta(hours=1, seconds=2), 2) == []
    assert fleet.divide([released], me, [peer], fresh + dt.timedelta(hours=1, seconds=3), 2) == [released]


def test_the_weight_is_the_contracts_known_answer() -> None:
    """sha256("6f1c2a9e-0000-4000-8000-00000000000a/5b8e0c0e-1d2f-4c3b-8a9e-7f6d5c4b3a21"), first 8 bytes
    big-endian: the same in any language (checked with sha256sum), whatever the case of the ids."""
    assert fleet.weight("6F1C2A9E-0000-4000-8000-00000000000A", AGENT_A.upper()) == 0x9D00E55354F25475
    # The highest weight ranks first: B's is 0x85427B9F8E44CEF9, C's 0x34B9D056D8EDEFFC.
    c = "00000000-0000-4000-8000-000000000099"
    order = read(initialised(order_body({"workType": "build"}, uid="6f1c2a9e-0000-4000-8000-00000000000a")))
    agents = [fleet.parse_lease(lease(AgentIdentity(i), types=())) for i in (c, AGENT_B, AGENT_A)]
    assert fleet.ranking(order, agents) == [AGENT_A, AGENT_B, c] and fleet.ranked_first(order, agents) == AGENT_A


def test_an_order_no_agent_takes_is_ranked_by_nobody() -> None:
    picky = fleet.parse_lease(lease(types=("other",)))
    assert fleet.ranked_first(pending(), []) is None and fleet.ranked_first(pending(), [picky]) is None


def share(me: fleet.Presence, peer: fleet.Presence, owner: fleet.Presence, priority: int, skip: int = 0) -> WorkOrder:
    """A fresh order of `priority` that `owner` ranks first of me and peer."""
    return [pending(i, priority=priority) for i in range(1000, 1100)
            if fleet.ranked_first(pending(i), [me, peer]) == owner.agent.id][skip]  # fmt: skip


def test_within_each_priority_an_agent_takes_its_share_before_the_orders_it_steals() -> None:
    me = fleet.parse_lease(lease(AgentIdentity(AGENT_A), types=()))
    peer = fleet.parse_lease(lease(AgentIdentity(AGENT_B), types=()))
    theirs, mine, low = share(me, peer, peer, 5), share(me, peer, me, 5), share(me, peer, me, 0, skip=1)
    late = theirs.created_at + dt.timedelta(seconds=2)
    assert fleet.divide([theirs, mine, low], me, [peer], late, 2) == [mine, theirs, low]  # from offer order


def test_an_agent_is_judged_by_what_it_takes_now_not_by_its_own_lease_among_its_peers() -> None:
    """Its peers are all the leases it sees, its own included, which may still say what it took
    before a restart: that read does not rank orders for it."""
    me = fleet.parse_lease(lease(AgentIdentity(AGENT_A), types=("test",)))
    before = fleet.parse_lease(lease(AgentIdentity(AGENT_A), types=()))
    order = pending()
    assert fleet.divide([order], me, [before], order.created_at, 2) == []
    assert fleet.divide([order], me, [before], order.created_at + dt.timedelta(seconds=2), 2) == [order]


def test_the_caller_s_cache_of_ranks_is_believed() -> None:
    me = fleet.parse_lease(lease(AgentIdentity(AGENT_A), types=()))
    peer = fleet.parse_lease(lease(AgentIdentity(AGENT_B), types=()))
    orders = [pending(i) for i in range(20)]
    fresh = orders[0].created_at
    ranks: dict[str, int] = {}
    mine = fleet.divide(orders, me, [peer], fresh, 2, ranks=ranks)
    assert mine != orders and set(ranks) == {o.uid for o in orders}
    # An order's rank is taken from the cache, not computed again (the caller empties it when the
    # agents change).
    assert fleet.divide(orders, me, [peer], fresh, 2, ranks=dict.fromkeys(ranks, 0)) == orders
    assert fleet.divide(orders, me, [peer], fresh, 2, ranks=ranks) == mine


def test_with_a_limit_only_the_first_wanted_orders_are_ranked() -> None:
    me = fleet.parse_lease(lease(AgentIdentity(AGENT_A), types=()))
    peer = fleet.parse_lease(lease(AgentIdentity(AGENT_B), types=()))
    orders = [pending(i) for i in range(40)]
    fresh = orders[0].created_at
    mine = fleet.divide(orders, me, [peer], fresh, 2)
    ranks: dict[str, int] = {}
    assert fleet.divide(orders, me, [peer], fresh, 2, limit=3, ranks=ranks) == mine[:3]
    assert list(ranks) == [o.uid for o in orders[: orders.index(mine[2]) + 1]]  # not one order more
    # Past the steal delay a priority's stolen orders come at once, and the list still stops at the limit.
    later = fresh + dt.timedelta(seconds=2)
    everything = fleet.divide(orders, me, [peer], later, 2)
    assert fleet.divide(orders, me, [peer], later, 2, limit=len(mine) + 1) == everything[: len(mine) + 1]


def test_on_a_backlog_agents_steal_the_orders_they_rank_next_first_so_they_steal_different_ones() -> None:
    agents = [fleet.parse_lease(lease(AgentIdentity(f"00000000-0000-4000-8000-{k:012d}"), types=()))
              for k in range(4)]  # fmt: skip
    orders = [pending(i) for i in range(200)]
    waited = orders[0].created_at + dt.timedelta(seconds=3)  # every order is past the steal delay
    me, peers = agents[0], agents[1:]
    tried = fleet.divide(orders, me, peers, waited, steal_delay=2)
    assert sorted(o.uid for o in tried) == sorted(o.uid for o in orders)  # nothing left waiting
    rank = [fleet.ranking(o, agents).index(me.agent.id) for o in tried]
    assert rank == sorted(rank), "its own share, then the orders it ranks second, third, fourth"
    for r in range(4):  # offer order (oldest first) within a rank
        group = [o for o, k in zip(tried, rank, strict=True) if k == r]
        assert group == [o for o in orders if o in group]
    # The first stolen orders of two agents differ: they do not all race for the oldest one.
    firsts = []
    for a in agents:
        first_stolen = next(o for o in fleet.divide(orders, a, [p for p in agents if p is not a], waited, 2)
                            if fleet.ranked_first(o, agents) != a.agent.id)  # fmt: skip
        firsts.append(first_stolen.uid)
    assert len(set(firsts)) == len(agents)
    # The cache of ranks gives the same answer and holds this agent's rank per order.
    ranks: dict[str, int] = {}
    assert fleet.divide(orders, me, peers, waited, 2, ranks=ranks) == tried
    assert ranks == {o.uid: fleet.ranking(o, agents).index(me.agent.id) for o in orders}
