"""The fleet of agents: presence Leases, liveness, and who can take which order. Pure.

An agent announces itself with a `coordination.k8s.io/v1` Lease it renews (the Kubernetes
heartbeat, as node leases are): its id, work types, labels, annotations and the Kubernetes
username it runs as (docs/CONTRACT.md, "Agent presence"). This module is that format (build and
parse), and the decisions taken on it: when an agent counts as lost, whose claims its loss
expires, and whether any live agent can take a Pending order. The I/O is in `presence` (the
Lease adapter), `agent` (the heartbeat) and `engine` (the operator's reactions).

Who can be believed: a presence lease names a Kubernetes user, and the admission policy
(deploy/base/admission.yaml) lets only that user create, renew or delete it. The operator
expires a claim for a lost agent only when the claim's holder (claimedBy) and its
claimedByUser are the lease's agent id and user, so nobody can make the operator expire
somebody else's claims by forging, letting lapse or deleting a lease.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from workorder_operator.lifecycle import SCHEDULABLE, agent_time
from workorder_operator.model import Phase, Targeting, WorkOrder, format_time, parse_time
from workorder_operator.targeting import AgentIdentity, admits, check_agent_id

# How the operator finds presence leases (a label selector) and tells them from its own leader
# Lease and from node leases.
PRESENCE_LABEL = "workorder.dev/presence"
PRESENCE_VALUE = "agent"
AGENT_ID_LABEL = "workorder.dev/agent-id"
USER = "workorder.dev/user"
WORK_TYPES = "workorder.dev/work-types"
LABELS = "workorder.dev/labels"
ANNOTATIONS = "workorder.dev/annotations"
# Where the agent takes orders (and holds claims): a JSON list of namespaces, [] for every
# namespace (an `-A` agent); without it, the lease's own namespace.
NAMESPACES = "workorder.dev/namespaces"
LEASE_PREFIX = "workorder-agent-"

# A lease's default term: renewed every third of it, so two renewals may fail before it lapses.
LEASE_SECONDS = 30.0
# Beyond its term, how long the operator still waits before it calls an agent lost (a renewal
# on its way, a watch event late).
GRACE_SECONDS = 2.0
# The shortest and longest terms an agent may announce (seconds).
MIN_LEASE_SECONDS = 1
MAX_LEASE_SECONDS = 3600

# The reason of the Schedulable=False condition a Pending order gets while no live agent can take it.
NO_MATCHING_AGENT = "NoMatchingAgent"


def lease_name(agent_id: str) -> str:
    """The presence lease of an agent id (one per namespace it announces itself in)."""
    return LEASE_PREFIX + agent_id.lower()


def lease_body(
    agent: AgentIdentity,
    *,
    work_types: Sequence[str],
    user: str,
    namespaces: Sequence[str],
    duration: float,
    now: dt.datetime,
    acquired: bool = False,
) -> dict[str, Any]:
    """The presence lease as an agent writes it (create, or a merge patch to renew it);
    `namespaces`: where it takes orders (empty: everywhere); `acquired`: this announcement
    starts a term (acquireTime is set)."""
    spec: dict[str, Any] = {
        "holderIdentity": agent.id,
        "leaseDurationSeconds": max(MIN_LEASE_SECONDS, min(MAX_LEASE_SECONDS, round(duration))),
        "renewTime": format_time(now),
    }
    if acquired:
        spec["acquireTime"] = format_time(now)
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {
            "name": lease_name(agent.id),
            "labels": {PRESENCE_LABEL: PRESENCE_VALUE, AGENT_ID_LABEL: agent.id.lower()},
            "annotations": {
                USER: user,
                WORK_TYPES: json.dumps(list(work_types)),
                LABELS: json.dumps(list(agent.labels)),
                ANNOTATIONS: json.dumps(dict(agent.annotations), sort_keys=True),
                NAMESPACES: json.dumps(list(namespaces)),
            },
        },
        "spec": spec,
    }


@dataclass(frozen=True, slots=True)
class Facts:
    """What dividing the queue needs of a Pending order (`divide`), without its content: an agent
    keeps these for every order it could take (agent.PendingOrders, offer.Candidate)."""

    uid: str
    namespace: str
    work_type: str
    targeting: Targeting | None
    priority: int
    waiting_since: dt.datetime

    @classmethod
    def of(cls, order: WorkOrder) -> Facts:
        return cls(
            order.uid, order.namespace, order.spec.work_type, order.spec.targeting, order.spec.priority,
            waiting_since(order),
        )  # fmt: skip


@dataclass(frozen=True)
class Presence:
    """One presence lease, as read."""

    namespace: str
    name: str
    agent: AgentIdentity
    work_types: tuple[str, ...]
    # The Kubernetes username the agent runs as ("" when it could not tell).
    user: str
    # Where it takes orders; empty: every namespace.
    namespaces: tuple[str, ...]
    duration: float
    renew_time: dt.datetime | None

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def cluster_wide(self) -> bool:
        return not self.namespaces

    def covers(self, namespace: str) -> bool:
        """Whether this agent takes orders in `namespace`."""
        return self.cluster_wide or namespace in self.namespaces

    def takes(self, order: WorkOrder | Facts) -> bool:
        """Whether this agent would take the order (where, what, and whom it targets)."""
        if isinstance(order, Facts):
            namespace, work_type, targeting = order.namespace, order.work_type, order.targeting
        else:
            namespace, work_type, targeting = order.namespace, order.spec.work_type, order.spec.targeting
        return (
            self.covers(namespace)
            and (not self.work_types or work_type in self.work_types)
            and admits(targeting, self.agent)
        )

    def holds(self, order: WorkOrder) -> bool:
        """Whether the order's current claim is this agent's, by its id *and* its Kubernetes user:
        a lease says nothing about claims some other identity took under the same agent id."""
        s = order.status
        return (
            s.phase == Phase.CLAIMED
            and s.claimed_by is not None
            and s.claimed_by.lower() == self.agent.id.lower()
            and bool(self.user)
            and s.claimed_by_user == self.user
            and self.covers(order.namespace)
        )


def _json(annotations: dict[str, str], key: str, kind: type, default: Any) -> Any:
    raw = annotations.get(key)
    if raw is None:
        return default
    try:
        value = json.loads(raw)
    except ValueError:
        raise ValueError(f"annotation {key}: not JSON ({raw[:80]!r})") from None
    if not isinstance(value, kind):
        raise ValueError(f"annotation {key}: expected a JSON {kind.__name__}, got {raw[:80]!r}")
    return value


def parse_lease(body: dict[str, Any]) -> Presence:
    """A presence lease from the API's JSON; ValueError naming the field that is wrong."""
    meta = body.get("metadata") or {}
    spec = body.get("spec") or {}
    annotations = meta.get("annotations") or {}
    agent_id = check_agent_id(spec.get("holderIdentity"), "spec.holderIdentity")
    work_types = _json(annotations, WORK_TYPES, list, [])
    labels = _json(annotations, LABELS, list, [])
    agent_annotations = _json(annotations, ANNOTATIONS, dict, {})
    namespace = str(meta.get("namespace", ""))
    namespaces = _json(annotations, NAMESPACES, list, [namespace])
    if not all(isinstance(x, str) for x in (*work_types, *labels, *agent_annotations.values(), *namespaces)):
        raise ValueError(f"annotations {WORK_TYPES}, {LABELS}, {ANNOTATIONS}, {NAMESPACES}: only strings")
    duration = spec.get("leaseDurationSeconds")
    if not isinstance(duration, int) or duration < MIN_LEASE_SECONDS:
        raise ValueError(f"spec.leaseDurationSeconds: {duration!r} is not a whole number of seconds >= 1")
    renew = spec.get("renewTime") or spec.get("acquireTime")
    return Presence(
        namespace=namespace,
        name=str(meta.get("name", "")),
        agent=AgentIdentity(agent_id, tuple(labels), dict(agent_annotations)),
        work_types=tuple(work_types),
        user=str(annotations.get(USER, "")),
        namespaces=tuple(namespaces),
        duration=float(min(duration, MAX_LEASE_SECONDS)),
        renew_time=parse_time(renew) if renew else None,
    )


