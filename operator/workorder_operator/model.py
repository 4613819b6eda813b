"""The WorkOrder data model (SPEC.md), parsed from the API's JSON. Pure: no I/O.

The typed model covers every field of the CRD's schema (crds/workorder.yaml), spec and status;
tests/unit/test_schema.py proves they agree field for field. `Transition` names every status
write the lifecycle makes."""

from __future__ import annotations

import datetime as dt
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

GROUP = "workorder.dev"
VERSION = "v1alpha1"
PLURAL = "workorders"
KIND = "WorkOrder"
API_VERSION = f"{GROUP}/{VERSION}"


class Phase(StrEnum):
    PENDING = "Pending"
    CLAIMED = "Claimed"
    RETRY_PENDING = "RetryPending"
    COMPLETED = "Completed"
    FAILED = "Failed"

    @property
    def terminal(self) -> bool:
        return self in (Phase.COMPLETED, Phase.FAILED)


class Outcome(StrEnum):
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    EXPIRED = "Expired"
    RELEASED = "Released"


class Transition(StrEnum):
    """Every kind of status write (lifecycle.py), as events, logs and metrics name them."""

    INITIALISE = "initialise"
    REJECT = "reject"  # initialise of content the operator cannot run: Failed at once
    CLAIM = "claim"
    RENEW = "renew"
    COMPLETE = "complete"
    FAIL = "fail"
    RELEASE = "release"
    EXPIRE = "expire"
    DUE = "due"
    REQUEUE = "requeue"
    WAITING = "waiting"  # why nothing takes a Pending order yet (conditions only)
    CONDITIONS = "conditions"  # the operator's backstop: conditions that say what the phase says
    SCHEDULING = "scheduling"  # a Pending order marked (or no longer) unschedulable: no live agent takes it


class ConditionStatus(StrEnum):
    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def format_time(t: dt.datetime) -> str:
    """RFC 3339, UTC, microseconds: the one timestamp format of the status."""
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(value: str) -> dt.datetime:
    t = dt.datetime.fromisoformat(value)
    return t if t.tzinfo else t.replace(tzinfo=dt.UTC)


class _Camel(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore", frozen=True)


class Targeting(_Camel):
    agent_ids: list[str] = Field(default_factory=list)
    labels: list[str] = Field(default_factory=list)
    annotations: dict[str, str] = Field(default_factory=dict)


class Spec(_Camel):
    work_type: str
    yaml_content: str
    max_retries: int = 3
    backoff_seconds: int = 60
    max_backoff_seconds: int | None = None
    claim_timeout_seconds: int = 3600
    priority: int = 0
    targeting: Targeting | None = None
    ttl_seconds_after_finished: int | None = None


class HistoryEntry(_Camel):
    attempt: int
    outcome: Outcome
    agent: str | None = None
    claimed_at: dt.datetime | None = None
    finished_at: dt.datetime | None = None
    message: str | None = None


class Condition(_Camel):
    type: str
    status: ConditionStatus
    reason: str
    message: str
    last_transition_time: dt.datetime
    observed_generation: int | None = None


class Status(_Camel):
    phase: Phase | None = None
    claimed_by: str | None = None
    # Why the order is where it is (CamelCase, the REASON column), kept by every write.
    reason: str | None = None
    # The Kubernetes username that took the claim (the admission policy lets only it act on it).
    claimed_by_user: str | None = None
    claimed_at: dt.datetime | None = None
    renewed_at: dt.datetime | None = None
    attempt: int = 0
    retry_count: int = 0
    next_retry_after: dt.datetime | None = None
    last_error: str | None = None
    last_error_at: dt.datetime | None = None
    updated_at: dt.datetime | None = None
    completed_at: dt.datetime | None = None
    result: str | None = None
    # The generation the conditions were written for.
    observed_generation: int | None = None
    history: list[HistoryEntry] = Field(default_factory=list)
    conditions: list[Condition] = Field(default_factory=list)

    def condition(self, type_: str) -> Condition | None:
        return next((c for c in self.conditions if c.type == type_), None)


class WorkOrder(_Camel):
    """One order as read from the API. `raw_status` keeps the status exactly as stored: it is
    what compare-and-swap guards compare against and what transitions build on."""

    name: str
    namespace: str
    uid: str
    resource_version: str
    generation: int = 1
    created_at: dt.datetime
    spec: Spec
    status: Status
    raw_status: dict[str, Any] = Field(default_factory=dict)
    # Server-clock time of the latest status write by anyone but the operator (managedFields).
    status_written_at: dt.datetime | None = None

    @classmethod
    def from_body(cls, body: dict[str, Any], operator_manager: str | None = None) -> WorkOrder:
        meta = body["metadata"]
        raw_status = body.get("status") or {}
        return cls(
            name=meta["name"],
            namespace=meta.get("namespace", ""),
            uid=meta["uid"],
            resource_version=meta.get("resourceVersion", ""),
            generation=meta.get("generation", 1),
            created_at=parse_time(meta["creationTimestamp"]),
            spec=Spec.model_validate(body["spec"]),
            status=Status.model_validate(raw_status),
            raw_status=raw_status,
            status_written_at=_status_written_at(meta.get("managedFields") or [], operator_manager),
        )

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def logref(self) -> dict[str, Any]:
        """`extra=` for log lines about this order: a `workorder` field in JSON logs."""
        return {"workorder": {"namespace": self.namespace, "name": self.name}}


def order_body(
    name: str | None = None, *, generate_name: str | None = None, namespace: str | None = None, **spec: Any
) -> dict[str, Any]:
    """A new WorkOrder as the API takes it; `spec` in the API's camelCase names (`workType`,
    `yamlContent`, `maxRetries`, ...). The one body builder of the CLI, the tests and the bench."""
    metadata: dict[str, Any] = {"name": name} if name else {"generateName": generate_name or "workorder-"}
    if namespace:
        metadata["namespace"] = namespace
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": metadata, "spec": dict(spec)}


def _status_written_at(managed: list[dict[str, Any]], operator_manager: str | None) -> dt.datetime | None:
    times = [
        parse_time(m["time"])
        for m in managed
        if m.get("subresource") == "status" and m.get("time") and m.get("manager") != operator_manager
    ]
    return max(times, default=None)
