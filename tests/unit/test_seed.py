"""The seed view (SPEC.md): the seed system's 15-field record, valid against its JSON schema."""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator, FormatChecker

from tests.unit.orders import AGENT_A, NOW, ORDER_UID, YAML, make_order, order_body, read, store
from workorder_operator import lifecycle as lc
from workorder_operator.model import WorkOrder
from workorder_operator.seed import seed_view
from workorder_operator.targeting import AgentIdentity

SCHEMA = json.loads((Path(__file__).parent.parent / "data" / "workorder.schema.json").read_text())

SEED_FIELDS = {
    "id",
    "created_at",
    "status",
    "backoff_seconds",
    "claim_timeout_seconds",
    "claimed_at",
    "claimed_by",
    "last_error",
    "last_error_at",
    "max_retries",
    "next_retry_after",
    "retry_count",
    "updated_at",
    "work_type",
    "yaml_content",
}

RFC3339_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z$")

# jsonschema checks `date-time` only with an optional extra installed; check it here regardless.
FORMATS = FormatChecker()


@FORMATS.checks("date-time", raises=ValueError)
def _date_time(value: object) -> bool:
    if not isinstance(value, str):
        return True
    if not RFC3339_UTC.match(value):
        return False
    dt.datetime.fromisoformat(value)
    return True


VALIDATOR = Draft202012Validator(SCHEMA, format_checker=FORMATS)


def pending() -> WorkOrder:
    body = order_body()
    return read(store(body, lc.initialise(read(body), NOW)))


def claimed() -> WorkOrder:
    body = order_body()
    return read(store(body, lc.claim(read(body), AgentIdentity(AGENT_A), NOW)))


def retry_pending() -> WorkOrder:
    body = order_body()
    body = store(body, lc.claim(read(body), AgentIdentity(AGENT_A), NOW))
    return read(store(body, lc.fail(read(body), AGENT_A, 1, "exit code 2", NOW)))


def errors(record: dict[str, Any]) -> list[str]:
    return [e.message for e in VALIDATOR.iter_errors(record)]


def test_the_copied_schema_is_the_seed_schema() -> None:
    assert SCHEMA["title"] == "WorkOrder"
    assert set(SCHEMA["properties"]) == SEED_FIELDS
    Draft202012Validator.check_schema(SCHEMA)


@pytest.mark.parametrize("make", [pending, claimed, retry_pending])
def test_active_orders_validate_against_the_seed_schema(make: Any) -> None:
    record = seed_view(make())
    assert errors(record) == []
    assert set(record) == SEED_FIELDS


def test_the_validator_does_check_formats() -> None:
    record = seed_view(claimed())
    assert errors({**record, "claimed_by": "agent-7"})  # uuid
    assert errors({**record, "claimed_at": "yesterday"})  # date-time
    assert errors({**record, "retry_count": "0"})  # type


def test_pending_record() -> None:
    assert seed_view(pending()) == {
        "id": ORDER_UID,
        "created_at": "2024-05-01T12:00:00.000000Z",
        "status": "PENDING",
        "backoff_seconds": 60,
        "claim_timeout_seconds": 3600,
        "claimed_at": None,
        "claimed_by": None,
        "last_error": None,
        "last_error_at": None,
        "max_retries": 3,
        "next_retry_after": None,
        "retry_count": 0,
        "updated_at": "2024-05-01T12:30:00.250000Z",
        "work_type": "build",
        "yaml_content": YAML,
    }


def test_claimed_record() -> None:
    record = seed_view(claimed())
    assert record["status"] == "CLAIMED"
    assert record["claimed_by"] == AGENT_A
    assert record["claimed_at"] == "2024-05-01T12:30:00.250000Z"


def test_retry_pending_record() -> None:
    record = seed_view(retry_pending())
    assert record["status"] == "RETRY_PENDING"
    assert record["retry_count"] == 1
    assert record["next_retry_after"] == "2024-05-01T12:32:00.250000Z"
    assert record["last_error"] == "exit code 2"
    assert record["last_error_at"] == "2024-05-01T12:30:00.250000Z"
    assert record["claimed_by"] is None


@pytest.mark.parametrize(
    ("phase", "seed_status"),
    [
        ("Pending", "PENDING"),
        ("Claimed", "CLAIMED"),
        ("RetryPending", "RETRY_PENDING"),
        ("Completed", "COMPLETED"),
        ("Failed", "FAILED"),
    ],
)
def test_status_names_map_to_the_seeds(phase: str, seed_status: str) -> None:
    assert seed_view(make_order(status={"phase": phase, "attempt": 1, "retryCount": 0}))["status"] == seed_status


def test_an_order_without_status_is_pending_and_updated_when_created() -> None:
    record = seed_view(make_order(status={}))
    assert record["status"] == "PENDING"
    assert record["updated_at"] == record["created_at"] == "2024-05-01T12:00:00.000000Z"
    assert errors(record) == []


def test_spec_fields_come_from_the_spec() -> None:
    order = make_order({"workType": "backup", "maxRetries": 0, "backoffSeconds": 5, "claimTimeoutSeconds": 30})
    record = seed_view(order)
    assert (record["work_type"], record["max_retries"], record["backoff_seconds"], record["claim_timeout_seconds"]) == (
        "backup",
        0,
        5,
        30,
    )


def test_timestamps_in_other_offsets_come_out_in_utc() -> None:
    status = {
        "phase": "Claimed",
        "attempt": 1,
        "retryCount": 0,
        "claimedBy": AGENT_A,
        "claimedAt": "2024-05-01T14:30:00.5+02:00",
        "updatedAt": "2024-05-01T14:30:00.5+02:00",
    }
    record = seed_view(make_order(status=status))
    assert record["claimed_at"] == record["updated_at"] == "2024-05-01T12:30:00.500000Z"
    assert errors(record) == []
