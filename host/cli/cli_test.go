package cli

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/nitrosign/nitrosign/enclave/enclavetest"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

type result struct {
	code           int
	stdout, stderr string
}

func run(t *testing.T, stdin string, args ...string) result {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var out, errOut bytes.Buffer
	code := Run(ctx, IO{Stdin: strings.NewReader(stdin), Stdout: &out, Stderr: &errOut}, args)
	return result{code, out.String(), errOut.String()}
}

func mustOK(t *testing.T, r result) result {
	t.Helper()
	if r.code != ExitOK {
		t.Fatalf("exit %d, stderr: %s", r.code, r.stderr)
	}
	return r
}

func TestCLIAgainstEnclave(t *testing.T) {
	e := enclavetest.Start(t, enclavetest.DefaultConfig(), 0)
	tg := "--target=" + e.Target
	dir := t.TempDir()

	r := mustOK(t, run(t, "", "echo", tg, "--payload", "hello", "--count", "2"))
	if strings.Count(r.stdout, "echo 5 bytes from "+e.Target) != 2 {
		t.Fatalf("echo output: %q", r.stdout)
	}

	r = mustOK(t, run(t, "", "keys", tg, "--output", "json"))
	var keys []keyJSON
	if err := json.Unmarshal([]byte(r.stdout), &keys); err != nil {
		t.Fatal(err)
	}
	if len(keys) != 3 {
		t.Fatalf("%d keys", len(keys))
	}
	r = mustOK(t, run(t, "", "keys", tg))
	for _, k := range keys {
		if !strings.Contains(r.stdout, k.KeyID) {
			t.Fatalf("text listing lacks %s:\n%s", k.KeyID, r.stdout)
		}
	}

	for _, kt := range []string{"rsa", "ecc", "ed25519"} {
		t.Run(kt, func(t *testing.T) {
			pemFile := filepath.Join(dir, kt+".pem")
			mustOK(t, run(t, "", "pubkey", tg, "--key-type", kt, "--out", pemFile))
			// Sign from stdin, base64 to stdout; verify online and offline.
			sig := strings.TrimSpace(mustOK(t, run(t, "hello world", "sign", tg, "--key-type", kt)).stdout)
			mustOK(t, run(t, "hello world", "verify", tg, "--key-type", kt, "--signature", sig))
			mustOK(t, run(t, "hello world", "verify", "--public-key", pemFile, "--signature", sig))
			// A different message: invalid, exit 1.
			r := run(t, "hello world!", "verify", "--public-key", pemFile, "--signature", sig)
			if r.code != ExitFailure || !strings.Contains(r.stderr, "NOT valid") {
				t.Fatalf("tampered message: exit %d, stderr %q", r.code, r.stderr)
			}
		})
	}

	// RSA-PSS over a file, raw signature to a file, by key id.
	var rsaID string
	for _, k := range keys {
		if k.KeyType == "RSA" {
			rsaID = k.KeyID
		}
	}
	msgFile, sigFile := filepath.Join(dir, "doc.txt"), filepath.Join(dir, "doc.sig")
	if err := os.WriteFile(msgFile, []byte("a document"), 0o600); err != nil {
		t.Fatal(err)
	}
	mustOK(t, run(t, "", "sign", tg, "--key-id", rsaID, "--algorithm", "RSASSA_PSS_SHA_384", "--in", msgFile, "--out", sigFile))
	r = mustOK(t, run(t, "", "verify", tg, "--key-id", rsaID, "--algorithm", "rsassa_pss_sha_384", "--in", msgFile, "--signature-file", sigFile, "--output", "json"))
	var v map[string]any
	if err := json.Unmarshal([]byte(r.stdout), &v); err != nil || v["valid"] != true {
		t.Fatalf("verify json: %s %v", r.stdout, err)
	}

	// A digest signed with --digest verifies as a signature over the message.
	const sha256OfABC = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
	r = mustOK(t, run(t, "", "sign", tg, "--key-type", "ecc", "--digest", "--hex", "--message", sha256OfABC, "--output", "json"))
	var s map[string]string
	if err := json.Unmarshal([]byte(r.stdout), &s); err != nil {
		t.Fatal(err)
	}
	mustOK(t, run(t, "abc", "verify", tg, "--key-type", "ecc", "--signature", s["signature"]))

	// Server-side rejections come back as the status, exit 1.
	r = run(t, "", "sign", tg, "--key-type", "ecc", "--algorithm", "RSASSA_PSS_SHA_256", "--message", "x")
	if r.code != ExitFailure || !strings.Contains(r.stderr, "InvalidArgument") || !strings.Contains(r.stderr, "does not fit") {
		t.Fatalf("algorithm mismatch: exit %d, stderr %q", r.code, r.stderr)
	}
	r = run(t, "", "sign", tg, "--key-type", "ecc", "--digest", "--message", "short")
	if r.code != ExitFailure || !strings.Contains(r.stderr, "must be 32 bytes") {
		t.Fatalf("short digest: exit %d, stderr %q", r.code, r.stderr)
	}
}

