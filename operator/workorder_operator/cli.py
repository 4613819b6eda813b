"""`kubectl-workorder`: the kubectl plugin (`kubectl workorder ...`), for people and shell agents.

Every command is a thin layer over the SDK (`agent.py`) and the lifecycle: the same
compare-and-swap writes, the same guards. Errors are one line with the cause and the fix, and a
distinct exit code (see EXIT_CODES); never a traceback.

Holder commands (renew, complete, fail, release) act only on the exact claim the caller was
given: `claim` prints a handle `NAMESPACE/NAME:UID:ATTEMPT:AGENT_ID`, and they take it (or NAME
with --uid, --attempt and --id spelled out). Never "whatever attempt is current": a stale
script, or a second shell agent on the same host, cannot finish someone else's attempt.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any, NoReturn

import yaml

from workorder_operator import __version__, fleet, lifecycle
from workorder_operator.agent import Agent, Claim, ClaimLost, Failure
from workorder_operator.errors import Conflict, NotFound, Transient, WorkOrderError
from workorder_operator.kube import KubeconfigError, WorkOrders, api_client, api_error, kubeconfig_namespace
from workorder_operator.model import PLURAL, Phase, WorkOrder, format_time, order_body, utcnow
from workorder_operator.presence import PresenceLeases
from workorder_operator.seed import seed_view
from workorder_operator.targeting import check_agent_id
from workorder_operator.terminal import escape

EXIT_CODES = {
    "error": 1,
    "usage": 2,
    "unreachable": 3,
    "no-crd": 4,
    "forbidden": 5,
    "not-found": 6,
    "claim-lost": 7,
    "nothing-to-claim": 8,
    "no-file": 9,
    "no-namespace": 10,
    "no-command": 11,
}
EX_TEMPFAIL = 75
# Named after the tool in managedFields and the API server's audit log, as kubectl names itself.
FIELD_MANAGER = "kubectl-workorder"
OUTPUT_TAIL = 4096


class CliError(WorkOrderError):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.code = EXIT_CODES[kind]


def default_agent_id() -> str:
    """$WORKORDER_AGENT_ID, else a new UUID: unique per process, so two agents on one host are
    never taken for one another (the id of a claim travels in its handle)."""
    return os.environ.get("WORKORDER_AGENT_ID") or str(uuid.uuid4())


# --- claim handles ------------------------------------------------------------------------------


def handle(order: WorkOrder, agent_id: str) -> str:
    """Everything a holder command needs to act on exactly this claim and nothing else."""
    return f"{order.namespace}/{order.name}:{order.uid}:{order.status.attempt}:{agent_id}"


def parse_handle(text: str) -> tuple[str, str, str, int, str]:
    """NAMESPACE/NAME:UID:ATTEMPT:AGENT_ID -> (namespace, name, uid, attempt, agent id)."""
    try:
        where, uid, attempt, agent_id = text.split(":")
        namespace, name = where.split("/")
        if not (namespace and name and uid and agent_id):
            raise ValueError(text)
        number = int(attempt)
    except ValueError:
        raise CliError(
            "usage", f"not a claim handle: {text!r}; expected NAMESPACE/NAME:UID:ATTEMPT:AGENT_ID as printed by claim"
        ) from None
    _valid_id(agent_id, "the handle's agent id", f"{namespace}/{name}")
    return namespace, name, uid, number, agent_id


def _valid_id(agent_id: str, field: str, order: str | None = None) -> str:
    """A usage error naming the field (and the order meant) for an agent id that is not a UUID."""
    try:
        return check_agent_id(agent_id, field)
    except ValueError as exc:
        raise CliError("usage", (f"workorder {order}: " if order else "") + str(exc)) from None


# --- connection and errors ----------------------------------------------------------------------


class Session:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        try:
            self.api = api_client(args.kubeconfig, args.context)
        except (KubeconfigError, OSError) as exc:
            raise CliError("unreachable", f"no usable kubeconfig ({exc}); pass --kubeconfig or set KUBECONFIG") from exc
        self.api.user_agent = f"{FIELD_MANAGER}/{__version__}"
        self.orders = WorkOrders(self.api, FIELD_MANAGER)

    @property
    def namespace(self) -> str:
        if self.args.namespace:
            return str(self.args.namespace)
        return kubeconfig_namespace(self.args.kubeconfig, self.args.context)

    def read(self, name: str) -> WorkOrder:
        return WorkOrder.from_body(self.orders.get(self.namespace, name))


def explain(exc: BaseException, session: Session | None) -> CliError:
    """Turn an exception into one actionable line (API answers through the one mapping, `api_error`)."""
    if isinstance(exc, CliError):
        return exc
    if isinstance(exc, ClaimLost):
        return CliError("claim-lost", str(exc))
    error = api_error(exc)
    if error is None:
        return CliError("error", f"{exc.__class__.__name__}: {exc}")
    if isinstance(error, Transient) and error.status is None:
        host = session.api.configuration.host if session else "the cluster"
        cause = error.__cause__ or exc
        return CliError(
            "unreachable",
            f"cannot reach {host}: {cause.__class__.__name__}; is the cluster up? check --kubeconfig/--context",
        )
    if isinstance(error, NotFound):
        kind = error.details.get("kind")
        if kind == "namespaces":
            ns = error.details.get("name")
            return CliError(
                "no-namespace",
                f"namespace {ns!r} does not exist; create it (kubectl create namespace {ns}) or pass another -n",
            )
        if kind == PLURAL or error is exc:  # the adapter's own: the order is not there
            return CliError("not-found", f"{error}; check the name and namespace (-n)")
        return CliError(
            "no-crd",
            "the WorkOrder API (workorders.workorder.dev) is not installed in this cluster; "
            "install it with: kubectl apply --server-side -f crds/",
        )
    if error.status == 403:
        return CliError("forbidden", f"forbidden: {error}; ask for the workorder-agent/workorder-edit role")
    if error.status == 401:
        return CliError("forbidden", f"unauthorized: {error}; your credentials were refused")
    if error.status is None or isinstance(error, Conflict):  # decided by us, or a lost race
        return CliError("error", f"{exc.__class__.__name__}: {exc}")
    return CliError("error", f"the API server refused: {error}")


# --- output -------------------------------------------------------------------------------------


def age(order: WorkOrder) -> str:
    return duration(utcnow() - order.created_at)


def duration(span: dt.timedelta) -> str:
    """As kubectl prints ages: 45s, 3m, 2h, 4d."""
    seconds = int(span.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= 2 * size or (unit == "m" and seconds >= size):
            return f"{seconds // size}{unit}"
    return f"{max(seconds, 0)}s"


def _reason(order: WorkOrder) -> str:
    if order.status.reason:
        return order.status.reason
    succeeded = order.status.condition("Succeeded")
    return succeeded.reason if succeeded else ""


def table(orders: Sequence[WorkOrder], wide: bool, all_namespaces: bool, header_row: bool = True) -> str:
    header = ["NAME", "TYPE", "PHASE", "CLAIMED-BY", "RETRIES", "AGE"]
    if wide:
        header += ["NEXT-RETRY", "PRIORITY", "REASON"]
    if all_namespaces:
        header.insert(0, "NAMESPACE")
    rows = [header]
    for o in orders:
        row = [
            o.name,
            o.spec.work_type,
            o.status.phase or "",
            o.status.claimed_by or "",
            str(o.status.retry_count),
            age(o),
        ]
        if wide:
            row += [o.raw_status.get("nextRetryAfter", ""), str(o.spec.priority), _reason(o)]
        if all_namespaces:
            row.insert(0, o.namespace)
        rows.append(row)
    return columns(rows if header_row else rows[1:])


def columns(rows: Sequence[Sequence[str]]) -> str:
    """Rows as kubectl prints them: aligned columns, three spaces apart. Every cell came from an
    order or an agent, so it is escaped first: one cell, one line, nothing a terminal acts on."""
    cells = [[escape(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))] if cells else []
    return "\n".join("   ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells)


def emit(orders: list[dict[str, Any]], args: argparse.Namespace, single: bool, header: bool = True) -> None:
    parsed = [WorkOrder.from_body(b) for b in orders]
    # As kubectl does: managedFields are bookkeeping for the API server, not for people.
    for body in orders:
        body.get("metadata", {}).pop("managedFields", None)
    fmt = args.output
    if fmt == "json":
        print(json.dumps(orders[0] if single else {"apiVersion": "v1", "kind": "List", "items": orders}, indent=2))
    elif fmt == "yaml":
        print(yaml.safe_dump(orders[0] if single else {"apiVersion": "v1", "kind": "List", "items": orders}), end="")
    elif fmt == "seed":
        views = [seed_view(o) for o in parsed]
        print(json.dumps(views[0] if single else views, indent=2))
    elif fmt == "name":
        for o in parsed:
            print(f"workorder.workorder.dev/{o.name}")
    else:
        if not parsed and not single:
            print(
                f"No resources found in {args.namespace or 'the'} namespace."
                if not args.all_namespaces
                else "No resources found."
            )
            return
        print(table(parsed, fmt == "wide", bool(getattr(args, "all_namespaces", False)), header), flush=True)


# --- commands: people ---------------------------------------------------------------------------


def cmd_create(s: Session, args: argparse.Namespace) -> int:
    try:
        content = sys.stdin.read() if args.filename == "-" else Path(args.filename).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise CliError(
            "no-file", f"cannot read -f {args.filename}: {reason}; pass a readable YAML file or - for stdin"
        ) from None
    if not content.strip():
        raise CliError("no-file", f"-f {args.filename} is empty; yamlContent must hold at least one YAML document")
    spec: dict[str, Any] = {"workType": args.type, "yamlContent": content}
    for flag, field in (
        ("max_retries", "maxRetries"), ("backoff", "backoffSeconds"), ("max_backoff", "maxBackoffSeconds"),
        ("claim_timeout", "claimTimeoutSeconds"), ("priority", "priority"), ("ttl", "ttlSecondsAfterFinished"),
    ):  # fmt: skip
        if getattr(args, flag) is not None:
            spec[field] = getattr(args, flag)
    targeting: dict[str, Any] = {}
    if args.target_agent:
        targeting["agentIds"] = args.target_agent
    if args.target_label:
        targeting["labels"] = args.target_label
    if args.target_annotation:
        targeting["annotations"] = dict(_key_value(a) for a in args.target_annotation)
    if targeting:
        spec["targeting"] = targeting
    body = order_body(args.name, generate_name=None if args.name else f"{args.type}-", **spec)
    created = s.orders.create(body, s.namespace)
    if args.output:
        emit([created], args, single=True)
    else:
        print(f"workorder.workorder.dev/{created['metadata']['name']} created")
    return 0


def cmd_list(s: Session, args: argparse.Namespace) -> int:
    selector = ",".join(
        f
        for f in (f"status.phase={args.phase}" if args.phase else "", f"spec.workType={args.type}" if args.type else "")
        if f
    )
    if not args.all_namespaces:
        args.namespace = s.namespace
    pages = s.orders.pages(None if args.all_namespaces else s.namespace, selector, args.chunk_size)
    if args.output in ("json", "yaml", "seed"):  # one document: every page before it
        emit([b for page in pages for b in page], args, single=False)
        return 0
    # A table (or names) page by page, as kubectl does: the first lines show at once, however many
    # orders there are; the header once, columns as wide as each page needs.
    shown = False
    for page in pages:
        if page:
            page.sort(key=lambda b: (b["metadata"].get("namespace", ""), b["metadata"]["name"]))
            emit(page, args, single=False, header=not shown)
            sys.stdout.flush()
            shown = True
    if not shown:
        emit([], args, single=False)
    return 0


def cmd_get(s: Session, args: argparse.Namespace) -> int:
    emit([s.orders.get(s.namespace, args.name)], args, single=True)
    return 0


def cmd_history(s: Session, args: argparse.Namespace) -> int:
    order = s.read(args.name)
    rows = [["ATTEMPT", "AGENT", "CLAIMED", "FINISHED", "OUTCOME", "MESSAGE"]]
    for h in order.raw_status.get("history", []):
        rows.append([str(h.get("attempt", "")), h.get("agent", ""), h.get("claimedAt", ""), h.get("finishedAt", ""),
                     h.get("outcome", ""), (h.get("message") or "").replace("\n", " ")[:80]])  # fmt: skip
    if order.status.phase == Phase.CLAIMED:
        rows.append(
            [
                str(order.status.attempt),
                order.status.claimed_by or "",
                order.raw_status.get("claimedAt", ""),
                "",
                "Running",
                "",
            ]
        )
    print(columns(rows))
    return 0


def cmd_requeue(s: Session, args: argparse.Namespace) -> int:
    order = s.read(args.name)
    try:
        s.orders.write_status(order, lifecycle.requeue(order, utcnow()))
    except lifecycle.TransitionError as exc:
        raise CliError("error", f"cannot requeue: {exc}; only Failed and RetryPending orders can be requeued") from exc
    print(f"workorder.workorder.dev/{args.name} requeued (Pending, retries reset)")
    return 0


def cmd_agents(s: Session, args: argparse.Namespace) -> int:
    """The agents that announced themselves (presence leases), with the claims they hold."""
    scope = None if args.all_namespaces else s.namespace
    bodies, _ = PresenceLeases(s.api, FIELD_MANAGER).list(scope)
    agents = []
    for body in bodies:
        try:
            agents.append(fleet.parse_lease(body))
        except ValueError as exc:
            meta = body.get("metadata", {})
            warning = f"warning: presence lease {meta.get('namespace')}/{meta.get('name')}: {exc}"
            print(escape(warning), file=sys.stderr)
    # Claims held, by (agent id, namespace): read page by page, nothing parsed (there may be many).
    held: Counter[tuple[str, str]] = Counter()
    for page in s.orders.pages(scope, f"status.phase={Phase.CLAIMED}", args.chunk_size):
        for body in page:
            holder = (body.get("status") or {}).get("claimedBy")
            if holder:
                held[(holder, body["metadata"].get("namespace", ""))] += 1
    now = utcnow()
    rows: list[dict[str, Any]] = []
    for p in sorted(agents, key=lambda p: (p.namespace, p.agent.id)):
        live = now < fleet.lost_at(p)
        rows.append({
            "namespace": p.namespace, "id": p.agent.id, "workTypes": list(p.work_types),
            "labels": list(p.agent.labels), "annotations": dict(p.agent.annotations), "user": p.user,
            "namespaces": list(p.namespaces),
            "leaseDurationSeconds": int(p.duration),
            "renewTime": format_time(p.renew_time) if p.renew_time else None,
            "claims": sum(n for (holder, ns), n in held.items() if holder == p.agent.id and p.covers(ns)),
            "status": "Live" if live else "Lost",
            "lastSeen": duration(now - p.renew_time) if p.renew_time else "never",
        })  # fmt: skip
    if args.output == "json":
        print(json.dumps({"agents": rows}, indent=2))
        return 0
    if args.output == "yaml":
        print(yaml.safe_dump({"agents": rows}, sort_keys=False), end="")
        return 0
    if not rows:
        print("No agents found." if scope is None else f"No agents found in {scope} namespace.")
        return 0
    wide = args.output == "wide"
    header = ["AGENT", "TYPES", "LABELS", "CLAIMS", "LAST-SEEN", "STATUS"]
    header += ["USER", "TAKES-IN", "LEASE", "ANNOTATIONS"] if wide else []
    table_rows = [(["NAMESPACE"] if scope is None else []) + header]
    for r in rows:
        row = [r["id"], ",".join(r["workTypes"]) or "*", ",".join(r["labels"]) or "<none>", str(r["claims"]),
               r["lastSeen"], r["status"]]  # fmt: skip
        if wide:
            notes = ",".join(f"{k}={v}" for k, v in sorted(r["annotations"].items())) or "<none>"
            row += [r["user"] or "<unknown>", ",".join(r["namespaces"]) or "*", f"{r['leaseDurationSeconds']}s", notes]
        table_rows.append(([r["namespace"]] if scope is None else []) + row)
    print(columns(table_rows))
    return 0


# --- commands: shell agents ---------------------------------------------------------------------


def _agent(s: Session, args: argparse.Namespace) -> Agent:
    name = getattr(args, "name", None)
    _valid_id(args.id, "--id (or $WORKORDER_AGENT_ID)", f"{s.namespace}/{name}" if name else None)
    return Agent(
        s.api, args.id, work_types=args.type or (), labels=args.label or (),
        annotations=dict(_key_value(a) for a in args.annotation or ()),
        namespace=None if getattr(args, "all_namespaces", False) else s.namespace, field_manager=FIELD_MANAGER,
        lease_duration=getattr(args, "lease_duration", fleet.LEASE_SECONDS),
        presence_namespace=getattr(args, "presence_namespace", None) or s.namespace,
    )  # fmt: skip


def cmd_claim(s: Session, args: argparse.Namespace) -> int:
    agent = _agent(s, args)
    claim = agent.claim(s.read(args.name)) if args.name else agent.claim_next()
    if claim is None:
        raise CliError("nothing-to-claim", "nothing to claim: no Pending order of these types admits this agent")
    o = claim.order
    if args.output == "json":
        print(json.dumps({"name": o.name, "namespace": o.namespace, "uid": o.uid, "attempt": o.status.attempt,
                          "agentId": agent.id, "handle": handle(o, agent.id)}))  # fmt: skip
    else:
        print(handle(o, agent.id))
    return 0


def _exact_claim(s: Session, args: argparse.Namespace) -> tuple[str, str, str, int, str]:
    """(namespace, name, uid, attempt, agent id) of the claim the caller means, spelled out in full."""
    if ":" in args.claim:
        return parse_handle(args.claim)
    missing = [flag for flag, value in (("--uid", args.uid), ("--attempt", args.attempt), ("--id", args.id)) if
               value is None]  # fmt: skip
    if missing:
        raise CliError(
            "usage",
            f"{args.command} {args.claim}: also pass {', '.join(missing)} (or the handle claim printed, "
            "NAMESPACE/NAME:UID:ATTEMPT:AGENT_ID): holder commands act only on the exact claim you were given",
        )
    _valid_id(args.id, "--id (or $WORKORDER_AGENT_ID)", f"{s.namespace}/{args.claim}")
    return s.namespace, args.claim, args.uid, args.attempt, args.id


def _held(s: Session, args: argparse.Namespace) -> Claim:
    """A handle on exactly the claim the caller names; claim-lost if the order no longer holds it."""
    namespace, name, uid, attempt, agent_id = _exact_claim(s, args)
    order = WorkOrder.from_body(s.orders.get(namespace, name))
    agent = Agent(s.api, agent_id, namespace=namespace, field_manager=FIELD_MANAGER)
    held = Claim(agent, order)
    held.attempt = attempt
    st = order.status
    if order.uid != uid:
        raise CliError(
            "claim-lost",
            f"workorder {order.key} was deleted and created again (uid {order.uid}, not {uid}): the claim is lost",
        )
    if st.phase is not None and st.phase.terminal:
        by = f" by agent {st.claimed_by} in attempt {st.attempt}" if st.claimed_by else ""
        at = f" at {order.raw_status['completedAt']}" if order.raw_status.get("completedAt") else ""
        yours = " (your attempt)" if st.claimed_by == agent_id and st.attempt == attempt else ""
        raise CliError(
            "claim-lost", f"workorder {order.key} is already {st.phase}{by}{at}{yours}: nothing left to {args.command}"
        )
    if st.phase != Phase.CLAIMED or st.claimed_by != agent_id or st.attempt != attempt:
        now = f"held by attempt {st.attempt} of agent {st.claimed_by}" if st.claimed_by else "held by nobody"
        raise CliError(
            "claim-lost",
            f"workorder {order.key} is {st.phase}, {now}; your claim (attempt {attempt} of agent {agent_id}) "
            "is lost or was never taken",
        )
    return held


def cmd_holder(s: Session, args: argparse.Namespace) -> int:
    """renew, complete, fail and release: what the holder of a claim may do."""
    held = _held(s, args)
    if args.command == "renew":
        held.renew()
    elif args.command == "complete":
        held.complete(args.result or "")
    elif args.command == "fail":
        held.fail(args.error, retryable=not args.no_retry)
    else:
        held.release(args.reason or "")
    outcome = {"renew": "renewed", "complete": "completed", "release": "released"}.get(args.command)
    print(f"workorder.workorder.dev/{held.order.name} {outcome or held.order.status.phase}")
    return 0


class CommandRunner:
    """Runs COMMAND for one claimed order: content on stdin, fields in the environment, output
    streamed with the order's name as prefix; exit 0 completes, others fail."""

    def __init__(
        self, command: Sequence[str], timeout: float | None, retryable: set[int], stop: threading.Event
    ) -> None:
        self.command = list(command)
        self.timeout = timeout
        self.retryable = retryable
        self.stop = stop
        self._print = threading.Lock()

    def __call__(self, claim: Claim) -> str:
        """Run the command and report the outcome itself, so each order gets one line saying how
        its attempt ended (the SDK would report it silently)."""
        where = f"{claim.order.key} attempt {claim.attempt}"
        self._say(f"{where}: claimed")
        started = time.monotonic()
        try:
            try:
                result = self._run(claim)
            except _CommandFailed as exc:
                claim.fail(str(exc), retryable=exc.retryable)
                s, spec = claim.order.status, claim.order.spec
                took = time.monotonic() - started
                if s.phase == Phase.RETRY_PENDING:
                    after = f" after {s.next_retry_after:%H:%M:%S}" if s.next_retry_after else ""
                    self._say(f"{where}: failed (retryable: {exc.short}) in {took:.1f}s; "
                              f"retry {s.retry_count} of {spec.max_retries}{after}")  # fmt: skip
                else:
                    self._say(f"{where}: failed (final: {exc.short}) in {took:.1f}s")
                return ""
            if result is None:
                self._say(f"{where}: released (agent shutting down) after {time.monotonic() - started:.1f}s")
                return ""
            claim.complete(result)
            self._say(f"{where}: completed in {time.monotonic() - started:.1f}s")
        except ClaimLost as exc:
            self._say(f"{where}: claim lost after {time.monotonic() - started:.1f}s ({exc})")
            raise
        return ""

    def _say(self, line: str) -> None:
        with self._print:
            print(escape(line), file=sys.stderr, flush=True)

    def _run(self, claim: Claim) -> str | None:
        """The command's result (the last line of its output); None when released on shutdown;
        `_CommandFailed` when it failed."""
        o = claim.order
        env = dict(
            os.environ,
            WORKORDER_NAME=o.name, WORKORDER_NAMESPACE=o.namespace, WORKORDER_UID=o.uid,
            WORKORDER_TYPE=o.spec.work_type, WORKORDER_ATTEMPT=str(o.status.attempt),
            WORKORDER_RETRY_COUNT=str(o.status.retry_count), WORKORDER_AGENT_ID=claim.agent.id,
            WORKORDER_PRIORITY=str(o.spec.priority), WORKORDER_HANDLE=handle(o, claim.agent.id),
        )  # fmt: skip
        try:
            proc = subprocess.Popen(
                self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                start_new_session=True,
            )  # fmt: skip
        except OSError as exc:  # checked at start-up, but gone or changed since
            why = f"cannot run {self.command[0]}: {exc.strerror or exc}"
            raise _CommandFailed(why, True, why) from None
        tails: dict[str, list[str]] = {"out": [], "err": []}
        pumps = [
            threading.Thread(target=self._pump, args=(proc.stdout, o.name, tails["out"], sys.stdout), daemon=True),
            threading.Thread(target=self._pump, args=(proc.stderr, o.name, tails["err"], sys.stderr), daemon=True),
        ]
        for p in pumps:
            p.start()
        threading.Thread(target=self._feed, args=(proc, o.spec.yaml_content), daemon=True).start()
        outcome = self._wait(proc)
        for p in pumps:
            p.join(timeout=5)
        out, err = "".join(tails["out"])[-OUTPUT_TAIL:].strip(), "".join(tails["err"])[-OUTPUT_TAIL:].strip()
        if outcome == "stopped":
            claim.release("agent shutting down")
            return None
        if outcome == "timeout":
            took = f"timed out after {self.timeout:g}s"
            raise _CommandFailed(took, True, took + (f": {err}" if err else ""))
        code = proc.returncode
        if code == 0:
            # The result is the last line printed (a digest, a URL, a count); the full output was streamed.
            return out.splitlines()[-1] if out else ""
        error = f"exit code {code}" + (f": {err or out}" if err or out else "")
        raise _CommandFailed(f"exit {code}", code in self.retryable, error)

    def _wait(self, proc: subprocess.Popen[bytes]) -> str:
        waited = 0.0
        while True:
            try:
                proc.wait(timeout=0.2)
                return "exited"
            except subprocess.TimeoutExpired:
                waited += 0.2
            if self.stop.is_set():
                _kill(proc)
                return "stopped"
            if self.timeout is not None and waited >= self.timeout:
                _kill(proc)
                return "timeout"

    @staticmethod
    def _feed(proc: subprocess.Popen[bytes], content: str) -> None:
        assert proc.stdin is not None
        try:
            proc.stdin.write(content.encode())
            proc.stdin.close()
        except (BrokenPipeError, OSError):
            pass  # the command does not read its input: fine

    def _pump(self, stream: IO[bytes] | None, name: str, tail: list[str], sink: IO[str]) -> None:
        assert stream is not None
        kept = 0
        for raw in iter(stream.readline, b""):
            line = raw.decode(errors="replace")
            with self._print:
                sink.write(f"[{name}] {line if line.endswith(chr(10)) else line + chr(10)}")
                sink.flush()
            tail.append(line)
            kept += len(line)
            while kept > 2 * OUTPUT_TAIL and len(tail) > 1:
                kept -= len(tail.pop(0))


