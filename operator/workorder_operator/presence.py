"""The adapter for presence Leases (`coordination.k8s.io/v1`): announce, renew, withdraw, list,
watch. The lease format and every decision about it are `fleet`'s; answers are mapped onto the
error tree by `kube.translated`, as every other call."""

from __future__ import annotations

from typing import Any

from kubernetes import client

from workorder_operator.errors import Conflict, NotFound
from workorder_operator.fleet import PRESENCE_LABEL, PRESENCE_VALUE
from workorder_operator.kube import OrderWatch, list_objects, timeout, translated, watch_objects

GROUP, VERSION, PLURAL = "coordination.k8s.io", "v1", "leases"
SELECTOR = f"{PRESENCE_LABEL}={PRESENCE_VALUE}"


class PresenceLeases:
    """Presence leases in any namespace (only those labelled as such are listed and watched)."""

    def __init__(self, api: client.ApiClient, field_manager: str) -> None:
        # The generic client speaks any API group as plain JSON, as the WorkOrder adapter does.
        self.objects = client.CustomObjectsApi(api)
        self.field_manager = field_manager

    def put(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        """Renew the lease (a merge patch), or create it when it is not there (first
        announcement, or deleted meanwhile). Returns the stored lease."""
        name = body["metadata"]["name"]
        for _ in range(3):
            try:
                with translated():
                    patched: dict[str, Any] = self.objects.patch_namespaced_custom_object(
                        GROUP, VERSION, namespace, PLURAL, name, body, field_manager=self.field_manager,
                        _content_type="application/merge-patch+json", _request_timeout=timeout(),
                    )  # fmt: skip
                return patched
            except NotFound:
                pass
            try:
                with translated():
                    created: dict[str, Any] = self.objects.create_namespaced_custom_object(
                        GROUP, VERSION, namespace, PLURAL, body, field_manager=self.field_manager,
                        _request_timeout=timeout(),
                    )  # fmt: skip
                return created
            except Conflict:  # created by our previous incarnation meanwhile: patch it
                continue
        raise Conflict(f"presence lease {namespace}/{name} keeps appearing and vanishing")

    def delete(self, namespace: str, name: str, uid: str) -> None:
        """Withdraw exactly this lease (uid precondition: never a successor's of the same name)."""
        try:
            with translated():
                self.objects.delete_namespaced_custom_object(
                    GROUP, VERSION, namespace, PLURAL, name,
                    body=client.V1DeleteOptions(preconditions=client.V1Preconditions(uid=uid)),
                    _request_timeout=timeout(),
                )  # fmt: skip
        except NotFound:
            pass

    def list(self, namespace: str | None = None) -> tuple[list[dict[str, Any]], str]:
        """Every presence lease (in `namespace`, or all) and the list's resourceVersion."""
        return list_objects(self.objects, (GROUP, VERSION, PLURAL), namespace, label_selector=SELECTOR)

    def watch(self, namespace: str | None, resource_version: str, timeout_seconds: int = 300) -> OrderWatch:
        """One watch request over presence leases from `resource_version` (from `list`)."""
        return watch_objects(
            self.objects, (GROUP, VERSION, PLURAL), namespace, resource_version, timeout_seconds,
            label_selector=SELECTOR,
        )  # fmt: skip
