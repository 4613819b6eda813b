"""Helpers for integration tests: orders, waiting, agent moves, and a real operator process."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from kubernetes import client

from workorder_operator import lifecycle
from workorder_operator.agent import Agent as SdkAgent
from workorder_operator.agent import Claim
from workorder_operator.errors import WorkOrderError
from workorder_operator.kube import WorkOrders
from workorder_operator.model import WorkOrder, order_body, utcnow
from workorder_operator.targeting import AgentIdentity

T = TypeVar("T")

REPO = Path(__file__).resolve().parents[1]
# The WorkOrder CRDs the local control plane installs (devcluster takes the directory).
CRDS = REPO / "crds"

# A refusal, whether the call went straight to the client or through the adapter (which raises
# the error tree, with the API's status and body kept).
API_ERRORS = (client.ApiException, WorkOrderError)


def wait_for(check: Callable[[], T | None], timeout: float = 30.0, interval: float = 0.05, what: str = "") -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not met within {timeout}s: {what or check}")
        time.sleep(interval)


def scrape(port: int, path: str = "/metrics", *, tls: bool = False, token: str | None = None) -> tuple[int, str]:
    """GET an operator's metrics (or health) endpoint: status code and body. Plain HTTP (an
    operator run with --metrics-insecure) unless `tls` (the secure default: its certificate is
    self-signed, so it is not verified); `token`: sent as a bearer token."""
    request = urllib.request.Request(f"{'https' if tls else 'http'}://127.0.0.1:{port}{path}")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    context = None
    if tls:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(request, timeout=5, context=context) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample of the Prometheus text format (0 if absent)."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split(" ")[0]))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def kubectl(kubeconfig: Path, *args: str, stdin: str | None = None) -> str:
    out = subprocess.run(
        ["kubectl", "--kubeconfig", str(kubeconfig), *args], input=stdin, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, f"kubectl {' '.join(args)}: {out.stderr}"
    return out.stdout


@contextlib.contextmanager
def applied(kubeconfig: Path, *files: Path) -> Iterator[None]:
    """The objects in `files` applied (server-side) for the duration; on the way out, those that did
    not exist before are deleted again, so every other test sees the cluster as it expects."""
    paths = [str(f) for f in files]
    before = {p: set(kubectl(kubeconfig, "get", "-f", p, "-o", "name", "--ignore-not-found").split()) for p in paths}
    created: list[str] = []
    try:
        for p in paths:
            names = kubectl(kubeconfig, "apply", "--server-side", "-o", "name", "-f", p).split()
            created += [n for n in names if n not in before[p]]
        yield
    finally:
        if created:
            kubectl(kubeconfig, "delete", "--ignore-not-found", "--wait=false", *created)


def admission_policies(kubeconfig: Path, *files: Path) -> contextlib.AbstractContextManager[None]:
    """Admission policies for the duration only: every other test runs without them, as it expects."""
    return applied(kubeconfig, *files)


def refused_by(call: Callable[[], Any], policy: str, *words: str) -> str:
    """`call` must be refused by the named admission policy (403/422); returns the message."""
    try:
        call()
    except API_ERRORS as exc:
        assert exc.status in (403, 422), exc
        message = str(json.loads(exc.body)["message"])
        assert policy in message, message
        for word in words:
            assert word in message, message
        return message
    raise AssertionError(f"not refused by {policy}")


def bind_rules(api: client.ApiClient, namespace: str, user: str, rules: list[dict[str, Any]], name: str = "") -> None:
    """A Role with `rules`, bound to `user` in `namespace` (both go away with the namespace)."""
    rbac = client.RbacAuthorizationV1Api(api)
    name = name or f"r-{uuid.uuid4().hex[:8]}"
    rbac.create_namespaced_role(namespace, {"metadata": {"name": name}, "rules": rules})
    rbac.create_namespaced_role_binding(namespace, {
        "metadata": {"name": name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}],
    })  # fmt: skip


def wait_allowed(api: client.ApiClient, verb: str, resource: str, namespace: str, group: str = "workorder.dev") -> None:
    """RBAC changes reach the authorizer through an informer: wait until one grant is visible."""
    review = {"spec": {"resourceAttributes": {"verb": verb, "group": group, "resource": resource,
                                               "namespace": namespace}}}  # fmt: skip
    deadline = time.monotonic() + 20
    while not client.AuthorizationV1Api(api).create_self_subject_access_review(review).status.allowed:
        assert time.monotonic() < deadline, f"{verb} {resource} in {namespace} never became allowed"
        time.sleep(0.1)


def bind(api: client.ApiClient, namespace: str, clusterrole: str, user: str) -> None:
    """A RoleBinding of `clusterrole` to `user` in `namespace` (goes away with it): no cluster-scoped
    leftovers."""
    client.RbacAuthorizationV1Api(api).create_namespaced_role_binding(
        namespace,
        {
            "metadata": {"name": f"{user}-{clusterrole}"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": clusterrole},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}],
        },
    )


def create_order(api: client.ApiClient, namespace: str, name: str, **spec: Any) -> dict[str, Any]:
    body = order_body(name, **{"workType": "test", "yamlContent": "echo: hello\n", **spec})
    return WorkOrders(api, "test").create(body, namespace)


class Agent:
    """A minimal agent built straight on the lifecycle + adapter (what the SDK wraps)."""

    def __init__(self, api: client.ApiClient, agent_id: str, **identity: Any) -> None:
        self.orders = WorkOrders(api, f"agent-{agent_id[:8]}")
        self.identity = AgentIdentity(agent_id, **identity)

    def read(self, namespace: str, name: str) -> WorkOrder:
        return WorkOrder.from_body(self.orders.get(namespace, name))

    def claim(self, order: WorkOrder) -> WorkOrder:
        return self._write(order, lifecycle.claim(order, self.identity, utcnow()))

    def renew(self, order: WorkOrder) -> WorkOrder:
        return self._write(order, lifecycle.renew(order, self.identity.id, order.status.attempt, utcnow()))

    def complete(self, order: WorkOrder, result: str = "ok") -> WorkOrder:
        return self._write(order, lifecycle.complete(order, self.identity.id, order.status.attempt, result, utcnow()))

    def fail(self, order: WorkOrder, error: str = "boom", retryable: bool = True) -> WorkOrder:
        write = lifecycle.fail(order, self.identity.id, order.status.attempt, error, utcnow(), retryable=retryable)
        return self._write(order, write)

    def _write(self, order: WorkOrder, write: lifecycle.StatusWrite) -> WorkOrder:
        return WorkOrder.from_body(self.orders.write_status(order, write))


# What a new order's status reads as before anyone wrote it: the CRD's defaults.
DEFAULT_STATUS = {"phase": "Pending", "reason": "Pending", "attempt": 0, "retryCount": 0, "observedGeneration": 0}

# What `agent run` runs in the kill -9 tests: each execution is logged as "<who> <order> <attempt>"
# in WORKDIR/executions.log; agent "A" records its pid in WORKDIR/<order>.pid and hangs until
# killed, any other agent finishes at once. Arguments: WORKDIR WHO.
KILLABLE_WORK = """
import os, pathlib, sys, time
workdir, who = pathlib.Path(sys.argv[1]), sys.argv[2]
name, attempt = os.environ["WORKORDER_NAME"], os.environ["WORKORDER_ATTEMPT"]
with open(workdir / "executions.log", "a") as log:
    log.write(f"{who} {name} {attempt}\\n")
