"""deploy/: the kustomize installation renders, the real API server accepts all of it, and its RBAC is
least privilege — checked with real requests made as each identity (client certificates), not by
reading the rules back.

A module fixture applies the installation's namespace, ServiceAccount and RBAC for real (everything
the RBAC tests need) and removes at the end whatever it created. It does not apply the Deployment
(nothing here runs pods) nor the admission policy (it would govern every other test's status
writes); the API server still checks those through server-side dry runs. The secure metrics
endpoint is tested with the operator itself, as a process run with its ServiceAccount's rights.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

from devcluster.envtest import free_port
from tests.conftest import Cluster
from tests.support import (
    OperatorProcess,
    admission_policies,
    bind,
    create_order,
    refused_by,
    sample,
    scrape,
    wait_allowed,
    wait_for,
)
from workorder_operator import fleet
from workorder_operator.model import utcnow
from workorder_operator.targeting import AgentIdentity

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="needs kubectl (with kustomize) on PATH")

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
OVERLAY = DEPLOY / "overlays" / "single-namespace"
SYSTEM_NS = "workorder-system"
SA_NAME = "workorder-operator"
OPERATOR_USER = f"system:serviceaccount:{SYSTEM_NS}:{SA_NAME}"
OPERATOR_GROUPS = ("system:serviceaccounts", f"system:serviceaccounts:{SYSTEM_NS}", "system:authenticated")
G, V, P = "workorder.dev", "v1alpha1", "workorders"
SW, SWV = "shipwright.io", "v1beta1"
# What the module fixture creates for real; the rest of the installation is only dry-run.
APPLIED_KINDS = {"Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}
ARGS = ["--all-namespaces", "--metrics-port=8080", "--metrics-address=0.0.0.0", "--log-format=json"]
LABELS = {"app.kubernetes.io/name": "workorder-operator", "app.kubernetes.io/component": "operator"}

BUILD = {
    "apiVersion": f"{SW}/{SWV}",
    "kind": "Build",
    "metadata": {"name": "app"},
    "spec": {
        "source": {"type": "Git", "git": {"url": "https://github.com/shipwright-io/sample-go"}},
        "strategy": {"name": "kaniko", "kind": "ClusterBuildStrategy"},
        "output": {"image": "registry.example.com/app"},
    },
}


# --- helpers ------------------------------------------------------------------------------------


def kubectl(*args: str, kubeconfig: Path | None = None, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    cmd = ["kubectl", *args] + ([f"--kubeconfig={kubeconfig}"] if kubeconfig else [])
    return subprocess.run(cmd, capture_output=True, text=True, input=stdin, timeout=180, check=False)


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"{' '.join(result.args)} failed:\n{result.stderr}"
    return result.stdout


def render(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(ok(kubectl("kustomize", str(path)))) if doc]


def key(obj: dict[str, Any]) -> tuple[str, str, str]:
    return obj["kind"], obj["metadata"].get("namespace", ""), obj["metadata"]["name"]


def find(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected exactly one {kind} {name}, found {len(matches)}"
    return matches[0]


def rule_set(role: dict[str, Any]) -> dict[tuple[str, str], set[str]]:
    """{(apiGroup, resource): verbs}; wildcards, resourceNames and nonResourceURLs are refused outright."""
    rules: dict[tuple[str, str], set[str]] = {}
    for rule in role.get("rules") or []:
        assert not rule.get("resourceNames") and not rule.get("nonResourceURLs"), rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                assert "*" not in (group, resource, *rule["verbs"]), f"wildcard in {role['metadata']['name']}: {rule}"
                rules.setdefault((group, resource), set()).update(rule["verbs"])
    return rules


def as_user(cluster: Cluster, user: str, groups: tuple[str, ...] = ()) -> client.ApiClient:
    return config.new_client_from_config(str(cluster.user_kubeconfig(user, groups)))


def forbidden(call: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    with pytest.raises(ApiException) as err:
        call(*args, **kwargs)
    assert err.value.status == 403, f"expected 403 Forbidden, got {err.value.status}: {err.value.body}"


def noop_status_patch(objs: client.CustomObjectsApi, namespace: str, name: str) -> dict[str, Any]:
    """A status patch that changes nothing (so any admission policy admits it): it shows authorization only."""
    current = objs.get_namespaced_custom_object_status(G, V, namespace, P, name)
    result: dict[str, Any] = objs.patch_namespaced_custom_object_status(
        G, V, namespace, P, name, {"status": {"phase": current["status"]["phase"]}}
    )
    return result


def can_watch(list_call: Callable[..., Any], *args: Any) -> bool:
    """A real watch request: True once the first event arrives (the existing order, as ADDED)."""
    w = watch.Watch()
    for event in w.stream(list_call, *args, timeout_seconds=10):
        w.stop()
        return bool(event["type"] == "ADDED")
    return False


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rendered() -> list[dict[str, Any]]:
    return render(DEPLOY)


@pytest.fixture(scope="module")
def installed(
    cluster: Cluster, rendered: list[dict[str, Any]], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[None]:
    """The namespace, ServiceAccount and RBAC applied for real (server-side, idempotent); on the
    way out, everything that did not exist before is deleted again."""
    tmp = tmp_path_factory.mktemp("deploy")
    wanted = [o for o in rendered if o["kind"] in APPLIED_KINDS]
    manifest = tmp / "applied.yaml"
    manifest.write_text(yaml.safe_dump_all(wanted))
    listed = yaml.safe_load(
        ok(kubectl("get", "-f", str(manifest), "-o", "yaml", "--ignore-not-found", kubeconfig=cluster.kubeconfig))
        or "{}"
    )
    existing = {key(o) for o in (listed or {}).get("items", [listed] if listed and "kind" in listed else [])}
    created = [o for o in wanted if key(o) not in existing]
    try:
        ok(kubectl("apply", "--server-side", "-f", str(manifest), kubeconfig=cluster.kubeconfig))
        yield
    finally:
        if created:
            leftovers = tmp / "created.yaml"
            leftovers.write_text(yaml.safe_dump_all(created))
            kubectl("delete", "-f", str(leftovers), "--ignore-not-found", "--wait=false", kubeconfig=cluster.kubeconfig)
        if any(o["kind"] == "Namespace" for o in created):
            # Gone before a later test could apply it again (the namespace controller runs).
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    client.CoreV1Api(cluster.api).read_namespace(SYSTEM_NS)
                except ApiException as exc:
                    if exc.status == 404:
                        break
                    raise
                time.sleep(0.2)


# --- what deploy/ renders -----------------------------------------------------------------------


def test_base_renders_the_whole_installation(rendered: list[dict[str, Any]]) -> None:
    admission = [d for d in yaml.safe_load_all((DEPLOY / "base" / "admission.yaml").read_text()) if d]
    expected = {
        ("CustomResourceDefinition", "", "workorders.workorder.dev"),
        ("Namespace", "", SYSTEM_NS),
        ("ServiceAccount", SYSTEM_NS, SA_NAME),
        ("ClusterRole", "", "workorder-operator"),
        ("ClusterRoleBinding", "", "workorder-operator"),
        ("Role", SYSTEM_NS, "workorder-operator-leader"),
        ("RoleBinding", SYSTEM_NS, "workorder-operator-leader"),
        ("ClusterRole", "", "workorder-agent"),
        ("ClusterRole", "", "workorder-edit"),
        ("ClusterRole", "", "workorder-view"),
        ("ClusterRole", "", "workorder-metrics-reader"),
        ("Deployment", SYSTEM_NS, "workorder-operator"),
        ("Service", SYSTEM_NS, "workorder-operator-metrics"),
        ("PodDisruptionBudget", SYSTEM_NS, "workorder-operator"),
    } | {key(d) for d in admission}
    assert sorted(key(o) for o in rendered) == sorted(expected)
    # One source of truth for the CRD: deploy/ renders crds/workorder.yaml, only labelled.
    crd = find(rendered, "CustomResourceDefinition", "workorders.workorder.dev")
    source = yaml.safe_load((REPO / "crds" / "workorder.yaml").read_text())
    assert crd["spec"] == source["spec"]
    # The Argo CD pieces belong to Argo CD's namespace, not to this installation.
    assert not any(o["kind"] == "ConfigMap" for o in rendered)


def test_every_rbac_rule_says_why() -> None:
    for path in sorted([*(DEPLOY / "base").glob("rbac-*.yaml"), *(DEPLOY / "agent").rglob("rbac.yaml")]):
        lines = path.read_text().splitlines()
        starts = [i for i, line in enumerate(lines) if re.match(r"^\s*- (apiGroups|nonResourceURLs):", line)]
        assert starts, f"no rules found in {path.name}"
        for i in starts:
            assert lines[i - 1].strip().startswith("#"), f"{path.name}:{i + 1}: a rule without a comment saying why"


def test_rbac_is_exactly_least_privilege(rendered: list[dict[str, Any]]) -> None:
    read = {"get", "list", "watch"}
    assert rule_set(find(rendered, "ClusterRole", "workorder-operator")) == {
        (G, "workorders"): read | {"delete", "operate"},
        (G, "workorders/status"): {"get", "patch"},
        ("", "events"): {"create"},
        (SW, "builds"): read | {"create", "patch"},
        (SW, "buildruns"): read | {"create", "patch"},
        ("coordination.k8s.io", "leases"): read,
        ("authentication.k8s.io", "tokenreviews"): {"create"},
        ("authorization.k8s.io", "subjectaccessreviews"): {"create"},
    }
    # Scrapers: get /metrics, nothing else (rule_set refuses non-resource URLs: read it as is).
    reader = find(rendered, "ClusterRole", "workorder-metrics-reader")
    assert reader["rules"] == [{"nonResourceURLs": ["/metrics"], "verbs": ["get"]}]
    assert not [
        o
        for o in rendered
        if o["kind"] in ("RoleBinding", "ClusterRoleBinding") and o["roleRef"]["name"] == reader["metadata"]["name"]
    ]
    leader = find(rendered, "Role", "workorder-operator-leader")
    assert leader["metadata"]["namespace"] == SYSTEM_NS
    assert rule_set(leader) == {("coordination.k8s.io", "leases"): {"get", "create", "update", "patch", "delete"}}
    assert rule_set(find(rendered, "ClusterRole", "workorder-agent")) == {
        (G, "workorders"): read,
        (G, "workorders/status"): {"get", "patch"},
        ("coordination.k8s.io", "leases"): read | {"create", "patch", "delete"},
        (G, "presences"): {"announce"},
    }
    edit = find(rendered, "ClusterRole", "workorder-edit")
    assert rule_set(edit) == {
        (G, "workorders"): read | {"create", "update", "patch", "delete", "deletecollection"},
        (G, "workorders/status"): {"get", "patch"},
    }
    view = find(rendered, "ClusterRole", "workorder-view")
    assert rule_set(view) == {
        (G, "workorders"): read,
        (G, "workorders/status"): {"get"},
        ("coordination.k8s.io", "leases"): read,
    }
    aggregate = "rbac.authorization.k8s.io/aggregate-to-"
    assert {k for k, v in edit["metadata"]["labels"].items() if k.startswith(aggregate) and v == "true"} == {
        aggregate + "admin",
        aggregate + "edit",
    }
    assert {k for k, v in view["metadata"]["labels"].items() if k.startswith(aggregate) and v == "true"} == {
        aggregate + "view"
    }
    # Both bindings name the ServiceAccount the Deployment runs as.
    subject = {"kind": "ServiceAccount", "name": SA_NAME, "namespace": SYSTEM_NS}
    for kind, name in (("ClusterRoleBinding", "workorder-operator"), ("RoleBinding", "workorder-operator-leader")):
        binding = find(rendered, kind, name)
        assert binding["subjects"] == [subject]
        assert binding["roleRef"]["name"] == name


def test_spoke_build_agent_rbac_is_exactly_least_privilege() -> None:
    """deploy/agent (the spoke) and deploy/agent/hub (its role in the hub): nothing beyond the builds."""
    spoke = render(DEPLOY / "agent")
    # delete: no owner reference reaches the hub's order, so the agent itself deletes orphans.
    verbs = {"get", "list", "watch", "create", "patch", "delete"}
    role = find(spoke, "ClusterRole", "workorder-build-agent")
    # get namespaces: it builds only where the namespace opted in to its hub (a label).
    assert rule_set(role) == {(SW, "builds"): verbs, (SW, "buildruns"): verbs, ("", "namespaces"): {"get"}}
    binding = find(spoke, "ClusterRoleBinding", "workorder-build-agent")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "workorder-build-agent", "namespace": SYSTEM_NS}]
    assert {o["kind"] for o in spoke if o["kind"].endswith("Role")} == {"ClusterRole"}
    deployment = find(spoke, "Deployment", "workorder-build-agent")
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == "workorder-build-agent"
    hub = render(DEPLOY / "agent" / "hub")
    assert [o["kind"] for o in hub] == ["ClusterRole"]
    assert rule_set(find(hub, "ClusterRole", "workorder-agent-events")) == {("", "events"): {"create"}}


def test_deployment_service_and_disruption_budget(rendered: list[dict[str, Any]]) -> None:
    deployment = find(rendered, "Deployment", "workorder-operator")
    spec = deployment["spec"]
    assert spec["replicas"] == 2
    assert spec["selector"] == {"matchLabels": LABELS}
    pod = spec["template"]["spec"]
    assert spec["template"]["metadata"]["labels"] == LABELS
    assert pod["serviceAccountName"] == SA_NAME
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 65532
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    anti = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert anti[0]["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert anti[0]["podAffinityTerm"]["labelSelector"] == {"matchLabels": LABELS}
    [container] = pod["containers"]
    assert container["image"] == "workorder-operator:0.1.0"
    assert container["imagePullPolicy"] == "IfNotPresent"
    assert container["args"] == ARGS
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in container["env"]}
    assert env == {"POD_NAME": "metadata.name", "POD_NAMESPACE": "metadata.namespace"}
    security = container["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] == 65532
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["resources"] == {"requests": {"cpu": "50m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}}
    assert container["ports"] == [{"name": "metrics", "containerPort": 8080, "protocol": "TCP"}]
    # The metrics port is secure (the default: no --metrics-insecure), so the probes speak HTTPS.
    assert "--metrics-insecure" not in container["args"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics", "scheme": "HTTPS"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics", "scheme": "HTTPS"}
    [mount] = container["volumeMounts"]
    assert mount["mountPath"] == "/tmp"
    assert {v["name"]: "emptyDir" in v for v in pod["volumes"]} == {mount["name"]: True}

    service = find(rendered, "Service", "workorder-operator-metrics")
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["selector"] == LABELS
    assert service["spec"]["ports"] == [{"name": "metrics", "port": 8080, "targetPort": "metrics", "protocol": "TCP"}]
    pdb = find(rendered, "PodDisruptionBudget", "workorder-operator")
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"] == {"matchLabels": LABELS}


def test_single_namespace_overlay(cluster: Cluster, installed: None, rendered: list[dict[str, Any]]) -> None:
    overlay = render(OVERLAY)
    args = find(overlay, "Deployment", "workorder-operator")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args == ["--namespace=workorders", *ARGS[1:]]
    # Nothing else differs from the base.
    base = {key(o): o for o in rendered}
    for obj in overlay:
        if obj["kind"] == "Deployment":
            continue
        assert obj == base[key(obj)], f"the overlay changed {key(obj)}"
    out = kubectl("apply", "-k", str(OVERLAY), "--dry-run=server", kubeconfig=cluster.kubeconfig)
    ok(out)
    assert "PodSecurity" not in out.stderr, out.stderr
    missing = sorted(set(base) - {key(o) for o in overlay})
    assert not missing, f"the overlay lacks {missing}"


# --- the API server accepts it ------------------------------------------------------------------


def test_server_dry_run_accepts_the_whole_installation(cluster: Cluster, installed: None) -> None:
    result = kubectl("apply", "-k", str(DEPLOY), "--dry-run=server", kubeconfig=cluster.kubeconfig)
    out = ok(result)
    for line in ("deployment.apps/workorder-operator", "service/workorder-operator-metrics",
                 "poddisruptionbudget.policy/workorder-operator", "customresourcedefinition.apiextensions.k8s.io/"
                 "workorders.workorder.dev", "validatingadmissionpolicy.admissionregistration.k8s.io/"):  # fmt: skip
        assert line in out, out
    # workorder-system enforces (and warns about) the `restricted` Pod Security Standard: no
    # warning means the operator's pod template meets it.
    assert "PodSecurity" not in result.stderr, result.stderr
    # ... and the namespace label does warn about a pod that does not.
    deployment = find(render(DEPLOY), "Deployment", "workorder-operator")
    del deployment["spec"]["template"]["spec"]["containers"][0]["securityContext"]["allowPrivilegeEscalation"]
    weaker = kubectl("apply", "--dry-run=server", "-f", "-", stdin=yaml.safe_dump(deployment),
                     kubeconfig=cluster.kubeconfig)  # fmt: skip
    ok(weaker)
    assert 'would violate PodSecurity "restricted:latest"' in weaker.stderr, weaker.stderr


def test_server_side_apply_over_an_existing_installation(cluster: Cluster, installed: None) -> None:
    """The documented `kubectl apply --server-side -k deploy/` over what is already there: no conflicts."""
    ok(kubectl("apply", "--server-side", "-k", str(DEPLOY), "--dry-run=server", kubeconfig=cluster.kubeconfig))


# --- RBAC, with real requests as each identity --------------------------------------------------


def test_operator_service_account(cluster: Cluster, installed: None, namespace: str) -> None:
    api = as_user(cluster, OPERATOR_USER, OPERATOR_GROUPS)
    wait_allowed(api, "list", "workorders", namespace)
    create_order(cluster.api, namespace, "o1")
    objs, core = client.CustomObjectsApi(api), client.CoreV1Api(api)

    # Orders: read everywhere, write status, delete; never create or change them.
    assert "o1" in [o["metadata"]["name"] for o in objs.list_cluster_custom_object(G, V, P)["items"]]
    assert can_watch(objs.list_cluster_custom_object, G, V, P)
    objs.get_namespaced_custom_object(G, V, namespace, P, "o1")
    noop_status_patch(objs, namespace, "o1")
    current = objs.get_namespaced_custom_object_status(G, V, namespace, P, "o1")
    forbidden(objs.replace_namespaced_custom_object_status, G, V, namespace, P, "o1", current)
    # The virtual verb the admission policies exempt (expire, due and reject are the operator's moves).
    wait_allowed(api, "operate", "workorders", namespace)
    forbidden(objs.create_namespaced_custom_object, G, V, namespace, P,
              {"apiVersion": f"{G}/{V}", "kind": "WorkOrder", "metadata": {"name": "o2"},
               "spec": {"workType": "test", "yamlContent": "a: 1\n"}})  # fmt: skip
    forbidden(objs.patch_namespaced_custom_object, G, V, namespace, P, "o1", {"metadata": {"labels": {"x": "y"}}})
    forbidden(objs.delete_collection_namespaced_custom_object, G, V, namespace, P)

    # Events on orders.
    event = core.create_namespaced_event(
        namespace,
        {
            "metadata": {"name": "o1.test"},
            "involvedObject": {"apiVersion": f"{G}/{V}", "kind": "WorkOrder", "name": "o1", "namespace": namespace},
            "type": "Normal", "reason": "Due", "message": "test", "count": 1,
        },
    )  # fmt: skip
    forbidden(core.patch_namespaced_event, event.metadata.name, namespace, {"count": 2})
    forbidden(core.delete_namespaced_event, event.metadata.name, namespace)

    # Shipwright: create Builds and re-apply its own (server-side apply), create and cancel BuildRuns; no deletes.
    objs.create_namespaced_custom_object(SW, SWV, namespace, "builds", BUILD, field_manager="workorder-operator")
    objs.patch_namespaced_custom_object(
        SW, SWV, namespace, "builds", "app", BUILD,
        field_manager="workorder-operator", _content_type="application/apply-patch+yaml",
    )  # fmt: skip
    assert [b["metadata"]["name"] for b in objs.list_namespaced_custom_object(SW, SWV, namespace, "builds")["items"]]
    assert can_watch(objs.list_namespaced_custom_object, SW, SWV, namespace, "builds")
    run = {"apiVersion": f"{SW}/{SWV}", "kind": "BuildRun", "metadata": {"name": "app-1"},
           "spec": {"build": {"name": "app"}}}  # fmt: skip
    objs.create_namespaced_custom_object(SW, SWV, namespace, "buildruns", run)
    objs.get_namespaced_custom_object(SW, SWV, namespace, "buildruns", "app-1")
    assert can_watch(objs.list_namespaced_custom_object, SW, SWV, namespace, "buildruns")
    objs.patch_namespaced_custom_object(
        SW, SWV, namespace, "buildruns", "app-1", {"spec": {"state": "BuildRunCanceled"}},
        _content_type="application/merge-patch+json",
    )  # fmt: skip
    forbidden(objs.delete_namespaced_custom_object, SW, SWV, namespace, "buildruns", "app-1")
    forbidden(objs.delete_namespaced_custom_object, SW, SWV, namespace, "builds", "app")

    # Nothing else: no secrets, configmaps, pods; no lease written outside its namespace (it reads
    # the agents' presence leases everywhere).
    forbidden(core.read_namespaced_secret, "anything", namespace)
    forbidden(core.list_secret_for_all_namespaces)
    forbidden(core.create_namespaced_config_map, namespace, {"metadata": {"name": "c"}})
    forbidden(core.create_namespaced_pod, namespace,
              {"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "image": "busybox"}]}})  # fmt: skip
    coordination = client.CoordinationV1Api(api)
    lease = {"metadata": {"name": f"test-{uuid.uuid4().hex[:8]}"}, "spec": {"holderIdentity": "test"}}
    forbidden(coordination.create_namespaced_lease, namespace, lease)
    client.CoordinationV1Api(cluster.api).create_namespaced_lease(namespace, lease)
    coordination.list_lease_for_all_namespaces(label_selector="workorder.dev/presence=agent")
    assert can_watch(coordination.list_namespaced_lease, namespace)
    forbidden(
        coordination.patch_namespaced_lease, lease["metadata"]["name"], namespace, {"spec": {"holderIdentity": "x"}}
    )
    forbidden(coordination.delete_namespaced_lease, lease["metadata"]["name"], namespace)

    # The metrics port's reviews: who a scrape's token is, and whether it may get /metrics.
    review = client.AuthenticationV1Api(api).create_token_review({"spec": {"token": "not-a-token"}})
    assert review.status.authenticated is not True
    access = client.AuthorizationV1Api(api).create_subject_access_review(
        {"spec": {"user": "nobody", "nonResourceAttributes": {"path": "/metrics", "verb": "get"}}}
    )
    assert access.status.allowed is False

    # TTL: delete a finished order (last: the order is gone afterwards).
    objs.delete_namespaced_custom_object(G, V, namespace, P, "o1")


def test_metrics_reader_role(cluster: Cluster, installed: None) -> None:
    """Bound (cluster-wide: non-resource URLs), workorder-metrics-reader allows get /metrics, and
    nothing else."""
    user = f"scraper-{uuid.uuid4().hex[:8]}"
    rbac = client.RbacAuthorizationV1Api(cluster.api)
    binding = {
        "metadata": {"name": user},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "workorder-metrics-reader"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}],
    }
    rbac.create_cluster_role_binding(binding)
    try:
        authz = client.AuthorizationV1Api(cluster.api)

        def may(verb: str, path: str) -> bool:
            spec = {"user": user, "nonResourceAttributes": {"path": path, "verb": verb}}
            return bool(authz.create_subject_access_review({"spec": spec}).status.allowed)

        deadline = time.monotonic() + 20
        while not may("get", "/metrics"):
            assert time.monotonic() < deadline, "get /metrics never became allowed"
            time.sleep(0.1)
        assert not may("post", "/metrics")
        assert not may("get", "/debug/pprof/")
        objs = client.CustomObjectsApi(as_user(cluster, user))
        forbidden(objs.list_cluster_custom_object, G, V, P)
    finally:
        rbac.delete_cluster_role_binding(user)


def service_account_token(cluster: Cluster, namespace: str, name: str) -> str:
    """A token of a new ServiceAccount (the TokenRequest API), as a pod's projected token is."""
    core = client.CoreV1Api(cluster.api)
    core.create_namespaced_service_account(namespace, {"metadata": {"name": name}})
    request = {"spec": {"expirationSeconds": 600}}
    return str(core.create_namespaced_service_account_token(name, namespace, request).status.token)


