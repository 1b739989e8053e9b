#!/usr/bin/env bash
# Build and run the end-to-end suite (package ./e2e) against the real
# binaries, over real AF_VSOCK loopback (CID 1).
#
# Usage: scripts/e2e.sh [e2e.test flags, e.g. -test.run TestSign -test.count 1]
#
# If this kernel has vsock loopback (probed with e2e/vsockprobe) the suite runs
# directly; otherwise it runs inside a qemu micro-VM (TCG) via
# scripts/vm/run.sh, which is 20-40x slower.
#
# The bundle holds every main package under ./enclave/cmd/... and
# ./host/cmd/... (built with CGO_ENABLED=0 -trimpath), e2e.test, and
# e2e/testdata if present; the suite finds the binaries through
# NITROSIGN_BIN_DIR (the bundle dir natively, /bundle in the VM).
#
# Environment:
#   NITROSIGN_E2E_MODE        auto (default), native or vm
#   NITROSIGN_E2E_TIMEOUT     -test.timeout in seconds (default 600 native,
#                             1200 in the VM); the VM gets 300 s more
#   NITROSIGN_E2E_VM_CPUS     VM cpus (default 2)
#   NITROSIGN_E2E_VM_MEM      VM memory in MB (default 2048)
# Variables named NITROSIGN_E2E_*, GOTRACEBACK, GODEBUG and CI are passed
# into the VM.
set -euo pipefail

log() { printf 'e2e: %s\n' "$*" >&2; }
die() {
	printf 'e2e: error: %s\n' "$*" >&2
	exit 1
}

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

mode=${NITROSIGN_E2E_MODE:-auto}
case $mode in
auto | native | vm) ;;
*) die "NITROSIGN_E2E_MODE must be auto, native or vm, not '$mode'" ;;
esac

tmp=$(mktemp -d "${TMPDIR:-/tmp}/nitrosign-e2e.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
bundle=$tmp/bundle
mkdir -p "$bundle" "$tmp/tools"

export CGO_ENABLED=0
GRPCURL_VERSION=v1.9.4
HEALTH_PROBE_VERSION=v0.4.62

# --------------------------------------------------------------- build --

mapfile -t mains < <(go list -e -f '{{if eq .Name "main"}}{{.ImportPath}}{{end}}' \
	./enclave/cmd/... ./host/cmd/... 2>/dev/null | sed '/^$/d')
if ((${#mains[@]} == 0)); then
	log "warning: no main packages under ./enclave/cmd/... or ./host/cmd/... yet"
else
	log "building ${#mains[@]} binaries (CGO_ENABLED=0 -trimpath): ${mains[*]}"
	go build -trimpath -o "$bundle/" "${mains[@]}"
fi

# Real third-party gRPC clients, pinned, are part of the suite: grpcurl
# (reflection) and grpc-health-probe must work against our servers.
tools=$repo/.tools/e2e
if [[ ! -x $tools/grpcurl || ! -x $tools/grpc-health-probe ]]; then
	log "installing grpcurl $GRPCURL_VERSION and grpc-health-probe $HEALTH_PROBE_VERSION into .tools/e2e"
	GOBIN=$tools go install "github.com/fullstorydev/grpcurl/cmd/grpcurl@$GRPCURL_VERSION"
	GOBIN=$tools go install "github.com/grpc-ecosystem/grpc-health-probe@$HEALTH_PROBE_VERSION"
fi
cp "$tools/grpcurl" "$tools/grpc-health-probe" "$bundle/"

compgen -G "e2e/*_test.go" >/dev/null || die "./e2e has no _test.go files yet: nothing to run"
log "building the e2e test binary (./e2e)"
go test -c -trimpath -o "$bundle/e2e.test" ./e2e
[[ -x $bundle/e2e.test ]] || die "./e2e produced no test binary (no _test.go files yet?)"
if [[ -d e2e/testdata ]]; then
	cp -R e2e/testdata "$bundle/testdata"
fi

# ---------------------------------------------------------------- mode --

go build -trimpath -o "$tmp/tools/vsockprobe" ./e2e/vsockprobe
probe_rc=0
probe_out=$("$tmp/tools/vsockprobe" 2>&1) || probe_rc=$?
reason=${probe_out#vsock loopback: unavailable: }

if [[ $mode == auto ]]; then
	if ((probe_rc == 0)); then
		log "vsock loopback available natively: running e2e directly"
		mode=native
	else
		log "no vsock loopback on this kernel ($reason): running e2e inside a qemu micro-VM (TCG)"
		mode=vm
	fi
elif [[ $mode == native ]]; then
	((probe_rc == 0)) || log "warning: NITROSIGN_E2E_MODE=native but the probe says: $reason"
	log "NITROSIGN_E2E_MODE=native: running e2e directly"
else
	log "NITROSIGN_E2E_MODE=vm: running e2e inside a qemu micro-VM (TCG)"
fi

# ----------------------------------------------------------------- run --

rc=0
if [[ $mode == native ]]; then
	t=${NITROSIGN_E2E_TIMEOUT:-600}
	[[ $t =~ ^[1-9][0-9]*$ ]] || die "NITROSIGN_E2E_TIMEOUT must be seconds, not '$t'"
	log "running e2e.test -test.v -test.timeout=${t}s $*"
	(cd e2e && NITROSIGN_BIN_DIR=$bundle "$bundle/e2e.test" -test.v "-test.timeout=${t}s" "$@") || rc=$?
else
	t=${NITROSIGN_E2E_TIMEOUT:-1200}
	[[ $t =~ ^[1-9][0-9]*$ ]] || die "NITROSIGN_E2E_TIMEOUT must be seconds, not '$t'"
	envs=(--env NITROSIGN_BIN_DIR=/bundle)
	while IFS= read -r name; do
		envs+=(--env "$name=${!name}")
	done < <(compgen -e | grep -E '^(NITROSIGN_E2E_[A-Za-z0-9_]*|GOTRACEBACK|GODEBUG|CI)$' || true)
	log "running e2e.test -test.v -test.timeout=${t}s $* in the VM"
	"$repo/scripts/vm/run.sh" --timeout $((t + 300)) \
		--cpus "${NITROSIGN_E2E_VM_CPUS:-2}" --mem "${NITROSIGN_E2E_VM_MEM:-2048}" \
		"${envs[@]}" --bundle "$bundle" -- e2e.test -test.v "-test.timeout=${t}s" "$@" || rc=$?
fi
if ((rc == 0)); then
	log "e2e passed ($mode)"
else
	log "e2e failed ($mode): exit status $rc"
fi
exit "$rc"
