"""Test layer: one real control plane per session (or TEST_KUBECONFIG), a fresh namespace per test.

Every process started here is stopped here, even when tests fail or the run is interrupted
(pytest turns SIGINT into KeyboardInterrupt, which still runs fixture finalisers; SIGTERM is
turned into the same).
"""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import pytest
from kubernetes import client, config

from devcluster import envtest
from tests.support import CRDS, OperatorProcess


@dataclass
class Cluster:
    kubeconfig: Path
    api: client.ApiClient
    plane: envtest.ControlPlane | None  # None when TEST_KUBECONFIG points at a cluster we do not own
    # Whether Shipwright's real controller runs: ours (started below when `make binaries` built
    # it, which `make test` always does), or the cluster's when TEST_SHIPWRIGHT=1 says it has one.
    shipwright: bool = False

    def need_shipwright(self) -> None:
        if not self.shipwright:
            pytest.skip(
                "needs Shipwright's controller: run `make binaries` (or TEST_SHIPWRIGHT=1 on a cluster with one)"
            )
        proc = self.plane.processes.get(envtest.SHIPWRIGHT_CONTROLLER) if self.plane is not None else None
        if self.plane is not None and proc is not None and proc.poll() is not None:
            # Say so, instead of letting every later wait time out.
            log = (self.plane.directory / f"{envtest.SHIPWRIGHT_CONTROLLER}.log").read_text(errors="replace")
            pytest.fail(f"Shipwright's controller exited with {proc.returncode}:\n{log[-3000:]}")

    def user_kubeconfig(self, user: str, groups: tuple[str, ...] = ()) -> Path:
        if self.plane is None:
            pytest.skip("needs the local control plane to mint client certificates")
        return self.plane.user_kubeconfig(user, groups)


def _sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    given = os.environ.get("TEST_KUBECONFIG")
    plane = None
    if given:
        kubeconfig = Path(given)
    else:
        signal.signal(signal.SIGTERM, _sigterm)
        plane = envtest.ControlPlane(tmp_path_factory.mktemp("controlplane"))
        plane.start()
        kubeconfig = plane.kubeconfig
    try:
        api = config.new_client_from_config(str(kubeconfig))
        envtest.install_crds(api, envtest.workorder_crds(CRDS))
        shipwright = False
        if plane is not None and envtest.shipwright_binary() is not None:
            plane.start_shipwright()  # installs Shipwright's and Tekton's APIs first
            shipwright = True
        else:
            envtest.install_shipwright(api)
            shipwright = os.environ.get("TEST_SHIPWRIGHT") == "1"
        yield Cluster(kubeconfig, api, plane, shipwright)
    finally:
        if plane is not None:
            plane.stop()


def _fresh_namespace(cluster: Cluster) -> Iterator[str]:
    name = f"t-{uuid.uuid4().hex[:10]}"
    core = client.CoreV1Api(cluster.api)
    core.create_namespace({"metadata": {"name": name, "labels": {"workorder.dev/test": "true"}}})
    yield name
    core.delete_namespace(name)


@pytest.fixture
def namespace(cluster: Cluster) -> Iterator[str]:
    """A namespace of the test's own, deleted after it."""
    yield from _fresh_namespace(cluster)


@pytest.fixture
def other_namespace(cluster: Cluster) -> Iterator[str]:
    """A second one, for tests about more than one namespace."""
    yield from _fresh_namespace(cluster)


@pytest.fixture
def operator(cluster: Cluster, namespace: str, tmp_path: Path) -> Iterator[OperatorProcess]:
    """A running operator (all namespaces) for one test; its leader-election Lease lives in the
    test's namespace, so a crashed operator of an earlier test never holds it."""
    with OperatorProcess(
        cluster.kubeconfig, tmp_path / "operator.log", "--all-namespaces", f"--leader-election-namespace={namespace}"
    ).running() as proc:
        yield proc


@pytest.fixture
def no_threads_left() -> Iterator[None]:
    """Every thread a test starts (agents, their watches, workers, renewals) is gone after it
    (use with pytest.mark.usefixtures)."""
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 15
    while (left := [t for t in threading.enumerate() if t not in before and t.is_alive()]) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.05)
    assert not left, f"threads left running: {[t.name for t in left]}"
