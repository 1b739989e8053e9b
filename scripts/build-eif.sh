#!/usr/bin/env bash
# Build the enclave image from Dockerfile.enclave and turn it into an EIF
# with `nitro-cli build-enclave`. The PCRs nitro-cli prints are saved as JSON
# next to the EIF, so clients can pin them:
#   nitrosign attest --pcrs-file nitrosign-enclave.pcrs.json
#
# Usage: scripts/build-eif.sh --kms-key-arn ARN [--output-dir DIR] [--tag TAG]
#          [--signing-certificate CERT --private-key KEY]
#          [--expect-nitro-cli VERSION]
#
#   --kms-key-arn ARN   the KMS key the enclave's keyset is sealed under
#                       (default $KMS_KEY_ARN; required): baked into the
#                       image's environment, so measured into PCR2
#   --output-dir DIR    where nitrosign-enclave.eif, nitrosign-enclave.pcrs.json
#                       and nitrosign-enclave.build.json go (default build/eif)
#   --tag TAG           docker image tag (default nitrosign-enclave:local)
#   --signing-certificate CERT, --private-key KEY
#                       sign the EIF (nitro-cli build-enclave): its PCR8 is
#                       then the certificate's, the same for every image
#                       signed with it, so clients can pin PCR8 across
#                       upgrades; KEY is an ECDSA key file or a KMS key ARN
#   --expect-nitro-cli VERSION
#                       fail unless `nitro-cli --version` says VERSION
#
# Needs a Docker engine (plain `docker build`: no buildx plugin) and nitro-cli
# (an EC2 instance with Nitro Enclaves enabled, see docs/DEPLOY.md), on the
# parent's architecture: x86_64 builds an amd64 EIF, aarch64 (Graviton) an
# arm64 one. PCR2 depends only on the source, the Dockerfile and the base
# image digest; PCR0 and PCR1 also on nitro-cli's kernel, init and NSM
# driver blobs, whose version and SHA-256 are recorded in
# nitrosign-enclave.build.json next to the PCRs: the same PCRs need the same
# nitro-cli blobs (docs/DEPLOY.md, "What makes the PCRs reproducible").
set -euo pipefail
# shellcheck source=scripts/enclave-lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/enclave-lib.sh"

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out_dir=$repo/build/eif
tag=nitrosign-enclave:local
signing_cert=
private_key=
kms_key_arn=${KMS_KEY_ARN:-}
expect_cli=

while (($# > 0)); do
	case $1 in
	--signing-certificate)
		need_value "$@"
		signing_cert=$2
		shift 2
		;;
	--private-key)
		need_value "$@"
		private_key=$2
		shift 2
		;;
	--expect-nitro-cli)
		need_value "$@"
		expect_cli=$2
		shift 2
		;;
	--output-dir)
		need_value "$@"
		out_dir=$2
		shift 2
		;;
	--kms-key-arn)
		need_value "$@"
		kms_key_arn=$2
		shift 2
		;;
	--tag)
		need_value "$@"
		tag=$2
		shift 2
		;;
	-h | --help)
		sed -n '2,35p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
		exit 0
		;;
	*) usage_error "unknown argument '$1'" ;;
	esac
done

[[ -n $kms_key_arn ]] || usage_error "--kms-key-arn (or KMS_KEY_ARN) is required: the enclave seals its keyset under that KMS key (docs/DEPLOY.md)"
[[ $kms_key_arn =~ ^arn:aws[a-z-]*:kms:[a-z0-9-]+:[0-9]{12}:key/[A-Za-z0-9-]+$ ]] ||
	usage_error "--kms-key-arn '$kms_key_arn': want a key ARN, arn:aws:kms:REGION:ACCOUNT:key/ID (not an alias: an alias can be moved to another key)"

# Both or neither: a certificate without its key cannot sign.
if [[ -n $signing_cert || -n $private_key ]]; then
	[[ -n $signing_cert && -n $private_key ]] || usage_error "--signing-certificate and --private-key go together"
	[[ -f $signing_cert ]] || die "signing certificate $signing_cert not found"
	[[ $private_key == arn:* || -f $private_key ]] || die "private key $private_key not found (a file, or a KMS key ARN)"
fi

require_nitro_cli
command -v docker >/dev/null 2>&1 || die "docker not found in PATH: nitro-cli builds the EIF from a local Docker image \
('sudo dnf install docker && sudo systemctl enable --now docker' on Amazon Linux 2023)"
docker info >/dev/null 2>&1 || die "the Docker engine is not reachable ('docker info' failed): start it \
('sudo systemctl start docker') and make sure you may use it (the 'docker' group)"
[[ -f $repo/Dockerfile.enclave ]] || die "$repo/Dockerfile.enclave not found"
command -v sha256sum >/dev/null 2>&1 || die "sha256sum not found in PATH (coreutils)"