def is_presence(body: dict[str, Any]) -> bool:
    return ((body.get("metadata") or {}).get("labels") or {}).get(PRESENCE_LABEL) == PRESENCE_VALUE


# --- liveness -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sighting:
    """A presence lease as the operator saw it: when it first saw this renewal (its own clock),
    and when it saw the lease deleted (a clean stop, or an admin)."""

    presence: Presence
    seen_at: dt.datetime
    gone_at: dt.datetime | None = None

    def lost_at(self, grace: float = GRACE_SECONDS) -> dt.datetime:
        if self.gone_at is not None:
            return self.gone_at
        return lost_at(self.presence, self.seen_at, grace)

    def live(self, now: dt.datetime, grace: float = GRACE_SECONDS) -> bool:
        return now < self.lost_at(grace)


def lost_at(presence: Presence, seen_at: dt.datetime | None = None, grace: float = GRACE_SECONDS) -> dt.datetime:
    """When an agent counts as lost unless it renews: its term plus `grace` after its last sign of
    life. With `seen_at` (when the operator first saw this renewal, its own clock) the sign of
    life is the later of the two, so neither an agent's slow clock nor a watch that caught up
    late can make it lost early, and a renewTime far ahead is believed only as far as
    `lifecycle.agent_time` allows; without it (a person listing agents) renewTime alone."""
    marks = [t for t in (agent_time(presence.renew_time, seen_at), seen_at) if t is not None]
    if not marks:
        return dt.datetime.min.replace(tzinfo=dt.UTC)  # never renewed: nothing says it lives
    return max(marks) + dt.timedelta(seconds=presence.duration + grace)


