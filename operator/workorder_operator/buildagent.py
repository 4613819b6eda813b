"""The first executor (executor.py): `build` orders, run as Shipwright Builds.

It runs inside an `executor.ExecutorAgent` (an ordinary SDK agent with its own id, labels and
annotations, so targeting decides whether it or an external agent takes a given order); one
attempt is:

1. parse yamlContent (`build.parse_content`): content that cannot run fails the order for good
   (and is found at initialise already: `check`);
2. create the Builds in the order's namespace, owned by the order (a Build of that name that the
   order did not create fails the order for good: `BuildNameTaken`, nothing is changed on it);
3. wait for the Build to be registered ("False" fails for good with Shipwright's reason);
4. create the attempt's own BuildRun (`<order>-<attempt>`), or find it again after a restart
   (only if its owner uid and attempt label are this order's and attempt's);
5. wait for it to start (a Succeeded condition, which Shipwright copies from Tekton's TaskRun);
   one that has not started within `buildrun_start_timeout` is cancelled and the attempt fails
   with the retryable reason `BuildRunNotStarted` (without Tekton, or without the `default`
   ServiceAccount, Shipwright never writes a condition, and the claim would be renewed forever);
6. watch its Succeeded condition: True completes with the image digest, False fails (retryable
   per `build.RETRYABLE_REASONS`).

The claim is renewed throughout; if it is lost (expired and re-claimed, or the order deleted) the
BuildRun is cancelled (`cancel`). While the cluster has no Shipwright API, build orders are not
claimed (`waiting`): each gets a Warning event and a condition saying so, and they run once
Shipwright is installed.

Hub and spoke: the orders may live in one cluster (the hub: claims, status, events) and the
builds run in another (the spoke, this agent's own). The Builds and BuildRuns then carry the
order's uid label and the hub's name instead of an owner reference (`shipwright.Ownership`), and
`sweep` deletes those whose order the hub no longer has, as garbage collection does in one cluster.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from workorder_operator import build, metrics
from workorder_operator.agent import Claim
from workorder_operator.errors import Conflict, Failure, NotFound, Refused, WorkOrderError
from workorder_operator.executor import AgentConfig, Interrupted, Waiting
from workorder_operator.kube import ApiClient, post_event
from workorder_operator.model import WorkOrder
from workorder_operator.shipwright import (
    BUILDRUNS,
    BUILDS,
    ORDER_NAME_ANNOTATION,
    ORDER_UID_LABEL,
    NotOurs,
    Ownership,
    Shipwright,
)

log = logging.getLogger(__name__)

BUILD_TYPE = "build"
# A stable default id, so a restarted operator recognises the builds it was running.
DEFAULT_AGENT_ID = "5f0c6b52-5e0d-4c1e-9b1a-6275696c6430"
WAITING_REASON = "ShipwrightNotInstalled"
# Failure reasons (the first word of lastError) when a name the order needs is someone else's.
BUILD_NAME_TAKEN = "BuildNameTaken"
BUILDRUN_NAME_TAKEN = "BuildRunNameTaken"
WAITING_MESSAGE = (
    "the cluster has no Shipwright Build API (shipwright.io/v1beta1); the build agent takes this order "
    "once Shipwright is installed"
)


def add_options(group: argparse._ArgumentGroup) -> None:
    """The build agent's knobs, the same for the operator's built-in agent and workorder-build-agent."""
    group.add_argument("--build-concurrency", type=int, default=4, help="builds run at once (default 4)")
    group.add_argument(
        "--build-registration-timeout", type=float, default=300.0, help="seconds to wait for a Build to register"
    )
    group.add_argument(
        "--buildrun-start-timeout", type=float, default=300.0,
        help="seconds to wait for a BuildRun to start before cancelling it (retryable BuildRunNotStarted)",
    )  # fmt: skip


def build_agent_config(**overrides: Any) -> AgentConfig:
    """The build executor's agent: a stable id and the `shipwright` label unless told otherwise."""
    settings: dict[str, Any] = {"id": DEFAULT_AGENT_ID, "labels": ("shipwright",), **overrides}
    return AgentConfig(**settings)


