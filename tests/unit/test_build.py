"""Work type `build` (SPEC.md): which yamlContent may run, BuildRun names, and BuildRun outcomes."""

from __future__ import annotations

import hashlib
import re
from typing import Any

import pytest

from devcluster import envtest
from tests.tekton import KANIKO_BUILD as KANIKO_TEMPLATE
from workorder_operator.build import (
    MAX_DOCUMENTS,
    NOT_STARTED_REASON,
    PERMANENT_REASONS,
    RETRYABLE_REASONS,
    SHIPWRIGHT_API_VERSION,
    UNDISCLOSED_REASONS,
    BuildPlan,
    ContentError,
    RunOutcome,
    buildrun_name,
    buildrun_outcome,
    buildrun_started,
    label_value,
    parse_content,
    registration,
)

NS = "team-a"

# Shipwright's samples/v1beta1/build/build_kaniko_cr.yaml (v0.20), as a user would paste it.
KANIKO_BUILD = "---\n" + KANIKO_TEMPLATE.format(name="kaniko-golang-build")


def build_doc(name: str = "app", extra_metadata: str = "", rest: str = "") -> str:
    return f"""\
apiVersion: shipwright.io/v1beta1
kind: Build
metadata:
  name: {name}
{extra_metadata}spec:
  strategy:
    name: buildpacks-v3
    kind: ClusterBuildStrategy
  output:
    image: registry.example/{name}
{rest}"""


SEED_WORKORDER = """\
apiVersion: workorder.dev/v1alpha1
kind: WorkOrder
metadata:
  name: seed
spec:
  buildRef:
    name: existing-build
"""


def refused(content: str, namespace: str = NS) -> str:
    with pytest.raises(ContentError) as info:
        parse_content(content, namespace)
    return str(info.value)


# --- parse_content: what runs ----------------------------------------------------------------


def test_shipwright_sample_build_runs() -> None:
    plan = parse_content(KANIKO_BUILD, NS)
    assert isinstance(plan, BuildPlan)
    assert plan.run == "kaniko-golang-build"
    (build,) = plan.builds
    assert build["apiVersion"] == SHIPWRIGHT_API_VERSION
    assert build["kind"] == "Build"
    assert build["metadata"] == {"name": "kaniko-golang-build", "namespace": NS}
    # Everything else is kept as written.
    assert build["spec"] == {
        "source": {
            "type": "Git",
            "git": {"url": "https://github.com/shipwright-io/sample-go"},
            "contextDir": "docker-build",
        },
        "strategy": {"name": "kaniko", "kind": "ClusterBuildStrategy"},
        "retention": {"atBuildDeletion": True},
        "output": {"image": "registry.example.com/build-examples/kaniko-golang-build"},
    }


def test_namespace_is_filled_in() -> None:
    (build,) = parse_content(build_doc(), "other-team").builds
    assert build["metadata"]["namespace"] == "other-team"


def test_the_order_namespace_named_explicitly_is_accepted() -> None:
    (build,) = parse_content(build_doc(extra_metadata=f"  namespace: {NS}\n"), NS).builds
    assert build["metadata"]["namespace"] == NS


def test_status_is_stripped_and_other_metadata_kept() -> None:
    content = build_doc(
        extra_metadata="  labels:\n    team: a\n  annotations:\n    note: kept\n",
        rest='status:\n  registered: "True"\n  reason: Succeeded\n',
    )
    (build,) = parse_content(content, NS).builds
    assert "status" not in build
    assert build["metadata"] == {
        "name": "app",
        "namespace": NS,
        "labels": {"team": "a"},
        "annotations": {"note": "kept"},
    }


def test_builds_are_independent_copies() -> None:
    first = parse_content(KANIKO_BUILD, NS)
    first.builds[0]["spec"]["strategy"]["name"] = "changed"
    assert parse_content(KANIKO_BUILD, NS).builds[0]["spec"]["strategy"]["name"] == "kaniko"


def test_multiple_builds_are_all_applied_in_order_and_the_last_runs() -> None:
    content = "---\n".join([build_doc("base"), build_doc("middle"), build_doc("app")])
    plan = parse_content(content, NS)
    assert [b["metadata"]["name"] for b in plan.builds] == ["base", "middle", "app"]
    assert all(b["metadata"]["namespace"] == NS for b in plan.builds)
    assert plan.run == "app"


def test_a_build_may_appear_only_once() -> None:
    content = "---\n".join([build_doc("app"), build_doc("other"), build_doc("app")])
    assert refused(content) == ('document 3 (Build "app"): repeats the Build of document 1; each Build may appear once')


def test_workorder_build_ref_runs_an_existing_build() -> None:
    assert parse_content(SEED_WORKORDER, NS) == BuildPlan(builds=(), run="existing-build")


def test_workorder_of_any_api_version_is_read() -> None:
    content = SEED_WORKORDER.replace("workorder.dev/v1alpha1", "example.com/v9")
    assert parse_content(content, NS).run == "existing-build"
    assert parse_content(SEED_WORKORDER.replace("apiVersion: workorder.dev/v1alpha1\n", ""), NS).run == (
        "existing-build"
    )


