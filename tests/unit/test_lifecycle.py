"""The life of a WorkOrder (SPEC.md): every transition, its guard, and the status it writes.

Transitions are run end to end where it matters: the write is applied to a stored body the way
the API server applies our JSON Patch (`tests.unit.orders.store`), so a refused compare-and-swap
shows up as `GuardFailed`.
"""

from __future__ import annotations

import copy
import datetime as dt
from typing import Any

import pytest

from tests.unit.orders import (
    AGENT_A,
    AGENT_B,
    CRD_DEFAULT_STATUS,
    CREATED,
    NOW,
    ORDER_UID,
    GuardFailed,
    make_order,
    order_body,
    read,
    store,
)
from workorder_operator import lifecycle as lc
from workorder_operator.kube import json_patch
from workorder_operator.lifecycle import HISTORY_LIMIT, MESSAGE_LIMIT, Action, Plan, TransitionError
from workorder_operator.model import WorkOrder, format_time, parse_time
from workorder_operator.targeting import AgentIdentity

A = AgentIdentity(AGENT_A)
B = AgentIdentity(AGENT_B)
T_INIT = CREATED + dt.timedelta(seconds=1)
SECOND = dt.timedelta(seconds=1)
MICROSECOND = dt.timedelta(microseconds=1)


def seconds(n: float) -> dt.timedelta:
    return dt.timedelta(seconds=n)


def pending(spec: dict[str, Any] | None = None) -> dict[str, Any]:
    """A stored order the operator has initialised."""
    body = order_body(spec)
    return store(body, lc.initialise(read(body), T_INIT))


def claimed(spec: dict[str, Any] | None = None, agent: AgentIdentity = A, at: dt.datetime = NOW) -> dict[str, Any]:
    body = pending(spec)
    return store(body, lc.claim(read(body), agent, at))


def conditions(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in status["conditions"]}


def condition_states(status: dict[str, Any]) -> dict[str, str]:
    return {t: c["status"] for t, c in conditions(status).items()}