if who == "A":
    (workdir / f"{name}.pid").write_text(str(os.getpid()))
    time.sleep(600)
print(f"done by {who}")
"""


class OperatorProcess:
    """The real `workorder-operator` as a child process; always stopped by the fixture."""

    def __init__(
        self,
        kubeconfig: Path,
        log_path: Path,
        *args: str,
        identity: str | None = None,
        command: tuple[str, ...] = ("-m", "workorder_operator.main"),
        ready: bytes = b"workorder engine started",
    ) -> None:
        self.kubeconfig = kubeconfig
        # What the Python interpreter runs: the operator's module, or a script that embeds it (or
        # another of our commands that takes --kubeconfig), and the log line that says it is up.
        self.command = command
        self.ready = ready
        self.log_path = log_path
        self.args = args
        # The leader-election identity survives restarts, as a pod's name does.
        self.identity = identity or f"operator-{uuid.uuid4().hex[:8]}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        # A restart appends to the same log: wait for a start line after what is there now.
        seen = self.log_path.read_bytes().count(self.ready) if self.log_path.exists() else 0
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it
        self.proc = subprocess.Popen(
            [sys.executable, *self.command, "--kubeconfig", str(self.kubeconfig), *self.args],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(os.environ, POD_NAME=self.identity),
        )
        log.close()
        try:
            wait_for(lambda: self.log_path.read_bytes().count(self.ready) > seen, 30, what=f"{self.ready!r} logged")
        except BaseException:
            self.stop()  # never leave a half-started operator behind
            raise

    @contextlib.contextmanager
    def running(self) -> Iterator[OperatorProcess]:
        """Started, and stopped on the way out whatever happened (for fixtures)."""
        self.start()
        try:
            yield self
        finally:
            self.stop()

    def kill(self) -> None:
        """kill -9: no clean-up, as a crash would be."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def replicas(kubeconfig: Path, namespace: str, directory: Path) -> list[OperatorProcess]:
    """Two operator replicas, started, sharing one Lease (as a two-replica Deployment does)."""
    ops = [
        OperatorProcess(kubeconfig, directory / f"operator-{i}.log", "--all-namespaces",
                        f"--leader-election-namespace={namespace}")
        for i in range(2)
    ]  # fmt: skip
    try:
        for op in ops:
            op.start()
    except BaseException:
        for op in ops:
            op.stop()
        raise
    return ops


def leader_of(ops: list[OperatorProcess]) -> OperatorProcess | None:
    """The one replica that says it leads (None while none or both do)."""
    leading = [o for o in ops if o.proc is not None and "is the leader" in o.log()]
    return leading[-1] if len(leading) == 1 else None


class RunningAgent:
    """`Agent.run` in a thread; `stop` ends it, `join` stops it, waits and re-raises its error."""

    def __init__(self, agent: SdkAgent, handler: Callable[[Claim], str | None], **options: Any) -> None:
        self.agent = agent
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(
            target=self._run, args=(handler, options), name=f"test-agent-{agent.id[:8]}", daemon=True
        )

    def _run(self, handler: Callable[[Claim], str | None], options: dict[str, Any]) -> None:
        try:
            self.agent.run(handler, stop=self.stop, **options)
        except BaseException as exc:
            self.error = exc

    def start(self) -> RunningAgent:
        self.thread.start()
        return self

    def join(self, timeout: float = 30) -> None:
        self.stop.set()
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"run() of agent {self.agent.id} did not return within {timeout}s"
        if self.error is not None:
            raise self.error