@pytest.mark.parametrize("order", ["workorder-first", "build-first"])
def test_workorder_build_ref_is_used_only_without_a_build(order: str) -> None:
    documents = [SEED_WORKORDER, build_doc("app")]
    if order == "build-first":
        documents.reverse()
    plan = parse_content("---\n".join(documents), NS)
    assert plan.run == "app"
    assert [b["metadata"]["name"] for b in plan.builds] == ["app"]


def test_workorder_in_the_order_namespace_is_accepted() -> None:
    content = SEED_WORKORDER.replace("  name: seed\n", f"  name: seed\n  namespace: {NS}\n")
    assert parse_content(content, NS).run == "existing-build"


@pytest.mark.parametrize(
    "spec",
    [
        "spec: {}\n",
        "spec:\n  buildRef: {}\n",
        "spec:\n  buildRef:\n    name: ''\n",
        "spec:\n  buildRef:\n    name: 5\n",
        "spec:\n  buildRef: existing-build\n",
        "",
    ],
    ids=["no-buildRef", "no-name", "empty-name", "number", "not-a-mapping", "no-spec"],
)
def test_workorder_without_build_ref_is_refused(spec: str) -> None:
    content = f"apiVersion: workorder.dev/v1alpha1\nkind: WorkOrder\n{spec}"
    assert refused(content) == "document 1 (WorkOrder): spec.buildRef.name is missing"


def test_workorder_without_build_ref_is_refused_even_beside_a_build() -> None:
    content = build_doc() + "---\nkind: WorkOrder\nmetadata:\n  name: seed\nspec: {}\n"
    assert refused(content) == 'document 2 (WorkOrder "seed"): spec.buildRef.name is missing'


def test_workorder_build_ref_must_be_a_valid_name() -> None:
    content = SEED_WORKORDER.replace("existing-build", "Existing_Build")
    assert refused(content) == (
        "document 1 (WorkOrder \"seed\"): spec.buildRef.name 'Existing_Build' is not a valid Build name"
    )


def test_timestamps_stay_strings() -> None:
    (build,) = parse_content(build_doc(extra_metadata="  annotations:\n    since: 2024-01-02\n"), NS).builds
    assert build["metadata"]["annotations"] == {"since": "2024-01-02"}


# --- parse_content: empty documents and numbering --------------------------------------------


def test_empty_and_comment_only_documents_are_skipped_but_counted() -> None:
    content = "---\n# just a note\n---\n\n---\n" + build_doc("app") + "---\n# trailing\n"
    plan = parse_content(content, NS)
    assert plan.run == "app"
    assert len(plan.builds) == 1
    # The same layout with a bad document where the Build was: it is the 3rd document.
    assert refused("---\n# just a note\n---\n\n---\nkind: ConfigMap\n").startswith("document 3: kind ConfigMap")


def test_a_leading_comment_section_counts_as_a_document() -> None:
    # A licence header above the first `---` is what a reader sees as document 1.
    content = "# Copyright the authors\n# SPDX-License-Identifier: Apache-2.0\n---\nkind: ConfigMap\n"
    assert refused(content).startswith("document 2: kind ConfigMap")


def test_a_leading_directive_is_not_a_document() -> None:
    assert refused("%YAML 1.1\n---\nkind: ConfigMap\n").startswith("document 1: kind ConfigMap")


def test_documents_are_numbered_without_a_leading_marker() -> None:
    content = build_doc("app") + "---\n" + build_doc("two") + "---\napiVersion: v1\nkind: Secret\n"
    assert refused(content).startswith("document 3: kind Secret (apiVersion v1)")


@pytest.mark.parametrize("content", ["", "   \n\n", "# only a comment\n", "---\n", "---\n# c\n---\n"])
def test_nothing_runnable_is_refused(content: str) -> None:
    assert refused(content) == "no Build document and no WorkOrder spec.buildRef: nothing to build"


# --- parse_content: what is refused ----------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "api_version"),
    [
        ("ConfigMap", "v1"),
        ("Secret", "v1"),
        ("Pod", "v1"),
        ("ServiceAccount", "v1"),
        ("Namespace", "v1"),
        ("Deployment", "apps/v1"),
        ("ClusterRoleBinding", "rbac.authorization.k8s.io/v1"),
        ("Role", "rbac.authorization.k8s.io/v1"),
        ("CustomResourceDefinition", "apiextensions.k8s.io/v1"),
        ("BuildRun", "shipwright.io/v1beta1"),
        ("BuildStrategy", "shipwright.io/v1beta1"),
        ("ClusterBuildStrategy", "shipwright.io/v1beta1"),
        ("TaskRun", "tekton.dev/v1"),
        ("build", "shipwright.io/v1beta1"),  # kinds are case-sensitive
    ],
)
def test_other_kinds_are_refused(kind: str, api_version: str) -> None:
    content = f"apiVersion: {api_version}\nkind: {kind}\nmetadata:\n  name: x\n"
    assert refused(content) == (
        f"document 1: kind {kind} (apiVersion {api_version}) is not allowed: only shipwright.io/v1beta1 "
        "Build documents (and a WorkOrder with spec.buildRef) may appear"
    )


