"""A stand-in for Tekton, for `make demo` only: no kubelet runs on the local control plane, so no
Tekton could run a TaskRun's pod. Everything else is real: Shipwright's controller registers the
Build, validates the BuildRun, creates the TaskRun and turns what this writes into the BuildRun's
status. This plays only the TaskRun: it starts each TaskRun Shipwright creates in a namespace and,
two seconds later, finishes it as Tekton would after a kaniko or buildah build: Succeeded, with the
image digest and size as the strategy's step reports them (TaskRun results `shp-image-digest` and
`shp-image-size`), or, for the first `--fail-first` TaskRuns of each Build, Failed in a step.

    python examples/tekton_standin.py NAMESPACE [--fail-first N]
"""

from __future__ import annotations

import argparse
import hashlib
import time
from collections import Counter

from kubernetes import client, config
from tests.tekton import BUILDRUN_LABEL, TASKRUNS, TEKTON, TEKTON_VERSION, Step, Tekton


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("namespace")
    parser.add_argument("--fail-first", type=int, default=0, help="fail this many TaskRuns of each Build first")
    args = parser.parse_args()
    api = config.new_client_from_config()
    tekton = Tekton(api, args.namespace)
    objects = client.CustomObjectsApi(api)
    started: dict[str, float] = {}
    failed: Counter[str] = Counter()
    while True:
        runs = objects.list_namespaced_custom_object(
            TEKTON, TEKTON_VERSION, args.namespace, TASKRUNS, label_selector=BUILDRUN_LABEL
        )["items"]
        for run in runs:
            name, status = run["metadata"]["name"], run.get("status") or {}
            if status.get("completionTime"):
                continue
            if run["spec"].get("status") == "TaskRunCancelled":
                tekton.cancelled(name)
            elif name not in started:
                tekton.start(name)
                started[name] = time.monotonic()
            elif time.monotonic() - started[name] > 2:
                build = run["metadata"]["labels"].get("build.shipwright.io/name", "")
                if failed[build] < args.fail_first:
                    failed[build] += 1
                    step = (Step("build-and-push", 1, "Error"),)
                    # The pod first, as the kubelet leaves it: Shipwright reads the failed step from it.
                    tekton.pod(name, run["metadata"]["labels"][BUILDRUN_LABEL], step)
                    time.sleep(1)
                    tekton.fail(name, "Failed", '"step-build-and-push" exited with code 1', step)
                else:
                    tekton.succeed(name, "sha256:" + hashlib.sha256(name.encode()).hexdigest(), 8_388_608)
        time.sleep(0.5)


if __name__ == "__main__":
    main()
