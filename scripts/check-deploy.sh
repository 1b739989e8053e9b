#!/usr/bin/env bash
# Check the deployment files without an enclave or nitro-cli:
#   1. shellcheck on the deployment scripts;
#   2. systemd-analyze verify on deploy/*.service (and the TLS drop-in
#      example), with any warning treated as an error, plus
#      systemd-analyze security under an exposure threshold;
#   3. the enclave scripts fail cleanly (exit 1, a message naming
#      nitro-cli) where nitro-cli is not installed, and reject bad
#      parameters (exit 2) before calling it.
#
# Usage: scripts/check-deploy.sh
#
# systemd-analyze verify needs every ExecStart= binary to exist, so it runs
# on temporary copies of the units whose /usr/local/bin/ and
# /opt/nitrosign/scripts/ paths point at freshly built binaries and at this
# tree's scripts, next to a stub nitro-enclaves-allocator.service (that unit
# comes with nitro-cli). Needs Debian's shellcheck and systemd packages:
#   apt-get install -y shellcheck systemd
set -euo pipefail

log() { printf 'check-deploy: %s\n' "$*" >&2; }
fail() {
	printf 'check-deploy: FAIL: %s\n' "$*" >&2
	failed=1
}
failed=0

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
for tool in shellcheck systemd-analyze go; do
	command -v "$tool" >/dev/null 2>&1 || {
		printf 'check-deploy: error: %s not found (apt-get install -y shellcheck systemd)\n' "$tool" >&2
		exit 1
	}