def test_another_kind_beside_a_build_refuses_the_whole_content() -> None:
    content = build_doc() + "---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: sneaky\n"
    assert refused(content).startswith("document 2: kind ConfigMap (apiVersion v1) is not allowed")


@pytest.mark.parametrize("content", ["metadata:\n  name: x\n", "{}\n", "kind: 7\n", "kind: ''\n"])
def test_a_document_without_kind_is_refused(content: str) -> None:
    assert refused(content).startswith("document 1: kind (none) (apiVersion (none)) is not allowed")


@pytest.mark.parametrize(
    ("content", "shown"),
    [("- a\n- b\n", "list"), ("just text\n", "string"), ("42\n", "number"), ("true\n", "boolean")],
)
def test_a_document_that_is_not_a_mapping_is_refused(content: str, shown: str) -> None:
    assert refused(content) == f"document 1: is a {shown}, not a mapping"


def test_cross_namespace_build_is_refused() -> None:
    content = build_doc() + "---\n" + build_doc("app2", extra_metadata="  namespace: other\n")
    assert refused(content) == (
        'document 2 (Build "app2"): names namespace "other", but builds run in the WorkOrder\'s namespace "team-a"'
    )


def test_cross_namespace_workorder_is_refused() -> None:
    content = SEED_WORKORDER.replace("  name: seed\n", "  name: seed\n  namespace: kube-system\n")
    assert refused(content) == (
        'document 1 (WorkOrder "seed"): names namespace "kube-system", '
        'but builds run in the WorkOrder\'s namespace "team-a"'
    )


def test_cross_namespace_workorder_is_refused_even_when_a_build_runs() -> None:
    content = build_doc() + "---\n" + SEED_WORKORDER.replace("  name: seed\n", "  name: seed\n  namespace: other\n")
    assert refused(content).startswith('document 2 (WorkOrder "seed"): names namespace "other"')


@pytest.mark.parametrize(
    "metadata",
    ["metadata:\n  labels: {a: b}\n", "metadata: {}\n", "metadata:\n  name: ''\n", "metadata:\n  name:\n", ""],
    ids=["no-name", "empty-metadata", "empty-name", "null-name", "no-metadata"],
)
def test_build_without_name_is_refused(metadata: str) -> None:
    content = f"apiVersion: shipwright.io/v1beta1\nkind: Build\n{metadata}spec: {{}}\n"
    assert refused(content) == "document 1 (Build): a Build without metadata.name"


def test_build_name_must_be_a_string() -> None:
    content = "apiVersion: shipwright.io/v1beta1\nkind: Build\nmetadata:\n  name: 7\n"
    assert refused(content) == "document 1 (Build): a Build without metadata.name"


def test_build_with_generate_name_only_is_refused() -> None:
    content = "apiVersion: shipwright.io/v1beta1\nkind: Build\nmetadata:\n  generateName: app-\n"
    assert refused(content) == "document 1 (Build): a Build without metadata.name"


def test_build_metadata_must_be_a_mapping() -> None:
    content = "apiVersion: shipwright.io/v1beta1\nkind: Build\nmetadata: [a]\n"
    assert refused(content) == "document 1 (Build): metadata is not a mapping"


@pytest.mark.parametrize(
    "name",
    ["App", "my_app", "-app", "app-", "app..x", ".app", "app name", "ü", "a" * 254],
)
def test_build_with_invalid_name_is_refused(name: str) -> None:
    message = refused(build_doc(name))
    assert message.startswith("document 1 (Build ")
    assert "metadata.name is not a valid name" in message


@pytest.mark.parametrize("name", ["a", "app", "app-1", "my.app.v2", "0app", "a" * 253])
def test_build_with_valid_name_is_accepted(name: str) -> None:
    assert parse_content(build_doc(name), NS).run == name


@pytest.mark.parametrize(
    ("api_version_line", "shown"),
    [
        ("apiVersion: shipwright.io/v1alpha1\n", "shipwright.io/v1alpha1"),
        ("apiVersion: shipwright.io/v1\n", "shipwright.io/v1"),
        ("apiVersion: build.dev/v1alpha1\n", "build.dev/v1alpha1"),
        ("", "(none)"),
    ],
)
def test_build_of_unsupported_api_version_is_refused(api_version_line: str, shown: str) -> None:
    content = f"{api_version_line}kind: Build\nmetadata:\n  name: app\nspec: {{}}\n"
    assert refused(content) == (f'document 1 (Build "app"): unsupported apiVersion {shown}; use shipwright.io/v1beta1')


def test_unparsable_yaml_names_the_line() -> None:
    content = build_doc() + "---\nkind: Build\nmetadata:\n  name: [unclosed\n"
    message = refused(content)
    assert message.startswith("yamlContent is not valid YAML: ")
    assert message.endswith("(line 15)")


