"""`lifecycle.story`: what the operator tells (as Events) about the change between two versions of
an order it saw, whoever made it: our agents (with history), a minimal agent (only the
transition's fields), the operator, an admin. Each expected message is written out in full: they
are what `kubectl events --for wo/NAME` shows a person."""

from __future__ import annotations

import datetime as dt
from typing import Any

from tests.unit.orders import AGENT_A, AGENT_B, CREATED, NOW, order_body, read, store
from workorder_operator import lifecycle as lc
from workorder_operator.model import format_time
from workorder_operator.targeting import AgentIdentity

A = AgentIdentity(AGENT_A)
B = AgentIdentity(AGENT_B)
LATER = NOW + dt.timedelta(seconds=5)


def told(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, str, str]]:
    return [(n.type, n.reason, n.message) for n in lc.story(read(old), read(new))]


def pending(spec: dict[str, Any] | None = None) -> dict[str, Any]:
    body = order_body(spec)
    return store(body, lc.initialise(read(body), CREATED))


def claimed(body: dict[str, Any], agent: AgentIdentity = A, user: str | None = None) -> dict[str, Any]:
    return store(body, lc.claim(read(body), agent, NOW, user))


def attempt(body: dict[str, Any]) -> int:
    return int(body["status"]["attempt"])


def failed(body: dict[str, Any], error: str = "boom", *, retryable: bool = True) -> dict[str, Any]:
    return store(body, lc.fail(read(body), AGENT_A, attempt(body), error, LATER, retryable=retryable))


