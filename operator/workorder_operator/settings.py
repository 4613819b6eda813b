"""The operator's settings: one typed object, every field documented (as kopf's `OperatorSettings`).

main.py fills it from the command line and hands it, with the executors registry, to the kopf
handlers through kopf's `memo`: nothing is a module global. Pure: no I/O.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field


def default_identity() -> str:
    """This replica's name: the pod's, else host and process."""
    return os.environ.get("POD_NAME") or f"{os.uname().nodename}-{os.getpid()}"


@dataclass
class LeaseConfig:
    """Leader election: the Lease that elects the one replica that acts."""

    # Where the Lease lives and its name.
    namespace: str
    name: str = "workorder-operator"
    # Seconds a leader's term lasts after its last renewal; standbys wait this long.
    lease_duration: float = 15.0
    # A leader that could not renew for this long steps down (before its lease runs out).
    renew_deadline: float = 10.0
    # Seconds between two renewals (or acquisition attempts).
    retry_period: float = 2.0


@dataclass
class Settings:
    """What the operator was told to do."""

    # kubeconfig file and context; both None: in-cluster config, then $KUBECONFIG / ~/.kube/config.
    kubeconfig: str | None = None
    context: str | None = None
    # API calls in flight at once (the engine's worker threads and connection pool).
    concurrency: int = 32
    # The namespaces watched; empty: all.
    namespaces: tuple[str, ...] = ()
    # Port of /metrics, /healthz and /readyz; 0: not served.
    metrics_port: int = 0
    # Address it listens on: this machine only unless asked (a pod asks for 0.0.0.0, so the
    # kubelet's probes and Prometheus reach it).
    metrics_address: str = "127.0.0.1"
    # Secure serving of the metrics port (the default): HTTPS, and a scrape of /metrics needs a
    # bearer token that the API server authenticates (TokenReview) of an identity it allows to
    # `get` the non-resource URL /metrics (SubjectAccessReview; the workorder-metrics-reader
    # role). The probes (/healthz, /readyz) never need a token. False (--metrics-insecure):
    # plain HTTP and anyone who reaches the port may scrape, for local development only.
    metrics_secure: bool = True
    # tls.crt and tls.key for the HTTPS port (read at start); None: a self-signed certificate
    # made at start, as controller-runtime does when it is given none.
    metrics_cert_dir: str | None = None
    # How long the API server's answer for one token is reused: an allowed scrape this many
    # seconds (so a revoked grant still scrapes for up to this long), a refused one at most 10;
    # and how many answers are kept (the least recently used go first).
    metrics_auth_cache_seconds: float = 60.0
    metrics_auth_cache_entries: int = 256
    # Live work types with series of their own; the others share type="_other" while they live.
    # A type's series go when its last order goes. About 36 series a type: the default bounds
    # the per-type series at some 3,600 whatever tenants create.
    metrics_max_types: int = 100
    # Leader election; None: no election, this replica acts at once (a single replica).
    lease: LeaseConfig | None = None
    # This replica's name (the Lease holder, the user agent in audit logs).
    identity: str = field(default_factory=default_identity)
    # Orders per list request (limit and continue) when the operator lists them: at start-up and
    # after its watch broke off.
    list_page_size: int = 500
    # Where the operator's own agents (the built-in build agent) announce themselves (fleet.py),
    # naming the namespaces they take orders in.
    presence_namespace: str = "default"
    # Seconds past an agent's presence lease term before the operator calls it lost and expires
    # its claims (a renewal on its way, a late watch event).
    presence_grace: float = 2.0
    # A Pending order that no live agent could take for this long is marked unschedulable
    # (Schedulable=False, reason NoMatchingAgent); 0: never.
    unschedulable_grace: float = 30.0
    # How often the leader looks for unschedulable orders (and marked ones an agent can now take),
    # and the most condition writes one look may make (the rest wait for the next).
    scheduling_interval: float = 5.0
    scheduling_writes: int = 50