@pytest.mark.parametrize(
    ("content", "line"),
    [
        ("a: b: c\n", 1),
        ("kind: Build\n  bad indent: x\n", 2),
        ("kind: Build\nspec:\n\t- tab\n", 3),
        ('a: "unterminated\n', 2),
        ("a: 1\nb: !custom x\n", 2),  # unknown tags are not constructed
        ("a: !!python/object:os.system x\n", 1),
        ("a: 1\nb: \x00\n", 2),  # a character YAML does not accept
    ],
)
def test_invalid_yaml_is_refused_with_its_line(content: str, line: int) -> None:
    message = refused(content)
    assert message.startswith("yamlContent is not valid YAML: ")
    assert message.endswith(f"(line {line})")


def test_alias_is_refused() -> None:
    content = build_doc(rest="  paramValues: &params\n    - name: a\n      value: b\n") + "  again: *params\n"
    assert refused(content) == "document 1: YAML aliases are not allowed"


def test_alias_is_refused_in_a_later_document() -> None:
    content = build_doc() + "---\n\n---\nx: &a 1\ny: *a\n"
    assert refused(content) == "document 3: YAML aliases are not allowed"


def test_merge_key_alias_is_refused() -> None:
    content = "base: &base {a: 1}\nkind: Build\nother:\n  <<: *base\n"
    assert refused(content) == "document 1: YAML aliases are not allowed"


BILLION_LAUGHS = """\
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
"""


# Refused while composing, before any object is built (the message says so); the timeout only
# guards against a hang, performance targets live in `make bench`.
@pytest.mark.timeout(60)
def test_billion_laughs_is_refused_before_it_expands() -> None:
    assert refused(BILLION_LAUGHS) == "document 1: YAML aliases are not allowed"
    assert refused(build_doc() + "---\n" + BILLION_LAUGHS) == "document 2: YAML aliases are not allowed"


def test_deep_nesting_is_refused_not_crashed() -> None:
    assert refused("[" * 100_000 + "]" * 100_000).startswith("yamlContent is not valid YAML: ")


def test_too_many_documents_are_refused() -> None:
    assert MAX_DOCUMENTS == 50
    # 49 empty documents, then the Build: 50 documents.
    at_limit = "---\n" * MAX_DOCUMENTS + build_doc()
    assert parse_content(at_limit, NS).run == "app"
    assert refused("---\n" * (MAX_DOCUMENTS + 1) + build_doc()) == "yamlContent has more than 50 documents"
    assert refused(("---\n" + build_doc()) * (MAX_DOCUMENTS + 1)) == "yamlContent has more than 50 documents"


def test_reading_stops_at_the_document_limit() -> None:
    # Whatever follows the limit is never read: not even invalid YAML there is noticed.
    after_the_limit = ("---\n" + build_doc()) * MAX_DOCUMENTS + "---\nkey: [unclosed\n"
    assert refused(after_the_limit) == "yamlContent has more than 50 documents"
    assert refused(("---\n" + build_doc()) * 20_000) == "yamlContent has more than 50 documents"


@pytest.mark.parametrize(
    ("rest", "path"),
    [
        ("  cache: !!binary aGVsbG8=\n", "/spec/cache"),
        ("  tags: !!set {a, b}\n", "/spec/tags"),
        ("  timeout: .nan\n", "/spec/timeout"),
        ("  params:\n    1: one\n", "/spec/params/1"),
    ],
)
def test_values_json_cannot_carry_are_refused(rest: str, path: str) -> None:
    assert refused(build_doc(rest=rest)) == (
        f'document 1 (Build "app"): the value at {path} cannot be sent to the API as JSON'
    )


# --- label values -----------------------------------------------------------------------------

LABEL_VALUE = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")


def test_an_order_name_that_fits_is_its_own_label_value() -> None:
    assert label_value("app") == "app"
    assert label_value("a" * 63) == "a" * 63


@pytest.mark.parametrize("name", ["a" * 64, "x" * 253, "team.build." + "a" * 200, "a" * 54 + "-" * 5 + "b" * 10])
def test_a_long_order_name_becomes_a_valid_label_value_unique_per_name(name: str) -> None:
    value = label_value(name)
    assert len(value) <= 63 and LABEL_VALUE.fullmatch(value), value
    assert label_value(name + "z") != value
    assert value.startswith(name[:20])


# --- buildrun_name ---------------------------------------------------------------------------

DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


def assert_label(name: str, attempt: int) -> None:
    assert len(name) <= 63
    assert DNS_LABEL.fullmatch(name), name
    assert name.endswith(f"-{attempt}")


def test_short_name_is_order_and_attempt() -> None:
    assert buildrun_name("nightly", 1) == "nightly-1"
    assert buildrun_name("nightly", 12) == "nightly-12"
    assert buildrun_name("a" * 61, 1) == "a" * 61 + "-1"  # exactly 63


