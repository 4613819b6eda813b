"""Work type `build` (SPEC.md): what a yamlContent may ask of Shipwright, and what a BuildRun's
status means for the order. Pure: no I/O.

yamlContent runs with the operator's privileges, so it is read as a closed list, not a filter:
only `shipwright.io/v1beta1` Build documents in the order's own namespace (and, for the seed
system's YAML, a WorkOrder document naming an existing Build) are accepted; anything else makes
the whole content refused, with a message naming the document and the problem.
"""

from __future__ import annotations

import copy
import hashlib
import math
import re
from dataclasses import dataclass
from typing import Any

import yaml
from yaml.events import AliasEvent, DocumentStartEvent
from yaml.nodes import Node, ScalarNode

from workorder_operator.errors import Refused

SHIPWRIGHT_API_VERSION = "shipwright.io/v1beta1"
BUILD_KIND = "Build"
MAX_DOCUMENTS = 50
# Shipwright copies the BuildRun's name into a label value (and Tekton into pod names): 63 at most.
NAME_LIMIT = 63
_SUBDOMAIN_LIMIT = 253
_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_SUBDOMAIN_RE = re.compile(rf"{_LABEL}(\.{_LABEL})*")
_LABEL_RE = re.compile(_LABEL)
_HASH_LENGTH = 8


class ContentError(Refused, ValueError):
    """yamlContent cannot run; the message names the document and the problem."""


@dataclass(frozen=True)
class BuildPlan:
    """What a yamlContent runs: the Builds to apply, in order, and the one Build to run."""

    # The Build documents, to apply in order (metadata.namespace set to the order's namespace).
    builds: tuple[dict[str, Any], ...]
    # Name of the Build to run: the last Build document, else the WorkOrder document's spec.buildRef.name.
    run: str


# --- yamlContent ------------------------------------------------------------------------------


class _AliasRefused(Exception):
    pass


_KEPT_METADATA = frozenset({"name", "labels", "annotations"})


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses aliases while composing, before any object is built: an alias is
    the only way a small document expands into a huge one (billion laughs)."""

    def compose_node(self, parent: Node | None, index: int) -> Node | None:
        if self.check_event(AliasEvent):
            raise _AliasRefused
        return super().compose_node(parent, index)


def _timestamp_as_string(loader: _Loader, node: ScalarNode) -> str:
    return loader.construct_scalar(node)


# Timestamps stay strings, as kubectl (sigs.k8s.io/yaml) reads them: the Build goes to the API as JSON.
_Loader.add_constructor("tag:yaml.org,2002:timestamp", _timestamp_as_string)


def parse_content(yaml_content: str, namespace: str) -> BuildPlan:
    """The Builds of a `build` order's yamlContent and the Build to run; ContentError if it cannot run."""
    builds: list[dict[str, Any]] = []
    first_document: dict[str, int] = {}
    build_ref = ""
    for number, document in _documents(yaml_content):
        if document is None:
            continue  # empty or comment-only
        if not isinstance(document, dict):
            raise ContentError(f"document {number}: is a {_yaml_type(document)}, not a mapping")
        kind, api_version = document.get("kind"), document.get("apiVersion")
        if kind == BUILD_KIND:
            build = _build(number, document, namespace)
            name = build["metadata"]["name"]
            if name in first_document:
                raise ContentError(
                    f"{_where(number, kind, name)}: repeats the Build of document {first_document[name]}; "
                    "each Build may appear once"
                )
            first_document[name] = number
            builds.append(build)
        elif kind == "WorkOrder":
            build_ref = _build_ref(number, document, namespace)
        else:
            shown_kind = kind if isinstance(kind, str) and kind else "(none)"
            shown_api = api_version if isinstance(api_version, str) and api_version else "(none)"
            raise ContentError(
                f"document {number}: kind {shown_kind} (apiVersion {shown_api}) is not allowed: only "
                f"{SHIPWRIGHT_API_VERSION} {BUILD_KIND} documents (and a WorkOrder with spec.buildRef) may appear"
            )
    if builds:
        return BuildPlan(builds=tuple(builds), run=builds[-1]["metadata"]["name"])
    if build_ref:
        return BuildPlan(builds=(), run=build_ref)
    raise ContentError("no Build document and no WorkOrder spec.buildRef: nothing to build")