class _CommandFailed(Failure):
    """The command failed: `short` is what the one-line report says (exit 75), the error stored
    on the order adds the tail of its output."""

    def __init__(self, short: str, retryable: bool, error: str) -> None:
        super().__init__(error, retryable=retryable)
        self.short = short


def _kill(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the command's process group, SIGKILL after 5 s."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def _check_command(program: str) -> None:
    """Before anything is claimed: a mistyped command would fail every order it takes."""
    path = program if os.sep in program else shutil.which(program)
    if path is None or not os.path.isfile(path):
        where = "" if os.sep in program else " on PATH"
        raise CliError("no-command", f"command {program!r} not found{where}; nothing was claimed")
    if not os.access(path, os.X_OK):
        raise CliError("no-command", f"command {program!r} is not executable (chmod +x {path}); nothing was claimed")


def cmd_agent_run(s: Session, args: argparse.Namespace) -> int:
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise CliError(
            "usage", "agent run needs a command after --, e.g. kubectl workorder agent run --type test -- ./run.sh"
        )
    _check_command(command[0])
    if not fleet.MIN_LEASE_SECONDS <= args.lease_duration <= fleet.MAX_LEASE_SECONDS:
        raise CliError(
            "usage", f"--lease-duration {args.lease_duration:g}: between {fleet.MIN_LEASE_SECONDS} and "
            f"{fleet.MAX_LEASE_SECONDS} seconds",
        )  # fmt: skip
    agent = _agent(s, args)
    # Fail fast with a readable error if the cluster or the CRD is not there.
    s.orders.list(agent.namespace, field_selector=agent._selector())
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    retryable = {int(c) for c in args.retryable_exit_codes.split(",") if c.strip()}
    runner = CommandRunner(command, args.timeout, retryable, stop)
    scope = "all namespaces" if agent.namespace is None else f"namespace {agent.namespace}"
    types = ", ".join(agent.work_types) or "all types"
    print(f"agent {agent.id} taking {types} in {scope} (concurrency {args.concurrency}; presence lease in "
          f"{agent.presence_namespace}, {agent.lease_duration:g}s)", file=sys.stderr, flush=True)  # fmt: skip
    agent.run(runner, concurrency=args.concurrency, stop=stop, shutdown_grace=args.shutdown_grace)
    return 0


# --- parsing ------------------------------------------------------------------------------------


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise CliError("usage", f"expected KEY=VALUE, got {text!r}")
    return key, value


def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-n", "--namespace", help="namespace (default: the context's, else default)")
    common.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG") or None, help="kubeconfig file")
    common.add_argument("--context", help="kubeconfig context")
    common.add_argument("-o", "--output", choices=["json", "yaml", "wide", "seed", "name"], help="output format")

    p = argparse.ArgumentParser(prog="kubectl workorder", description="Create, inspect and work WorkOrders.")
    p.add_argument("--version", action="version", version=f"kubectl-workorder {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, fn: Callable[[Session, argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, parents=[common], help=help, description=help)
        sp.set_defaults(fn=fn)
        return sp

    c = add("create", cmd_create, "create a WorkOrder from a YAML file")
    c.add_argument("--type", required=True, help="workType (build, test, backup, ...)")
    c.add_argument("-f", "--filename", required=True, help="the yamlContent file (- for stdin)")
    c.add_argument("--name", help="name (default: generated from the type)")
    c.add_argument("--max-retries", type=int)
    c.add_argument("--backoff", type=int, help="backoffSeconds")
    c.add_argument("--max-backoff", type=int, help="maxBackoffSeconds")
    c.add_argument("--claim-timeout", type=int, help="claimTimeoutSeconds")
    c.add_argument("--priority", type=int)
    c.add_argument("--ttl", type=int, help="ttlSecondsAfterFinished")
    c.add_argument("--target-agent", action="append", help="admit this agent id (repeatable)")
    c.add_argument("--target-label", action="append", help="admit agents with this label (repeatable)")
    c.add_argument("--target-annotation", action="append", help="admit agents with KEY=VALUE (repeatable)")

    ls = add("list", cmd_list, "list WorkOrders")
    ls.add_argument("-A", "--all-namespaces", action="store_true")
    ls.add_argument("--phase", choices=[str(p) for p in Phase])
    ls.add_argument("--type", help="only this workType")
    ls.add_argument(
        "--chunk-size", type=int, default=500, help="orders per request (limit/continue, as kubectl); 0: all at once"
    )

    g = add("get", cmd_get, "show one WorkOrder (-o seed: the seed system's 15-field record)")
    g.add_argument("name")
    h = add("history", cmd_history, "the attempts of a WorkOrder")
    h.add_argument("name")
    rq = add("requeue", cmd_requeue, "put a Failed or RetryPending order back to Pending with its retries reset")
    rq.add_argument("name")
    ags = add("agents", cmd_agents, "list the agents that announced themselves: types, labels, claims, Live/Lost")
    ags.add_argument("-A", "--all-namespaces", action="store_true")
    ags.add_argument(
        "--chunk-size", type=int, default=500, help="claimed orders per request (limit/continue); 0: all at once"
    )

    def identity(sp: argparse.ArgumentParser, types: bool) -> None:
        sp.add_argument(
            "--id",
            default=default_agent_id(),
            help="agent UUID (default: $WORKORDER_AGENT_ID, else a new UUID for this process)",
        )
        if types:
            sp.add_argument("--type", action="append", help="work type to take (repeatable; default: all)")
            sp.add_argument("--label", action="append", help="agent label, for targeting (repeatable)")
            sp.add_argument("--annotation", action="append", help="agent annotation KEY=VALUE (repeatable)")
            sp.add_argument("-A", "--all-namespaces", action="store_true", help="take orders from every namespace")

    cl = add(
        "claim",
        cmd_claim,
        "claim the next order (or NAME); prints the claim's handle NAMESPACE/NAME:UID:ATTEMPT:AGENT_ID",
    )
    cl.add_argument("name", nargs="?")
    identity(cl, True)
    for name, help in (
        ("renew", "renew a claim you hold"),
        ("complete", "complete a claim you hold"),
        ("fail", "fail a claim you hold (RetryPending while retries are left)"),
        ("release", "give a claim back untouched (not a failure)"),
    ):
        sp = add(name, cmd_holder, help)
        sp.add_argument(
            "claim", metavar="HANDLE|NAME", help="the handle claim printed, or NAME with --uid --attempt --id"
        )
        sp.add_argument("--id", default=os.environ.get("WORKORDER_AGENT_ID") or None, help="agent UUID (with NAME)")
        sp.add_argument("--uid", help="the order's uid when you claimed it (with NAME)")
        sp.add_argument("--attempt", type=int, help="the attempt you claimed (with NAME)")
        if name == "complete":
            sp.add_argument("--result", help="the result (e.g. an image digest)")
        if name == "fail":
            sp.add_argument("--error", required=True, help="what went wrong")
            sp.add_argument("--no-retry", action="store_true", help="not retryable: Failed at once")
        if name == "release":
            sp.add_argument("--reason")

    ag = sub.add_parser("agent", help="run a ready-made agent").add_subparsers(dest="agent_command", required=True)
    run = ag.add_parser(
        "run",
        parents=[common],
        help="claim orders and run COMMAND for each",
        description="Claim orders and run COMMAND for each: yamlContent on stdin, the order's fields in WORKORDER_* "
        "variables. Exit 0 completes (the last line of stdout is the result); exit 75 fails retryably; "
        "other codes fail for good.",
    )
    run.set_defaults(fn=cmd_agent_run)
    identity(run, True)
    run.add_argument("--concurrency", type=int, default=1, help="orders run at once (default 1)")
    run.add_argument("--timeout", type=float, help="kill COMMAND after this many seconds (retryable failure)")
    run.add_argument(
        "--retryable-exit-codes", default=str(EX_TEMPFAIL), help="comma-separated (default 75, EX_TEMPFAIL)"
    )
    run.add_argument("--shutdown-grace", type=float, default=10.0, help="seconds in-flight work may finish on SIGTERM")
    run.add_argument(
        "--lease-duration", type=float, default=fleet.LEASE_SECONDS,
        help="term of the agent's presence lease, renewed every third of it (default 30): once it lapses, "
        "the operator expires this agent's claims at once",
    )  # fmt: skip
    run.add_argument(
        "--presence-namespace", help="with -A: where the agent announces itself (default: the context's namespace)"
    )
    run.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND ARGS...")
    return p


def fail(error: CliError) -> NoReturn:
    # An API server's message may quote what a tenant wrote (a work type, an agent's error).
    print(escape(f"error: {error}", keep_lines=True), file=sys.stderr)
    sys.exit(error.code)


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    session = None
    try:
        session = Session(args)
        return int(args.fn(session, args))
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        fail(explain(exc, session))


if __name__ == "__main__":
    sys.exit(main())