@pytest.mark.parametrize("attempt", [1, 7, 10, 123456])
@pytest.mark.parametrize("length", [62, 63, 64, 100, 253])
def test_long_names_are_cut_to_a_dns_label(length: int, attempt: int) -> None:
    order = ("order-" * 50)[: length - 1] + "x"
    name = buildrun_name(order, attempt)
    assert_label(name, attempt)
    if len(f"{order}-{attempt}") > 63:
        assert name.startswith(order[:40])


def test_long_names_are_stable_and_unique() -> None:
    base = "release-pipeline-for-the-payments-service-in-the-europe-region-"
    orders = [base + suffix for suffix in ("a", "b", "c", "aa", "production", "staging")]
    names = {buildrun_name(order, 1) for order in orders}
    assert len(names) == len(orders)
    assert buildrun_name(orders[0], 1) == buildrun_name(orders[0], 1)
    assert buildrun_name(orders[0], 1) != buildrun_name(orders[0], 2)
    for order in orders:
        assert_label(buildrun_name(order, 3), 3)


def test_attempts_of_one_order_are_distinct() -> None:
    order = "x" * 200
    assert len({buildrun_name(order, n) for n in range(1, 50)}) == 49


def test_dotted_order_names_become_dns_labels() -> None:
    # Order names are DNS subdomains; Shipwright wants the BuildRun name as a label value.
    name = buildrun_name("team.app.v2", 1)
    assert_label(name, 1)
    assert name != buildrun_name("team-app-v2", 1)
    assert_label(buildrun_name("a." * 120 + "b", 4), 4)


@pytest.mark.parametrize(("order", "attempt"), [("", 1), ("app", -1)])
def test_no_name_for_nonsense(order: str, attempt: int) -> None:
    with pytest.raises(ValueError):
        buildrun_name(order, attempt)


# --- registration ----------------------------------------------------------------------------


def test_registration_not_yet_looked_at() -> None:
    assert registration({"metadata": {"name": "app"}}) == (None, "")
    assert registration({"status": {}}) == (None, "")
    assert registration({"status": None}) == (None, "")


def test_registration_accepted() -> None:
    assert registration({"status": {"registered": "True", "reason": "Succeeded", "message": "all good"}}) == (True, "")


def test_registration_refused() -> None:
    status = {
        "registered": "False",
        "reason": "ClusterBuildStrategyNotFound",
        "message": "clusterBuildStrategy kaniko does not exist",
    }
    assert registration({"status": status}) == (
        False,
        "ClusterBuildStrategyNotFound: clusterBuildStrategy kaniko does not exist",
    )


def test_registration_refused_with_only_a_reason() -> None:
    assert registration({"status": {"registered": "False", "reason": "BuildNameInvalid"}}) == (
        False,
        "BuildNameInvalid",
    )


@pytest.mark.parametrize("reason", sorted(UNDISCLOSED_REASONS))
def test_a_refusal_that_tells_whether_a_secret_exists_is_not_repeated(reason: str) -> None:
    build = {
        "metadata": {"name": "app", "namespace": "team-a"},
        "status": {"registered": "False", "reason": reason, "message": "referenced secret push-creds not found"},
    }
    ok, why = registration(build)
    assert ok is False
    assert "push-creds" not in why and reason not in why and "not found" not in why
    assert why.startswith("ReferenceRefused: ") and "kubectl get builds.shipwright.io app -n team-a" in why


def test_a_buildrun_repeating_such_a_refusal_is_withheld_too() -> None:
    message = "the Build is not registered correctly, build: app, registered status: False, reason: " + (
        "SpecOutputSecretRefNotFound, message: referenced secret push-creds not found"
    )
    failed = buildrun({"conditions": [{"type": "Succeeded", "status": "False", "reason": "BuildRegistrationFailed",
                                        "message": message}]})  # fmt: skip
    outcome = buildrun_outcome(failed)
    assert outcome.finished and not outcome.retryable
    assert "push-creds" not in outcome.error and outcome.error.startswith("BuildRegistrationFailed: Shipwright refused")
    other = buildrun({"conditions": [{"type": "Succeeded", "status": "False", "reason": "BuildRegistrationFailed",
                                      "message": "reason: BuildStrategyNotFound, message: kaniko"}]})  # fmt: skip
    assert "kaniko" in buildrun_outcome(other).error


# --- buildrun_outcome ------------------------------------------------------------------------


def buildrun(status: dict[str, Any] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"apiVersion": SHIPWRIGHT_API_VERSION, "kind": "BuildRun", "metadata": {"name": "x-1"}}
    if status is not None:
        body["status"] = status
    return body


def succeeded(status: str, reason: str = "", message: str = "") -> dict[str, Any]:
    return {"type": "Succeeded", "status": status, "reason": reason, "message": message}


RUNNING = RunOutcome(finished=False, succeeded=False, result="", error="", retryable=False)


def test_no_status_is_not_finished() -> None:
    assert buildrun_outcome(buildrun()) == RUNNING
    assert buildrun_outcome(buildrun({})) == RUNNING
    assert buildrun_outcome(buildrun({"conditions": []})) == RUNNING


def test_other_conditions_are_ignored() -> None:
    assert buildrun_outcome(buildrun({"conditions": [{"type": "Ready", "status": "True"}]})) == RUNNING