def same_renewal(a: Presence, b: Presence) -> bool:
    """Whether two reads of a lease carry the same sign of life (so its first sighting stands)."""
    return (a.renew_time, a.duration) == (b.renew_time, b.duration)


def holder_lost_at(
    order: WorkOrder, sightings: Iterable[Sighting], grace: float = GRACE_SECONDS
) -> tuple[dt.datetime, Sighting] | None:
    """When the agent holding the order's claim counts as lost, and the sighting that says so;
    None when no presence lease speaks for that claim (the agent never announced itself, or
    another identity holds it): only claimTimeoutSeconds applies then. With several leases for
    the same agent (one per namespace), it is live while any of them is."""
    matching = [s for s in sightings if s.presence.holds(order)]
    if not matching:
        return None
    best = max(matching, key=lambda s: s.lost_at(grace))
    return best.lost_at(grace), best


def lost_reason(sighting: Sighting, grace: float = GRACE_SECONDS) -> str:
    """Why an agent counts as lost, for lastError and the AgentLost event."""
    p = sighting.presence
    who = f"agent {p.agent.id}" + (f" (user {p.user})" if p.user else "")
    if sighting.gone_at is not None:
        return f"{who} lost: its presence lease {p.key} was deleted"
    last = f"; last renewal {format_time(p.renew_time)}" if p.renew_time else ""
    return f"{who} lost: its presence lease {p.key} was not renewed within {p.duration:g}s + {grace:g}s grace{last}"


def live(sightings: Iterable[Sighting], now: dt.datetime, grace: float = GRACE_SECONDS) -> list[Presence]:
    return [s.presence for s in sightings if s.live(now, grace)]


# --- schedulability -----------------------------------------------------------------------------


def unschedulable(order: WorkOrder) -> bool:
    """Whether the order carries Schedulable=False (read from the stored status: the engine keeps
    no typed conditions)."""
    conditions = order.raw_status.get("conditions") or []
    return any(isinstance(c, dict) and c.get("type") == SCHEDULABLE and c.get("status") == "False" for c in conditions)


def scheduling(
    order: WorkOrder, agents: Sequence[Presence], unmatched_since: dt.datetime | None, now: dt.datetime, grace: float
) -> tuple[dt.datetime | None, bool | None]:
    """For one order in one pass: (since when no live agent could take it, None while one can;
    the change to write: False to mark it unschedulable, True to clear the mark, None nothing).

    Only Pending orders the operator has initialised are judged (a claim or a phase change drops
    the condition with the others). An order is marked once no live agent could take it for
    `grace`, counted from the first pass that found it so; it is cleared as soon as one can."""
    if order.status.phase != Phase.PENDING or "conditions" not in order.raw_status:
        return None, None
    marked = unschedulable(order)
    if anyone_takes(order, agents):
        return None, (True if marked else None)
    since = unmatched_since or now
    if not marked and now - since >= dt.timedelta(seconds=grace):
        return since, False
    return since, None


def anyone_takes(order: WorkOrder, agents: Iterable[Presence]) -> bool:
    """Whether any of `agents` would take the order."""
    return any(a.takes(order) for a in agents)


def takers_key(agents: Iterable[Presence]) -> frozenset[tuple[Any, ...]]:
    """What decides which orders `agents` would take (not when they last renewed): equal keys
    judge every order alike, so a schedulability pass need only look at orders that changed."""
    return frozenset(
        (a.agent.id.lower(), tuple(a.agent.labels), tuple(sorted(a.agent.annotations.items())), a.work_types,
         a.namespaces)
        for a in agents
    )  # fmt: skip