def _documents(yaml_content: str) -> list[tuple[int, Any]]:
    """(number, object) for each document, numbered from 1 as a reader counts `---` sections."""
    documents: list[tuple[int, Any]] = []
    number = 0
    loader: _Loader | None = None
    try:
        loader = _Loader(yaml_content)  # checks the characters: may raise ReaderError
        while loader.check_node():  # a document follows; current_event is its start
            start = loader.current_event
            if number == 0 and _leading_comment_section(yaml_content, start):
                # PyYAML counts no document before the first `---`, but a reader sees one there.
                number = 1
            number += 1
            if number > MAX_DOCUMENTS:
                raise ContentError(f"yamlContent has more than {MAX_DOCUMENTS} documents")
            try:
                node = loader.compose_document()
            except _AliasRefused:
                raise ContentError(f"document {number}: YAML aliases are not allowed") from None
            documents.append((number, loader.construct_document(node) if node is not None else None))
    except yaml.MarkedYAMLError as e:
        where = f" (line {e.problem_mark.line + 1})" if e.problem_mark is not None else ""
        raise ContentError(f"yamlContent is not valid YAML: {e.problem or e.context}{where}") from None
    except yaml.reader.ReaderError as e:
        line = yaml_content.count("\n", 0, e.position) + 1
        raise ContentError(f"yamlContent is not valid YAML: {e.reason} (line {line})") from None
    except RecursionError:
        raise ContentError("yamlContent is not valid YAML: nested too deeply") from None
    finally:
        if loader is not None:
            loader.dispose()
    return documents


def _leading_comment_section(yaml_content: str, start: Any) -> bool:
    """Whether comments precede the first, explicit `---` (a licence header, say)."""
    if not isinstance(start, DocumentStartEvent) or not start.explicit:
        return False
    mark = start.start_mark
    head = yaml_content[: mark.index] if mark is not None else ""
    return any(line.strip() and not line.lstrip().startswith("%") for line in head.splitlines())


def _build(number: int, document: dict[str, Any], namespace: str) -> dict[str, Any]:
    """A Build document checked and made ready to apply: a deep copy in `namespace`, without status."""
    metadata = document.get("metadata")
    raw_name = metadata.get("name") if isinstance(metadata, dict) else None
    name = raw_name if isinstance(raw_name, str) else None
    where = _where(number, BUILD_KIND, name)
    api_version = document.get("apiVersion")
    if api_version != SHIPWRIGHT_API_VERSION:
        shown = api_version if isinstance(api_version, str) and api_version else "(none)"
        raise ContentError(f"{where}: unsupported apiVersion {shown}; use {SHIPWRIGHT_API_VERSION}")
    if metadata is not None and not isinstance(metadata, dict):
        raise ContentError(f"{where}: metadata is not a mapping")
    if not name:
        raise ContentError(f"{where}: a Build without metadata.name")
    if not _is_subdomain(name):
        raise ContentError(
            f"{where}: metadata.name is not a valid name: lowercase letters, digits, '-' and '.', "
            f"starting and ending with a letter or digit, at most {_SUBDOMAIN_LIMIT} characters"
        )
    _check_namespace(where, metadata, namespace)
    path = _not_json(document, "")
    if path is not None:
        raise ContentError(f"{where}: the value at {path or '/'} cannot be sent to the API as JSON")
    try:
        build = copy.deepcopy(document)
    except RecursionError:
        raise ContentError(f"{where}: nested too deeply") from None
    build.pop("status", None)
    # Only what a Build's identity needs: no finalizers (a Build that outlives its order and
    # blocks its namespace), owner references (we set our own) or other metadata.
    build["metadata"] = {k: v for k, v in build["metadata"].items() if k in _KEPT_METADATA}
    build["metadata"]["namespace"] = namespace
    return build


