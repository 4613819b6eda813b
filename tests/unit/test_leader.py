"""Leader election: the holder steps down at its renew deadline even while a lease call hangs (a
frozen API server), and tells the engine how long a write may still take. The Lease API is a
stand-in here; the real thing, frozen with SIGSTOP, is in tests/integration/test_failover.py."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from kubernetes import client

from workorder_operator.leader import LeaderElection, LeaseConfig

HANG = 30.0  # a safety net for a broken election only


class Leases:
    """A Lease API whose calls can be made to hang, as against a frozen API server."""

    def __init__(self) -> None:
        self.lease: client.V1Lease | None = None
        self.version = 0
        self.frozen = threading.Event()
        self.thawed = threading.Event()

    def _wait(self) -> None:
        if self.frozen.is_set():
            self.thawed.wait(HANG)

    def read_namespaced_lease(self, name: str, namespace: str, **_: Any) -> client.V1Lease:
        self._wait()
        if self.lease is None:
            raise client.ApiException(status=404)
        return self.lease

    def create_namespaced_lease(self, namespace: str, body: dict[str, Any], **_: Any) -> None:
        self._wait()
        self._store(body)

    def replace_namespaced_lease(self, name: str, namespace: str, body: dict[str, Any], **_: Any) -> None:
        self._wait()
        self._store(body)

    def _store(self, body: dict[str, Any]) -> None:
        self.version += 1
        spec = body["spec"]
        self.lease = client.V1Lease(
            metadata=client.V1ObjectMeta(name=body["metadata"]["name"], resource_version=str(self.version)),
            spec=client.V1LeaseSpec(
                holder_identity=spec["holderIdentity"], lease_duration_seconds=spec["leaseDurationSeconds"],
                renew_time=None, acquire_time=None, lease_transitions=spec["leaseTransitions"],
            ),
        )  # fmt: skip


def test_the_leader_steps_down_at_its_renew_deadline_while_a_lease_call_still_hangs() -> None:
    async def main() -> None:
        leases = Leases()
        election = LeaderElection(
            None,  # type: ignore[arg-type]
            LeaseConfig("ns", lease_duration=1.5, renew_deadline=0.6, retry_period=0.05),
            "me",
        )
        election.leases = leases  # type: ignore[assignment]
        started, stopped = asyncio.Event(), asyncio.Event()
        budgets: list[float] = []

        async def on_start() -> None:
            budgets.append(election.remaining())
            started.set()

        async def on_stop() -> None:
            budgets.append(election.remaining())
            stopped.set()

        task = asyncio.create_task(election.run(on_start, on_stop))
        try:
            await asyncio.wait_for(started.wait(), HANG)
            assert 0 < budgets[0] <= 0.6  # a write may take at most what is left before the deadline
            leases.frozen.set()  # the API server stops answering
            await asyncio.wait_for(stopped.wait(), HANG)
            assert not leases.thawed.is_set()  # stepped down while the call still hangs
            assert budgets[1] == 0.0 and election.remaining() == 0.0
        finally:
            leases.thawed.set()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    asyncio.run(main())