def test_metrics_endpoint_asks_the_api_server(
    cluster: Cluster, installed: None, namespace: str, tmp_path: Path
) -> None:
    """The operator, run as its own ServiceAccount with the installed RBAC and the default (secure)
    metrics port: HTTPS only; the probes need no credentials; /metrics is 401 without a valid
    token, 403 for a ServiceAccount that may not get /metrics, 200 for one bound to
    workorder-metrics-reader."""
    operator = as_user(cluster, OPERATOR_USER, OPERATOR_GROUPS)
    wait_allowed(operator, "list", "workorders", namespace)
    port = free_port()
    op = OperatorProcess(
        cluster.user_kubeconfig(OPERATOR_USER, OPERATOR_GROUPS), tmp_path / "operator.log",
        f"--namespace={namespace}", "--no-leader-election", "--no-build-agent", f"--metrics-port={port}",
    )  # fmt: skip
    stranger = service_account_token(cluster, namespace, "stranger")
    prometheus = service_account_token(cluster, namespace, "prometheus")
    reader = f"metrics-reader-{namespace}"
    rbac = client.RbacAuthorizationV1Api(cluster.api)
    with op.running():
        assert scrape(port, "/healthz", tls=True)[0] == 200
        wait_for(lambda: scrape(port, "/readyz", tls=True)[0] == 200, timeout=10, what="readiness")
        with pytest.raises(OSError):  # not served in the clear
            scrape(port, "/healthz")
        status, body = scrape(port, tls=True)
        assert status == 401 and "workorder_" not in body, (status, body)
        assert scrape(port, tls=True, token="not-a-token")[0] == 401
        status, body = scrape(port, tls=True, token=stranger)
        assert status == 403 and f"system:serviceaccount:{namespace}:stranger" in body, (status, body)
        rbac.create_cluster_role_binding({
            "metadata": {"name": reader},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                        "name": "workorder-metrics-reader"},
            "subjects": [{"kind": "ServiceAccount", "name": "prometheus", "namespace": namespace}],
        })  # fmt: skip
        try:
            # The binding reaches the API server's authorizer through an informer (a refusal would
            # be kept up to 10 s, but this token was never refused).
            text = wait_for(
                lambda: (lambda r: r[1] if r[0] == 200 else None)(scrape(port, tls=True, token=prometheus)),
                timeout=30, interval=0.5, what="the bound ServiceAccount may scrape",
            )  # fmt: skip
            assert "# TYPE workorder_leader gauge" in text and sample(text, "workorder_leader") == 1
            # The stranger still may not; the probes still need nothing.
            assert scrape(port, tls=True, token=stranger)[0] == 403
            assert scrape(port, "/healthz", tls=True)[0] == 200
            assert scrape(port, "/readyz", tls=True)[0] == 200
        finally:
            rbac.delete_cluster_role_binding(reader)
    assert "cannot review" not in op.log()