def _build_ref(number: int, document: dict[str, Any], namespace: str) -> str:
    """The Build a seed-system WorkOrder document names (spec.buildRef.name)."""
    metadata = document.get("metadata")
    name = metadata.get("name") if isinstance(metadata, dict) else None
    where = _where(number, "WorkOrder", name if isinstance(name, str) else None)
    _check_namespace(where, metadata, namespace)
    spec = document.get("spec")
    ref = spec.get("buildRef") if isinstance(spec, dict) else None
    build = ref.get("name") if isinstance(ref, dict) else None
    if not isinstance(build, str) or not build:
        raise ContentError(f"{where}: spec.buildRef.name is missing")
    if not _is_subdomain(build):
        raise ContentError(f"{where}: spec.buildRef.name {build!r} is not a valid Build name")
    return build


def _check_namespace(where: str, metadata: Any, namespace: str) -> None:
    wanted = metadata.get("namespace") if isinstance(metadata, dict) else None
    # An empty namespace is no namespace, as for kubectl.
    if wanted not in (None, "", namespace):
        raise ContentError(
            f'{where}: names namespace "{wanted}", but builds run in the WorkOrder\'s namespace "{namespace}"'
        )


def _where(number: int, kind: str, name: str | None) -> str:
    return f'document {number} ({kind} "{name}")' if name else f"document {number} ({kind})"


def _is_subdomain(name: str) -> bool:
    return len(name) <= _SUBDOMAIN_LIMIT and _SUBDOMAIN_RE.fullmatch(name) is not None


def _yaml_type(value: Any) -> str:
    return {list: "list", str: "string", bool: "boolean", int: "number", float: "number"}.get(type(value), "scalar")


def _not_json(value: Any, path: str) -> str | None:
    """The path of the first value JSON cannot carry (binary, sets, non-string keys, NaN), or None.
    Iterative: the nesting depth is the user's, so it must not cost stack."""
    stack: list[tuple[Any, str]] = [(value, path)]
    while stack:
        item, at = stack.pop()
        if isinstance(item, dict):
            for key, child in item.items():
                if not isinstance(key, str):
                    return at + "/" + str(key)
                stack.append((child, f"{at}/{key}"))
        elif isinstance(item, list):
            stack.extend((child, f"{at}/{i}") for i, child in enumerate(item))
        elif isinstance(item, float):
            if not math.isfinite(item):
                return at
        elif item is not None and not isinstance(item, str | int):  # bool is an int
            return at
    return None


# --- BuildRun ---------------------------------------------------------------------------------


def label_value(name: str) -> str:
    """An object name as a label value (63 characters at most): names up to 253 characters are cut,
    with a hash of the whole name so that two long names never share a value."""
    if len(name) <= NAME_LIMIT:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:_HASH_LENGTH]
    return f"{name[: NAME_LIMIT - _HASH_LENGTH - 1].rstrip('-.')}-{digest}"


# A spoke builds a hub's orders only in namespaces that opted in to that hub: the spoke's admin
# labels them, so a hub tenant never builds, with that namespace's Secrets, in a spoke namespace
# that another team owns only because its name is the same.
HUB_OPT_IN_LABEL = "workorder.dev/builds-for-hub"


def hub_label(hub: str) -> str:
    """The opt-in label's value for a hub's name (a name or an API server URL)."""
    return label_value(re.sub(r"[^A-Za-z0-9_.-]+", "-", hub).strip("-_.") or "hub")


def opted_in(labels: dict[str, str], hub: str) -> bool:
    return labels.get(HUB_OPT_IN_LABEL) == hub_label(hub)


def not_opted_in(namespace: str, hub: str) -> str:
    value = hub_label(hub)
    return (
        f"namespace {namespace!r} of the cluster the builds run in has not opted in to builds for hub {hub!r}: "
        f"its admin labels it {HUB_OPT_IN_LABEL}={value} "
        f"(kubectl label namespace {namespace} {HUB_OPT_IN_LABEL}={value}) if this hub's orders may build there"
    )


