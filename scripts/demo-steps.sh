#!/bin/sh
# The demo itself: runs where the binaries are on PATH and vsock loopback
# works (natively, or inside the micro-VM under busybox sh). It brings up the
# enclave signer on vsock CID 1 and the host proxy in front of it, uses them
# as a person would, prints a summary, tears everything down, and exits 0 only
# if every step worked. scripts/demo.sh prepares and calls it.
set -u

PORT=${NITROSIGN_DEMO_PORT:-5005}
LISTEN=${NITROSIGN_DEMO_LISTEN:-127.0.0.1:8443}
DIRECT="vsock://1:$PORT"
PROXY="tcp://$LISTEN"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/nitrosign-demo.XXXXXX")
PASSED=0
FAILED=0
SUMMARY=""
ENCLAVE_PID=""
PROXY_PID=""
KMS_PID=""
HOST_PORT=5051
AUDIT_PORT=5052
FORWARD_PORT=8000

cleanup() {
	[ -n "$PROXY_PID" ] && kill "$PROXY_PID" 2>/dev/null && wait "$PROXY_PID" 2>/dev/null
	[ -n "$ENCLAVE_PID" ] && kill "$ENCLAVE_PID" 2>/dev/null && wait "$ENCLAVE_PID" 2>/dev/null
	[ -n "$KMS_PID" ] && kill "$KMS_PID" 2>/dev/null && wait "$KMS_PID" 2>/dev/null
	rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

banner() { printf '\n=== %s\n' "$*"; }

# step NAME CMD...: runs CMD, shows its output, records the outcome.
step() {
	name=$1
	shift
	banner "$name"
	printf '$ %s\n' "$*"
	if "$@"; then
		PASSED=$((PASSED + 1))
		SUMMARY="$SUMMARY
  ok    $name"
	else
		FAILED=$((FAILED + 1))
		SUMMARY="$SUMMARY
  FAIL  $name"
	fi
}

# must_fail CMD...: succeeds only when CMD fails.
must_fail() {
	if "$@"; then
		return 1
	fi
	return 0
}

# no_tty CMD...: runs CMD with stderr not a terminal (no live progress
# lines on the serial console), then shows what it wrote there.
no_tty() {
	"$@" 2>"$WORK/stderr"
	rc=$?
	cat "$WORK/stderr" >&2
	return $rc
}

# wait_serving TARGET: polls through the CLI until the keys are listed
# (Echo answers before a sealed keyset is unsealed; ListKeys does not).
wait_serving() {
	i=0
	while [ $i -lt 150 ]; do
		if nitrosign keys --target "$1" --timeout 2s >/dev/null 2>&1; then
			return 0
		fi
		i=$((i + 1))
		sleep 0.2
	done
	echo "demo: $1 did not start serving" >&2
	return 1
}

# start_enclave: the enclave with sealed keys. There is no AWS here: KMS
# is nitrosign-kmsfake (a test KMS that speaks KMS's protocol and checks
# the attestation document against the simulated NSM's root), reached as
# in production through the proxy's forwarder; the keyset lives in a file
# the proxy keeps.
start_enclave() {
	nitrosign-enclave --cid 1 --port "$PORT" --dev-simulated-nsm --dev-simulated-nsm-root "$WORK/kms/dev-root.pem" \
		--key-mode sealed --kms-key-arn "$KMS_KEY_ARN" --keyset-host "vsock://1:$HOST_PORT" \
		--kms-proxy "vsock://1:$FORWARD_PORT" --kms-ca-file "$WORK/kms/kms-ca.pem" \
		--policy "$WORK/policy.json" --dev-allow-anonymous --audit-ship "vsock://1:$AUDIT_PORT" \
		--log-ship "" --log-format console --log-level warn &
	ENCLAVE_PID=$!
}

banner "starting a test KMS (nitrosign-kmsfake: no AWS here)"
mkdir -p "$WORK/kms"
nitrosign-kmsfake --dir "$WORK/kms" &
KMS_PID=$!
i=0
while [ ! -s "$WORK/kms/kms.env" ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
# shellcheck disable=SC1091
. "$WORK/kms/kms.env" || exit 1
# The proxy reads the credentials it hands to the enclave from the AWS
# SDK's default chain: on EC2 the instance role (IMDSv2), here these.
export AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY AWS_SESSION_TOKEN AWS_EC2_METADATA_DISABLED=true

# Callers: alice is in the enclave's policy (she may sign with the ECC and
# Ed25519 keys), mallory is not. The policy is baked into a real enclave's
# image (deploy/policy.json); here it is a file. Calls without a caller
# signature are still allowed (--dev-allow-anonymous, development only),
# so the steps before these work as they are.
step "create two caller identities" sh -c "nitrosign identity create --out '$WORK/alice.key' && nitrosign identity create --out '$WORK/mallory.key' >/dev/null"
ALICE_PK=$(nitrosign identity show --identity "$WORK/alice.key" | sed -n 's/^policy *//p')
printf '{"version": 1, "callers": [\n  {"name": "alice", %s, "sign": [{"key_types": ["ECC", "ED25519"]}]}\n]}\n' "$ALICE_PK" >"$WORK/policy.json"
step "the enclave's caller policy: alice may sign with the ECC and Ed25519 keys" cat "$WORK/policy.json"

banner "starting the host proxy on $PROXY -> $DIRECT (keyset file, enclave host service, KMS forwarder and audit receiver on vsock)"
nitrosign-proxy --listen "$LISTEN" --upstream "$DIRECT" --pool-size 4 --log-format console --log-level warn \
	--keyset-file "$WORK/keyset.sealed" --enclave-host-port "$HOST_PORT" \
	--kms-forward-port "$FORWARD_PORT" --kms-endpoint "$KMS_ADDR" \
	--enclave-audit-port "$AUDIT_PORT" --audit-file "$WORK/audit.jsonl" &
PROXY_PID=$!
step "the operator asks for a new keyset (only this makes new keys)" nitrosign keyset init --file "$WORK/keyset.sealed"
banner "starting the enclave signer on $DIRECT (simulated NSM: no /dev/nsm here; sealed keys)"
start_enclave
wait_serving "$DIRECT" || exit 1
wait_serving "$PROXY" || exit 1
step "the sealed keyset, as the host holds it (no KMS needed to read its header)" nitrosign keyset show --file "$WORK/keyset.sealed"

step "list the keys through the proxy" nitrosign keys --target "$PROXY"
step "echo directly over vsock" nitrosign echo --target "$DIRECT" --payload "hello enclave" --count 3
step "echo through the proxy" nitrosign echo --target "$PROXY" --payload "hello proxy" --count 3

printf 'pay 100 to alice' >"$WORK/order.txt"
for kt in rsa ecc; do
	step "sign the order with the $kt key (through the proxy)" \
		nitrosign sign --target "$PROXY" --key-type "$kt" --in "$WORK/order.txt" --out "$WORK/order.$kt.sig"
	step "fetch the $kt public key as PEM" \
		nitrosign pubkey --target "$PROXY" --key-type "$kt" --out "$WORK/$kt.pem"
	step "verify the $kt signature offline with the PEM" \
		nitrosign verify --public-key "$WORK/$kt.pem" --in "$WORK/order.txt" --signature-file "$WORK/order.$kt.sig"
	printf 'pay 900 to alice' >"$WORK/forged.txt"
	step "a changed order does NOT verify with the $kt key" \
		must_fail nitrosign verify --public-key "$WORK/$kt.pem" --in "$WORK/forged.txt" --signature-file "$WORK/order.$kt.sig"
done
step "attestation through the proxy: document verified, keys bound (dev root)" \
	nitrosign attest --target "$PROXY" --dev-trust-server-root
step "sign with an attested key only" \
	nitrosign sign --target "$PROXY" --key-type ecc --attested --dev-trust-server-root --message "attested order"
step "benchmark: echo, direct vsock vs proxy, interleaved rounds" \
	no_tty nitrosign compare --rpc echo --target "direct=$DIRECT" --target "proxy=$PROXY" --concurrency 16 --duration 2s --rounds 2 --warmup 500ms
step "benchmark: ECDSA P-256 signing, direct vsock vs proxy" \
	no_tty nitrosign compare --rpc sign --key-type ecc --target "direct=$DIRECT" --target "proxy=$PROXY" --concurrency 16 --duration 2s --rounds 2 --warmup 500ms

# Who may sign: checked inside the enclave, whatever carries the call.
step "alice (in the policy) signs with the ECC key, through the proxy" \
	nitrosign sign --target "$PROXY" --identity "$WORK/alice.key" --key-type ecc --message "pay 100 to bob"
step "mallory (not in the policy) is refused: Unauthenticated" \
	must_fail nitrosign sign --target "$PROXY" --identity "$WORK/mallory.key" --key-type ecc --message "pay 100 to mallory"
step "alice may not use the RSA key: PermissionDenied" \
	must_fail nitrosign sign --target "$DIRECT" --identity "$WORK/alice.key" --key-type rsa --message "pay 100 to bob"
step "a long-lived client: alice signs in a session (one signed OpenSession, then a MAC per call), against each call signed, side by side" \
	no_tty nitrosign compare --rpc sign --key-type ecc --target "session=$PROXY" --target "signed=$PROXY" \
	--identity "session=$WORK/alice.key" --identity "signed=$WORK/alice.key" --sign-each-call signed --concurrency 4 --duration 2s --rounds 1 --warmup 500ms
step "the attestation document commits to the policy in force" \
	nitrosign attest --target "$PROXY" --dev-trust-server-root --policy-sha256 "$(sha256sum "$WORK/policy.json" | cut -d' ' -f1)"

# Keys that outlive the enclave: sign, restart the enclave, the same key
# id signs again and the signature from before verifies.
nitrosign keys --target "$PROXY" --output json >"$WORK/keys.before.json"
ECC_ID=$(nitrosign pubkey --target "$PROXY" --key-type ecc --output json | sed -n 's/.*"key_id": "\([0-9a-f]*\)".*/\1/p' | head -1)
step "sign with the ECC key $ECC_ID before the restart" \
	nitrosign sign --target "$PROXY" --key-id "$ECC_ID" --in "$WORK/order.txt" --out "$WORK/before.sig"
banner "restarting the enclave (SIGTERM, then a new process)"
kill "$ENCLAVE_PID" && wait "$ENCLAVE_PID" 2>/dev/null
start_enclave
wait_serving "$DIRECT" || exit 1
wait_serving "$PROXY" || exit 1
step "the same key ids after the restart" sh -c "nitrosign keys --target '$PROXY' --output json >'$WORK/keys.after.json' && cmp '$WORK/keys.before.json' '$WORK/keys.after.json' && echo 'key ids unchanged'"
step "the same key id signs again after the restart" \
	nitrosign sign --target "$PROXY" --key-id "$ECC_ID" --in "$WORK/order.txt" --out "$WORK/after.sig"
step "the signature from before the restart verifies with the key served after it" \
	sh -c "nitrosign pubkey --target '$PROXY' --key-id '$ECC_ID' --out '$WORK/ecc.after.pem' && nitrosign verify --public-key '$WORK/ecc.after.pem' --in '$WORK/order.txt' --signature-file '$WORK/before.sig'"
step "rotation is refused through the proxy (its clients may sign, not replace keys)" \
	must_fail nitrosign keys create --target "$PROXY" --type rsa
step "rotate from the parent over vsock: a new RSA key version becomes the default" nitrosign keys create --target "$DIRECT" --type rsa
step "the keyset after the rotation (the previous one kept beside it)" sh -c "nitrosign keys --target '$PROXY' && ls -l '$WORK'/keyset.sealed*"
sleep 2 # the last decisions' head (within a second) reaches the file
step "the audit trail of every decision (two chains: before and after the restart) verifies" \
	nitrosign audit verify --file "$WORK/audit.jsonl" --dev-trust-root "$WORK/kms/dev-root.pem"

banner "summary"
printf '%s\n\n%d steps passed, %d failed\n' "$SUMMARY" "$PASSED" "$FAILED"
[ "$FAILED" -eq 0 ]