def test_operator_leader_election_lease(cluster: Cluster, installed: None) -> None:
    api = as_user(cluster, OPERATOR_USER, OPERATOR_GROUPS)
    wait_allowed(api, "create", "leases", SYSTEM_NS, group="coordination.k8s.io")
    leases = client.CoordinationV1Api(api)
    name = f"test-{uuid.uuid4().hex[:8]}"
    try:
        leases.create_namespaced_lease(SYSTEM_NS, {"metadata": {"name": name}, "spec": {"holderIdentity": "pod-a"}})
        lease = leases.read_namespaced_lease(name, SYSTEM_NS)
        lease.spec.holder_identity = "pod-b"
        leases.replace_namespaced_lease(name, SYSTEM_NS, lease)
        # Its build agent's presence lease: renewed with a patch, withdrawn with a delete.
        leases.patch_namespaced_lease(name, SYSTEM_NS, {"spec": {"leaseDurationSeconds": 30}})
        leases.delete_namespaced_lease(name, SYSTEM_NS)
        forbidden(leases.create_namespaced_lease, "kube-system", {"metadata": {"name": name}, "spec": {}})
        forbidden(leases.delete_namespaced_lease, "kube-controller-manager", "kube-system")
    finally:
        with contextlib.suppress(client.ApiException):
            client.CoordinationV1Api(cluster.api).delete_namespaced_lease(name, SYSTEM_NS)


