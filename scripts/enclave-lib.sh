#!/usr/bin/env bash
# Shared helpers of build-eif.sh, run-enclave.sh and terminate-enclave.sh.
# Sourced, not run. Each function fails with a message that says what is
# missing and how to get it.

# prog is the name of the script that sourced this file.
prog=$(basename "${BASH_SOURCE[1]:-$0}" .sh)

log() { printf '%s: %s\n' "$prog" "$*" >&2; }
warn() { printf '%s: WARNING: %s\n' "$prog" "$*" >&2; }
die() {
	printf '%s: error: %s\n' "$prog" "$*" >&2
	exit 1
}
usage_error() {
	printf '%s: %s (see --help)\n' "$prog" "$*" >&2
	exit 2
}

# require_nitro_cli fails unless nitro-cli is installed and usable.
require_nitro_cli() {
	if ! command -v nitro-cli >/dev/null 2>&1; then
		die "nitro-cli not found in PATH. It runs on an EC2 instance with Nitro Enclaves enabled: \
install it with 'sudo dnf install aws-nitro-enclaves-cli aws-nitro-enclaves-cli-devel' (Amazon Linux 2023) \
and add yourself to the 'ne' group; see docs/DEPLOY.md"
	fi
}

# require_allocator warns when the allocator service is known not to run
# (nitro-cli then fails with a less helpful message).
require_allocator() {
	if command -v systemctl >/dev/null 2>&1 && systemctl list-unit-files nitro-enclaves-allocator.service >/dev/null 2>&1; then
		if ! systemctl is-active --quiet nitro-enclaves-allocator.service; then
			warn "nitro-enclaves-allocator.service is not active: no CPUs or memory are reserved for enclaves \
(install deploy/allocator.yaml as /etc/nitro_enclaves/allocator.yaml, then 'sudo systemctl enable --now nitro-enclaves-allocator.service')"
		fi
	fi
}

# load_config FILE sources an enclave.env file (NAME=value lines).
load_config() {
	local f=$1
	[[ -f $f ]] || die "config file $f not found (see deploy/enclave.env)"
	[[ -r $f ]] || die "config file $f is not readable"
	# shellcheck source=deploy/enclave.env
	. "$f"
}

# need_value FLAG VALUE... fails unless FLAG has a non-empty value.
need_value() {
	if (($# < 2)) || [[ -z $2 ]]; then
		usage_error "$1 needs a value"
	fi
}

# is_uint S reports whether S is a decimal number.
is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }
