#!/usr/bin/env bash
# Benchmark nitrosign on this machine over TCP loopback: the real enclave
# graph (nitrosign-benchserver enclave, never shipped) and the real proxy
# binary, beside two layer-4 baselines in front of the same server (a plain
# Go io.Copy relay, nitrosign-benchserver l4relay, and socat with nodelay on
# both sides), measured by `nitrosign compare` in interleaved rounds.
#
# Usage: scripts/benchmark.sh [quick|full]
#
#   quick (default, what `make benchmark` runs, about 1.5 minutes): Echo
#         against the enclave directly, through the proxy, through the Go L4
#         relay and through socat (installed with apt-get when running as
#         root; skipped when missing), all four in one interleaved compare at
#         64 in flight and another at 1 in flight, then a summary with the
#         headline ratios, JSON files and SVG charts.
#   full  every figure of docs/PERFORMANCE.md, each with its command
#         (about 12 minutes); installs ghz into .tools/ with `go install`.
#
# Only loopback addresses are used; every run is bounded in time. The
# processes this script starts are stopped on exit.
#
# Environment:
#   BENCH_OUT       output directory (default: a new /tmp/nitrosign-bench.*)
#   BENCH_PORT      first of four consecutive loopback ports (default 17001:
#                   enclave, proxy, socat, l4relay); the full run also uses
#                   BENCH_PORT+5 and +6 for the calibration relays and
#                   BENCH_PORT+9 for a raw TCP echo
#   BENCH_DURATION  measured length of each run (default 3s quick, 5s full)
#   BENCH_ROUNDS    interleaved rounds per target (default 2 quick, 3 full)
#   BENCH_LAT_ROUNDS, BENCH_LAT_DURATION
#                   rounds and their length of the compares at 1 in
#                   flight (default 6 rounds of 1s: many short rounds,
#                   so each round's direct, proxy and relay are measured
#                   seconds apart and the per-round medians see drift less)
#   BENCH_PPROF     set to 1 to serve pprof on ports BENCH_PORT+10 (enclave)
#                   and BENCH_PORT+11 (proxy)
#   GHZ_VERSION     ghz version for the full suite (default v0.93.0)
set -euo pipefail

log() { printf 'benchmark: %s\n' "$*" >&2; }
die() {
	printf 'benchmark: error: %s\n' "$*" >&2
	exit 1
}

suite=${1:-quick}
case $suite in
quick | full) ;;
-h | --help)
	sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
	exit 0
	;;
*)
	printf 'benchmark: unknown suite %s: want quick or full (see --help)\n' "'$suite'" >&2
	exit 2
	;;
esac

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

port=${BENCH_PORT:-17001}
if ! [[ $port =~ ^[0-9]+$ ]] || ((port <= 1024 || port >= 65000)); then
	die "BENCH_PORT must be a port number between 1025 and 64999"
fi
lat_duration=${BENCH_LAT_DURATION:-1s}
lat_rounds=${BENCH_LAT_ROUNDS:-6}
if [[ $suite == quick ]]; then
	duration=${BENCH_DURATION:-3s}
	rounds=${BENCH_ROUNDS:-2}
else
	duration=${BENCH_DURATION:-5s}
	rounds=${BENCH_ROUNDS:-3}
fi
out=${BENCH_OUT:-$(mktemp -d "${TMPDIR:-/tmp}/nitrosign-bench.XXXXXX")}
mkdir -p "$out"
bin=$out/bin
mkdir -p "$bin"

enc_addr=127.0.0.1:$port
px_addr=127.0.0.1:$((port + 1))
socat_addr=127.0.0.1:$((port + 2))
l4_addr=127.0.0.1:$((port + 3))

# ------------------------------------------------------------- processes --

# shellcheck source=scripts/procs-lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/procs-lib.sh"

# ----------------------------------------------------------------- build --

log "building nitrosign, nitrosign-proxy and nitrosign-benchserver (CGO_ENABLED=0) into $bin"
CGO_ENABLED=0 go build -trimpath -o "$bin/" ./host/cmd/nitrosign ./host/cmd/nitrosign-proxy ./cmd/nitrosign-benchserver

for a in "$enc_addr" "$px_addr" "$socat_addr" "$l4_addr"; do
	port_free "$a" || die "$a is in use: set BENCH_PORT to a free range"
done

# ----------------------------------------------------------------- socat --

have_socat=false
if command -v socat >/dev/null; then
	have_socat=true