def test_agent_role(cluster: Cluster, installed: None, namespace: str) -> None:
    bind(cluster.api, namespace, "workorder-agent", "agent-1")
    api = as_user(cluster, "agent-1")
    wait_allowed(api, "patch", "workorders/status", namespace)
    create_order(cluster.api, namespace, "o1")
    objs = client.CustomObjectsApi(api)

    assert [o["metadata"]["name"] for o in objs.list_namespaced_custom_object(G, V, namespace, P)["items"]] == ["o1"]
    assert can_watch(objs.list_namespaced_custom_object, G, V, namespace, P)
    objs.get_namespaced_custom_object(G, V, namespace, P, "o1")
    assert noop_status_patch(objs, namespace, "o1")["status"]["phase"] == "Pending"

    body = {"apiVersion": f"{G}/{V}", "kind": "WorkOrder", "metadata": {"name": "o2"},
            "spec": {"workType": "test", "yamlContent": "a: 1\n"}}  # fmt: skip
    forbidden(objs.create_namespaced_custom_object, G, V, namespace, P, body)
    forbidden(objs.delete_namespaced_custom_object, G, V, namespace, P, "o1")
    forbidden(objs.patch_namespaced_custom_object, G, V, namespace, P, "o1", {"metadata": {"labels": {"x": "y"}}})
    current = objs.get_namespaced_custom_object_status(G, V, namespace, P, "o1")
    forbidden(objs.replace_namespaced_custom_object_status, G, V, namespace, P, "o1", current)
    forbidden(objs.create_namespaced_custom_object, SW, SWV, namespace, "builds", BUILD)
    forbidden(client.CoreV1Api(api).list_namespaced_secret, namespace)
    forbidden(client.CoreV1Api(api).read_namespaced_secret, "anything", namespace)
    # Its presence: announce, renew and withdraw its lease (the admission policy, not installed
    # here, keeps it to its own); see its peers' (list, watch) to divide the queue with them.
    leases = client.CoordinationV1Api(api)
    presence = {"metadata": {"name": "workorder-agent-x", "labels": {"workorder.dev/presence": "agent"}},
                "spec": {"holderIdentity": "x", "leaseDurationSeconds": 30}}  # fmt: skip
    leases.create_namespaced_lease(namespace, presence)
    leases.patch_namespaced_lease(
        "workorder-agent-x", namespace, {"spec": {"renewTime": "2026-01-01T00:00:00.000000Z"}}
    )
    leases.read_namespaced_lease("workorder-agent-x", namespace)
    assert [lease.metadata.name for lease in leases.list_namespaced_lease(namespace).items] == ["workorder-agent-x"]
    assert can_watch(leases.list_namespaced_lease, namespace)
    leases.delete_namespaced_lease("workorder-agent-x", namespace)
    forbidden(leases.create_namespaced_lease, "default", presence)
    # Bound in one namespace: nothing elsewhere.
    forbidden(objs.list_cluster_custom_object, G, V, P)
    forbidden(objs.list_namespaced_custom_object, G, V, "default", P)