class BuildExecutor:
    """`build` orders through Shipwright (the `Executor` protocol)."""

    work_type = BUILD_TYPE

    def __init__(
        self,
        api: ApiClient,
        field_manager: str,
        *,
        registration_timeout: float = 300.0,
        buildrun_start_timeout: float = 300.0,
        spoke: ApiClient | None = None,
        hub: str | None = None,
    ) -> None:
        """`api`: the cluster of the orders (claims, status, events). `spoke`: the cluster the
        builds run in when it is another one; `hub` then names the orders' cluster on its objects."""
        if (spoke is None) != (hub is None):
            raise ValueError("a spoke cluster needs the hub's name, and only a spoke does")
        self.shipwright = Shipwright(spoke or api, field_manager, Ownership(hub))
        self.hub = hub
        # Without a running Shipwright controller nothing registers a Build: do not hold a claim forever.
        self.registration_timeout = registration_timeout
        # Nor for a BuildRun nothing starts (no Tekton, no ServiceAccount, a stuck Shipwright).
        self.buildrun_start_timeout = buildrun_start_timeout
        # Where refusals are told (the operator points this at its engine's rate-limited events).
        self.post: Callable[[WorkOrder, str, str, str], None] = partial(post_event, api)

    def check(self, order: WorkOrder) -> str | None:
        try:
            build.parse_content(order.spec.yaml_content, order.namespace)
        except build.ContentError as exc:
            return str(exc)
        return None

    def waiting(self) -> Waiting | None:
        return None if self.shipwright.installed() else Waiting(WAITING_REASON, WAITING_MESSAGE)

    def run(self, claim: Claim, stopped: Callable[[], bool]) -> str:
        try:
            result = self._attempt(claim, stopped)
        except Failure as exc:
            metrics.BUILD_OUTCOMES.labels("retryable-failure" if exc.retryable else "failure").inc()
            raise
        metrics.BUILD_OUTCOMES.labels("success").inc()
        return result

    def cancel(self, claim: Claim) -> None:
        name = build.buildrun_name(claim.order.name, claim.attempt)
        log.warning("%s: claim lost; cancelling BuildRun %s", claim.order.key, name, extra=claim.order.logref)
        self.shipwright.cancel_buildrun(claim.order, claim.attempt, name)
        metrics.BUILD_OUTCOMES.labels("claim-lost").inc()

    def sweep(self, live_uids: Callable[[str], set[str]], namespaces: Sequence[str] = ()) -> int:
        """In a spoke: delete the Builds and BuildRuns (and through them Shipwright's TaskRuns) of
        orders the hub no longer has; how many. `live_uids(namespace)`: the uids of the hub's
        orders there; when it fails, nothing in that namespace is deleted. The spoke's objects are
        listed before the hub's orders, and an agent creates objects only for an order it has
        claimed, so an object made meanwhile is never taken for an orphan."""
        marked = [
            (plural, obj)
            for plural in (BUILDRUNS, BUILDS)
            for namespace in namespaces or (None,)
            for obj in self.shipwright.marked(plural, namespace)
        ]
        live: dict[str, set[str] | None] = {}
        deleted = 0
        for plural, obj in marked:
            meta = obj["metadata"]
            namespace = meta["namespace"]
            if namespace not in live:
                try:
                    live[namespace] = live_uids(namespace)
                except WorkOrderError as exc:
                    log.warning("cannot list the hub's orders in namespace %s (%s); keeping its builds", namespace, exc)
                    live[namespace] = None
            uids = live[namespace]
            if uids is None or meta["labels"][ORDER_UID_LABEL] in uids:
                continue
            if self.shipwright.delete(plural, obj):
                deleted += 1
                log.info("%s/%s: deleted %s %s: its order (uid %s) is gone from the hub", namespace,
                         meta["annotations"].get(ORDER_NAME_ANNOTATION), plural[:-1], meta["name"],
                         meta["labels"][ORDER_UID_LABEL])  # fmt: skip
        return deleted

    # --- one attempt ----------------------------------------------------------------------------

    def _attempt(self, claim: Claim, stopped: Callable[[], bool]) -> str:
        order = claim.order
        try:
            plan = build.parse_content(order.spec.yaml_content, order.namespace)
        except build.ContentError as exc:
            raise self._refused(order, str(exc)) from exc
        if self.hub is not None:
            self._check_opted_in(order.namespace, self.hub)
        for doc in plan.builds:
            try:
                self.shipwright.apply_build(order, doc)
            except NotOurs as exc:
                raise self._refused(order, f"{BUILD_NAME_TAKEN}: {exc}") from None
            except NotFound as exc:
                if exc.details.get("kind") == "namespaces":
                    # A spoke runs builds in the namespace of the order's name: it may not have one.
                    raise Failure(
                        f"namespace {order.namespace!r} does not exist in the cluster the builds run in", retryable=True
                    ) from None
                # The Build resource itself is not served (yet): Shipwright's CRDs were just
                # (re)installed or removed. Discovery said it was there, so try again later.
                raise Failure(f"the Build API is not served yet: {exc}", retryable=True) from None
            except (Refused, Conflict) as exc:
                # Refused for what it is (invalid for the Build schema, forbidden...): no retry helps.
                # (Transient errors pass: the API server is busy or away, a retryable failure.)
                raise self._refused(
                    order, f"Build {doc['metadata']['name']!r} refused by the API server: {exc}"
                ) from None
        self._wait_registered(claim, plan.run, stopped)
        name = build.buildrun_name(order.name, claim.attempt)
        try:
            self.shipwright.ensure_buildrun(order, claim.attempt, name, plan.run)
        except NotOurs as exc:
            # A leftover of a deleted order of the same name, or planted: the next attempt has another name.
            raise Failure(f"{BUILDRUN_NAME_TAKEN}: {exc}", retryable=True) from None
        log.info(
            "%s: attempt %d runs BuildRun %s (Build %s)", order.key, claim.attempt, name, plan.run, extra=order.logref
        )
        self._wait_started(claim, name, stopped)
        finished = self.shipwright.wait_for(
            BUILDRUNS, order.namespace, name, lambda br: build.buildrun_outcome(br).finished,
            stopped,
        )  # fmt: skip
        if stopped():
            raise Interrupted()
        if finished is None:
            raise Failure(f"BuildRun {name} was deleted before it finished", retryable=True)
        outcome = build.buildrun_outcome(finished)
        if outcome.succeeded:
            return outcome.result
        raise Failure(f"BuildRun {name}: {outcome.error}", retryable=outcome.retryable)

    def _check_opted_in(self, namespace: str, hub: str) -> None:
        """A spoke builds only in namespaces its admin opened to this hub (`build.HUB_OPT_IN_LABEL`).
        Retryable: labelling the namespace is the spoke admin's to do, and maxRetries bounds the wait."""
        try:
            labels = self.shipwright.namespace_labels(namespace)
        except Refused as exc:
            raise Failure(
                f"the build agent may not read namespace {namespace!r} of the cluster the builds run in "
                f"(get namespaces, deploy/agent/rbac.yaml): {exc}",
                retryable=True,
            ) from None
        if labels is None:
            raise Failure(f"namespace {namespace!r} does not exist in the cluster the builds run in", retryable=True)
        if not build.opted_in(labels, hub):
            raise Failure(build.not_opted_in(namespace, hub), retryable=True)

    def _wait_registered(self, claim: Claim, build_name: str, stopped: Callable[[], bool]) -> None:
        namespace = claim.order.namespace
        if self.shipwright.get(BUILDS, namespace, build_name) is None:
            raise Failure(f"Build {build_name!r} not found in namespace {namespace!r}", retryable=False)
        deadline = time.monotonic() + self.registration_timeout
        registered = self.shipwright.wait_for(
            BUILDS, namespace, build_name, lambda b: build.registration(b)[0] is not None,
            lambda: stopped() or time.monotonic() > deadline,
        )  # fmt: skip
        if registered is None:
            if stopped():
                raise Interrupted()
            if time.monotonic() > deadline:
                raise Failure(
                    f"Build {build_name!r} not registered within {self.registration_timeout:g}s: "
                    "is the Shipwright controller running?",
                    retryable=True,
                )
            raise Failure(f"Build {build_name!r} was deleted before it was registered", retryable=False)
        ok, why = build.registration(registered)
        if not ok:
            raise self._refused(claim.order, f"Build {build_name!r} is not valid: {why}")

    def _refused(self, order: WorkOrder, why: str) -> Failure:
        """A build this agent will not run, whatever the retries: a final failure, and a `Reject`
        event saying why (the Fail event that follows says only that the attempt failed)."""
        self.post(order, "Warning", "Reject", f"build refused: {why}")
        return Failure(why, retryable=False)

    def _wait_started(self, claim: Claim, name: str, stopped: Callable[[], bool]) -> None:
        # Counted from this process's first look, so a restarted operator gives a resumed BuildRun
        # the whole window again: at worst one more window, never an endless claim.
        namespace, timeout = claim.order.namespace, self.buildrun_start_timeout
        deadline = time.monotonic() + timeout
        started = self.shipwright.wait_for(
            BUILDRUNS, namespace, name, build.buildrun_started,
            lambda: stopped() or time.monotonic() > deadline,
        )  # fmt: skip
        if started is not None or stopped():
            return  # the caller's next wait sees the interruption (or a deletion) at once
        if time.monotonic() > deadline:
            # Cancelled, so it cannot start late beside the next attempt's BuildRun.
            self.shipwright.cancel_buildrun(claim.order, claim.attempt, name)
            raise Failure(
                f"BuildRun {name}: {build.NOT_STARTED_REASON}: not started within {timeout:g}s (no Succeeded "
                "condition): is Tekton running, and does the namespace have the `default` ServiceAccount?",
                retryable=True,
            )
