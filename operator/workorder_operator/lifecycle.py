"""The life of a WorkOrder (SPEC.md): every transition, its guard and the status it writes. Pure.

This module is the claim protocol. Each transition takes an order as read and "now", checks
that it is legal, and returns a `StatusWrite`: the guards (values the stored status must still
hold, tested by the API server atomically with the write) and the complete new status. The
adapter turns it into a JSON Patch (`test` ops + one `add /status`), so every status write,
agents' and the operator's alike, is a compare-and-swap. A failed guard means someone else
moved first: re-read and decide again, never retry blindly.

Who guards what:
- every write tests `/metadata/uid`: a handle of a deleted order never touches a re-created one
  of the same name (whose attempt may well be the same again);
- agent transitions (claim, renew, complete, fail, release) test phase, attempt and claimedBy:
  the attempt is the fencing token, so a stale handle can never touch a re-claimed order;
- operator transitions test the resourceVersion they read: the operator never overwrites any
  write it has not seen.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from workorder_operator.backoff import retry_delay
from workorder_operator.errors import Conflict
from workorder_operator.model import Outcome, Phase, Transition, WorkOrder, format_time
from workorder_operator.targeting import AgentIdentity, admits

HISTORY_LIMIT = 10
# A new order is claimable at once (CRD defaults; its observedGeneration 0 already reads as "in
# progress" to kstatus); the operator adds its conditions only if no agent has claimed it within
# this grace, so a busy queue costs no extra write per order.
INITIALISE_GRACE = dt.timedelta(seconds=5)
MESSAGE_LIMIT = 4096
RESULT_LIMIT = 16384


class TransitionError(Conflict):
    """The transition is not legal for the order as read (wrong phase, not the claim holder, ...)."""


@dataclass(frozen=True)
class StatusWrite:
    """A compare-and-swap on one order's status."""

    transition: Transition
    # JSON Pointer -> the value the stored object must still hold there.
    guards: dict[str, Any]
    status: dict[str, Any]
    # Why, for events and logs.
    message: str = ""


# --- conditions ---------------------------------------------------------------------------------


class Reason(StrEnum):
    PENDING = "Pending"
    CLAIMED = "Claimed"
    BACKOFF = "RetryBackoff"
    COMPLETED = "Completed"
    FAILED = "Failed"


_PHASE_REASON = {
    Phase.PENDING: Reason.PENDING,
    Phase.CLAIMED: Reason.CLAIMED,
    Phase.RETRY_PENDING: Reason.BACKOFF,
    Phase.COMPLETED: Reason.COMPLETED,
    Phase.FAILED: Reason.FAILED,
}


def _wanted(phase: Phase) -> dict[str, str]:
    """The status of each condition in a phase."""
    return {
        "Succeeded": {Phase.COMPLETED: "True", Phase.FAILED: "False"}.get(phase, "Unknown"),
        "Reconciling": "False" if phase.terminal else "True",
        "Stalled": "True" if phase == Phase.FAILED else "False",
    }


def _conditions(
    old: list[dict[str, Any]], phase: Phase, message: str, now: dt.datetime, generation: int, why: str | None = None
) -> list[dict[str, Any]]:
    """Succeeded / Reconciling / Stalled for a phase, in the kstatus convention: Reconciling
    True while work is outstanding, Stalled True when the order ended in failure; only a change
    of status moves lastTransitionTime."""
    reason = why or str(_PHASE_REASON[phase])
    wanted = _wanted(phase)
    previous = {c.get("type"): c for c in old}
    out = []
    for ctype, cstatus in wanted.items():
        before = previous.get(ctype, {})
        changed = before.get("status") != cstatus
        out.append(
            {
                "type": ctype,
                "status": cstatus,
                "reason": reason,
                "message": message[:MESSAGE_LIMIT],
                "lastTransitionTime": format_time(now) if changed else before["lastTransitionTime"],
                "observedGeneration": generation,
            }
        )
    return out


# --- building blocks ----------------------------------------------------------------------------

_CLAIM_FIELDS = ("claimedBy", "claimedByUser", "claimedAt", "renewedAt")