@pytest.mark.parametrize("reason", ["Pending", "Running", "BuildRunCanceled"])
def test_unknown_is_not_finished(reason: str) -> None:
    assert buildrun_outcome(buildrun({"conditions": [succeeded("Unknown", reason)]})) == RUNNING


def test_true_succeeds_with_the_digest() -> None:
    digest = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
    status = {"conditions": [succeeded("True", "Succeeded", "All Steps have completed")], "output": {"digest": digest}}
    assert buildrun_outcome(buildrun(status)) == RunOutcome(
        finished=True, succeeded=True, result=digest, error="", retryable=False
    )


def test_true_without_digest_succeeds_with_empty_result() -> None:
    outcome = buildrun_outcome(buildrun({"conditions": [succeeded("True", "Succeeded")]}))
    assert (outcome.finished, outcome.succeeded, outcome.result) == (True, True, "")


def test_false_reports_failure_details() -> None:
    status = {
        "conditions": [succeeded("False", "Failed", "buildrun step step-source-default failed in pod x-1-pod")],
        "failureDetails": {
            "reason": "GitRemotePrivate",
            "message": "The remote repository is private or does not exist",
            "location": {"pod": "x-1-pod", "container": "step-source-default"},
        },
    }
    assert buildrun_outcome(buildrun(status)) == RunOutcome(
        finished=True,
        succeeded=False,
        result="",
        error="GitRemotePrivate: The remote repository is private or does not exist",
        retryable=True,  # classified by the condition's reason, Failed
    )


def test_failure_details_reason_does_not_classify() -> None:
    status = {
        "conditions": [succeeded("False", "BuildRunCanceled", "canceled")],
        "failureDetails": {"reason": "StepOutOfMemory", "message": "oom"},
    }
    outcome = buildrun_outcome(buildrun(status))
    assert outcome.error == "StepOutOfMemory: oom"
    assert not outcome.retryable


def test_false_without_failure_details_reports_the_condition() -> None:
    status = {"conditions": [succeeded("False", "BuildNotFound", 'build.shipwright.io "app" not found')]}
    assert buildrun_outcome(buildrun(status)) == RunOutcome(
        finished=True,
        succeeded=False,
        result="",
        error='BuildNotFound: build.shipwright.io "app" not found',
        retryable=False,
    )


def test_empty_failure_details_fall_back_to_the_condition() -> None:
    status = {"conditions": [succeeded("False", "BuildRunTimeout", "timed out after 10m")], "failureDetails": {}}
    assert buildrun_outcome(buildrun(status)).error == "BuildRunTimeout: timed out after 10m"


def test_failure_without_message_is_just_the_reason() -> None:
    outcome = buildrun_outcome(buildrun({"conditions": [succeeded("False", "PodEvicted")]}))
    assert outcome.error == "PodEvicted"
    assert outcome.retryable


def test_failure_with_nothing_said_still_has_an_error() -> None:
    outcome = buildrun_outcome(buildrun({"conditions": [{"type": "Succeeded", "status": "False"}]}))
    assert (outcome.finished, outcome.succeeded, outcome.error, outcome.retryable) == (
        True,
        False,
        "BuildRun failed",
        True,
    )


# Written out, not taken from the product's tables: moving a reason from one table to the other
# must turn a test red. Retryable: the cluster, the node or the time budget failed, not the Build.
RETRYABLE = [
    "BuildRunTimeout",
    "PodEvicted",
    "StepOutOfMemory",
    "TaskRunIsMissing",
    "TaskRunGenerationFailed",
    "PipelineRunGenerationFailed",
    "SetOwnerReferenceFailed",
    "Failed",
    "PipelineRunFailed",
    "NodePlatformNotFound",
    "BuildRunNotStarted",
]
# Permanent: the request itself is wrong; the same order fails the same way every time.
PERMANENT = [
    "BuildNotFound",
    "BuildRegistrationFailed",
    "BuildStrategyNotFound",
    "ClusterBuildStrategyNotFound",
    "UnknownStrategyKind",
    "ServiceAccountNotFound",
    "MissingParameterValues",
    "RestrictedParametersInUse",
    "UndefinedParameter",
    "WrongParameterValueType",
    "InconsistentParameterValues",
    "EmptyArrayItemParameterValues",
    "IncompleteConfigMapValueParameterValues",
    "IncompleteSecretValueParameterValues",
    "BuildRunNameInvalid",
    "BuildRunNoRefOrSpec",
    "BuildRunAmbiguousBuild",
    "BuildRunBuildFieldOverrideForbidden",
    "VulnerabilitiesFound",
    "BuildRunCanceled",
    "ExecutorNotPipelineRun",
    "InvalidPlatform",
    "NodeSelectorNotValid",
    "NodeSelectorPlatformConflict",
    "RuntimeClassNameNotValid",
    "SchedulerNameNotValid",
    "TolerationNotValid",
    "UndefinedStepResource",
    "UndefinedVolume",
    "VolumeDoesNotExist",
    "VolumeNotOverridable",
]


