#!/usr/bin/env bash
# Stop the nitrosign enclave with `nitro-cli terminate-enclave`. Its keys are
# gone for good: the next enclave generates new ones.
#
# Usage: scripts/terminate-enclave.sh [--config FILE] [--name NAME | --enclave-id ID | --all]
#
#   --config FILE     read ENCLAVE_NAME from FILE (deploy/enclave.env format)
#   --name NAME       the enclave's name (default nitrosign)
#   --enclave-id ID   the id `nitro-cli describe-enclaves` prints
#   --all             every enclave on this instance
#
# Stopping an enclave that is not running is not an error (exit 0), so the
# script can be a systemd ExecStop.
set -euo pipefail
# shellcheck source=scripts/enclave-lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/enclave-lib.sh"

ENCLAVE_NAME=nitrosign
enclave_id=""
all=false

while (($# > 0)); do
	case $1 in
	--config)
		need_value "$@"
		load_config "$2"
		shift 2
		;;
	--name)
		need_value "$@"
		ENCLAVE_NAME=$2
		shift 2
		;;
	--enclave-id)
		need_value "$@"
		enclave_id=$2
		shift 2
		;;
	--all)
		all=true
		shift
		;;
	-h | --help)
		sed -n '2,14p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
		exit 0
		;;
	*) usage_error "unknown argument '$1'" ;;
	esac
done
[[ -n $enclave_id && $all == true ]] && usage_error "give --enclave-id or --all, not both"

require_nitro_cli

if [[ $all == true ]]; then
	log "terminating every enclave"
	nitro-cli terminate-enclave --all
	exit 0
fi

if [[ -z $enclave_id ]]; then
	described=$(nitro-cli describe-enclaves) || die "nitro-cli describe-enclaves failed"
	if ! grep -q "\"EnclaveName\": \"$ENCLAVE_NAME\"" <<<"$described"; then
		log "no enclave named $ENCLAVE_NAME is running: nothing to do"
		exit 0
	fi
	log "terminating enclave $ENCLAVE_NAME"
	nitro-cli terminate-enclave --enclave-name "$ENCLAVE_NAME"
	exit 0
fi

log "terminating enclave $enclave_id"
nitro-cli terminate-enclave --enclave-id "$enclave_id"