def _next_status(
    order: WorkOrder, phase: Phase, message: str, now: dt.datetime, why: str | None = None, **changes: Any
) -> dict[str, Any]:
    """The stored status with `changes` applied (None removes a field), phase, conditions (with
    reason `why`, if given, instead of the phase's own) and updatedAt set."""
    status = {k: v for k, v in order.raw_status.items() if k != "conditions"}
    status.update(changes)
    status = {k: v for k, v in status.items() if v is not None}
    status["phase"] = str(phase)
    status["updatedAt"] = format_time(now)
    status["observedGeneration"] = order.generation
    old = order.raw_status.get("conditions") or []
    status["conditions"] = _conditions(old, phase, message, now, order.generation, why)
    status["reason"] = why or str(_PHASE_REASON[phase])
    return status


def _history(order: WorkOrder, outcome: Outcome, now: dt.datetime, message: str) -> list[dict[str, Any]]:
    entry: dict[str, Any] = {
        "attempt": order.status.attempt,
        "outcome": str(outcome),
        "finishedAt": format_time(now),
    }
    if order.status.claimed_by:
        entry["agent"] = order.status.claimed_by
    if "claimedAt" in order.raw_status:
        entry["claimedAt"] = order.raw_status["claimedAt"]
    if message:
        entry["message"] = message[:MESSAGE_LIMIT]
    history = [*order.raw_status.get("history", []), entry]
    return history[-HISTORY_LIMIT:]


def _cleared_claim() -> dict[str, Any]:
    return dict.fromkeys(_CLAIM_FIELDS)


def _write(
    transition: Transition, order: WorkOrder, guards: dict[str, Any], status: dict[str, Any], message: str = ""
) -> StatusWrite:
    """Every status write, agents' and the operator's, is fenced by the order's uid first."""
    return StatusWrite(transition, {"/metadata/uid": order.uid, **guards}, status, message)


def _require_phase(order: WorkOrder, *phases: Phase) -> None:
    if order.status.phase not in phases:
        allowed = " or ".join(phases)
        raise TransitionError(f"{order.key} is {order.status.phase or 'not initialised'}, not {allowed}")


def _holder_guards(order: WorkOrder, agent_id: str, attempt: int) -> dict[str, Any]:
    """The claim holder's guard: still Claimed, by this agent, in this attempt."""
    _require_phase(order, Phase.CLAIMED)
    if order.status.claimed_by != agent_id or order.status.attempt != attempt:
        raise TransitionError(
            f"{order.key}: the claim is now attempt {order.status.attempt} of agent {order.status.claimed_by},"
            f" not attempt {attempt} of {agent_id}"
        )
    return {"/status/phase": str(Phase.CLAIMED), "/status/claimedBy": agent_id, "/status/attempt": attempt}


def _unchanged(order: WorkOrder) -> dict[str, Any]:
    """The operator's guard: the object is still the version it read. Any write since, by anyone,
    moves the resourceVersion, so the operator never overwrites a write it has not seen; a test
    of one short string, where testing the whole status it read sent that status twice."""
    return {"/metadata/resourceVersion": order.resource_version}


# --- agent transitions --------------------------------------------------------------------------


def claim(order: WorkOrder, agent: AgentIdentity, now: dt.datetime, user: str | None = None) -> StatusWrite:
    """`user`: the claimer's Kubernetes username, recorded so the admission policy can bind the
    claim to that identity (only it may renew, complete, fail or release this attempt)."""
    _require_phase(order, Phase.PENDING)
    if not admits(order.spec.targeting, agent):
        raise TransitionError(f"{order.key}: targeting does not admit agent {agent.id}")
    attempt = order.status.attempt + 1
    message = f"claimed by agent {agent.id} (attempt {attempt})"
    return _write(
        Transition.CLAIM,
        order,
        {"/status/phase": str(Phase.PENDING), "/status/attempt": order.status.attempt},
        _next_status(
            order, Phase.CLAIMED, message, now,
            claimedBy=agent.id, claimedByUser=user, claimedAt=format_time(now), renewedAt=None, attempt=attempt,
        ),
        message,
    )  # fmt: skip


def renew(order: WorkOrder, agent_id: str, attempt: int, now: dt.datetime) -> StatusWrite:
    guards = _holder_guards(order, agent_id, attempt)
    status = dict(order.raw_status, renewedAt=format_time(now))
    return _write(Transition.RENEW, order, guards, status)


