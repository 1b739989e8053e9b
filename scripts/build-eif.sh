#!/usr/bin/env bash
# Build the enclave image from Dockerfile.enclave and turn it into an EIF
# with `nitro-cli build-enclave`. The PCRs nitro-cli prints are saved as JSON
# next to the EIF, so clients can pin them:
#   nitrosign attest --pcrs-file nitrosign-enclave.pcrs.json
#
# Usage: scripts/build-eif.sh [--output-dir DIR] [--tag TAG]
#
#   --output-dir DIR  where nitrosign-enclave.eif and nitrosign-enclave.pcrs.json
#                     go (default build/eif)
#   --tag TAG         docker image tag (default nitrosign-enclave:local)
#
# Needs a Docker engine and nitro-cli (an EC2 instance with Nitro Enclaves
# enabled, see docs/DEPLOY.md). The same source, Dockerfile and base image
# digest give the same PCRs on any machine: compare yours with the ones
# published for a release before trusting them.
set -euo pipefail
# shellcheck source=scripts/enclave-lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/enclave-lib.sh"

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out_dir=$repo/build/eif
tag=nitrosign-enclave:local

while (($# > 0)); do
	case $1 in
	--output-dir)
		need_value "$@"
		out_dir=$2
		shift 2
		;;
	--tag)
		need_value "$@"
		tag=$2
		shift 2
		;;
	-h | --help)
		sed -n '2,17p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
		exit 0
		;;
	*) usage_error "unknown argument '$1'" ;;
	esac
done

require_nitro_cli
command -v docker >/dev/null 2>&1 || die "docker not found in PATH: nitro-cli builds the EIF from a local Docker image \
('sudo dnf install docker && sudo systemctl enable --now docker' on Amazon Linux 2023)"
docker info >/dev/null 2>&1 || die "the Docker engine is not reachable ('docker info' failed): start it \
('sudo systemctl start docker') and make sure you may use it (the 'docker' group)"
[[ -f $repo/Dockerfile.enclave ]] || die "$repo/Dockerfile.enclave not found"

mkdir -p "$out_dir"
eif=$out_dir/nitrosign-enclave.eif
pcrs=$out_dir/nitrosign-enclave.pcrs.json

log "building image $tag from Dockerfile.enclave"
# linux/amd64: the enclave runs on the parent's architecture (x86 Nitro
# instances); no provenance or SBOM attestations, which nitro-cli ignores.
docker build --platform linux/amd64 --provenance=false -f "$repo/Dockerfile.enclave" -t "$tag" "$repo" >&2 ||
	die "docker build failed (see above)"

log "converting $tag into $eif"
tmp_json=$(mktemp)
trap 'rm -f "$tmp_json"' EXIT
if ! nitro-cli build-enclave --docker-uri "$tag" --output-file "$eif" >"$tmp_json"; then
	die "nitro-cli build-enclave failed (see above and /var/log/nitro_enclaves/)"
fi
grep -q '"PCR0"' "$tmp_json" || die "nitro-cli build-enclave printed no PCR0: $(cat "$tmp_json")"
mv "$tmp_json" "$pcrs"
trap - EXIT
chmod 0644 "$pcrs"

log "EIF: $eif"
log "PCRs (pin these on clients): $pcrs"
cat "$pcrs"
