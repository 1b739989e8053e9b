#!/usr/bin/env bash
# Shared helpers of benchmark.sh and h2spec.sh: the loopback servers they
# start, each with its log in $out, stopped when the script exits. Sourced,
# not run; the sourcing script defines log, die, $out (output directory)
# and $bin (where nitrosign is built).
# shellcheck disable=SC2154 # out and bin are the sourcing script's

pids=()
declare -A pid_of=()
# shellcheck disable=SC2317 # invoked by trap
cleanup() {
	local p
	for p in "${pids[@]}"; do
		kill "$p" 2>/dev/null || true
	done
	for p in "${pids[@]}"; do
		wait "$p" 2>/dev/null || true
	done
}
trap cleanup EXIT
trap 'log interrupted; exit 130' INT TERM

# port_free HOST:PORT: nothing listens there.
port_free() {
	! (exec 3<>"/dev/tcp/${1%:*}/${1#*:}") 2>/dev/null
}

# start NAME CMD...: run CMD in the background with its output in $out/NAME.log.
start() {
	local name=$1
	shift
	"$@" >"$out/$name.log" 2>&1 &
	pids+=($!)
	pid_of[$name]=$!
}

# wait_ready NAME TARGET: until an Echo through TARGET succeeds.
wait_ready() {
	local name=$1 target=$2
	for _ in $(seq 1 100); do
		if "$bin/nitrosign" echo --target "$target" --timeout 1s >/dev/null 2>&1; then
			return 0
		fi
		kill -0 "${pid_of[$name]}" 2>/dev/null || die "$name exited; its log:
$(tail -n 20 "$out/$name.log")"
		sleep 0.2
	done
	die "$name is not answering on $target after 20s; its log:
$(tail -n 20 "$out/$name.log")"
}
