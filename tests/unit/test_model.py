"""The data model's reading of the API's JSON: timestamps, and defaults for what metadata may omit."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterator

import pytest

from tests.unit.orders import order_body
from workorder_operator.model import Status, WorkOrder, format_time, parse_time, utcnow
from workorder_operator.model import order_body as new_order


@pytest.fixture
def berlin_clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The machine's local time zone is not UTC (for the duration of the test)."""
    monkeypatch.setenv("TZ", "Europe/Berlin")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.mark.usefixtures("berlin_clock")
def test_status_timestamps_are_utc_whatever_the_machines_zone() -> None:
    noon_in_berlin = dt.datetime(2024, 5, 1, 14, 0, 0, 250000, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    assert format_time(noon_in_berlin) == "2024-05-01T12:00:00.250000Z"
    assert format_time(dt.datetime(2024, 5, 1, 12, 0, tzinfo=dt.UTC)) == "2024-05-01T12:00:00.000000Z"


def test_parsed_timestamps_are_aware_and_in_the_right_instant() -> None:
    assert parse_time("2024-05-01T12:00:00Z") == dt.datetime(2024, 5, 1, 12, tzinfo=dt.UTC)
    # An explicit offset is honoured, not overwritten.
    assert parse_time("2024-05-01T14:00:00+02:00") == dt.datetime(2024, 5, 1, 12, tzinfo=dt.UTC)
    # No offset at all (a hand-written status): read as UTC, never as a naive time.
    naive = parse_time("2024-05-01T12:00:00")
    assert naive.tzinfo == dt.UTC
    assert naive == dt.datetime(2024, 5, 1, 12, tzinfo=dt.UTC)
    # Round trip.
    t = dt.datetime(2024, 5, 1, 12, 30, 0, 250000, tzinfo=dt.UTC)
    assert parse_time(format_time(t)) == t


def test_metadata_the_api_may_omit_reads_with_defaults() -> None:
    body = order_body()
    for key in ("namespace", "resourceVersion", "generation"):
        del body["metadata"][key]
    order = WorkOrder.from_body(body)
    assert (order.namespace, order.resource_version, order.generation) == ("", "", 1)
    assert order.key == "/wo-1"


def test_now_is_aware_utc() -> None:
    assert utcnow().utcoffset() == dt.timedelta(0)


def test_a_new_order_body_is_what_the_api_takes() -> None:
    assert new_order("wo-1", namespace="team-a", workType="build", yamlContent="x: 1", maxRetries=0) == {
        "apiVersion": "workorder.dev/v1alpha1",
        "kind": "WorkOrder",
        "metadata": {"name": "wo-1", "namespace": "team-a"},
        "spec": {"workType": "build", "yamlContent": "x: 1", "maxRetries": 0},
    }
    # No name: the API server makes one (kubectl create's habit); no namespace: the client's own.
    assert new_order(workType="test")["metadata"] == {"generateName": "workorder-"}
    assert new_order(generate_name="nightly-", workType="test")["metadata"] == {"generateName": "nightly-"}


def condition(type_: str, status: str) -> dict[str, str]:
    return {"type": type_, "status": status, "reason": "R", "message": "", "lastTransitionTime": "2024-05-01T12:00:00Z"}


def test_a_condition_is_found_by_its_type() -> None:
    status = Status.model_validate({"conditions": [condition("Ready", "True"), condition("Succeeded", "Unknown")]})
    found = status.condition("Succeeded")
    assert found is not None and found.status == "Unknown"
    assert status.condition("Stalled") is None
