#!/usr/bin/env bash
# Start the nitrosign enclave with `nitro-cli run-enclave`.
#
# Usage: scripts/run-enclave.sh [--config FILE] [--eif PATH] [--cid CID]
#          [--cpu-count N] [--memory MIB] [--name NAME] [--debug-mode]
#
#   --config FILE   read defaults from FILE (deploy/enclave.env format);
#                   flags given after it override it
#   --eif PATH      the EIF from scripts/build-eif.sh
#                   (default build/eif/nitrosign-enclave.eif)
#   --cid CID       enclave CID, >= 4 (default 16); the proxy's --upstream
#                   is vsock://CID:5005
#   --cpu-count N   vCPUs (default 2), within deploy/allocator.yaml
#   --memory MIB    memory in MiB (default 512), within allocator.yaml
#   --name NAME     enclave name (default nitrosign)
#   --debug-mode    DEVELOPMENT ONLY: console readable with `nitro-cli
#                   console`, and attestation PCRs are ALL ZERO
#
# Prints nitro-cli's JSON description of the started enclave on stdout.
set -euo pipefail
# shellcheck source=scripts/enclave-lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/enclave-lib.sh"

ENCLAVE_NAME=nitrosign
ENCLAVE_EIF=build/eif/nitrosign-enclave.eif
ENCLAVE_CID=16
ENCLAVE_CPU_COUNT=2
ENCLAVE_MEMORY_MIB=512
ENCLAVE_DEBUG=false

while (($# > 0)); do
	case $1 in
	--config)
		need_value "$@"
		load_config "$2"
		shift 2
		;;
	--eif)
		need_value "$@"
		ENCLAVE_EIF=$2
		shift 2
		;;
	--cid)
		need_value "$@"
		ENCLAVE_CID=$2
		shift 2
		;;
	--cpu-count)
		need_value "$@"
		ENCLAVE_CPU_COUNT=$2
		shift 2
		;;
	--memory)
		need_value "$@"
		ENCLAVE_MEMORY_MIB=$2
		shift 2
		;;
	--name)
		need_value "$@"
		ENCLAVE_NAME=$2
		shift 2
		;;
	--debug-mode)
		ENCLAVE_DEBUG=true
		shift
		;;
	-h | --help)
		sed -n '2,20p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
		exit 0
		;;
	*) usage_error "unknown argument '$1'" ;;
	esac
done

# Check the parameters before touching nitro-cli, so mistakes are named.
is_uint "$ENCLAVE_CID" || usage_error "CID '$ENCLAVE_CID' is not a number"
((ENCLAVE_CID >= 4 && ENCLAVE_CID < 4294967295)) ||
	usage_error "CID $ENCLAVE_CID: an enclave CID is 4 to 4294967294 (0-3 are reserved, 1 is local loopback)"
if ! is_uint "$ENCLAVE_CPU_COUNT" || ((ENCLAVE_CPU_COUNT < 1)); then
	usage_error "CPU count '$ENCLAVE_CPU_COUNT' must be a positive number"
fi
if ! is_uint "$ENCLAVE_MEMORY_MIB" || ((ENCLAVE_MEMORY_MIB < 64)); then
	usage_error "memory '$ENCLAVE_MEMORY_MIB' must be a number of MiB, at least 64"
fi
[[ $ENCLAVE_NAME =~ ^[A-Za-z0-9._-]+$ ]] || usage_error "name '$ENCLAVE_NAME': letters, digits, '.', '_' and '-' only"
case $ENCLAVE_DEBUG in
true | false) ;;
*) usage_error "ENCLAVE_DEBUG must be true or false, not '$ENCLAVE_DEBUG'" ;;
esac
[[ -f $ENCLAVE_EIF ]] || die "EIF $ENCLAVE_EIF not found: build it with scripts/build-eif.sh, or pass --eif"

require_nitro_cli
require_allocator

# nitro-cli refuses a second enclave with the same name, with a terse error.
if existing=$(nitro-cli describe-enclaves 2>/dev/null) && grep -q "\"EnclaveName\": \"$ENCLAVE_NAME\"" <<<"$existing"; then
	die "an enclave named $ENCLAVE_NAME is already running: stop it first with scripts/terminate-enclave.sh --name $ENCLAVE_NAME"
fi

args=(run-enclave
	--eif-path "$ENCLAVE_EIF"
	--enclave-cid "$ENCLAVE_CID"
	--cpu-count "$ENCLAVE_CPU_COUNT"
	--memory "$ENCLAVE_MEMORY_MIB"
	--enclave-name "$ENCLAVE_NAME")
if [[ $ENCLAVE_DEBUG == true ]]; then
	warn "DEBUG MODE: the enclave's attestation documents will carry ALL-ZERO PCRs, so clients pinning PCRs \
(nitrosign attest --pcrs-file) refuse it unless given --allow-debug, and the host can read its console. \
Never use debug mode for real keys."
	args+=(--debug-mode)
fi

log "starting enclave $ENCLAVE_NAME: CID $ENCLAVE_CID, $ENCLAVE_CPU_COUNT vCPUs, $ENCLAVE_MEMORY_MIB MiB, $ENCLAVE_EIF"
if ! nitro-cli "${args[@]}"; then
	die "nitro-cli run-enclave failed (see its message above and /var/log/nitro_enclaves/nitro_enclaves.log); \
common causes: the allocator reserves less memory or fewer CPUs than asked, or the CID is taken"
fi
log "started; the proxy reaches it at vsock://$ENCLAVE_CID:5005"