done
tmp=$(mktemp -d "${TMPDIR:-/tmp}/nitrosign-check-deploy.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

# ------------------------------------------------------------ shellcheck --
# Every shell script of the project, .ci/run included.
mapfile -t scripts < <(git ls-files '*.sh' .ci/run 2>/dev/null || ls scripts/*.sh scripts/vm/*.sh .ci/run)
log "shellcheck ${scripts[*]}"
shellcheck -x "${scripts[@]}" || fail "shellcheck"

# --------------------------------------------------------------- systemd --
log "building nitrosign-proxy and nitrosign-supervisor for systemd-analyze verify"
CGO_ENABLED=0 go build -trimpath -o "$tmp/bin/" ./host/cmd/nitrosign-proxy ./host/cmd/nitrosign-supervisor
units=$tmp/units
mkdir -p "$units/nitrosign-proxy.service.d"
substitute() {
	sed -e "s#/usr/local/bin/nitrosign-proxy#$tmp/bin/nitrosign-proxy#g" \
		-e "s#/usr/local/bin/nitrosign-supervisor#$tmp/bin/nitrosign-supervisor#g" \
		-e "s#/opt/nitrosign/scripts/#$repo/scripts/#g" "$1"
}
substitute deploy/nitrosign-proxy.service >"$units/nitrosign-proxy.service"
substitute deploy/nitrosign-enclave.service >"$units/nitrosign-enclave.service"
printf '[Unit]\nDescription=stub of the unit nitro-cli installs\n[Service]\nType=oneshot\nExecStart=/bin/true\n' \
	>"$units/nitro-enclaves-allocator.service"

# verify_quiet runs systemd-analyze verify and fails on an error or on any
# message (unknown keys, bad values are only warnings to systemd).
verify_quiet() {
	local what=$1
	shift
	local out rc=0
	out=$(systemd-analyze verify "$@" 2>&1) || rc=$?
	if ((rc != 0)) || [[ -n $out ]]; then
		fail "systemd-analyze verify $what (exit $rc):"
		printf '%s\n' "$out" >&2
	else
		log "systemd-analyze verify $what: OK"
	fi
}
verify_quiet "deploy/nitrosign-proxy.service deploy/nitrosign-enclave.service" \
	"$units/nitrosign-proxy.service" "$units/nitrosign-enclave.service"
substitute deploy/nitrosign-proxy.service.d/tls.conf.example >"$units/nitrosign-proxy.service.d/tls.conf"
verify_quiet "deploy/nitrosign-proxy.service + nitrosign-proxy.service.d/tls.conf.example" "$units/nitrosign-proxy.service"
rm -rf "$units/nitrosign-proxy.service.d"

# The sandbox must stay tight: systemd rates exposure 0.0 (best) to 10.0
# and takes the threshold in tenths (25 = 2.5); the unit is at 1.5 now.
if ! systemd-analyze security --offline=true --threshold=25 "$units/nitrosign-proxy.service" >"$tmp/security.txt" 2>&1; then
	fail "systemd-analyze security: nitrosign-proxy.service exposure above 2.5:"
	tail -3 "$tmp/security.txt" >&2
else
	log "systemd-analyze security: $(grep -o 'Overall exposure level.*' "$tmp/security.txt")"
fi

# ----------------------------------------------- scripts without nitro-cli --
# A PATH with the basic tools and docker (if any) but no nitro-cli.
nopath=$tmp/nopath
mkdir -p "$nopath"
for tool in bash sh env dirname basename cat grep sed mktemp rm mkdir chmod mv tr docker systemctl; do
	if p=$(command -v "$tool" 2>/dev/null) && [[ $p == /* ]]; then
		ln -sf "$p" "$nopath/$tool"
	fi
done
touch "$tmp/fake.eif"

# expect WANT_RC WANT_TEXT CMD... runs CMD without nitro-cli in PATH.
expect() {
	local want_rc=$1 want_text=$2
	shift 2
	local out rc=0
	out=$(PATH=$nopath "$@" 2>&1 </dev/null) || rc=$?
	if ((rc != want_rc)) || ! grep -qF -- "$want_text" <<<"$out"; then
		fail "$* -> exit $rc, want $want_rc and '$want_text'; output:"
		printf '%s\n' "$out" >&2
	else
		log "ok: $* -> exit $rc: $(head -1 <<<"$out")"
	fi
}
kms_arn=arn:aws:kms:eu-west-1:111122223333:key/0b5c5a3e-1f2d-4c6b-9a8e-7d6f5e4d3c2b
expect 2 "--kms-key-arn (or KMS_KEY_ARN) is required" scripts/build-eif.sh --output-dir "$tmp/eif"
expect 2 "not an alias" scripts/build-eif.sh --kms-key-arn arn:aws:kms:eu-west-1:111122223333:alias/nitrosign
expect 1 "nitro-cli not found" scripts/build-eif.sh --kms-key-arn "$kms_arn" --output-dir "$tmp/eif"
expect 1 "nitro-cli not found" scripts/run-enclave.sh --eif "$tmp/fake.eif"
expect 1 "nitro-cli not found" scripts/run-enclave.sh --config deploy/enclave.env --eif "$tmp/fake.eif"
expect 1 "nitro-cli not found" scripts/terminate-enclave.sh
expect 1 "nitro-cli not found" scripts/terminate-enclave.sh --config deploy/enclave.env
expect 1 "EIF /nonexistent.eif not found" scripts/run-enclave.sh --eif /nonexistent.eif
expect 2 "an enclave CID is 4 to" scripts/run-enclave.sh --eif "$tmp/fake.eif" --cid 3
expect 2 "is not a number" scripts/run-enclave.sh --eif "$tmp/fake.eif" --cid x
expect 2 "at least 64" scripts/run-enclave.sh --eif "$tmp/fake.eif" --memory 10
expect 2 "unknown argument '--bogus'" scripts/run-enclave.sh --bogus
expect 2 "--cid needs a value" scripts/run-enclave.sh --cid
expect 1 "config file /nonexistent.env not found" scripts/run-enclave.sh --config /nonexistent.env
expect 2 "give --enclave-id or --all, not both" scripts/terminate-enclave.sh --all --enclave-id i-1
expect 0 "--debug-mode" scripts/run-enclave.sh --help
expect 1 "the enclave could not be started" "$tmp/bin/nitrosign-supervisor" --config deploy/enclave.env --log-format console

# ------------------------------------- build-eif.sh with stand-ins --
# Stand-ins for docker and nitro-cli that record how they were called: the
# image builds with plain `docker build` (no buildx flags), the EIF is signed
# when asked, and the build record names nitro-cli's version and blobs.
fakes=$tmp/fakes
mkdir -p "$fakes/bin" "$fakes/blobs"
printf 'kernel' >"$fakes/blobs/bzImage"
printf 'init' >"$fakes/blobs/init"
printf 'nsm' >"$fakes/blobs/nsm.ko"
cat >"$fakes/bin/docker" <<'FAKE'
#!/bin/sh
echo "docker $*" >>"$FAKE_LOG"
case $1 in
info) exit 0 ;;
build) exit 0 ;;
image) echo "sha256:1111111111111111111111111111111111111111111111111111111111111111" ;;
esac
FAKE
cat >"$fakes/bin/nitro-cli" <<'FAKE'
#!/bin/sh
echo "nitro-cli $*" >>"$FAKE_LOG"
case $1 in
--version) echo "Nitro CLI 1.4.2" ;;
build-enclave)
	pcr8=
	case "$*" in *--signing-certificate*) pcr8=',"PCR8":"'$(printf '%096d' 8)'"' ;; esac
	printf '{"Measurements":{"HashAlgorithm":"Sha384 { ... }","PCR0":"%096d","PCR1":"%096d","PCR2":"%096d"%s}}\n' 0 1 2 "$pcr8"
	;;
esac
FAKE
chmod +x "$fakes/bin/docker" "$fakes/bin/nitro-cli"
printf 'cert' >"$fakes/cert.pem"
printf 'key' >"$fakes/key.pem"
export FAKE_LOG=$fakes/calls
if out=$(PATH=$fakes/bin:$PATH NITRO_CLI_BLOBS=$fakes/blobs scripts/build-eif.sh --output-dir "$fakes/out" --kms-key-arn "$kms_arn" \
	--signing-certificate "$fakes/cert.pem" --private-key "$fakes/key.pem" --expect-nitro-cli 1.4.2 2>&1); then
	record=$fakes/out/nitrosign-enclave.build.json
	if grep -q -- '--provenance\|--platform\|buildx' "$FAKE_LOG"; then
		fail "build-eif.sh calls docker with buildx-only flags: $(grep '^docker build' "$FAKE_LOG")"
	elif ! grep -q -- "docker build --build-arg ARCH=" "$FAKE_LOG"; then
		fail "build-eif.sh does not pass the architecture: $(grep '^docker build' "$FAKE_LOG")"
	elif ! grep -q -- "--build-arg KMS_KEY_ARN=$kms_arn" "$FAKE_LOG" || ! grep -q "\"kms_key_arn\": \"$kms_arn\"" "$record"; then
		fail "build-eif.sh does not bake in the KMS key ARN: $(grep '^docker build' "$FAKE_LOG")"
	elif ! grep -q -- "--signing-certificate $fakes/cert.pem --private-key $fakes/key.pem" "$FAKE_LOG"; then
		fail "build-eif.sh did not sign the EIF: $(grep '^nitro-cli build-enclave' "$FAKE_LOG")"
	elif ! grep -q '"PCR8"' "$fakes/out/nitrosign-enclave.pcrs.json"; then
		fail "no PCR8 in the PCRs of a signed EIF"
	elif ! grep -q '"nitro_cli_version": "Nitro CLI 1.4.2"' "$record" ||
		! grep -q "\"bzImage\": \"$(printf kernel | sha256sum | cut -d' ' -f1)\"" "$record" ||
		! grep -q '"signed": true' "$record"; then
		fail "build record incomplete: $(cat "$record")"
	else
		log "ok: build-eif.sh with stand-ins: plain docker build, signed EIF (PCR8), build record"
	fi
else
	fail "build-eif.sh with stand-ins failed: $out"
fi
expect 1 "not 9.9.9" env PATH="$fakes/bin:$PATH" NITRO_CLI_BLOBS="$fakes/blobs" scripts/build-eif.sh --kms-key-arn "$kms_arn" --output-dir "$fakes/out2" --expect-nitro-cli 9.9.9
expect 2 "go together" scripts/build-eif.sh --kms-key-arn "$kms_arn" --signing-certificate "$fakes/cert.pem"

if ((failed)); then
	log "FAILED"
	exit 1
fi
log "all deployment checks passed"
