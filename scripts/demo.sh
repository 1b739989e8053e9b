#!/usr/bin/env bash
# make demo: bring up the enclave signer and the host proxy on real AF_VSOCK,
# use them as a person would (scripts/demo-steps.sh), and tear down.
#
# Where this kernel has vsock loopback the demo runs directly; otherwise it
# runs inside a qemu micro-VM (scripts/vm/run.sh), the same choice as
# `make e2e`. Exit status 0 only if every step worked.
set -euo pipefail

log() { printf 'demo: %s\n' "$*" >&2; }

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

tmp=$(mktemp -d "${TMPDIR:-/tmp}/nitrosign-demo.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
bundle=$tmp/bundle
mkdir -p "$bundle"

log "building static binaries (CGO_ENABLED=0)"
CGO_ENABLED=0 go build -trimpath -o "$bundle/" ./enclave/cmd/nitrosign-enclave ./host/cmd/nitrosign-proxy ./host/cmd/nitrosign ./fakes/cmd/nitrosign-kmsfake
cp scripts/demo-steps.sh "$bundle/demo-steps.sh"
CGO_ENABLED=0 go build -trimpath -o "$tmp/vsockprobe" ./e2e/vsockprobe

rc=0
if probe=$("$tmp/vsockprobe" 2>&1); then
	log "vsock loopback available natively: running the demo directly"
	PATH=$bundle:$PATH sh "$bundle/demo-steps.sh" || rc=$?
else
	log "no vsock loopback on this kernel (${probe#vsock loopback: unavailable: }): running the demo inside a qemu micro-VM (TCG)"
	"$repo/scripts/vm/run.sh" --timeout 900 --bundle "$bundle" -- sh /bundle/demo-steps.sh || rc=$?
fi
if ((rc == 0)); then
	log "demo passed"
else
	log "demo failed: exit status $rc"
fi
exit "$rc"
