#!/usr/bin/env bash
# Self-test of scripts/vm/run.sh: boots the micro-VM twice and checks that
#  1. e2e/vsockprobe really talks over AF_VSOCK loopback (CID 1) in the VM
#     (exit 0, "vsock loopback: available"), and
#  2. a failing command's exit status comes back (false -> 1).
# Usage: scripts/vm/selftest.sh [extra run.sh options, e.g. --timeout 900]
set -euo pipefail

log() { printf 'e2e: selftest: %s\n' "$*" >&2; }
fail() {
	log "FAIL: $*"
	exit 1
}

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
run="$repo/scripts/vm/run.sh"
tmp=$(mktemp -d "${TMPDIR:-/tmp}/nitrosign-selftest.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
mkdir "$tmp/bundle"

log "building e2e/vsockprobe (CGO_ENABLED=0, static)"
(cd "$repo" && CGO_ENABLED=0 go build -trimpath -o "$tmp/bundle/vsockprobe" ./e2e/vsockprobe)

log "1/2: vsockprobe inside the VM (expect exit 0)"
rc=0
"$run" "$@" --bundle "$tmp/bundle" -- vsockprobe | tee "$tmp/probe.log" || rc=$?
((rc == 0)) || fail "vsockprobe in the VM exited $rc (want 0)"
grep -q '^vsock loopback: available$' "$tmp/probe.log" ||
	fail "vsockprobe did not report 'vsock loopback: available'"

log "2/2: 'false' inside the VM (expect exit 1)"
rc=0
"$run" "$@" --bundle "$tmp/bundle" -- false || rc=$?
((rc == 1)) || fail "'false' in the VM made run.sh exit $rc (want 1)"

log "PASS: vsock loopback works in the VM and exit statuses propagate"