@pytest.mark.parametrize(("reason", "retryable"), [(r, True) for r in RETRYABLE] + [(r, False) for r in PERMANENT])
def test_failure_reasons_are_classified(reason: str, retryable: bool) -> None:
    outcome = buildrun_outcome(buildrun({"conditions": [succeeded("False", reason, "m")]}))
    assert (outcome.finished, outcome.succeeded, outcome.retryable, outcome.error) == (
        True,
        False,
        retryable,
        f"{reason}: m",
    )


def test_the_reason_tables_are_the_documented_ones() -> None:
    # The tables are public (README names them): they hold exactly the reasons above.
    assert sorted(RETRYABLE_REASONS) == sorted(RETRYABLE)
    assert sorted(PERMANENT_REASONS) == sorted(PERMANENT)


@pytest.mark.parametrize("reason", ["SomeFutureReason", "GitRemotePrivate", ""])
def test_unknown_reasons_are_retryable(reason: str) -> None:
    assert buildrun_outcome(buildrun({"conditions": [succeeded("False", reason, "m")]})).retryable


def shipwright_source(path: str) -> str:
    try:
        return (envtest.module_dir(envtest.SHIPWRIGHT_MODULE) / path).read_text()
    except (envtest.ControlPlaneError, OSError) as exc:  # no Go, no module proxy
        pytest.skip(f"Shipwright's source is not at hand: {exc}")


def test_every_buildrun_reason_in_shipwrights_source_is_classified() -> None:
    """The table against the controller we run: a reason added by a Shipwright upgrade turns this red."""
    conditions = shipwright_source("pkg/reconciler/buildrun/resources/conditions.go")
    constants = shipwright_source("pkg/apis/build/v1beta1/buildrun_types.go")
    block = conditions[conditions.index("const (") : conditions.index(")", conditions.index("const ("))]
    reasons = set(re.findall(r'string = "(\w+)"', block))
    reasons |= set(re.findall(r'BuildRunState\w+ = "(\w+)"', constants))
    reasons |= set(re.findall(r'reason = "(\w+)"', conditions))  # BuildRunTimeout
    assert {"BuildRunTimeout", "PodEvicted", "StepOutOfMemory", "ClusterBuildStrategyNotFound"} <= reasons
    assert reasons - RETRYABLE_REASONS - PERMANENT_REASONS == set()


def test_the_validation_reasons_a_buildrun_can_fail_with_are_classified() -> None:
    """Shipwright's BuildRun validations return (false, reason, message); each reason is classified."""
    root = envtest.module_dir(envtest.SHIPWRIGHT_MODULE) / "pkg" / "validate"
    source = "".join(shipwright_source(f"pkg/validate/{p.name}") for p in sorted(root.glob("*.go")))
    names = set(re.findall(r"return false, (?:string\()?(?:buildapi|resources)\.(?:Condition)?(\w+)", source))
    assert {"UndefinedVolume", "NodeSelectorNotValid", "MissingParameterValues"} <= names
    assert names - RETRYABLE_REASONS - PERMANENT_REASONS == set()


def test_started_once_shipwright_writes_a_succeeded_condition() -> None:
    assert not buildrun_started(buildrun())
    assert not buildrun_started(buildrun({"executor": {"name": "x-1-abc", "kind": "TaskRun"}}))
    assert not buildrun_started(buildrun({"conditions": [{"type": "Ready", "status": "True"}]}))
    for status in ("Unknown", "True", "False"):
        assert buildrun_started(buildrun({"conditions": [succeeded(status, "Running")]}))
    # Whatever else someone wrote into a BuildRun's status: not started, and no crash.
    for garbage in (["conditions"], "Running", 7):
        assert not buildrun_started({"status": garbage})


def test_not_started_is_ours_and_retryable() -> None:
    assert NOT_STARTED_REASON == "BuildRunNotStarted"
    assert NOT_STARTED_REASON in RETRYABLE_REASONS


# --- what mutation testing asked for (make mutation) -------------------------------------------


def test_a_non_string_api_version_shows_as_none() -> None:
    assert refused("apiVersion: 5\nkind: Pod\n").startswith("document 1: kind Pod (apiVersion (none)) is not allowed")
    assert refused(build_doc().replace("shipwright.io/v1beta1", "[1, 2]")) == (
        'document 1 (Build "app"): unsupported apiVersion (none); use shipwright.io/v1beta1'
    )


def test_invalid_yaml_says_the_problem_and_the_line() -> None:
    # The parser knows both what it was doing (context) and what went wrong (problem): the problem is said.
    assert refused("key: [unclosed\n") == (
        "yamlContent is not valid YAML: expected ',' or ']', but got '<stream end>' (line 2)"
    )
    # A character YAML cannot hold, on the third line (counted from the start, a leading newline included).
    assert refused("\nkey: a\nbad: \x07\nmore: b\nand: c\nso: on\n") == (
        "yamlContent is not valid YAML: special characters are not allowed (line 3)"
    )


