"""The development control-plane tooling (`devcluster.envtest` in tools/devcluster, behind `make cluster-up`,
`make cluster-down` and the test session): what it starts, where it listens, the identities it
mints, the controllers it runs and the CRDs it installs.

Tests of the local control plane itself skip against a cluster we do not own (TEST_KUBECONFIG):
there is nothing of ours to test there.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from devcluster import envtest
from tests.conftest import Cluster
from tests.support import CRDS, DEFAULT_STATUS, wait_for

G, V, P = "workorder.dev", "v1alpha1", "workorders"


def order(name: str) -> dict[str, object]:
    return {
        "apiVersion": f"{G}/{V}",
        "kind": "WorkOrder",
        "metadata": {"name": name},
        "spec": {"workType": "test", "yamlContent": "a: 1\n"},
    }


def local(cluster: Cluster) -> envtest.ControlPlane:
    if cluster.plane is None:
        pytest.skip("tests the local control plane; TEST_KUBECONFIG points at a cluster we do not own")
    return cluster.plane


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (our exited child not yet reaped) is gone for every purpose here.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def listening(port: int) -> set[str]:
    """The addresses a TCP port is listening on here (from /proc/net/tcp and tcp6)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, hex_port = fields[1].split(":")
            if int(hex_port, 16) == port and fields[3] == "0A":  # 0A: LISTEN
                found.add(address)
    return found


def test_the_pinned_version_runs_on_loopback_only(cluster: Cluster) -> None:
    plane = local(cluster)
    assert client.VersionApi(cluster.api).get_code().git_version == envtest.K8S_VERSION
    assert plane.url.startswith("https://127.0.0.1:")
    kubeconfig = yaml.safe_load(plane.kubeconfig.read_text())
    assert kubeconfig["clusters"][0]["cluster"]["server"] == plane.url
    # Bound to 127.0.0.1 (0100007F in /proc), never to every interface.
    assert listening(plane.apiserver_port) == {"0100007F"}


def test_minted_identities_authenticate_as_named_and_rbac_applies(cluster: Cluster, namespace: str) -> None:
    plane = local(cluster)
    user = f"alice-{uuid.uuid4().hex[:6]}"
    api = config.new_client_from_config(str(plane.user_kubeconfig(user, ["team-a"])))
    try:
        review = client.AuthenticationV1Api(api).create_self_subject_review({})
        assert review.status.user_info.username == user
        assert "team-a" in review.status.user_info.groups
        # RBAC is on (--authorization-mode=RBAC): a new identity may do nothing until granted.
        with pytest.raises(ApiException) as refused:
            client.CustomObjectsApi(api).list_namespaced_custom_object(G, V, namespace, P)
        assert refused.value.status == 403
        rbac = client.RbacAuthorizationV1Api(cluster.api)
        rbac.create_namespaced_role_binding(
            namespace,
            {
                "metadata": {"name": "team-a-admin"},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
                "subjects": [{"kind": "Group", "name": "team-a", "apiGroup": "rbac.authorization.k8s.io"}],
            },
        )

        def allowed() -> bool:
            try:
                client.CustomObjectsApi(api).list_namespaced_custom_object(G, V, namespace, P)
            except ApiException as exc:
                if exc.status != 403:
                    raise
                return False
            return True

        wait_for(allowed, timeout=10, what="the grant to apply")
    finally:
        api.close()


def test_crds_are_installed_established_and_without_a_conversion_webhook(cluster: Cluster) -> None:
    ext = client.ApiextensionsV1Api(cluster.api)
    names = {c.metadata.name for c in ext.list_custom_resource_definition().items}
    assert {"workorders.workorder.dev", "builds.shipwright.io", "buildruns.shipwright.io"} <= names
    # No webhook runs here: Shipwright's conversion is switched off, or every read would fail.
    assert ext.read_custom_resource_definition("buildruns.shipwright.io").spec.conversion.strategy == "None"
    # Installing again replaces in place (make run does so on every start).
    before = ext.read_custom_resource_definition("workorders.workorder.dev").metadata.uid
    envtest.install_crds(cluster.api, envtest.workorder_crds(CRDS))
    assert ext.read_custom_resource_definition("workorders.workorder.dev").metadata.uid == before