def complete(order: WorkOrder, agent_id: str, attempt: int, result: str, now: dt.datetime) -> StatusWrite:
    guards = _holder_guards(order, agent_id, attempt)
    message = f"completed by agent {agent_id} in attempt {attempt}"
    return _write(
        Transition.COMPLETE,
        order,
        guards,
        _next_status(
            order, Phase.COMPLETED, message, now,
            completedAt=format_time(now), result=result[-RESULT_LIMIT:], nextRetryAfter=None,
            history=_history(order, Outcome.SUCCEEDED, now, ""),
        ),
        message,
    )  # fmt: skip


def fail(
    order: WorkOrder, agent_id: str, attempt: int, error: str, now: dt.datetime, *, retryable: bool = True
) -> StatusWrite:
    """A failed attempt: RetryPending after backoff while retries are left, else Failed."""
    guards = _holder_guards(order, agent_id, attempt)
    r = order.status.retry_count
    guards["/status/retryCount"] = r
    error = error[-MESSAGE_LIMIT:] or "failed"
    common: dict[str, Any] = {
        "lastError": error,
        "lastErrorAt": format_time(now),
        "history": _history(order, Outcome.FAILED, now, error),
    }
    spec = order.spec
    if retryable and r + 1 <= spec.max_retries:
        delay = retry_delay(spec.backoff_seconds, r + 1, spec.max_backoff_seconds)
        due = now + dt.timedelta(seconds=delay)
        message = f"attempt {attempt} failed: {error}; retry {r + 1} of {spec.max_retries} after {format_time(due)}"
        status = _next_status(
            order, Phase.RETRY_PENDING, message, now,
            retryCount=r + 1, nextRetryAfter=format_time(due), **_cleared_claim(), **common,
        )  # fmt: skip
    else:
        why = "not retryable" if not retryable else f"{spec.max_retries} retries used up"
        message = f"attempt {attempt} failed ({why}): {error}"
        status = _next_status(order, Phase.FAILED, message, now, completedAt=format_time(now), result=error, **common)
    return _write(Transition.FAIL, order, guards, status, message)


def release(order: WorkOrder, agent_id: str, attempt: int, now: dt.datetime, reason: str = "") -> StatusWrite:
    """Give the order back untouched: not a failure, retryCount unchanged."""
    guards = _holder_guards(order, agent_id, attempt)
    message = f"released by agent {agent_id}" + (f": {reason}" if reason else "")
    return _write(
        Transition.RELEASE,
        order,
        guards,
        _next_status(
            order,
            Phase.PENDING,
            message,
            now,
            **_cleared_claim(),
            history=_history(order, Outcome.RELEASED, now, reason),
        ),
        message,
    )


def requeue(order: WorkOrder, now: dt.datetime) -> StatusWrite:
    """An admin puts a Failed order, or one waiting for its retry, back to Pending with its
    retries reset (from RetryPending too, so no nextRetryAfter can keep an order from its owner)."""
    _require_phase(order, Phase.FAILED, Phase.RETRY_PENDING)
    message = "requeued after failure"
    return _write(
        Transition.REQUEUE,
        order,
        _unchanged(order),
        _next_status(
            order, Phase.PENDING, message, now,
            retryCount=0, completedAt=None, result=None, nextRetryAfter=None, **_cleared_claim(),
        ),
        message,
    )  # fmt: skip


# --- operator transitions -----------------------------------------------------------------------


def needs_initialise(order: WorkOrder) -> bool:
    """A new order reads as Pending with zero counters (CRD defaults) but has no conditions yet."""
    return "conditions" not in order.raw_status and order.status.phase in (None, Phase.PENDING)


def initialise(order: WorkOrder, now: dt.datetime, rejection: str | None = None) -> StatusWrite:
    """Conditions for a new order; or Failed at once when its content cannot run (`rejection`)."""
    if not needs_initialise(order):
        raise TransitionError(f"{order.key} is already initialised ({order.status.phase})")
    if rejection:
        message = f"rejected: {rejection}"
        status = _next_status(
            order, Phase.FAILED, message, now, attempt=order.status.attempt, retryCount=order.status.retry_count,
            lastError=rejection, lastErrorAt=format_time(now), completedAt=format_time(now), result=rejection,
        )  # fmt: skip
        return _write(Transition.REJECT, order, _unchanged(order), status, message)
    message = "waiting for an agent"
    # Counters as stored (CRD defaults 0): an order a minimal agent claimed and released without
    # conditions keeps its attempt, which never decreases.
    status = _next_status(
        order, Phase.PENDING, message, now, attempt=order.status.attempt, retryCount=order.status.retry_count
    )
    return _write(Transition.INITIALISE, order, _unchanged(order), status, message)


