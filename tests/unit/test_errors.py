"""The one error tree and the one mapping of API answers onto it (`kube.api_error`)."""

from __future__ import annotations

import json

import pytest
import urllib3
from kubernetes.client.exceptions import ApiException

from workorder_operator import errors
from workorder_operator.agent import ClaimLost, Failure
from workorder_operator.build import ContentError
from workorder_operator.cli import CliError
from workorder_operator.kube import api_error
from workorder_operator.lifecycle import TransitionError
from workorder_operator.shipwright import NotOurs


def answer(status: int, body: dict[str, object] | None = None) -> ApiException:
    exc = ApiException(status=status, reason="Reason")
    exc.body = json.dumps(body or {"message": f"answer {status}"})
    return exc


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (answer(404), errors.NotFound),
        (answer(409), errors.Conflict),
        (answer(410), errors.Transient),
        (answer(429), errors.Transient),
        (answer(500), errors.Transient),
        (answer(503), errors.Transient),
        (answer(504), errors.Transient),
        # A schema error repeats forever: not worth a retry.
        (answer(500, {"message": "failed to create typed patch object"}), errors.Refused),
        (answer(400), errors.Refused),
        (answer(401), errors.Refused),
        (answer(403), errors.Refused),
        (answer(422, {"message": "invalid", "details": {"causes": [{"field": "spec.x"}]}}), errors.Refused),
        # Without JSON Patch tests a 422 is always a refusal, whatever its causes.
        (answer(422, {"message": "the server rejected our request"}), errors.Refused),
        (ApiException(status=0), errors.Transient),
        (urllib3.exceptions.MaxRetryError(None, "/"), errors.Transient),  # type: ignore[arg-type]
        (ConnectionRefusedError(), errors.Transient),
        (TimeoutError(), errors.Transient),
    ],
)
def test_every_api_answer_maps_to_one_kind(exc: BaseException, kind: type[errors.WorkOrderError]) -> None:
    mapped = api_error(exc)
    assert type(mapped) is kind, (exc, mapped)


def test_a_failed_json_patch_test_is_a_conflict_and_a_validation_error_is_not() -> None:
    failed_test = answer(422, {"message": "the server rejected our request", "details": {}})
    invalid = answer(422, {"message": "bad", "details": {"causes": [{"field": "status.attempt"}]}})
    assert type(api_error(failed_test, json_patch_test=True)) is errors.Conflict
    assert type(api_error(invalid, json_patch_test=True)) is errors.Refused


def test_the_mapped_error_keeps_the_answer() -> None:
    mapped = api_error(answer(403, {"message": "no", "reason": "Forbidden", "details": {"kind": "workorders"}}))
    assert mapped is not None
    assert (str(mapped), mapped.status, mapped.reason, mapped.details) == (
        "no",
        403,
        "Forbidden",
        {"kind": "workorders"},
    )
    assert "Forbidden" in mapped.body


def test_what_is_no_api_answer_is_not_mapped() -> None:
    assert api_error(ValueError("a bug")) is None
    already = errors.Conflict("lost")
    assert api_error(already) is already


def test_every_exception_of_the_package_is_in_the_tree() -> None:
    assert issubclass(TransitionError, errors.Conflict)
    assert issubclass(ClaimLost, errors.Conflict)
    assert issubclass(ContentError, errors.Refused) and issubclass(ContentError, ValueError)
    assert issubclass(NotOurs, errors.Refused)
    assert issubclass(Failure, errors.WorkOrderError)
    assert issubclass(CliError, errors.WorkOrderError)
    for kind in (errors.Conflict, errors.NotFound, errors.Transient, errors.Refused):
        assert issubclass(kind, errors.WorkOrderError)