func TestCLIUsageErrors(t *testing.T) {
	tests := []struct {
		args []string
		want string
	}{
		{[]string{"frobnicate"}, "unknown command"},
		{[]string{"keys", "--output", "yaml"}, "want text or json"},
		{[]string{"keys", "--bogus"}, "flag provided but not defined"},
		{[]string{"keys", "extra"}, "unexpected argument"},
		{[]string{"sign", "--message", "x"}, "choose a key"},
		{[]string{"sign", "--key-type", "dsa", "--message", "x"}, "want rsa, ecc or ed25519"},
		{[]string{"sign", "--key-type", "rsa", "--key-id", "ab", "--message", "x"}, "not both"},
		{[]string{"sign", "--key-type", "rsa", "--algorithm", "MD5", "--message", "x"}, "unknown signing algorithm"},
		{[]string{"sign", "--key-type", "rsa", "--hex", "--message", "zz"}, "not hex"},
		{[]string{"verify", "--key-type", "rsa", "--message", "x"}, "give the signature"},
		{[]string{"verify", "--key-type", "rsa", "--signature", "!!", "--message", "x"}, "not base64"},
		{[]string{"echo", "--target", "127.0.0.1:8443"}, "want vsock://CID:PORT or tcp://HOST:PORT"},
		{[]string{"echo", "--count", "0"}, "at least 1"},
		{[]string{"keys", "--target", "tcp://192.0.2.1:8443"}, "not on loopback"},
		{[]string{"keys", "--target", "tcp://signer.example:8443"}, "not on loopback"},
	}
	for _, tt := range tests {
		t.Run(strings.Join(tt.args, " "), func(t *testing.T) {
			r := run(t, "", tt.args...)
			if r.code == ExitOK {
				t.Fatalf("exit 0, want an error")
			}
			if !strings.Contains(r.stderr, tt.want) {
				t.Fatalf("stderr %q does not say %q", r.stderr, tt.want)
			}
		})
	}
	if r := run(t, "", "sign", "-h"); r.code != ExitOK || !strings.Contains(r.stderr, "Examples:") {
		t.Fatalf("sign -h: exit %d, %q", r.code, r.stderr)
	}
	if r := run(t, ""); r.code != ExitUsage || !strings.Contains(r.stdout, "Commands:") {
		t.Fatalf("no args: exit %d, %q", r.code, r.stdout)
	}
}

func TestCLIDeadTarget(t *testing.T) {
	r := run(t, "", "keys", "--target", "tcp://127.0.0.1:1", "--timeout", "500ms")
	if r.code != ExitFailure || !strings.Contains(r.stderr, "cannot reach tcp://127.0.0.1:1") {
		t.Fatalf("dead target: exit %d, stderr %q", r.code, r.stderr)
	}
}

