"""The one error tree. Pure: no I/O, no `kubernetes` import.

Callers act on four kinds, so there are four branches under one root:

    WorkOrderError            anything this package raises on purpose
    ├── Conflict              a compare-and-swap lost, or the order is no longer in a state that allows
    │   │                     the step: read again and decide again (never retry blindly)
    │   ├── TransitionError   (lifecycle) the guard failed on the order as read
    │   └── ClaimLost         (agent) this claim handle is no longer the order's claim
    ├── NotFound              the object does not exist (any more)
    ├── Transient             may go away by itself (unreachable, overloaded, restarting): retry later
    ├── Refused               the request is wrong for what it is (invalid, forbidden, not ours):
    │   │                     retrying the same request cannot help
    │   ├── ContentError      (build) yamlContent the build executor cannot run
    │   └── NotOurs           (shipwright) an object of that name belongs to someone else
    └── Failure               (agent) raised by a handler to fail its attempt

An API answer (HTTP status, connection error) is mapped to this tree in exactly one place:
`kube.api_error`. Everything above the adapter catches these classes, never `ApiException`.
"""

from __future__ import annotations

from typing import Any


class WorkOrderError(Exception):
    """The root. `status`, `reason`, `details` and `body` are the API's answer when there was one."""

    def __init__(
        self,
        message: str = "",
        *,
        status: int | None = None,
        reason: str = "",
        details: dict[str, Any] | None = None,
        body: str = "",
    ) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.details: dict[str, Any] = details or {}
        self.body = body


class Conflict(WorkOrderError):
    """A compare-and-swap lost: the stored object no longer matches what the write was based on."""


class NotFound(WorkOrderError):
    """The object does not exist (any more)."""


class Transient(WorkOrderError):
    """An error that may go away by itself: the API server is unreachable, overloaded or restarting.
    `status` is None when no answer came at all (a connection error, a timeout)."""


class Refused(WorkOrderError):
    """The request is refused for what it is (invalid, forbidden, unauthorised, not ours): the same
    request will be refused again."""


class Failure(WorkOrderError):
    """Raise from a `run` handler to fail the attempt; `retryable=False` makes the order Failed at once."""

    def __init__(self, error: str, *, retryable: bool = True) -> None:
        super().__init__(error)
        self.retryable = retryable
