"""`kubectl workorder` end to end: the real kubectl finds and runs the plugin against the real API server."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml
from kubernetes import config
from kubernetes.client.exceptions import ApiException

from tests.conftest import Cluster
from tests.support import Agent, bind_rules, create_order, wait_for
from workorder_operator import fleet
from workorder_operator.errors import WorkOrderError
from workorder_operator.model import WorkOrder, utcnow
from workorder_operator.presence import PresenceLeases
from workorder_operator.targeting import AgentIdentity

pytestmark = pytest.mark.skipif(shutil.which("kubectl-workorder") is None, reason="plugin not on PATH (make test)")

AGENT_ID = str(uuid.uuid4())


def kubectl(
    cluster: Cluster, *args: str, kubeconfig: Path | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, KUBECONFIG=str(kubeconfig or cluster.kubeconfig))
    return subprocess.run(
        ["kubectl", "workorder", *args], capture_output=True, text=True, env=env, input=stdin, timeout=60
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_create_list_get_seed_and_history(cluster: Cluster, namespace: str, tmp_path: Path) -> None:
    content = tmp_path / "build.yaml"
    content.write_text("apiVersion: shipwright.io/v1beta1\nkind: Build\nmetadata: {name: app}\n")
    out = ok(kubectl(cluster, "create", "-n", namespace, "--type", "backup", "-f", str(content), "--name", "nightly",
                     "--max-retries", "5", "--priority", "7", "--target-label", "zone-a"))  # fmt: skip
    assert out.strip() == "workorder.workorder.dev/nightly created"
    generated = ok(kubectl(cluster, "create", "-n", namespace, "--type", "test", "-f", "-", stdin="x: 1\n"))
    assert generated.startswith("workorder.workorder.dev/test-")

    table = ok(kubectl(cluster, "list", "-n", namespace)).splitlines()
    assert table[0].split() == ["NAME", "TYPE", "PHASE", "CLAIMED-BY", "RETRIES", "AGE"]
    assert len(table) == 3
    only = ok(kubectl(cluster, "list", "-n", namespace, "--type", "backup", "--phase", "Pending")).splitlines()
    assert [line.split()[0] for line in only[1:]] == ["nightly"]

    body = json.loads(ok(kubectl(cluster, "get", "nightly", "-n", namespace, "-o", "json")))
    assert body["spec"]["maxRetries"] == 5 and body["spec"]["targeting"] == {"labels": ["zone-a"]}
    seed = json.loads(ok(kubectl(cluster, "get", "nightly", "-n", namespace, "-o", "seed")))
    assert len(seed) == 15 and seed["status"] == "PENDING" and seed["id"] == body["metadata"]["uid"]
    assert seed["yaml_content"] == content.read_text()
    shown = yaml.safe_load(ok(kubectl(cluster, "get", "nightly", "-n", namespace, "-o", "yaml")))
    assert shown["metadata"]["name"] == "nightly"
    # As kubectl: no managedFields in -o yaml/json (create -o yaml too); and the field manager is the tool.
    assert "managedFields" not in shown["metadata"]
    made = yaml.safe_load(ok(kubectl(cluster, "create", "-n", namespace, "--type", "test", "-f", "-", "-o", "yaml",
                                     stdin="x: 1\n")))  # fmt: skip
    assert "managedFields" not in made["metadata"] and made["status"]["reason"] == "Pending"
    handle = ok(kubectl(cluster, "claim", made["metadata"]["name"], "-n", namespace, "--id", AGENT_ID)).strip()
    ok(kubectl(cluster, "complete", handle))
    raw = Agent(cluster.api, AGENT_ID).orders.get(namespace, made["metadata"]["name"])
    managers = {(m["manager"], m.get("subresource", "")) for m in raw["metadata"]["managedFields"]}
    assert managers == {("kubectl-workorder", ""), ("kubectl-workorder", "status")}, managers

    a = Agent(cluster.api, AGENT_ID, labels=("zone-a",))
    a.fail(a.claim(a.read(namespace, "nightly")), "network down")
    history = ok(kubectl(cluster, "history", "nightly", "-n", namespace)).splitlines()
    assert history[0].split()[:2] == ["ATTEMPT", "AGENT"]
    assert "Failed" in history[1] and "network down" in history[1]


def test_list_pages_through_a_big_namespace(cluster: Cluster, namespace: str) -> None:
    """`list` asks for --chunk-size orders at a time (limit/continue) and prints each page as it
    comes: every order once, in name order, the header once."""
    names = [f"wo-{i}" for i in range(5)]
    for name in reversed(names):
        create_order(cluster.api, namespace, name)
    table = ok(kubectl(cluster, "list", "-n", namespace, "--chunk-size", "2")).splitlines()
    assert table[0].split()[0] == "NAME" and [line.split()[0] for line in table[1:]] == names
    listed = ok(kubectl(cluster, "list", "-n", namespace, "--chunk-size", "2", "-o", "name")).split()
    assert listed == [f"workorder.workorder.dev/{name}" for name in names]
    items = json.loads(ok(kubectl(cluster, "list", "-n", namespace, "--chunk-size", "2", "-o", "json")))["items"]
    assert [item["metadata"]["name"] for item in items] == names
    only = ok(kubectl(cluster, "list", "-n", namespace, "--chunk-size", "2", "--phase", "Claimed")).strip()
    assert only == f"No resources found in {namespace} namespace."


def test_shell_agent_claim_renew_complete(cluster: Cluster, namespace: str) -> None:
    create_order(cluster.api, namespace, "low", priority=1)
    create_order(cluster.api, namespace, "high", priority=9)
    out = ok(kubectl(cluster, "claim", "-n", namespace, "--id", AGENT_ID, "--type", "test"))
    handle = out.strip()
    uid = Agent(cluster.api, AGENT_ID).read(namespace, "high").uid
    assert handle == f"{namespace}/high:{uid}:1:{AGENT_ID}"  # priority first
    ok(kubectl(cluster, "renew", handle))
    ok(kubectl(cluster, "complete", handle, "--result", "sha256:feed"))
    got = json.loads(ok(kubectl(cluster, "get", "high", "-n", namespace, "-o", "json")))
    assert got["status"]["phase"] == "Completed" and got["status"]["result"] == "sha256:feed"

    # Completing again: the claim is over -> exit 7 with a one-line reason that says so plainly.
    again = kubectl(cluster, "complete", handle)
    assert again.returncode == 7
    assert "Traceback" not in again.stderr and len(again.stderr.strip().splitlines()) == 1
    assert again.stderr.strip() == (
        f"error: workorder {namespace}/high is already Completed by agent {AGENT_ID} in attempt 1 at "
        f"{got['status']['completedAt']} (your attempt): nothing left to complete"
    )

    claimed = json.loads(ok(kubectl(cluster, "claim", "low", "-n", namespace, "--id", AGENT_ID, "-o", "json")))
    # The handle spelled out: NAME with --uid, --attempt and --id.
    ok(kubectl(cluster, "release", "low", "-n", namespace, "--id", AGENT_ID, "--uid", claimed["uid"],
               "--attempt", str(claimed["attempt"]), "--reason", "maintenance"))  # fmt: skip
    assert json.loads(ok(kubectl(cluster, "get", "low", "-n", namespace, "-o", "json")))["status"]["phase"] == "Pending"

    nothing = kubectl(cluster, "claim", "-n", namespace, "--id", AGENT_ID, "--type", "nonexistent")
    assert nothing.returncode == 8 and "nothing to claim" in nothing.stderr


def test_agent_ids_must_be_uuids_and_errors_name_the_field_and_the_order(cluster: Cluster, namespace: str) -> None:
    """Issue 17: `--id notauuid` used to claim (an agent no targeting can name), and a 47-character
    id got the API server's raw error about whichever order it tried first."""
    create_order(cluster.api, namespace, "meant")
    create_order(cluster.api, namespace, "other", priority=5)
    bad = kubectl(cluster, "claim", "-n", namespace, "--id", "notauuid")
    assert bad.returncode == 2, bad
    assert bad.stderr.startswith("error: --id (or $WORKORDER_AGENT_ID) 'notauuid' is not a UUID"), bad.stderr
    long_id = str(uuid.uuid4()) + "-abcdefghij"  # 47 characters
    named = kubectl(cluster, "claim", "meant", "-n", namespace, "--id", long_id)
    assert named.returncode == 2
    assert named.stderr.startswith(f"error: workorder {namespace}/meant: --id (or $WORKORDER_AGENT_ID) '{long_id}'")
    assert "other" not in named.stderr and "Too long" not in named.stderr, named.stderr
    env_id = subprocess.run(["kubectl", "workorder", "claim", "-n", namespace], capture_output=True, text=True,
                            env=dict(os.environ, KUBECONFIG=str(cluster.kubeconfig), WORKORDER_AGENT_ID="agent-7"),
                            timeout=60)  # fmt: skip
    assert env_id.returncode == 2 and "'agent-7' is not a UUID" in env_id.stderr, env_id.stderr
    uid = Agent(cluster.api, AGENT_ID).read(namespace, "meant").uid
    handle = kubectl(cluster, "complete", f"{namespace}/meant:{uid}:1:{long_id}")
    assert handle.returncode == 2
    assert handle.stderr.startswith(f"error: workorder {namespace}/meant: the handle's agent id '{long_id}'")
    spelled = kubectl(cluster, "release", "meant", "-n", namespace, "--uid", uid, "--attempt", "1", "--id", "x")
    assert spelled.returncode == 2 and f"workorder {namespace}/meant: --id" in spelled.stderr, spelled.stderr
    run = kubectl(cluster, "agent", "run", "-n", namespace, "--id", "notauuid", "--", "true")
    assert run.returncode == 2 and "'notauuid' is not a UUID" in run.stderr, run.stderr
    a = Agent(cluster.api, AGENT_ID)
    assert [a.read(namespace, n).status.phase for n in ("meant", "other")] == ["Pending", "Pending"]