func TestCLIAttest(t *testing.T) {
	e := enclavetest.Start(t, enclavetest.DefaultConfig(), 0)
	tg := "--target=" + e.Target

	// A simulated NSM is refused unless its root is trusted explicitly.
	r := run(t, "", "attest", tg)
	if r.code != ExitFailure || !strings.Contains(r.stderr, "SIMULATED NSM") {
		t.Fatalf("simulated document accepted without the dev flag: exit %d, %q", r.code, r.stderr)
	}
	r = mustOK(t, run(t, "", "attest", tg, "--dev-trust-server-root"))
	for _, want := range []string{"WARNING: SIMULATED NSM", "attestation document VERIFIED", "PCR0", "attested signing keys"} {
		if !strings.Contains(r.stdout, want) {
			t.Fatalf("attest output lacks %q:\n%s", want, r.stdout)
		}
	}
	r = mustOK(t, run(t, "", "attest", tg, "--dev-trust-server-root", "--output", "json", "--nonce", "00112233", "--user-data", "order-42"))
	var doc struct {
		Verified bool              `json:"verified"`
		Nonce    string            `json:"nonce"`
		PCRs     map[string]string `json:"pcrs"`
		Keys     []keyJSON         `json:"keys"`
	}
	if err := json.Unmarshal([]byte(r.stdout), &doc); err != nil {
		t.Fatal(err)
	}
	if !doc.Verified || doc.Nonce != "00112233" || len(doc.Keys) != 3 || len(doc.PCRs) != 16 {
		t.Fatalf("attest json: %+v", doc)
	}
	// Expected PCRs: a match passes, a mismatch names the reason.
	mustOK(t, run(t, "", "attest", tg, "--dev-trust-server-root", "--pcr", "0="+doc.PCRs["0"]))
	r = run(t, "", "attest", tg, "--dev-trust-server-root", "--pcr", "0="+strings.Repeat("ab", 48))
	if r.code != ExitFailure || !strings.Contains(r.stderr, "REJECTED") || !strings.Contains(strings.ToLower(r.stderr), "pcr") {
		t.Fatalf("PCR mismatch: exit %d, %q", r.code, r.stderr)
	}
	// A signed EIF's PCR8 pinned alone, from a PCRs file with the others
	// (nitro-cli's format): an upgrade changes PCR0-2, not PCR8. The
	// simulated NSM's PCR8 is zero (no signing certificate).
	pcrsFile := filepath.Join(t.TempDir(), "pcrs.json")
	zero8 := strings.Repeat("00", len(doc.PCRs["8"])/2)
	writeFile(t, pcrsFile, `{"Measurements":{"HashAlgorithm":"Sha384 { ... }","PCR0":"`+strings.Repeat("ab", 48)+`","PCR8":"`+zero8+`"}}`)
	mustOK(t, run(t, "", "attest", tg, "--dev-trust-server-root", "--pcrs-file", pcrsFile, "--pin-pcrs", "8"))
	r = run(t, "", "attest", tg, "--dev-trust-server-root", "--pcrs-file", pcrsFile) // PCR0 differs
	if r.code != ExitFailure || !strings.Contains(r.stderr, "REJECTED") {
		t.Fatalf("all PCRs of the file pinned: exit %d, %q", r.code, r.stderr)
	}
	writeFile(t, pcrsFile, `{"PCR0":"`+doc.PCRs["0"]+`","PCR8":"`+strings.Repeat("cd", 48)+`"}`)
	r = run(t, "", "attest", tg, "--dev-trust-server-root", "--pcrs-file", pcrsFile, "--pin-pcrs", "8")
	if r.code != ExitFailure || !strings.Contains(r.stderr, "REJECTED") {
		t.Fatalf("another signing certificate's PCR8: exit %d, %q", r.code, r.stderr)
	}
	for _, bad := range [][]string{{"--pcrs-file", pcrsFile, "--pin-pcrs", "9"}, {"--pin-pcrs", "8"}, {"--pcrs-file", pcrsFile, "--pin-pcrs", "x"}} {
		r = run(t, "", append([]string{"attest", tg, "--dev-trust-server-root"}, bad...)...)
		if r.code != ExitUsage || !strings.Contains(r.stderr, "--pin-pcrs") {
			t.Fatalf("%v: exit %d, %q", bad, r.code, r.stderr)
		}
	}
	// Sign and verify with attested keys only.
	sig := strings.TrimSpace(mustOK(t, run(t, "attested message", "sign", tg, "--key-type", "ecc", "--attested", "--dev-trust-server-root")).stdout)
	mustOK(t, run(t, "attested message", "verify", tg, "--key-type", "ecc", "--attested", "--dev-trust-server-root", "--signature", sig))
	r = run(t, "attested message", "sign", tg, "--key-type", "ecc", "--attested")
	if r.code != ExitFailure || !strings.Contains(r.stderr, "SIMULATED NSM") {
		t.Fatalf("sign --attested against a simulated NSM without the dev flag: exit %d, %q", r.code, r.stderr)
	}
}

func TestCLIAttestGenuineDocument(t *testing.T) {
	const doc = "../verify/testdata/genuine-brave-nitriding-20220804.cbor"
	r := mustOK(t, run(t, "", "attest", "--document", doc, "--at", "1659640280975"))
	for _, want := range []string{"VERIFIED", "i-0809849710bf1b61b-enc01826a449a00b17a"} {
		if !strings.Contains(r.stdout, want) {
			t.Fatalf("attest output lacks %q:\n%s", want, r.stdout)
		}
	}
	// Today its certificates have long expired.
	r = run(t, "", "attest", "--document", doc)
	if r.code != ExitFailure || !strings.Contains(r.stderr, "REJECTED") || !strings.Contains(r.stderr, "expired") {
		t.Fatalf("expired genuine document: exit %d, %q", r.code, r.stderr)
	}
	r = run(t, "", "attest", "--document", doc, "--at", "yesterday")
	if r.code != ExitUsage {
		t.Fatalf("bad --at: exit %d, %q", r.code, r.stderr)
	}
}

func writeFile(t *testing.T, path, content string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}