def test_blank_lines_before_the_first_marker_are_no_document() -> None:
    assert refused("\n\n---\nkind: Pod\n").startswith("document 1: kind Pod")
    # Without a marker, a comment header is part of document 1.
    assert refused("# header\napiVersion: v1\nkind: Pod\n").startswith("document 1: kind Pod")


def test_only_a_builds_identity_metadata_is_applied() -> None:
    content = build_doc(
        extra_metadata=(
            "  finalizers: [example.com/keep]\n  resourceVersion: '12'\n  uid: 0d4b6f6e\n"
            "  ownerReferences: [{apiVersion: v1, kind: ConfigMap, name: x, uid: y}]\n  generateName: x-\n"
        )
    )
    (build,) = parse_content(content, NS).builds
    assert build["metadata"] == {"name": "app", "namespace": NS}
    assert set(build) == {"apiVersion", "kind", "metadata", "spec"}


def test_an_empty_namespace_is_no_namespace() -> None:
    (build,) = parse_content(build_doc(extra_metadata='  namespace: ""\n'), NS).builds
    assert build["metadata"]["namespace"] == NS


def test_a_workorder_with_a_non_string_name_is_shown_without_it() -> None:
    content = "apiVersion: workorder.dev/v1alpha1\nkind: WorkOrder\nmetadata:\n  name: 5\nspec: {}\n"
    assert refused(content) == "document 1 (WorkOrder): spec.buildRef.name is missing"


@pytest.mark.parametrize(
    ("content", "shown"),
    [("1.5\n", "number"), ("!!binary aGVsbG8=\n", "scalar"), ("null_is_skipped: no\n", None)],
)
def test_what_a_non_mapping_document_is_called(content: str, shown: str | None) -> None:
    if shown is None:
        assert refused(content).startswith("document 1: kind (none)")
    else:
        assert refused(content) == f"document 1: is a {shown}, not a mapping"


def test_values_json_cannot_carry_are_found_inside_lists() -> None:
    content = build_doc(
        rest="  paramValues:\n    - name: a\n      value: ok\n    - name: b\n      value: !!binary aGk=\n"
    )
    assert refused(content) == (
        'document 1 (Build "app"): the value at /spec/paramValues/1/value cannot be sent to the API as JSON'
    )
    fine = build_doc(rest="  paramValues:\n    - name: a\n      values: [x, 1, 2.5, true, null]\n")
    assert parse_content(fine, NS).run == "app"


def test_a_long_label_value_is_cut_cleanly_to_63_characters() -> None:
    name = "a" * 53 + "-" + "b" * 20  # the cut falls right after the '-'
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    assert label_value(name) == f"{'a' * 53}-{digest}"
    assert len(label_value("x" * 253)) == 63


def test_buildrun_name_errors_say_what_is_wrong() -> None:
    with pytest.raises(ValueError, match=r"^no BuildRun name for order '', attempt 1$"):
        buildrun_name("", 1)
    with pytest.raises(ValueError, match=r"^attempt 10{60} is too large for a BuildRun name$"):
        buildrun_name("app", 10**60)


def test_buildrun_names_use_the_whole_63_characters_and_no_double_dash() -> None:
    long = "team.build." + "a" * 200
    name = buildrun_name(long, 7)
    assert len(name) == 63
    assert "--" not in name
    # The cut lands on a '-': it is dropped, not doubled.
    dashed = "a" * 51 + "-" + "b" * 30  # 52 characters fit before "-<hash>-1": the 52nd is the '-'
    digest = hashlib.sha256(dashed.encode()).hexdigest()[:8]
    assert buildrun_name(dashed, 1) == f"{'a' * 51}-{digest}-1"


def test_an_attempt_so_large_it_leaves_no_room_for_the_order_name() -> None:
    attempt = 10**52  # 53 digits: hash, '-' and attempt fill 62 characters
    name = buildrun_name("app.x", attempt)
    digest = hashlib.sha256(b"app.x").hexdigest()[:8]
    assert name == f"{digest}-{attempt}"


def test_a_refused_build_without_reason_or_message_still_says_so() -> None:
    assert registration({"status": {"registered": "False"}}) == (False, "Build registration failed")
    # Values of the wrong type are ignored, not printed.
    assert registration({"status": {"registered": "False", "reason": 5, "message": "m"}}) == (False, "m")
    assert registration({"status": {"registered": "False", "reason": "R", "message": ["m"]}}) == (False, "R")


def test_an_odd_output_is_no_digest() -> None:
    status = {"conditions": [succeeded("True")], "output": "sha256:abc"}
    assert buildrun_outcome(buildrun(status)).result == ""


@pytest.mark.parametrize(
    ("details", "error"),
    [
        ({"message": "step build-and-push failed"}, "Failed: step build-and-push failed"),
        ({"reason": "GitRemotePrivate"}, "GitRemotePrivate: m"),
    ],
)
def test_half_a_failure_detail_completes_the_condition(details: dict[str, str], error: str) -> None:
    status = {"conditions": [succeeded("False", "Failed", "m")], "failureDetails": details}
    assert buildrun_outcome(buildrun(status)).error == error
