#!/usr/bin/env bash
# The flake-proof runs (README, "Tests that can fail"): a suite run again and again, in random order,
# optionally while a CPU hog keeps every core busy (pytest then at the lowest CPU priority).
#
#   tools/flake-check.sh unit 20 --hog     # the unit suite 20 times under a CPU hog
#   tools/flake-check.sh integration 3     # the integration suite 3 times in a row
#
# Each run uses a new pytest-randomly seed (printed; replay with -p randomly --randomly-seed=N).
# Prints one line per run and the count of green runs; exits non-zero if any run failed.
set -uo pipefail

suite=${1:?usage: tools/flake-check.sh unit|integration RUNS [--hog]}
runs=${2:?usage: tools/flake-check.sh unit|integration RUNS [--hog]}
hog=${3:-}
cd "$(dirname "$0")/.."
bin=$(make -s venv | sed -n 's/^virtualenv: //p')/bin

hogs=()
stop_hogs() {
	for pid in "${hogs[@]}"; do kill "$pid" 2>/dev/null; done
}
trap stop_hogs EXIT
if [[ $hog == --hog ]]; then
	# One busy loop per core, at nice 10: it starves pytest (nice 19) but yields to everyone
	# else's work on a shared machine.
	for _ in $(seq "$(nproc)"); do
		nice -n 10 sh -c 'while :; do :; done' &
		hogs+=($!)
	done
fi

# Under the hog, pytest runs at the lowest priority (starved: what a loaded CI machine does to
# timing). Without it, at normal priority: the integration suite's control plane (pytest's
# children) must not lose to everyone else's work on a shared machine.
prio=()
if [[ $hog == --hog ]]; then prio=(nice -n 19); fi

green=0
for i in $(seq "$runs"); do
	log=$(mktemp)
	seed=$((RANDOM * 32768 + RANDOM))
	if PATH=$bin:$PATH "${prio[@]}" "$bin/pytest" -q -p randomly --randomly-seed="$seed" "tests/$suite" >"$log" 2>&1; then
		green=$((green + 1))
		echo "run $i: green (--randomly-seed=$seed): $(tail -n 1 "$log")"
	else
		echo "run $i: RED (--randomly-seed=$seed), whole output kept in $log:"
		grep -E '^(FAILED|ERROR)' "$log"
		tail -n 1 "$log"
		continue
	fi
	rm -f "$log"
done
echo "$suite: $green of $runs runs green${hog:+ (under a CPU hog)}"
[[ $green == "$runs" ]]
