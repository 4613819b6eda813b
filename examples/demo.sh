#!/usr/bin/env bash
# make demo: a visible end-to-end run on the local control plane. Watch it in another terminal:
#   kubectl --kubeconfig .local/kubeconfig get wo -n demo -w
set -euo pipefail
cd "$(dirname "$0")/.."
export KUBECONFIG=$PWD/.local/kubeconfig
ns=demo
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
table() { kubectl get wo -n "$ns" -o wide 2>/dev/null | sed 's/^/   /'; }

python -m workorder_operator.envtest crds >/dev/null
kubectl delete namespace "$ns" --ignore-not-found --wait=true >/dev/null
kubectl create namespace "$ns" >/dev/null

# One operator acts, ever: if one already leads (e.g. `make run` in another terminal, same Lease
# default/workorder-operator), the demo uses it; otherwise it starts its own under the same Lease.
holder=$(kubectl get lease workorder-operator -n default -o jsonpath='{.spec.holderIdentity} {.spec.renewTime}' 2>/dev/null || true)
renewed=${holder#* }
if [ -n "${holder%% *}" ] && [ -n "$renewed" ] && [ $(( $(date +%s) - $(date -d "$renewed" +%s) )) -lt 20 ]; then
  say "using the operator already running (${holder%% *}, e.g. make run): its log is in its own terminal"
else
  say "operator starting (log: .local/demo-operator.log)"
  workorder-operator -n "$ns" --leader-election-namespace default > .local/demo-operator.log 2>&1 & pids+=($!)
  for _ in $(seq 1 120); do grep -q "is the leader" .local/demo-operator.log && break; sleep 0.5; done
fi

say "watch along:  kubectl --kubeconfig .local/kubeconfig get wo -n $ns -w"
sleep 3

say "creating orders"
for i in 1 2 3 4; do
  echo "mode: ok" | kubectl workorder create -n "$ns" --type script --name "job-$i" --priority "$i" -f -
done
echo "mode: flaky" | kubectl workorder create -n "$ns" --type script --name flaky --backoff 3 -f -
echo "mode: ok" | kubectl workorder create -n "$ns" --type script --name abandoned --claim-timeout 5 -f -
kubectl workorder create -n "$ns" --type build --name taxi-app --backoff 3 -f examples/build-order.yaml

say "the operator's build agent runs 'taxi-app' through the real Shipwright controller (started with the control plane)"
echo "   no kubelet runs here, so a stand-in plays Tekton's TaskRun: the first fails in a step, the retry succeeds"
PYTHONPATH=$PWD python examples/tekton_standin.py "$ns" --fail-first 1 & pids+=($!)

say "a shell agent claims 'abandoned' and then vanishes without renewing (its claim expires after 5 s)"
kubectl workorder claim abandoned -n "$ns" --id 00000000-0000-4000-8000-00000000dead

say "two agents start: agent-a and agent-b run examples/demo-work.sh for each order"
kubectl workorder agent run -n "$ns" --type script --id 0000000a-0000-4000-8000-000000000000 -- examples/demo-work.sh & pids+=($!)
kubectl workorder agent run -n "$ns" --type script --id 0000000b-0000-4000-8000-000000000000 -- examples/demo-work.sh & pids+=($!)

for _ in $(seq 1 60); do
  sleep 2
  say "$(date +%T)"; table
  if [ "$(kubectl get wo -n "$ns" --field-selector status.phase=Completed -o name | wc -l)" -eq 7 ]; then break; fi
done

say "all done; the flaky order's history shows the retry, the abandoned one the expiry"
kubectl workorder history flaky -n "$ns"
kubectl workorder history abandoned -n "$ns"
kubectl get events -n "$ns" --field-selector reason=Expire -o custom-columns=REASON:.reason,OBJECT:.involvedObject.name,MESSAGE:.message
say "the build order's result is the image digest; Shipwright ran attempt 1 as BuildRun taxi-app-1, attempt 2 as taxi-app-2"
kubectl get wo taxi-app -n "$ns" -o jsonpath='{.status.result}{"\n"}'
kubectl get builds,buildruns,taskruns -n "$ns"
[ "$(kubectl get wo -n "$ns" --field-selector status.phase=Completed -o name | wc -l)" -eq 7 ]
