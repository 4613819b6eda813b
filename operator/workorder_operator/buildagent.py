"""The operator's built-in agent for `build` orders: it runs the Shipwright Builds in yamlContent.

It is an ordinary SDK agent (its own id, labels and annotations, so targeting decides whether it or
an external agent takes a given order), whose handler does one attempt:

1. parse yamlContent (`build.parse_content`): content that cannot run fails the order for good;
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
BuildRun is cancelled. While the cluster has no Shipwright API, build orders are not claimed: each
gets a Warning event and a condition saying so, and they run once Shipwright is installed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial

import urllib3
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from workorder_operator import build, lifecycle, metrics
from workorder_operator.agent import Agent, Claim, ClaimLost, Failure
from workorder_operator.kube import Conflict, NotFound, explain, post_event
from workorder_operator.model import WorkOrder, utcnow
from workorder_operator.shipwright import BUILDRUNS, BUILDS, NotOurs, Shipwright
from workorder_operator.targeting import admits

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


@dataclass
class BuildAgentConfig:
    id: str = DEFAULT_AGENT_ID
    labels: Sequence[str] = ("shipwright",)
    annotations: dict[str, str] = field(default_factory=dict)
    concurrency: int = 4
    # The namespaces the operator watches (empty: all): the build agent claims only there.
    namespaces: tuple[str, ...] = ()
    # Without a running Shipwright controller nothing registers a Build: do not hold a claim forever.
    registration_timeout: float = 300.0
    # Nor for a BuildRun nothing starts (no Tekton, no ServiceAccount, a stuck Shipwright).
    buildrun_start_timeout: float = 300.0
    # How often to look again for the Shipwright API while it is missing.
    discovery_interval: float = 5.0


class BuildAgent:
    def __init__(self, api: client.ApiClient, config: BuildAgentConfig, field_manager: str) -> None:
        self.api = api
        self.config = config
        # One SDK agent per watched namespace (one for all when the operator watches all).
        self.agents = [
            Agent(api, config.id, work_types=[BUILD_TYPE], labels=config.labels, annotations=config.annotations,
                  namespace=namespace)
            for namespace in config.namespaces or (None,)
        ]  # fmt: skip
        self.agent = self.agents[0]
        self.shipwright = Shipwright(api, field_manager)
        # Where refusals are told (the operator points this at its engine's rate-limited events).
        self.post: Callable[[WorkOrder, str, str, str], None] = partial(post_event, api)
        self.stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- the operator's hooks -------------------------------------------------------------------

    def start(self) -> None:
        """Start taking build orders (again, after a `close`: each leadership term starts it)."""
        self.stop = threading.Event()
        self._thread = threading.Thread(target=self._main, name="build-agent", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 15.0) -> None:
        self.stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def rejection(self, order: WorkOrder) -> str | None:
        """For the engine's initialise step: why a build order this agent would take cannot run."""
        if order.spec.work_type != BUILD_TYPE or not admits(order.spec.targeting, self.agent.identity):
            return None
        try:
            build.parse_content(order.spec.yaml_content, order.namespace)
        except build.ContentError as exc:
            return str(exc)
        return None

    # --- the loop -------------------------------------------------------------------------------

    def _main(self) -> None:
        while not self.stop.is_set():
            try:
                if self.shipwright.installed():
                    log.info("build agent %s taking build orders", self.agent.id)
                    self._run_agents()
                    return
                self._mark_waiting()
            except (ApiException, urllib3.exceptions.HTTPError, OSError) as exc:  # the API server is away
                log.warning("build agent: %s; starting again in %.0fs", exc, self.config.discovery_interval)
            except Exception:  # a bug: never let the build agent die with the operator still running
                log.exception("build agent loop failed; starting again")
            self.stop.wait(self.config.discovery_interval)

    def _run_agents(self) -> None:
        def run(agent: Agent) -> None:
            agent.run(self.execute, concurrency=self.config.concurrency, stop=self.stop, resume=True)

        threads = [
            threading.Thread(target=run, args=(a,), name=f"build-agent-{a.namespace}", daemon=True)
            for a in self.agents[1:]
        ]
        for thread in threads:
            thread.start()
        try:
            run(self.agent)
        finally:
            self.stop.set()
            for thread in threads:
                thread.join()

    def _mark_waiting(self) -> None:
        """Say on each waiting build order, once, why nothing happens to it."""
        for order in (o for agent in self.agents for o in agent.candidates()):
            if any(c.get("reason") == WAITING_REASON for c in order.raw_status.get("conditions", [])):
                continue
            try:
                self.agent.orders.write_status(
                    order, lifecycle.waiting(order, WAITING_REASON, WAITING_MESSAGE, utcnow())
                )
            except (Conflict, NotFound, lifecycle.TransitionError):
                continue  # claimed or changed meanwhile: the next round looks again
            post_event(self.api, order, "Warning", WAITING_REASON, WAITING_MESSAGE)

    # --- one attempt ----------------------------------------------------------------------------

    def execute(self, claim: Claim) -> str:
        try:
            result = self._attempt(claim)
        except Failure as exc:
            metrics.BUILD_OUTCOMES.labels("retryable-failure" if exc.retryable else "failure").inc()
            raise
        except _Interrupted:
            if claim.lost.is_set():
                name = build.buildrun_name(claim.order.name, claim.attempt)
                log.warning("%s: claim lost; cancelling BuildRun %s", claim.order.key, name, extra=claim.order.logref)
                self.shipwright.cancel_buildrun(claim.order, claim.attempt, name)
                metrics.BUILD_OUTCOMES.labels("claim-lost").inc()
                raise ClaimLost(f"{claim.order.key}: claim lost during attempt {claim.attempt}") from None
            # The operator is stopping: leave claim and BuildRun be; the next operator resumes watching.
            claim.detach()
            return ""
        metrics.BUILD_OUTCOMES.labels("success").inc()
        return result

    def _attempt(self, claim: Claim) -> str:
        order = claim.order
        try:
            plan = build.parse_content(order.spec.yaml_content, order.namespace)
        except build.ContentError as exc:
            raise self._refused(order, str(exc)) from exc
        for doc in plan.builds:
            try:
                self.shipwright.apply_build(order, doc)
            except NotOurs as exc:
                raise self._refused(order, f"{BUILD_NAME_TAKEN}: {exc}") from None
            except ApiException as exc:
                if exc.status in (429, 500, 502, 503, 504) and "typed" not in (exc.body or ""):
                    raise  # the API server is busy or away: a retryable failure
                if exc.status == 404:
                    # The Build resource itself is not served (yet): Shipwright's CRDs were just
                    # (re)installed or removed. Discovery said it was there, so try again later.
                    raise Failure(f"the Build API is not served yet: {explain(exc)}", retryable=True) from None
                # Refused for what it is (invalid for the Build schema, forbidden...): no retry helps.
                raise self._refused(
                    order, f"Build {doc['metadata']['name']!r} refused by the API server: {explain(exc)}"
                ) from None
        self._wait_registered(claim, plan.run)
        name = build.buildrun_name(order.name, claim.attempt)
        try:
            self.shipwright.ensure_buildrun(order, claim.attempt, name, plan.run)
        except NotOurs as exc:
            # A leftover of a deleted order of the same name, or planted: the next attempt has another name.
            raise Failure(f"{BUILDRUN_NAME_TAKEN}: {exc}", retryable=True) from None
        log.info(
            "%s: attempt %d runs BuildRun %s (Build %s)", order.key, claim.attempt, name, plan.run, extra=order.logref
        )
        self._wait_started(claim, name)
        finished = self.shipwright.wait_for(
            BUILDRUNS, order.namespace, name, lambda br: build.buildrun_outcome(br).finished,
            lambda: self._interrupted(claim),
        )  # fmt: skip
        if self._interrupted(claim):
            raise _Interrupted()
        if finished is None:
            raise Failure(f"BuildRun {name} was deleted before it finished", retryable=True)
        outcome = build.buildrun_outcome(finished)
        if outcome.succeeded:
            return outcome.result
        raise Failure(f"BuildRun {name}: {outcome.error}", retryable=outcome.retryable)

    def _wait_registered(self, claim: Claim, build_name: str) -> None:
        namespace = claim.order.namespace
        if self.shipwright.get(BUILDS, namespace, build_name) is None:
            raise Failure(f"Build {build_name!r} not found in namespace {namespace!r}", retryable=False)
        deadline = time.monotonic() + self.config.registration_timeout
        registered = self.shipwright.wait_for(
            BUILDS, namespace, build_name, lambda b: build.registration(b)[0] is not None,
            lambda: self._interrupted(claim) or time.monotonic() > deadline,
        )  # fmt: skip
        if registered is None:
            if self._interrupted(claim):
                raise _Interrupted()
            if time.monotonic() > deadline:
                raise Failure(
                    f"Build {build_name!r} not registered within {self.config.registration_timeout:g}s: "
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

    def _wait_started(self, claim: Claim, name: str) -> None:
        # Counted from this process's first look, so a restarted operator gives a resumed BuildRun
        # the whole window again: at worst one more window, never an endless claim.
        namespace, timeout = claim.order.namespace, self.config.buildrun_start_timeout
        deadline = time.monotonic() + timeout
        started = self.shipwright.wait_for(
            BUILDRUNS, namespace, name, build.buildrun_started,
            lambda: self._interrupted(claim) or time.monotonic() > deadline,
        )  # fmt: skip
        if started is not None or self._interrupted(claim):
            return  # the caller's next wait sees the interruption (or a deletion) at once
        if time.monotonic() > deadline:
            # Cancelled, so it cannot start late beside the next attempt's BuildRun.
            self.shipwright.cancel_buildrun(claim.order, claim.attempt, name)
            raise Failure(
                f"BuildRun {name}: {build.NOT_STARTED_REASON}: not started within {timeout:g}s (no Succeeded "
                "condition): is Tekton running, and does the namespace have the `default` ServiceAccount?",
                retryable=True,
            )

    def _interrupted(self, claim: Claim) -> bool:
        return claim.lost.is_set() or self.stop.is_set()


class _Interrupted(Exception):
    """The claim was lost or the operator is stopping: `execute` decides what that means."""
