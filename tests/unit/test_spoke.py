"""A build agent in a spoke cluster: whose a Build or BuildRun is (`shipwright.Ownership`), which
ones the sweep deletes, and the command line of `workorder-build-agent`. No cluster: the sweep
runs against a stand-in for the Shipwright adapter."""

from __future__ import annotations

from typing import Any

import pytest

from workorder_operator import build, standalone
from workorder_operator.buildagent import BuildExecutor
from workorder_operator.errors import WorkOrderError
from workorder_operator.kube import ApiClient
from workorder_operator.model import WorkOrder, order_body
from workorder_operator.shipwright import (
    BUILDRUNS,
    BUILDS,
    HUB_ANNOTATION,
    ORDER_NAME_ANNOTATION,
    ORDER_UID_LABEL,
    Ownership,
)

AGENT = "3d8e4f1a-5b6c-4d7e-8f90-a1b2c3d4e5f6"
UID = "0b1c2d3e-0000-4000-8000-000000000001"
OTHER_UID = "0b1c2d3e-0000-4000-8000-000000000002"


def order(uid: str = UID, name: str = "app") -> WorkOrder:
    body = order_body(name, workType="build", yamlContent="a: 1\n")
    body["metadata"].update(namespace="team-a", uid=uid, resourceVersion="1", creationTimestamp="2026-01-01T00:00:00Z")
    return WorkOrder.from_body(body)


def marked(ownership: Ownership, of: WorkOrder, name: str = "x", **extra: Any) -> dict[str, Any]:
    meta = ownership.mark({"name": name, "namespace": of.namespace, **extra}, of)
    return {"metadata": {**meta, "uid": f"uid-{name}", "resourceVersion": "7"}}


def test_in_one_cluster_an_owner_reference_says_whose_it_is() -> None:
    local = Ownership()
    obj = marked(local, order())
    assert obj["metadata"]["ownerReferences"][0]["uid"] == UID
    assert ORDER_UID_LABEL not in (obj["metadata"].get("labels") or {})
    assert local.owns(obj, order()) and not local.owns(obj, order(OTHER_UID))
    assert not local.ours(obj)  # nothing to sweep: garbage collection does it


def test_in_a_spoke_the_uid_label_and_the_hub_say_whose_it_is() -> None:
    spoke = Ownership(hub="hub-1")
    obj = marked(spoke, order(), labels={"team": "a"}, annotations={"note": "kept"})
    meta = obj["metadata"]
    assert "ownerReferences" not in meta
    assert meta["labels"] == {"team": "a", ORDER_UID_LABEL: UID}
    assert meta["annotations"] == {"note": "kept", HUB_ANNOTATION: "hub-1", ORDER_NAME_ANNOTATION: "app"}
    assert spoke.owns(obj, order()) and spoke.ours(obj)
    # Another order's, another hub's, or unmarked: never ours.
    assert not spoke.owns(obj, order(OTHER_UID))
    assert not Ownership(hub="hub-2").owns(obj, order()) and not Ownership(hub="hub-2").ours(obj)
    assert not Ownership().owns(obj, order())
    assert not spoke.owns({"metadata": {"labels": {ORDER_UID_LABEL: UID}}}, order())
    assert spoke.describe(obj) == f"order uid {UID} of hub hub-1"
    assert spoke.describe({"metadata": {}}) == "no owner"


class FakeShipwright:
    """The adapter's listing and deleting, over a fixed set of marked objects."""

    def __init__(self, objects: dict[str, list[dict[str, Any]]]) -> None:
        self.objects = objects
        self.deleted: list[tuple[str, str]] = []

    def marked(self, plural: str, namespace: str | None = None) -> list[dict[str, Any]]:
        return [o for o in self.objects[plural] if namespace in (None, o["metadata"]["namespace"])]

    def delete(self, plural: str, obj: dict[str, Any]) -> bool:
        self.deleted.append((plural, obj["metadata"]["name"]))
        return True