def minimal(body: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """What a minimal agent writes: the transition's own fields, no history, no conditions."""
    status = {k: v for k, v in {**body["status"], **fields}.items() if v is not None}
    return {**body, "status": status}


# --- nothing to tell ----------------------------------------------------------------------------


def test_a_renewal_or_a_condition_rewrite_is_not_news() -> None:
    c = claimed(pending())
    renewed = store(c, lc.renew(read(c), AGENT_A, 1, LATER))
    assert told(c, renewed) == []
    p = pending()
    assert told(p, store(p, lc.waiting(read(p), "ShipwrightNotInstalled", "no Shipwright", LATER))) == []


# --- one transition at a time -------------------------------------------------------------------


def test_a_claim_names_the_agent_and_the_user_it_runs_as() -> None:
    p = pending()
    assert told(p, claimed(p, user="system:serviceaccount:ci:builder")) == [
        ("Normal", "Claim", f"attempt 1 claimed by agent {AGENT_A} (user system:serviceaccount:ci:builder)")
    ]
    assert told(p, claimed(p, B)) == [("Normal", "Claim", f"attempt 1 claimed by agent {AGENT_B}")]


def test_a_completion_names_the_agent_and_the_result_if_any() -> None:
    c = claimed(pending())
    done = store(c, lc.complete(read(c), AGENT_A, 1, "sha256:abc", LATER))
    assert told(c, done) == [("Normal", "Complete", f"attempt 1 completed by agent {AGENT_A}: result sha256:abc")]
    quiet = store(c, lc.complete(read(c), AGENT_A, 1, "", LATER))
    assert told(c, quiet) == [("Normal", "Complete", f"attempt 1 completed by agent {AGENT_A}")]


def test_a_retryable_failure_says_which_retry_comes_and_when() -> None:
    c = claimed(pending())
    due = format_time(LATER + dt.timedelta(seconds=120))
    assert told(c, failed(c)) == [
        ("Warning", "Fail", f"attempt 1 of agent {AGENT_A} failed (retryable: retry 1 of 3 after {due}): boom")
    ]


def test_a_final_failure_says_why_it_is_final() -> None:
    c = claimed(pending())
    assert told(c, failed(c, retryable=False)) == [
        ("Warning", "Fail", f"attempt 1 of agent {AGENT_A} failed (final: not retryable): boom")
    ]
    last = claimed(pending({"maxRetries": 0}))
    assert told(last, failed(last)) == [
        ("Warning", "Fail", f"attempt 1 of agent {AGENT_A} failed (final: retries used up): boom")
    ]


def test_an_expiry_tells_the_operator_s_reason() -> None:
    c = claimed(pending({"claimTimeoutSeconds": 60}))
    expired = store(c, lc.expire(read(c), NOW + dt.timedelta(seconds=61)))
    assert told(c, expired) == [
        ("Warning", "Expire", f"claim of agent {AGENT_A} (attempt 1) expired: no renewal within 60s")
    ]


def test_a_release_names_the_agent_and_its_reason_if_any() -> None:
    c = claimed(pending())
    assert told(c, store(c, lc.release(read(c), AGENT_A, 1, LATER, "shutting down"))) == [
        ("Normal", "Release", f"attempt 1 released by agent {AGENT_A}: shutting down")
    ]
    assert told(c, store(c, lc.release(read(c), AGENT_A, 1, LATER))) == [
        ("Normal", "Release", f"attempt 1 released by agent {AGENT_A}")
    ]


def test_a_due_retry_a_requeue_and_a_rejection_are_told_as_such() -> None:
    waiting = failed(claimed(pending()))
    again = store(waiting, lc.due(read(waiting), LATER + dt.timedelta(seconds=121)))
    assert told(waiting, again) == [("Normal", "Due", "retry 1 of 3 due: waiting for an agent")]

    final = failed(claimed(pending()), retryable=False)
    requeued = store(final, lc.requeue(read(final), LATER))
    assert told(final, requeued) == [("Normal", "Requeue", "requeued after failure: Pending, retries reset")]
    # From RetryPending too: the reset retries tell a requeue from a due retry.
    requeued = store(waiting, lc.requeue(read(waiting), LATER))
    assert told(waiting, requeued) == [("Normal", "Requeue", "requeued after failure: Pending, retries reset")]

    new = order_body()
    rejected = store(new, lc.initialise(read(new), CREATED, rejection="yamlContent: no Build"))
    assert told(new, rejected) == [("Warning", "Reject", "rejected: yamlContent: no Build")]


# --- several transitions between two versions we saw -------------------------------------------


def test_a_fast_agent_s_claim_and_completion_are_both_told_in_order() -> None:
    p = pending()
    c = claimed(p, user="alice")
    done = store(c, lc.complete(read(c), AGENT_A, 1, "ok", LATER))
    # The claim's version was never seen; a completed order keeps its claimer's fields.
    assert told(p, done) == [
        ("Normal", "Claim", f"attempt 1 claimed by agent {AGENT_A} (user alice)"),
        ("Normal", "Complete", f"attempt 1 completed by agent {AGENT_A}: result ok"),
    ]


def test_an_expired_claim_is_named_from_history() -> None:
    c = claimed(pending({"claimTimeoutSeconds": 60}))
    expired = store(c, lc.expire(read(c), NOW + dt.timedelta(seconds=61)))
    again = claimed(expired, B)
    done = store(again, lc.complete(read(again), AGENT_B, 2, "", LATER + dt.timedelta(seconds=60)))
    # From before the first claim to the end of the second: attempt 1's claimer is in history only.
    assert [m for _, _, m in told(pending(), done)] == [
        f"attempt 1 claimed by agent {AGENT_A}",
        f"claim of agent {AGENT_A} (attempt 1) expired: no renewal within 60s",
        f"attempt 2 claimed by agent {AGENT_B}",
        f"attempt 2 completed by agent {AGENT_B}",
    ]


def test_an_earlier_attempt_s_failure_is_told_before_the_next_claim() -> None:
    c = claimed(pending({"backoffSeconds": 1}))
    retry = failed(c)
    back = store(retry, lc.due(read(retry), LATER + dt.timedelta(seconds=3)))
    second = claimed(back, B)
    assert told(c, second) == [
        ("Warning", "Fail", f"attempt 1 of agent {AGENT_A} failed (retried): boom"),
        ("Normal", "Claim", f"attempt 2 claimed by agent {AGENT_B}"),
    ]


def test_at_most_the_last_three_claims_are_told_when_many_were_missed() -> None:
    p = minimal(pending(), attempt=1)
    later = minimal(p, phase="Claimed", attempt=6, claimedBy=AGENT_B)
    assert told(p, later) == [
        ("Normal", "Claim", "attempt 4 claimed by an agent"),
        ("Normal", "Claim", "attempt 5 claimed by an agent"),
        ("Normal", "Claim", f"attempt 6 claimed by agent {AGENT_B}"),
    ]
    near = minimal(p, phase="Claimed", attempt=3, claimedBy=AGENT_B)
    assert [m for _, _, m in told(p, near)] == [
        "attempt 2 claimed by an agent",
        f"attempt 3 claimed by agent {AGENT_B}",
    ]


# --- a minimal agent: no history, the phase says how the attempt ended -------------------------


def test_a_minimal_agent_s_outcomes_are_read_from_the_phase_it_wrote() -> None:
    p = pending()
    c = minimal(p, phase="Claimed", attempt=1, claimedBy=AGENT_B)
    assert told(p, c) == [("Normal", "Claim", f"attempt 1 claimed by agent {AGENT_B}")]
    assert told(c, minimal(c, phase="Completed", result="done")) == [
        ("Normal", "Complete", f"attempt 1 completed by agent {AGENT_B}: result done")
    ]
    assert told(c, minimal(c, phase="Pending", claimedBy=None)) == [
        ("Normal", "Release", f"attempt 1 released by agent {AGENT_B}")
    ]
    retry = minimal(c, phase="RetryPending", claimedBy=None, retryCount=1, lastError="disk full")
    assert told(c, retry) == [
        ("Warning", "Fail", f"attempt 1 of agent {AGENT_B} failed (retryable: retry 1 of 3): disk full")
    ]
    final = minimal(c, phase="Failed", claimedBy=None, retryCount=3)
    assert told(c, final) == [
        ("Warning", "Fail", f"attempt 1 of agent {AGENT_B} failed (final: retries used up): no reason given")
    ]


def test_a_minimal_agent_s_whole_attempt_between_two_versions_names_it_from_the_new_status() -> None:
    p = pending()
    done = minimal(p, phase="Completed", attempt=1, claimedBy=AGENT_B)
    assert told(p, done) == [
        ("Normal", "Claim", f"attempt 1 claimed by agent {AGENT_B}"),
        ("Normal", "Complete", f"attempt 1 completed by agent {AGENT_B}"),
    ]
    gone = minimal(p, phase="Completed", attempt=1)
    assert told(p, gone) == [
        ("Normal", "Claim", "attempt 1 claimed by an agent"),
        ("Normal", "Complete", "attempt 1 completed by agent ?"),
    ]


def test_an_attempt_retried_and_the_next_failed_for_good_are_told_apart() -> None:
    c = claimed(pending({"backoffSeconds": 1, "maxRetries": 1}))
    retry = failed(c)
    back = store(retry, lc.due(read(retry), LATER + dt.timedelta(seconds=3)))
    second = claimed(back)
    final = store(second, lc.fail(read(second), AGENT_A, 2, "again", LATER + dt.timedelta(seconds=4)))
    assert [m for _, _, m in told(c, final)] == [
        f"attempt 1 of agent {AGENT_A} failed (retried): boom",
        f"attempt 2 claimed by agent {AGENT_A}",
        f"attempt 2 of agent {AGENT_A} failed (final: retries used up): again",
    ]


def test_a_rejection_without_last_error_tells_the_result_or_that_none_was_given() -> None:
    p = minimal(order_body(), reason=None, observedGeneration=None)
    assert told(p, minimal(p, phase="Failed", result="bad content")) == [("Warning", "Reject", "rejected: bad content")]
    assert told(p, minimal(p, phase="Failed")) == [("Warning", "Reject", "rejected: no reason given")]


def test_a_phase_written_outside_the_lifecycle_is_not_told_as_a_transition() -> None:
    p = pending()
    # Completed without a claim (attempt unchanged): no agent took it, nothing ended, no rejection.
    assert told(p, minimal(p, phase="Completed")) == []
    done = minimal(p, phase="Completed", attempt=1, claimedBy=AGENT_B)
    assert told(done, minimal(done, phase="Pending")) == []