def with_status(body: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """Test set-up: a stored body whose status holds `changes` (None removes a field)."""
    status = {**body["status"], **changes}
    return {**body, "status": {k: v for k, v in status.items() if v is not None}}


def written(body: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """Someone else's write: `with_status`, and the resource version moves on, as on a real server."""
    after = with_status(body, **changes)
    return {
        **after,
        "metadata": {**after["metadata"], "resourceVersion": str(int(body["metadata"]["resourceVersion"]) + 1)},
    }


CLAIM_FIELDS = ("claimedBy", "claimedAt", "renewedAt")


# --- initialise ---------------------------------------------------------------------------------


def test_a_new_order_with_only_crd_defaults_needs_initialising() -> None:
    assert lc.needs_initialise(make_order(status=CRD_DEFAULT_STATUS))
    assert lc.needs_initialise(make_order(status={}))
    assert not lc.needs_initialise(read(pending()))
    assert not lc.needs_initialise(read(claimed()))


def test_initialise_makes_it_pending_with_conditions_guarded_by_the_resource_version() -> None:
    order = make_order(status=CRD_DEFAULT_STATUS, resource_version="7")
    write = lc.initialise(order, T_INIT)
    assert write.transition == "initialise"
    assert write.guards == {"/metadata/uid": ORDER_UID, "/metadata/resourceVersion": "7"}
    s = write.status
    assert (s["phase"], s["attempt"], s["retryCount"]) == ("Pending", 0, 0)
    assert s["updatedAt"] == format_time(T_INIT)
    assert condition_states(s) == {"Succeeded": "Unknown", "Reconciling": "True", "Stalled": "False"}
    assert {c["lastTransitionTime"] for c in s["conditions"]} == {format_time(T_INIT)}
    assert not lc.needs_initialise(read(store(order_body(status=CRD_DEFAULT_STATUS, resource_version="7"), write)))


def test_initialise_without_any_status_is_guarded_by_the_resource_version() -> None:
    write = lc.initialise(make_order(status={}, resource_version="42"), T_INIT)
    assert write.guards == {"/metadata/uid": ORDER_UID, "/metadata/resourceVersion": "42"}
    assert write.status["phase"] == "Pending"


def test_initialise_never_rewinds_the_attempt() -> None:
    """A minimal agent claimed and released without writing conditions: the order still needs its
    conditions, and the fencing token stays where it is (the CRD refuses any decrease)."""
    released = make_order(status={**CRD_DEFAULT_STATUS, "attempt": 2, "retryCount": 1})
    assert lc.needs_initialise(released)
    assert (
        lc.initialise(released, T_INIT).status["attempt"],
        lc.initialise(released, T_INIT).status["retryCount"],
    ) == (2, 1)
    assert lc.initialise(released, T_INIT, rejection="bad").status["attempt"] == 2


def test_initialise_twice_is_refused() -> None:
    with pytest.raises(TransitionError):
        lc.initialise(read(pending()), NOW)
    with pytest.raises(TransitionError):
        lc.initialise(read(claimed()), NOW)


def test_rejected_content_fails_at_once_with_the_reason() -> None:
    reason = "document 2 is a Secret: only shipwright.io/v1beta1 Build objects are allowed"
    write = lc.initialise(make_order(resource_version="8"), T_INIT, rejection=reason)
    assert write.transition == "reject"
    assert write.guards == {"/metadata/uid": ORDER_UID, "/metadata/resourceVersion": "8"}
    s = write.status
    assert s["phase"] == "Failed"
    assert (s["attempt"], s["retryCount"]) == (0, 0)
    assert s["lastError"] == reason
    assert s["result"] == reason
    assert s["completedAt"] == s["lastErrorAt"] == format_time(T_INIT)
    assert condition_states(s) == {"Succeeded": "False", "Reconciling": "False", "Stalled": "True"}
    assert reason in conditions(s)["Succeeded"]["message"]


def test_initialise_never_overwrites_an_agent_that_claimed_first() -> None:
    body = order_body()
    seen_by_operator = read(body)
    body = store(body, lc.claim(read(body), A, NOW))  # agents need not wait for the operator
    with pytest.raises(GuardFailed):
        store(body, lc.initialise(seen_by_operator, NOW))


# --- claim --------------------------------------------------------------------------------------


def test_claim_from_pending() -> None:
    order = read(pending())
    write = lc.claim(order, A, NOW)
    assert write.transition == "claim"
    assert write.guards == {"/metadata/uid": ORDER_UID, "/status/phase": "Pending", "/status/attempt": 0}
    s = write.status
    assert s["phase"] == "Claimed"
    assert s["claimedBy"] == AGENT_A
    assert s["claimedAt"] == format_time(NOW) == "2024-05-01T12:30:00.250000Z"
    assert s["attempt"] == 1
    assert s["retryCount"] == 0
    assert condition_states(s) == {"Succeeded": "Unknown", "Reconciling": "True", "Stalled": "False"}
    assert conditions(s)["Succeeded"]["reason"] == "Claimed"


def test_claim_guards_the_attempt_it_read() -> None:
    body = with_status(pending(), attempt=3)
    write = lc.claim(read(body), B, NOW)
    assert write.guards == {"/metadata/uid": ORDER_UID, "/status/phase": "Pending", "/status/attempt": 3}
    assert write.status["attempt"] == 4


def test_two_agents_racing_for_one_order_only_one_wins() -> None:
    body = pending()
    order = read(body)
    first, second = lc.claim(order, A, NOW), lc.claim(order, B, NOW)
    body = store(body, first)
    with pytest.raises(GuardFailed):
        store(body, second)
    assert read(body).status.claimed_by == AGENT_A


@pytest.mark.parametrize(
    "status",
    [
        {"phase": "Claimed", "attempt": 1, "retryCount": 0, "claimedBy": AGENT_B},
        {"phase": "RetryPending", "attempt": 1, "retryCount": 1, "nextRetryAfter": "2024-05-01T13:00:00Z"},
        {"phase": "Completed", "attempt": 1, "retryCount": 0},
        {"phase": "Failed", "attempt": 4, "retryCount": 3},
    ],
)
def test_claim_is_refused_unless_pending(status: dict[str, Any]) -> None:
    with pytest.raises(TransitionError):
        lc.claim(make_order(status=status), A, NOW)


def test_claim_is_refused_when_targeting_does_not_admit_the_agent() -> None:
    body = pending({"targeting": {"agentIds": [AGENT_B]}})
    with pytest.raises(TransitionError, match="targeting"):
        lc.claim(read(body), A, NOW)
    assert lc.claim(read(body), B, NOW).status["claimedBy"] == AGENT_B


def test_claim_with_label_targeting() -> None:
    body = pending({"targeting": {"labels": ["gpu"]}})
    with pytest.raises(TransitionError):
        lc.claim(read(body), AgentIdentity(AGENT_A, labels=("cpu",)), NOW)
    assert lc.claim(read(body), AgentIdentity(AGENT_A, labels=("gpu",)), NOW).status["phase"] == "Claimed"


# --- holder transitions: renew, complete, fail, release ------------------------------------------


HOLDER_GUARDS = {
    "/metadata/uid": ORDER_UID,
    "/status/phase": "Claimed",
    "/status/claimedBy": AGENT_A,
    "/status/attempt": 1,
}


def _renew(o: WorkOrder, agent: str, attempt: int) -> lc.StatusWrite:
    return lc.renew(o, agent, attempt, NOW + SECOND)


def _complete(o: WorkOrder, agent: str, attempt: int) -> lc.StatusWrite:
    return lc.complete(o, agent, attempt, "sha256:abc", NOW + SECOND)


def _fail(o: WorkOrder, agent: str, attempt: int) -> lc.StatusWrite:
    return lc.fail(o, agent, attempt, "boom", NOW + SECOND)


def _release(o: WorkOrder, agent: str, attempt: int) -> lc.StatusWrite:
    return lc.release(o, agent, attempt, NOW + SECOND)


HOLDER_TRANSITIONS = pytest.mark.parametrize("transition", [_renew, _complete, _fail, _release])


@HOLDER_TRANSITIONS
def test_holder_transitions_are_guarded_by_phase_agent_and_attempt(transition: Any) -> None:
    write = transition(read(claimed()), AGENT_A, 1)
    expected = dict(HOLDER_GUARDS)
    if write.transition == "fail":
        expected["/status/retryCount"] = 0
    assert write.guards == expected


@HOLDER_TRANSITIONS
def test_holder_transitions_are_refused_for_another_agent(transition: Any) -> None:
    with pytest.raises(TransitionError):
        transition(read(claimed()), AGENT_B, 1)


@HOLDER_TRANSITIONS
def test_holder_transitions_are_refused_for_a_stale_attempt(transition: Any) -> None:
    body = with_status(claimed(), attempt=2)
    with pytest.raises(TransitionError):
        transition(read(body), AGENT_A, 1)


@HOLDER_TRANSITIONS
def test_holder_transitions_are_refused_when_not_claimed(transition: Any) -> None:
    with pytest.raises(TransitionError):
        transition(read(pending()), AGENT_A, 0)


def test_renew_only_moves_renewed_at() -> None:
    body = claimed()
    write = lc.renew(read(body), AGENT_A, 1, NOW + seconds(30))
    assert write.status == {**body["status"], "renewedAt": format_time(NOW + seconds(30))}


def test_complete() -> None:
    write = lc.complete(read(claimed()), AGENT_A, 1, "sha256:abc", NOW + seconds(90))
    s = write.status
    assert s["phase"] == "Completed"
    assert s["completedAt"] == format_time(NOW + seconds(90))
    assert s["result"] == "sha256:abc"
    assert condition_states(s) == {"Succeeded": "True", "Reconciling": "False", "Stalled": "False"}
    assert s["history"] == [
        {
            "attempt": 1,
            "outcome": "Succeeded",
            "agent": AGENT_A,
            "claimedAt": format_time(NOW),
            "finishedAt": format_time(NOW + seconds(90)),
        }
    ]


def test_release_returns_the_order_without_counting_a_failure() -> None:
    body = with_status(claimed(), retryCount=2)
    write = lc.release(read(body), AGENT_A, 1, NOW + SECOND, reason="shutting down")
    s = write.status
    assert s["phase"] == "Pending"
    assert s["retryCount"] == 2
    assert s["attempt"] == 1
    assert not any(f in s for f in CLAIM_FIELDS)
    assert "lastError" not in s
    assert s["history"][-1]["outcome"] == "Released"
    assert s["history"][-1]["message"] == "shutting down"
    # Another agent can take it at once, with the next attempt number.
    again = lc.claim(read(store(body, write)), B, NOW + seconds(2))
    assert (again.status["claimedBy"], again.status["attempt"]) == (AGENT_B, 2)


def test_a_late_completion_after_expiry_is_refused_and_changes_nothing() -> None:
    body = claimed({"claimTimeoutSeconds": 60})
    stale = read(body)  # what agent A still believes
    body = store(body, lc.expire(read(body), NOW + seconds(60)))
    body = store(body, lc.claim(read(body), B, NOW + seconds(61)))
    with pytest.raises(GuardFailed):
        store(body, lc.complete(stale, AGENT_A, 1, "sha256:late", NOW + seconds(62)))
    with pytest.raises(TransitionError):  # and on a fresh read A is plainly not the holder
        lc.complete(read(body), AGENT_A, 1, "sha256:late", NOW + seconds(62))
    assert read(body).status.claimed_by == AGENT_B


# --- fail ---------------------------------------------------------------------------------------


def test_first_failure_with_defaults_waits_two_minutes() -> None:
    write = lc.fail(read(claimed()), AGENT_A, 1, "exit code 2", NOW)
    s = write.status
    assert s["phase"] == "RetryPending"
    assert s["retryCount"] == 1
    assert s["nextRetryAfter"] == "2024-05-01T12:32:00.250000Z"
    assert s["lastError"] == "exit code 2"
    assert s["lastErrorAt"] == format_time(NOW)
    assert not any(f in s for f in CLAIM_FIELDS)
    assert "completedAt" not in s
    assert condition_states(s) == {"Succeeded": "Unknown", "Reconciling": "True", "Stalled": "False"}
    assert conditions(s)["Succeeded"]["reason"] == "RetryBackoff"
    assert s["history"] == [
        {
            "attempt": 1,
            "outcome": "Failed",
            "agent": AGENT_A,
            "claimedAt": format_time(NOW),
            "finishedAt": format_time(NOW),
            "message": "exit code 2",
        }
    ]


@pytest.mark.parametrize("retry_count", [0, 1, 2, 5])
def test_fail_with_retries_left_waits_backoff_times_two_to_the_next_retry(retry_count: int) -> None:
    body = with_status(claimed({"backoffSeconds": 7, "maxRetries": 10}), retryCount=retry_count)
    write = lc.fail(read(body), AGENT_A, 1, "boom", NOW)
    assert write.guards["/status/retryCount"] == retry_count
    assert write.status["phase"] == "RetryPending"
    assert write.status["retryCount"] == retry_count + 1
    assert write.status["nextRetryAfter"] == format_time(NOW + seconds(7 * 2 ** (retry_count + 1)))


def test_fail_wait_is_capped_by_max_backoff_seconds() -> None:
    body = with_status(claimed({"backoffSeconds": 60, "maxBackoffSeconds": 200}), retryCount=2)
    write = lc.fail(read(body), AGENT_A, 1, "boom", NOW)
    assert write.status["nextRetryAfter"] == format_time(NOW + seconds(200))


def test_max_retries_zero_fails_at_once() -> None:
    write = lc.fail(read(claimed({"maxRetries": 0})), AGENT_A, 1, "exit code 1", NOW)
    s = write.status
    assert s["phase"] == "Failed"
    assert s["retryCount"] == 0
    assert "nextRetryAfter" not in s
    assert s["completedAt"] == format_time(NOW)
    assert s["result"] == s["lastError"] == "exit code 1"
    assert condition_states(s) == {"Succeeded": "False", "Reconciling": "False", "Stalled": "True"}


def test_a_non_retryable_failure_is_final_and_keeps_retry_count() -> None:
    body = with_status(claimed(), retryCount=1)
    write = lc.fail(read(body), AGENT_A, 1, "invalid Dockerfile", NOW, retryable=False)
    s = write.status
    assert s["phase"] == "Failed"
    assert s["retryCount"] == 1
    assert "not retryable" in write.message
    assert s["history"][-1]["outcome"] == "Failed"


def test_an_empty_error_still_says_something() -> None:
    s = lc.fail(read(claimed()), AGENT_A, 1, "", NOW).status
    assert s["lastError"]


def test_long_errors_are_cut_to_the_api_limit_keeping_the_end() -> None:
    error = "x" * 10_000 + "the real cause"
    s = lc.fail(read(claimed({"maxRetries": 0})), AGENT_A, 1, error, NOW).status
    assert len(s["lastError"]) == MESSAGE_LIMIT
    assert s["lastError"].endswith("the real cause")
    assert all(len(c["message"]) <= MESSAGE_LIMIT for c in s["conditions"])


def test_with_defaults_the_fourth_failure_is_final() -> None:
    body = pending()
    t = NOW
    waits = []
    for attempt in range(1, 5):
        body = store(body, lc.claim(read(body), A, t))
        assert read(body).status.attempt == attempt
        t += seconds(10)
        body = store(body, lc.fail(read(body), AGENT_A, attempt, f"failure {attempt}", t))
        order = read(body)
        if order.status.phase == "Failed":
            break
        assert order.status.next_retry_after is not None
        waits.append((order.status.next_retry_after - t).total_seconds())
        with pytest.raises(TransitionError):  # not yet
            lc.due(order, order.status.next_retry_after - MICROSECOND)
        t = order.status.next_retry_after
        body = store(body, lc.due(order, t))
        assert read(body).status.phase == "Pending"
    s = body["status"]
    assert waits == [120, 240, 480]
    assert (s["phase"], s["attempt"], s["retryCount"]) == ("Failed", 4, 3)
    assert s["lastError"] == "failure 4"
    assert [h["outcome"] for h in s["history"]] == ["Failed"] * 4


# --- expire -------------------------------------------------------------------------------------


def test_a_claim_expires_at_its_deadline_not_before() -> None:
    order = read(claimed({"claimTimeoutSeconds": 600}))
    deadline = NOW + seconds(600)
    assert lc.claim_deadline(order) == deadline
    with pytest.raises(TransitionError):
        lc.expire(order, deadline - MICROSECOND)
    assert lc.expire(order, deadline).status["phase"] == "Pending"
    assert lc.expire(order, deadline + seconds(3600)).status["phase"] == "Pending"


def test_a_renewal_moves_the_deadline() -> None:
    body = claimed({"claimTimeoutSeconds": 600})
    body = store(body, lc.renew(read(body), AGENT_A, 1, NOW + seconds(500)))
    order = read(body)
    assert lc.claim_deadline(order) == NOW + seconds(1100)
    with pytest.raises(TransitionError):
        lc.expire(order, NOW + seconds(700))


def test_a_slow_agent_clock_cannot_expire_a_claim_early() -> None:
    # The agent's clock is two hours behind: its claimedAt is long past when the operator sees the claim.
    body = claimed({"claimTimeoutSeconds": 3600}, at=NOW - seconds(7200))
    order = read(body)
    first_seen = NOW
    # Believed up to SEEN_ALLOWANCE (1 s) before the operator saw the claim, not further.
    assert lc.claim_deadline(order, first_seen) == NOW + seconds(3599)
    with pytest.raises(TransitionError):
        lc.expire(order, NOW + seconds(3598.9), first_seen)
    assert lc.expire(order, NOW + seconds(3599), first_seen).status["phase"] == "Pending"
    assert lc.plan(order, first_seen) == Plan(Action.EXPIRE, NOW + seconds(3599))


def test_a_claim_is_timed_from_when_the_agent_made_it_not_from_when_the_operator_heard_of_it() -> None:
    # The claim reached the operator's watch 0.4 s after the agent made it (clocks in step).
    body = claimed({"claimTimeoutSeconds": 60}, at=NOW - seconds(0.4))
    order = read(body)
    assert lc.claim_deadline(order, NOW) == NOW + seconds(59.6)
    assert lc.plan(order, NOW) == Plan(Action.EXPIRE, NOW + seconds(59.6))
    renewed = read(store(body, lc.renew(order, AGENT_A, 1, NOW + seconds(29.7))))
    assert lc.claim_deadline(renewed, NOW + seconds(30)) == NOW + seconds(89.7)


def test_the_servers_time_of_the_agents_last_write_counts_but_not_the_operators() -> None:
    agent_write = NOW + seconds(100)
    later = format_time(NOW + seconds(900))
    managed = [
        {"manager": "agent", "operation": "Update", "subresource": "status", "time": format_time(agent_write)},
        {"manager": "workorder-operator", "operation": "Update", "subresource": "status", "time": later},
        {"manager": "kubectl", "operation": "Update", "time": later},  # a spec/metadata write, not status
    ]
    body = claimed({"claimTimeoutSeconds": 600})
    body["metadata"]["managedFields"] = managed
    order = WorkOrder.from_body(body, operator_manager="workorder-operator")
    assert order.status_written_at == agent_write
    assert lc.claim_deadline(order) == agent_write + seconds(600)
    with pytest.raises(TransitionError):
        lc.expire(order, NOW + seconds(650))


def test_expire_returns_the_order_keeping_retry_count_and_names_the_agent() -> None:
    body = with_status(claimed({"claimTimeoutSeconds": 60}), retryCount=2, attempt=3)
    order = read(body)
    now = NOW + seconds(61)
    write = lc.expire(order, now)
    assert write.guards == {
        "/metadata/uid": ORDER_UID,
        "/metadata/resourceVersion": body["metadata"]["resourceVersion"],
    }
    s = write.status
    assert s["phase"] == "Pending"
    assert s["retryCount"] == 2
    assert s["attempt"] == 3
    assert not any(f in s for f in CLAIM_FIELDS)
    assert AGENT_A in s["lastError"]
    assert s["lastErrorAt"] == format_time(now)
    assert s["history"][-1]["outcome"] == "Expired"
    assert s["history"][-1]["agent"] == AGENT_A


def test_expire_never_overwrites_a_renewal_it_has_not_seen() -> None:
    body = claimed({"claimTimeoutSeconds": 60})
    seen = read(body)
    body = store(body, lc.renew(read(body), AGENT_A, 1, NOW + seconds(59)))
    with pytest.raises(GuardFailed):
        store(body, lc.expire(seen, NOW + seconds(60)))


def test_an_operator_write_never_lands_on_a_version_it_has_not_seen_even_with_the_same_status() -> None:
    """Someone wrote (and wrote back) in between: the status reads the same, the object is newer."""
    body = claimed({"claimTimeoutSeconds": 60})
    seen = read(body)
    body = store(body, lc.renew(seen, AGENT_A, 1, NOW))
    body = {**body, "status": seen.raw_status}
    with pytest.raises(GuardFailed):
        store(body, lc.expire(seen, NOW + seconds(60)))


def test_expire_is_refused_unless_claimed() -> None:
    with pytest.raises(TransitionError):
        lc.expire(read(pending()), NOW + seconds(10**6))


# --- due, requeue -------------------------------------------------------------------------------


def retry_pending(spec: dict[str, Any] | None = None) -> dict[str, Any]:
    body = claimed(spec)
    return store(body, lc.fail(read(body), AGENT_A, 1, "boom", NOW))


def test_due_only_when_the_retry_time_has_come() -> None:
    body = retry_pending()
    order = read(body)
    when = NOW + seconds(120)
    assert order.status.next_retry_after == when
    with pytest.raises(TransitionError):
        lc.due(order, when - MICROSECOND)
    write = lc.due(order, when)
    assert write.guards == {
        "/metadata/uid": ORDER_UID,
        "/metadata/resourceVersion": body["metadata"]["resourceVersion"],
    }
    s = write.status
    assert s["phase"] == "Pending"
    assert "nextRetryAfter" not in s
    assert s["retryCount"] == 1
    assert s["lastError"] == "boom"  # the seed keeps the last error visible


FORGED = "9999-12-31T23:59:59.000000Z"


def agent_wrote_status_at(body: dict[str, Any], when: dt.datetime) -> WorkOrder:
    """The order as the operator reads it, the server's managedFields saying an agent wrote its
    status at `when` (and the operator later, which does not count)."""
    body = copy.deepcopy(body)
    body["metadata"]["managedFields"] = [
        {"manager": "workorder-agent", "operation": "Update", "subresource": "status", "time": format_time(when)},
        {"manager": "workorder-operator", "operation": "Update", "subresource": "status",
         "time": format_time(when + seconds(3600))},
    ]  # fmt: skip
    return WorkOrder.from_body(body, operator_manager="workorder-operator")


def test_a_forged_next_retry_after_cannot_park_an_order_beyond_its_backoff() -> None:
    # Retry 1 of backoffSeconds 60 waits 120 s after the failure, whatever the agent wrote.
    body = with_status(retry_pending(), nextRetryAfter=FORGED)
    order = agent_wrote_status_at(body, NOW + seconds(1))  # the server's time of the fail
    # The server's times are whole seconds: the fail may have been written up to one later.
    limit = NOW + seconds(1) + lc.WRITE_TIME_RESOLUTION + seconds(120)
    assert lc.retry_limit(order) == limit
    assert lc.plan(order, seen_at=NOW + seconds(2)) == Plan(Action.DUE, limit)
    with pytest.raises(TransitionError):
        lc.due(order, limit - MICROSECOND, NOW + seconds(2))
    write = lc.due(order, limit, NOW + seconds(2))
    assert write.status["phase"] == "Pending" and "nextRetryAfter" not in write.status
    assert f"its nextRetryAfter {FORGED} is beyond what the spec allows" in write.message


def test_the_retry_limit_counts_from_the_earlier_of_the_servers_time_and_the_operators_sight() -> None:
    body = with_status(retry_pending({"backoffSeconds": 10, "maxBackoffSeconds": 15}), retryCount=3,
                       nextRetryAfter=FORGED)  # fmt: skip
    cap = seconds(15)  # 10 * 2^3 capped by maxBackoffSeconds
    # A forged server time (far ahead) loses to the operator's own clock ...
    order = agent_wrote_status_at(body, NOW + seconds(10**6))
    assert lc.retry_limit(order, seen_at=NOW) == NOW + cap
    # ... a restarted operator (which first sees the order late) to the server's.
    order = agent_wrote_status_at(body, NOW)
    assert lc.retry_limit(order, seen_at=NOW + seconds(3600)) == NOW + lc.WRITE_TIME_RESOLUTION + cap
    # Only ours known (no managedFields): ours.
    assert lc.retry_limit(read(body), seen_at=NOW + seconds(5)) == NOW + seconds(5) + cap
    # Neither: the agent's word is all there is.
    assert lc.retry_limit(read(body)) is None
    assert lc.retry_due(read(body)) == parse_time(FORGED)


def test_the_seven_day_ceiling_bounds_a_retry_when_the_spec_has_no_cap() -> None:
    body = with_status(retry_pending({"backoffSeconds": 604800}), retryCount=5, nextRetryAfter=FORGED)
    assert lc.retry_due(read(body), seen_at=NOW) == NOW + seconds(7 * 24 * 3600)


def test_an_honest_next_retry_after_is_kept() -> None:
    # Within the spec's bound: the agent's own time stands (its clock may run a little behind).
    body = retry_pending()  # nextRetryAfter NOW + 120 s
    order = agent_wrote_status_at(body, NOW + seconds(2))
    assert lc.retry_due(order, seen_at=NOW + seconds(3)) == NOW + seconds(120)
    assert "beyond" not in lc.due(order, NOW + seconds(120), NOW + seconds(3)).message


def test_due_is_refused_unless_retry_pending() -> None:
    with pytest.raises(TransitionError):
        lc.due(read(claimed()), NOW + seconds(10**6))


def failed() -> dict[str, Any]:
    body = with_status(claimed(), retryCount=3, attempt=4)
    return store(body, lc.fail(read(body), AGENT_A, 4, "still broken", NOW))


def test_requeue_puts_a_failed_order_back_with_retries_reset() -> None:
    body = failed()
    assert body["status"]["phase"] == "Failed"
    write = lc.requeue(read(body), NOW + seconds(5))
    assert write.guards == {
        "/metadata/uid": ORDER_UID,
        "/metadata/resourceVersion": body["metadata"]["resourceVersion"],
    }
    s = write.status
    assert s["phase"] == "Pending"
    assert s["retryCount"] == 0
    assert s["attempt"] == 4  # the fencing token never goes back
    assert not any(f in s for f in ("completedAt", "result", "nextRetryAfter", *CLAIM_FIELDS))
    assert condition_states(s) == {"Succeeded": "Unknown", "Reconciling": "True", "Stalled": "False"}
    again = lc.claim(read(store(body, write)), B, NOW + seconds(6))
    assert again.status["attempt"] == 5


def test_requeue_puts_back_an_order_waiting_for_its_retry() -> None:
    # However far its nextRetryAfter (a stuck order's owner is never left waiting on an agent's word).
    body = with_status(retry_pending(), nextRetryAfter=FORGED)
    s = lc.requeue(read(body), NOW + seconds(5)).status
    assert s["phase"] == "Pending" and s["retryCount"] == 0 and s["attempt"] == 1
    assert "nextRetryAfter" not in s
    assert s["lastError"] == "boom" and len(s["history"]) == 1  # the record stays


@pytest.mark.parametrize("make", [pending, claimed])
def test_requeue_is_refused_unless_failed_or_retry_pending(make: Any) -> None:
    with pytest.raises(TransitionError):
        lc.requeue(read(make()), NOW)


def test_requeue_of_a_completed_order_is_refused() -> None:
    body = claimed()
    body = store(body, lc.complete(read(body), AGENT_A, 1, "ok", NOW))
    with pytest.raises(TransitionError):
        lc.requeue(read(body), NOW)


# --- history and conditions ---------------------------------------------------------------------


def test_history_keeps_only_the_last_attempts() -> None:
    body = pending()
    t = NOW
    for attempt in range(1, HISTORY_LIMIT + 4):
        body = store(body, lc.claim(read(body), A, t))
        t += SECOND
        body = store(body, lc.release(read(body), AGENT_A, attempt, t))
    history = body["status"]["history"]
    assert len(history) == HISTORY_LIMIT
    assert [h["attempt"] for h in history] == list(range(4, HISTORY_LIMIT + 4))
    assert {h["outcome"] for h in history} == {"Released"}


def test_history_records_every_outcome_in_order() -> None:
    body = claimed({"claimTimeoutSeconds": 60})
    body = store(body, lc.expire(read(body), NOW + seconds(60)))
    body = store(body, lc.claim(read(body), B, NOW + seconds(61)))
    body = store(body, lc.release(read(body), AGENT_B, 2, NOW + seconds(62)))
    body = store(body, lc.claim(read(body), A, NOW + seconds(63)))
    body = store(body, lc.fail(read(body), AGENT_A, 3, "boom", NOW + seconds(64)))
    body = store(body, lc.due(read(body), NOW + seconds(64 + 120)))
    body = store(body, lc.claim(read(body), B, NOW + seconds(200)))
    body = store(body, lc.complete(read(body), AGENT_B, 4, "sha256:ok", NOW + seconds(300)))
    history = body["status"]["history"]
    assert [(h["attempt"], h["agent"], h["outcome"]) for h in history] == [
        (1, AGENT_A, "Expired"),
        (2, AGENT_B, "Released"),
        (3, AGENT_A, "Failed"),
        (4, AGENT_B, "Succeeded"),
    ]
    assert body["status"]["retryCount"] == 1  # only the failure counted


def test_last_transition_time_moves_only_when_a_condition_changes_status() -> None:
    body = pending()  # at T_INIT: Succeeded Unknown, Reconciling True, Stalled False
    t_claim, t_done = NOW, NOW + seconds(90)
    body = store(body, lc.claim(read(body), A, t_claim))
    after_claim = conditions(body["status"])
    assert {c["lastTransitionTime"] for c in after_claim.values()} == {format_time(T_INIT)}
    assert after_claim["Succeeded"]["reason"] == "Claimed"  # reason and message do follow the phase
    body = store(body, lc.complete(read(body), AGENT_A, 1, "ok", t_done))
    done = conditions(body["status"])
    assert done["Succeeded"]["lastTransitionTime"] == format_time(t_done)
    assert done["Reconciling"]["lastTransitionTime"] == format_time(t_done)
    assert done["Stalled"]["lastTransitionTime"] == format_time(T_INIT)
    assert {c["observedGeneration"] for c in done.values()} == {1}


# --- plan ---------------------------------------------------------------------------------------


def test_plan_initialises_a_new_order_after_a_grace_that_lets_agents_claim_first() -> None:
    assert lc.plan(make_order(status=CRD_DEFAULT_STATUS)) == Plan(Action.INITIALISE, CREATED + lc.INITIALISE_GRACE)


def test_plan_rejects_content_it_cannot_run_at_once() -> None:
    assert lc.plan(make_order(status=CRD_DEFAULT_STATUS), rejected=True) == Plan(Action.INITIALISE, CREATED)


def test_plan_has_nothing_to_do_for_an_initialised_pending_order() -> None:
    assert lc.plan(read(pending())) == Plan()


def test_plan_expires_a_claim_at_its_deadline() -> None:
    order = read(claimed({"claimTimeoutSeconds": 600}))
    assert lc.plan(order) == Plan(Action.EXPIRE, NOW + seconds(600))
    # Seen 30 s after it was made: counted from SEEN_ALLOWANCE before that sighting.
    assert lc.plan(order, NOW + seconds(30)) == Plan(Action.EXPIRE, NOW + seconds(629))


def test_plan_makes_a_retry_due_at_its_time() -> None:
    assert lc.plan(read(retry_pending())) == Plan(Action.DUE, NOW + seconds(120))


def test_plan_leaves_finished_orders_alone_without_ttl() -> None:
    assert lc.plan(read(failed())) == Plan()


@pytest.mark.parametrize("ttl", [0, 3600])
def test_plan_deletes_finished_orders_after_their_ttl(ttl: int) -> None:
    body = claimed({"ttlSecondsAfterFinished": ttl})
    done = store(body, lc.complete(read(body), AGENT_A, 1, "ok", NOW + seconds(90)))
    assert lc.plan(read(done)) == Plan(Action.DELETE, NOW + seconds(90 + ttl))
    gone = store(body, lc.fail(read(body), AGENT_A, 1, "boom", NOW + seconds(90), retryable=False))
    assert lc.plan(read(gone)) == Plan(Action.DELETE, NOW + seconds(90 + ttl))


def test_plan_ttl_does_not_apply_before_the_order_finishes() -> None:
    assert lc.plan(read(pending({"ttlSecondsAfterFinished": 0}))) == Plan()
    assert lc.plan(read(retry_pending({"ttlSecondsAfterFinished": 0}))).action == Action.DUE


# --- the wire form ------------------------------------------------------------------------------


def test_json_patch_tests_every_guard_first_then_sets_the_status() -> None:
    write = lc.fail(read(claimed()), AGENT_A, 1, "boom", NOW)
    ops = json_patch(write)
    assert ops == [
        {"op": "test", "path": "/metadata/uid", "value": ORDER_UID},
        {"op": "test", "path": "/status/phase", "value": "Claimed"},
        {"op": "test", "path": "/status/claimedBy", "value": AGENT_A},
        {"op": "test", "path": "/status/attempt", "value": 1},
        {"op": "test", "path": "/status/retryCount", "value": 0},
        {"op": "add", "path": "/status", "value": write.status},
    ]


def test_json_patch_of_an_operator_write_tests_the_resource_version_it_read() -> None:
    body = retry_pending()
    write = lc.due(read(body), NOW + seconds(120))
    ops = json_patch(write)
    assert ops == [
        {"op": "test", "path": "/metadata/uid", "value": ORDER_UID},
        {"op": "test", "path": "/metadata/resourceVersion", "value": body["metadata"]["resourceVersion"]},
        {"op": "add", "path": "/status", "value": write.status},
    ]


# --- fencing by uid -----------------------------------------------------------------------------

OTHER_UID = "0b7e3c52-9d4e-4f61-8a2b-1c3d5e7f9a0b"


def recreated(body: dict[str, Any]) -> dict[str, Any]:
    """The same name deleted and created again: a new uid, the same status values."""
    return {**body, "metadata": {**body["metadata"], "uid": OTHER_UID}}


@HOLDER_TRANSITIONS
def test_a_handle_of_a_deleted_order_cannot_touch_a_recreated_one_with_the_same_attempt(transition: Any) -> None:
    old = claimed()  # attempt 1 of agent A
    new = recreated(claimed())  # re-created, claimed again by the same agent: attempt 1 again
    write = transition(read(old), AGENT_A, 1)
    with pytest.raises(GuardFailed, match="/metadata/uid"):
        store(new, write)


def test_every_transition_tests_the_uid_first() -> None:
    body = claimed({"claimTimeoutSeconds": 60})
    writes = [
        lc.initialise(make_order(status=CRD_DEFAULT_STATUS), T_INIT),
        lc.claim(read(pending()), A, NOW),
        lc.renew(read(body), AGENT_A, 1, NOW),
        lc.expire(read(body), NOW + seconds(61)),
        lc.due(read(retry_pending()), NOW + seconds(120)),
        lc.requeue(read(failed()), NOW),
        lc.waiting(read(pending()), "Why", "because", NOW),
        lc.sync_conditions(read(with_status(body, phase="Completed")), NOW),
    ]
    for write in writes:
        assert next(iter(json_patch(write))) == {"op": "test", "path": "/metadata/uid", "value": ORDER_UID}


# --- conditions: the operator's backstop --------------------------------------------------------


def minimal_agent(body: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """What an agent following SPEC.md's transitions table literally writes: those fields only."""
    return with_status(body, **fields)


def test_conditions_of_an_sdk_written_order_already_match() -> None:
    for body in (pending(), claimed(), retry_pending(), failed()):
        assert lc.conditions_true(read(body))
        assert lc.plan(read(body)).action != Action.CONDITIONS


@pytest.mark.parametrize(
    ("fields", "succeeded", "reason"),
    [
        ({"phase": "Completed", "completedAt": format_time(NOW), "result": "sha256:1"}, "True", "Completed"),
        ({"phase": "Failed", "completedAt": format_time(NOW), "result": "x", "lastError": "x"}, "False", "Failed"),
        ({"phase": "RetryPending", "retryCount": 1, "nextRetryAfter": format_time(NOW)}, "Unknown", "RetryBackoff"),
        ({"phase": "Pending", "claimedBy": None, "claimedAt": None}, "Unknown", "Pending"),
    ],
)
def test_the_operator_writes_conditions_for_a_phase_a_minimal_agent_wrote(
    fields: dict[str, Any], succeeded: str, reason: str
) -> None:
    body = minimal_agent(claimed(), **fields)
    order = read(body)
    assert not lc.conditions_true(order)
    assert lc.plan(order).action == Action.CONDITIONS
    write = lc.sync_conditions(order, NOW + SECOND)
    after = store(body, write)
    assert conditions(after["status"])["Succeeded"]["status"] == succeeded
    assert conditions(after["status"])["Succeeded"]["reason"] == reason
    assert after["status"]["reason"] == reason  # the REASON column follows
    # Only conditions, reason and observedGeneration change: the agent's fields stay as written.
    ours = ("conditions", "observedGeneration", "reason")
    assert {k: v for k, v in after["status"].items() if k not in ours} == {
        k: v for k, v in body["status"].items() if k not in ours
    }
    assert lc.conditions_true(read(after))
    with pytest.raises(TransitionError):
        lc.sync_conditions(read(after), NOW + SECOND)  # once: nothing to write when they match


def test_a_minimal_claim_of_a_new_order_gets_its_conditions_and_then_its_expiry() -> None:
    body = minimal_agent(
        order_body({"claimTimeoutSeconds": 60}),
        phase="Claimed", claimedBy=AGENT_A, claimedAt=format_time(NOW), attempt=1,
    )  # fmt: skip
    assert lc.plan(read(body)) == Plan(Action.CONDITIONS, CREATED)
    after = store(body, lc.sync_conditions(read(body), NOW))
    assert lc.plan(read(after)) == Plan(Action.EXPIRE, NOW + seconds(60))


def test_a_stale_observed_generation_is_corrected() -> None:
    body = with_status(claimed(), observedGeneration=0)
    assert lc.plan(read(body)).action == Action.CONDITIONS


def test_the_conditions_write_never_overwrites_an_agents_write_it_has_not_seen() -> None:
    body = minimal_agent(claimed(), phase="Completed", completedAt=format_time(NOW), result="r")
    write = lc.sync_conditions(read(body), NOW)
    with pytest.raises(GuardFailed):
        store(written(body, result="changed"), write)


def test_a_waiting_reason_on_a_pending_order_is_kept() -> None:
    body = store(pending(), lc.waiting(read(pending()), "ShipwrightNotInstalled", "no Shipwright", NOW))
    assert lc.conditions_true(read(body))


# --- agent clocks -------------------------------------------------------------------------------


def test_a_claim_stamped_years_ahead_expires_a_timeout_after_the_operator_saw_it() -> None:
    years_ahead = NOW + dt.timedelta(days=3 * 365)
    body = claimed({"claimTimeoutSeconds": 60}, at=years_ahead)
    assert lc.claim_deadline(read(body), seen_at=NOW) == NOW + seconds(60)
    assert lc.plan(read(body), seen_at=NOW) == Plan(Action.EXPIRE, NOW + seconds(60))
    assert lc.expire(read(body), NOW + seconds(60), seen_at=NOW).status["phase"] == "Pending"


def test_a_renewal_stamped_ahead_is_believed_within_the_tolerance() -> None:
    body = with_status(claimed({"claimTimeoutSeconds": 60}), renewedAt=format_time(NOW + seconds(5)))
    assert lc.claim_deadline(read(body), seen_at=NOW) == NOW + seconds(65)
    far = with_status(body, renewedAt=format_time(NOW + dt.timedelta(days=400)))
    assert lc.claim_deadline(read(far), seen_at=NOW) == NOW + seconds(60)


# --- what mutation testing asked for (make mutation) --------------------------------------------


def test_a_result_over_the_schema_limit_keeps_its_end() -> None:
    # The schema refuses a longer result with 422: the order would stay Claimed and run again.
    result = "x" * 100 + "y" * lc.RESULT_LIMIT
    s = lc.complete(read(claimed()), AGENT_A, 1, result, NOW).status
    assert s["result"] == "y" * lc.RESULT_LIMIT
    assert lc.RESULT_LIMIT == 16384
    short = lc.complete(read(claimed()), AGENT_A, 1, "sha256:feed", NOW).status
    assert short["result"] == "sha256:feed"


def with_generation(body: dict[str, Any], generation: int) -> dict[str, Any]:
    return {**body, "metadata": {**body["metadata"], "generation": generation}}


def test_every_status_write_records_the_generation_it_saw() -> None:
    # A generation the stored status does not hold yet: each write must bring it, in the
    # status and in every condition (kstatus reads both).
    body = with_generation(claimed(), 4)
    order = read(body)
    writes = [
        lc.complete(order, AGENT_A, 1, "ok", NOW),
        lc.fail(order, AGENT_A, 1, "boom", NOW),
        lc.fail(order, AGENT_A, 1, "boom", NOW, retryable=False),
        lc.release(order, AGENT_A, 1, NOW),
        lc.expire(order, NOW + seconds(3600)),
        lc.claim(read(with_generation(pending(), 4)), A, NOW),
        lc.initialise(make_order(status=CRD_DEFAULT_STATUS).model_copy(update={"generation": 4}), T_INIT),
        lc.due(read(with_generation(retry_pending(), 4)), NOW + seconds(120)),
        lc.requeue(read(with_generation(failed(), 4)), NOW),
        lc.waiting(read(with_generation(pending(), 4)), "NoAgent", "no agent", NOW),
    ]
    for write in writes:
        assert write.status["observedGeneration"] == 4, write.transition
        assert {c["observedGeneration"] for c in write.status["conditions"]} == {4}, write.transition


def test_ttl_counts_from_completion_not_from_the_last_status_change() -> None:
    body = claimed({"ttlSecondsAfterFinished": 60})
    done = store(body, lc.complete(read(body), AGENT_A, 1, "ok", NOW))
    # A later write (conditions brought up to date, say) moves updatedAt, not the TTL.
    touched = with_status(done, updatedAt=format_time(NOW + seconds(500)))
    assert lc.plan(read(touched)) == Plan(Action.DELETE, NOW + seconds(60))
    # Without completedAt (written by a minimal agent), the last change is the best guess.
    bare = with_status(touched, completedAt=None)
    assert lc.plan(read(bare)) == Plan(Action.DELETE, NOW + seconds(560))


FAR = dt.datetime(9999, 12, 31, 23, 59, 59, tzinfo=dt.UTC)


def test_far_dates_saturate_instead_of_overflowing() -> None:
    # Any valid date may be stored; a deadline past year 9999 is "never", not an OverflowError.
    renewed_far = read(with_status(claimed(), renewedAt=format_time(FAR)))
    assert lc.claim_deadline(renewed_far) == lc.FAR_FUTURE
    assert lc.plan(renewed_far) == Plan(Action.EXPIRE, lc.FAR_FUTURE)
    with pytest.raises(TransitionError):
        lc.expire(renewed_far, FAR)
    body = claimed({"ttlSecondsAfterFinished": 60})
    done_far = store(body, lc.complete(read(body), AGENT_A, 1, "ok", NOW))
    finished_far = read(with_status(done_far, completedAt=format_time(FAR)))
    assert lc.plan(finished_far) == Plan(Action.DELETE, lc.FAR_FUTURE)
    assert dt.datetime.max.replace(tzinfo=dt.UTC) == lc.FAR_FUTURE
    # Just below the edge, the sum is exact.
    near = dt.datetime(9999, 12, 31, 23, 0, 0, tzinfo=dt.UTC)
    assert lc.claim_deadline(read(with_status(claimed({"claimTimeoutSeconds": 60}), renewedAt=format_time(near)))) == (
        near + seconds(60)
    )


# What each transition says: the name and message become the Event's reason and message and the
# log line, the conditions' message, and `kubectl workorder` errors; a person reads them.
def test_what_each_transition_says() -> None:
    body = claimed({"maxRetries": 3})
    order = read(body)
    said = {
        "claim": lc.claim(read(pending()), A, NOW),
        "renew": lc.renew(order, AGENT_A, 1, NOW),
        "complete": lc.complete(order, AGENT_A, 1, "ok", NOW),
        "fail": lc.fail(order, AGENT_A, 1, "boom", NOW),
        "release": lc.release(order, AGENT_A, 1, NOW, "shutting down"),
        "expire": lc.expire(order, NOW + seconds(3600)),
        "due": lc.due(read(retry_pending()), NOW + seconds(120)),
        "requeue": lc.requeue(read(failed()), NOW),
        "initialise": lc.initialise(make_order(status=CRD_DEFAULT_STATUS), T_INIT),
        "reject": lc.initialise(make_order(status=CRD_DEFAULT_STATUS), T_INIT, "document 1: kind Pod"),
        "waiting": lc.waiting(read(pending()), "NoBuildAgent", "no build agent runs", NOW),
    }
    due = format_time(NOW + seconds(120))
    assert {name: (w.transition, w.message) for name, w in said.items()} == {
        "claim": ("claim", f"claimed by agent {AGENT_A} (attempt 1)"),
        "renew": ("renew", ""),
        "complete": ("complete", f"completed by agent {AGENT_A} in attempt 1"),
        "fail": ("fail", f"attempt 1 failed: boom; retry 1 of 3 after {due}"),
        "release": ("release", f"released by agent {AGENT_A}: shutting down"),
        "expire": (
            "expire",
            f"claim of agent {AGENT_A} (attempt 1) expired: no renewal within 3600s",
        ),
        "due": ("due", "retry 1 of 3 due: waiting for an agent"),
        "requeue": ("requeue", "requeued after failure"),
        "initialise": ("initialise", "waiting for an agent"),
        "reject": ("reject", "rejected: document 1: kind Pod"),
        "waiting": ("waiting", "no build agent runs"),
    }
    for name, write in said.items():
        if name != "renew":  # a renewal changes no condition
            assert {c["message"] for c in write.status["conditions"]} == {write.message}, name


def test_what_a_final_failure_says() -> None:
    order = read(claimed({"maxRetries": 3}))
    assert lc.fail(order, AGENT_A, 1, "bad input", NOW, retryable=False).message == (
        "attempt 1 failed (not retryable): bad input"
    )
    used_up = read(with_status(claimed({"maxRetries": 3}), retryCount=3))
    assert lc.fail(used_up, AGENT_A, 1, "boom", NOW).message == "attempt 1 failed (3 retries used up): boom"
    # A second retry says so.
    second = read(with_status(claimed({"maxRetries": 3}), retryCount=1))
    assert lc.fail(second, AGENT_A, 1, "boom", NOW).message == (
        f"attempt 1 failed: boom; retry 2 of 3 after {format_time(NOW + seconds(240))}"
    )


def test_an_empty_error_still_says_it_failed() -> None:
    s = lc.fail(read(claimed()), AGENT_A, 1, "", NOW).status
    assert s["lastError"] == "failed"
    assert s["history"][-1]["message"] == "failed"


def test_a_release_without_reason_says_only_who() -> None:
    write = lc.release(read(claimed()), AGENT_A, 1, NOW)
    assert write.message == f"released by agent {AGENT_A}"
    assert "message" not in write.status["history"][-1]


def test_refusals_say_what_the_order_is_and_what_it_should_be() -> None:
    with pytest.raises(TransitionError, match=r"^team-a/wo-1 is Claimed, not Pending$"):
        lc.claim(read(claimed()), B, NOW)
    with pytest.raises(TransitionError, match=r"^team-a/wo-1 is not initialised, not Failed or RetryPending$"):
        lc.requeue(make_order(status={}), NOW)
    with pytest.raises(TransitionError, match=r"^team-a/wo-1 is Pending, not Claimed$"):
        lc.expire(read(pending()), NOW)
    with pytest.raises(TransitionError) as wrong_holder:
        lc.complete(read(claimed()), AGENT_B, 1, "ok", NOW)
    assert str(wrong_holder.value) == (
        f"team-a/wo-1: the claim is now attempt 1 of agent {AGENT_A}, not attempt 1 of {AGENT_B}"
    )
    with pytest.raises(TransitionError, match=r"^team-a/wo-1 is already initialised \(Pending\)$"):
        lc.initialise(read(pending()), NOW)
    with pytest.raises(TransitionError, match=r"^team-a/wo-1: the claim has not expired yet$"):
        lc.expire(read(claimed()), NOW)
    with pytest.raises(TransitionError, match=r"^team-a/wo-1: targeting does not admit agent "):
        lc.claim(read(pending({"targeting": {"agentIds": [AGENT_A]}})), B, NOW)
    when = format_time(NOW + seconds(120))
    with pytest.raises(TransitionError, match=rf"^team-a/wo-1: retry not due until {when}$"):
        lc.due(read(retry_pending()), NOW)
    with pytest.raises(TransitionError, match=r"^team-a/wo-1 is Claimed, not Pending$"):
        lc.waiting(read(claimed()), "NoBuildAgent", "m", NOW)


def test_waiting_says_why_on_a_pending_order_and_leaves_it_claimable() -> None:
    body = pending()
    write = lc.waiting(read(body), "NoBuildAgent", "no build agent runs", NOW)
    assert write.guards["/metadata/resourceVersion"] == body["metadata"]["resourceVersion"]
    s = write.status
    assert (s["phase"], s["attempt"], s["retryCount"]) == ("Pending", 0, 0)
    assert {c["reason"] for c in s["conditions"]} == {"NoBuildAgent"}
    assert condition_states(s) == {"Succeeded": "Unknown", "Reconciling": "True", "Stalled": "False"}
    assert s["updatedAt"] == format_time(NOW)
    claimed_after = store(body, write)
    assert read(store(claimed_after, lc.claim(read(claimed_after), A, NOW))).status.phase == "Claimed"


def test_leftovers_of_a_minimal_agent_are_cleared_by_the_next_transition() -> None:
    # An agent in another language writes only the transitions table: fields it leaves behind
    # must not survive into a state where they mean something else.
    stale = format_time(NOW - seconds(60))
    leftover = with_status(pending(), renewedAt=stale, nextRetryAfter=stale)
    s = lc.claim(read(leftover), A, NOW).status
    assert "renewedAt" not in s
    done = lc.complete(read(with_status(claimed(), nextRetryAfter=stale)), AGENT_A, 1, "ok", NOW).status
    assert "nextRetryAfter" not in done
    requeued = lc.requeue(read(with_status(failed(), nextRetryAfter=stale)), NOW).status
    assert "nextRetryAfter" not in requeued


def test_a_claim_records_who_claimed_it() -> None:
    s = lc.claim(read(pending()), A, NOW, user="system:serviceaccount:team-a:builder").status
    assert s["claimedByUser"] == "system:serviceaccount:team-a:builder"
    assert "claimedByUser" not in lc.claim(read(pending()), A, NOW).status
    # The next transition away from Claimed clears it with the rest of the claim.
    body = store(pending(), lc.claim(read(pending()), A, NOW, user="u"))
    assert "claimedByUser" not in lc.release(read(body), AGENT_A, 1, NOW).status


def test_initialise_writes_the_counters_even_when_the_defaults_are_missing() -> None:
    # No status at all (an API server that does not apply the CRD's status defaults).
    s = lc.initialise(make_order(status={}), T_INIT).status
    assert (s["attempt"], s["retryCount"]) == (0, 0)
    r = lc.initialise(make_order(status={}), T_INIT, "document 1: kind Pod").status
    assert (r["phase"], r["attempt"], r["retryCount"]) == ("Failed", 0, 0)


def test_a_claim_without_any_time_counts_from_the_order_creation() -> None:
    odd = read(with_status(claimed({"claimTimeoutSeconds": 60}), claimedAt=None, renewedAt=None))
    assert lc.claim_deadline(odd) == CREATED + seconds(60)


def test_an_expiry_keeps_its_reason_in_the_history() -> None:
    write = lc.expire(read(claimed()), NOW + seconds(3600))
    assert write.status["history"][-1]["message"] == write.message
    assert write.status["lastError"] == write.message


# --- the conditions backstop, as mutation testing asked for -------------------------------------


def conditions_of(body: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """`body` with some fields of its conditions changed: {type: {field: value}}."""
    status = copy.deepcopy(body["status"])
    for c in status["conditions"]:
        c.update(changes.get(c["type"], {}))
    return {**body, "status": status}


def test_conditions_are_true_only_when_every_one_says_the_phase() -> None:
    assert lc.conditions_true(make_order(status={}))  # no phase yet: nothing to say
    body = claimed()
    assert lc.conditions_true(read(body))
    assert not lc.conditions_true(read(conditions_of(body, Reconciling={"status": "False"})))
    assert not lc.conditions_true(read(conditions_of(body, Succeeded={"status": "True"})))
    assert not lc.conditions_true(read(conditions_of(body, Stalled={"observedGeneration": 0})))
    done = failed()
    assert lc.conditions_true(read(done))
    assert not lc.conditions_true(read(conditions_of(done, Stalled={"status": "False"})))
    # The REASON column (status.reason) must say what the Succeeded condition says.
    assert not lc.conditions_true(read(with_status(body, reason="Pending")))


@pytest.mark.parametrize(
    ("fields", "said"),
    [
        ({"phase": "Claimed"}, f"claimed by agent {AGENT_A} (attempt 1)"),
        (
            {"phase": "RetryPending", "retryCount": 1, "lastError": "boom", "nextRetryAfter": format_time(NOW)},
            f"attempt 1 failed: boom; retry 1 after {format_time(NOW)}",
        ),
        ({"phase": "RetryPending", "retryCount": 1}, "attempt 1 failed: no reason given; retry 1"),
        ({"phase": "Completed"}, f"completed by agent {AGENT_A} in attempt 1"),
        ({"phase": "Completed", "claimedBy": None}, "completed"),
        ({"phase": "Failed", "lastError": "disk full", "result": "r"}, "failed: disk full"),
        ({"phase": "Failed", "result": "bad input"}, "failed: bad input"),
        ({"phase": "Failed"}, "failed: no reason given"),
        ({"phase": "Pending", "claimedBy": None, "claimedAt": None}, "waiting for an agent"),
    ],
)
def test_what_the_backstop_says_for_a_phase_a_minimal_agent_wrote(fields: dict[str, Any], said: str) -> None:
    body = minimal_agent(with_status(claimed(), observedGeneration=0), **fields)
    write = lc.sync_conditions(read(body), NOW + SECOND)
    assert write.transition == "conditions"
    assert write.message == said
    assert {c["message"] for c in write.status["conditions"]} == {said}


def test_the_backstop_keeps_what_did_not_change_and_stamps_a_missing_update_time() -> None:
    # Claimed conditions since T_INIT; a minimal agent writes Completed and no updatedAt.
    body = minimal_agent(claimed(), phase="Completed", updatedAt=None)
    after = lc.sync_conditions(read(body), NOW + SECOND).status
    moved = {c["type"]: c["lastTransitionTime"] for c in after["conditions"]}
    assert moved == {
        "Succeeded": format_time(NOW + SECOND),
        "Reconciling": format_time(NOW + SECOND),
        "Stalled": format_time(T_INIT),  # False before and after: it did not transition
    }
    assert after["updatedAt"] == format_time(NOW + SECOND)
    # An update time the agent wrote is its own.
    stamped = minimal_agent(claimed(), phase="Completed", updatedAt=format_time(NOW))
    assert lc.sync_conditions(read(stamped), NOW + SECOND).status["updatedAt"] == format_time(NOW)


def test_the_backstop_refuses_when_there_is_nothing_to_write() -> None:
    with pytest.raises(TransitionError, match=r"^team-a/wo-1: conditions already match phase Claimed$"):
        lc.sync_conditions(read(claimed()), NOW)


def test_an_agent_clock_ahead_by_exactly_the_tolerance_is_believed() -> None:
    assert lc.agent_time(NOW + lc.CLOCK_TOLERANCE, NOW) == NOW + lc.CLOCK_TOLERANCE
    assert lc.agent_time(NOW + lc.CLOCK_TOLERANCE + MICROSECOND, NOW) == NOW
    assert lc.agent_time(None, NOW) is None
    assert lc.agent_time(NOW + seconds(3600), None) == NOW + seconds(3600)


# --- schedulability marks (issue 15) ------------------------------------------------------------


def test_an_unschedulable_mark_is_one_condition_and_nothing_else() -> None:
    body = pending()
    write = lc.scheduling(read(body), NOW, ("NoMatchingAgent", "no live agent takes work type build"))
    assert write.transition == "scheduling"
    assert write.message == "no live agent takes work type build"
    marked = store(body, write)
    mark = conditions(marked["status"])["Schedulable"]
    assert mark == {
        "type": "Schedulable",
        "status": "False",
        "reason": "NoMatchingAgent",
        "message": "no live agent takes work type build",
        "lastTransitionTime": format_time(NOW),
        "observedGeneration": 1,
    }
    # Everything else as it was: still Pending, still claimable, the other conditions untouched.
    assert {k: v for k, v in marked["status"].items() if k != "conditions"} == {
        k: v for k, v in body["status"].items() if k != "conditions"
    }
    assert [c for c in marked["status"]["conditions"] if c["type"] != "Schedulable"] == body["status"]["conditions"]
    # Marked again (a new message): the transition time is the first one's.
    again = store(marked, lc.scheduling(read(marked), NOW + SECOND, ("NoMatchingAgent", "x" * (MESSAGE_LIMIT + 5))))
    mark = conditions(again["status"])["Schedulable"]
    assert mark["lastTransitionTime"] == format_time(NOW)
    assert mark["message"] == "x" * MESSAGE_LIMIT


def test_clearing_the_mark_removes_the_condition_and_only_a_marked_pending_order_can_be_cleared() -> None:
    body = pending()
    marked = store(body, lc.scheduling(read(body), NOW, ("NoMatchingAgent", "nobody")))
    write = lc.scheduling(read(marked), NOW + SECOND)
    assert write.message == "an agent can take it"
    assert store(marked, write)["status"]["conditions"] == body["status"]["conditions"]
    with pytest.raises(TransitionError, match="is not marked unschedulable"):
        lc.scheduling(read(body), NOW)
    with pytest.raises(TransitionError, match="has no conditions yet"):
        lc.scheduling(read(order_body()), NOW, ("NoMatchingAgent", "nobody"))
    with pytest.raises(TransitionError):
        lc.scheduling(read(claimed()), NOW, ("NoMatchingAgent", "nobody"))