def sweeper(objects: dict[str, list[dict[str, Any]]]) -> tuple[BuildExecutor, FakeShipwright]:
    executor = BuildExecutor(ApiClient(), "test", spoke=ApiClient(), hub="hub-1")
    fake = FakeShipwright(objects)
    executor.shipwright = fake  # type: ignore[assignment]
    return executor, fake


def test_the_sweep_deletes_only_what_belongs_to_orders_the_hub_no_longer_has() -> None:
    spoke = Ownership(hub="hub-1")
    live, gone = order(UID, "live"), order(OTHER_UID, "gone")
    executor, fake = sweeper({
        BUILDRUNS: [marked(spoke, live, "live-1"), marked(spoke, gone, "gone-1")],
        BUILDS: [marked(spoke, live, "live-app"), marked(spoke, gone, "gone-app")],
    })  # fmt: skip
    asked: list[str] = []

    def live_uids(namespace: str) -> set[str]:
        asked.append(namespace)
        return {UID}

    assert executor.sweep(live_uids) == 2
    assert fake.deleted == [(BUILDRUNS, "gone-1"), (BUILDS, "gone-app")]
    assert asked == ["team-a"]  # one look at the hub per namespace


def test_the_sweep_deletes_nothing_where_the_hub_cannot_say() -> None:
    spoke = Ownership(hub="hub-1")
    executor, fake = sweeper({BUILDRUNS: [marked(spoke, order(OTHER_UID), "gone-1")], BUILDS: []})

    def unknown(namespace: str) -> set[str]:
        raise WorkOrderError("forbidden")

    assert executor.sweep(unknown) == 0
    assert fake.deleted == []


def test_a_spoke_needs_the_hubs_name_and_only_a_spoke_does() -> None:
    with pytest.raises(ValueError, match="hub's name"):
        BuildExecutor(ApiClient(), "test", spoke=ApiClient())
    with pytest.raises(ValueError, match="hub's name"):
        BuildExecutor(ApiClient(), "test", hub="hub-1")


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        ([], "--id (or $WORKORDER_AGENT_ID) is required"),
        (["--id", "not-a-uuid"], "--id"),
        (
            ["--id", AGENT, "--annotation", "novalue"],
            "--annotation: expected KEY=VALUE",
        ),
        (["--id", AGENT, "--hub-name", "h"], "need --hub-kubeconfig"),
        (["--id", AGENT, "--cleanup-interval", "0"], "--cleanup-interval must be"),
    ],
)
def test_bad_command_lines_name_the_flag(
    argv: list[str], says: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("WORKORDER_AGENT_ID", raising=False)
    with pytest.raises(SystemExit) as exit:
        standalone.parse_args(argv)
    assert exit.value.code == 2
    assert says in capsys.readouterr().err


def test_the_command_line_of_a_spoke_agent() -> None:
    args = standalone.parse_args([
        "--hub-kubeconfig", "hub.kubeconfig", "--id", AGENT,
        "--label", "cluster=eu-1", "--annotation", "zone=a=b", "-n", "team-a", "-n", "team-b",
    ])  # fmt: skip
    assert args.hub_kubeconfig == "hub.kubeconfig"
    assert args.label == ["cluster=eu-1"] and args.annotation == {"zone": "a=b"}
    assert args.namespace == ["team-a", "team-b"] and args.cleanup_interval == 60.0


def test_a_spoke_namespace_opts_in_to_one_hub_by_a_label() -> None:
    assert build.hub_label("hub-a") == "hub-a"
    assert build.hub_label("https://10.0.0.1:6443") == "https-10.0.0.1-6443"  # a URL, the default name
    assert len(build.hub_label("h" * 300)) <= 63
    assert build.opted_in({build.HUB_OPT_IN_LABEL: "hub-a"}, "hub-a")
    assert not build.opted_in({build.HUB_OPT_IN_LABEL: "hub-b"}, "hub-a")
    assert not build.opted_in({}, "hub-a")
    told = build.not_opted_in("team-a", "https://10.0.0.1:6443")
    assert "kubectl label namespace team-a workorder.dev/builds-for-hub=https-10.0.0.1-6443" in told