def _lease(name: str, **labels: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": labels}, "spec": {"holderIdentity": "someone",
                                                                   "leaseDurationSeconds": 15}}  # fmt: skip


@pytest.mark.parametrize("scope", ["namespace", "cluster"])
def test_an_agent_writes_no_lease_but_its_presence(
    cluster: Cluster, installed: None, namespace: str, scope: str
) -> None:
    """The agent role's Lease rights reach presence Leases only (policy workorder-agent-leases):
    bound in one namespace or cluster-wide (as -A and spoke agents are), an agent can neither take
    the operator's leader Lease nor write a controller's or a node's, nor dress a Lease of its own
    up as one; its own presence still works."""
    user = f"agent-{scope}-{uuid.uuid4().hex[:6]}"
    admin = client.CoordinationV1Api(cluster.api)
    rbac = client.RbacAuthorizationV1Api(cluster.api)
    # The Leases an agent must not touch (made here, so a broken policy spoils nothing real): the
    # operator's leader Lease in its own namespace, and, for a cluster-wide agent, a controller's
    # in kube-system and a node's in kube-node-lease.
    victims = [(namespace, "workorder-operator")]
    if scope == "cluster":
        victims += [(SYSTEM_NS, f"workorder-operator-{user}"), ("kube-system", f"controller-{user}"),
                    ("kube-node-lease", f"node-{user}")]  # fmt: skip
    binding = f"{user}-workorder-agent"
    try:
        for ns, name in victims:
            admin.create_namespaced_lease(ns, _lease(name))
        if scope == "cluster":
            rbac.create_cluster_role_binding({
                "metadata": {"name": binding},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "workorder-agent"},
                "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}],
            })  # fmt: skip
        else:
            bind(cluster.api, namespace, "workorder-agent", user)
        api = as_user(cluster, user)
        wait_allowed(api, "announce", "presences", namespace)
        leases = client.CoordinationV1Api(api)
        with admission_policies(cluster.kubeconfig, DEPLOY / "base" / "admission.yaml"):

            def enforced() -> bool:
                try:
                    leases.create_namespaced_lease(namespace, _lease("probe"))
                except ApiException as exc:
                    return exc.status == 403 and "workorder-agent-leases" in (exc.body or "")
                leases.delete_namespaced_lease("probe", namespace)
                return False

            wait_for(enforced, timeout=30, interval=0.5, what="the lease policy to be enforced")
            words = ("workorder-agent-leases", "writes only presence Leases")
            take = {"spec": {"holderIdentity": user, "leaseDurationSeconds": 3600}}
            # Labelled as presence it would also fall to workorder-agent-presence: either refusal will do.
            dressed = {"metadata": {"labels": {fleet.PRESENCE_LABEL: fleet.PRESENCE_VALUE}}}
            for ns, name in victims:
                refused_by(partial(leases.patch_namespaced_lease, name, ns, take), *words, f"Lease {ns}/{name}")
                refused_by(partial(leases.patch_namespaced_lease, name, ns, dressed), "workorder-agent-")
                refused_by(partial(leases.delete_namespaced_lease, name, ns), *words)
                assert admin.read_namespaced_lease(name, ns).spec.holder_identity == "someone"
            # Nor a Lease of its own that is not a presence, nor one labelled as presence under a
            # name that is no agent's (the leader Lease's, before the operator made it).
            refused_by(lambda: leases.create_namespaced_lease(namespace, _lease("mine")), *words)
            # A true presence body (so workorder-agent-presence has nothing to say) under another name.
            me = AgentIdentity(str(uuid.uuid4()))
            body = fleet.lease_body(me, work_types=["test"], user=user, namespaces=[namespace], duration=30,
                                    now=utcnow(), acquired=True)  # fmt: skip
            squat = {**body, "metadata": {**body["metadata"], "name": "workorder-operator-2"}}
            refused_by(lambda: leases.create_namespaced_lease(namespace, squat), *words)
            # Its own presence, under its own name: announce, renew, withdraw.
            leases.create_namespaced_lease(namespace, body)
            leases.patch_namespaced_lease(fleet.lease_name(me.id), namespace, {"spec": {"leaseDurationSeconds": 20}})
            leases.delete_namespaced_lease(fleet.lease_name(me.id), namespace)
        if scope == "namespace":  # and nothing at all beyond its namespace
            forbidden(leases.create_namespaced_lease, "kube-system", _lease("mine"))
    finally:
        for ns, name in victims:
            with contextlib.suppress(ApiException):
                admin.delete_namespaced_lease(name, ns)
        if scope == "cluster":
            with contextlib.suppress(ApiException):
                rbac.delete_cluster_role_binding(binding)