elif [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
	log "socat is not installed: installing it with apt-get (Debian package socat)"
	if DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends socat >/dev/null 2>&1 ||
		{ apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends socat >/dev/null 2>&1; }; then
		have_socat=true
	else
		log "apt-get install socat failed: the socat target is skipped"
	fi
else
	log "socat is not installed and this is not root: the socat target is skipped (install it: sudo apt-get install socat)"
fi

# --------------------------------------------------------------- servers --

pprof_enc=() pprof_px=()
if [[ ${BENCH_PPROF:-} == 1 ]]; then
	pprof_enc=(--pprof-listen "127.0.0.1:$((port + 10))")
	pprof_px=(--pprof-listen "127.0.0.1:$((port + 11))")
	log "pprof: enclave on http://127.0.0.1:$((port + 10))/debug/pprof/, proxy on http://127.0.0.1:$((port + 11))/debug/pprof/"
fi
log "starting the enclave graph on $enc_addr (TCP loopback, simulated NSM)"
start enclave "$bin/nitrosign-benchserver" enclave --listen "$enc_addr" "${pprof_enc[@]}"
wait_ready enclave "tcp://$enc_addr"
log "starting nitrosign-proxy on $px_addr -> tcp://$enc_addr"
start proxy "$bin/nitrosign-proxy" --listen "$px_addr" --upstream "tcp://$enc_addr" --log-level warn "${pprof_px[@]}"
wait_ready proxy "tcp://$px_addr"
log "starting the Go L4 relay (nitrosign-benchserver l4relay) on $l4_addr -> $enc_addr"
start l4relay "$bin/nitrosign-benchserver" l4relay --listen "$l4_addr" --upstream "$enc_addr"
wait_ready l4relay "tcp://$l4_addr"
# The baselines beside direct and the proxy, in the order of every compare.
targets=(--target "direct=tcp://$enc_addr" --target "proxy=tcp://$px_addr" --target "l4relay=tcp://$l4_addr")
if $have_socat; then
	# nodelay on BOTH sockets: socat leaves Nagle on by default, which holds
	# a small write back until the previous one is acknowledged (up to the
	# ~40 ms delayed ACK) and makes socat look slower than it is.
	log "starting socat on $socat_addr -> $enc_addr (nodelay on both sides; a process per client connection)"
	start socat socat "TCP-LISTEN:${socat_addr#*:},bind=127.0.0.1,reuseaddr,fork,nodelay" "TCP:$enc_addr,nodelay"
	wait_ready socat "tcp://$socat_addr"
	targets+=(--target "socat-nodelay=tcp://$socat_addr")
fi

nitrosign() { "$bin/nitrosign" "$@"; }

# run NAME CMD...: print and run a measurement, keeping its output.
run() {
	local name=$1
	shift
	printf '\n$ %s\n' "$*" | sed "s|$bin/||g" | tee -a "$out/commands.txt"
	"$@" 2>&1 | tee "$out/$name.txt"
}

machine="$(nproc) cores, $(uname -srm), Go $(go env GOVERSION)"
log "machine: $machine; output in $out"
printf '# %s, %s\n' "$(date -u +%Y-%m-%dT%H:%MZ)" "$machine" >"$out/commands.txt"

# ratio_field FILE TARGET FIELD: a field (throughput_ratio, added_p50_us, ...)
# of TARGET's entry in the "ratios" of a `nitrosign compare --json` FILE
# (over the first target, direct); empty when absent. The JSON is indented,
# one field a line, so awk reads it without a JSON tool.
ratio_field() {
	awk -v want="$2" -v field="$3" '
		/^  "ratios": \[/ { in_ratios = 1; next }
		in_ratios && /"target":/ { gsub(/[",]/, "", $2); name = $2 }
		in_ratios && name == want && $1 == "\"" field "\":" { gsub(/,/, "", $2); print $2; exit }
	' "$1"
}

# summary AT64.json AT1.json: the headline ratios of the two compares.
summary() {
	local at64=$1 at1=$2 t tp p50 px l4
	{
		printf '\nsummary (over direct; 64 in flight: %s, 1 in flight: %s)\n' "${at64##*/}" "${at1##*/}"
		printf '  %-14s %22s %26s\n' target "throughput @64 / direct" "added p50 @1 (us)"
		for t in proxy l4relay socat-nodelay; do
			tp=$(ratio_field "$at64" "$t" throughput_ratio)
			p50=$(ratio_field "$at1" "$t" added_p50_us)
			[[ -n $tp || -n $p50 ]] || continue
			printf '  %-14s %22s %26s\n' "$t" "$(awk -v x="$tp" 'BEGIN { if (x == "") print "n/a"; else printf "%.2fx", x }')" \
				"$(awk -v x="$p50" 'BEGIN { if (x == "") print "n/a"; else printf "%+.0f", x }')"
		done
		tp=$(ratio_field "$at64" proxy throughput_ratio)
		px=$(ratio_field "$at1" proxy added_p50_us)
		l4=$(ratio_field "$at1" l4relay added_p50_us)
		mpx=$(ratio_field "$at1" proxy median_added_p50_us)
		ml4=$(ratio_field "$at1" l4relay median_added_p50_us)
		awk -v tp="$tp" -v px="$px" -v l4="$l4" -v mpx="$mpx" -v ml4="$ml4" '
		function line(what, px, l4,   r) {
			if (px == "" || l4 == "") {
				printf "  %s, proxy / l4relay: n/a\n", what
				return ""
			}
			if (l4 <= 0) {
				printf "  %s, proxy / l4relay: %+.0f us / %+.0f us = n/a (the relay added nothing measurable)\n", what, px, l4
				return ""
			}
			r = px / l4
			printf "  %s, proxy / l4relay: %+.0f us / %+.0f us = %.2fx\n", what, px, l4, r
			return r
		}
		BEGIN {
			if (tp == "") print "  proxied / direct throughput at 64 in flight: n/a"
			else {
				# Three decimals at the margin, where two would print 0.65x for a miss.
				f = (tp >= 0.645 && tp < 0.655) ? "%.3fx" : "%.2fx"
				printf "  proxied / direct throughput at 64 in flight: " f " (target >= 0.65x: %s)\n", tp, (tp >= 0.65 ? "met" : "missed")
			}
			a = line("added p50 at 1 in flight, rounds merged", px, l4)
			b = line("added p50 at 1 in flight, median of the rounds", mpx, ml4)
			if (a == "" || b == "") print "  latency target (<= 1.5x): n/a"
			else printf "  latency target (<= 1.5x, both figures): %s\n", (a <= 1.5 && b <= 1.5 ? "met" : "missed")
		}'
	} | tee "$out/summary.txt"
}

if [[ $suite == quick ]]; then
	run compare-64 nitrosign compare "${targets[@]}" --concurrency 64 --connections 2 \
		--duration "$duration" --warmup 1s --rounds "$rounds" \
		--json "$out/compare-64.json" --chart "$out/compare-64.svg"
	run compare-1 nitrosign compare "${targets[@]}" --concurrency 1 --connections 1 \
		--duration "$lat_duration" --warmup 1s --rounds "$lat_rounds" \
		--json "$out/compare-1.json" --chart "$out/compare-1.svg"
	summary "$out/compare-64.json" "$out/compare-1.json"
	log "done: summary above (also $out/summary.txt); JSON and charts $out/compare-{64,1}.{json,svg}"
	exit 0
fi

# ----------------------------------------------------------- full suite --
# Each step is one figure of docs/PERFORMANCE.md.

direct=tcp://$enc_addr
proxy=tcp://$px_addr

# 1. Echo, bench and server on the same 2 cores, 64 in flight; then the
#    open loop at 14,000 calls/s (70% of the 20,000 target).
run 1-echo-closed nitrosign bench --name direct --target "$direct" --concurrency 64 --connections 1 \
	--duration 10s --warmup 2s --json "$out/1-echo-closed.json"
run 1-echo-open nitrosign bench --name direct --target "$direct" --rate 14000 --concurrency 64 --connections 1 \
	--duration 10s --warmup 2s --json "$out/1-echo-open.json" --chart "$out/1-echo-open.svg"

# 2. Signing through the whole stack against the in-process rate, both in
#    one invocation, interleaved.
for kt in ecc rsa; do
	run "2-sign-$kt" "$bin/nitrosign-benchserver" sign-baseline --key-type "$kt" \
		--target "direct=$direct" --target "stack=$proxy" --concurrency 64 --connections 2 \
		--duration "$duration" --warmup 1s --rounds "$rounds" --json "$out/2-sign-$kt.json"
done

# 3. The proxy: latency added at 1 in flight; throughput kept at saturation;
#    beside the L4 baselines (Go relay, socat with nodelay) in the same runs.
# The floor of one extra process on the path: a raw TCP echo, no gRPC.
floor_addr=127.0.0.1:$((port + 9))
start tcp-echo "$bin/nitrosign-benchserver" tcp-echo --listen "$floor_addr"
sleep 0.5
run 3-hop-floor "$bin/nitrosign-benchserver" tcp-pingpong --target "$floor_addr"
run 3-proxy-1 nitrosign compare "${targets[@]}" --concurrency 1 --connections 1 \
	--duration "$lat_duration" --warmup 1s --rounds "$lat_rounds" --json "$out/3-proxy-1.json" --chart "$out/3-proxy-1.svg"
run 3-proxy-64 nitrosign compare "${targets[@]}" --concurrency 64 --connections 2 \
	--duration "$duration" --warmup 1s --rounds "$rounds" --json "$out/3-proxy-64.json" --chart "$out/3-proxy-64.svg"
summary "$out/3-proxy-64.json" "$out/3-proxy-1.json"
# What work per call costs in latency here: the relay with a busy loop of
# 12 and 25 µs on every read (request and response: 24 and 50 µs a call),
# beside the plain relay and the proxy, at 1 in flight.
busy12_addr=127.0.0.1:$((port + 5))
busy25_addr=127.0.0.1:$((port + 6))
start l4relay-busy12 "$bin/nitrosign-benchserver" l4relay --listen "$busy12_addr" --upstream "$enc_addr" --busy 12us
start l4relay-busy25 "$bin/nitrosign-benchserver" l4relay --listen "$busy25_addr" --upstream "$enc_addr" --busy 25us
wait_ready l4relay-busy12 "tcp://$busy12_addr"
wait_ready l4relay-busy25 "tcp://$busy25_addr"
run 3-calibration nitrosign compare --target "direct=tcp://$enc_addr" --target "l4relay=tcp://$l4_addr" \
	--target "l4relay-busy12=tcp://$busy12_addr" --target "l4relay-busy25=tcp://$busy25_addr" --target "proxy=tcp://$px_addr" \
	--concurrency 1 --connections 1 --duration "$lat_duration" --warmup 1s --rounds "$lat_rounds" --json "$out/3-calibration.json"

# 4. Against socat (nodelay on both sides) in front of the same server.
if $have_socat; then
	run 4-churn nitrosign compare --target "proxy=$proxy" --target "socat-nodelay=tcp://$socat_addr" --concurrency 64 \
		--connect-every 10 --duration "$duration" --warmup 1s --rounds "$rounds" --json "$out/4-churn.json" --chart "$out/4-churn.svg"
	run 4-long nitrosign compare --target "proxy=$proxy" --target "socat-nodelay=tcp://$socat_addr" --concurrency 64 --connections 2 \
		--duration "$duration" --warmup 1s --rounds "$rounds" --json "$out/4-long.json" --chart "$out/4-long.svg"
else
	log "step 4 skipped: no socat"
fi

# 5. The bench itself against ghz, same server, concurrency and connections.
ghz_version=${GHZ_VERSION:-v0.93.0}
ghz=$repo/.tools/ghz-$ghz_version
if [[ ! -x $ghz ]]; then
	log "installing ghz $ghz_version into .tools/ (go install github.com/bojand/ghz/cmd/ghz)"
	mkdir -p "$repo/.tools"
	tmpbin=$(mktemp -d)
	GOBIN=$tmpbin CGO_ENABLED=0 go install "github.com/bojand/ghz/cmd/ghz@$ghz_version"
	mv "$tmpbin/ghz" "$ghz"
	rmdir "$tmpbin"
fi
payload=$(printf '%032d' 0 | base64 -w0) # 32 bytes, as the bench's default payload
for i in 1 2; do
	run "5-ghz-closed-$i" "$ghz" --insecure --call nitrosign.v1.EchoService/Echo -d "{\"payload\":\"$payload\"}" \
		-c 64 --connections 1 -z 10s "$enc_addr"
	run "5-bench-closed-$i" nitrosign bench --name direct --target "$direct" --concurrency 64 --connections 1 \
		--duration 10s --warmup 0s --json "$out/5-bench-closed-$i.json"
done
run 5-ghz-rate "$ghz" --insecure --call nitrosign.v1.EchoService/Echo -d "{\"payload\":\"$payload\"}" \
	-c 64 --connections 1 --rps 5000 -z 10s "$enc_addr"
run 5-bench-rate nitrosign bench --name direct --target "$direct" --rate 5000 --concurrency 64 --connections 1 \
	--duration 10s --warmup 0s --json "$out/5-bench-rate.json"

# 6. Memory: the enclave under 256 calls in flight; the proxy holding 1,000
#    client connections that are almost all idle (10 calls/s in all).
run 6-enclave-256 nitrosign bench --name direct --target "$direct" --rpc sign --key-type ecc --concurrency 256 --connections 4 \
	--duration 10s --warmup 1s --watch-pid "${pid_of[enclave]}" --json "$out/6-enclave-256.json"
run 6-proxy-1000 nitrosign bench --name proxy --target "$proxy" --connections 1000 --concurrency 1000 --rate 10 \
	--duration 10s --warmup 0s --watch-pid "${pid_of[proxy]}" --json "$out/6-proxy-1000.json"

log "done: every output is in $out (commands in $out/commands.txt)"
