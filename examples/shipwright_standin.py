"""A stand-in for the Shipwright controller, for `make demo` only (no Tekton or nodes here): it
registers every Build in a namespace and, two seconds after a BuildRun appears, marks it Succeeded
with a made-up image digest, writing the same status fields the real controller writes."""

from __future__ import annotations

import hashlib
import sys
import time

from kubernetes import client, config

from tests.shipwright_sim import Shipwright
from workorder_operator.shipwright import BUILDRUNS, BUILDS, GROUP, VERSION


def main(namespace: str) -> None:
    api = config.new_client_from_config()
    sw = Shipwright(api, namespace)
    objects = client.CustomObjectsApi(api)
    seen: dict[str, float] = {}
    while True:
        for b in objects.list_namespaced_custom_object(GROUP, VERSION, namespace, BUILDS)["items"]:
            if not b.get("status", {}).get("registered"):
                sw.register(b["metadata"]["name"])
        for r in objects.list_namespaced_custom_object(GROUP, VERSION, namespace, BUILDRUNS)["items"]:
            name = r["metadata"]["name"]
            if r.get("status", {}).get("conditions"):
                continue
            first = seen.setdefault(name, time.monotonic())
            if time.monotonic() - first > 2:
                sw.succeed(name, "sha256:" + hashlib.sha256(name.encode()).hexdigest())
        time.sleep(0.5)


if __name__ == "__main__":
    main(sys.argv[1])