def buildrun_name(order_name: str, attempt: int) -> str:
    """The BuildRun of one attempt: `<order>-<attempt>`, or, when that is too long or no DNS label,
    a cut-down order name with a hash of the whole name, so it stays unique and fits 63 chars."""
    if not order_name or attempt < 0:
        raise ValueError(f"no BuildRun name for order {order_name!r}, attempt {attempt}")
    simple = f"{order_name}-{attempt}"
    if len(simple) <= NAME_LIMIT and _LABEL_RE.fullmatch(simple):
        return simple
    digest = hashlib.sha256(order_name.encode()).hexdigest()[:_HASH_LENGTH]
    suffix = f"{digest}-{attempt}"
    # Order names are subdomains: '.' is the one character a label may not hold.
    prefix = re.sub(r"[^a-z0-9-]", "-", order_name.lower())[: max(0, NAME_LIMIT - len(suffix) - 1)].strip("-")
    name = f"{prefix}-{suffix}" if prefix else suffix
    if len(name) > NAME_LIMIT:
        raise ValueError(f"attempt {attempt} is too large for a BuildRun name")
    return name


# Shipwright's refusals that tell whether an object the Build names exists: a Secret (clone, push,
# builder) or a volume's Secret or ConfigMap. An order's record is read by everyone who may read
# orders in the namespace, and `view` does not read Secrets; so the record never repeats them,
# even to a creator who named the object: only what the order's readers could read anyway.
UNDISCLOSED_REASONS: frozenset[str] = frozenset(
    {
        "SpecSourceSecretRefNotFound",
        "SpecOutputSecretRefNotFound",
        "SpecBuilderSecretRefNotFound",
        "MultipleSecretRefNotFound",
        "VolumeDoesNotExist",
    }
)
WITHHELD = "ReferenceRefused"


def registration(build: dict[str, Any]) -> tuple[bool | None, str]:
    """Whether Shipwright accepted a Build (status.registered): None until it has looked; on refusal,
    "reason: message" (withheld when it would tell whether a Secret or ConfigMap exists)."""
    status = build.get("status") or {}
    registered = status.get("registered")
    if registered == "True":
        return True, ""
    if registered == "False":
        reason, message = status.get("reason"), status.get("message")
        if reason in UNDISCLOSED_REASONS:
            meta = build.get("metadata") or {}
            reason, message = WITHHELD, withheld_message("builds", meta.get("name"), meta.get("namespace"))
        return False, _reason_message(reason, message, "Build registration failed")
    return None, ""


def withheld_message(resource: str, name: Any, namespace: Any) -> str:
    """What the record says instead of Shipwright's message, and where to read that message."""
    return (
        f"Shipwright refused an object the {resource[:-1]} references (a Secret, or a volume's Secret or "
        "ConfigMap); its message is not repeated here because it tells whether such an object exists, "
        "which not everyone who reads this order may know. With the right to read "
        f"{resource}.shipwright.io: kubectl get {resource}.shipwright.io {name} -n {namespace} "
        "-o jsonpath='{.status}'"
    )


@dataclass(frozen=True)
class RunOutcome:
    """What a BuildRun's Succeeded condition means for the order."""

    finished: bool  # False while the BuildRun has no Succeeded condition or it is Unknown
    succeeded: bool
    result: str  # status.output.digest on success
    error: str  # "Reason: message" on failure
    retryable: bool


_RUNNING = RunOutcome(finished=False, succeeded=False, result="", error="", retryable=False)

# Ours, not Shipwright's: the build agent cancels a BuildRun that has not started in time.
NOT_STARTED_REASON = "BuildRunNotStarted"


# The BuildRun's Succeeded reasons, checked against Shipwright v0.20.13's controller (its
# pkg/reconciler/buildrun and pkg/validate; the ones tests/integration/test_build.py sees from the
# real controller are listed in the README). Tekton's own TaskRun reasons that Shipwright passes
# through (TaskRunImagePullFailed, ...) are in neither set, so they are retried.
#
# Failures of the moment: the cluster, the node or the time budget, not the Build itself. Another
# attempt may well succeed, and maxRetries bounds how often it is tried. (Failed and
# PipelineRunFailed are a step exiting non-zero, which includes flaky registries and networks.)
RETRYABLE_REASONS: frozenset[str] = frozenset(
    {
        "BuildRunTimeout",
        "PodEvicted",
        "StepOutOfMemory",
        "TaskRunIsMissing",
        "TaskRunGenerationFailed",
        "PipelineRunGenerationFailed",
        "SetOwnerReferenceFailed",
        "Failed",
        "PipelineRunFailed",
        "NodePlatformNotFound",  # no node of the platform yet: nodes come and go
        NOT_STARTED_REASON,
    }
)

