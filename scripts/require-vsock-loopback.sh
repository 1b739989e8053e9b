#!/usr/bin/env bash
# Used by `make run-server|run-proxy|run-client`: they need vsock loopback
# (CID 1). Without it, say so and name the command that works here.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
target=${1:-run}
if out=$(cd "$repo" && CGO_ENABLED=0 go run ./e2e/vsockprobe 2>&1); then
	exit 0
fi
cat >&2 <<MSG
make $target: this machine has no vsock loopback (${out#vsock loopback: unavailable: }).
  - With root on a kernel that has the module: modprobe vsock_loopback, then retry.
  - Otherwise run the whole system in a micro-VM instead:  make demo
    (or the test suite:  make e2e)
MSG
exit 1
