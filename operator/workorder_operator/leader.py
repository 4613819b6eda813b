"""Leader election on a coordination.k8s.io/v1 Lease: with two replicas, exactly one acts.

Why a Lease and not kopf peering: peering freezes operators of *equal* priority against each
other (two identical replicas would both stand still), needs its own CRD, and keeps no fencing;
a Lease is what every Kubernetes controller uses, needs one namespaced object, and a standby
takes over as soon as the holder stops renewing. Every write of ours is a compare-and-swap on
the order anyway, so even a brief overlap of two leaders cannot corrupt state.

The rules are client-go's: the holder renews every `retry_period`; a candidate takes the lease
over when it has seen the same record, unrenewed, for `lease_duration` on its *own* clock (no
trust in anyone's timestamps); the holder steps down when it could not renew for
`renew_deadline`. Lease writes are compare-and-swap on resourceVersion.

Time is what makes this safe, so every step is bounded by it: each lease call must be over
before the renew deadline (a hung API server cannot keep the holder waiting past it), the holder
steps down at the deadline even while a call still hangs, and `remaining()` tells the engine how
long a write of its may still take (`renew_deadline` < `lease_duration`: the holder stops
before anyone else may start).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import urllib3
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from workorder_operator.kube import timeout
from workorder_operator.model import format_time, utcnow

log = logging.getLogger(__name__)


@dataclass
class LeaseConfig:
    namespace: str
    name: str = "workorder-operator"
    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0


class LeaderElection:
    def __init__(self, api: client.ApiClient, config: LeaseConfig, identity: str) -> None:
        self.leases = client.CoordinationV1Api(api)
        self.config = config
        self.identity = identity
        self.leading = False
        self._observed: tuple[Any, ...] | None = None
        self._observed_at = 0.0
        # When (monotonic) the last successful acquire or renew *started*: the lease the others
        # see cannot be older than that.
        self._renewed_at = 0.0

    def remaining(self) -> float:
        """Seconds this replica may still act as the leader (0 when it does not lead): until the
        renew deadline counted from the start of its last successful renewal."""
        if not self.leading:
            return 0.0
        return max(0.0, self.config.renew_deadline - (time.monotonic() - self._renewed_at))

    async def run(self, started: Callable[[], Awaitable[None]], stopped: Callable[[], Awaitable[None]]) -> None:
        """Campaign forever: `started()` on winning, `stopped()` on losing the lease or on not
        renewing it within the renew deadline."""
        try:
            while True:
                begun = time.monotonic()
                limit = self.remaining() if self.leading else self.config.renew_deadline
                try:
                    # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a
                    # cancellation (shutdown) that meets the call's end.
                    async with asyncio.timeout(limit):
                        holding = await asyncio.to_thread(self._try_acquire_or_renew, begun + limit)
                except Exception as exc:  # the API server is away or slow: keep the lease until the deadline
                    log.warning("leader election: %s", exc or type(exc).__name__)
                    holding = self.leading and self.remaining() > 0
                if holding and not self.leading:
                    self.leading = True
                    log.info("leader election: %s is the leader", self.identity)
                    await started()
                elif not holding and self.leading:
                    self.leading = False
                    log.warning("leader election: %s lost the lease or could not renew it in time", self.identity)
                    await stopped()
                pause = self.config.retry_period
                if self.leading:
                    pause = min(pause, self.remaining())  # wake up for the deadline, whatever happens
                await asyncio.sleep(pause)
        finally:
            if self.leading:
                self.leading = False
                await asyncio.to_thread(self.release)

    def _try_acquire_or_renew(self, deadline: float) -> bool:
        """One attempt, in a thread; no request of it may still be under way at `deadline`."""
        started = time.monotonic()
        now = format_time(utcnow())
        cfg = self.config

        def budget() -> tuple[float, float]:
            left = deadline - time.monotonic()
            if left < 0.2:
                raise TimeoutError("no time left before the renew deadline")
            return timeout(left)

        try:
            lease = self.leases.read_namespaced_lease(cfg.name, cfg.namespace, _request_timeout=budget())
        except ApiException as exc:
            if exc.status != 404:
                raise
            body = {
                "metadata": {"name": cfg.name, "namespace": cfg.namespace},
                "spec": {
                    "holderIdentity": self.identity,
                    "leaseDurationSeconds": int(cfg.lease_duration),
                    "acquireTime": now,
                    "renewTime": now,
                    "leaseTransitions": 0,
                },
            }
            try:
                self.leases.create_namespaced_lease(cfg.namespace, body, _request_timeout=budget())
            except ApiException as create_exc:
                if create_exc.status == 409:
                    return False  # another candidate created it first
                raise
            self._renewed_at = started
            return True
        spec = lease.spec
        record = (spec.holder_identity, spec.renew_time, spec.acquire_time, spec.lease_transitions)
        if record != self._observed:
            self._observed, self._observed_at = record, time.monotonic()
        held_by_other = spec.holder_identity not in (None, "", self.identity)
        if held_by_other and time.monotonic() - self._observed_at < (spec.lease_duration_seconds or cfg.lease_duration):
            return False
        ours = spec.holder_identity == self.identity
        transitions = (spec.lease_transitions or 0) + (0 if ours else 1)
        version = lease.metadata.resource_version  # the write is a compare-and-swap on it
        body = {
            "metadata": {"name": cfg.name, "namespace": cfg.namespace, "resourceVersion": version},
            "spec": {
                "holderIdentity": self.identity,
                "leaseDurationSeconds": int(cfg.lease_duration),
                "acquireTime": format_time(spec.acquire_time) if ours and spec.acquire_time else now,
                "renewTime": now,
                "leaseTransitions": transitions,
            },
        }  # fmt: skip
        try:
            self.leases.replace_namespaced_lease(cfg.name, cfg.namespace, body, _request_timeout=budget())
        except ApiException as exc:
            if exc.status == 409:
                return False  # someone else wrote the lease between our read and write
            raise
        if time.monotonic() > deadline:
            return False  # the answer came too late to count: we have stepped down meanwhile
        self._renewed_at = started
        return True

    def release(self) -> None:
        """Give the lease up on a clean shutdown, so a standby takes over at once."""
        cfg = self.config
        try:
            lease = self.leases.read_namespaced_lease(cfg.name, cfg.namespace, _request_timeout=timeout())
            if lease.spec.holder_identity != self.identity:
                return
            lease.spec.holder_identity = ""
            lease.spec.lease_duration_seconds = 1
            self.leases.replace_namespaced_lease(cfg.name, cfg.namespace, lease, _request_timeout=timeout())
            log.info("leader election: %s released the lease", self.identity)
        except ApiException as exc:
            log.warning("leader election: could not release the lease: %s", exc.reason)
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            log.warning("leader election: could not release the lease: %s", exc)