def waiting(order: WorkOrder, reason: str, message: str, now: dt.datetime) -> StatusWrite:
    """Say on a Pending order why nothing takes it yet (conditions only; still claimable)."""
    _require_phase(order, Phase.PENDING)
    status = _next_status(order, Phase.PENDING, message, now, reason)
    return _write(Transition.WAITING, order, _unchanged(order), status, message)


SCHEDULABLE = "Schedulable"


def scheduling(order: WorkOrder, now: dt.datetime, unschedulable: tuple[str, str] | None = None) -> StatusWrite:
    """Mark a Pending order unschedulable (`unschedulable`: the Schedulable=False condition's reason
    and message), or clear the mark (None: the condition is removed). Conditions only: the order
    stays claimable, and any phase change drops the mark with the other conditions."""
    _require_phase(order, Phase.PENDING)
    if needs_initialise(order):
        raise TransitionError(f"{order.key} has no conditions yet")
    old = [c for c in order.raw_status.get("conditions") or [] if isinstance(c, dict)]
    kept = [c for c in old if c.get("type") != SCHEDULABLE]
    if unschedulable is None:
        message = "an agent can take it"
        if len(kept) == len(old):
            raise TransitionError(f"{order.key} is not marked unschedulable")
    else:
        reason, message = unschedulable
        before = next((c for c in old if c.get("type") == SCHEDULABLE), {})
        kept.append(
            {
                "type": SCHEDULABLE,
                "status": "False",
                "reason": reason,
                "message": message[:MESSAGE_LIMIT],
                "lastTransitionTime": before.get("lastTransitionTime")
                if before.get("status") == "False"
                else format_time(now),
                "observedGeneration": order.generation,
            }
        )
    status = dict(order.raw_status, conditions=kept)
    return _write(Transition.SCHEDULING, order, _unchanged(order), status, message)


# Beyond any real deadline: what a timestamp near year 9999 plus a timeout becomes.
FAR_FUTURE = dt.datetime.max.replace(tzinfo=dt.UTC)


def _after(t: dt.datetime, seconds: float) -> dt.datetime:
    """t + seconds, saturating instead of overflowing (a status may carry any valid date)."""
    try:
        return t + dt.timedelta(seconds=seconds)
    except OverflowError:
        return FAR_FUTURE


# How far ahead of the operator's clock an agent's timestamp may be and still be believed.
CLOCK_TOLERANCE = dt.timedelta(seconds=10)


def agent_time(mark: dt.datetime | None, seen_at: dt.datetime | None) -> dt.datetime | None:
    """An agent's timestamp as the operator believes it: one later than the moment the operator
    saw it (`seen_at`, its own clock) by more than CLOCK_TOLERANCE counts as that moment, so no
    clock running ahead, however far, can pin a claim."""
    if mark is not None and seen_at is not None and mark > seen_at + CLOCK_TOLERANCE:
        return seen_at
    return mark


# How long before the operator saw a claim or renewal an agent may say it made it and be believed:
# about what a write takes to reach the operator's watch, so the claim is timed from when the agent
# made it (not from when we heard of it), and a clock running behind gains at most this much.
SEEN_ALLOWANCE = dt.timedelta(seconds=1)


def claim_deadline(
    order: WorkOrder, first_seen: dt.datetime | None = None, seen_at: dt.datetime | None = None
) -> dt.datetime:
    """When the current claim expires: claimTimeoutSeconds after the latest sign of life.

    The sign of life is the latest of the agent's claimedAt and renewedAt, the server's time of
    the agent's last status write, and SEEN_ALLOWANCE before this operator first saw the claim or
    renewal. The last two are the server's and our clock, so an agent whose clock runs behind
    cannot make its claim expire more than SEEN_ALLOWANCE early; one whose clock runs ahead is
    believed only up to CLOCK_TOLERANCE past `seen_at` (when the operator saw this sign of life)."""
    status = order.status
    agent_marks = (agent_time(status.claimed_at, seen_at), agent_time(status.renewed_at, seen_at))
    heard = first_seen - SEEN_ALLOWANCE if first_seen is not None else None
    marks = [t for t in (*agent_marks, order.status_written_at, heard) if t]
    start = max(marks, default=order.created_at)
    return _after(start, order.spec.claim_timeout_seconds)


