"""A real, local Kubernetes control plane for development and tests (envtest style).

etcd, kube-apiserver and kube-controller-manager (garbage collector, namespace, service-account
and ClusterRole-aggregation controllers only) run as child processes on 127.0.0.1 with free ports,
and, once its APIs are installed, Shipwright's real build controller. Certificates, the
service-account signing key and an admin kubeconfig are made here with `cryptography`. Binaries
come from ``KUBEBUILDER_ASSETS`` when it holds them, else from the version-keyed cache that
``tools/build-controlplane.sh`` fills.

No kubelet runs, so nothing runs Tekton's pods: TaskRuns stay as Shipwright creates them until
someone plays Tekton's part (the tests and the demo do).

Command line (used by the Makefile)::

    python -m workorder_operator.envtest up DIR     # start in the background (with Shipwright), wait until ready
    python -m workorder_operator.envtest down DIR   # stop what `up` started
    python -m workorder_operator.envtest crds       # install WorkOrder, Shipwright and Tekton CRDs (KUBECONFIG)
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime as dt
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

K8S_VERSION = "v1.34.4"
ETCD_VERSION = "v3.6.16"
SHIPWRIGHT_VERSION = "v0.20.13"
SHIPWRIGHT_MODULE = f"github.com/shipwright-io/build@{SHIPWRIGHT_VERSION}"
# The Tekton Pipeline release Shipwright's go.mod requires: its TaskRun API is what Shipwright runs.
TEKTON_MODULE = "github.com/tektoncd/pipeline@v1.12.0"
# Shipwright's sample ClusterBuildStrategies installed with its CRDs (samples/v1beta1/buildstrategy/).
STRATEGY_SAMPLES = (
    "kaniko/buildstrategy_kaniko_cr.yaml",
    "buildah/buildstrategy_buildah_shipwright_managed_push_cr.yaml",
    "buildah/buildstrategy_buildah_strategy_managed_push_cr.yaml",
)
SHIPWRIGHT_CONTROLLER = "shipwright-build-controller"

CACHE_DIR = Path(os.environ.get("WORKORDER_CACHE", Path.home() / ".cache" / "workorder-operator"))
REPO_ROOT = Path(__file__).resolve().parents[2]


class ControlPlaneError(RuntimeError):
    """The control plane could not be found, started or reached."""


def binary_path(name: str) -> Path:
    """Locate kube-apiserver, kube-controller-manager or etcd.

    ``KUBEBUILDER_ASSETS`` wins when it holds the binary (setup-envtest ships kube-apiserver and
    etcd, not kube-controller-manager, which then comes from our cache).
    """
    assets = os.environ.get("KUBEBUILDER_ASSETS")
    if assets and (Path(assets) / name).is_file():
        return Path(assets) / name
    version = ETCD_VERSION if name == "etcd" else K8S_VERSION
    prefix = "etcd" if name == "etcd" else "k8s"
    path = CACHE_DIR / "bin" / f"{prefix}-{version}" / name
    if not path.is_file():
        raise ControlPlaneError(f"{name} not found at {path}; run `make binaries` (or set KUBEBUILDER_ASSETS)")
    return path


def shipwright_binary() -> Path | None:
    """Our build of Shipwright's controller (tools/shipwright), or None if `make binaries` has not made it."""
    path = CACHE_DIR / "bin" / f"shipwright-{SHIPWRIGHT_VERSION}" / SHIPWRIGHT_CONTROLLER
    return path if path.is_file() else None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- certificates -------------------------------------------------------------------------------


def _key_pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write_key_bytes(path: Path, pem: bytes) -> None:
    path.write_bytes(pem)
    path.chmod(0o600)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> None:
    _write_key_bytes(path, _key_pem(key))


def _cert(
    subject: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool = False,
    server: bool = False,
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
    else:
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    x509.DNSName("localhost"),
                    x509.DNSName("kubernetes"),
                    x509.DNSName("kubernetes.default"),
                    x509.DNSName("kubernetes.default.svc"),
                ]
            ),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@dataclass
