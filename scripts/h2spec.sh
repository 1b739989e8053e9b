#!/usr/bin/env bash
# HTTP/2 conformance of the proxy, side by side with grpc-go's server.
#
# Runs h2spec (plaintext HTTP/2, prior knowledge) against the enclave graph
# (nitrosign-benchserver enclave: the real gRPC server, a plain grpc-go
# server) and against the real nitrosign-proxy binary in front of it, both on
# TCP loopback, then prints the two results side by side and fails (exit 1)
# when the proxy fails a test that grpc-go passes, listing those tests with
# h2spec's messages. A test both fail is reported, not failed on: h2spec
# sends plain HTTP requests (GET /, POST /) that a gRPC server answers in its
# own way, and several of its tests expect a 200 response or a DATA frame.
#
# Usage: scripts/h2spec.sh [SPEC...]
#
#   SPEC  h2spec test ids to run, e.g. http2/5.1 or http2/8.1.2.2/1
#         (default: h2spec's whole default set, 145 tests, ~2 minutes)
#
# Installs h2spec into .tools/ on first use with `go install` (Go module
# github.com/summerwind/h2spec, version H2SPEC_VERSION). Only loopback
# addresses are used; every run is bounded in time; the processes this
# script starts are stopped on exit.
#
# Environment:
#   H2SPEC_OUT      output directory (default: a new /tmp/nitrosign-h2spec.*):
#                   grpc-go.{xml,txt}, proxy.{xml,txt} (JUnit report, console
#                   output), side-by-side.{txt,md}, the server logs, bin/
#   H2SPEC_PORT     first of two consecutive loopback ports (default 17201:
#                   the enclave graph, then the proxy)
#   H2SPEC_TIMEOUT  h2spec's timeout of each test, in seconds (default 2)
#   H2SPEC_VERSION  h2spec module version (default v2.2.1+incompatible, the
#                   latest on the Go module proxy; its binary calls itself
#                   2.0.0)
set -euo pipefail

log() { printf 'h2spec: %s\n' "$*" >&2; }
die() {
	printf 'h2spec: error: %s\n' "$*" >&2
	exit 2
}

case ${1:-} in
-h | --help)
	sed -n '2,33p' "$0" | sed 's/^# \{0,1\}//'
	exit 0
	;;
esac
for spec in "$@"; do
	[[ $spec =~ ^(generic|http2|hpack)(/[0-9.]+)*$ ]] || die "'$spec' is not an h2spec test id (e.g. http2/5.1/6; see --help)"
done

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

port=${H2SPEC_PORT:-17201}
if ! [[ $port =~ ^[0-9]+$ ]] || ((port <= 1024 || port >= 65000)); then
	die "H2SPEC_PORT must be a port number between 1025 and 64999"
fi
per_test=${H2SPEC_TIMEOUT:-2}
[[ $per_test =~ ^[1-9][0-9]?$ ]] || die "H2SPEC_TIMEOUT must be a number of seconds between 1 and 99"
version=${H2SPEC_VERSION:-v2.2.1+incompatible}
out=${H2SPEC_OUT:-$(mktemp -d "${TMPDIR:-/tmp}/nitrosign-h2spec.XXXXXX")}
mkdir -p "$out"
bin=$out/bin
mkdir -p "$bin"

enc_addr=127.0.0.1:$port
px_addr=127.0.0.1:$((port + 1))

# ------------------------------------------------------------- processes --

# shellcheck source=scripts/procs-lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/procs-lib.sh"

# ----------------------------------------------------------- h2spec tool --

h2spec=$repo/.tools/h2spec
stamp=$repo/.tools/h2spec-$version
if [[ ! -x $h2spec || ! -e $stamp ]]; then
	log "installing h2spec $version into .tools/ (go install github.com/summerwind/h2spec/cmd/h2spec@$version)"
	mkdir -p "$repo/.tools"
	rm -f "$repo"/.tools/h2spec-v*
	# Outside the module: h2spec's own module, not this one, is built.
	(cd "$repo/.tools" && GOBIN=$repo/.tools CGO_ENABLED=0 GOFLAGS="" go install "github.com/summerwind/h2spec/cmd/h2spec@$version")
	touch "$stamp"
fi

# ----------------------------------------------------------------- build --

log "building nitrosign, nitrosign-proxy and nitrosign-benchserver (CGO_ENABLED=0) into $bin"
CGO_ENABLED=0 go build -trimpath -o "$bin/" ./host/cmd/nitrosign ./host/cmd/nitrosign-proxy ./cmd/nitrosign-benchserver

for a in "$enc_addr" "$px_addr"; do
	port_free "$a" || die "$a is in use: set H2SPEC_PORT to a free range"
done

# --------------------------------------------------------------- servers --

log "starting the enclave graph (grpc-go server) on $enc_addr"
start enclave "$bin/nitrosign-benchserver" enclave --listen "$enc_addr"
wait_ready enclave "tcp://$enc_addr"
log "starting nitrosign-proxy on $px_addr -> tcp://$enc_addr"
start proxy "$bin/nitrosign-proxy" --listen "$px_addr" --upstream "tcp://$enc_addr" --log-level warn
wait_ready proxy "tcp://$px_addr"

# ---------------------------------------------------------------- h2spec --

# run_h2spec NAME ADDR PROCESS: h2spec against ADDR, served by PROCESS (a
# name given to start); JUnit report $out/NAME.xml, console output
# $out/NAME.txt. h2spec exits 1 when a test fails: that is read from the
# report, not from its exit status.
run_h2spec() {
	local name=$1 addr=$2 proc=$3 rc=0
	log "h2spec against $name ($addr), ${per_test}s per test"
	printf '$ .tools/h2spec%s -h %s -p %s -o %s -j %s\n' "$specs_text" "${addr%:*}" "${addr#*:}" "$per_test" "$out/$name.xml" \
		>>"$out/commands.txt"
	rm -f "$out/$name.xml"
	timeout 900 "$h2spec" "${specs[@]}" -h "${addr%:*}" -p "${addr#*:}" -o "$per_test" -j "$out/$name.xml" \
		>"$out/$name.txt" 2>&1 || rc=$?
	if [[ ! -s $out/$name.xml ]]; then
		die "h2spec against $name wrote no report (exit $rc); its output:
$(tail -n 20 "$out/$name.txt")"
	fi
	log "$name: $(tail -n 1 "$out/$name.txt")"
	kill -0 "${pid_of[$proc]}" 2>/dev/null || die "$proc exited during h2spec; its log:
$(tail -n 20 "$out/$proc.log")"
}

specs=("$@")
specs_text=${*:+ $*}
printf '# %s, h2spec %s\n' "$(date -u +%Y-%m-%dT%H:%MZ)" "$version" >"$out/commands.txt"
run_h2spec grpc-go "$enc_addr" enclave
run_h2spec proxy "$px_addr" proxy

rc=0
"$bin/nitrosign-benchserver" h2spec-compare \
	--baseline "grpc-go=$out/grpc-go.xml" --baseline-log "$out/grpc-go.txt" \
	--target "proxy=$out/proxy.xml" --target-log "$out/proxy.txt" \
	--markdown "$out/side-by-side.md" 2>&1 | tee "$out/side-by-side.txt" || rc=$?
if ((rc == 0)); then
	log "done: the proxy fails no test that grpc-go passes; outputs in $out"
else
	log "FAILED: the proxy fails tests that grpc-go passes (listed above); outputs in $out"
	exit 1
fi