def expire(
    order: WorkOrder,
    now: dt.datetime,
    first_seen: dt.datetime | None = None,
    seen_at: dt.datetime | None = None,
    lost: str | None = None,
) -> StatusWrite:
    """`lost`: why the claim's agent counts as lost (its presence lease lapsed or was deleted,
    `fleet.lost_reason`): the claim expires now, whatever its claimTimeoutSeconds."""
    _require_phase(order, Phase.CLAIMED)
    if lost is None and now < claim_deadline(order, first_seen, seen_at):
        raise TransitionError(f"{order.key}: the claim has not expired yet")
    s = order.status
    why = lost or f"no renewal within {order.spec.claim_timeout_seconds}s"
    error = f"claim of agent {s.claimed_by} (attempt {s.attempt}) expired: {why}"
    return _write(
        Transition.EXPIRE,
        order,
        _unchanged(order),
        _next_status(
            order, Phase.PENDING, error, now, **_cleared_claim(),
            lastError=error, lastErrorAt=format_time(now), history=_history(order, Outcome.EXPIRED, now, error),
        ),
        error,
    )  # fmt: skip


# managedFields times are whole seconds, cut down: the write happened within this after its stamp.
WRITE_TIME_RESOLUTION = dt.timedelta(seconds=1)


def retry_limit(order: WorkOrder, seen_at: dt.datetime | None = None) -> dt.datetime | None:
    """The latest a RetryPending order may wait: the spec's backoff for its retryCount after the
    failure. The failure's time is the earlier of the server's time of the agent's write
    (`status_written_at`, plus its resolution) and the operator's first sight of it (`seen_at`,
    our clock): neither is the agent's word. None when neither is known."""
    written = order.status_written_at + WRITE_TIME_RESOLUTION if order.status_written_at is not None else None
    failed = [t for t in (written, seen_at) if t is not None]
    if not failed:
        return None
    spec = order.spec
    return _after(min(failed), retry_delay(spec.backoff_seconds, order.status.retry_count, spec.max_backoff_seconds))


def retry_due(order: WorkOrder, seen_at: dt.datetime | None = None) -> dt.datetime:
    """When a RetryPending order falls due: the agent's nextRetryAfter, but never later than
    `retry_limit`, so a forged one (year 9999) cannot park the order beyond what its spec allows."""
    marks = [t for t in (order.status.next_retry_after, retry_limit(order, seen_at)) if t is not None]
    return min(marks, default=order.created_at)


def due(order: WorkOrder, now: dt.datetime, seen_at: dt.datetime | None = None) -> StatusWrite:
    """`seen_at`: when the operator first saw the order RetryPending (see `retry_limit`)."""
    _require_phase(order, Phase.RETRY_PENDING)
    when = retry_due(order, seen_at)
    if now < when:
        raise TransitionError(f"{order.key}: retry not due until {format_time(when)}")
    message = f"retry {order.status.retry_count} of {order.spec.max_retries} due: waiting for an agent"
    asked = order.status.next_retry_after
    if asked is not None and asked > when:
        message += f" (its nextRetryAfter {format_time(asked)} is beyond what the spec allows)"
    return _write(
        Transition.DUE,
        order,
        _unchanged(order),
        _next_status(order, Phase.PENDING, message, now, nextRetryAfter=None),
        message,
    )


def conditions_true(order: WorkOrder) -> bool:
    """Whether the conditions and observedGeneration say what the phase says. Statuses must
    match; the Succeeded reason must be the phase's own (a Pending order may also carry a
    reason saying why it waits, e.g. ShipwrightNotInstalled)."""
    phase = order.status.phase
    if phase is None:
        return True
    if order.raw_status.get("observedGeneration") != order.generation:
        return False
    conditions = {c.get("type"): c for c in order.raw_status.get("conditions") or [] if isinstance(c, dict)}
    for ctype, cstatus in _wanted(phase).items():
        c = conditions.get(ctype)
        if c is None or c.get("status") != cstatus or c.get("observedGeneration") != order.generation:
            return False
    reason = conditions["Succeeded"].get("reason")
    if order.raw_status.get("reason") != reason:  # the REASON column says what the condition says
        return False
    if phase == Phase.PENDING:
        return reason not in {str(r) for p, r in _PHASE_REASON.items() if p != Phase.PENDING}
    return reason == str(_PHASE_REASON[phase])