class Pki:
    """The cluster's CA, serving certificate and service-account key, kept in one directory."""

    directory: Path

    @property
    def ca_cert(self) -> Path:
        return self.directory / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.directory / "ca.key"

    def create(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "workorder-envtest-ca")])
        self.ca_cert.write_bytes(_pem(_cert(ca_name, ca_key, ca_name, ca_key, ca=True)))
        _write_key(self.ca_key, ca_key)
        serving_key = ec.generate_private_key(ec.SECP256R1())
        serving = _cert(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]),
            serving_key,
            ca_name,
            ca_key,
            server=True,
        )
        (self.directory / "apiserver.crt").write_bytes(_pem(serving))
        _write_key(self.directory / "apiserver.key", serving_key)
        sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        _write_key(self.directory / "sa.key", sa_key)
        (self.directory / "sa.pub").write_bytes(
            sa_key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )

    def client_cert(self, user: str, groups: Sequence[str] = ()) -> tuple[bytes, bytes]:
        """A client certificate for `user` in `groups` (the API server maps CN/O to them)."""
        ca_key = serialization.load_pem_private_key(self.ca_key.read_bytes(), None)
        assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
        ca = x509.load_pem_x509_certificate(self.ca_cert.read_bytes())
        key = ec.generate_private_key(ec.SECP256R1())
        attrs = [x509.NameAttribute(NameOID.COMMON_NAME, user)]
        attrs += [x509.NameAttribute(NameOID.ORGANIZATION_NAME, g) for g in groups]
        cert = _cert(x509.Name(attrs), key, ca.subject, ca_key)
        return _pem(cert), _key_pem(key)


# --- the control plane --------------------------------------------------------------------------