def test_view_role(cluster: Cluster, installed: None, namespace: str) -> None:
    bind(cluster.api, namespace, "workorder-view", "viewer")
    api = as_user(cluster, "viewer")
    wait_allowed(api, "list", "workorders", namespace)
    create_order(cluster.api, namespace, "o1")
    objs = client.CustomObjectsApi(api)

    assert [o["metadata"]["name"] for o in objs.list_namespaced_custom_object(G, V, namespace, P)["items"]] == ["o1"]
    objs.get_namespaced_custom_object(G, V, namespace, P, "o1")
    objs.get_namespaced_custom_object_status(G, V, namespace, P, "o1")
    assert can_watch(objs.list_namespaced_custom_object, G, V, namespace, P)

    forbidden(objs.patch_namespaced_custom_object_status, G, V, namespace, P, "o1", {"status": {"phase": "Pending"}})
    body = {"apiVersion": f"{G}/{V}", "kind": "WorkOrder", "metadata": {"name": "o2"},
            "spec": {"workType": "test", "yamlContent": "a: 1\n"}}  # fmt: skip
    forbidden(objs.create_namespaced_custom_object, G, V, namespace, P, body)
    forbidden(objs.delete_namespaced_custom_object, G, V, namespace, P, "o1")


def test_edit_role(cluster: Cluster, installed: None, namespace: str) -> None:
    bind(cluster.api, namespace, "workorder-edit", "editor")
    api = as_user(cluster, "editor")
    wait_allowed(api, "create", "workorders", namespace)
    objs = client.CustomObjectsApi(api)

    create_order(api, namespace, "o1")
    create_order(api, namespace, "o2")
    objs.patch_namespaced_custom_object(G, V, namespace, P, "o1", {"metadata": {"labels": {"team": "a"}}})
    noop_status_patch(objs, namespace, "o1")  # requeue rights
    objs.delete_namespaced_custom_object(G, V, namespace, P, "o1")
    objs.delete_collection_namespaced_custom_object(G, V, namespace, P)
    # Only WorkOrders: the built-in edit role grants the rest when aggregated into it.
    forbidden(objs.create_namespaced_custom_object, SW, SWV, namespace, "builds", BUILD)
    forbidden(client.CoreV1Api(api).list_namespaced_secret, namespace)
    forbidden(objs.list_cluster_custom_object, G, V, P)