def test_our_crd_has_a_status_subresource_with_defaults(cluster: Cluster, namespace: str) -> None:
    api = client.CustomObjectsApi(cluster.api)
    body = order("a")
    body["status"] = {"phase": "Completed"}
    created = api.create_namespaced_custom_object(G, V, namespace, P, body)
    # The status sent with a create is dropped; what reads back is the CRD's default.
    assert created["status"] == DEFAULT_STATUS
    patched = api.patch_namespaced_custom_object_status(
        G, V, namespace, P, "a",
        [{"op": "add", "path": "/status", "value": {"phase": "Claimed"}},
         {"op": "replace", "path": "/spec/workType", "value": "changed"}],
        _content_type="application/json-patch+json",
    )  # fmt: skip
    assert patched["status"]["phase"] == "Claimed"
    assert patched["spec"]["workType"] == "test"


def test_the_garbage_collector_runs(cluster: Cluster, namespace: str) -> None:
    # envtest starts kube-controller-manager with the garbage collector: owned Builds and
    # BuildRuns go with their WorkOrder only because of it.
    local(cluster)
    core = client.CoreV1Api(cluster.api)
    owner = core.create_namespaced_config_map(namespace, {"metadata": {"name": "owner"}})
    ref = {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner.metadata.uid}
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "owned", "ownerReferences": [ref]}})
    core.delete_namespaced_config_map("owner", namespace)

    def gone() -> bool:
        try:
            core.read_namespaced_config_map("owned", namespace)
        except ApiException as exc:
            return exc.status == 404
        return False

    wait_for(gone, timeout=60, what="the owned object to be collected")


def test_the_namespace_controller_runs(cluster: Cluster) -> None:
    # ... and the namespace controller: every test's namespace is deleted after it.
    local(cluster)
    core = client.CoreV1Api(cluster.api)
    name = f"del-{uuid.uuid4().hex[:8]}"
    core.create_namespace({"metadata": {"name": name}})
    client.CustomObjectsApi(cluster.api).create_namespaced_custom_object(G, V, name, P, order("c"))
    core.delete_namespace(name)

    def gone() -> bool:
        try:
            core.read_namespace(name)
        except ApiException as exc:
            return exc.status == 404
        return False

    wait_for(gone, timeout=60, what="the namespace to be deleted")


PROCESSES = ("etcd", "kube-apiserver", "kube-controller-manager")


def envtest_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "devcluster.envtest", *args], capture_output=True, text=True, timeout=120
    )


def test_cluster_up_and_down(cluster: Cluster, tmp_path: Path) -> None:
    """`make cluster-up` / `make cluster-down`: a control plane of its own that outlives the
    command, is not started twice, and is stopped entirely."""
    local(cluster)
    directory = tmp_path / "plane"
    pids: dict[str, int] = {}
    try:
        up = envtest_cli("up", str(directory))
        assert up.returncode == 0, up.stderr
        assert "control plane ready at https://127.0.0.1:" in up.stdout
        pids.update((n, int((directory / f"{n}.pid").read_text())) for n in PROCESSES)
        assert all(alive(p) for p in pids.values()), pids
        api = config.new_client_from_config(str(directory / "kubeconfig"))
        try:
            assert client.VersionApi(api).get_code().git_version == envtest.K8S_VERSION
        finally:
            api.close()

        again = envtest_cli("up", str(directory))
        assert again.returncode == 0, again.stderr
        assert "already running" in again.stdout
        assert {n: int((directory / f"{n}.pid").read_text()) for n in pids} == pids

        down = envtest_cli("down", str(directory))
        assert down.returncode == 0, down.stderr
        # `down` waits for each process to end.
        assert not any(alive(p) for p in pids.values()), "a control-plane process outlived `down`"
        assert not (directory / "state.json").exists()
    finally:
        envtest_cli("down", str(directory))
        for pid in pids.values():  # whatever `down` left behind (the test's own clean-up)
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