def test_fail_no_retry_then_requeue(cluster: Cluster, namespace: str) -> None:
    create_order(cluster.api, namespace, "job", maxRetries=3)
    handle = ok(kubectl(cluster, "claim", "job", "-n", namespace)).strip()
    assert "Failed" in ok(kubectl(cluster, "fail", handle, "--error", "bad", "--no-retry"))
    not_failed = kubectl(cluster, "requeue", "missing", "-n", namespace)
    assert not_failed.returncode == 6 and "not found" in not_failed.stderr
    ok(kubectl(cluster, "requeue", "job", "-n", namespace))
    status = json.loads(ok(kubectl(cluster, "get", "job", "-n", namespace, "-o", "json")))["status"]
    assert status["phase"] == "Pending" and status["retryCount"] == 0


def test_requeue_of_an_order_waiting_for_its_retry(cluster: Cluster, namespace: str) -> None:
    create_order(cluster.api, namespace, "later", maxRetries=3, backoffSeconds=3600)
    handle = ok(kubectl(cluster, "claim", "later", "-n", namespace)).strip()
    assert "RetryPending" in ok(kubectl(cluster, "fail", handle, "--error", "bad"))
    ok(kubectl(cluster, "requeue", "later", "-n", namespace))
    status = json.loads(ok(kubectl(cluster, "get", "later", "-n", namespace, "-o", "json")))["status"]
    assert status["phase"] == "Pending" and status["retryCount"] == 0 and "nextRetryAfter" not in status