def test_builtin_roles_aggregate_ours(cluster: Cluster, installed: None, namespace: str) -> None:
    """The real aggregation: editors and viewers of a namespace get our rules through the built-in
    `edit`/`view` roles. Needs kube-controller-manager's clusterrole-aggregation controller."""
    rbac = client.RbacAuthorizationV1Api(cluster.api)
    if not rbac.read_cluster_role("view").rules:
        pytest.skip(
            "the clusterrole-aggregation controller does not run (the built-in `view` role is empty); "
            "workorder-edit/-view are tested bound directly and their aggregation labels are checked"
        )

    def aggregated() -> bool:
        return all(
            any(G in (r.api_groups or []) for r in rbac.read_cluster_role(role).rules or [])
            for role in ("view", "edit", "admin")
        )

    deadline = time.monotonic() + 30
    while not aggregated():
        assert time.monotonic() < deadline, "workorder-edit/-view were not aggregated into admin/edit/view"
        time.sleep(0.2)
    bind(cluster.api, namespace, "edit", "ns-editor")
    bind(cluster.api, namespace, "view", "ns-viewer")
    editor, viewer = as_user(cluster, "ns-editor"), as_user(cluster, "ns-viewer")
    wait_allowed(editor, "create", "workorders", namespace)
    wait_allowed(viewer, "list", "workorders", namespace)
    create_order(editor, namespace, "o1")
    noop_status_patch(client.CustomObjectsApi(editor), namespace, "o1")
    viewing = client.CustomObjectsApi(viewer)
    assert [o["metadata"]["name"] for o in viewing.list_namespaced_custom_object(G, V, namespace, P)["items"]] == ["o1"]
    forbidden(viewing.patch_namespaced_custom_object_status, G, V, namespace, P, "o1", {"status": {"phase": "Pending"}})
    forbidden(viewing.delete_namespaced_custom_object, G, V, namespace, P, "o1")
    client.CustomObjectsApi(editor).delete_namespaced_custom_object(G, V, namespace, P, "o1")