def no_agent_message(order: WorkOrder, agents: Sequence[Presence]) -> str:
    """What an unschedulable order says: what it asks for, and how many agents are there."""
    t = order.spec.targeting
    wants = f"work type {order.spec.work_type}"
    if t is not None and (t.agent_ids or t.labels or t.annotations):
        parts = [
            f"{name} {value}"
            for name, value in (("agentIds", t.agent_ids), ("labels", t.labels), ("annotations", t.annotations))
            if value
        ]
        wants += " with targeting " + ", ".join(str(p) for p in parts)
    here = sum(1 for a in agents if a.covers(order.namespace))
    return (
        f"no live agent takes {wants} in namespace {order.namespace} "
        f"({here} live agent{'s' if here != 1 else ''} announced here; see kubectl workorder agents)"
    )


# --- dividing the queue (rendezvous hashing) ----------------------------------------------------

# How long an order may wait for the agent that ranks it first before any agent that admits it
# takes it (that agent may be dead, slow, or busy).
STEAL_DELAY_SECONDS = 2.0


def weight(order_uid: str, agent_id: str) -> int:
    """The rendezvous (highest-random-weight) weight of an agent for an order: the first 8 bytes of
    sha256("<order uid>/<agent id>"), big-endian, ids in lower case. Any language computes the same."""
    digest = hashlib.sha256(f"{order_uid.lower()}/{agent_id.lower()}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def ranking(order: WorkOrder | Facts, agents: Iterable[Presence]) -> list[str]:
    """The ids of the `agents` that would take the order, the highest weight first."""
    takers = {a.agent.id.lower() for a in agents if a.takes(order)}
    return sorted(takers, key=lambda agent_id: (weight(order.uid, agent_id), agent_id), reverse=True)


def ranked_first(order: WorkOrder, agents: Iterable[Presence]) -> str | None:
    """The id of the agent that ranks the order first among `agents` that would take it."""
    return next(iter(ranking(order, agents)), None)


def waiting_since(order: WorkOrder) -> dt.datetime:
    """When the order became claimable: its creation, or for one that was claimed before, its last
    status change (the expiry, release, due retry or requeue that made it Pending again). The
    operator's initialise write of a new order does not count: the order was claimable before."""
    if order.status.attempt == 0 or order.status.updated_at is None:
        return order.created_at
    return max(order.created_at, order.status.updated_at)


T = TypeVar("T")


def divide(
    candidates: Iterable[T],
    me: Presence,
    peers: Iterable[Presence],
    now: dt.datetime,
    steal_delay: float = STEAL_DELAY_SECONDS,
    *,
    limit: int | None = None,
    ranks: dict[str, int] | None = None,
    facts: Callable[[T], Facts] | None = None,
) -> list[T]:
    """The candidates this agent should try, in the order to try them: of each priority (highest
    first), those it ranks first among the live agents that admit them (itself included), in offer
    order (oldest first); then those that have waited longer than `steal_delay` for the agent that
    ranks them first, so nothing waits on a dead or slow agent: those it ranks second first, then
    third, and so on (offer order within a rank). Agents that see each other thus divide the queue
    instead of all racing for the oldest order, and on a backlog they steal different orders too.

    `candidates`: in offer order (priority high first, then oldest), read lazily: with a `limit`
    (the most wanted) reading stops once that many are found, so the rest is neither read nor
    ranked (a claim loop tries a few of 100,000). A priority's stolen orders come after its own,
    so they are emitted when the next priority starts (or the candidates end).
    `ranks`: a cache of this agent's rank for each order (by uid; 0 = first) among these same
    agents; the caller empties it when the agents change (an order's spec, hence its ranking,
    never does). `facts`: what to divide by, for candidates that are not WorkOrders."""
    view = facts or cast(Callable[[T], Facts], Facts.of)
    agents = [me, *(p for p in peers if p.agent.id.lower() != me.agent.id.lower())]
    late = dt.timedelta(seconds=steal_delay)
    mine = me.agent.id.lower()
    cache = ranks if ranks is not None else {}
    out: list[T] = []
    stale: list[tuple[int, T]] = []
    priority: int | None = None
    for candidate in candidates:
        f = view(candidate)
        if f.priority != priority:
            # After its own, by rank; the sort is stable, so offer order within a rank.
            out.extend(o for _, o in sorted(stale, key=lambda s: s[0]))
            stale = []
            if limit is not None and len(out) >= limit:
                break
            priority = f.priority
        if f.uid not in cache:
            ranked = ranking(f, agents)
            cache[f.uid] = ranked.index(mine) if mine in ranked else len(agents)
        if cache[f.uid] == 0:
            out.append(candidate)
            if limit is not None and len(out) >= limit:
                return out
        elif now - f.waiting_since >= late:
            stale.append((cache[f.uid], candidate))
    else:
        out.extend(o for _, o in sorted(stale, key=lambda s: s[0]))
    return out[:limit]  # a priority's stale orders may have gone past the limit