def test_holder_commands_act_only_on_the_exact_claim_they_were_given(cluster: Cluster, namespace: str) -> None:
    create_order(cluster.api, namespace, "job")
    first = ok(kubectl(cluster, "claim", "job", "-n", namespace)).strip()
    ok(kubectl(cluster, "release", first, "--reason", "handing over"))
    second = ok(kubectl(cluster, "claim", "job", "-n", namespace)).strip()
    assert second.split(":")[2] == "2"
    # Each shell process has its own default agent id: two agents on one host are never one claimer.
    assert first.rsplit(":", 1)[1] != second.rsplit(":", 1)[1]

    # A stale script still holding attempt 1's handle cannot finish attempt 2.
    stale = kubectl(cluster, "complete", first, "--result", "stale")
    assert stale.returncode == 7 and "attempt 2" in stale.stderr, stale.stderr
    # Nor can one that names the order alone, relying on "the current attempt".
    vague = kubectl(cluster, "complete", "job", "-n", namespace, "--id", first.rsplit(":", 1)[1])
    assert vague.returncode == 2 and "--uid" in vague.stderr and "--attempt" in vague.stderr, vague.stderr
    order = Agent(cluster.api, AGENT_ID).read(namespace, "job")
    assert order.status.phase == "Claimed" and order.status.attempt == 2 and order.status.result is None

    ok(kubectl(cluster, "complete", second, "--result", "right"))
    assert Agent(cluster.api, AGENT_ID).read(namespace, "job").status.result == "right"