# Failures of the request: a missing Build, strategy, service account or volume, bad parameters,
# an invalid BuildRun, a vulnerable image, a cancellation. The same order fails the same way every
# time, so retrying only delays the Failed phase and hides the reason.
PERMANENT_REASONS: frozenset[str] = frozenset(
    {
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
        "UndefinedVolume",
        "VolumeNotOverridable",
        "VolumeDoesNotExist",
        "UndefinedStepResource",
        "NodeSelectorNotValid",
        "TolerationNotValid",
        "SchedulerNameNotValid",
        "RuntimeClassNameNotValid",
        "NodeSelectorPlatformConflict",
        "InvalidPlatform",
        "ExecutorNotPipelineRun",
        "BuildRunNameInvalid",
        "BuildRunNoRefOrSpec",
        "BuildRunAmbiguousBuild",
        "BuildRunBuildFieldOverrideForbidden",
        "VulnerabilitiesFound",
        "BuildRunCanceled",
    }
)


def buildrun_started(buildrun: dict[str, Any]) -> bool:
    """Whether the BuildRun has started: Shipwright has written a Succeeded condition (any status),
    which it does once Tekton reports on the TaskRun, or when it refuses the BuildRun outright."""
    return _succeeded_condition(buildrun) is not None


def _succeeded_condition(buildrun: dict[str, Any]) -> dict[str, Any] | None:
    status = buildrun.get("status") or {}
    conditions = status.get("conditions") if isinstance(status, dict) else None
    return next((c for c in conditions or [] if isinstance(c, dict) and c.get("type") == "Succeeded"), None)


def buildrun_outcome(buildrun: dict[str, Any]) -> RunOutcome:
    """The outcome of a BuildRun, from its Succeeded condition."""
    status = buildrun.get("status") or {}
    condition = _succeeded_condition(buildrun)
    if condition is None:
        return _RUNNING
    if condition.get("status") == "True":
        output = status.get("output") or {}
        digest = output.get("digest") if isinstance(output, dict) else None
        return RunOutcome(
            finished=True, succeeded=True, result=digest if isinstance(digest, str) else "", error="", retryable=False
        )
    if condition.get("status") != "False":
        return _RUNNING  # Unknown: still running (or being cancelled)
    reason = condition.get("reason") or ""
    message = condition.get("message") or ""
    # failureDetails says what went wrong in the step (e.g. GitRemotePrivate), the better message.
    details = status.get("failureDetails")
    details = details if isinstance(details, dict) else {}
    error = _reason_message(details.get("reason") or reason, details.get("message") or message)
    if reason == "BuildRegistrationFailed" and any(r in message for r in UNDISCLOSED_REASONS):
        # The BuildRun repeats its Build's refusal (see `registration`).
        meta = buildrun.get("metadata") or {}
        error = _reason_message(reason, withheld_message("buildruns", meta.get("name"), meta.get("namespace")))
    # Classify by the Succeeded condition's reason, not failureDetails.reason: the condition's
    # reason is Shipwright's fixed vocabulary for the run as a whole, while failureDetails.reason is
    # a step-level detail any strategy may set. Reasons we do not know are retried: maxRetries
    # bounds the cost, and a new Shipwright reason is more often transient than not.
    return RunOutcome(finished=True, succeeded=False, result="", error=error, retryable=reason not in PERMANENT_REASONS)


def _reason_message(reason: Any, message: Any, fallback: str = "BuildRun failed") -> str:
    reason = reason if isinstance(reason, str) else ""
    message = message if isinstance(message, str) else ""
    if reason and message:
        return f"{reason}: {message}"
    return reason or message or fallback