# --- Argo CD health check -----------------------------------------------------------------------


HEALTH_KEY = "resource.customizations.health.workorder.dev_WorkOrder"


def test_argocd_cm_patch_carries_the_health_script() -> None:
    patch = yaml.safe_load((DEPLOY / "argocd-cm-patch.yaml").read_text())
    assert patch["kind"] == "ConfigMap" and patch["metadata"]["name"] == "argocd-cm"
    assert patch["data"][HEALTH_KEY] == (DEPLOY / "argocd-health.lua").read_text()
    for kustomization in (DEPLOY / "kustomization.yaml", DEPLOY / "base" / "kustomization.yaml"):
        resources = yaml.safe_load(kustomization.read_text())["resources"]
        assert not [r for r in resources if "argocd" in r], f"{kustomization} must not install Argo CD's config"


def _condition(ctype: str, status: str, message: str = "") -> dict[str, str]:
    return {"type": ctype, "status": status, "reason": "Test", "message": message}


@pytest.mark.parametrize(
    ("status", "health", "message"),
    [
        (None, "Progressing", "Waiting for an agent to claim and run the WorkOrder"),
        ({"phase": "Pending"}, "Progressing", "Waiting for an agent to claim and run the WorkOrder"),
        ({"conditions": [_condition("Succeeded", "Unknown", "claimed by agent x"), _condition("Reconciling", "True")]},
         "Progressing", "claimed by agent x"),
        ({"conditions": [_condition("Succeeded", "True", "done")]}, "Healthy", "done"),
        ({"conditions": [_condition("Succeeded", "False", "boom"), _condition("Stalled", "True", "out of retries")]},
         "Degraded", "out of retries"),
        ({"conditions": [_condition("Succeeded", "False", "boom")]}, "Degraded", "boom"),
        ({"conditions": [_condition("Stalled", "True")]}, "Degraded", "WorkOrder failed"),
    ],
)  # fmt: skip
def test_argocd_health_script(status: dict[str, Any] | None, health: str, message: str) -> None:
    lupa = pytest.importorskip("lupa", reason="runs the Lua script with lupa when it is installed")
    lua = lupa.LuaRuntime()

    def table(value: Any) -> Any:
        if isinstance(value, dict):
            return lua.table_from({k: table(v) for k, v in value.items()})
        if isinstance(value, list):
            return lua.table_from([table(v) for v in value])
        return value

    obj: dict[str, Any] = {"apiVersion": f"{G}/{V}", "kind": "WorkOrder", "metadata": {"name": "o"}}
    if status is not None:
        obj["status"] = status
    lua.globals().obj = table(obj)
    result = lua.execute((DEPLOY / "argocd-health.lua").read_text())
    assert (result["status"], result["message"]) == (health, message)
