#!/usr/bin/env bash
# Build the enclave signer binary exactly as Dockerfile.enclave does: this
# script is the one definition of that build, run by the Dockerfile and by
# scripts/reproducible-build.sh, so the two cannot drift apart.
#
# Usage: scripts/build-enclave-binary.sh OUT_FILE [ARCH]
#
#   ARCH  amd64 (x86 parents, the default) or arm64 (Graviton parents): an
#         EIF runs on its parent's architecture
#
# Static (CGO_ENABLED=0), linux/ARCH at the baseline ISA (GOAMD64=v1,
# GOARM64=v8.0), -trimpath (no build paths), -buildvcs=false (no VCS stamp), an empty build
# id (-buildid=) and stripped symbols: the output depends only on the
# source, the module versions in go.sum and the Go toolchain version.
set -euo pipefail

# The Go release Dockerfile.enclave builds with. A different local toolchain
# still builds reproducibly against itself, but not to the same bytes (and
# so not to the same PCRs) as the image.
readonly EXPECTED_GO=go1.26.8

die() {
	printf 'build-enclave-binary: error: %s\n' "$*" >&2
	exit 1
}

(($# == 1 || $# == 2)) || die "usage: $0 OUT_FILE [amd64|arm64]"
out=$1
arch=${2:-amd64}
case $arch in
amd64 | arm64) ;;
*) die "architecture '$arch': want amd64 or arm64" ;;
esac
case $out in
/*) ;;
*) out=$PWD/$out ;;
esac

command -v go >/dev/null 2>&1 || die "go not found in PATH (need $EXPECTED_GO)"
cd "$(dirname "${BASH_SOURCE[0]}")/.."

have=$(go env GOVERSION)
if [[ $have != "$EXPECTED_GO" ]]; then
	printf 'build-enclave-binary: warning: %s here, Dockerfile.enclave uses %s: the binary will differ from the image'"'"'s\n' \
		"$have" "$EXPECTED_GO" >&2
fi

# Everything that could reach the output is set, nothing inherited.
unset GOEXPERIMENT GOFIPS140 GODEBUG GOAMD64 GOARM64
export CGO_ENABLED=0 GOOS=linux GOARCH=$arch GOFLAGS=-mod=readonly GOTOOLCHAIN=local
case $arch in
amd64) export GOAMD64=v1 ;;
arm64) export GOARM64=v8.0 ;;
esac

go build -trimpath -buildvcs=false -ldflags='-s -w -buildid=' -o "$out" ./enclave/cmd/nitrosign-enclave