@dataclass
class ControlPlane:
    """etcd + kube-apiserver + kube-controller-manager, rooted in `directory`."""

    directory: Path
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    args: dict[str, list[str]] = field(default_factory=dict)
    apiserver_port: int = 0

    @property
    def pki(self) -> Pki:
        return Pki(self.directory / "pki")

    @property
    def kubeconfig(self) -> Path:
        return self.directory / "kubeconfig"

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.apiserver_port}"

    def _spawn(self, name: str, args: list[str], *, detach: bool) -> None:
        self.args[name] = args
        log = open(self.directory / f"{name}.log", "ab")  # noqa: SIM115 - the child owns it
        proc = subprocess.Popen(
            args,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=detach,
        )
        log.close()
        self.processes[name] = proc
        (self.directory / f"{name}.pid").write_text(str(proc.pid))

    def start(self, *, detach: bool = False, timeout: float = 60.0) -> None:
        """Start all three and return once /readyz answers 200 and the controllers run."""
        self.directory.mkdir(parents=True, exist_ok=True)
        try:
            self._start(detach=detach, timeout=timeout)
        except BaseException:
            self.stop()
            raise

    def _start(self, *, detach: bool, timeout: float) -> None:
        started = time.monotonic()
        pki = self.pki
        pki.create()
        etcd_port, peer_port = free_port(), free_port()
        data = self.directory / "etcd-data"
        shutil.rmtree(data, ignore_errors=True)
        self._spawn(
            "etcd",
            [
                str(binary_path("etcd")),
                "--name=default",
                f"--data-dir={data}",
                f"--listen-client-urls=http://127.0.0.1:{etcd_port}",
                f"--advertise-client-urls=http://127.0.0.1:{etcd_port}",
                f"--listen-peer-urls=http://127.0.0.1:{peer_port}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}",
                f"--initial-cluster=default=http://127.0.0.1:{peer_port}",
                # Test data is disposable: skipping fsync makes every write several times faster.
                "--unsafe-no-fsync=true",
                "--quota-backend-bytes=4294967296",
                "--log-level=warn",
            ],
            detach=detach,
        )
        self.apiserver_port = free_port()
        d = pki.directory
        self._spawn(
            "kube-apiserver",
            [
                str(binary_path("kube-apiserver")),
                f"--etcd-servers=http://127.0.0.1:{etcd_port}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={self.apiserver_port}",
                f"--cert-dir={d}",
                f"--tls-cert-file={d / 'apiserver.crt'}",
                f"--tls-private-key-file={d / 'apiserver.key'}",
                f"--client-ca-file={pki.ca_cert}",
                "--authorization-mode=RBAC",
                f"--service-account-key-file={d / 'sa.pub'}",
                f"--service-account-signing-key-file={d / 'sa.key'}",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                "--service-cluster-ip-range=10.0.0.0/24",
                "--endpoint-reconciler-type=none",
                "--allow-privileged=true",
                "--v=0",
            ],
            detach=detach,
        )
        self._write_kubeconfig(self.kubeconfig, "admin", ["system:masters"])
        self._wait_ready(timeout - (time.monotonic() - started))
        self._spawn(
            "kube-controller-manager",
            [
                str(binary_path("kube-controller-manager")),
                f"--kubeconfig={self.kubeconfig}",
                f"--authentication-kubeconfig={self.kubeconfig}",
                f"--authorization-kubeconfig={self.kubeconfig}",
                # Only what the tests need: owner-reference GC, namespace deletion, each
                # namespace's `default` ServiceAccount (Shipwright runs BuildRuns as it), and the
                # aggregation of ClusterRoles into admin/edit/view.
                "--controllers=garbagecollector,namespace,serviceaccount,clusterrole-aggregation",
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                f"--secure-port={free_port()}",
                f"--cert-dir={d}",
                "--v=0",
            ],
            detach=detach,
        )
        (self.directory / "state.json").write_text(json.dumps({"apiserver": self.url}))

    def _write_kubeconfig(self, path: Path, user: str, groups: Sequence[str]) -> None:
        cert, key = self.pki.client_cert(user, groups)
        # ssl (the readiness probe) wants the admin credentials as files, not kubeconfig data.
        (self.pki.directory / f"{path.name}.crt").write_bytes(cert)
        _write_key_bytes(self.pki.directory / f"{path.name}.key", key)
        path.write_text(kubeconfig_yaml(self.url, self.pki.ca_cert.read_bytes(), cert, key, user))
        path.chmod(0o600)

    def user_kubeconfig(self, user: str, groups: Sequence[str] = ()) -> Path:
        """A kubeconfig for another identity (for RBAC and admission tests)."""
        path = self.directory / f"kubeconfig-{user.replace(':', '_')}"
        self._write_kubeconfig(path, user, groups)
        return path

    def _wait_ready(self, timeout: float) -> None:
        ctx = ssl.create_default_context(cafile=str(self.pki.ca_cert))
        d = self.pki.directory
        ctx.load_cert_chain(d / f"{self.kubeconfig.name}.crt", d / f"{self.kubeconfig.name}.key")
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            for name, proc in self.processes.items():
                if proc.poll() is not None:
                    tail = (self.directory / f"{name}.log").read_text(errors="replace")[-2000:]
                    raise ControlPlaneError(f"{name} exited with {proc.returncode}:\n{tail}")
            try:
                with urllib.request.urlopen(f"{self.url}/readyz", context=ctx, timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError as exc:
                last = str(exc)
            time.sleep(0.2)
        raise ControlPlaneError(f"kube-apiserver not ready after {timeout:.0f}s: {last}")

    def start_shipwright(self, *, detach: bool = False, timeout: float = 60.0) -> None:
        """Install Shipwright's and Tekton's CRDs and the sample strategies, then run Shipwright's
        controller (it exits at start without the TaskRun API) and wait until it reconciles."""
        binary = shipwright_binary()
        if binary is None:
            raise ControlPlaneError(f"{SHIPWRIGHT_CONTROLLER} not built; run `make binaries`")
        from kubernetes import config

        api = config.new_client_from_config(str(self.kubeconfig))
        try:
            install_shipwright(api)
        finally:
            api.close()
        self._spawn(
            SHIPWRIGHT_CONTROLLER,
            [str(binary), f"--kubeconfig={self.kubeconfig}", "--zap-log-level=info", "--zap-time-encoding=iso8601"],
            detach=detach,
        )
        self._wait_log(SHIPWRIGHT_CONTROLLER, b"Starting workers", timeout)

    def stop_shipwright(self) -> None:
        self._stop(SHIPWRIGHT_CONTROLLER)

    def _wait_log(self, name: str, line: bytes, timeout: float) -> None:
        log = self.directory / f"{name}.log"
        seen = log.read_bytes().count(line) if log.exists() else 0
        deadline = time.monotonic() + timeout
        proc = self.processes[name]
        while log.read_bytes().count(line) <= seen:
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text(errors="replace")[-2000:]
                self._stop(name)
                raise ControlPlaneError(f"{name} did not start (exit code {proc.returncode}):\n{tail}")
            time.sleep(0.1)

    def restart(self, down: float = 2.0, timeout: float = 60.0) -> None:
        """Stop etcd, kube-apiserver and the controllers, wait `down` seconds, start them again on
        the same ports and data (a control-plane outage, for fault tests)."""
        shipwright = SHIPWRIGHT_CONTROLLER in self.processes
        self.stop()
        time.sleep(down)
        for name in ("etcd", "kube-apiserver"):
            self._spawn(name, self.args[name], detach=False)
        self._wait_ready(timeout)
        self._spawn("kube-controller-manager", self.args["kube-controller-manager"], detach=False)
        if shipwright:
            self._spawn(SHIPWRIGHT_CONTROLLER, self.args[SHIPWRIGHT_CONTROLLER], detach=False)

    def stop(self) -> None:
        """Stop every process (controllers first, etcd last), even half-started ones."""
        for name in PROCESSES:
            self._stop(name)

    def _stop(self, name: str) -> None:
        proc = self.processes.pop(name, None)
        if proc is not None:
            _terminate(proc.pid, proc)
        (self.directory / f"{name}.pid").unlink(missing_ok=True)


# In stopping order: controllers before the API server, etcd last.
PROCESSES = (SHIPWRIGHT_CONTROLLER, "kube-controller-manager", "kube-apiserver", "etcd")


def _terminate(pid: int, proc: subprocess.Popen[bytes] | None = None) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc is not None:
            if proc.poll() is not None:
                return
        else:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    if proc is not None:
        proc.wait()


def kubeconfig_yaml(server: str, ca: bytes, cert: bytes, key: bytes, user: str) -> str:
    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    return yaml.safe_dump(
        {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "envtest", "cluster": {"server": server, "certificate-authority-data": b64(ca)}}],
            "users": [{"name": user, "user": {"client-certificate-data": b64(cert), "client-key-data": b64(key)}}],
            "contexts": [{"name": "envtest", "context": {"cluster": "envtest", "user": user}}],
            "current-context": "envtest",
        }
    )