def test_a_handle_of_a_deleted_order_does_not_act_on_its_recreated_namesake(cluster: Cluster, namespace: str) -> None:
    create_order(cluster.api, namespace, "again")
    old = ok(kubectl(cluster, "claim", "again", "-n", namespace, "--id", AGENT_ID)).strip()
    ok(subprocess.run(["kubectl", "--kubeconfig", str(cluster.kubeconfig), "delete", "workorder", "again", "-n",
                       namespace, "--wait"], capture_output=True, text=True, timeout=60))  # fmt: skip
    create_order(cluster.api, namespace, "again")
    ok(kubectl(cluster, "claim", "again", "-n", namespace, "--id", AGENT_ID))  # attempt 1 again, same agent
    stale = kubectl(cluster, "complete", old)
    assert stale.returncode == 7 and "deleted and created again" in stale.stderr, stale.stderr


def test_errors_are_one_actionable_line(cluster: Cluster, namespace: str, tmp_path: Path) -> None:
    missing = kubectl(cluster, "get", "nope", "-n", namespace)
    assert missing.returncode == 6 and "nope" in missing.stderr and "Traceback" not in missing.stderr

    nowhere = tmp_path / "nowhere"
    cfg = yaml.safe_load(cluster.kubeconfig.read_text())
    cfg["clusters"][0]["cluster"]["server"] = "https://127.0.0.1:1"
    nowhere.write_text(yaml.safe_dump(cfg))
    down = kubectl(cluster, "list", "-n", namespace, kubeconfig=nowhere)
    assert down.returncode == 3 and "cannot reach" in down.stderr and "Traceback" not in down.stderr

    stranger = cluster.user_kubeconfig("stranger")
    denied = kubectl(cluster, "list", "-n", namespace, kubeconfig=stranger)
    assert denied.returncode == 5 and "forbidden" in denied.stderr and "Traceback" not in denied.stderr

    no_file = kubectl(cluster, "create", "--type", "test", "-f", str(tmp_path / "missing.yaml"), "-n", namespace)
    assert no_file.returncode == 9, no_file.stderr
    assert "missing.yaml" in no_file.stderr and "No such file" in no_file.stderr and "Traceback" not in no_file.stderr

    content = tmp_path / "job.yaml"
    content.write_text("echo: hi\n")
    no_ns = kubectl(cluster, "create", "--type", "test", "-f", str(content), "-n", "no-such-namespace")
    assert no_ns.returncode == 10, no_ns.stderr
    assert "namespace 'no-such-namespace' does not exist" in no_ns.stderr and "CRD" not in no_ns.stderr


def test_error_for_a_missing_crd_names_the_fix() -> None:

    from workorder_operator.cli import explain

    err = explain(ApiException(status=404, reason="Not Found"), None)
    assert err.code == 4 and "kubectl apply --server-side -f crds/" in str(err)


SCRIPT = """
import os, sys
content = sys.stdin.read()
mode = content.split(":")[1].strip()
print("working on", os.environ["WORKORDER_NAME"], "attempt", os.environ["WORKORDER_ATTEMPT"], flush=True)
if mode == "ok":
    print("sha256:" + os.environ["WORKORDER_NAME"])
    sys.exit(0)
if mode == "tempfail":
    print("try later", file=sys.stderr)
    sys.exit(75)
if mode == "sleep":
    import time
    time.sleep(60)
print("broken input", file=sys.stderr)
sys.exit(3)
"""


