"""The seed system's view of a WorkOrder (SPEC.md): its 15-field record, snake_case. Pure."""

from __future__ import annotations

import datetime as dt
from typing import Any

from workorder_operator.model import Phase, WorkOrder, format_time

SEED_STATUS: dict[Phase, str] = {
    Phase.PENDING: "PENDING",
    Phase.CLAIMED: "CLAIMED",
    Phase.RETRY_PENDING: "RETRY_PENDING",
    Phase.COMPLETED: "COMPLETED",
    Phase.FAILED: "FAILED",
}


def _time(t: dt.datetime | None) -> str | None:
    return None if t is None else format_time(t)


def seed_view(order: WorkOrder) -> dict[str, Any]:
    """The order as the seed system's record: id is the uid, created_at the creation time, status
    the phase in upper snake case (an order without a phase yet is PENDING), updated_at falls back
    to created_at; timestamps are RFC 3339 UTC, absent optional fields are null."""
    spec, status = order.spec, order.status
    created_at = format_time(order.created_at)
    return {
        "id": order.uid,
        "created_at": created_at,
        "status": SEED_STATUS[status.phase or Phase.PENDING],
        "backoff_seconds": spec.backoff_seconds,
        "claim_timeout_seconds": spec.claim_timeout_seconds,
        "claimed_at": _time(status.claimed_at),
        "claimed_by": status.claimed_by,
        "last_error": status.last_error,
        "last_error_at": _time(status.last_error_at),
        "max_retries": spec.max_retries,
        "next_retry_after": _time(status.next_retry_after),
        "retry_count": status.retry_count,
        "updated_at": _time(status.updated_at) or created_at,
        "work_type": spec.work_type,
        "yaml_content": spec.yaml_content,
    }
