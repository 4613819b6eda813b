"""The control plane is real: CRDs, status subresource, optimistic concurrency, GC, namespaces."""

from __future__ import annotations

import uuid

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from tests.conftest import Cluster
from tests.support import wait_for

G, V, P = "workorder.dev", "v1alpha1", "workorders"


def order(name: str) -> dict[str, object]:
    return {
        "apiVersion": f"{G}/{V}",
        "kind": "WorkOrder",
        "metadata": {"name": name},
        "spec": {"workType": "test", "yamlContent": "a: 1\n"},
    }


def test_version_is_real(cluster: Cluster) -> None:
    info = client.VersionApi(cluster.api).get_code()
    if cluster.plane is not None:
        assert info.git_version == "v1.34.4"


def test_crds_installed_and_established(cluster: Cluster) -> None:
    ext = client.ApiextensionsV1Api(cluster.api)
    names = {c.metadata.name for c in ext.list_custom_resource_definition().items}
    assert {"workorders.workorder.dev", "builds.shipwright.io", "buildruns.shipwright.io"} <= names
    buildruns = ext.read_custom_resource_definition("buildruns.shipwright.io")
    assert buildruns.spec.conversion.strategy == "None"


def test_status_subresource_ignores_spec_and_main_ignores_status(cluster: Cluster, namespace: str) -> None:
    api = client.CustomObjectsApi(cluster.api)
    body = order("a")
    body["status"] = {"phase": "Completed"}
    created = api.create_namespaced_custom_object(G, V, namespace, P, body)
    # The status sent with a create is dropped; what reads back is the CRD's default.
    assert created["status"] == {
        "phase": "Pending",
        "reason": "Pending",
        "attempt": 0,
        "retryCount": 0,
        "observedGeneration": 0,
    }
    patched = api.patch_namespaced_custom_object_status(
        G, V, namespace, P, "a",
        [{"op": "add", "path": "/status", "value": {"phase": "Claimed"}},
         {"op": "replace", "path": "/spec/workType", "value": "changed"}],
        _content_type="application/json-patch+json",
    )  # fmt: skip
    assert patched["status"]["phase"] == "Claimed"
    assert patched["spec"]["workType"] == "test"


def test_stale_resource_version_conflicts(cluster: Cluster, namespace: str) -> None:
    api = client.CustomObjectsApi(cluster.api)
    created = api.create_namespaced_custom_object(G, V, namespace, P, order("b"))
    stale = created["metadata"]["resourceVersion"]
    api.patch_namespaced_custom_object_status(G, V, namespace, P, "b", {"status": {"phase": "Claimed"}})
    with pytest.raises(ApiException) as err:
        api.patch_namespaced_custom_object_status(
            G, V, namespace, P, "b",
            {"metadata": {"resourceVersion": stale}, "status": {"phase": "Completed"}},
        )  # fmt: skip
    assert err.value.status == 409


def test_owner_deletion_garbage_collects(cluster: Cluster, namespace: str) -> None:
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

    wait_for(gone, timeout=60)


def test_namespace_deletion_completes(cluster: Cluster) -> None:
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

    wait_for(gone, timeout=60)