def start_agent(
    cluster: Cluster, namespace: str, tmp_path: Path, *extra: str, work_type: str = "script"
) -> subprocess.Popen[str]:
    script = tmp_path / "work.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, KUBECONFIG=str(cluster.kubeconfig))
    return subprocess.Popen(
        ["kubectl", "workorder", "agent", "run", "-n", namespace, "--id", AGENT_ID, "--type", work_type,
         *extra, "--", sys.executable, str(script)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip


def stop_agent(proc: subprocess.Popen[str]) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return out


def test_agent_run_turns_a_script_into_an_agent(cluster: Cluster, namespace: str, tmp_path: Path) -> None:
    proc = start_agent(cluster, namespace, tmp_path, "--concurrency", "3")
    try:
        create_order(cluster.api, namespace, "good", workType="script", yamlContent="mode: ok")
        create_order(
            cluster.api, namespace, "flaky", workType="script", yamlContent="mode: tempfail", backoffSeconds=600
        )
        create_order(cluster.api, namespace, "broken", workType="script", yamlContent="mode: broken")
        create_order(cluster.api, namespace, "other", workType="not-mine")
        a = Agent(cluster.api, AGENT_ID)

        def settled() -> bool:
            phases = {n: a.read(namespace, n).status.phase for n in ("good", "flaky", "broken")}
            return phases == {"good": "Completed", "flaky": "RetryPending", "broken": "Failed"}

        wait_for(settled, timeout=20, what="all three scripted orders to settle")
        good = a.read(namespace, "good")
        assert good.status.result == "sha256:good"
        assert "exit code 75" in (a.read(namespace, "flaky").status.last_error or "")
        assert "broken input" in (a.read(namespace, "broken").status.result or "")
        assert a.read(namespace, "other").status.phase == "Pending"
    finally:
        out = stop_agent(proc)
    assert proc.returncode == 0, out
    assert "[good] working on good attempt 1" in out
    # One line per order says how its attempt ended (issue 17), not just the start-up line.
    lines = out.splitlines()
    for name in ("good", "flaky", "broken"):
        assert f"{namespace}/{name} attempt 1: claimed" in lines, out
    assert any(re.fullmatch(rf"{namespace}/good attempt 1: completed in \d+\.\ds", line) for line in lines), out
    assert any(re.fullmatch(rf"{namespace}/flaky attempt 1: failed \(retryable: exit 75\) in \d+\.\ds; "
                            r"retry 1 of 3 after \d\d:\d\d:\d\d", line) for line in lines), out  # fmt: skip
    assert any(re.fullmatch(rf"{namespace}/broken attempt 1: failed \(final: exit 3\) in \d+\.\ds", line)
               for line in lines), out  # fmt: skip


@pytest.mark.parametrize("mode", ["missing", "not-executable"])
def test_agent_run_refuses_a_command_it_cannot_run_and_claims_nothing(
    cluster: Cluster, namespace: str, tmp_path: Path, mode: str
) -> None:
    create_order(cluster.api, namespace, "waiting", workType="script")
    script = tmp_path / "wrok.sh"
    if mode == "not-executable":
        script.write_text("#!/bin/sh\nexit 0\n")
    env = dict(os.environ, KUBECONFIG=str(cluster.kubeconfig))
    result = subprocess.run(
        ["kubectl", "workorder", "agent", "run", "-n", namespace, "--type", "script", "--", str(script)],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert result.returncode == 11, result
    said = {
        "missing": f"error: command '{script}' not found; nothing was claimed",
        "not-executable": f"error: command '{script}' is not executable (chmod +x {script}); nothing was claimed",
    }
    assert result.stderr.strip() == said[mode]
    bare = subprocess.run(["kubectl", "workorder", "agent", "run", "-n", namespace, "--", "no-such-tool-xyz"],
                          capture_output=True, text=True, env=env, timeout=60)  # fmt: skip
    assert (bare.returncode, bare.stderr.strip()) == (
        11,
        "error: command 'no-such-tool-xyz' not found on PATH; nothing was claimed",
    )
    assert Agent(cluster.api, AGENT_ID).read(namespace, "waiting").status.phase == "Pending"


def test_agent_run_sigterm_releases_in_flight_orders(cluster: Cluster, namespace: str, tmp_path: Path) -> None:
    proc = start_agent(cluster, namespace, tmp_path, "--shutdown-grace", "1")
    try:
        create_order(cluster.api, namespace, "long", workType="script", yamlContent="mode: sleep")
        a = Agent(cluster.api, AGENT_ID)
        wait_for(lambda: a.read(namespace, "long").status.phase == "Claimed", timeout=10)
        time.sleep(0.5)
        started = time.monotonic()
    finally:
        out = stop_agent(proc)
    assert proc.returncode == 0, out
    assert time.monotonic() - started < 15
    order = a.read(namespace, "long")
    assert order.status.phase == "Pending"
    assert order.raw_status["history"][-1]["outcome"] == "Released"


def test_agent_run_timeout_kills_and_fails_the_attempt(cluster: Cluster, namespace: str, tmp_path: Path) -> None:
    proc = start_agent(cluster, namespace, tmp_path, "--timeout", "1")
    try:
        create_order(cluster.api, namespace, "stuck", workType="script", yamlContent="mode: sleep", backoffSeconds=600)
        a = Agent(cluster.api, AGENT_ID)
        order = wait_for(lambda: (o := a.read(namespace, "stuck")).status.phase == "RetryPending" and o, timeout=15)
        assert "timed out after 1s" in (order.status.last_error or "")
    finally:
        stop_agent(proc)


def test_agent_run_retryable_exit_codes_decide_what_is_retried(
    cluster: Cluster, namespace: str, tmp_path: Path
) -> None:
    # Exit 3 is now the retryable one, and 75 (the default) no longer is.
    proc = start_agent(cluster, namespace, tmp_path, "--retryable-exit-codes", "3,4")
    try:
        create_order(
            cluster.api, namespace, "broken", workType="script", yamlContent="mode: broken", backoffSeconds=600
        )
        create_order(cluster.api, namespace, "flaky", workType="script", yamlContent="mode: tempfail")
        a = Agent(cluster.api, AGENT_ID)

        def settled() -> bool:
            phases = {n: a.read(namespace, n).status.phase for n in ("broken", "flaky")}
            return phases == {"broken": "RetryPending", "flaky": "Failed"}

        wait_for(settled, timeout=20, what="exit 3 retried, exit 75 final")
        assert "exit code 3" in (a.read(namespace, "broken").status.last_error or "")
    finally:
        stop_agent(proc)


def test_agent_run_labels_and_annotations_admit_targeted_orders(
    cluster: Cluster, namespace: str, tmp_path: Path
) -> None:
    # The orders it may not take come first (older, same priority): it would take them first if it could.
    create_order(cluster.api, namespace, "for-cpu", workType="script", yamlContent="mode: ok",
                 targeting={"labels": ["cpu"]})  # fmt: skip
    create_order(cluster.api, namespace, "for-us", workType="script", yamlContent="mode: ok",
                 targeting={"annotations": {"zone": "us"}})  # fmt: skip
    create_order(cluster.api, namespace, "for-gpu", workType="script", yamlContent="mode: ok",
                 targeting={"labels": ["gpu"]})  # fmt: skip
    create_order(cluster.api, namespace, "for-eu", workType="script", yamlContent="mode: ok",
                 targeting={"annotations": {"zone": "eu"}})  # fmt: skip
    proc = start_agent(cluster, namespace, tmp_path, "--label", "gpu", "--label", "fast", "--annotation", "zone=eu")
    a = Agent(cluster.api, AGENT_ID)
    try:
        for name in ("for-gpu", "for-eu"):
            wait_for(lambda n=name: a.read(namespace, n).status.phase == "Completed", timeout=20, what=name)  # type: ignore[misc]
    finally:
        out = stop_agent(proc)
    for name in ("for-cpu", "for-us"):
        order = a.read(namespace, name)
        assert (order.status.phase, order.status.attempt) == ("Pending", 0), name
    assert "for-cpu" not in out and "for-us" not in out


def test_agent_run_all_namespaces(cluster: Cluster, namespace: str, other_namespace: str, tmp_path: Path) -> None:
    # A work type no other test uses: -A sees every namespace of the shared cluster.
    work_type = f"script-{uuid.uuid4().hex[:6]}"
    for ns in (namespace, other_namespace):
        create_order(cluster.api, ns, "here", workType=work_type, yamlContent="mode: ok")
    # Only that type: with `script` too it would also take (oldest first) other tests' leftovers.
    proc = start_agent(cluster, namespace, tmp_path, "-A", work_type=work_type)
    a = Agent(cluster.api, AGENT_ID)
    try:
        for ns in (namespace, other_namespace):
            wait_for(lambda n=ns: a.read(n, "here").status.phase == "Completed", timeout=20, what=ns)  # type: ignore[misc]
    finally:
        stop_agent(proc)


HOSTILE = "\x1b]0;owned\x07\x1b[2J\rfake line\u202egnp.exe\u200b\x9b"
ESCAPED = "^[]0;owned\\x07^[[2J\\rfake line\\u202egnp.exe\\u200b\\x9b"


def test_what_agents_wrote_is_printed_escaped_never_interpreted(cluster: Cluster, namespace: str) -> None:
    """A least-privileged agent (a client certificate with the agent's rights in one namespace)
    writes terminal control sequences into an order's record and its presence lease; every
    command prints them visibly, as kubectl escapes ESC and CR, and nothing invisible survives."""
    agent_rules = [
        {"apiGroups": ["workorder.dev"], "resources": ["workorders"], "verbs": ["get", "list", "watch"]},
        {"apiGroups": ["workorder.dev"], "resources": ["workorders/status"], "verbs": ["get", "patch"]},
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["get", "create", "patch"]},
    ]
    bind_rules(cluster.api, namespace, "hostile-agent", agent_rules)
    api = config.new_client_from_config(str(cluster.user_kubeconfig("hostile-agent")))
    create_order(cluster.api, namespace, "victim", maxRetries=1)
    agent = Agent(api, AGENT_ID)
    order = wait_for(lambda: _readable(agent, namespace, "victim"), timeout=20, what="the agent's rights")
    agent.fail(agent.claim(order), HOSTILE)
    identity = AgentIdentity(AGENT_ID, labels=(HOSTILE[:60],))
    lease = fleet.lease_body(identity, work_types=["test"], user="hostile-agent", namespaces=[], duration=30,
                             now=utcnow(), acquired=True)  # fmt: skip
    PresenceLeases(api, "hostile").put(namespace, lease)

    shown = {
        "history": ok(kubectl(cluster, "history", "victim", "-n", namespace)),
        "list": ok(kubectl(cluster, "list", "-n", namespace, "-o", "wide")),
        "agents": ok(kubectl(cluster, "agents", "-n", namespace, "-o", "wide")),
    }
    for command, out in shown.items():
        invisible = [c for c in out if not (c.isprintable() or c == "\n")]
        assert not invisible, f"{command} printed {invisible!r} raw:\n{out!r}"
    assert ESCAPED[:60] in shown["history"].splitlines()[1], shown["history"]
    assert ESCAPED[:40] in shown["agents"], shown["agents"]
    # -o json and -o yaml escape by their own rules and keep the bytes exactly.
    body = json.loads(ok(kubectl(cluster, "get", "victim", "-n", namespace, "-o", "json")))
    assert body["status"]["lastError"] == HOSTILE
    assert "\x1b" not in ok(kubectl(cluster, "get", "victim", "-n", namespace, "-o", "yaml"))


def _readable(agent: Agent, namespace: str, name: str) -> WorkOrder | None:
    try:
        return agent.read(namespace, name)
    except Exception:
        return None


@pytest.mark.parametrize(
    ("field", "spec", "words"),
    [
        ("spec.workType", {"workType": "build\x1b[2J"}, ("spec.workType", "should match")),
        ("spec.workType", {"workType": "build\u200b"}, ("spec.workType", "should match")),
        ("spec.targeting.labels", {"targeting": {"labels": ["gpu\x07"]}}, ("spec.targeting.labels[0]",)),
        ("spec.targeting.annotations", {"targeting": {"annotations": {"zone": "a\u202eb"}}},
         ("spec.targeting.annotations.zone",)),
        ("spec.targeting.annotations", {"targeting": {"annotations": {"z\x1bone": "a"}}},
         ("spec.targeting.annotations", "printable ASCII")),
    ],
)  # fmt: skip
def test_work_types_labels_and_annotations_are_printable(
    cluster: Cluster, namespace: str, field: str, spec: dict[str, object], words: tuple[str, ...]
) -> None:
    """The CRD admits only what every tool prints as it is; the refusal names the field. Sent
    by a tenant who may only create orders."""
    bind_rules(cluster.api, namespace, "creator", [
        {"apiGroups": ["workorder.dev"], "resources": ["workorders"], "verbs": ["create", "get"]},
    ])  # fmt: skip
    api = config.new_client_from_config(str(cluster.user_kubeconfig("creator")))

    def refusal() -> str | None:
        try:
            create_order(api, namespace, "hostile", **spec)
        except WorkOrderError as exc:
            return None if exc.status == 403 else str(exc)
        raise AssertionError(f"{field}: {spec!r} was admitted")

    message = wait_for(refusal, timeout=20, what="the creator's rights")
    assert all(w in message for w in words), message
