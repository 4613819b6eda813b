#!/usr/bin/env bash
# The demo's "work": reads the order's YAML on stdin and behaves as it says.
#   mode: ok      -> takes 1-3 s, succeeds
#   mode: flaky   -> fails retryably (exit 75) on its first attempt, then succeeds
set -euo pipefail
mode=$(sed -n 's/^mode: *//p')
echo "attempt $WORKORDER_ATTEMPT of $WORKORDER_NAME on agent ${WORKORDER_AGENT_ID:0:8}"
sleep $((1 + RANDOM % 3))
if [ "$mode" = flaky ] && [ "$WORKORDER_ATTEMPT" = 1 ]; then
  echo "registry unavailable, try again later" >&2
  exit 75
fi
echo "sha256:$(echo "$WORKORDER_NAME" | sha256sum | cut -c1-16)"