# --- CRDs ---------------------------------------------------------------------------------------


def module_dir(module: str) -> Path:
    """A Go module's files, from the module cache (downloaded once through the module proxy)."""
    out = subprocess.run(
        ["go", "mod", "download", "-json", module],
        capture_output=True,
        text=True,
        check=False,
        cwd=CACHE_DIR if CACHE_DIR.is_dir() else None,
    )
    info: dict[str, Any] = json.loads(out.stdout or "{}")
    if out.returncode != 0 or "Dir" not in info:
        raise ControlPlaneError(f"cannot download {module}: {info.get('Error') or out.stderr}")
    return Path(info["Dir"])


def _crds_without_webhook(paths: Sequence[Path]) -> list[dict[str, Any]]:
    # Both projects convert between their API versions with a webhook, which does not run here;
    # every object is written and read at the storage version, so no conversion is needed.
    crds = []
    for path in paths:
        crd = yaml.safe_load(path.read_text())
        crd["spec"]["conversion"] = {"strategy": "None"}
        crds.append(crd)
    return crds


def shipwright_crds() -> list[dict[str, Any]]:
    """Shipwright's CRDs (Build, BuildRun, BuildStrategy, ClusterBuildStrategy)."""
    return _crds_without_webhook(
        sorted((module_dir(SHIPWRIGHT_MODULE) / "deploy" / "crds").glob("shipwright.io_*.yaml"))
    )


def tekton_crds() -> list[dict[str, Any]]:
    """Tekton Pipeline's CRDs (TaskRun among them), which Shipwright's controller needs to start."""
    return _crds_without_webhook(sorted((module_dir(TEKTON_MODULE) / "config" / "300-crds").glob("*.yaml")))


def build_strategies() -> list[dict[str, Any]]:
    """Shipwright's sample ClusterBuildStrategies (kaniko, buildah), as Shipwright ships them."""
    root = module_dir(SHIPWRIGHT_MODULE) / "samples" / "v1beta1" / "buildstrategy"
    return [yaml.safe_load((root / sample).read_text()) for sample in STRATEGY_SAMPLES]


def install_shipwright(api_client: Any) -> None:
    """Shipwright's and Tekton's CRDs, then the sample strategies (server-side apply: idempotent)."""
    from kubernetes import client

    crds = shipwright_crds() + tekton_crds()
    install_crds(api_client, crds)
    _wait_served(api_client, crds)
    objects = client.CustomObjectsApi(api_client)
    for strategy in build_strategies():
        objects.patch_cluster_custom_object(
            "shipwright.io", "v1beta1", "clusterbuildstrategies", strategy["metadata"]["name"], strategy,
            field_manager="workorder-envtest", force=True, _content_type="application/apply-patch+yaml",
        )  # fmt: skip


def workorder_crds() -> list[dict[str, Any]]:
    return [yaml.safe_load(p.read_text()) for p in sorted((REPO_ROOT / "crds").glob("*.yaml"))]