def _phase_message(order: WorkOrder) -> str:
    s = order.status
    if s.phase == Phase.CLAIMED:
        return f"claimed by agent {s.claimed_by} (attempt {s.attempt})"
    if s.phase == Phase.RETRY_PENDING:
        after = f" after {format_time(s.next_retry_after)}" if s.next_retry_after else ""
        return f"attempt {s.attempt} failed: {s.last_error or 'no reason given'}; retry {s.retry_count}{after}"
    if s.phase == Phase.COMPLETED:
        return f"completed by agent {s.claimed_by} in attempt {s.attempt}" if s.claimed_by else "completed"
    if s.phase == Phase.FAILED:
        return f"failed: {s.last_error or s.result or 'no reason given'}"
    return "waiting for an agent"


def sync_conditions(order: WorkOrder, now: dt.datetime) -> StatusWrite:
    """The operator's backstop: conditions and observedGeneration that say what the phase says,
    whoever wrote the phase (a minimal agent writes only the fields of SPEC.md's transitions)."""
    phase = order.status.phase
    if phase is None or conditions_true(order):
        raise TransitionError(f"{order.key}: conditions already match phase {phase}")
    message = _phase_message(order)
    status = dict(order.raw_status)
    status["observedGeneration"] = order.generation
    status["conditions"] = _conditions(status.get("conditions") or [], phase, message, now, order.generation)
    status["reason"] = str(_PHASE_REASON[phase])
    status.setdefault("updatedAt", format_time(now))
    return _write(Transition.CONDITIONS, order, _unchanged(order), status, message)


# --- what the operator does next ----------------------------------------------------------------


class Action(StrEnum):
    INITIALISE = "initialise"
    CONDITIONS = "conditions"  # conditions or observedGeneration do not match the phase
    EXPIRE = "expire"
    DUE = "due"
    DELETE = "delete"  # ttlSecondsAfterFinished


@dataclass(frozen=True)
class Plan:
    """The operator's next step for one order: `action` at `at` (now or later), or nothing."""

    action: Action | None = None
    at: dt.datetime | None = None


def plan(
    order: WorkOrder,
    first_seen: dt.datetime | None = None,
    *,
    rejected: bool = False,
    seen_at: dt.datetime | None = None,
    agent_lost_at: dt.datetime | None = None,
) -> Plan:
    """The operator's next step, independent of the current time: the scheduler runs it at `at`.
    `rejected`: the operator cannot run this order's content, so it fails it without delay.
    `first_seen`, `seen_at`: see `claim_deadline`. `agent_lost_at`: when the claim's agent counts
    as lost (its presence lease, `fleet.holder_lost_at`), if that comes before the timeout."""
    s = order.status
    if needs_initialise(order):
        return Plan(Action.INITIALISE, order.created_at if rejected else order.created_at + INITIALISE_GRACE)
    if not conditions_true(order):
        return Plan(Action.CONDITIONS, order.created_at)  # at once: long past
    if s.phase == Phase.CLAIMED:
        deadline = claim_deadline(order, first_seen, seen_at)
        return Plan(Action.EXPIRE, min(deadline, agent_lost_at) if agent_lost_at is not None else deadline)
    if s.phase == Phase.RETRY_PENDING:
        return Plan(Action.DUE, retry_due(order, seen_at))
    if s.phase is not None and s.phase.terminal and order.spec.ttl_seconds_after_finished is not None:
        finished = s.completed_at or s.updated_at or order.created_at
        return Plan(Action.DELETE, _after(finished, order.spec.ttl_seconds_after_finished))
    return Plan()


# --- the story of an order, for Events ----------------------------------------------------------


@dataclass(frozen=True)
class Note:
    """One transition told for a person: an Event's type, reason and message."""

    type: str
    reason: str
    message: str


def _claimer(order: WorkOrder, attempt: int) -> str:
    s = order.status
    if s.claimed_by and s.attempt == attempt:
        user = order.raw_status.get("claimedByUser")
        return f"agent {s.claimed_by}" + (f" (user {user})" if user else "")
    agent = next((h.get("agent") for h in order.raw_status.get("history") or [] if h.get("attempt") == attempt), None)
    return f"agent {agent}" if agent else "an agent"


