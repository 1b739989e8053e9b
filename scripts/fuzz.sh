#!/usr/bin/env bash
# Runs fuzz targets, each for FUZZTIME: scripts/fuzz.sh PKG:FuzzName ...
#
# Go 1.26's fuzzing coordinator can fail a target at the end of a
# duration -fuzztime with a bare "context deadline exceeded" when a
# worker is still mid-call as the deadline fires (go.dev/issue/75804,
# fixed in Go 1.27); loaded machines hit it now and then. Such a run
# found nothing: it wrote no failing input and reported no panic or test
# failure. It is run once more, and only the second run decides. Any
# other failure fails at once.
set -euo pipefail

GO=${GO:-go}
FUZZTIME=${FUZZTIME:-10s}

# deadline_flake LOG: the run failed with the coordinator's deadline
# error and nothing else (no failing input, no panic, no test's message).
deadline_flake() {
	grep -q 'context deadline exceeded' "$1" || return 1
	! grep -qE 'Failing input written|panic:|^[[:space:]]+[[:alnum:]_]+_test\.go:[0-9]+: ' "$1"
}

log=$(mktemp)
trap 'rm -f "$log"' EXIT
for t in "$@"; do
	pkg=${t%%:*}
	fn=${t##*:}
	for attempt in 1 2; do
		echo "fuzz $fn ($pkg) for $FUZZTIME"
		if CGO_ENABLED=1 "$GO" test -run='^$' -fuzz="^$fn\$" -fuzztime="$FUZZTIME" "$pkg" 2>&1 | tee "$log"; then
			break
		fi
		if [ "$attempt" = 1 ] && deadline_flake "$log"; then
			echo "fuzz: $fn failed on the fuzzing coordinator's deadline (go.dev/issue/75804), no input found: once more"
			continue
		fi
		exit 1
	done
done