# The EIF is for this machine's architecture: nitro-cli boots it with its
# own kernel blobs, which are this architecture's.
case $(uname -m) in
x86_64) arch=amd64 ;;
aarch64) arch=arm64 ;;
*) die "architecture $(uname -m): Nitro parents are x86_64 or aarch64 (Graviton)" ;;
esac

cli_version=$(nitro-cli --version 2>/dev/null | head -1) || die "'nitro-cli --version' failed"
if [[ -n $expect_cli && $cli_version != *"$expect_cli"* ]]; then
	die "nitro-cli is '$cli_version', not $expect_cli: PCR0 and PCR1 would differ from the published ones \
(install that version, see docs/DEPLOY.md, or drop --expect-nitro-cli)"
fi
# nitro-cli's kernel, init, NSM driver and kernel command line go into PCR0
# and PCR1: record what they are.
blobs=${NITRO_CLI_BLOBS:-/usr/share/nitro_enclaves/blobs}
[[ -d $blobs ]] || die "nitro-cli's blobs directory $blobs not found (set NITRO_CLI_BLOBS if it is elsewhere)"

mkdir -p "$out_dir"
eif=$out_dir/nitrosign-enclave.eif
pcrs=$out_dir/nitrosign-enclave.pcrs.json
record=$out_dir/nitrosign-enclave.build.json

log "building image $tag from Dockerfile.enclave ($arch)"
# Plain `docker build`: no buildx plugin needed. Where docker runs BuildKit
# through buildx anyway, no provenance or SBOM attestations (nitro-cli
# ignores them, and they would make the image differ between builders).
BUILDX_NO_DEFAULT_ATTESTATIONS=1 docker build --build-arg "ARCH=$arch" --build-arg "KMS_KEY_ARN=$kms_key_arn" -f "$repo/Dockerfile.enclave" -t "$tag" "$repo" >&2 ||
	die "docker build failed (see above)"
image_id=$(docker image inspect --format '{{.Id}}' "$tag") || die "docker image inspect $tag failed"

log "converting $tag into $eif"
sign_args=()
if [[ -n $signing_cert ]]; then
	sign_args=(--signing-certificate "$signing_cert" --private-key "$private_key")
	log "signing the EIF with $signing_cert (PCR8)"
fi
tmp_json=$(mktemp)
trap 'rm -f "$tmp_json"' EXIT
if ! nitro-cli build-enclave --docker-uri "$tag" --output-file "$eif" "${sign_args[@]}" >"$tmp_json"; then
	die "nitro-cli build-enclave failed (see above and /var/log/nitro_enclaves/)"
fi
grep -q '"PCR0"' "$tmp_json" || die "nitro-cli build-enclave printed no PCR0: $(cat "$tmp_json")"
if [[ -n $signing_cert ]]; then
	grep -q '"PCR8"' "$tmp_json" || die "nitro-cli build-enclave signed the EIF but printed no PCR8: $(cat "$tmp_json")"
fi
mv "$tmp_json" "$pcrs"
trap - EXIT
chmod 0644 "$pcrs"

# The build record: what the PCRs depend on besides this tree.
{
	printf '{\n'
	printf '  "arch": "%s",\n' "$arch"
	printf '  "nitro_cli_version": "%s",\n' "${cli_version//\"/}"
	printf '  "nitro_cli_blobs": {\n'
	sep=
	for f in "$blobs"/*; do
		[[ -f $f ]] || continue
		printf '%s    "%s": "%s"' "$sep" "$(basename "$f")" "$(sha256sum "$f" | cut -d' ' -f1)"
		sep=$',\n'
	done
	printf '\n  },\n'
	printf '  "base_image": "%s",\n' "$(sed -n 's/^ARG GO_IMAGE=//p' "$repo/Dockerfile.enclave")"
	printf '  "docker_image_id": "%s",\n' "$image_id"
	printf '  "kms_key_arn": "%s",\n' "$kms_key_arn"
	printf '  "signed": %s,\n' "$([[ -n $signing_cert ]] && echo true || echo false)"
	printf '  "pcrs_file": "%s"\n' "$(basename "$pcrs")"
	printf '}\n'
} >"$record"
chmod 0644 "$record"

log "EIF: $eif"
log "build record (nitro-cli version and blobs, for reproducing the PCRs): $record"
log "PCRs (pin these on clients; PCR8 alone for a signed EIF): $pcrs"
cat "$pcrs"