def requeued(old: WorkOrder, new: WorkOrder) -> bool:
    """Whether `new` is `old` requeued: Failed, or RetryPending with its retries reset (a due
    retry keeps its count), back to Pending in the same attempt."""
    o, n = old.status, new.status
    if n.phase != Phase.PENDING or o.attempt != n.attempt:
        return False
    return o.phase == Phase.FAILED or (o.phase == Phase.RETRY_PENDING and n.retry_count < o.retry_count)


def story(old: WorkOrder, new: WorkOrder) -> list[Note]:
    """What happened between two versions of an order, whoever did it (agents, the operator, an
    admin, a minimal agent that writes only the transitions' fields): the operator sees every
    status change and posts these as Events, so `kubectl events --for wo/NAME` tells it all.
    Renewals and condition rewrites are not news."""
    o, n = old.status, new.status
    if o.phase == n.phase and o.attempt == n.attempt:
        return []
    # (attempt, note), told by attempt; an attempt's claim is appended before its end, and the
    # sort is stable, so the claim comes first.
    told: list[tuple[int, Note]] = []
    # A fast agent may have claimed and finished more than once between two versions we saw.
    for a in range(max(o.attempt + 1, n.attempt - 2), n.attempt + 1):
        told.append((a, Note("Normal", "Claim", f"attempt {a} claimed by {_claimer(new, a)}")))
    seen = old.raw_status.get("history") or []
    finished = [h for h in new.raw_status.get("history") or [] if h not in seen]
    ended = n.phase not in (None, Phase.CLAIMED) and (n.attempt > o.attempt or o.phase == Phase.CLAIMED)
    if ended and not any(h.get("attempt") == n.attempt for h in finished):
        # A minimal agent keeps no history: the phase it wrote says how the attempt ended.
        outcome = {Phase.COMPLETED: Outcome.SUCCEEDED, Phase.PENDING: Outcome.RELEASED}.get(n.phase, Outcome.FAILED)  # type: ignore[arg-type]
        agent = o.claimed_by if o.attempt == n.attempt else n.claimed_by
        finished.append({"attempt": n.attempt, "agent": agent, "outcome": str(outcome)})
    last = n.attempt  # no attempt in history is the one a Claimed order still runs
    for h in finished:
        a, agent, message = int(h["attempt"]), h.get("agent") or "?", h.get("message") or ""  # attempt: required
        outcome = h.get("outcome")
        if outcome == Outcome.SUCCEEDED:
            result = new.raw_status.get("result")  # only the last attempt can have succeeded
            note = Note("Normal", "Complete", f"attempt {a} completed by agent {agent}"
                        + (f": result {result}" if result else ""))  # fmt: skip
        elif outcome == Outcome.FAILED:
            error = message or n.last_error or "no reason given"
            if a == last and n.phase == Phase.RETRY_PENDING:
                due = f" after {format_time(n.next_retry_after)}" if n.next_retry_after else ""
                why = f"retryable: retry {n.retry_count} of {new.spec.max_retries}{due}"
            elif a == last and n.phase == Phase.FAILED:
                why = "final: " + ("retries used up" if n.retry_count >= new.spec.max_retries else "not retryable")
            else:
                why = "retried"
            note = Note("Warning", "Fail", f"attempt {a} of agent {agent} failed ({why}): {error}")
        elif outcome == Outcome.EXPIRED:
            note = Note("Warning", "Expire", message or f"claim of agent {agent} (attempt {a}) expired")
        else:
            note = Note(
                "Normal", "Release", f"attempt {a} released by agent {agent}" + (f": {message}" if message else "")
            )
        told.append((a, note))
    notes = [note for _, note in sorted(told, key=lambda t: t[0])]
    if o.attempt == n.attempt:
        if requeued(old, new):
            notes.append(Note("Normal", "Requeue", "requeued after failure: Pending, retries reset"))
        elif o.phase == Phase.RETRY_PENDING and n.phase == Phase.PENDING:
            notes.append(Note("Normal", "Due", f"retry {n.retry_count} of {new.spec.max_retries} due: "
                              "waiting for an agent"))  # fmt: skip
        elif o.phase in (None, Phase.PENDING) and n.phase == Phase.FAILED and not finished:
            notes.append(Note("Warning", "Reject", f"rejected: {n.last_error or n.result or 'no reason given'}"))
    return notes