def install_crds(api_client: Any, crds: Sequence[dict[str, Any]], timeout: float = 30.0) -> None:
    """Create or replace CRDs (server-side: the BuildRun CRD is too big for client-side apply)."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    ext = client.ApiextensionsV1Api(api_client)
    for crd in crds:
        name = crd["metadata"]["name"]
        try:
            ext.create_custom_resource_definition(crd)
        except ApiException as exc:
            if exc.status != 409:
                raise
            current = ext.read_custom_resource_definition(name)
            crd = {
                **crd,
                "metadata": {**crd["metadata"], "resourceVersion": current.metadata.resource_version},
            }
            ext.replace_custom_resource_definition(name, crd)
    deadline = time.monotonic() + timeout
    for crd in crds:
        name = crd["metadata"]["name"]
        while True:
            conds = ext.read_custom_resource_definition(name).status.conditions or []
            if any(c.type == "Established" and c.status == "True" for c in conds):
                break
            if time.monotonic() > deadline:
                raise ControlPlaneError(f"CRD {name} not established after {timeout:.0f}s")
            time.sleep(0.1)


def _wait_served(api_client: Any, crds: Sequence[dict[str, Any]], timeout: float = 30.0) -> None:
    """Wait until discovery serves every CRD's resources: a controller that starts on an
    Established CRD can still miss it in discovery for a moment, and controller-runtime gives up."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    wanted: dict[tuple[str, str], set[str]] = {}
    for crd in crds:
        spec = crd["spec"]
        for version in spec["versions"]:
            if version.get("served"):
                wanted.setdefault((spec["group"], version["name"]), set()).add(spec["names"]["plural"])
    objects = client.CustomObjectsApi(api_client)
    deadline = time.monotonic() + timeout
    for (group, version), plurals in wanted.items():
        while True:
            try:
                served = {r.name for r in objects.get_api_resources(group, version).resources or []}
                if plurals <= served:
                    break
            except ApiException as exc:
                if exc.status != 404:
                    raise
            if time.monotonic() > deadline:
                raise ControlPlaneError(f"{group}/{version} does not serve {sorted(plurals)} after {timeout:.0f}s")
            time.sleep(0.1)


# --- command line -------------------------------------------------------------------------------


def _cmd_up(directory: Path) -> int:
    state = directory / "state.json"
    if state.exists() and _running(directory):
        print(f"control plane already running ({json.loads(state.read_text())['apiserver']})")
        return 0
    _cmd_down(directory)
    started = time.monotonic()
    plane = ControlPlane(directory)
    plane.start(detach=True)
    print(f"control plane ready at {plane.url} in {time.monotonic() - started:.1f}s; kubeconfig {plane.kubeconfig}")
    if shipwright_binary() is None:
        print(
            f"note: {SHIPWRIGHT_CONTROLLER} not built (`make binaries`): build orders wait for a Shipwright controller"
        )
        return 0
    try:
        plane.start_shipwright(detach=True)
    except BaseException:
        plane.stop()
        raise
    print(f"Shipwright {SHIPWRIGHT_VERSION} controller running (Tekton CRDs and kaniko/buildah strategies installed)")
    return 0


def _running(directory: Path) -> bool:
    names: tuple[str, ...] = ("etcd", "kube-apiserver", "kube-controller-manager")
    if shipwright_binary() is not None:
        names += (SHIPWRIGHT_CONTROLLER,)
    for name in names:
        pidfile = directory / f"{name}.pid"
        if not pidfile.exists():
            return False
        try:
            os.kill(int(pidfile.read_text()), 0)
        except (ProcessLookupError, ValueError):
            return False
    return True


def _cmd_down(directory: Path) -> int:
    for name in PROCESSES:
        pidfile = directory / f"{name}.pid"
        if pidfile.exists():
            with contextlib.suppress(ValueError):
                _terminate(int(pidfile.read_text()))
            pidfile.unlink()
    (directory / "state.json").unlink(missing_ok=True)
    return 0


def _cmd_crds(shipwright: bool) -> int:
    from kubernetes import config

    api_client = config.new_client_from_config()
    crds = workorder_crds()
    install_crds(api_client, crds)
    print("installed CRDs: " + ", ".join(c["metadata"]["name"] for c in crds))
    if shipwright:
        install_shipwright(api_client)
        print("installed Shipwright and Tekton CRDs and the kaniko and buildah ClusterBuildStrategies")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workorder_operator.envtest", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("up", "down"):
        p = sub.add_parser(name)
        p.add_argument("directory", type=Path)
    crds = sub.add_parser("crds")
    crds.add_argument("--no-shipwright", action="store_true")
    args = parser.parse_args(argv)
    try:
        if args.command == "up":
            return _cmd_up(args.directory)
        if args.command == "down":
            return _cmd_down(args.directory)
        return _cmd_crds(not args.no_shipwright)
    except ControlPlaneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
